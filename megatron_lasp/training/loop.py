"""The training loop: one code path for every parallel layout.

``main(argv)`` parses the flags into the run config (``training/config.py``), brings up the process groups, builds the model stage of this
rank, wraps it for data parallelism, builds the optimizer, LR schedule and data, loads a
checkpoint if asked and runs :func:`train`. Every step goes through megatron-core's pipeline
schedule (``get_forward_backward_func``: ``forward_backward_no_pipelining`` at PP=1, 1F1B
otherwise), so TP, SP, PP and DP all share it.

Loss and gradients. The logged ``lm loss`` is the mean over all loss tokens of the global batch
(``loss_mask`` respected). Each micro-batch's backward loss on a rank is
``sum(loss_mask * token_loss over its slice) * f / N`` with ``N`` the loss tokens of the global
batch and ``f`` undoing the data-parallel wrapper's averaging (``f`` = the dp_cp size for torch
DDP / FSDP, which average; 1 for megatron DDP run with ``calculate_per_token_loss``, which sums),
so after the reduction over the data x sequence-parallel group every rank holds the gradient of
the global token mean, whatever the DP, SP and accumulation split.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import sys
import time
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Callable, List, Optional

import torch
import torch.distributed as dist

from megatron_lasp import platform
from megatron_lasp.training import arguments as arguments_mod
from megatron_lasp.training import data as data_mod
from megatron_lasp.training import logging_utils
from megatron_lasp.training.interrupts import PROG, LauncherWatchdog, StopRequests, record_clean_error
from megatron_lasp.training.checkpointing import CheckpointSettings, RunRecord
from megatron_lasp.training.config import RunConfig
from megatron_lasp.training.optim import (
    build_optimizer,
    build_scheduler,
    fsdp_reshard,
    no_sync_func,
    param_facts,
    unwrap_model,
    wrap_data_parallel,
)

if TYPE_CHECKING:
    from megatron.core.process_groups_config import ProcessGroupCollection

    from megatron_lasp.data.tokenizer import Tokenizer
    from megatron_lasp.models.config import LinearLMConfig
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    from megatron_lasp.training.optim import MegatronOptimizer, TorchOptimizer

logger = logging.getLogger(__name__)


class TrainingError(RuntimeError):
    """Training cannot go on (non-finite loss or gradient norm); the message names the iteration."""


class StartupError(SystemExit):
    """A user mistake found before training (flags, data, checkpoints); already printed (once).

    ``message`` is the one-line error, ``code`` the exit status (2).
    """

    def __init__(self, message: str, code: int = 2) -> None:
        super().__init__(code)
        self.message = message


def _user_errors():
    from megatron_lasp.data.preprocess import PreprocessError
    from megatron_lasp.training.checkpointing import CheckpointError

    return (arguments_mod.ArgumentError, CheckpointError, data_mod.DataError, PreprocessError,
            FileNotFoundError, ValueError)


def _fail(message: str, print_here: bool) -> StartupError:
    if print_here:
        print(f"{PROG}: error: {message}", file=sys.stderr, flush=True)
    return StartupError(message)


def _agreed(fn: Callable[[], object]) -> object:
    """Run ``fn`` (no collectives inside) on every rank; if it fails on any rank, all exit together.

    The first failing rank's message is printed once, by rank 0. Returns ``fn()``.
    """
    from megatron_lasp.training import checkpointing

    result, error = None, None
    try:
        result = fn()
    except _user_errors() as err:
        error = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    errors = [error]
    if dist.is_initialized() and dist.get_world_size() > 1:
        errors = [None] * dist.get_world_size()
        dist.all_gather_object(errors, error)
    first = next((e for e in errors if e is not None), None)
    if first is not None:
        checkpointing.release_save_lock()
        rank = dist.get_rank() if dist.is_initialized() else 0
        raise _fail(first, rank == 0)
    return result


@dataclass
class TrainState:
    """Everything a step reads and writes, and what a checkpoint must restore."""

    config: RunConfig
    """What the run was asked to do (the flags, with the world-size facts filled in)."""
    checkpoint: CheckpointSettings
    """What checkpointing reads: where to save, what to load, what saves record."""
    groups: "ProcessGroupCollection"
    """This rank's process groups (tp, cp, pp, dp, dp_cp, ...)."""
    model: torch.nn.Module
    """This rank's pipeline stage, wrapped for data parallelism."""
    model_config: "LinearLMConfig"
    """The model's config (the preset and flags resolved)."""
    optimizer: "MegatronOptimizer | TorchOptimizer"
    """The optimizer (``optim.build_optimizer``)."""
    scheduler: "OptimizerParamScheduler"
    """megatron-core's ``OptimizerParamScheduler``."""
    train_ds: Optional[torch.utils.data.Dataset]
    """The training set (None on middle pipeline stages that read no data)."""
    valid_ds: Optional[torch.utils.data.Dataset]
    """The validation set (None without a validation share or on middle stages)."""
    layout: data_mod.BatchLayout
    """How a global batch is cut for this rank."""
    tokenizer: "Tokenizer"
    """The run's tokenizer."""
    padded_vocab_size: int
    """Rows of the embedding table (the tokenizer's vocabulary padded for TP)."""
    iteration: int = 0
    """Optimizer steps done (restored by a resume)."""
    consumed_train_samples: int = 0
    """Training samples consumed (the data position)."""
    consumed_valid_samples: int = 0
    """Validation samples consumed."""
    losses: List[float] = field(default_factory=list)
    """The ``lm loss`` of every iteration run by this process (on the logging rank; NaN elsewhere)."""
    grad_norms: List[float] = field(default_factory=list)
    """The global gradient norm of every iteration run by this process (before clipping)."""


# ----------------------------------------------------------------------------------------------
# building


def _logging_setup() -> None:
    """Log to stdout (INFO on rank 0, warnings elsewhere) unless the caller configured logging;
    condense megatron-core's start-up notes either way (``logging_utils.quiet_megatron_core``)."""
    rank = int(os.environ.get("RANK", "0"))
    if not logging.getLogger().handlers:
        logging.basicConfig(
            level=logging.INFO if rank == 0 else logging.WARNING,
            format="[%(asctime)s] %(levelname)s %(name)s: %(message)s",
            stream=sys.stdout,
        )
    logging_utils.quiet_megatron_core()


def model_config_from_run(config: RunConfig) -> "LinearLMConfig":
    """The model's ``LinearLMConfig`` from the run config (preset + overrides + parallel layout)."""
    from megatron_lasp.models.config import LinearLMConfig, linear_lm_config

    model, memory, par, train = config.model, config.memory, config.parallel, config.training
    on_gpu = torch.cuda.is_available()
    half = torch.bfloat16 if train.bf16 else torch.float16 if train.fp16 else None
    megatron_half = half is not None and par.ddp_impl == "megatron"
    chunked = bool(memory.recompute_chunk_size)  # the project's chunked recompute replaces megatron-core's
    fields = model.overrides()
    fields.update(
        tensor_model_parallel_size=par.tensor_model_parallel_size,
        pipeline_model_parallel_size=par.pipeline_model_parallel_size,
        context_parallel_size=par.context_parallel_size,
        sequence_parallel=par.sequence_parallel,
        sequence_parallel_mode=par.sequence_parallel_mode,
        kernel_backend=model.kernel_backend,
        transformer_impl=model.transformer_impl,
        params_dtype=half if megatron_half else torch.float32,
        bf16=bool(train.bf16 and megatron_half),
        fp16=bool(train.fp16 and megatron_half),
        pipeline_dtype=half if (megatron_half or (half is not None and par.ddp_impl == "fsdp")) else torch.float32,
        use_cpu_initialization=not on_gpu,
        variable_seq_lengths=False,
        calculate_per_token_loss=True,
        recompute_granularity=None if chunked else memory.recompute_granularity,
        recompute_method=None if chunked else memory.recompute_method,
        recompute_num_layers=None if chunked else memory.recompute_num_layers,
        recompute_chunk_size=memory.recompute_chunk_size,
        fused_linear_cross_entropy=memory.fused_linear_cross_entropy,
        cross_entropy_chunk_size=memory.cross_entropy_chunk_size,
        offload_layer_inputs=memory.cpu_offloading,
    )
    if memory.recompute_modules is not None:
        fields.update(recompute_modules=[m for m in memory.recompute_modules if m != "elementwise"],
                      recompute_elementwise="elementwise" in memory.recompute_modules)
    if model.fusion is False:
        fields["fusion"] = False
    if train.bf16 and par.ddp_impl == "torch":
        fields.update(enable_autocast=True, autocast_dtype=torch.bfloat16)
    try:
        if model.model_preset:
            model_config = linear_lm_config(model.model_preset, **fields)
        else:
            model_config = LinearLMConfig(**fields)
    except (ValueError, TypeError, AssertionError) as err:
        raise arguments_mod.config_error(err) from None
    pp = par.pipeline_model_parallel_size
    if model_config.num_layers % pp:
        raise arguments_mod.ArgumentError(
            f"--pipeline-model-parallel-size ({pp}) must divide the number of layers ({model_config.num_layers}); "
            "change it or --num-layers")
    memory.check_layers(model_config.num_layers // pp)
    return model_config


def build_model_stage(model_config: "LinearLMConfig", padded_vocab_size: int,
                      groups: "ProcessGroupCollection") -> torch.nn.Module:
    """This rank's pipeline stage of the model, on its device, before data-parallel wrapping."""
    from megatron.core import parallel_state as mpu

    from megatron_lasp.models import build_linear_lm

    model = build_linear_lm(
        model_config,
        padded_vocab_size,
        pre_process=mpu.is_pipeline_first_stage(),
        post_process=mpu.is_pipeline_last_stage(),
        pg_collection=groups,
    )
    device = platform.default_device()
    return model.to(device)


def _shared_embedding_for_pp(model: torch.nn.Module, pipeline_size: int) -> Optional[torch.nn.Parameter]:
    """The tied embedding/output weight that needs a first/last stage all-reduce, or None."""
    from megatron.core import parallel_state as mpu

    inner = unwrap_model(model)
    if pipeline_size == 1 or not getattr(inner, "share_embeddings_and_output_weights", False):
        return None
    if not (mpu.is_pipeline_first_stage() or mpu.is_pipeline_last_stage()):
        return None
    return inner.shared_embedding_or_output_weight()


# ----------------------------------------------------------------------------------------------
# one step


def _loss_func(loss_mask: torch.Tensor, scale: float, output_tensor: torch.Tensor):
    """Reduce the model's ``[b, s_local]`` token losses (see the module docstring)."""
    losses = output_tensor.float()
    local_sum = (losses * loss_mask).sum()
    return local_sum * scale, loss_mask.sum().to(torch.int), {"lm loss sum": local_sum.detach()}


def _forward_step(scale: float, is_first: bool, is_last: bool, data_iterator, model):
    batch = next(data_iterator)
    tokens = batch["tokens"] if (batch is not None and is_first) else None
    positions = batch["position_ids"] if (batch is not None and is_first) else None
    labels = batch["labels"] if (batch is not None and is_last) else None
    kwargs = {}
    if batch is not None and is_last:
        # the loss mask lets the fused loss compute its gradients in forward (it reduces as _loss_func)
        kwargs["loss_mask"] = batch["loss_mask"]
    if batch is not None and "cu_seqlens" in batch:
        # packed documents: every layer's attention reads the starts (data.py, "Packed documents")
        from megatron.core.packed_seq_params import PackedSeqParams

        kwargs["packed_seq_params"] = PackedSeqParams(
            qkv_format="sbhd", cu_seqlens_q=batch["cu_seqlens"], cu_seqlens_kv=batch["cu_seqlens"])
    output = model(tokens, position_ids=positions, attention_mask=None, labels=labels, **kwargs)
    if not is_last:
        return output, None
    return output, partial(_loss_func, batch["loss_mask"], scale)


def run_forward_backward(state: TrainState, dataset, consumed: int, forward_only: bool) -> float:
    """One global batch through the schedule; returns the global token-mean loss (NaN off the last stage)."""
    from megatron.core import parallel_state as mpu
    from megatron.core.pipeline_parallel import get_forward_backward_func

    config, groups, layout = state.config, state.groups, state.layout
    device = platform.default_device()
    is_first, is_last = mpu.is_pipeline_first_stage(), mpu.is_pipeline_last_stage()
    batches = data_mod.read_step(dataset, layout, consumed, device)
    scale, total_tokens = 0.0, float("nan")
    if is_last:
        total_tokens = data_mod.global_loss_tokens(batches, groups.dp, device)
        factor = 1.0 if config.parallel.ddp_impl == "megatron" else float(groups.dp_cp.size())
        scale = factor / max(total_tokens, 1.0)
    forward_backward = get_forward_backward_func()
    with platform.cuda_factory_redirect():
        outputs = forward_backward(
            forward_step_func=partial(_forward_step, scale, is_first, is_last),
            data_iterator=iter(batches),  # one micro-batch per forward step
            model=[state.model],
            num_microbatches=layout.num_micro_batches,
            seq_length=config.training.seq_length,
            micro_batch_size=config.training.micro_batch_size,
            forward_only=forward_only,
        )
    if not is_last:
        return float("nan")
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    for out in outputs:
        loss_sum += out["lm loss sum"].double()
    if groups.dp_cp.size() > 1:
        dist.all_reduce(loss_sum, group=groups.dp_cp)
    return float(loss_sum.item()) / max(total_tokens, 1.0)


def _broadcast_from_last_stage(value: float, groups) -> float:
    """Share a last-stage scalar with every stage of the pipeline group."""
    if groups.pp.size() == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=platform.default_device())
    dist.broadcast(t, src=dist.get_global_rank(groups.pp, groups.pp.size() - 1), group=groups.pp)
    return float(t.item())


def train_step(state: TrainState) -> tuple:
    """Forward/backward over the global batch, finalize, clip, step; returns (loss, grad_norm)."""
    state.model.train()
    state.optimizer.zero_grad()
    loss = run_forward_backward(state, state.train_ds, state.consumed_train_samples, forward_only=False)
    loss = _broadcast_from_last_stage(loss, state.groups)
    next_iteration = state.iteration + 1
    if not math.isfinite(loss):
        raise TrainingError(f"iteration {next_iteration}: lm loss is {loss}; stopping without saving "
                            f"({_last_checkpoint_hint(state.checkpoint.save)})")
    applied, grad_norm = state.optimizer.step()
    if state.config.training.fp16 and not applied:
        # dynamic loss scaling: an overflow skips the update and lowers the scale (as Megatron does)
        logger.info("iteration %d: fp16 overflow, update skipped", next_iteration)
        grad_norm = float("nan")
    elif not applied or not math.isfinite(grad_norm):
        raise TrainingError(f"iteration {next_iteration}: grad norm is {grad_norm}; stopping without saving")
    else:
        state.scheduler.step(1)
    state.iteration = next_iteration
    state.consumed_train_samples += state.config.training.global_batch_size
    return loss, grad_norm


def evaluate(state: TrainState) -> Optional[float]:
    """Mean token loss over ``--eval-iters`` validation batches (continuing through the valid set)."""
    if state.valid_ds is None:
        return None
    state.model.eval()
    total = 0.0
    eval_iters = state.config.logging.eval_iters
    with torch.no_grad():
        for _ in range(eval_iters):
            total += run_forward_backward(state, state.valid_ds, state.consumed_valid_samples, forward_only=True)
            state.consumed_valid_samples += state.config.training.global_batch_size
    if state.config.parallel.ddp_impl == "fsdp":
        fsdp_reshard(state.model)
    state.model.train()
    return _broadcast_from_last_stage(total / eval_iters, state.groups)


def _is_logging_rank(groups) -> bool:
    """The first rank (TP, SP and DP rank 0) of the last pipeline stage."""
    from megatron.core import parallel_state as mpu

    return (mpu.is_pipeline_last_stage() and groups.tp.rank() == 0 and groups.cp.rank() == 0
            and groups.dp.rank() == 0)


def train(state: TrainState, save_fn: Optional[Callable[[TrainState], None]] = None,
          stops: Optional[StopRequests] = None) -> TrainState:
    """Run iterations until ``--train-iters`` (or ``--exit-interval``, or ``stops`` says so: a signal
    with ``--exit-signal-handler``, ``--exit-duration-in-mins``); log, evaluate and save."""
    train_cfg, log_cfg, ckpt_cfg = state.config.training, state.config.logging, state.config.checkpoint
    train_iters = train_cfg.train_iters
    logging_rank = _is_logging_rank(state.groups)
    writer = None
    if log_cfg.tensorboard_dir and logging_rank:
        writer = logging_utils.TensorboardWriter(log_cfg.tensorboard_dir)
    flops_token = logging_utils.flops_per_token(state.model_config, state.padded_vocab_size)
    tokens_per_iter = train_cfg.global_batch_size * train_cfg.seq_length
    on_gpu = torch.cuda.is_available()
    world = dist.get_world_size()
    watch = logging_utils.Stopwatch()
    window_iters, window_loss, window_norm = 0, 0.0, 0.0
    if state.iteration >= train_iters:
        logger.warning("nothing to do: the checkpoint is at iteration %d and --train-iters is %d "
                       "(raise --train-iters to train further)", state.iteration, train_iters)
        if writer:
            writer.close()
        return state
    try:
        while state.iteration < train_iters:
            loss, grad_norm = train_step(state)
            state.losses.append(loss)
            state.grad_norms.append(grad_norm)
            window_iters += 1
            window_loss += loss
            window_norm += grad_norm
            it = state.iteration
            if it % log_cfg.log_interval == 0 or it == train_iters:
                elapsed = watch.lap()
                ms = 1000.0 * elapsed / window_iters
                tokens_s = tokens_per_iter * window_iters / max(elapsed, 1e-9)
                tflops = flops_token * tokens_s / world / 1e12
                mfu = tflops * 1e12 / log_cfg.peak_flops if on_gpu else None
                lr = state.optimizer.param_groups[0]["lr"]
                if logging_rank:
                    line = logging_utils.format_log_line(
                        iteration=it, train_iters=train_iters,
                        consumed_samples=state.consumed_train_samples, ms_per_iter=ms, lr=lr,
                        loss=window_loss / window_iters, grad_norm=window_norm / window_iters,
                        tokens_per_s=tokens_s, tflops_per_gpu=tflops, mfu=mfu,
                        mem_gib=logging_utils.memory_gib(),
                    )
                    print(line, flush=True)
                    if writer:
                        writer.add_scalars({"lm loss": window_loss / window_iters, "learning-rate": lr,
                                            "grad-norm": window_norm / window_iters, "tokens-per-s": tokens_s,
                                            "tflops-per-gpu": tflops}, it)
                window_iters, window_loss, window_norm = 0, 0.0, 0.0
            if log_cfg.eval_interval and it % log_cfg.eval_interval == 0 and it < train_iters:
                _run_eval(state, logging_rank, writer, "iteration", it)
                watch.lap()
            stop = stops.check() if stops is not None else None
            if stop is None and train_cfg.exit_interval is not None and it % train_cfg.exit_interval == 0:
                stop = f"--exit-interval {train_cfg.exit_interval}"
            exiting = stop is not None
            if save_fn and ckpt_cfg.save and (
                (ckpt_cfg.save_interval and it % ckpt_cfg.save_interval == 0) or it == train_iters or exiting
            ):
                check_before_save(state)
                save_fn(state)
                watch.lap()
            if exiting:
                saved = f", saved to {ckpt_cfg.save}" if save_fn and ckpt_cfg.save else ""
                logger.info("exiting at iteration %d: %s%s", it, stop, saved)
                break
        if log_cfg.eval_interval and state.iteration == train_iters:
            _run_eval(state, logging_rank, writer, "end of training, iteration", state.iteration)
    finally:
        if writer:
            writer.close()
    return state


def check_before_save(state: TrainState) -> None:
    """Raise :class:`TrainingError` rather than save weights that are already blown up.

    Every rank checks its parameters for NaN/inf, and one forward pass (no update, eval mode)
    over the next training batch checks that the weights to be saved give a finite loss; with
    ``--check-for-spiky-loss`` that loss must also stay below ``--spiky-loss-factor`` x the
    lowest loss of this run. Collective (all ranks decide together).
    """
    iteration = state.iteration
    ckpt_cfg = state.config.checkpoint
    bad = torch.zeros(1, dtype=torch.float32, device=platform.default_device())
    for p in unwrap_model(state.model).parameters():
        local = p.to_local() if hasattr(p, "to_local") else p
        if local.numel() and not bool(torch.isfinite(local.detach()).all()):
            bad.fill_(1.0)
            break
    dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    last = _last_checkpoint_hint(state.checkpoint.save)
    if bad.item():
        raise TrainingError(f"iteration {iteration}: the weights hold NaN/inf; stopping without saving ({last})")
    state.model.eval()
    with torch.no_grad():
        loss = run_forward_backward(state, state.train_ds, state.consumed_train_samples, forward_only=True)
    if state.config.parallel.ddp_impl == "fsdp":
        fsdp_reshard(state.model)
    state.model.train()
    loss = _broadcast_from_last_stage(loss, state.groups)
    if not math.isfinite(loss):
        raise TrainingError(f"iteration {iteration}: the weights to be saved give lm loss {loss} on the next "
                            f"batch; stopping without saving ({last})")
    previous = [x for x in state.losses if math.isfinite(x)]
    if ckpt_cfg.check_for_spiky_loss and previous and loss > ckpt_cfg.spiky_loss_factor * min(previous):
        raise TrainingError(f"iteration {iteration}: lm loss {loss:.4g} of the weights to be saved is more than "
                            f"--spiky-loss-factor {ckpt_cfg.spiky_loss_factor:g} x the lowest loss {min(previous):.4g}; "
                            f"stopping without saving ({last})")


def _last_checkpoint_hint(save: Optional[str]) -> str:
    from megatron_lasp.training.checkpointing import list_iterations

    its = list_iterations(save) if save else []
    return f"last good checkpoint: iteration {its[-1]}, untouched" if its else "no checkpoint saved"


def _run_eval(state, logging_rank, writer, what, it) -> None:
    loss = evaluate(state)
    if loss is None:
        return
    if logging_rank:
        ppl = math.exp(min(loss, 20.0))
        print(f" validation loss at {what} {it} | lm loss value: {loss:.6E} | lm loss PPL: {ppl:.6E} |",
              flush=True)
        if writer:
            writer.add_scalars({"validation lm loss": loss, "validation ppl": ppl}, it)


# ----------------------------------------------------------------------------------------------
# entry point


def _checkpoint_settings(config: RunConfig, vocab_size_tokenizer: int, padded_vocab_size: int,
                         **resolved) -> CheckpointSettings:
    """What checkpointing reads of the run; ``resolved``: what start-up found (recorded in ``args.json``)."""
    par, ckpt = config.parallel, config.checkpoint
    run = RunRecord(
        vocab_size_tokenizer=vocab_size_tokenizer,
        padded_vocab_size=padded_vocab_size,
        seq_length=config.training.seq_length,
        tokenizer=config.data.tokenizer,
        tensor_model_parallel_size=par.tensor_model_parallel_size,
        pipeline_model_parallel_size=par.pipeline_model_parallel_size,
        context_parallel_size=par.context_parallel_size,
        data_parallel_size=par.data_parallel_size,
        sequence_parallel_mode=par.sequence_parallel_mode,
        ddp_impl=par.ddp_impl,
        use_distributed_optimizer=par.use_distributed_optimizer,
        dist_ckpt_optim_fully_reshardable=ckpt.dist_ckpt_optim_fully_reshardable,
        world_size=par.world_size,
        flags=config.flags(vocab_size_tokenizer=vocab_size_tokenizer, padded_vocab_size=padded_vocab_size,
                           **resolved),
    )
    return CheckpointSettings(
        save=ckpt.save, load=ckpt.load, ckpt_step=ckpt.ckpt_step, finetune=ckpt.finetune,
        no_load_optim=ckpt.no_load_optim, no_load_rng=ckpt.no_load_rng,
        override_opt_param_scheduler=ckpt.override_opt_param_scheduler,
        use_checkpoint_opt_param_scheduler=ckpt.use_checkpoint_opt_param_scheduler, run=run,
    )


def refuse_overwrite(checkpoint: CheckpointSettings, allowed: bool) -> None:
    """Refuse a run that would save over checkpoints it did not write: ``--save`` is its ``--load``
    directory but the run does not continue its latest checkpoint (``--finetune`` or a weights-only
    checkpoint restart at iteration 0; ``--ckpt-step`` branches from an earlier one), unless
    ``allowed`` (``--overwrite-checkpoints``).

    Raises:
        ArgumentError: naming the iterations at risk and the flags that avoid it.
    """
    from megatron_lasp.training.checkpointing import list_iterations

    save, load = checkpoint.save, checkpoint.load
    if allowed or not save or not load or os.path.abspath(save) != os.path.abspath(load):
        return
    found = list_iterations(save)
    start = 0 if checkpoint.finetune else checkpoint.load_iteration
    at_risk = [it for it in found if start is not None and it > start]
    if not at_risk:
        return
    if checkpoint.ckpt_step is not None and not checkpoint.finetune:
        why = f"--ckpt-step {checkpoint.ckpt_step} branches from iteration {checkpoint.ckpt_step}"
    elif checkpoint.load_weights_only:
        why = (f"iteration {checkpoint.load_iteration} holds weights only, so the run restarts at iteration 0 "
               "(as with --finetune)")
    else:
        why = "--finetune restarts at iteration 0"
    raise arguments_mod.ArgumentError(
        f"{why}, but --save {save} is its --load directory and holds iterations "
        f"{', '.join(map(str, at_risk))} that this run's saves would overwrite; give another --save, "
        "or add --overwrite-checkpoints")


def setup(argv: Optional[List[str]] = None) -> TrainState:
    """Parse flags, initialize the groups, build model / optimizer / data, load a checkpoint.

    Raises:
        SystemExit(2): a bad flag (argparse's one-line ``error:`` message).
    """
    from megatron.core import parallel_state as mpu

    from megatron_lasp.parallel.state import init_distributed, initialize_parallel, pipeline_p2p_staged
    from megatron_lasp.training import checkpointing

    try:
        # argparse's own errors: one line on rank 0, exit 2; the rest the same on every rank:
        # each exits, rank 0 prints
        config = arguments_mod.parse_config(argv)
    except arguments_mod.ArgumentError as err:
        raise _fail(str(err), arguments_mod.is_rank_zero()) from None
    init_distributed(config.parallel.distributed_backend, config.parallel.distributed_timeout_minutes)

    def prepare():
        run = arguments_mod.with_world_size(config, dist.get_world_size())
        tokenizer = data_mod.build_tokenizer(run.data.tokenizer)
        padded = data_mod.padded_vocab_size(tokenizer.vocab_size, run.model.make_vocab_size_divisible_by,
                                            run.parallel.tensor_model_parallel_size)
        model_config = model_config_from_run(run)
        checkpoint = checkpointing.prepare_run(_checkpoint_settings(run, tokenizer.vocab_size, padded), model_config)
        refuse_overwrite(checkpoint, run.checkpoint.overwrite_checkpoints)
        skip_splits = data_mod.check_data(run.data_settings(), tokenizer)
        return run, tokenizer, padded, model_config, checkpoint, skip_splits

    config, tokenizer, padded_vocab_size, model_config, checkpoint, skip_splits = _agreed(prepare)
    # args.json records the model's sizes and what the checks resolved (a weights-only checkpoint
    # loads as with --finetune)
    resolved = {name: getattr(model_config, name)
                for name in ("num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size")}
    resolved.update(load_iteration=checkpoint.load_iteration, load_weights_only=checkpoint.load_weights_only,
                    finetune=checkpoint.finetune, no_load_optim=checkpoint.no_load_optim,
                    no_load_rng=checkpoint.no_load_rng, skip_splits=list(skip_splits))
    checkpoint = dataclasses.replace(
        checkpoint, run=_checkpoint_settings(config, tokenizer.vocab_size, padded_vocab_size, **resolved).run)
    optim = config.optimizer_settings()
    par, train_cfg, data_cfg = config.parallel, config.training, config.data

    groups = initialize_parallel(
        par.tensor_model_parallel_size,
        par.context_parallel_size,
        par.pipeline_model_parallel_size,
        backend=par.distributed_backend,
        seed=train_cfg.seed,
        timeout_minutes=par.distributed_timeout_minutes,
    )
    model = build_model_stage(model_config, padded_vocab_size, groups)
    facts = param_facts(model)
    shared = _shared_embedding_for_pp(model, par.pipeline_model_parallel_size)
    model = wrap_data_parallel(model, optim, groups, model_config)
    model_config.no_sync_func = no_sync_func(model, optim.ddp_impl)
    model_config.finalize_model_grads_func = None
    model_config.use_ring_exchange_p2p = pipeline_p2p_staged(groups)  # gloo + CUDA: through host memory
    optimizer = build_optimizer(model, optim, groups, facts, model_config, shared)
    scheduler = build_scheduler(optimizer, optim)

    first, last = mpu.is_pipeline_first_stage(), mpu.is_pipeline_last_stage()
    train_ds = valid_ds = None
    data = config.data_settings(skip_splits)
    if first or last:
        train_ds, valid_ds, _ = data_mod.build_datasets(data, tokenizer)
    elif par.pipeline_model_parallel_size > 1:
        # megatron-core's builder synchronizes all ranks with barriers; middle stages join them
        train_ds, valid_ds, _ = data_mod.build_datasets(data, tokenizer)
    layout = data_mod.BatchLayout(
        micro_batch_size=train_cfg.micro_batch_size,
        num_micro_batches=train_cfg.num_micro_batches,
        dp_rank=groups.dp.rank(),
        dp_size=groups.dp.size(),
        sp_rank=groups.cp.rank(),
        sp_size=groups.cp.size(),
        needs_data=first or last or data_cfg.reset_attention_mask,
        vocab_size=None if data_cfg.mock_data else tokenizer.vocab_size,
        eod_token=tokenizer.eod if data_cfg.reset_attention_mask else None,
    )
    state = TrainState(config=config, checkpoint=checkpoint, groups=groups, model=model, model_config=model_config,
                       optimizer=optimizer, scheduler=scheduler, train_ds=train_ds, valid_ds=valid_ds,
                       layout=layout, tokenizer=tokenizer, padded_vocab_size=padded_vocab_size)
    if checkpoint.load:
        try:
            checkpointing.load_checkpoint(state)
        except checkpointing.CheckpointError as err:  # past the checks: this rank alone may see it
            checkpointing.release_save_lock()
            raise _fail(str(err), True) from None
    logger.info(
        "training: %d iterations, global batch %d (micro %d x %d micro-batches x DP %d), seq %d, "
        "TP %d SP %d (%s) PP %d, ddp %s, optimizer %s, vocab %d (padded %d)",
        train_cfg.train_iters, train_cfg.global_batch_size, train_cfg.micro_batch_size, train_cfg.num_micro_batches,
        groups.dp.size(), train_cfg.seq_length, groups.tp.size(), groups.cp.size(), par.sequence_parallel_mode,
        groups.pp.size(), par.ddp_impl, optimizer.description, tokenizer.vocab_size, padded_vocab_size,
    )
    return state


def main(argv: Optional[List[str]] = None, *, destroy: bool = True) -> TrainState:
    """Train as ``pretrain_linear_lm.py`` does; returns the final :class:`TrainState`.

    Args:
        argv: the flags (default ``sys.argv[1:]``).
        destroy: tear down the process groups at the end (tests that spawn ranks keep them).

    Raises:
        SystemExit(2): bad flags; :class:`TrainingError`: a non-finite loss or gradient norm.
    """
    from megatron_lasp.parallel.state import destroy_parallel
    from megatron_lasp.training import checkpointing

    start = time.monotonic()
    _logging_setup()
    stops = None
    try:
        state = setup(argv)
        train_cfg = state.config.training
        stops = StopRequests(train_cfg.exit_signal_handler, train_cfg.exit_duration_in_mins, start).install()
        watchdog = LauncherWatchdog.start_if_launched(checkpointing.release_save_lock)
        save_fn = checkpointing.save_checkpoint
        if watchdog is not None:
            save_fn = watchdog.guard(save_fn)
        try:
            train(state, save_fn=save_fn, stops=stops)
        except data_mod.DataError as err:
            raise TrainingError(str(err)) from None
        finally:
            if watchdog is not None:
                watchdog.stop()
    finally:
        if stops is not None:
            stops.uninstall()
        checkpointing.release_save_lock()
        if destroy:
            destroy_parallel()
    return state


def _let_rank_zero_print() -> None:
    # every rank fails together; torchrun stops the others at the first exit, which must not
    # come before rank 0 has printed the line
    if not arguments_mod.is_rank_zero():
        time.sleep(1.0)


def cli_main(argv: Optional[List[str]] = None) -> int:
    """``pretrain_linear_lm.py``: :func:`main` with every way it ends as an exit status, and a clean
    end as one line on stderr (no traceback): 0 done (or stopped on request, saved), 1 training
    stopped (non-finite loss, data), 2 a user mistake, 130 interrupted (Ctrl-C without
    ``--exit-signal-handler``). Under torchrun the line also goes to its error file."""
    try:
        main(argv)
    except StartupError as err:  # already printed (rank 0)
        record_clean_error(f"{PROG}: error: {err.message}", err.code)
        _let_rank_zero_print()
        return err.code
    except arguments_mod.UsageError as err:  # argparse's own, already printed (rank 0)
        record_clean_error(err.message, 2)
        _let_rank_zero_print()
        return 2
    except TrainingError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        record_clean_error(f"error: {err}", 1)
        return 1
    except KeyboardInterrupt:
        message = (f"{PROG}: interrupted; nothing saved since the last checkpoint (add --exit-signal-handler to "
                   "save on Ctrl-C / SIGTERM)")
        if arguments_mod.is_rank_zero():
            print(f"\n{message}", file=sys.stderr, flush=True)
        record_clean_error(message, 130)
        return 130
    return 0
