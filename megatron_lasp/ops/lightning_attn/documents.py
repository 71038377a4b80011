"""Packed documents: ``cu_seqlens`` -> per-token document ids, and their checks.

Convention (flash-attention's): ``cu_seqlens`` is a 1-d int32/int64 tensor ``[N_docs + 1]`` of
document starts in the tokens of the rows laid end to end (``q.reshape(B * T, ...)``), first 0,
last ``B * T``, non-decreasing (an empty document is allowed and has no effect). For ``B = 1`` this
is exactly flash-attention's packed layout. A row start is always a document start: rows never
share a state, listed or not.

The kernels take the equivalent per-token form, ``doc_ids [B, T]`` int32: the index of the
document that token ``(b, t)`` belongs to (non-decreasing along a row). Tokens of one row with
equal ids share a document. The recurrent state restarts (is zeroed) before the first token of
every document but the row's first, which is the one the initial state feeds.
"""

from __future__ import annotations

from typing import Optional

import torch

__all__ = ["doc_ids_from_cu_seqlens", "check_cu_seqlens", "check_doc_ids", "cu_seqlens_from_position_ids"]


def check_cu_seqlens(cu_seqlens, total: int, device: torch.device, values: Optional[bool] = None,
                     where: str = "lightning attention") -> None:
    """Raise ``ValueError`` unless ``cu_seqlens`` is a valid offsets tensor over ``total`` tokens.

    Args:
        cu_seqlens: the offsets.
        total: the number of tokens they cover (``B * T``, or ``B * T_global`` under sequence
            parallelism).
        device: the device of the inputs; ``cu_seqlens`` may be there or on the CPU.
        values: also check the values (first 0, last ``total``, non-decreasing). Default: only
            when ``cu_seqlens`` is on the CPU (on a GPU the check would synchronise the host).
        where: the caller's name for the message.
    """
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"{where}: cu_seqlens must be a 1-d tensor [N_docs + 1] of document starts "
                         f"(first 0, last {total}), got {getattr(cu_seqlens, 'shape', type(cu_seqlens))}")
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{where}: cu_seqlens must be int32 or int64, got {cu_seqlens.dtype}")
    if cu_seqlens.device.type != "cpu" and cu_seqlens.device != device:
        raise ValueError(f"{where}: cu_seqlens is on {cu_seqlens.device} but q is on {device}; "
                         "put it on q's device or the CPU")
    if values is None:
        values = cu_seqlens.device.type == "cpu"
    if values:
        cu = cu_seqlens.detach().cpu()
        if int(cu[0]) != 0 or int(cu[-1]) != total:
            raise ValueError(f"{where}: cu_seqlens must start at 0 and end at the number of tokens {total} "
                             f"(B x T of the rows laid end to end), got first {int(cu[0])}, last {int(cu[-1])}")
        if bool((cu[1:] < cu[:-1]).any()):
            raise ValueError(f"{where}: cu_seqlens must be non-decreasing (document starts in order)")


def doc_ids_from_cu_seqlens(cu_seqlens: torch.Tensor, B: int, T: int, device: torch.device) -> torch.Tensor:
    """``doc_ids [B, T]`` int32 on ``device``: the document of each token (no host synchronisation)."""
    cu = cu_seqlens.to(device=device, non_blocking=True)
    flat = torch.arange(B * T, device=device, dtype=cu.dtype)
    # the document of token p = the number of later starts cu[1:] that are <= p (two launches)
    return torch.searchsorted(cu[1:], flat, right=True, out_int32=True).view(B, T)


def check_doc_ids(doc_ids, B: int, T: int, device: torch.device, where: str = "lightning attention") -> None:
    """Shape, dtype and device of a ``doc_ids`` tensor (values are trusted: non-decreasing per row)."""
    if not isinstance(doc_ids, torch.Tensor) or tuple(doc_ids.shape) != (B, T):
        raise ValueError(f"{where}: doc_ids must be [B, T] = {(B, T)}, got {getattr(doc_ids, 'shape', type(doc_ids))}")
    if doc_ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{where}: doc_ids must be an int32 or int64 tensor, got {doc_ids.dtype}")
    if doc_ids.device != device:
        raise ValueError(f"{where}: doc_ids is on {doc_ids.device} but q is on {device}")


def cu_seqlens_from_position_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """Offsets (int32, on the ids' device) of the documents of rows whose positions restart at 0.

    A token with position 0 starts a document (what packing collators produce); every row start
    is a document start too. ``position_ids [B, T]``; the result indexes the ``B * T`` tokens.
    """
    B, T = position_ids.shape
    starts = position_ids == 0
    starts[:, 0] = True
    flat = torch.nonzero(starts.reshape(-1), as_tuple=False).view(-1)
    end = torch.full((1,), B * T, dtype=flat.dtype, device=flat.device)
    return torch.cat([flat, end]).to(torch.int32)
