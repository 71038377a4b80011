"""Between a live training state and a checkpoint's tensors: the model inside its data-parallel
wrappers, FSDP2's shards gathered into full tensors and scattered back, torch AdamW's state as
tensors sharded like their parameters, and every rank's RNG states.

Checkpoints hold full (un-FSDP-sharded) tensors, TP/PP-sharded as without FSDP, so a load may
change the data-parallel implementation's sharding freely.
"""

from __future__ import annotations

import contextlib
import random
from typing import Any, Dict, Iterator, Tuple

import numpy as np
import torch
from megatron.core.dist_checkpointing.optimizer import get_param_id_to_sharded_param_map, optim_state_to_sharding_state
from megatron.core.tensor_parallel import random as mpu_random
from torch.distributed.fsdp import FSDPModule

from megatron_lasp.checkpoint.layout import CheckpointError

# ----------------------------------------------------------------------------------------------
# wrappers


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside torch DDP / megatron DDP / Float16Module wrappers (FSDP2 wraps in place)."""
    while hasattr(model, "module") and isinstance(getattr(model, "module"), torch.nn.Module):
        model = model.module
    return model


def fsdp_reshard(model: torch.nn.Module) -> None:
    """Put every FSDP2 module back in the sharded state.

    A forward without backward (evaluation) leaves the root module's parameters unsharded; the
    checkpoint code needs the sharded parameters (the ones the optimizer holds).
    """
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def torch_optimizers(optimizer) -> Iterator[Tuple[Any, Any]]:
    """``(sub, inner)`` for each optimizer of a megatron-core optimizer (chained or not): the
    megatron-core wrapper and the torch optimizer it drives. A torch optimizer is both."""
    for sub in getattr(optimizer, "chained_optimizers", [optimizer]):
        yield sub, getattr(sub, "optimizer", sub)


# ----------------------------------------------------------------------------------------------
# FSDP2


def is_dtensor(t) -> bool:
    """Whether ``t`` is a DTensor (an FSDP2 shard)."""
    return hasattr(t, "full_tensor") and hasattr(t, "device_mesh")


@contextlib.contextmanager
def full_parameters(module: torch.nn.Module):
    """Temporarily replace FSDP2's sharded parameters by full copies; yields ``{id(sharded): full}``.

    Collective over the FSDP mesh (all ranks of dp_cp must enter together).
    """
    swapped = []
    mapping = {}
    for sub in module.modules():
        for name, p in list(sub._parameters.items()):
            if p is not None and is_dtensor(p):
                full = torch.nn.Parameter(p.full_tensor().detach().clone(), requires_grad=p.requires_grad)
                mapping[id(p)] = full
                swapped.append((sub, name, p))
                sub._parameters[name] = full
    try:
        yield mapping
    finally:
        for sub, name, p in swapped:
            sub._parameters[name] = p


def gathered(model: torch.nn.Module, fsdp: bool):
    """:func:`full_parameters` of the unwrapped ``model`` when ``fsdp`` (after :func:`fsdp_reshard`),
    else a context yielding ``{}``."""
    if fsdp:
        fsdp_reshard(model)
        return full_parameters(unwrap_model(model))
    return contextlib.nullcontext({})


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


def copy_into(target: torch.Tensor, value: torch.Tensor) -> None:
    """Copy the full ``value`` into ``target`` (this rank's chunk when ``target`` is an FSDP2 shard)."""
    with torch.no_grad():
        if is_dtensor(target):
            target.to_local().copy_(_local_chunk(value.to(target.device), target))
        else:
            target.copy_(value)


def load_fsdp_model(module: torch.nn.Module, loaded: Dict[str, Any]) -> None:
    """Copy full loaded tensors into FSDP2's parameter shards (its load_state_dict wants DTensors)."""
    params = dict(module.named_parameters())
    buffers = dict(module.named_buffers())
    missing = sorted(set(params) - set(loaded))
    if missing:
        raise CheckpointError(f"checkpoint lacks parameters {missing[:3]}")
    for key, value in loaded.items():
        if key in params:
            copy_into(params[key], value)
        elif key in buffers and torch.is_tensor(value):
            with torch.no_grad():
                buffers[key].copy_(value)
        elif not key.endswith("_extra_state"):
            raise CheckpointError(f"unexpected checkpoint entry {key!r} for this model")


# ----------------------------------------------------------------------------------------------
# optimizer state


def torch_optimizer_sharded(opt, model_sd, full_map, for_loading: bool) -> Dict[str, Any]:
    """torch AdamW state as ShardedTensors laid out like the model's parameters.

    Args:
        opt: the loop's torch optimizer wrapper (``.optimizer``: the torch AdamW).
        model_sd: the model's ``sharded_state_dict()``.
        full_map: ``{id(FSDP2 shard): full parameter}`` (:func:`full_parameters`), or ``{}``.
        for_loading: make templates for state a fresh optimizer lacks.
    """
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
            if is_dtensor(value):
                s[key] = value.full_tensor() if not for_loading else torch.empty(value.shape, dtype=value.dtype,
                                                                                  device=value.to_local().device)
    id_map = get_param_id_to_sharded_param_map(model_sd, [full_map.get(id(p), p) for p in params])
    optim_state_to_sharding_state(sd, id_map)
    sd["adam_step"] = max(steps) if steps else 0.0
    return sd


def load_torch_optimizer(opt, loaded: Dict[str, Any]) -> None:
    """Restore :func:`torch_optimizer_sharded`'s loaded state into the torch AdamW (FSDP2 shards included)."""
    torch_opt = opt.optimizer
    params = [p for g in torch_opt.param_groups for p in g["params"]]
    step = torch.tensor(float(loaded["adam_step"]), dtype=torch.float32)
    for index, p in enumerate(params):
        st = torch_opt.state[p]
        for key, value in loaded["state"].get(index, {}).items():
            copy_into(st[key], value)
        st["step"] = step.clone()
    for group, saved in zip(torch_opt.param_groups, loaded["param_groups"]):
        for key, value in saved.items():
            if key != "params":
                group[key] = value


def init_megatron_optimizer_state(optimizer) -> None:
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


# ----------------------------------------------------------------------------------------------
# RNG


def rng_state() -> Dict[str, Any]:
    """This process's RNG states: Python, NumPy, torch (CPU, CUDA) and megatron-core's tracker."""
    return {
        "random": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "tracker": mpu_random.get_cuda_rng_tracker().get_states(),
    }


def set_rng_state(state: Dict[str, Any]) -> None:
    """Restore :func:`rng_state`'s states."""
    random.setstate(state["random"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    mpu_random.get_cuda_rng_tracker().set_states(state["tracker"])
