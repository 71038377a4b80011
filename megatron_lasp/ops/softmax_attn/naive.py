"""Plain PyTorch reference for causal softmax attention (the ground truth of the tests).

One document at a time, an explicit ``softmax(q k^T scale + causal mask) v`` in the inputs' dtype
(run it in fp64), differentiable through plain autograd; no library kernel involved.
"""

from typing import Optional

import torch

from megatron_lasp.ops.lightning_attn.documents import check_cu_seqlens

__all__ = ["naive_softmax_attn"]


def naive_softmax_attn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       cu_seqlens: Optional[torch.Tensor] = None, scale: Optional[float] = None) -> torch.Tensor:
    """Causal softmax attention of whole rows (``Tq = Tk = T``), document by document.

    Args:
        q: ``[B, T, Hq, D]``; k: ``[B, T, Hkv, D]``; v: ``[B, T, Hkv, Dv]``; ``Hq % Hkv == 0``
            (query head ``h`` reads key/value head ``h // (Hq / Hkv)``).
        cu_seqlens: document starts over the ``B * T`` tokens laid end to end (flash-attention's
            convention, see ``ops/lightning_attn/documents.py``), or None (one document per row).
        scale: the logit scale, default ``D ** -0.5``.

    Returns:
        ``o [B, T, Hq, Dv]``.
    """
    B, T, Hq, D = q.shape
    group = Hq // k.shape[2]
    scale = D ** -0.5 if scale is None else scale
    starts = {b * T for b in range(B)}  # a row start is always a document start
    if cu_seqlens is not None:
        check_cu_seqlens(cu_seqlens, B * T, q.device, values=True, where="naive softmax attention")
        starts |= set(cu_seqlens.tolist())
    starts = sorted(starts | {B * T})
    flat = [x.reshape(B * T, *x.shape[2:]) for x in (q, k, v)]
    outs = []
    for s, e in zip(starts[:-1], starts[1:]):
        if e == s:
            continue
        qd, kd, vd = (x[s:e].transpose(0, 1) for x in flat)  # [H, n, D]
        kd, vd = kd.repeat_interleave(group, 0), vd.repeat_interleave(group, 0)
        logits = torch.matmul(qd, kd.transpose(1, 2)) * scale
        n = e - s
        future = torch.ones(n, n, dtype=torch.bool, device=q.device).triu(1)
        p = torch.softmax(logits.masked_fill(future, float("-inf")), dim=-1)
        outs.append(torch.matmul(p, vd).transpose(0, 1))  # [n, Hq, Dv]
    return torch.cat(outs).view(B, T, Hq, v.shape[-1])
