"""Checkpoints through megatron-core ``dist_checkpointing``, in Megatron's directory layout.

Layout of ``--save DIR`` (:mod:`megatron_lasp.checkpoint.layout`)::

    DIR/latest_checkpointed_iteration.txt   # the iteration number; written LAST
    DIR/iter_0000010/                       # one dist_checkpointing directory per save
        common.pt, metadata.json, *.distcp  # megatron-core's files (sharded tensors + common state)
        config.json                         # model architecture: rebuild the model without the flags
        args.json                           # every flag of the run that saved it

What is saved: the model's ``sharded_state_dict`` (TP/PP shards as global tensors, so a load may
use other TP/PP/SP/DP sizes), the optimizer state (torch AdamW moments as sharded tensors laid out
like their parameters; megatron-core's optimizer through its own ``sharded_state_dict``), the LR
scheduler, the iteration, the consumed train/valid samples (the data position) and every rank's
RNG states.

A save is atomic: it is written to ``iter_XXXXXXX.tmp`` and renamed once complete, and the tracker
file is replaced afterwards, so a crash mid-save leaves the previous checkpoint as the latest
(``megatron_lasp.atomic``). Every rank must see the directory rank 0 creates (on several nodes,
``--save`` on a shared file system): each save checks it first and refuses otherwise.
:func:`save_weights_only` writes the same layout with the weights alone (the Hugging Face
converter's output).

No run loses another's work: rank 0 holds a :class:`~megatron_lasp.checkpoint.lock.SaveLock` in
``--save`` for the whole run (a second run on it refuses to start; the lock of a dead run is
reported and taken over); a ``--save`` that already holds checkpoints must also be ``--load``
(resume) or the run refuses; a directory whose tracker file is lost (a crash between the rename
and the tracker write) resumes from its newest complete ``iter_*``. Before loading, the
checkpoint's files are checked (a missing or truncated file is named, with the other saved
iterations), and a changed LR schedule is refused unless ``--override-opt-param-scheduler`` or
``--use-checkpoint-opt-param-scheduler`` says which side wins (as Megatron-LM). A weights-only
checkpoint (``tools/convert_hf_to_checkpoint.py``) loads as with ``--finetune``.

Changing the parallel layout: the weights load at any TP/PP/SP/DP sizes. The optimizer state of
``--ddp-impl torch``/``fsdp`` is laid out like the parameters and also loads, but across
``--ddp-impl`` kinds (megatron vs torch/fsdp), pass ``--no-load-optim``. megatron-core's
distributed optimizer saves in its ``dp_reshardable`` format (fast; the optimizer state then loads
only at the same TP/PP sizes) unless ``--dist-ckpt-optim-fully-reshardable`` (any sizes; gathers
the state on DP rank 0 while saving). RNG states are restored only at the same world size.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.mapping import ShardedObject

from megatron_lasp.atomic import (
    describe_ranks,
    fresh_directory,
    ranks_not_seeing,
    replace_directory,
    write_json,
    write_text_atomic,
)
from megatron_lasp.checkpoint import modules
from megatron_lasp.checkpoint.layout import (
    ARGS_FILENAME,
    CONFIG_FILENAME,
    FORMAT_VERSION,
    TRACKER_FILENAME,
    CheckpointError,
    check_checkpoint_files,
    checkpoint_name,
    list_iterations,
    other_iterations,
    read_config,
)
from megatron_lasp.checkpoint.lock import SaveLock
from megatron_lasp.checkpoint.record import FieldNames, RunRecord, architecture_fields, check_architecture, config_dict
from megatron_lasp.checkpoint.resolve import resolve_iteration
from megatron_lasp.models import LinearLMConfig, build_linear_lm
from megatron_lasp.parallel.state import initialize_parallel

logger = logging.getLogger(__name__)

SCHEDULER_FLAGS = (
    ("lr", "max_lr", "--lr"),
    ("min_lr", "min_lr", "--min-lr"),
    ("lr_warmup_iters", "lr_warmup_steps", "--lr-warmup-iters"),
    ("lr_decay_iters", "lr_decay_steps", "--lr-decay-iters (default --train-iters)"),
    ("lr_decay_style", "lr_decay_style", "--lr-decay-style"),
    ("weight_decay", "start_wd", "--weight-decay"),
)
"""(``args.json`` key, OptimizerParamScheduler state key, flag): what a resume must not change silently."""


@dataclass(frozen=True)
class CheckpointSettings:
    """Where a training run saves and what it loads (named as its flags), and what it records."""

    save: Optional[str]
    """Directory for checkpoints (None: no saving)."""
    load: Optional[str]
    """Directory to resume from (None: start from scratch)."""
    ckpt_step: Optional[int]
    """Load this iteration instead of the latest."""
    finetune: bool
    """Load weights only and start at iteration 0."""
    no_load_optim: bool
    """Do not load the optimizer state and LR schedule."""
    no_load_rng: bool
    """Do not restore the RNG states."""
    override_opt_param_scheduler: bool
    """On resume, this run's LR schedule wins over the checkpoint's."""
    use_checkpoint_opt_param_scheduler: bool
    """On resume, the checkpoint's LR schedule wins over this run's."""
    run: RunRecord
    """What saves record (and what a load is checked against)."""
    load_iteration: Optional[int] = None
    """The iteration to load, resolved by :func:`prepare_run` (None: nothing to load)."""
    load_weights_only: bool = False
    """The checkpoint to load holds weights only (set by :func:`prepare_run`)."""


def _same_dir(a: Optional[str], b: Optional[str]) -> bool:
    return bool(a) and bool(b) and os.path.abspath(a) == os.path.abspath(b)


def resolve_load(settings) -> Optional[int]:
    """The iteration ``--load`` (with ``--ckpt-step``) will load, its files checked; None: start
    from scratch (a ``--load`` that is also ``--save`` and holds no checkpoint yet).

    ``settings``: anything with ``load``, ``save`` and ``ckpt_step`` (:class:`CheckpointSettings`).
    Without the tracker file the newest complete ``iter_*`` is used, with a warning.

    Raises:
        CheckpointError: no checkpoint in a ``--load`` that is not also ``--save``; a missing
            ``--ckpt-step`` iteration; a tracker naming a missing directory; missing or truncated files.
    """
    root = settings.load
    iteration = resolve_iteration(root, settings.ckpt_step, newest_without_tracker=True)
    if iteration is None:
        if _same_dir(root, settings.save):
            logger.info("--load %s holds no checkpoint yet: starting from scratch", root)
            return None
        raise CheckpointError(f"--load {root} holds no checkpoint (no {TRACKER_FILENAME}, no iter_* directory); "
                              "check the path, or drop --load to start from scratch")
    check_checkpoint_files(root, iteration)
    return iteration


def check_save_dir(settings: CheckpointSettings) -> None:
    """Refuse a ``--save`` that holds checkpoints this run would overwrite (it is not resuming them)."""
    save = settings.save
    if not save or _same_dir(settings.load, save):
        return
    found = list_iterations(save)
    if found or os.path.isfile(os.path.join(save, TRACKER_FILENAME)):
        raise CheckpointError(f"--save {save} already holds checkpoints (iterations {', '.join(map(str, found))}) "
                              f"that this run would overwrite; resume them with --load {save}, "
                              "or choose another --save")


def check_scheduler(settings: CheckpointSettings, iteration: int) -> None:
    """Refuse a resume whose LR/weight-decay schedule flags differ from the checkpoint's (as Megatron-LM).

    Compares the checkpoint's ``args.json`` with this run's (``settings.run.flags``).
    ``--override-opt-param-scheduler`` (this run's flags win) or
    ``--use-checkpoint-opt-param-scheduler`` (the checkpoint's win) allow it.
    """
    if settings.no_load_optim or settings.override_opt_param_scheduler or settings.use_checkpoint_opt_param_scheduler:
        return
    path = os.path.join(checkpoint_name(settings.load, iteration), ARGS_FILENAME)
    if not os.path.isfile(path):
        return
    with open(path, encoding="utf-8") as f:
        saved = json.load(f)
    changed = []
    for field, _, flag in SCHEDULER_FLAGS:
        old, new = saved.get(field), settings.run.flags.get(field)
        if old is not None and old != new:
            changed.append(f"{flag} {old} -> {new}")
    if changed:
        raise CheckpointError(f"--load {settings.load}: the LR schedule changed since the checkpoint ({'; '.join(changed)}); "
                              "add --override-opt-param-scheduler to use the new values or "
                              "--use-checkpoint-opt-param-scheduler to keep the checkpoint's")


def prepare_run(settings: CheckpointSettings, config, names: FieldNames,
                lock: Optional[SaveLock] = None) -> CheckpointSettings:
    """Checkpoint checks before anything is built; no collectives (every rank runs them).

    Checks ``--save`` and, for a resume, the architecture (reported with ``names``), the LR
    schedule and the checkpoint's files. Rank 0 then takes ``lock`` on ``--save`` (which also
    checks that it is writable).

    Returns:
        ``settings`` with ``load_iteration`` resolved (None: nothing to load) and, for a
        weights-only checkpoint (converted, no optimizer, schedule or data position), what
        ``--finetune`` sets (``finetune``, ``no_load_optim``, ``no_load_rng``).
    """
    iteration, weights_only = None, False
    check_save_dir(settings)
    if settings.load:
        iteration = resolve_load(settings)
        if iteration is not None:
            check_architecture(settings.load, settings.run, config, names, iteration)
            _, saved = read_config(settings.load, iteration)
            weights_only = bool(saved.get("weights_only"))
            if not weights_only and not settings.finetune:
                check_scheduler(settings, iteration)
    if lock is not None and settings.save and dist.is_initialized() and dist.get_rank() == 0:
        lock.acquire(settings.save)
    settings = dataclasses.replace(settings, load_iteration=iteration, load_weights_only=weights_only)
    if weights_only and not settings.finetune:
        logger.info("%s holds weights only (converted from %s): loading the weights; the optimizer, LR "
                    "schedule and iteration start fresh, as with --finetune", checkpoint_name(settings.load, iteration),
                    saved.get("converted_from", "?"))
        settings = dataclasses.replace(settings, finetune=True, no_load_optim=True, no_load_rng=True)
    return settings


# ----------------------------------------------------------------------------------------------
# save


def _sharded_state_dict(state, full_map, for_loading: bool, with_optimizer: bool, with_rng: bool,
                        sharding_type: Optional[str] = None) -> Dict[str, Any]:
    run = state.checkpoint.run
    inner = modules.unwrap_model(state.model)
    model_sd = inner.sharded_state_dict()
    sd: Dict[str, Any] = {"model": model_sd}
    if with_optimizer:
        if run.ddp_impl == "megatron":
            if for_loading:
                modules.init_megatron_optimizer_state(state.optimizer.optimizer)
            kwargs = {}
            if run.use_distributed_optimizer:
                kwargs["metadata"] = {"distrib_optim_sharding_type": sharding_type or run.optimizer_sharding_type}
            sd["optimizer"] = state.optimizer.optimizer.sharded_state_dict(model_sd, is_loading=for_loading, **kwargs)
        else:
            sd["optimizer"] = modules.torch_optimizer_sharded(state.optimizer, model_sd, full_map, for_loading)
        sd["opt_param_scheduler"] = state.scheduler.state_dict()
    if with_rng:
        rank, world = dist.get_rank(), dist.get_world_size()
        sd["rng_state"] = ShardedObject("rng_state", modules.rng_state(), (world,), (rank,), replica_id=0)
    sd["iteration"] = state.iteration
    sd["consumed_train_samples"] = state.consumed_train_samples
    sd["consumed_valid_samples"] = state.consumed_valid_samples
    sd["checkpoint_version"] = FORMAT_VERSION
    return sd


def _temporary_name(root: str, iteration: int) -> str:
    return checkpoint_name(root, iteration) + ".tmp"


def _begin_save(root: str, iteration: int) -> str:
    """Create the empty temporary directory an iteration is written into (rank 0); returns it."""
    os.makedirs(root, exist_ok=True)
    return fresh_directory(_temporary_name(root, iteration))


def _check_shared(root: str, tmp: str) -> None:
    """Every rank must see the directory rank 0 just created (``--save`` shared by all nodes);
    otherwise shards would land on several disks and no node would hold the checkpoint.
    Collective; all ranks raise together."""
    blind, host0 = ranks_not_seeing(tmp)
    if blind:
        raise CheckpointError(f"--save {root}: {describe_ranks(blind)} do not see {tmp}, which rank 0 created on "
                              f"{host0}: --save must be on a file system every node shares, at the same path "
                              "(docs/LAUNCH.md)")


def _finish_save(root: str, iteration: int, config_json: Dict[str, Any], args_json: Dict[str, Any]) -> str:
    """Complete the written iteration (rank 0): its ``config.json`` and ``args.json``, the rename
    into place (an older save of the same iteration is kept until then), then the tracker file."""
    tmp, final = _temporary_name(root, iteration), checkpoint_name(root, iteration)
    write_json(os.path.join(tmp, CONFIG_FILENAME), config_json)
    write_json(os.path.join(tmp, ARGS_FILENAME), args_json)
    replace_directory(tmp, final)
    write_text_atomic(os.path.join(root, TRACKER_FILENAME), f"{iteration}\n")
    return final


def save_checkpoint(state) -> str:
    """Save ``state`` atomically to ``--save``/iter_XXXXXXX; returns that directory. Collective.

    ``state`` is the loop's ``TrainState``: its model, optimizer, scheduler, position and
    ``checkpoint`` (:class:`CheckpointSettings`).
    """
    run = state.checkpoint.run
    root = state.checkpoint.save
    rank = dist.get_rank()
    if rank == 0:
        _begin_save(root, state.iteration)
    _check_shared(root, _temporary_name(root, state.iteration))
    with modules.gathered(state.model, run.ddp_impl == "fsdp") as full_map:
        sd = _sharded_state_dict(state, full_map, for_loading=False, with_optimizer=True, with_rng=True)
        dist_checkpointing.save(sd, _temporary_name(root, state.iteration))
    dist.barrier()
    if rank == 0:
        _finish_save(root, state.iteration, config_dict(state.model_config, run), dict(run.flags))
    dist.barrier()
    final = checkpoint_name(root, state.iteration)
    logger.info("saved checkpoint at iteration %d to %s", state.iteration, final)
    return final


def save_weights_only(model, config, run: RunRecord, root: str, iteration: int,
                      extra_config: Optional[Dict[str, Any]] = None) -> str:
    """Save a model's weights as iteration ``iteration`` of the checkpoint directory ``root``.

    The training layout (``iter_XXXXXXX/`` with ``config.json`` and ``args.json``, then the
    tracker file), written atomically as :func:`save_checkpoint` does, but with no optimizer,
    LR scheduler or RNG state and no data position: ``config.json`` says ``"weights_only":
    true``, and :func:`load_checkpoint` loads it as with ``--finetune``. The weights reshard on
    load (any TP/PP/SP sizes). One process (world size 1, a process group initialized).

    Args:
        model: the :class:`~megatron_lasp.models.LinearLM` (TP=PP=1).
        config: its ``LinearLMConfig``.
        run: what ``config.json`` (vocabulary, tokenizer, layout) and ``args.json`` record.
        root: the checkpoint directory (created if missing; other iterations are kept).
        iteration: the iteration number to record.
        extra_config: more ``config.json`` entries (e.g. where the weights came from).

    Returns:
        The ``iter_XXXXXXX`` directory.
    """
    if dist.is_initialized() and dist.get_world_size() != 1:
        raise CheckpointError("save_weights_only runs on a single process (world size 1)")
    tmp = _begin_save(root, iteration)
    state = {
        "model": model.sharded_state_dict(),
        "iteration": iteration,
        "consumed_train_samples": 0,
        "consumed_valid_samples": 0,
        "checkpoint_version": FORMAT_VERSION,
    }
    dist_checkpointing.save(state, tmp)
    saved_config = dict(config_dict(config, run), weights_only=True, **(extra_config or {}))
    final = _finish_save(root, iteration, saved_config, dict(run.flags))
    logger.info("saved the weights (iteration %d) to %s", iteration, final)
    return final


# ----------------------------------------------------------------------------------------------
# load


def load_checkpoint(state, iteration: Optional[int] = None) -> Optional[int]:
    """Load ``--load``'s checkpoint into ``state``; returns its iteration.

    ``state`` is the loop's ``TrainState``; its ``checkpoint`` (:class:`CheckpointSettings`, from
    :func:`prepare_run`) says what to load. Nothing is loaded (None) when there is no iteration to
    load (``iteration``, else ``load_iteration``). Collective.
    """
    settings = state.checkpoint
    run = settings.run
    root = settings.load
    if iteration is None:
        iteration = settings.load_iteration
    if iteration is None:
        return None
    path = checkpoint_name(root, iteration)
    _, saved = read_config(root, iteration)
    same_world = saved["parallel"]["world_size"] == run.world_size
    with_optim = not settings.no_load_optim
    if with_optim and saved["parallel"]["ddp_impl"] != run.ddp_impl and "megatron" in (
            saved["parallel"]["ddp_impl"], run.ddp_impl):
        raise CheckpointError(f"--load {root}: optimizer state saved with --ddp-impl {saved['parallel']['ddp_impl']} "
                              f"cannot be loaded with --ddp-impl {run.ddp_impl}; add --no-load-optim")
    with_rng = not settings.no_load_rng and same_world
    if not settings.no_load_rng and not same_world:
        logger.warning("world size changed (%d -> %d): RNG states not restored",
                       saved["parallel"]["world_size"], run.world_size)
    inner = modules.unwrap_model(state.model)
    with modules.gathered(state.model, run.ddp_impl == "fsdp") as full_map:
        sd = _sharded_state_dict(state, full_map, for_loading=True, with_optimizer=with_optim, with_rng=with_rng,
                                 sharding_type=saved["parallel"].get("optimizer_sharding_type"))
        try:
            loaded = dist_checkpointing.load(sd, path)
        except Exception as err:
            first = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
            raise CheckpointError(f"checkpoint {path} cannot be loaded ({type(err).__name__}: {first}); "
                                  f"{other_iterations(root, iteration)}") from None
    if full_map:
        modules.load_fsdp_model(inner, loaded["model"])
    else:
        inner.load_state_dict(loaded["model"], strict=True)
    if with_optim:
        if run.ddp_impl == "megatron":
            state.optimizer.load_state_dict(loaded["optimizer"])
        else:
            modules.load_torch_optimizer(state.optimizer, loaded["optimizer"])
        # check_scheduler refused a silent change; these say which side wins (Megatron-LM's flags)
        state.scheduler.override_opt_param_scheduler = bool(settings.override_opt_param_scheduler)
        state.scheduler.use_checkpoint_opt_param_scheduler = not settings.override_opt_param_scheduler
        state.scheduler.load_state_dict(loaded["opt_param_scheduler"])
    if with_rng:
        modules.set_rng_state(loaded["rng_state"])
    if not settings.finetune:
        state.iteration = int(loaded["iteration"])
        state.consumed_train_samples = int(loaded["consumed_train_samples"])
        state.consumed_valid_samples = int(loaded["consumed_valid_samples"])
    dist.barrier()
    logger.info("loaded checkpoint %s (iteration %d)%s", path, iteration,
                "" if with_optim else " (weights only)")
    return iteration


def load_model_for_inference(load_dir: str, iteration: Optional[int] = None,
                             device: Optional[str] = None) -> Tuple[Any, Any, Dict[str, Any]]:
    """Build the model from a checkpoint's ``config.json`` and load its weights, on one process.

    Whatever TP/PP/SP sizes saved it, the weights are resharded to TP=1, PP=1, SP=1. A process
    group is created if there is none (a single-process gloo group); an existing group must have
    world size 1.

    Args:
        load_dir: the ``--save`` directory (with ``latest_checkpointed_iteration.txt``).
        iteration: which ``iter_XXXXXXX`` to load (default: the latest).
        device: where to put the model (default: CUDA if available, else CPU).

    Returns:
        ``(model, config, saved)``: the :class:`~megatron_lasp.models.LinearLM` in eval mode, its
        ``LinearLMConfig`` (the saved architecture, this package's defaults for how to run), and
        the checkpoint's ``config.json`` dict (its ``"model"`` without the runtime fields; with
        ``"args"``: the saved ``args.json``).
    """
    iteration, saved = read_config(load_dir, iteration)
    path = checkpoint_name(load_dir, iteration)
    with open(os.path.join(path, ARGS_FILENAME), encoding="utf-8") as f:
        saved["args"] = json.load(f)
    if dist.is_initialized() and dist.get_world_size() != 1:
        raise CheckpointError("load_model_for_inference runs on a single process (world size 1)")
    initialize_parallel(1, 1, 1, backend="gloo" if not torch.cuda.is_available() else None)
    saved["model"] = architecture_fields(saved["model"])
    config = LinearLMConfig(**saved["model"], use_cpu_initialization=True, perform_initialization=False)
    model = build_linear_lm(config, saved["padded_vocab_size"])
    loaded = dist_checkpointing.load({"model": model.sharded_state_dict()}, path)
    model.load_state_dict(loaded["model"], strict=True)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = model.to(device).eval()
    return model, config, saved
