"""Chunked lightning attention in pure PyTorch: the CPU training path (``backend="torch"``).

Forward and backward are explicit (no autograd graph is built): all blocks are processed at once
with batched matmuls, and only the cheap ``[Dk, Dv]`` state recurrences loop over blocks. The
forward keeps the state entering every block (KV-state caching); the backward reuses them for
``dq`` and runs the mirror recurrence of the state gradient for ``dk``, ``dv`` and ``d_initial_state``.
Formulas: README.md beside this file. Computation runs in fp32 (fp64 for fp64 inputs).

Packed documents (``doc_ids [B, T]``, see ``documents.py``): the decay factors of every block are
masked by "same document" (README.md, "Packed documents"); nothing else changes.
"""

from typing import Optional

import torch

__all__ = ["torch_lightning_attn_fwd_phases", "torch_lightning_attn_bwd_phases", "TORCH_BLOCK_SIZE"]

TORCH_BLOCK_SIZE = 64


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _blocks(x: torch.Tensor, n_blocks: int, block: int, cdt: torch.dtype) -> torch.Tensor:
    """[B, T, H, D] -> [B, H, N, BT, D] in ``cdt``, zero-padded at the end."""
    B, T, H, D = x.shape
    xt = x.to(cdt).transpose(1, 2)
    pad = n_blocks * block - T
    if pad:
        xt = torch.nn.functional.pad(xt, (0, 0, 0, pad))
    return xt.reshape(B, H, n_blocks, block, D)


def _unblocks(x: torch.Tensor, T: int, dtype: torch.dtype) -> torch.Tensor:
    """[B, H, N, BT, D] -> [B, T, H, D] in ``dtype``."""
    B, H, N, BT, D = x.shape
    return x.reshape(B, H, N * BT, D)[:, :, :T].transpose(1, 2).to(dtype).contiguous()


def _decays(slopes: torch.Tensor, T: int, block: int, cdt: torch.dtype):
    """Decay factors of the block form (README.md, "Chunked form").

    Returns ``mask [1, H, 1, BT, BT]`` (lam^(i-j) for i >= j), ``a [1, H, 1, BT, 1]`` (lam^(i+1)),
    ``b [1, H, N, BT, 1]`` (lam^(L_n-1-j), 0 past the block's length L_n) and
    ``block_decay [1, H, N]`` (lam^(L_n)).
    """
    n_blocks = (T + block - 1) // block
    s = slopes.to(cdt).view(-1, 1, 1)
    dev = slopes.device
    idx = torch.arange(block, device=dev, dtype=cdt)
    diff = idx[:, None] - idx[None, :]
    mask = torch.exp(-s * diff.clamp(min=0)) * (diff >= 0)
    a = torch.exp(-s[:, 0] * (idx + 1)).unsqueeze(-1)
    lengths = torch.full((n_blocks,), block, device=dev, dtype=cdt)
    lengths[-1] = T - (n_blocks - 1) * block
    expo = lengths[:, None] - 1 - idx[None, :]  # [N, BT]
    b = torch.where(expo >= 0, torch.exp(-s * expo.clamp(min=0)), torch.zeros((), device=dev, dtype=cdt))
    block_decay = torch.exp(-slopes.to(cdt)[:, None] * lengths[None, :])
    return mask[None, :, None], a[None, :, None], b.unsqueeze(-1)[None], block_decay[None]


def _gated_decays(gc: torch.Tensor, T: int, block: int):
    """The factors of :func:`_decays` for per-token gates (README.md, "Per-token gates").

    ``gc [B, H, N * BT]``: the gates' cumulative sums restarted every block (``gate.block_cumsum``,
    zero past ``T``). Every factor is ``exp`` of a non-positive difference of two of them:
    ``mask [B, H, N, BT, BT]`` (exp(G_i - G_j), i >= j), ``a [B, H, N, BT, 1]`` (exp(G_i)),
    ``b [B, H, N, BT, 1]`` (exp(G_last - G_j), 0 past ``T``), ``block_decay [B, H, N]`` (exp(G_last)).
    """
    B, H, NB = gc.shape
    n_blocks = NB // block
    G = gc.view(B, H, n_blocks, block)
    last = G[..., -1:]  # padded tokens have gate 0: the last entry is the block's total
    diff = G[..., :, None] - G[..., None, :]
    causal = torch.ones(block, block, dtype=torch.bool, device=gc.device).tril()
    mask = torch.where(causal, torch.exp(diff.clamp(max=0)), torch.zeros((), dtype=gc.dtype, device=gc.device))
    valid = (torch.arange(NB, device=gc.device) < T).view(n_blocks, block)
    b = torch.where(valid, torch.exp(last - G), torch.zeros((), dtype=gc.dtype, device=gc.device))
    return mask, torch.exp(G).unsqueeze(-1), b.unsqueeze(-1), torch.exp(last[..., 0])


def _doc_decays(decays, doc_ids: Optional[torch.Tensor], T: int, block: int, cdt: torch.dtype):
    """The factors of :func:`_decays` / :func:`_gated_decays` masked by the documents, per row
    (README.md, "Packed documents"); without ``doc_ids`` the factors unchanged.

    Returns ``mask [B|1, H, N|1, BT, BT]``, ``a [B|1, H, N|1, BT, 1]``, ``b [B|1, H, N, BT, 1]``,
    ``block_decay [B|1, H, N]``.
    """
    mask, a, b, block_decay = decays
    if doc_ids is None:
        return mask, a, b, block_decay
    B = doc_ids.shape[0]
    n_blocks = (T + block - 1) // block
    docs = doc_ids.long()
    d = torch.nn.functional.pad(docs, (0, n_blocks * block - T), value=-1).view(B, n_blocks, block)
    starts = torch.arange(n_blocks, device=docs.device) * block
    entry = docs[:, (starts - 1).clamp(min=0)]  # [B, N] document of the state entering each block
    last = docs[:, (starts + block).clamp(max=T) - 1]  # [B, N] document of each block's last token
    same = (d[:, :, :, None] == d[:, :, None, :]).to(cdt)[:, None]  # [B, 1, N, BT, BT]
    into = (d == entry[:, :, None]).to(cdt)[:, None, :, :, None]  # [B, 1, N, BT, 1]
    out = (d == last[:, :, None]).to(cdt)[:, None, :, :, None]
    through = (entry == last).to(cdt)[:, None]  # [B, 1, N]
    return mask * same, a * into, b * out, block_decay * through


def _factors(slopes, gc, doc_ids, T: int, block: int, cdt: torch.dtype):
    """The block factors of a fixed decay (``slopes``) or of gates (``gc``), documents applied."""
    decays = _decays(slopes, T, block, cdt) if gc is None else _gated_decays(gc.to(cdt), T, block)
    return _doc_decays(decays, doc_ids, T, block, cdt)


def torch_lightning_attn_fwd_phases(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slopes: torch.Tensor,
    initial_state: Optional[torch.Tensor] = None,
    block_size: int = TORCH_BLOCK_SIZE,
    doc_ids: Optional[torch.Tensor] = None,
    gc: Optional[torch.Tensor] = None,
):
    """The forward in two phases: ``(final_state, finish)``, ``finish() -> (o, block_states)``.

    Inputs already validated (``doc_ids [B, T]`` or None). ``o [B, T, H, Dv]`` in q's dtype;
    ``final_state [B, H, Dk, Dv]`` and ``block_states [B, H, N, Dk, Dv]`` (the state entering
    every block) in fp32 (fp64 for fp64 inputs). The first phase (block states and their scan) is all the final state needs; ``finish`` runs
    the output (the intra-block term and the inter term from the cached block states).
    Per-token gates: ``gc = gate.block_cumsum(g, block_size)`` and ``slopes=None``.
    """
    cdt = _compute_dtype(q.dtype)
    B, T, H, Dk = q.shape
    Dv = v.shape[-1]
    N = (T + block_size - 1) // block_size
    mask, a, b, block_decay = _factors(slopes, gc, doc_ids, T, block_size, cdt)
    kb, vb = (_blocks(x, N, block_size, cdt) for x in (k, v))

    # Local state of every block, then the sequential scan turns them into entry states in place.
    states = (b * kb).transpose(-1, -2) @ vb  # [B, H, N, Dk, Dv]
    carry = (torch.zeros(B, H, Dk, Dv, device=q.device, dtype=cdt) if initial_state is None
             else initial_state.to(cdt).clone())
    for n in range(N):
        local = states[:, :, n].clone()
        states[:, :, n] = carry
        carry = block_decay[:, :, n, None, None] * carry + local

    def finish():
        qb = _blocks(q, N, block_size, cdt)
        o = ((qb @ kb.transpose(-1, -2)) * mask) @ vb + (a * qb) @ states
        return _unblocks(o, T, q.dtype), states

    return carry, finish


def torch_lightning_attn_bwd_phases(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slopes: torch.Tensor,
    do: torch.Tensor,
    d_final_state: Optional[torch.Tensor],
    block_states: torch.Tensor,
    block_size: int = TORCH_BLOCK_SIZE,
    doc_ids: Optional[torch.Tensor] = None,
    gc: Optional[torch.Tensor] = None,
    gate_parts: bool = False,
):
    """The backward in two phases: ``(d_initial_state, finish)``, ``finish() -> (dq, dk, dv)``.

    ``gate_parts``: ``finish() -> (dq, dk, dv, dots, d_states)`` for ``gate.segment_gate_grad`` (with
    blocks as its segments): ``dots [B, H, T]`` ``q_t . dq_t - k_t . dk_t`` in the compute dtype
    before dq, dk are rounded, ``d_states [B, H, N, Dk, Dv]`` the gradient of the state leaving each block.

    Reuses the forward's ``block_states``; ``dq, dk, dv`` in their input's dtype,
    ``d_initial_state [B, H, Dk, Dv]`` in fp32 (fp64 for fp64 inputs). The first phase is the mirror scan of the state gradient (all ``d_initial_state`` needs);
    ``finish`` runs the intra-block terms and the state terms of dq, dk, dv.
    """
    cdt = _compute_dtype(q.dtype)
    B, T, H, Dk = q.shape
    Dv = v.shape[-1]
    N = (T + block_size - 1) // block_size
    mask, a, b, block_decay = _factors(slopes, gc, doc_ids, T, block_size, cdt)
    qb, dob = (_blocks(x, N, block_size, cdt) for x in (q, do))

    # Gradient of the state leaving every block, by the mirror scan from the last block.
    dstates = (a * qb).transpose(-1, -2) @ dob  # local terms, then replaced in place
    carry = (torch.zeros(B, H, Dk, Dv, device=q.device, dtype=cdt) if d_final_state is None
             else d_final_state.to(cdt).clone())
    for n in range(N - 1, -1, -1):
        local = dstates[:, :, n].clone()
        dstates[:, :, n] = carry
        carry = block_decay[:, :, n, None, None] * carry + local

    def finish():
        kb, vb = (_blocks(x, N, block_size, cdt) for x in (k, v))
        scores = (qb @ kb.transpose(-1, -2)) * mask  # [B, H, N, BT, BT]
        dscores = (dob @ vb.transpose(-1, -2)) * mask
        dq = dscores @ kb + (a * dob) @ block_states.transpose(-1, -2)
        dk = dscores.transpose(-1, -2) @ qb
        dv = scores.transpose(-1, -2) @ dob
        del scores, dscores
        dk = dk + b * (vb @ dstates.transpose(-1, -2))
        dv = dv + b * (kb @ dstates)
        grads = (_unblocks(dq, T, q.dtype), _unblocks(dk, T, k.dtype), _unblocks(dv, T, v.dtype))
        if not gate_parts:
            return grads
        dots = ((qb * dq).sum(-1) - (kb * dk).sum(-1)).reshape(B, H, N * block_size)[..., :T]
        return grads + (dots, dstates)

    return carry, finish

