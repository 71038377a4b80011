"""Checkpoints through megatron-core ``dist_checkpointing``, in Megatron's directory layout.

Layout of ``--save DIR``::

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

No run loses another's work: rank 0 holds a lock file in ``--save`` for the whole run (a second
run on it refuses to start; the lock of a dead run is reported and taken over); a ``--save``
that already holds checkpoints must also be ``--load`` (resume) or the run refuses; a directory
whose tracker file is lost (a crash between the rename and the tracker write) resumes from its
newest complete ``iter_*``. Before loading, the checkpoint's files are checked (a missing or
truncated file is named, with the other saved iterations), and a changed LR schedule is refused
unless ``--override-opt-param-scheduler`` or ``--use-checkpoint-opt-param-scheduler`` says which
side wins (as Megatron-LM). A weights-only checkpoint (``tools/convert_hf_to_checkpoint.py``)
loads as with ``--finetune``.

Changing the parallel layout: the weights load at any TP/PP/SP/DP sizes. The optimizer state of
``--ddp-impl torch``/``fsdp`` is laid out like the parameters and also loads, but across
``--ddp-impl`` kinds (megatron vs torch/fsdp), pass ``--no-load-optim``. megatron-core's
distributed optimizer saves in its ``dp_reshardable`` format (fast; the optimizer state then loads
only at the same TP/PP sizes) unless ``--dist-ckpt-optim-fully-reshardable`` (any sizes; gathers
the state on DP rank 0 while saving). RNG states are restored only at the same world size.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import random
import socket
from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist

from megatron_lasp.atomic import (describe_ranks, fresh_directory, ranks_not_seeing, replace_directory, write_json,
                                  write_text_atomic)
from megatron_lasp.data.tokenizer import TokenizerSettings
from megatron_lasp.training.optim import fsdp_reshard, torch_optimizers, unwrap_model

logger = logging.getLogger(__name__)

from megatron_lasp.checkpoint_files import (  # noqa: F401 - the layout, re-exported for callers
    ARGS_FILENAME,
    CONFIG_FILENAME,
    TRACKER_FILENAME,
    CheckpointError,
    check_checkpoint_files,
    checkpoint_name,
    list_iterations,
    other_iterations,
)
FORMAT_VERSION = 1

RUNTIME_CONFIG_FIELDS = (
    "sequence_parallel_mode",
    "kernel_backend",
    "transformer_impl",
    "fusion",
    "recompute_granularity",
    "recompute_method",
    "recompute_num_layers",
    "recompute_modules",
    "recompute_elementwise",
    "recompute_chunk_size",
    "offload_layer_inputs",
    "fused_linear_cross_entropy",
    "cross_entropy_chunk_size",
)
"""LinearLMConfig fields that say how to run, not what the model is (kernels, recompute, offloading,
the loss's chunking): not part of config.json's model, neither compared on resume nor applied when
a checkpoint is loaded for inference or export (older checkpoints may record some: ignored)."""

FINE_TUNE_FIELDS = ("init_method_std", "hidden_dropout", "attention_dropout")
"""Recorded architecture fields that a resume may change (initialization, dropout)."""

VOCABULARY_FLAGS = "vocabulary size (tokenizer / --vocab-size / --make-vocab-size-divisible-by)"
"""What sets ``padded_vocab_size`` (named when a checkpoint's differs)."""


LOCK_FILENAME = ".megatron_lasp.lock"
"""Held (``flock``) in ``--save`` for the whole run; holds the owner's pid and host."""

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
class RunRecord:
    """What a checkpoint records about the run that wrote it, besides the model (``config.json``'s
    vocabulary, tokenizer and layout; ``args.json``). The defaults describe one process."""

    vocab_size_tokenizer: Optional[int]
    """The tokenizer's ids (None: unknown)."""
    padded_vocab_size: int
    """Rows of the embedding table."""
    seq_length: Optional[int]
    """Tokens per training sample (None: unknown)."""
    tokenizer: TokenizerSettings
    """What builds the tokenizer."""
    tensor_model_parallel_size: int = 1
    """TP size."""
    pipeline_model_parallel_size: int = 1
    """PP size."""
    context_parallel_size: int = 1
    """Sequence-parallel (LASP) size."""
    data_parallel_size: int = 1
    """DP size (without SP)."""
    sequence_parallel_mode: str = "lasp"
    """How linear attention ran over the sequence-parallel group."""
    ddp_impl: str = "torch"
    """Data-parallel implementation (its optimizer state loads only into the same kind)."""
    use_distributed_optimizer: bool = False
    """megatron-core's distributed optimizer (ZeRO-1)."""
    dist_ckpt_optim_fully_reshardable: bool = False
    """Save the distributed optimizer's state fully reshardable instead of ``dp_reshardable``."""
    world_size: int = 1
    """Number of processes (RNG states restore only at the same one)."""
    flags: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    """The run's settings as ``args.json`` holds them (JSON types only)."""

    @property
    def optimizer_sharding_type(self) -> str:
        """megatron-core DistributedOptimizer checkpoint format: DP-reshardable (fast) or fully reshardable."""
        return "fully_reshardable" if self.dist_ckpt_optim_fully_reshardable else "dp_reshardable"


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


def resolve_load(settings: CheckpointSettings) -> Optional[int]:
    """The iteration ``--load`` (with ``--ckpt-step``) will load, checked; None: start from scratch.

    Without the tracker file (a crash between a save's rename and the tracker write leaves
    exactly that) the newest complete ``iter_*`` directory is used, with a warning.

    Raises:
        CheckpointError: no checkpoint in a ``--load`` that is not also ``--save``; a missing
            ``--ckpt-step`` iteration; a tracker naming a missing directory; missing or truncated files.
    """
    root = settings.load
    same_dir = bool(settings.save) and os.path.abspath(root) == os.path.abspath(settings.save)
    found = list_iterations(root)
    if settings.ckpt_step is not None:
        iteration = settings.ckpt_step
        if iteration not in found:
            raise CheckpointError(f"--ckpt-step {iteration}: {root} has no complete {os.path.basename(checkpoint_name(root, iteration))}; "
                                  f"saved iterations: {', '.join(map(str, found)) or 'none'}")
    else:
        iteration = read_tracker(root) if os.path.isdir(root) else None
        if iteration is None and found:
            iteration = found[-1]
            logger.warning("%s has no %s but holds iterations %s: resuming from the newest complete one, %d",
                           root, TRACKER_FILENAME, ", ".join(map(str, found)), iteration)
        if iteration is None:
            if same_dir:
                logger.info("--load %s holds no checkpoint yet: starting from scratch", root)
                return None
            raise CheckpointError(f"--load {root} holds no checkpoint (no {TRACKER_FILENAME}, no iter_* directory); "
                                  "check the path, or drop --load to start from scratch")
        if iteration not in found:
            raise CheckpointError(f"{os.path.join(root, TRACKER_FILENAME)} names iteration {iteration}, but "
                                  f"{checkpoint_name(root, iteration)} is missing or incomplete; {other_iterations(root, iteration)}")
    check_checkpoint_files(root, iteration)
    return iteration


def check_save_dir(settings: CheckpointSettings) -> None:
    """Refuse a ``--save`` that holds checkpoints this run would overwrite (it is not resuming them)."""
    save = settings.save
    if not save:
        return
    same_dir = bool(settings.load) and os.path.abspath(settings.load) == os.path.abspath(save)
    if same_dir:
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


# ----------------------------------------------------------------------------------------------
# the --save lock


class SaveLock:
    """An exclusive lock on ``--save`` held for the whole run (``flock`` on a file in it).

    The kernel drops the lock when its process dies, so a lock file left by a dead run is stale:
    it is reported and taken over. Where ``flock`` is unsupported (some network file systems)
    the owner's pid (same host) decides.
    """

    def __init__(self, root: str) -> None:
        self.root = root
        self.path = os.path.join(root, LOCK_FILENAME)
        self._fd: Optional[int] = None
        self._created_root = False

    def acquire(self) -> "SaveLock":
        """Take the lock (creating ``root``); raise :class:`CheckpointError` if another run holds it."""
        import fcntl

        try:
            if not os.path.isdir(self.root):
                os.makedirs(self.root)
                self._created_root = True
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise CheckpointError(f"--save {self.root} is not writable ({err.strerror}); "
                                  "choose a directory this run can write") from None
        owner = os.read(fd, 256).decode("utf-8", "replace").split()
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            held = False
        except BlockingIOError:
            held = True
        except OSError:  # no flock here: trust the recorded pid on this host
            held = bool(owner) and owner[1:2] == [socket.gethostname()] and _pid_alive(owner[0])
        if held:
            os.close(fd)
            who = f"pid {owner[0]} on {owner[1]}" if len(owner) >= 2 else "another process"
            raise CheckpointError(f"--save {self.root} is in use by another run ({who}, lock {self.path}); "
                                  "wait for it to finish or choose another --save")
        if owner:
            logger.warning("--save %s: stale lock of a run that is gone (pid %s on %s): taking it over",
                           self.root, owner[0], owner[1] if len(owner) > 1 else "?")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
        os.fsync(fd)
        self._fd = fd
        return self

    def release(self) -> None:
        """Drop the lock and its file (and ``root`` if this run created it and left it empty)."""
        if self._fd is None:
            return
        try:
            os.unlink(self.path)
        except OSError:
            pass
        os.close(self._fd)
        self._fd = None
        if self._created_root:
            try:
                os.rmdir(self.root)
            except OSError:
                pass


def _pid_alive(pid: str) -> bool:
    try:
        os.kill(int(pid), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True


_save_lock: Optional[SaveLock] = None


def lock_save_dir(save: Optional[str]) -> None:
    """Take :class:`SaveLock` on ``save`` for this process (rank 0); released by :func:`release_save_lock`."""
    global _save_lock
    release_save_lock()
    if save:
        _save_lock = SaveLock(save).acquire()


def release_save_lock() -> None:
    global _save_lock
    if _save_lock is not None:
        _save_lock.release()
        _save_lock = None


def prepare_run(settings: CheckpointSettings, config) -> CheckpointSettings:
    """Checkpoint checks before anything is built; no collectives (every rank runs them).

    Checks ``--save`` and, for a resume, the architecture, the LR schedule and the checkpoint's
    files. Rank 0 takes the lock on ``--save`` (which also checks that it is writable).

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
            check_architecture(settings.load, settings.run, config, iteration)
            _, saved = read_config(settings.load, iteration)
            weights_only = bool(saved.get("weights_only"))
            if not weights_only and not settings.finetune:
                check_scheduler(settings, iteration)
    if dist.is_initialized() and dist.get_rank() == 0:
        lock_save_dir(settings.save)
    settings = dataclasses.replace(settings, load_iteration=iteration, load_weights_only=weights_only)
    if weights_only and not settings.finetune:
        logger.info("%s holds weights only (converted from %s): loading the weights; the optimizer, LR "
                    "schedule and iteration start fresh, as with --finetune", checkpoint_name(settings.load, iteration),
                    saved.get("converted_from", "?"))
        settings = dataclasses.replace(settings, finetune=True, no_load_optim=True, no_load_rng=True)
    return settings


def read_tracker(root: str) -> Optional[int]:
    """The latest complete iteration saved under ``root``, or None when there is none."""
    path = os.path.join(root, TRACKER_FILENAME)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        text = f.read().strip()
    try:
        return int(text)
    except ValueError:
        raise CheckpointError(f"{path}: expected an iteration number, found {text!r}") from None


def _model_fields(config) -> Dict[str, Any]:
    """The architecture fields of a LinearLMConfig (JSON types only): config.json's ``model``."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    base = {f.name for f in dataclasses.fields(TransformerConfig)}
    keep = {"num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size", "kv_channels",
            "normalization", "layernorm_epsilon", "add_bias_linear", "init_method_std",
            "hidden_dropout", "attention_dropout", "num_query_groups"}
    out = {}
    for f in dataclasses.fields(config):
        if f.name in RUNTIME_CONFIG_FIELDS or (f.name in base and f.name not in keep):
            continue
        value = getattr(config, f.name)
        if isinstance(value, (bool, int, float, str)) or value is None:
            out[f.name] = value
    return out


def architecture_fields(model: Mapping[str, Any]) -> Dict[str, Any]:
    """config.json's ``model`` section without :data:`RUNTIME_CONFIG_FIELDS` (which checkpoints
    saved before some of them were runtime fields record): ``LinearLMConfig`` keyword arguments."""
    return {name: value for name, value in model.items() if name not in RUNTIME_CONFIG_FIELDS}


def config_dict(config, run: RunRecord) -> Dict[str, Any]:
    """What ``config.json`` holds: the model fields, vocabulary, tokenizer and the saved layout."""
    return {
        "format_version": FORMAT_VERSION,
        "model_type": "megatron-lasp-linear-lm",
        "model": _model_fields(config),
        "vocab_size": run.vocab_size_tokenizer,
        "padded_vocab_size": run.padded_vocab_size,
        "seq_length": run.seq_length,
        "tokenizer": run.tokenizer.as_dict(),
        "parallel": {
            "tensor_model_parallel_size": run.tensor_model_parallel_size,
            "pipeline_model_parallel_size": run.pipeline_model_parallel_size,
            "context_parallel_size": run.context_parallel_size,
            "data_parallel_size": run.data_parallel_size,
            "sequence_parallel_mode": run.sequence_parallel_mode,
            "ddp_impl": run.ddp_impl,
            "use_distributed_optimizer": run.use_distributed_optimizer,
            "optimizer_sharding_type": run.optimizer_sharding_type if run.use_distributed_optimizer else None,
            "world_size": run.world_size,
        },
    }


def read_config(root: str, iteration: Optional[int] = None) -> Tuple[int, Dict[str, Any]]:
    """(iteration, config.json) of the latest (or the given) checkpoint under ``root``."""
    if iteration is None:
        iteration = read_tracker(root)
        if iteration is None:
            raise CheckpointError(f"no checkpoint in {root} ({TRACKER_FILENAME} missing)")
    path = os.path.join(checkpoint_name(root, iteration), CONFIG_FILENAME)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path} not found: not a megatron-lasp checkpoint, or an incomplete one")
    with open(path, encoding="utf-8") as f:
        return iteration, json.load(f)


def check_architecture(root: str, run: RunRecord, config, iteration: Optional[int] = None) -> None:
    """Raise :class:`CheckpointError` naming the first architecture field that differs.

    The sizes first (``ARCHITECTURE_FIELDS`` of the flags, then ``kv_channels``), then every other
    field the checkpoint records except :data:`FINE_TUNE_FIELDS` (runtime fields are never
    compared: :data:`RUNTIME_CONFIG_FIELDS`). Does nothing when ``root`` holds no checkpoint yet
    (the run starts from scratch).
    """
    from megatron_lasp.training.arguments import ARCHITECTURE_FIELDS

    if iteration is None and (not os.path.isdir(root) or read_tracker(root) is None):
        return
    _, saved = read_config(root, iteration)
    current = dict(_model_fields(config), padded_vocab_size=run.padded_vocab_size)
    saved_fields = dict(architecture_fields(saved["model"]), padded_vocab_size=saved["padded_vocab_size"])
    sizes = ARCHITECTURE_FIELDS + ("kv_channels",)
    for name in sizes + tuple(n for n in saved_fields if n not in sizes):
        compared = name in sizes or (name in current and name not in FINE_TUNE_FIELDS)
        if compared and name in saved_fields and saved_fields[name] != current.get(name):
            raise CheckpointError(
                f"--load {root}: checkpoint has {name}={saved_fields[name]} but this run has "
                f"{name}={current.get(name)}; {_field_hint(name)}"
            )


def _field_hint(name: str) -> str:
    """What to change so that field ``name`` matches the checkpoint."""
    from megatron_lasp.training.arguments import flag_of_field

    flag = VOCABULARY_FLAGS if name == "padded_vocab_size" else flag_of_field(name)
    if flag:
        return f"change {flag} to match"
    return "this run builds another model than the checkpoint's"


# ----------------------------------------------------------------------------------------------
# FSDP2: checkpoints hold full (un-FSDP-sharded) tensors, TP/PP-sharded as without FSDP


def _is_dtensor(t) -> bool:
    return hasattr(t, "full_tensor") and hasattr(t, "device_mesh")


@contextlib.contextmanager
def _full_parameters(module: torch.nn.Module):
    """Temporarily replace FSDP2's sharded parameters by full copies; yields ``{id(sharded): full}``.

    Collective over the FSDP mesh (all ranks of dp_cp must enter together).
    """
    swapped = []
    mapping = {}
    for sub in module.modules():
        for name, p in list(sub._parameters.items()):
            if p is not None and _is_dtensor(p):
                full = torch.nn.Parameter(p.full_tensor().detach().clone(), requires_grad=p.requires_grad)
                mapping[id(p)] = full
                swapped.append((sub, name, p))
                sub._parameters[name] = full
    try:
        yield mapping
    finally:
        for sub, name, p in swapped:
            sub._parameters[name] = p


def _local_chunk(full: torch.Tensor, like) -> torch.Tensor:
    """This rank's FSDP2 shard (dim-0 chunk) of ``full``, as laid out in the DTensor ``like``."""
    mesh = like.device_mesh
    n, r = mesh.size(), mesh.get_local_rank()
    chunks = list(torch.chunk(full, n, dim=0))
    local = like.to_local()
    piece = chunks[r] if r < len(chunks) else full.new_empty((0,) + tuple(full.shape[1:]))
    if tuple(piece.shape) != tuple(local.shape):
        raise CheckpointError(f"FSDP shard shape {tuple(local.shape)} != checkpoint chunk {tuple(piece.shape)}")
    return piece


def _copy_into(target: torch.Tensor, value: torch.Tensor) -> None:
    with torch.no_grad():
        if _is_dtensor(target):
            target.to_local().copy_(_local_chunk(value.to(target.device), target))
        else:
            target.copy_(value)


# ----------------------------------------------------------------------------------------------
# state dicts


def _rng_state() -> Dict[str, Any]:
    from megatron.core.tensor_parallel import random as mpu_random

    state = {
        "random": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "tracker": mpu_random.get_cuda_rng_tracker().get_states(),
    }
    return state


def _set_rng_state(state: Dict[str, Any]) -> None:
    from megatron.core.tensor_parallel import random as mpu_random

    random.setstate(state["random"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    mpu_random.get_cuda_rng_tracker().set_states(state["tracker"])


def _torch_optimizer_sharded(opt, model_sd, full_map, for_loading: bool):
    """torch AdamW state as ShardedTensors laid out like the model's parameters."""
    from megatron.core.dist_checkpointing.optimizer import (
        get_param_id_to_sharded_param_map,
        optim_state_to_sharding_state,
    )

    torch_opt = opt.optimizer
    params = [p for g in torch_opt.param_groups for p in g["params"]]
    if for_loading:
        for p in params:  # the load needs a template for every state tensor
            st = torch_opt.state[p]
            if "exp_avg" not in st:
                st["exp_avg"] = torch.zeros_like(p)
                st["exp_avg_sq"] = torch.zeros_like(p)
                st["step"] = torch.zeros((), dtype=torch.float32)
    sd = torch_opt.state_dict()
    sd["state"] = {k: dict(v) for k, v in sd["state"].items()}  # state_dict() shares the live dicts
    steps = {float(s["step"]) for s in sd["state"].values() if "step" in s}
    for s in sd["state"].values():
        s.pop("step", None)
        for key, value in list(s.items()):
            if _is_dtensor(value):
                s[key] = value.full_tensor() if not for_loading else torch.empty(value.shape, dtype=value.dtype,
                                                                                  device=value.to_local().device)
    id_map = get_param_id_to_sharded_param_map(model_sd, [full_map.get(id(p), p) for p in params])
    optim_state_to_sharding_state(sd, id_map)
    sd["adam_step"] = max(steps) if steps else 0.0
    return sd


def _init_megatron_optimizer_state(optimizer) -> None:
    """Create the Adam state (moments + step) a fresh megatron-core optimizer lacks, as load templates.

    megatron-core's DistributedOptimizer reads ``step`` from every parameter's state while building
    its sharded state dict, which a run that has not stepped yet does not have.
    """
    for sub, inner in torch_optimizers(optimizer):
        if inner is sub:  # not a megatron-core wrapper
            continue
        sub.init_state_fn(inner, sub.config)
        for group in inner.param_groups:
            for p in group["params"]:
                inner.state[p].setdefault("step", torch.zeros((), dtype=torch.float32))


def _sharded_state_dict(state, full_map, for_loading: bool, with_optimizer: bool, with_rng: bool,
                        sharding_type: Optional[str] = None):
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    run = state.checkpoint.run
    inner = unwrap_model(state.model)
    model_sd = inner.sharded_state_dict()
    sd: Dict[str, Any] = {"model": model_sd}
    if with_optimizer:
        if run.ddp_impl == "megatron":
            if for_loading:
                _init_megatron_optimizer_state(state.optimizer.optimizer)
            kwargs = {}
            if run.use_distributed_optimizer:
                kwargs["metadata"] = {"distrib_optim_sharding_type": sharding_type or run.optimizer_sharding_type}
            sd["optimizer"] = state.optimizer.optimizer.sharded_state_dict(model_sd, is_loading=for_loading, **kwargs)
        else:
            sd["optimizer"] = _torch_optimizer_sharded(state.optimizer, model_sd, full_map, for_loading)
        sd["opt_param_scheduler"] = state.scheduler.state_dict()
    if with_rng:
        rank, world = dist.get_rank(), dist.get_world_size()
        sd["rng_state"] = ShardedObject("rng_state", _rng_state(), (world,), (rank,), replica_id=0)
    sd["iteration"] = state.iteration
    sd["consumed_train_samples"] = state.consumed_train_samples
    sd["consumed_valid_samples"] = state.consumed_valid_samples
    sd["checkpoint_version"] = FORMAT_VERSION
    return sd


def _fsdp_context(state):
    if state.checkpoint.run.ddp_impl == "fsdp":
        fsdp_reshard(state.model)
        return _full_parameters(unwrap_model(state.model))
    return contextlib.nullcontext({})


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


def _temporary_name(root: str, iteration: int) -> str:
    return checkpoint_name(root, iteration) + ".tmp"


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
    from megatron.core import dist_checkpointing

    run = state.checkpoint.run
    root = state.checkpoint.save
    rank = dist.get_rank()
    if rank == 0:
        _begin_save(root, state.iteration)
    _check_shared(root, _temporary_name(root, state.iteration))
    with _fsdp_context(state) as full_map:
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
    from megatron.core import dist_checkpointing

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


def load_checkpoint(state, iteration: Optional[int] = None) -> Optional[int]:
    """Load ``--load``'s checkpoint into ``state``; returns its iteration.

    ``state`` is the loop's ``TrainState``; its ``checkpoint`` (:class:`CheckpointSettings`, from
    :func:`prepare_run`) says what to load. Nothing is loaded (None) when there is no iteration to
    load (``iteration``, else ``load_iteration``). Collective.
    """
    from megatron.core import dist_checkpointing

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
    inner = unwrap_model(state.model)
    with _fsdp_context(state) as full_map:
        sd = _sharded_state_dict(state, full_map, for_loading=True, with_optimizer=with_optim, with_rng=with_rng,
                                 sharding_type=saved["parallel"].get("optimizer_sharding_type"))
        try:
            loaded = dist_checkpointing.load(sd, path)
        except Exception as err:
            first = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
            raise CheckpointError(f"checkpoint {path} cannot be loaded ({type(err).__name__}: {first}); "
                                  f"{other_iterations(root, iteration)}") from None
    if full_map:
        _load_fsdp_model(inner, loaded["model"])
    else:
        inner.load_state_dict(loaded["model"], strict=True)
    if with_optim:
        if run.ddp_impl == "megatron":
            state.optimizer.load_state_dict(loaded["optimizer"])
        else:
            _load_torch_optimizer(state.optimizer, loaded["optimizer"])
        # check_scheduler refused a silent change; these say which side wins (Megatron-LM's flags)
        state.scheduler.override_opt_param_scheduler = bool(settings.override_opt_param_scheduler)
        state.scheduler.use_checkpoint_opt_param_scheduler = not settings.override_opt_param_scheduler
        state.scheduler.load_state_dict(loaded["opt_param_scheduler"])
    if with_rng:
        _set_rng_state(loaded["rng_state"])
    if not settings.finetune:
        state.iteration = int(loaded["iteration"])
        state.consumed_train_samples = int(loaded["consumed_train_samples"])
        state.consumed_valid_samples = int(loaded["consumed_valid_samples"])
    dist.barrier()
    logger.info("loaded checkpoint %s (iteration %d)%s", path, iteration,
                "" if with_optim else " (weights only)")
    return iteration


def _load_fsdp_model(module: torch.nn.Module, loaded: Dict[str, Any]) -> None:
    """Copy full loaded tensors into FSDP2's parameter shards (its load_state_dict wants DTensors)."""
    params = dict(module.named_parameters())
    buffers = dict(module.named_buffers())
    missing = sorted(set(params) - set(loaded))
    if missing:
        raise CheckpointError(f"checkpoint lacks parameters {missing[:3]}")
    for key, value in loaded.items():
        if key in params:
            _copy_into(params[key], value)
        elif key in buffers and torch.is_tensor(value):
            with torch.no_grad():
                buffers[key].copy_(value)
        elif not key.endswith("_extra_state"):
            raise CheckpointError(f"unexpected checkpoint entry {key!r} for this model")


def _load_torch_optimizer(opt, loaded: Dict[str, Any]) -> None:
    torch_opt = opt.optimizer
    params = [p for g in torch_opt.param_groups for p in g["params"]]
    step = torch.tensor(float(loaded["adam_step"]), dtype=torch.float32)
    for index, p in enumerate(params):
        st = torch_opt.state[p]
        for key, value in loaded["state"].get(index, {}).items():
            _copy_into(st[key], value)
        st["step"] = step.clone()
    for group, saved in zip(torch_opt.param_groups, loaded["param_groups"]):
        for key, value in saved.items():
            if key != "params":
                group[key] = value


# ----------------------------------------------------------------------------------------------
# inference / conversion


def load_model_for_inference(load_dir: str, iteration: Optional[int] = None, device: Optional[str] = None):
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
        the checkpoint's ``config.json`` dict (its ``"model"`` without :data:`RUNTIME_CONFIG_FIELDS`;
        with ``"args"``: the saved ``args.json``).
    """
    from megatron.core import dist_checkpointing

    from megatron_lasp.models import LinearLMConfig, build_linear_lm
    from megatron_lasp.parallel.state import initialize_parallel

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
