"""Selective recompute of elementwise outputs: free them after the forward, refill before use.

An elementwise op's output that the next matmul saves for its weight gradient (a norm's output
before ``linear_qkv`` / ``linear_fc1``, the GLU product before ``linear_fc2``, the gated norm
before ``linear_proj``) costs activation memory but is cheap to recompute from tensors that stay
saved anyway (the op's own inputs). :func:`mark_recomputable` tags the output with the recipe;
:func:`discard_until_backward`, called once the consumer has run, frees the output's storage and
registers a pre-hook on the consumer's autograd node that recomputes the values into the same
storage right before that node's backward reads them. Nothing else changes: the same kernels run
on the same inputs, so the gradients are bit-identical to those of a run that keeps the output.

A recipe that can write into a given tensor (the fused kernels: ``recompute(into)`` writes the
values into ``into`` and returns it) refills the storage in place; any other is refilled with a
storage-level copy of the values it returns, as megatron-core's ``CheckpointWithoutOutput`` does.
Neither bumps the version counter, so autograd's saved-tensor checks still pass. A copy reads and
writes the whole tensor again: at 128K tokens of TNL-1B (per layer three ``[T, 2048]`` outputs and
the ``[T, 5632]`` GLU product) about 6 GB a layer, some 28 ms of a step on an H200, where its
profile (1625 ms a step) had 34 ms of device-to-device copies.
"""

from __future__ import annotations

from typing import Callable

import torch

__all__ = ["mark_recomputable", "discard_until_backward"]

_ATTR = "_megatron_lasp_recompute"


def mark_recomputable(out: torch.Tensor, recompute: Callable[..., torch.Tensor],
                      writes_into: bool = False) -> torch.Tensor:
    """Tag ``out`` with ``recompute()``, which returns its values again (called under no_grad);
    ``writes_into``: ``recompute(into)`` writes them into the tensor ``into`` (``out``'s shape,
    dtype and dense layout) and returns it, or returns a new tensor where it cannot."""
    if torch.is_grad_enabled() and out.requires_grad:
        setattr(out, _ATTR, (recompute, writes_into))
    return out


def _copy_into(storage: torch.UntypedStorage, values: torch.Tensor) -> None:
    """The refill of a recipe that returned new values: one storage-level copy."""
    storage.copy_(values.untyped_storage())


def _plain(t: torch.Tensor) -> bool:
    """Whether ``t`` owns its whole storage densely (so a storage copy restores it exactly)."""
    return (t.is_contiguous() and t.storage_offset() == 0
            and t.untyped_storage().nbytes() == t.numel() * t.element_size())


def discard_until_backward(out: torch.Tensor, consumer_output: torch.Tensor, *more_consumer_outputs) -> bool:
    """Free ``out`` (tagged by :func:`mark_recomputable`) until the backward of the op that made
    ``consumer_output`` from it; returns whether it was discarded.

    Call it after the consumer's forward, when nothing else will read ``out`` in the forward.
    Untagged tensors, tensors that do not own a dense storage and consumers without an autograd
    node are left alone. With several consumers (``more_consumer_outputs``: e.g. a gated layer's
    q/k/v and gate projections of one normed input), the first of their backwards to run refills.
    """
    recipe = getattr(out, _ATTR, None)
    nodes = [getattr(t, "grad_fn", None) for t in (consumer_output, *more_consumer_outputs)]
    if recipe is None or None in nodes or not _plain(out):
        return False
    delattr(out, _ATTR)
    nbytes = out.untyped_storage().nbytes()
    pending = [out, recipe]

    def refill(_grad_outputs):
        target, recipe = pending
        if target is None:  # another consumer's backward refilled it
            return None
        pending[0] = pending[1] = None
        fn, writes_into = recipe
        storage = target.untyped_storage()
        storage.resize_(nbytes)
        with torch.no_grad():
            values = fn(target) if writes_into else fn()
        if values is target:
            return None
        values = values.contiguous()
        assert values.shape == target.shape and values.dtype == target.dtype, "recompute changed the tensor"
        _copy_into(storage, values)
        return None

    for node in nodes:
        node.register_prehook(refill)
    out.untyped_storage().resize_(0)
    return True
