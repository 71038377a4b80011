"""Chunked gated delta rule in pure PyTorch: the CPU path (``backend="torch"``).

The WY / UT-transform form of README.md ("Chunked form"): inside every chunk of ``C`` tokens the
delta rule's corrections solve one unit-lower-triangular ``[C, C]`` system, for all chunks at once
(one batched ``solve_triangular``); only the ``[Dk, Dv]`` state recurrence loops over chunks. The
backward is plain autograd through these operations. Computation runs in fp32 (fp64 for fp64
inputs).

The gate factors (``exp`` of differences of cumulative log-gates, all ``<= 0``, masked by packed
documents) are lightning attention's per-token-gate block factors (its README, "Per-token gates"
and "Packed documents"); they are taken from there, not rewritten.
"""

from typing import Optional, Tuple

import torch

from megatron_lasp.ops.lightning_attn.gate import block_cumsum
from megatron_lasp.ops.lightning_attn.torch_chunk import _blocks, _factors, _unblocks

__all__ = ["torch_chunk_gated_delta_rule", "CHUNK_SIZE"]

CHUNK_SIZE = 64


def torch_chunk_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float,
    initial_state: Optional[torch.Tensor] = None,
    doc_ids: Optional[torch.Tensor] = None,
    chunk_size: int = CHUNK_SIZE,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Gated delta rule by chunks, differentiable by autograd. Inputs already validated.

    Args:
        q, k: ``[B, T, H, Dk]``; v: ``[B, T, H, Dv]``; g, beta: ``[B, T, H]``.
        scale: the factor of ``q``.
        initial_state: ``[B, H, Dk, Dv]`` or None (zeros).
        doc_ids: ``[B, T]`` document ids of packed documents (``documents.py``), or None.
        chunk_size: tokens per chunk (the last chunk may be shorter).

    Returns:
        ``(o [B, T, H, Dv] in q's dtype, final_state [B, H, Dk, Dv] fp32, fp64 for fp64 inputs)``.
    """
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    B, T, H, Dk = q.shape
    Dv = v.shape[-1]
    C = chunk_size
    N = -(-T // C)
    # [B|1, H, N, C, C] exp(G_i - G_j) for i >= j, [.., C, 1] exp(G_i), exp(G_last - G_j), [B, H, N] exp(G_last),
    # every one masked by "same document"
    M, a, b, through = _factors(None, block_cumsum(g, C, cdt), doc_ids, T, C, cdt)
    qb = _blocks(q, N, C, cdt) * scale  # [B, H, N, C, Dk]
    kb = _blocks(k, N, C, cdt)
    vb = _blocks(v, N, C, cdt)  # [B, H, N, C, Dv]
    betab = _blocks(beta.unsqueeze(-1), N, C, cdt)  # [B, H, N, C, 1], 0 on padded tokens

    # (I + A) U = diag(beta) V - diag(beta a) K S: solved once for both right-hand sides, so that
    # U = u_loc - w S for whatever state S enters the chunk (README.md, (4)-(6)).
    A = betab * (kb @ kb.transpose(-1, -2)) * M.tril(-1)  # [B, H, N, C, C] strictly lower
    rhs = torch.cat([betab * vb, (betab * a) * kb], dim=-1)
    sol = torch.linalg.solve_triangular(A, rhs, upper=False, unitriangular=True)  # the unit diagonal is implied
    u_loc, w = sol.split([Dv, Dk], dim=-1)  # [B, H, N, C, Dv], [B, H, N, C, Dk]
    bk_t = (b * kb).transpose(-1, -2)  # [B, H, N, Dk, C]

    state = (torch.zeros(B, H, Dk, Dv, device=q.device, dtype=cdt) if initial_state is None
             else initial_state.to(cdt))
    entering, corrections = [], []
    for n in range(N):
        entering.append(state)
        u = u_loc[:, :, n] - w[:, :, n] @ state  # [B, H, C, Dv]
        corrections.append(u)
        state = through[:, :, n, None, None] * state + bk_t[:, :, n] @ u
    S = torch.stack(entering, dim=2)  # [B, H, N, Dk, Dv]
    U = torch.stack(corrections, dim=2)
    o = ((qb @ kb.transpose(-1, -2)) * M) @ U + (a * qb) @ S
    return _unblocks(o, T, q.dtype), state
