"""Per-token gates (data-dependent decay): checks, cumulative log-decays and the gate's gradient.

The gated recurrence (README.md, "Per-token gates"), per batch row ``b`` and head ``h``::

    S_t = exp(g_t) S_{t-1} + k_t^T v_t,     o_t = q_t S_t,     g_t = g[b, t, h] <= 0

The fixed decay is ``g = -slope``. Everything here works in log space: a decay over a span is
``exp`` of a sum of gates, and every sum is formed relative to the anchor it is measured from (the
slice start for ``a``, the slice end for ``b``), so only ``exp`` of non-positive numbers is taken.

What the sequence-parallel modes use (state + how a slice transforms it), for a slice of ``C``
tokens whose state ``S_in`` comes from the left:

    S_out = across * S_in + S_loc           o_t += a_t q_t S_in         (S_in reaches the first document)
    dS_in = across * dS_out + dS_loc        dk_t += b_t v_t dS_out^T,   dv_t += b_t k_t dS_out

with :class:`SliceGate` giving ``log a``, ``log b`` and ``log across`` per row and head (documents
included), and :func:`gate_grad` the gradient of ``g`` from the slice's total ``dq``, ``dk`` and its
final state and final-state gradient. The single-device op computes the same gradient with
:func:`segment_gate_grad`, from sums inside its segments (README.md, "Gradient of the gates", (14)).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch

__all__ = ["check_gate", "block_cumsum", "SliceGate", "gate_grad", "segment_gate_grad", "reverse_cumsum_docs"]


def check_gate(g, q: torch.Tensor, slopes) -> None:
    """Raise ``ValueError`` unless exactly one of ``slopes`` / ``g`` is given and ``g`` fits ``q``
    (shape, device; values ``<= 0`` when on the CPU)."""
    if (g is None) == (slopes is None):
        raise ValueError("lightning attention: give either slopes [H] (fixed decay) or g [B, T, H] "
                         "(per-token log-decay) with slopes=None, not both and not neither")
    if g is None:
        return
    B, T, H = q.shape[:3]
    if not isinstance(g, torch.Tensor) or tuple(g.shape) != (B, T, H) or not g.is_floating_point():
        raise ValueError(f"lightning attention: g must be a float tensor [B, T, H] = {(B, T, H)} of log-decays "
                         f"(<= 0), got {getattr(g, 'shape', type(g))}")
    if g.device != q.device:
        raise ValueError(f"lightning attention: g is on {g.device} but q is on {q.device}; move all inputs to one device")
    # Values only on the CPU: on a GPU the check would synchronise the host (as for cu_seqlens).
    if g.device.type == "cpu" and bool((g.detach() > 0).any()):
        raise ValueError("lightning attention: g holds positive values; it must be a log-decay <= 0 "
                         "(e.g. -softplus(x) or logsigmoid(x))")


def _cdt(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def block_cumsum(g: torch.Tensor, block: int, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Inclusive cumulative sum of ``g [B, T, H]`` restarted every ``block`` tokens: ``[B, H, N * block]``.

    Computed in fp32 (fp64 for fp64 ``g``, or ``dtype``); zero-padded past ``T`` (a padded token
    has gate 0, so the last value of every block is its total log-decay). The kernels form every
    decay inside a block as ``exp`` of a difference of these (README.md, "Per-token gates").
    """
    B, T, H = g.shape
    n = -(-T // block)
    x = g.to(dtype or _cdt(g.dtype)).transpose(1, 2)
    if n * block != T:
        x = torch.nn.functional.pad(x, (0, n * block - T))
    return x.reshape(B, H, n, block).cumsum(-1).reshape(B, H, n * block)


def _first_last_masks(doc_ids: Optional[torch.Tensor], B: int, C: int, device):
    """``(in_first [B, 1, C], in_last [B, 1, C], one_doc [B, 1])`` bool, or Nones without documents."""
    if doc_ids is None:
        return None, None, None
    d = doc_ids.long()
    in_first = (d == d[:, :1])[:, None]
    in_last = (d == d[:, -1:])[:, None]
    return in_first, in_last, (d[:, 0] == d[:, -1])[:, None]


@dataclasses.dataclass(frozen=True)
class SliceGate:
    """How a slice of ``C`` tokens transforms a state that crosses it, in log space (fp32 or fp64).

    Attributes:
        log_a: ``[B, H, C]``, ``G_t = sum_{u <= t} g_u``: the log weight of the state entering the
            slice at token ``t`` (``-inf`` past the slice's first document).
        log_b: ``[B, H, C]``, ``sum_{u > t} g_u``: the log weight of token ``t`` in the state
            leaving the slice (``-inf`` before its last document's start).
        log_across: ``[B, H]``, ``sum_u g_u``: the log-decay of a state carried through the whole
            slice (``-inf`` if the slice holds a document start past its first token).

    ``a``, ``b``, ``across`` are their ``exp`` (the fixed-decay ``decay_powers`` / ``state_decay``
    per row). ``log_a`` is summed from the left end, ``log_b`` from the right end, so neither is
    a difference of two large sums.
    """

    log_a: torch.Tensor
    log_b: torch.Tensor
    log_across: torch.Tensor

    @classmethod
    def of(cls, g: torch.Tensor, doc_ids: Optional[torch.Tensor] = None) -> "SliceGate":
        """From ``g [B, C, H]`` and this slice's ``doc_ids [B, C]`` (or None: one document)."""
        B, C, H = g.shape
        x = g.to(_cdt(g.dtype)).transpose(1, 2)  # [B, H, C]
        log_a = x.cumsum(-1)
        # exclusive suffix sums: sum_{u > t} g_u, anchored at the right end
        log_b = torch.nn.functional.pad(x.flip(-1).cumsum(-1).flip(-1)[..., 1:], (0, 1))
        log_across = log_a[..., -1]
        in_first, in_last, one_doc = _first_last_masks(doc_ids, B, C, g.device)
        if in_first is not None:
            ninf = torch.tensor(float("-inf"), dtype=x.dtype, device=x.device)
            log_a = torch.where(in_first, log_a, ninf)
            log_b = torch.where(in_last, log_b, ninf)
            log_across = torch.where(one_doc, log_across, ninf)
        return cls(log_a, log_b, log_across)

    @property
    def a(self) -> torch.Tensor:
        return torch.exp(self.log_a)

    @property
    def b(self) -> torch.Tensor:
        return torch.exp(self.log_b)

    @property
    def across(self) -> torch.Tensor:
        return torch.exp(self.log_across)


_SCAN_BLOCK = 1024


def _suffix_sums(x: torch.Tensor) -> torch.Tensor:
    """``R[b, h, t] = sum_{u >= t} x[b, u, h]`` in fp64, ``[B, H, T]``, for ``x [B, T, H]``.

    In two levels along a contiguous last dimension: suffix sums inside blocks of ``_SCAN_BLOCK``
    tokens, then over the blocks' totals. A scan along ``T`` of a ``[B, T, H]`` tensor would run
    one GPU thread per ``(b, h)`` through all ``T`` tokens (milliseconds at 128K tokens).
    """
    B, T, H = x.shape
    n = -(-T // _SCAN_BLOCK)
    y = torch.nn.functional.pad(x.double().transpose(1, 2), (0, n * _SCAN_BLOCK - T))
    inside = y.reshape(B, H, n, _SCAN_BLOCK).flip(-1).cumsum(-1).flip(-1)
    totals = inside[..., 0]  # [B, H, n]
    later = totals.flip(-1).cumsum(-1).flip(-1) - totals  # the blocks after each block
    return (inside + later[..., None]).reshape(B, H, n * _SCAN_BLOCK)[..., :T]


def _stop_at_documents(y: torch.Tensor, doc_ids: torch.Tensor, end):
    """``(y', reach)`` for suffix sums ``y [B, H, T]`` (fp64) whose sum for token ``t`` runs up to
    ``end[t]`` (exclusive; an int for every token, or ``[T]``): ``y'`` stops at the end of ``t``'s
    document as well, ``y'_t = y_t - y_stop`` with ``stop = min(first token of the next document,
    end[t])`` (``y_T = 0``); ``reach [B, 1, T]``: ``t``'s document lasts up to ``end[t]`` (then
    ``y'_t = y_t``)."""
    B, H, T = y.shape
    d = doc_ids.long().contiguous()
    nxt = torch.searchsorted(d, d, right=True)  # [B, T]: the first token of the next document (or T)
    reach = nxt >= end
    stop = nxt.clamp(max=end)
    after = torch.gather(torch.nn.functional.pad(y, (0, 1)), 2, stop[:, None, :].expand(B, H, T))
    return torch.where(reach[:, None], y, y - after), reach[:, None]


def reverse_cumsum_docs(x: torch.Tensor, doc_ids: Optional[torch.Tensor]) -> torch.Tensor:
    """``y[b, t, h] = sum_{u >= t, doc(u) = doc(t)} x[b, u, h]`` for ``x [B, T, H]`` (fp64 inside).

    The suffix sum restarts at every document end: ``y_t = R_t - R_{e(t)}`` with ``R`` the row's
    suffix sum and ``e(t)`` the first token of the next document (``R_T = 0``); fp64 keeps the
    difference exact to the output's precision.
    """
    r = _suffix_sums(x)
    if doc_ids is not None:
        r = _stop_at_documents(r, doc_ids, x.shape[1])[0]
    return r.transpose(1, 2).to(x.dtype)


def gate_grad(
    q: torch.Tensor,
    dq: torch.Tensor,
    k: torch.Tensor,
    dk: torch.Tensor,
    doc_ids: Optional[torch.Tensor] = None,
    final_state: Optional[torch.Tensor] = None,
    d_final_state: Optional[torch.Tensor] = None,
    dots: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """The gradient of the gates, ``dg [B, T, H]`` fp32 (fp64 for fp64 inputs).

    ``dg_s = sum_{t >= s, doc(t) = doc(s)} (q_t . dq_t - k_t . dk_t)  +  [s in the last document] <dS_T, S_T>``
    (README.md, "Gradient of the gates"). ``dq``, ``dk`` must be the total gradients of the slice
    (initial-state and final-state terms included) and ``final_state`` / ``d_final_state`` its
    total final state ``S_T`` and its gradient (both None when there is none).

    Args:
        q, dq, k, dk: ``[B, T, H, Dk]``.
        doc_ids: ``[B, T]`` document ids, or None.
        final_state, d_final_state: ``[B, H, Dk, Dv]`` or None.
        dots: ``q_t . dq_t - k_t . dk_t`` ``[B, T, H]`` when already computed (the triton backend's
            kernel); ``q``, ``dq``, ``k``, ``dk`` are then not read.
    """
    cdt = _cdt(q.dtype)
    if dots is None:
        dG = (torch.einsum("bthd,bthd->bth", q.to(cdt), dq.to(cdt))
              - torch.einsum("bthd,bthd->bth", k.to(cdt), dk.to(cdt)))
    else:
        dG = dots.to(cdt)
    if d_final_state is not None:
        if final_state is None:
            raise ValueError("gate_grad: d_final_state needs the final_state it is the gradient of")
        dG[:, -1] += (final_state.to(cdt) * d_final_state.to(cdt)).sum((-1, -2))
    return reverse_cumsum_docs(dG, doc_ids)


def _segment_suffix_sums(x: torch.Tensor, span: int, doc_ids: Optional[torch.Tensor]):
    """``(y, reach)``: ``y[b, h, t] = sum_{u >= t in t's segment, doc(u) = doc(t)} x[b, h, u]`` for
    ``x [B, H, T]`` (fp64), segments of ``span`` tokens; ``reach [B, 1, T]`` bool: the document of
    token ``t`` lasts to its segment's last token (None without documents: always)."""
    B, H, T = x.shape
    ns = -(-T // span)
    xp = torch.nn.functional.pad(x.double(), (0, ns * span - T)).view(B, H, ns, span)
    c = xp.cumsum(-1)
    # suffix sums inside each segment (contiguous: one scan per segment, all in parallel); fp64
    # keeps the difference exact to the result's precision
    y = (c[..., -1:] - c + xp).view(B, H, ns * span)[..., :T]
    if doc_ids is None:
        return y, None
    t = torch.arange(T, device=x.device)
    seg_end = ((t // span + 1) * span).clamp(max=T)  # [T]: one past the segment's last token
    return _stop_at_documents(y, doc_ids, seg_end)


def segment_gate_grad(
    dots: torch.Tensor,
    span: int,
    states: torch.Tensor,
    final_state: torch.Tensor,
    d_states: torch.Tensor,
    doc_ids: Optional[torch.Tensor] = None,
    out_dtype: Optional[torch.dtype] = None,
) -> torch.Tensor:
    """The gradient of the gates from segment-local sums, ``dg [B, T, H]`` (README.md, "Gradient of
    the gates", (14)): the single-device op's form, as accurate as its inputs are.

    For token ``s`` of segment ``j`` (tokens ``[j * span, e_j]``)::

        dg_s = sum_{t in [s, e_j], doc(t) = doc(s)} dots_t  +  [doc(s) = doc(e_j)] c_j <D_j, S_j>

    with ``S_j`` the state after token ``e_j``, ``D_j`` the gradient of the loss through the tokens
    after ``e_j`` (the final-state gradient for the last segment) and ``c_j`` = 0 where a document
    starts at ``e_j + 1`` (1 for the last segment). Unlike :func:`gate_grad` no sum runs past a
    segment, so the rounding of ``dots`` adds up over at most ``span`` tokens.

    Args:
        dots: ``[B, H, T]`` ``q_t . dq_t - k_t . dk_t`` (total gradients), fp32 or fp64.
        span: tokens per segment (the last one may be shorter).
        states: ``[B, H, NS, Dk, Dv]``, the forward state entering each segment (``S_j = states[j + 1]``).
        final_state: ``[B, H, Dk, Dv]``, the state after the last token (``S_{NS-1}``).
        d_states: ``[B, H, NS, Dk, Dv]``, ``D_j`` (the backward's state gradient entering segment
            ``j`` from its right end).
        doc_ids: ``[B, T]`` document ids, or None.
        out_dtype: of the result (default: fp32, fp64 for fp64 ``dots``).
    """
    B, H, T = dots.shape
    ns = states.shape[2]
    if ns != -(-T // span) or d_states.shape[2] != ns:
        raise ValueError(f"segment_gate_grad: {ns} segment states for T = {T} in segments of {span}")
    cdt = _cdt(dots.dtype)
    bnd = torch.empty((B, H, ns), device=dots.device, dtype=torch.float64)
    if ns > 1:
        bnd[..., :-1] = torch.einsum("bhnkv,bhnkv->bhn", states[:, :, 1:].to(cdt), d_states[:, :, :-1].to(cdt))
    bnd[..., -1] = torch.einsum("bhkv,bhkv->bh", final_state.to(cdt), d_states[:, :, -1].to(cdt))
    y, reach = _segment_suffix_sums(dots, span, doc_ids)
    if doc_ids is not None:
        # c_j: the document of the segment's last token goes on into the next segment (the state
        # gradient D_j is then 0 already; the mask keeps the term exact and independent of it)
        d = doc_ids.long()
        ends = torch.arange(1, ns + 1, device=dots.device) * span - 1
        goes_on = d[:, ends[:-1]] == d[:, ends[:-1] + 1]  # [B, ns - 1]
        cont = torch.cat([goes_on, torch.ones((B, 1), dtype=torch.bool, device=d.device)], 1)
        bnd = torch.where(cont[:, None], bnd, 0.0)
    per_token = bnd[..., None].expand(B, H, ns, span).reshape(B, H, ns * span)[..., :T]
    term = per_token if reach is None else torch.where(reach, per_token, 0.0)
    return (y + term).to(out_dtype or cdt).transpose(1, 2)
