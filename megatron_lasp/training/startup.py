"""Start-up: from the command line to a :class:`TrainState` ready to train.

:func:`setup` parses the flags into the run config (``training/config.py``), brings up the process
groups, checks what every rank must agree on before anything is built (the world size, the
tokenizer, the model config, the checkpoint to load and the one to write, the data files;
:func:`_agreed`: a mistake found on any rank ends every rank with the same one-line error), builds
the model stage of this rank, wraps it for data parallelism, builds the optimizer, LR schedule and
data, and loads a checkpoint if asked. ``loop.py`` runs it.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, List, Optional

import torch
import torch.distributed as dist

from megatron_lasp import platform
from megatron_lasp.training import arguments as arguments_mod
from megatron_lasp.training import data as data_mod
from megatron_lasp.training import checkpointing
from megatron_lasp.training.checkpointing import CheckpointSettings, RunRecord, SaveLock
from megatron_lasp.training.config import RunConfig, TrainingOptions
from megatron_lasp.training.interrupts import PROG, StopRequests
from megatron_lasp.training.optim import (
    build_optimizer,
    build_scheduler,
    no_sync_func,
    param_facts,
    unwrap_model,
    wrap_data_parallel,
)

if TYPE_CHECKING:
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
    from megatron.core.process_groups_config import ProcessGroupCollection

    from megatron_lasp.data.tokenizer import Tokenizer
    from megatron_lasp.models.config import LinearLMConfig
    from megatron_lasp.training.cuda_graph import StepGraph
    from megatron_lasp.training.optim import MegatronOptimizer, TorchOptimizer

logger = logging.getLogger(__name__)


class StartupError(SystemExit):
    """A user mistake found before training (flags, data, checkpoints); already printed (once).

    ``message`` is the one-line error, ``code`` the exit status (2).
    """

    def __init__(self, message: str, code: int = 2) -> None:
        super().__init__(code)
        self.message = message


def _user_errors():
    from megatron_lasp.data.preprocess import PreprocessError

    return (arguments_mod.ArgumentError, checkpointing.CheckpointError, data_mod.DataError, PreprocessError,
            FileNotFoundError, ValueError)


def _fail(message: str, print_here: bool) -> StartupError:
    if print_here:
        print(f"{PROG}: error: {message}", file=sys.stderr, flush=True)
    return StartupError(message)


def _agreed(fn: Callable[[], object], save_lock: Optional[SaveLock] = None) -> object:
    """Run ``fn`` (no collectives inside) on every rank; if it fails on any rank, all exit together
    (``save_lock`` released, which ``fn`` may have taken).

    The first failing rank's message is printed once, by rank 0. Returns ``fn()``.
    """
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
        if save_lock is not None:
            save_lock.release()
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
    stops: StopRequests
    """When to save and stop early (signals, time limit); ``main`` installs its signal handlers once
    start-up is over (before, a signal ends the process as usual: there is nothing to save yet)."""
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
    save_lock: Optional[SaveLock] = None
    """Held on ``--save`` by rank 0 for the run (released by ``loop.main``)."""
    step_graph: Optional["StepGraph"] = None
    """With ``--cuda-graph-impl local``: the captured forward-backward (``cuda_graph.StepGraph``)."""


# ----------------------------------------------------------------------------------------------
# building


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
        softmax_sequence_parallel_mode=par.softmax_sequence_parallel_mode,
        softmax_kernel=model.softmax_kernel,
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
        cross_entropy_kernel=memory.cross_entropy_kernel,
        offload_layer_inputs=memory.cpu_offloading,
        offload_num_layers=memory.cpu_offloading_num_layers,
        deterministic_mode=train.deterministic_mode,
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
# start-up


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
    save, load = checkpoint.save, checkpoint.load
    if allowed or not save or not load or os.path.abspath(save) != os.path.abspath(load):
        return
    found = checkpointing.list_iterations(save)
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


def setup(argv: Optional[List[str]] = None, save_lock: Optional[SaveLock] = None,
          start: Optional[float] = None) -> TrainState:
    """Parse flags, initialize the groups, build model / optimizer / data, load a checkpoint.

    Args:
        argv: the flags (default ``sys.argv[1:]``).
        save_lock: taken by rank 0 on ``--save`` (default: a new one, kept in the state); the
            caller releases it, on failure too.
        start: ``time.monotonic()`` when the run started (``--exit-duration-in-mins`` counts from
            it; default now).

    Raises:
        SystemExit(2): a bad flag (argparse's one-line ``error:`` message).
    """
    start = time.monotonic() if start is None else start
    try:
        # argparse's own errors: one line on rank 0, exit 2; the rest the same on every rank:
        # each exits, rank 0 prints
        config = arguments_mod.parse_config(argv)
    except arguments_mod.ArgumentError as err:
        raise _fail(str(err), arguments_mod.is_rank_zero()) from None
    stops = StopRequests(config.training.exit_signal_handler, config.training.exit_duration_in_mins, start)
    return _build(config, stops, save_lock if save_lock is not None else SaveLock())


def deterministic_algorithms() -> None:
    """``--deterministic-mode``: torch's deterministic algorithms, and cuBLAS's fixed workspace,
    which they need (set before the first matmul creates a cuBLAS handle), and Transformer Engine's
    deterministic attention (megatron-core refuses TE's attention in this mode without it); values
    already in the environment are kept. The softmax layers' ``auto`` kernel then picks a
    deterministic one, and megatron-core's embedding an indexing form with a deterministic backward."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    os.environ.setdefault("NVTE_ALLOW_NONDETERMINISTIC_ALGO", "0")
    torch.use_deterministic_algorithms(True)
    logger.info("deterministic mode: torch.use_deterministic_algorithms(True), CUBLAS_WORKSPACE_CONFIG=%s; "
                "softmax layers with packed documents run flex_attention",
                os.environ["CUBLAS_WORKSPACE_CONFIG"])


def _build(config: RunConfig, stops: StopRequests, save_lock: SaveLock) -> TrainState:
    """:func:`setup` once the flags are read."""
    from megatron.core import parallel_state as mpu

    from megatron_lasp.parallel.state import init_distributed, initialize_parallel, pipeline_p2p_staged

    if config.training.deterministic_mode:
        deterministic_algorithms()
    init_distributed(config.parallel.distributed_backend, config.parallel.distributed_timeout_minutes)

    def prepare():
        run = arguments_mod.with_world_size(config, dist.get_world_size())
        tokenizer = data_mod.build_tokenizer(run.data.tokenizer)
        padded = data_mod.padded_vocab_size(tokenizer.vocab_size, run.model.make_vocab_size_divisible_by,
                                            run.parallel.tensor_model_parallel_size)
        model_config = model_config_from_run(run)
        checkpoint = checkpointing.prepare_run(_checkpoint_settings(run, tokenizer.vocab_size, padded), model_config,
                                               save_lock)
        refuse_overwrite(checkpoint, run.checkpoint.overwrite_checkpoints)
        skip_splits = data_mod.check_data(run.data_settings(), tokenizer)
        return run, tokenizer, padded, model_config, checkpoint, skip_splits

    config, tokenizer, padded_vocab_size, model_config, checkpoint, skip_splits = _agreed(prepare, save_lock)
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
    step_graph = None
    if train_cfg.cuda_graphs:
        from megatron_lasp.training.cuda_graph import StepGraph

        step_graph = StepGraph(train_cfg.cuda_graph_warmup_steps)  # its stream is current from here on
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
                       layout=layout, tokenizer=tokenizer, padded_vocab_size=padded_vocab_size, stops=stops,
                       save_lock=save_lock, step_graph=step_graph)
    if checkpoint.load:
        try:
            checkpointing.load_checkpoint(state)
        except checkpointing.CheckpointError as err:  # past the checks: this rank alone may see it
            save_lock.release()
            raise _fail(str(err), True) from None
    logger.info(
        "training: %d iterations, global batch %d (micro %d x %d micro-batches x DP %d), seq %d, "
        "TP %d SP %d (%s) PP %d, ddp %s, optimizer %s, vocab %d (padded %d)",
        train_cfg.train_iters, train_cfg.global_batch_size, train_cfg.micro_batch_size, train_cfg.num_micro_batches,
        groups.dp.size(), train_cfg.seq_length, groups.tp.size(), groups.cp.size(), par.sequence_parallel_mode,
        groups.pp.size(), par.ddp_impl, optimizer.description, tokenizer.vocab_size, padded_vocab_size,
    )
    logger.info("model: %s", describe_model(model_config, model))
    if model_config.offload_layer_inputs:
        _log_offload(model_config, train_cfg)
    return state


def describe_model(model_config: "LinearLMConfig", model) -> str:
    """One line: the layers by kind, the width and this rank's parameter count (``model``: a module,
    a DDP-wrapped module or a list of them)."""
    if model_config.linear_attention_type == "gated_delta_net":
        linear = (f"gated_delta_net ({model_config.linear_num_key_heads} key / {model_config.linear_num_value_heads} "
                  f"value heads, conv {model_config.linear_conv_kernel_dim})")
    else:
        linear = "lightning" + (f" ({model_config.linear_attention_gate} gate)" if model_config.gated else "")
    kinds = model_config.layer_kinds
    parts = [f"{kinds.count('L')} {linear}"] + ([f"{kinds.count('*')} softmax"] if "*" in kinds else [])
    modules = model if isinstance(model, (list, tuple)) else [model]
    params = sum(p.numel() for m in modules for p in m.parameters())
    return (f"{model_config.num_layers} layers ({', '.join(parts)}), hidden {model_config.hidden_size}, "
            f"{params / 1e6:.2f}M parameters on this rank")


def _log_offload(model_config: "LinearLMConfig", train_cfg: TrainingOptions) -> None:
    """One line: how many layers' inputs --cpu-offloading moves, and the pinned host memory they take."""
    per_stage = model_config.num_layers // model_config.pipeline_model_parallel_size
    moved = model_config.offload_num_layers or per_stage
    tokens = train_cfg.seq_length // model_config.context_parallel_size
    if model_config.sequence_parallel:
        tokens //= model_config.tensor_model_parallel_size
    size = tokens * train_cfg.micro_batch_size * model_config.hidden_size * model_config.params_dtype.itemsize
    logger.info("--cpu-offloading: the first %d of the %d layers of each pipeline stage keep their inputs in pinned "
                "host memory (%.2f GiB a micro-batch), the last %d on the device", moved, per_stage,
                moved * size / 2**30, per_stage - moved)
