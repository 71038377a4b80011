"""Data-parallel wrappers, optimizers, gradient finalization and clipping, LR schedule.

Every implementation reduces gradients over the data x sequence-parallel group (``groups.dp_cp``:
every SP rank saw different tokens of the same samples) and *averages* them; the loop scales each
rank's loss so that the result is the gradient of the global-batch token mean (see ``loop.py``).

The main path, the GPU default (``--ddp-impl megatron``): megatron-core's
``DistributedDataParallel`` + ``get_megatron_optimizer`` (fp32 main params for bf16/fp16,
``--use-distributed-optimizer`` = ZeRO-1), finalized by megatron-core's ``finalize_model_grads``
and clipped by its optimizer (:class:`MegatronOptimizer`). GPU only: its buffers and type checks
assume CUDA.

The stand-ins, for CPU (gloo) and for FSDP (:class:`TorchOptimizer`, ``torch.optim.AdamW``):

- ``torch``: ``torch.nn.parallel.DistributedDataParallel``. Under pipeline parallelism the
  gradients are instead all-reduced over dp_cp once after the schedule (see
  :meth:`TorchOptimizer.finalize_grads` for why neither torch DDP nor megatron-core can do it).
- ``fsdp``: FSDP2 ``fully_shard`` per transformer layer and at the root (ZeRO-3 style: parameters,
  gradients and optimizer state sharded over dp_cp).

For these two, :class:`TorchOptimizer` does what ``finalize_model_grads`` and megatron's optimizer
do for megatron DDP: all-reduce over TP the gradients of parameters replicated under TP sequence
parallelism (norms), all-reduce tied embedding gradients between the first and last pipeline
stages, and clip by the global norm, counting each element of the full model once (TP shards
summed over TP, TP-replicated parameters once, stages summed over PP, FSDP shards summed over
dp_cp).

What this module reads of the run is :class:`OptimizerSettings`.
"""

from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

# the wrappers' walk is the checkpoint room's (it unwraps to save); re-exported for the loop
from megatron_lasp.checkpoint.modules import fsdp_reshard, torch_optimizers, unwrap_model  # noqa: F401

if TYPE_CHECKING:
    from megatron.core.process_groups_config import ProcessGroupCollection

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class OptimizerSettings:
    """What data parallelism, the optimizer and the LR schedule read of the run (named as its flags)."""

    ddp_impl: str
    """Data-parallel implementation: ``megatron`` (GPU default), ``torch`` or ``fsdp``."""
    bf16: bool
    """bf16 mixed precision."""
    fp16: bool
    """fp16 mixed precision with dynamic loss scaling (megatron only)."""
    use_distributed_optimizer: bool
    """ZeRO-1: megatron-core's distributed optimizer shards its state over dp_cp."""
    sequence_parallel: bool
    """Megatron's TP sequence parallelism (replicated norm gradients need a TP all-reduce)."""
    lr: float
    """Peak learning rate."""
    min_lr: float
    """Learning rate at the end of the decay."""
    weight_decay: float
    """AdamW weight decay (matrices only)."""
    adam_beta1: float
    """AdamW beta1."""
    adam_beta2: float
    """AdamW beta2."""
    adam_eps: float
    """AdamW epsilon."""
    clip_grad: float
    """Clip the global gradient norm to this (0: no clipping)."""
    lr_warmup_iters: int
    """Linear warmup steps from 0."""
    lr_decay_iters: int
    """Decay steps after which the learning rate stays at ``min_lr``."""
    lr_decay_style: str
    """``constant``, ``linear``, ``cosine`` or ``inverse-square-root``."""
    train_iters: int
    """Optimizer steps of the run (the weight-decay schedule's length)."""
    fused_adam: bool = True
    """megatron path: run torch's AdamW (megatron-core's fallback without apex / Transformer Engine)
    as its fused CUDA kernel instead of the multi-tensor one (``--no-fused-adam``, ``--no-fusion``)."""

    def megatron_ddp_config(self):
        """megatron-core's ``DistributedDataParallelConfig`` for these settings."""
        from megatron.core.distributed import DistributedDataParallelConfig

        return DistributedDataParallelConfig(
            grad_reduce_in_fp32=True,
            overlap_grad_reduce=False,
            use_distributed_optimizer=self.use_distributed_optimizer,
            check_for_nan_in_grad=False,
        )

    def megatron_optimizer_config(self, params_dtype):
        """megatron-core's ``OptimizerConfig`` (Adam) for these settings and the model's ``params_dtype``."""
        from megatron.core.optimizer import OptimizerConfig

        return OptimizerConfig(
            optimizer="adam",
            lr=self.lr,
            min_lr=self.min_lr,
            weight_decay=self.weight_decay,
            adam_beta1=self.adam_beta1,
            adam_beta2=self.adam_beta2,
            adam_eps=self.adam_eps,
            clip_grad=self.clip_grad,
            bf16=self.bf16,
            fp16=self.fp16,
            params_dtype=params_dtype,
            loss_scale=None,
            initial_loss_scale=2.0 ** 16 if self.fp16 else None,
            use_distributed_optimizer=self.use_distributed_optimizer,
        )


def _local(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (FSDP2), or the tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t


# ----------------------------------------------------------------------------------------------
# wrapping


def _layer_modules(module: torch.nn.Module) -> List[torch.nn.Module]:
    """Transformer layers to shard one by one under FSDP (megatron-core ``decoder.layers``)."""
    decoder = getattr(module, "decoder", None)
    layers = getattr(decoder, "layers", None)
    return list(layers) if layers is not None else []


def wrap_data_parallel(model: torch.nn.Module, settings: OptimizerSettings, groups: ProcessGroupCollection,
                       model_config) -> torch.nn.Module:
    """Wrap ``model`` for data parallelism over ``groups.dp_cp`` according to ``settings.ddp_impl``.

    Args:
        model: one pipeline stage of the model (unwrapped, on its device).
        settings: the run's :class:`OptimizerSettings`.
        groups: megatron-core's ``ProcessGroupCollection`` from ``initialize_parallel``.
        model_config: the model's TransformerConfig (megatron DDP needs it).

    Returns:
        the wrapped model (the same object for ``fsdp``).
    """
    impl = settings.ddp_impl
    if impl == "megatron":
        from megatron.core.distributed import DistributedDataParallel

        if settings.bf16 or settings.fp16:
            from megatron.core.transformer.module import Float16Module

            model = Float16Module(model_config, model)
        return DistributedDataParallel(config=model_config, ddp_config=settings.megatron_ddp_config(), module=model)
    if impl == "torch":
        if groups.dp_cp.size() == 1:
            return model
        if groups.pp.size() > 1:
            # torch DDP cannot reduce under 1F1B (TorchOptimizer.finalize_grads says why): the
            # optimizer all-reduces the gradients after the schedule instead.
            for p in model.parameters():
                dist.broadcast(p.data, src=dist.get_global_rank(groups.dp_cp, 0), group=groups.dp_cp)
            return model
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [torch.cuda.current_device()] if torch.cuda.is_available() else None
        return DistributedDataParallel(model, device_ids=device_ids, process_group=groups.dp_cp)
    if impl == "fsdp":
        from torch.distributed.device_mesh import DeviceMesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        device_type = "cuda" if torch.cuda.is_available() else "cpu"
        mesh = DeviceMesh.from_group(groups.dp_cp, device_type)
        kwargs = {"mesh": mesh}
        if settings.bf16:
            kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        for layer in _layer_modules(model):
            fully_shard(layer, **kwargs)
        fully_shard(model, **kwargs)
        return model
    raise ValueError(f"unknown --ddp-impl {impl!r}")


def no_sync_func(model: torch.nn.Module, ddp_impl: str):
    """A context-manager factory that suspends gradient reduction (for accumulation), or None.

    Args:
        model: the model wrapped by :func:`wrap_data_parallel`.
        ddp_impl: its implementation (``OptimizerSettings.ddp_impl``).
    """
    if ddp_impl == "fsdp":
        @contextlib.contextmanager
        def fsdp_no_sync():
            model.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                model.set_requires_gradient_sync(True)

        return fsdp_no_sync
    if hasattr(model, "no_sync"):
        return model.no_sync
    return None


# ----------------------------------------------------------------------------------------------
# parameter facts recorded before wrapping (FSDP2 replaces the parameters and drops attributes)


def param_facts(model: torch.nn.Module) -> Dict[str, Tuple[bool, bool]]:
    """``name -> (counted_in_norm, tp_replicated_under_sp)`` for every parameter of ``model``.

    ``counted_in_norm``: the parameter is TP-sharded, or this is TP rank 0 (a TP-replicated
    parameter is counted once). ``tp_replicated_under_sp``: megatron-core marks it
    ``sequence_parallel`` (its gradient is partial per TP rank and needs a TP all-reduce).
    """
    from megatron.core import parallel_state as mpu

    tp_rank = mpu.get_tensor_model_parallel_rank()
    facts = {}
    for name, p in unwrap_model(model).named_parameters():
        sharded = bool(getattr(p, "tensor_model_parallel", False))
        facts[name] = (sharded or tp_rank == 0, bool(getattr(p, "sequence_parallel", False)))
    return facts


# ----------------------------------------------------------------------------------------------
# optimizers: megatron-core's (the main path), torch AdamW (the stand-in)


class MegatronOptimizer:
    """megatron-core's optimizer with its DDP: the main path (GPU only).

    ``step`` runs megatron-core's ``finalize_model_grads`` (dp_cp reduction of the grad buffers,
    TP all-reduce of the TP-SP replicated gradients, tied embeddings over the pipeline), then the
    optimizer's own clipping and update. :class:`TorchOptimizer` has the same interface.

    Args:
        model: the model wrapped in megatron-core's ``DistributedDataParallel``.
        settings: the run's :class:`OptimizerSettings`.
        model_config: the model's TransformerConfig (its ``params_dtype``; receives ``grad_scale_func``).
    """

    def __init__(self, model, settings: OptimizerSettings, model_config) -> None:
        from megatron.core.optimizer import get_megatron_optimizer

        self.model = model
        self.settings = settings
        self.optimizer = get_megatron_optimizer(settings.megatron_optimizer_config(model_config.params_dtype), [model])
        if settings.fused_adam:
            use_fused_adam(self.optimizer)
        # the schedule multiplies each micro-batch loss by the (fp16 dynamic) loss scale
        model_config.grad_scale_func = self.optimizer.scale_loss

    @property
    def param_groups(self):
        return self.optimizer.param_groups

    @property
    def description(self) -> str:
        """What runs, for the start-up log: megatron-core's wrapper and the update's kernel."""
        return describe_optimizer(self.optimizer)

    def zero_grad(self) -> None:
        self.model.zero_grad_buffer()
        self.optimizer.zero_grad()

    def finalize_grads(self) -> None:
        from megatron.core.distributed import finalize_model_grads

        finalize_model_grads([self.model])

    def step(self) -> Tuple[bool, float]:
        self.finalize_grads()
        ok, norm, _ = self.optimizer.step()
        return bool(ok), float(norm) if norm is not None else float("nan")

    def load_state_dict(self, state_dict) -> None:
        """Load megatron-core's optimizer state, then restore every parameter's Adam step.

        With torch's Adam (no apex / Transformer Engine), megatron-core's DistributedOptimizer saves
        the step count in each param group (``step``) but, on load, leaves the per-parameter
        ``step`` tensors that torch's Adam reads at their load-template value (0) and, where it does
        set them, as one tensor shared by all parameters (which multi-tensor Adam then advances once
        per parameter). Either way the bias correction after a resume is not the uninterrupted
        run's, and the run diverges from its first step.

        Two more gaps of megatron-core's loader are bridged here: its ``fully_reshardable`` format
        does not carry the per-parameter ``step`` that the copy into a torch-Adam state expects
        (a ``KeyError``; the value is restored from the param group afterwards), and its
        ``dp_reshardable`` copy runs with autograd on, which fp32 training (main params that are
        views of the leaf parameters) refuses.
        """
        originals = []
        for sub, _ in torch_optimizers(self.optimizer):
            setter = getattr(sub, "_set_main_param_and_optimizer_states", None)
            if setter is None:
                continue

            def with_step(model_param, tensors, _setter=setter):
                if "step" not in tensors:
                    tensors = dict(tensors, step=torch.zeros((), dtype=torch.float32))
                _setter(model_param, tensors)

            originals.append(sub)
            sub._set_main_param_and_optimizer_states = with_step
        try:
            with torch.no_grad():
                self.optimizer.load_state_dict(state_dict)
        finally:
            for sub in originals:
                del sub._set_main_param_and_optimizer_states  # back to the class's method
        restore_adam_steps(self.optimizer)


def describe_optimizer(optimizer) -> str:
    """``"<wrapper> + <torch optimizer> (<fused | foreach | for-loop>)"`` for the start-up log."""
    names = []
    for sub, inner in torch_optimizers(optimizer):
        group = inner.param_groups[0] if inner.param_groups else {}
        impl = "fused" if group.get("fused") else "foreach" if group.get("foreach") is not False else "for-loop"
        name = f"{type(inner).__module__.split('.')[0]} {type(inner).__name__} ({impl})"
        names.append(name if sub is inner else f"{type(sub).__name__} + {name}")
    return ", ".join(dict.fromkeys(names))


def use_fused_adam(optimizer) -> int:
    """Switch the torch Adam / AdamW inside a megatron-core optimizer to torch's fused kernel.

    Without apex or Transformer Engine, megatron-core falls back to ``torch.optim.AdamW`` in its
    default multi-tensor form: about ten passes over the fp32 main parameters, gradients and moments
    per step (30 ms of a TNL-1B step on an H200, against some 7 ms of memory traffic for one pass).
    The fused form reads and writes each tensor once. Its update is the same formula, evaluated in
    one kernel, so results differ from the multi-tensor form by rounding only; a resumed run still
    equals the uninterrupted one (the kernel is deterministic). Adam states that a checkpoint load
    creates get their ``step`` on the parameter's device (:func:`restore_adam_steps`), as the fused
    kernel reads it there.

    Only optimizers whose parameters are all on one accelerator (or CPU) in a float dtype are
    switched; apex / Transformer Engine optimizers are left alone.

    Args:
        optimizer: a megatron-core optimizer (chained or not) or a torch optimizer.

    Returns:
        how many torch optimizers were switched.
    """
    switched = 0
    for _, inner in torch_optimizers(optimizer):
        if type(inner) not in (torch.optim.Adam, torch.optim.AdamW):
            continue
        params = [p for group in inner.param_groups for p in group["params"]]
        if not params or len({p.device for p in params}) != 1:
            continue
        if any(p.dtype not in (torch.float32, torch.bfloat16, torch.float16) for p in params):
            continue
        if any(group.get("differentiable") for group in inner.param_groups):
            continue
        inner.defaults.update(fused=True, foreach=False)
        for group in inner.param_groups:
            group.update(fused=True, foreach=False)
        switched += 1
    return switched


def restore_adam_steps(optimizer) -> int:
    """Give every parameter state a private ``step`` tensor equal to its param group's ``step``.

    Param groups without a ``step`` entry keep their per-parameter values (only unshared). Under
    the fused or capturable Adam the tensor lives on the parameter's device in fp32, where those
    kernels read it.

    Args:
        optimizer: a torch optimizer, or a megatron-core optimizer (chained or not) wrapping one.

    Returns:
        how many per-parameter step tensors were replaced.
    """
    replaced = 0
    for _, inner in torch_optimizers(optimizer):
        seen = set()
        for group in inner.param_groups:
            for p in group["params"]:
                st = inner.state.get(p, {})
                step = st.get("step")
                if not torch.is_tensor(step):
                    continue
                want = float(group["step"]) if "step" in group else float(step)
                on_device = bool(group.get("fused") or group.get("capturable"))
                device = p.device if on_device else step.device
                dtype = torch.float32 if on_device else step.dtype
                if id(step) in seen or float(step) != want or step.device != device or step.dtype != dtype:
                    st["step"] = torch.tensor(want, dtype=dtype, device=device)
                    replaced += 1
                seen.add(id(st["step"]))
    return replaced


def _param_groups(model: torch.nn.Module, weight_decay: float) -> List[dict]:
    """AdamW groups: weight decay on matrices; none on biases, norms and 1-D decay parameters."""
    decay, no_decay = [], []
    for name, p in unwrap_model(model).named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or name.endswith(".bias") else decay).append(p)
    groups = []
    if decay:
        groups.append({"params": decay, "wd_mult": 1.0, "weight_decay": weight_decay})
    if no_decay:
        groups.append({"params": no_decay, "wd_mult": 0.0, "weight_decay": 0.0})
    return groups


class TorchOptimizer:
    """The stand-in for :class:`MegatronOptimizer` on CPU and with FSDP: torch AdamW with
    megatron-style gradient finalization and global-norm clipping.

    Args:
        model: the wrapped model (torch DDP, FSDP2 or bare).
        settings: the run's :class:`OptimizerSettings`.
        groups: megatron-core's ``ProcessGroupCollection`` from ``initialize_parallel``.
        facts: :func:`param_facts` of the unwrapped model, recorded before wrapping.
        shared_embedding: the tied word-embedding/output weight on the first/last stage when
            pipeline-parallel with tied embeddings, else None.
    """

    def __init__(self, model, settings: OptimizerSettings, groups: ProcessGroupCollection, facts,
                 shared_embedding: Optional[torch.nn.Parameter] = None) -> None:
        self.model = model
        self.settings = settings
        self.groups = groups
        self.sharded = settings.ddp_impl == "fsdp"
        self.named = [(n, p) for n, p in unwrap_model(model).named_parameters() if p.requires_grad]
        self.facts = facts
        self.shared_embedding = shared_embedding
        self.manual_dp_reduce = settings.ddp_impl == "torch" and groups.pp.size() > 1
        self.optimizer = torch.optim.AdamW(
            _param_groups(model, settings.weight_decay),
            lr=settings.lr,
            betas=(settings.adam_beta1, settings.adam_beta2),
            eps=settings.adam_eps,
            weight_decay=settings.weight_decay,
            foreach=False,
        )

    @property
    def description(self) -> str:
        """What runs, for the start-up log."""
        return describe_optimizer(self.optimizer)

    @property
    def param_groups(self):
        return self.optimizer.param_groups

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def finalize_grads(self) -> None:
        """dp_cp average (torch impl under PP), TP all-reduce of TP-SP replicated grads, tied embeddings.

        The dp_cp average under PP is done here, once after the schedule, because neither library
        can do it for this stand-in. torch DDP reduces only in the backward of a forward that ran
        with gradient sync on (its reducer is armed in ``forward``, one forward per backward),
        while megatron-core's 1F1B schedule runs every forward inside ``no_sync`` with several
        in flight and turns sync on only before the last backward (megatron DDP's hooks decide
        at backward time). megatron-core's ``finalize_model_grads`` reduces through the wrapper's
        ``finish_grad_sync`` (megatron DDP's contiguous grad buffers), so it serves megatron DDP
        only, which is GPU only (CUDA tensors and type checks in 0.16, CUDA streams in 0.19).
        """
        tp = self.groups.tp
        dp_cp = self.groups.dp_cp
        if self.manual_dp_reduce and dp_cp.size() > 1:
            grads = [p.grad for _, p in self.named if p.grad is not None]
            flat = torch.cat([g.reshape(-1) for g in grads])
            dist.all_reduce(flat, group=dp_cp)
            flat /= dp_cp.size()
            offset = 0
            for g in grads:
                g.copy_(flat[offset:offset + g.numel()].view_as(g))
                offset += g.numel()
        if self.settings.sequence_parallel and tp.size() > 1:
            grads = [_local(p.grad) for n, p in self.named if self.facts[n][1] and p.grad is not None]
            for g in grads:
                dist.all_reduce(g, group=tp)
        if self.shared_embedding is not None:
            from megatron.core import parallel_state as mpu

            g = self.shared_embedding.grad
            if g is None:
                g = self.shared_embedding.grad = torch.zeros_like(self.shared_embedding)
            dist.all_reduce(_local(g), group=mpu.get_embedding_group())

    def grad_norm(self) -> float:
        """L2 norm of the full model's gradient (every element counted once)."""
        device = next((p.device for _, p in self.named), torch.device("cpu"))
        sq = torch.zeros((), dtype=torch.float64, device=device)
        for n, p in self.named:
            if p.grad is None or not self.facts[n][0]:
                continue
            sq += _local(p.grad).detach().double().pow(2).sum()
        if self.sharded and self.groups.dp_cp.size() > 1:
            dist.all_reduce(sq, group=self.groups.dp_cp)
        if self.groups.mp.size() > 1:
            dist.all_reduce(sq, group=self.groups.mp)
        return math.sqrt(sq.item())

    def step(self) -> Tuple[bool, float]:
        """Finalize, clip and apply; return (applied, grad_norm). Not applied if the norm is not finite."""
        self.finalize_grads()
        norm = self.grad_norm()
        if not math.isfinite(norm):
            return False, norm
        clip = self.settings.clip_grad
        if clip > 0 and norm > clip:
            coeff = clip / (norm + 1e-6)
            for _, p in self.named:
                if p.grad is not None:
                    _local(p.grad).mul_(coeff)
        self.optimizer.step()
        return True, norm


def build_optimizer(model, settings: OptimizerSettings, groups: ProcessGroupCollection, facts, model_config,
                    shared_embedding: Optional[torch.nn.Parameter] = None):
    """The optimizer for ``settings.ddp_impl``: :class:`MegatronOptimizer` for ``megatron``, else the
    :class:`TorchOptimizer` stand-in (which needs ``facts`` and ``shared_embedding``)."""
    if settings.ddp_impl == "megatron":
        return MegatronOptimizer(model, settings, model_config)
    return TorchOptimizer(model, settings, groups, facts, shared_embedding)


def build_scheduler(optimizer, settings: OptimizerSettings):
    """megatron-core's ``OptimizerParamScheduler``: linear warmup from 0, then ``settings.lr_decay_style``.

    Steps are optimizer iterations (not samples).
    """
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if settings.lr_warmup_iters > 0 else settings.lr,
        max_lr=settings.lr,
        min_lr=settings.min_lr,
        lr_warmup_steps=settings.lr_warmup_iters,
        lr_decay_steps=settings.lr_decay_iters,
        lr_decay_style=settings.lr_decay_style,
        start_wd=settings.weight_decay,
        end_wd=settings.weight_decay,
        wd_incr_steps=settings.train_iters,
        wd_incr_style="constant",
        use_checkpoint_opt_param_scheduler=True,
        override_opt_param_scheduler=False,
    )
