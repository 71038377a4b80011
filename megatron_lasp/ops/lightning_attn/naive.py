"""Plain PyTorch references for lightning attention (the ground truth of every test).

Both functions compute, per batch row and head, with ``lam = exp(-slopes[h])``::

    o_t = sum_{s <= t} lam^(t-s) (q_t . k_s) v_s + lam^(t+1) q_t S_0
    S_T = lam^T S_0 + sum_s lam^(T-1-s) k_s^T v_s

They run in fp32 (fp64 when the inputs are fp64), are differentiable through plain autograd and
are written for clarity, not speed: the recurrent form loops over tokens, the chunked form over
blocks without any state caching.

The recurrent form also takes per-token gates ``g [B, T, H]`` (``S_t = exp(g_t) S_{t-1} + k_t^T v_t``,
the fixed decay being ``g = -slope``): the ground truth of the gated kernels, ``dg`` included.

Packed documents (``cu_seqlens``, see ``documents.py``): the state is zeroed before the first
token of every document except a row's first; the initial state feeds only the first document of
each row and the final state is the one after the row's last document.
"""

from typing import Optional, Tuple

import torch

from .documents import check_cu_seqlens, doc_ids_from_cu_seqlens

__all__ = ["naive_recurrent_lightning_attn", "naive_chunk_lightning_attn"]


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _doc_ids(cu_seqlens, B: int, T: int, device) -> Optional[torch.Tensor]:
    if cu_seqlens is None:
        return None
    check_cu_seqlens(cu_seqlens, B * T, device, values=True, where="naive lightning attention")
    return doc_ids_from_cu_seqlens(cu_seqlens, B, T, device)


def naive_recurrent_lightning_attn(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slopes: torch.Tensor,
    initial_state: Optional[torch.Tensor] = None,
    output_final_state: bool = False,
    cu_seqlens: Optional[torch.Tensor] = None,
    *,
    g: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Token-by-token recurrence ``S_t = lam S_{t-1} + k_t^T v_t``, ``o_t = q_t S_t``.

    With ``g`` (per-token gates) the factor of token ``t`` is ``exp(g[:, t, h])`` instead of
    ``lam_h``; ``g`` may require a gradient (plain autograd through the loop).

    Args:
        q, k: ``[B, T, H, Dk]``; v: ``[B, T, H, Dv]``.
        slopes: ``[H]``, decay ``lam_h = exp(-slopes[h])``; None with ``g``.
        initial_state: ``[B, H, Dk, Dv]`` or None (zeros).
        output_final_state: also return ``S_T``.
        cu_seqlens: document starts ``[N + 1]`` over the ``B * T`` tokens, or None (one document
            per row); the state restarts at each document start.
        g: ``[B, T, H]`` log-decays (``<= 0``), or None (fixed decay ``slopes``).

    Returns:
        ``(o [B, T, H, Dv] in q's dtype, final state [B, H, Dk, Dv] fp32/fp64 or None)``.
    """
    cdt = _compute_dtype(q.dtype)
    B, T, H, Dk = q.shape
    Dv = v.shape[-1]
    qf, kf, vf = q.to(cdt), k.to(cdt), v.to(cdt)
    if (g is None) == (slopes is None):
        raise ValueError("naive lightning attention: give slopes or g (with slopes=None)")
    if g is None:
        lam = torch.exp(-slopes.to(cdt)).view(1, H, 1, 1)
    else:
        lam_t = torch.exp(g.to(cdt))  # [B, T, H]
    if initial_state is None:
        state = q.new_zeros(B, H, Dk, Dv, dtype=cdt)
    else:
        state = initial_state.to(cdt)
    docs = _doc_ids(cu_seqlens, B, T, q.device)
    outs = []
    for t in range(T):
        if docs is not None and t > 0:
            keep = (docs[:, t] == docs[:, t - 1]).to(cdt).view(B, 1, 1, 1)
            state = state * keep
        decay = lam if g is None else lam_t[:, t, :, None, None]
        state = decay * state + kf[:, t, :, :, None] * vf[:, t, :, None, :]
        outs.append(torch.einsum("bhk,bhkv->bhv", qf[:, t], state))
    o = torch.stack(outs, dim=1).to(q.dtype)
    return o, (state if output_final_state else None)


def naive_chunk_lightning_attn(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slopes: torch.Tensor,
    initial_state: Optional[torch.Tensor] = None,
    output_final_state: bool = False,
    chunk_size: int = 16,
    cu_seqlens: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Block form: masked intra-block attention plus the inter-block term from the running state.

    Same arguments and returns as :func:`naive_recurrent_lightning_attn`; ``chunk_size`` is the
    block length (the last block may be shorter). With documents, every decay factor is also
    masked by "same document": ``M_ij`` by doc(i) == doc(j), ``a_i`` by doc(i) == the document
    of the state entering the block, ``b_j`` by doc(j) == doc(last token), ``lam^L`` by the
    entering and the last document being one.
    """
    cdt = _compute_dtype(q.dtype)
    B, T, H, Dk = q.shape
    Dv = v.shape[-1]
    qf, kf, vf = (x.to(cdt).transpose(1, 2) for x in (q, k, v))  # [B, H, T, D]
    s = slopes.to(cdt).view(1, H, 1, 1)
    state = q.new_zeros(B, H, Dk, Dv, dtype=cdt) if initial_state is None else initial_state.to(cdt)
    docs = _doc_ids(cu_seqlens, B, T, q.device)
    outs = []
    for start in range(0, T, chunk_size):
        L = min(chunk_size, T - start)
        qc, kc, vc = (x[:, :, start:start + L] for x in (qf, kf, vf))
        idx = torch.arange(L, device=q.device, dtype=cdt)
        diff = idx[:, None] - idx[None, :]
        mask = torch.exp(-s * diff.clamp(min=0)) * (diff >= 0)  # [1, H, L, L]
        a = torch.exp(-s * (idx + 1).view(1, 1, L, 1))  # decay of the incoming state at token i
        b = torch.exp(-s * (L - 1 - idx).view(1, 1, L, 1))  # decay of token j to the block end
        across = torch.exp(-s * L)
        if docs is not None:
            d = docs[:, start:start + L]  # [B, L]
            entry = docs[:, max(start - 1, 0)]  # the document of the entering state
            last = d[:, -1]
            mask = mask * (d[:, :, None] == d[:, None, :]).to(cdt)[:, None]
            a = a * (d == entry[:, None]).to(cdt)[:, None, :, None]
            b = b * (d == last[:, None]).to(cdt)[:, None, :, None]
            across = across * (entry == last).to(cdt).view(B, 1, 1, 1)
        intra = ((qc @ kc.transpose(-1, -2)) * mask) @ vc
        outs.append(intra + a * (qc @ state))
        state = across * state + (b * kc).transpose(-1, -2) @ vc
    o = torch.cat(outs, dim=2).transpose(1, 2).to(q.dtype)
    return o, (state if output_final_state else None)

