"""What a slice of the sequence does to the attention state: the one per-slice plan of the modes.

Notation (``parallel/README.md``, per head): a rank holds a contiguous slice of ``C`` tokens; ``lam = exp(-slope)``;
``a_t = lam^(t+1)`` is the weight of the state entering the slice at its token ``t`` and
``b_t = lam^(C-1-t)`` the weight of token ``t`` in the state leaving the slice (:class:`SliceDecays`;
per row and head with per-token gates, from the slice's cumulative gate).

Packed documents (:class:`SliceDocs`): the same factors, masked per row by "same document"
(the state entering slice ``j`` reaches only the tokens before its first boundary, a token enters
the state leaving it only after its last boundary, and the state crosses a slice only if it has no
boundary); :func:`window_documents` gives a window of a slice (a chunk) its own ``cu_seqlens``.

:class:`SliceTransform` is what the modes, the chunked layer (``models/chunked.py``) and the one
state hop (``hop.py``) take: a state and how a slice transforms it (its token weights and its
carry). :class:`SliceFunction` is the modes' shared autograd tail, :func:`leaving_state_grads` what the
gradient of the state leaving a slice adds to its dk, dv and gates' gradient. See ``megatron_lasp/parallel/README.md``.
"""

from __future__ import annotations

import dataclasses
from typing import List, Optional

import torch

from megatron_lasp.ops.lightning_attn import LightningAttnSaved, decay_powers, state_decay
from megatron_lasp.ops.lightning_attn.gate import SliceGate, reverse_cumsum_docs
from megatron_lasp.parallel.comm import state_dtype, sum_over_group

__all__ = [
    "SliceDecays",
    "SliceDocs",
    "SliceTransform",
    "SliceFunction",
    "add_state_term",
    "local_state",
    "decayed_prefix",
    "decayed_suffix",
    "with_entry_state",
    "window_documents",
    "slice_gate_grad_from_own",
    "state_grad_dots",
    "leaving_state_grads",
]


@dataclasses.dataclass(frozen=True)
class SliceDecays:
    """Decay factors of one slice of ``length`` tokens, fp32 (fp64 for fp64 gates).

    Fixed decay (:meth:`of`): one set per head. Per-token gates (:meth:`from_gates`): one per row
    and head, from the slice's own cumulative gate (``gate.SliceGate``: ``a_t = exp(G_t)``,
    ``b_t = exp(G_{C-1} - G_t)``, ``across = exp(G_{C-1})``, ``G_t = sum_{u <= t} g_u``, each
    summed from its own end so no ``exp`` of a large number is taken).

    Attributes:
        a: ``[H, C]`` or ``[B, H, C]``, ``lam^(t+1)``.
        b: ``[H, C]`` or ``[B, H, C]``, ``lam^(C-1-t)``.
        across: ``[H]`` or ``[B, H]``, ``lam^C`` (the decay of a state carried across the slice;
            may underflow to 0).
    """

    a: torch.Tensor
    b: torch.Tensor
    across: torch.Tensor

    @classmethod
    def of(cls, slopes: torch.Tensor, length: int) -> "SliceDecays":
        return cls(
            decay_powers(slopes, length),
            decay_powers(slopes, length, reverse=True),
            state_decay(slopes, length),
        )

    @classmethod
    def from_gates(cls, g: torch.Tensor) -> "SliceDecays":
        """From this slice's gates ``g [B, C, H]`` (log-decays ``<= 0``)."""
        gate = SliceGate.of(g)
        return cls(gate.a, gate.b, gate.across)

    @classmethod
    def for_slice(cls, slopes: Optional[torch.Tensor], g: Optional[torch.Tensor], length: int) -> "SliceDecays":
        """:meth:`of` for a fixed decay (``slopes``), :meth:`from_gates` for per-token gates (``g``)."""
        return cls.of(slopes, length) if g is None else cls.from_gates(g)

    @property
    def gated(self) -> bool:
        """Whether the factors are per row (per-token gates)."""
        return self.a.dim() == 3



def _token_weights(w: torch.Tensor) -> torch.Tensor:
    """``[H, T]`` -> ``[1, T, H, 1]``; per-row ``[B, H, T]`` -> ``[B, T, H, 1]``."""
    return (w[None] if w.dim() == 2 else w).transpose(1, 2)[..., None]


def add_state_term(out: torch.Tensor, x: torch.Tensor, state: torch.Tensor, w: torch.Tensor) -> None:
    """In place: ``out[b, t, h] += w[(b,) h, t] * x[b, t, h] @ state[b, h]``.

    Args:
        out: ``[B, T, H, Do]``, any float dtype.
        x: ``[B, T, H, Di]``.
        state: ``[B, H, Di, Do]`` (fp32; cast to ``x``'s dtype for the matmul, as the kernels do
            for low-precision inputs).
        w: ``[H, T]`` fp32 per-token weights, or ``[B, H, T]`` (per row, with documents).
    """
    term = torch.matmul(x.transpose(1, 2), state.to(x.dtype))  # [B, H, T, Do]
    out.add_(term.transpose(1, 2) * _token_weights(w))


def local_state(k: torch.Tensor, v: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``sum_t w[(b,) h, t] k_t^T v_t`` in the state dtype: ``[B, H, Dk, Dv]`` from k ``[B, T, H, Dk]``, v ``[B, T, H, Dv]``."""
    sdt = state_dtype(k.dtype)
    kw = k.to(sdt) * _token_weights(w).to(sdt)
    return torch.einsum("bthk,bthv->bhkv", kw, v.to(sdt))


def decayed_prefix(states: List[torch.Tensor], transforms: List["SliceTransform"], upto: int,
                   initial: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
    """State entering slice ``upto``: ``T_{upto-1}(... T_0(initial) + states[0] ...) + states[upto-1]``.

    With fixed decay and no ``initial`` that is ``sum_{j < upto} lam^(C (upto-1-j)) states[j]``;
    ``initial`` itself (None without it) if ``upto == 0``.

    Args:
        states: per-slice local states ``[B, H, Dk, Dv]`` in group order.
        transforms: per-slice :class:`SliceTransform` in group order (how slice ``j`` carries a
            state through it).
        upto: index of the slice whose incoming state is wanted.
        initial: the state entering slice 0 (the group's initial state), or None (zero).
    """
    carry = initial
    for j in range(upto):
        carry = states[j].clone() if carry is None else transforms[j](carry).add_(states[j])
    return carry


def decayed_suffix(grads: List[torch.Tensor], transforms: List["SliceTransform"], after: int,
                   final: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
    """Gradient of the state leaving slice ``after``: the mirror of :func:`decayed_prefix`.

    ``grads[j]`` is slice ``j``'s own contribution to the gradient of the state entering it
    (``(diag(a) Q_j)^T dO_j``); with fixed decay the result is
    ``sum_{j > after} lam^(C (j-after-1)) grads[j]``. None if ``after`` is the last slice;
    ``after = -1`` gives the gradient of the state entering slice 0 (the group's initial state).
    ``final``: the gradient of the state leaving the last slice (the group's final state), or None
    (zero); it is carried back like the ``grads``.
    """
    carry = final
    for j in range(len(grads) - 1, after, -1):
        carry = grads[j].clone() if carry is None else transforms[j].transpose(carry).add_(grads[j])
    return carry


def with_entry_state(saved: LightningAttnSaved, s_in: torch.Tensor, slopes: Optional[torch.Tensor],
                     docs: Optional["SliceDocs"] = None, dec: Optional[SliceDecays] = None) -> LightningAttnSaved:
    """The kernel's cached segment states as if the forward had started from ``s_in``.

    The state entering the span starting at token ``n * span`` gains ``lam^(n span) s_in`` (per-token
    gates, ``slopes=None``: ``a_{n span - 1} s_in`` from the slice's :class:`SliceDecays` ``dec``,
    1 for the first span); with documents, only while that state is still in the document ``s_in``
    belongs to (the kernel reads the entering state of span 0 for the slice's first document).
    """
    sdt = saved.states.dtype
    n_spans = saved.states.shape[2]
    device = saved.states.device
    starts = torch.arange(n_spans, device=device) * saved.span
    if slopes is not None:
        w = torch.exp(-slopes.to(sdt)[:, None] * starts.to(sdt)[None, :])[None]  # [1, H, N]
    else:
        a = dec.a.to(sdt)  # [B, H, C]
        w = torch.cat([torch.ones_like(a[..., :1]), a[..., starts[1:] - 1]], dim=-1)  # [B, H, N]
    if docs is not None:
        entry_docs = docs.local[:, (starts - 1).clamp(min=0)]  # [B, N]
        w = w * (entry_docs == docs.prev[docs.rank][:, None]).to(sdt)[:, None]  # [B, H, N]
    states = saved.states + w[:, :, :, None, None] * s_in.to(sdt)[:, :, None]
    return dataclasses.replace(saved, states=states)


@dataclasses.dataclass(frozen=True)
class SliceDocs:
    """Packed documents seen from the slices of a sequence-parallel group (all on the device).

    Built from the global ``cu_seqlens`` (the same tensor on every rank) without a host sync.
    Document ids are global; ``prev[0]`` is the first token's (the initial-state convention).

    Attributes:
        rank, size, length: this rank, the group size and the slice length ``C``.
        full: ``[B, W C]`` int32 document ids of the whole sequence.
        local: ``[B, C]``, this rank's slice of ``full`` (what the kernel gets).
        prev: ``[W, B]``, the document of the token before each slice.
        first, last: ``[W, B]``, the documents of each slice's first and last tokens.
    """

    rank: int
    size: int
    length: int
    full: torch.Tensor
    local: torch.Tensor
    prev: torch.Tensor
    first: torch.Tensor
    last: torch.Tensor

    @classmethod
    def of(cls, cu_seqlens: torch.Tensor, B: int, C: int, rank: int, size: int, device) -> "SliceDocs":
        from megatron_lasp.ops.lightning_attn import doc_ids_from_cu_seqlens

        full = doc_ids_from_cu_seqlens(cu_seqlens, B, C * size, device)
        starts = torch.arange(size, device=device) * C
        return cls(rank, size, C, full, full[:, rank * C:(rank + 1) * C].contiguous(),
                   full[:, (starts - 1).clamp(min=0)].t(), full[:, starts].t(), full[:, starts + C - 1].t())

    def slice(self, j: int) -> torch.Tensor:
        """``[B, C]`` document ids of slice ``j``."""
        return self.full[:, j * self.length:(j + 1) * self.length]

    def keep_in(self, j: int) -> torch.Tensor:
        """``[B]`` bool: the state entering slice ``j`` reaches its first token (no boundary there)."""
        return self.first[j] == self.prev[j]

    def w_in(self, dec: SliceDecays, j: int) -> torch.Tensor:
        """``[B, H, C]``: ``a`` masked to the tokens of the entering state's document."""
        a = dec.a if dec.gated else dec.a[None]
        return a * (self.slice(j) == self.prev[j][:, None]).to(dec.a.dtype)[:, None]

    def w_out(self, dec: SliceDecays, j: int) -> torch.Tensor:
        """``[B, H, C]``: ``b`` masked to the tokens of the slice's last document."""
        b = dec.b if dec.gated else dec.b[None]
        return b * (self.slice(j) == self.last[j][:, None]).to(dec.b.dtype)[:, None]

    def across(self, dec: SliceDecays, j: int) -> torch.Tensor:
        """``[B, H]``: ``lam^C`` for the rows of slice ``j`` without a boundary, 0 for the others."""
        through = (self.prev[j] == self.last[j]).to(dec.across.dtype)  # [B]
        return through[:, None] * (dec.across if dec.gated else dec.across[None])


def window_documents(cu_seqlens: Optional[torch.Tensor], B: int, T: int, lo: int, hi: int):
    """The packed documents of the tokens ``[lo, hi)`` of every row of ``[B, T]``, for a kernel run
    on that window alone (a chunk of a slice: ``models/chunked.py``).

    Returns:
        ``(cu_seqlens, keep)``: the window's document starts laid end to end (``[B (hi - lo)]``
        rows, int64 on the CPU), and ``keep`` ``[B, 1, 1, 1]`` fp32 (0 where a document starts
        exactly at the window's first token: the state carried into the window must not reach it)
        or None when every row keeps it. ``(None, None)`` without documents. (A host sync: the
        kernel's ``cu_seqlens`` are host values.)
    """
    if cu_seqlens is None:
        return None, None
    L = hi - lo
    local = {b * L for b in range(B + 1)}
    keep = [1.0] * B
    for start in set(cu_seqlens.detach().cpu().tolist()):
        b, t = divmod(start, T)
        if b >= B or not lo <= t < hi:
            continue
        if t > lo:
            local.add(b * L + t - lo)
        elif t > 0:
            keep[b] = 0.0
    cu = torch.tensor(sorted(local), dtype=torch.int64)
    keep_t = None if all(k == 1.0 for k in keep) else torch.tensor(keep, dtype=torch.float32).view(B, 1, 1, 1)
    return cu, keep_t


@dataclasses.dataclass(frozen=True)
class SliceTransform:
    """How one slice acts on the state that crosses it: the one per-slice plan of every mode.

    The state entering the slice reaches its token ``t`` with weight ``w_in[.., t]``, token ``t``
    enters the state leaving the slice with weight ``w_out[.., t]``, and a state that crosses the
    whole slice is carried by :meth:`__call__` (its gradient by :meth:`transpose`). For scalar
    decay the carry is a per-row, per-head factor (``lam^C``, 0 for a row with a document start in
    the slice); an op with a matrix-valued transition (a delta rule) replaces the carry, and the
    modes' schedule stays the same.

    Attributes:
        w_in: ``[H, C]`` (fp32; ``[B, H, C]`` per row with documents), ``a`` masked (None
            where not needed).
        w_out: ``[H, C]`` or ``[B, H, C]``, ``b`` masked (None where not needed).
        across: ``[1, H]`` or ``[B, H]``, the factor of a state crossing the slice.
        keep_in: ``[B, 1, 1, 1]`` or None: 0 for a row whose slice starts with a document (the
            kernel's gradient of its initial state then belongs to another document).
    """

    w_in: torch.Tensor
    w_out: torch.Tensor
    across: torch.Tensor
    keep_in: Optional[torch.Tensor] = None

    @classmethod
    def of(cls, dec: SliceDecays, docs: Optional[SliceDocs], j: int, weights: bool = True) -> "SliceTransform":
        """The transform of slice ``j`` from its decay factors and, with documents, the document
        plan; ``weights=False`` leaves ``w_in`` / ``w_out`` None (a slice only carried through)."""
        if docs is None:
            return cls(dec.a, dec.b, dec.across if dec.gated else dec.across.view(1, -1))
        B = docs.full.shape[0]
        keep = docs.keep_in(j).to(dec.a.dtype).view(B, 1, 1, 1)
        across = docs.across(dec, j)
        if not weights:
            return cls(None, None, across, keep)
        return cls(docs.w_in(dec, j), docs.w_out(dec, j), across, keep)

    def __call__(self, state: torch.Tensor) -> torch.Tensor:
        """The state ``[B, H, Dk, Dv]`` after crossing the slice (a new tensor)."""
        return state * self.across[:, :, None, None].to(state.dtype)

    def transpose(self, d_state: torch.Tensor) -> torch.Tensor:
        """The gradient of the state entering the slice from that of the state leaving it (scalar
        decay: the same factor)."""
        return self(d_state)

    def keep(self, d_state: torch.Tensor) -> torch.Tensor:
        """In place: ``d_state`` (the kernel's gradient of its initial state) zeroed where the slice
        starts with a document."""
        return d_state if self.keep_in is None else d_state.mul_(self.keep_in.to(d_state.dtype))


class SliceFunction(torch.autograd.Function):
    """The base of the modes' autograd Functions, ``forward(ctx, q, k, v, slopes, g, h0,
    want_final, info, backend, docs, triton_options) -> (o, final)`` (``slopes`` for a fixed decay,
    ``g`` for per-token gates, ``h0`` the group's initial state in the state dtype, or None;
    ``want_final``: also the group's final state, the same on every rank, else ``final`` is None):
    the save / restore tail they share."""

    N_INPUTS = 11

    @staticmethod
    def keep(ctx, saved: LightningAttnSaved, tensors, meta) -> None:
        """Keep the kernel's record, ``tensors`` (saved for backward) and ``meta`` (anything else) on ``ctx``."""
        saved.save_to(ctx, *tensors)
        ctx.mode_meta = meta

    @staticmethod
    def restore(ctx):
        """``(tensors, saved, meta)`` as given to :meth:`keep`."""
        tensors, saved = LightningAttnSaved.restore_from(ctx)
        return tensors, saved, ctx.mode_meta

    @classmethod
    def input_grads(cls, dq, dk, dv, dg=None, dh0=None) -> tuple:
        """The backward's return value: the gradients of q, k, v (and g, h0), None for the other inputs."""
        return (dq, dk, dv, None, dg, dh0) + (None,) * (cls.N_INPUTS - 6)

    @staticmethod
    def final_grad(ctx, d_final: Optional[torch.Tensor], info) -> Optional[torch.Tensor]:
        """The gradient of the group's final state: every rank's part summed (what the ranks'
        copies of a replicated tensor contribute; zero where the final state was not used), or
        None when it was not asked for. One all-reduce, on every rank or on none."""
        if not ctx.want_final:
            return None
        return sum_over_group(d_final, info)

    @staticmethod
    def needs_initial_grad(ctx) -> bool:
        """Whether ``h0`` (input 5) wants a gradient (the same on every rank when validated)."""
        return ctx.needs_input_grad[5]

    @staticmethod
    def initial_grad(ctx, rank: int, dh0: Optional[torch.Tensor], like: torch.Tensor) -> Optional[torch.Tensor]:
        """The gradient returned for ``h0``: ``dh0`` (the whole gradient) on the group's first
        rank, zeros shaped like ``like`` on the others (so the sum over the group, what reduces
        the gradient of a tensor replicated over it, is the whole gradient); None when ``h0``
        wants none."""
        if not ctx.needs_input_grad[5]:
            return None
        return dh0 if rank == 0 else torch.zeros_like(like)


def state_grad_dots(k: torch.Tensor, v: torch.Tensor, ds_out: torch.Tensor, w_out: torch.Tensor) -> torch.Tensor:
    """``-w_t (k_t dS_out) . v_t`` ``[B, C, H]`` fp32 (fp64 for fp64 inputs): what the term
    ``w_t v_t dS_out^T`` that a state gradient ``dS_out [B, H, Dk, Dv]`` adds to ``dk_t`` (see
    :func:`add_state_term`, ``w_out`` ``[H, C]`` or ``[B, H, C]``) adds to ``q_t . dq_t - k_t . dk_t``."""
    cdt = state_dtype(k.dtype)
    kd = torch.matmul(k.transpose(1, 2).to(cdt), ds_out.to(cdt))  # [B, H, C, Dv]
    dots = -(kd * v.transpose(1, 2).to(cdt)).sum(-1) * w_out.to(cdt)  # [B, H, C]
    return dots.transpose(1, 2).contiguous()


def slice_gate_grad_from_own(g: torch.Tensor, dg_own: torch.Tensor, docs: Optional[SliceDocs],
                             dots: Optional[torch.Tensor] = None,
                             final_term: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``dg [B, C, H]`` (in ``g``'s dtype) of a slice from the op's own ``dg`` and the state leaving it.

    ``dg_own``: the op's ``dg`` for the slice run from the state entering it and with the gradient
    of the state leaving it that the op itself saw (if any); the op sums it inside its segments from
    unrounded dots (README of the op, "Gradient of the gates"). A state gradient ``dS_out`` that
    the caller adds to ``dk`` afterwards adds to the whole-slice sum (``gate.gate_grad``) the terms
    :func:`state_grad_dots` (``dots``) and ``<dS_out, S_out>`` at the last token (``final_term``
    ``[B, H]``). They are formed in fp32 (fp64) from ``k``, ``v`` and the fp32 state, so their sum
    over the slice stays accurate, unlike sums of bf16-rounded ``dq``, ``dk``.

    Args:
        g: the slice's gates ``[B, C, H]`` (for the dtype).
        dg_own: ``[B, C, H]``.
        docs: the document plan (the sums restart at the slice's own document starts).
        dots: ``[B, C, H]`` or None; final_term: ``[B, H]`` or None.
    """
    if dots is None and final_term is None:
        return dg_own.to(g.dtype)
    cdt = state_dtype(g.dtype) if dots is None else dots.dtype
    extra = torch.zeros(dg_own.shape, dtype=cdt, device=dg_own.device) if dots is None else dots.to(cdt).clone()
    if final_term is not None:
        extra[:, -1] += final_term.to(cdt)
    doc_ids = None if docs is None else docs.local
    return (dg_own.to(cdt) + reverse_cumsum_docs(extra, doc_ids)).to(g.dtype)


def leaving_state_grads(k: torch.Tensor, v: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor,
                        ds_out: Optional[torch.Tensor], w_out: torch.Tensor, s_out: Optional[torch.Tensor],
                        g: Optional[torch.Tensor], dg_own: Optional[torch.Tensor],
                        docs: Optional[SliceDocs]) -> Optional[torch.Tensor]:
    """Add what ``dS_out``, the gradient of the state leaving a slice, gives its ``dk`` and ``dv``
    (in place, :func:`add_state_term`), and return the slice's ``dg``: the op's own ``dg_own`` (run
    without ``dS_out``) plus ``dS_out``'s terms formed in fp32 (:func:`slice_gate_grad_from_own`).

    ``ds_out`` None: no gradient reaches the state (the last slice), ``dk``, ``dv`` stay. ``g`` None
    (a fixed decay, or no gradient wanted for the gates): returns None. ``w_out``: the slice's
    :attr:`SliceTransform.w_out`; ``s_out``: the state leaving the slice (read only with ``g``).
    """
    if ds_out is not None:
        add_state_term(dk, v, ds_out.transpose(-1, -2), w_out)
        add_state_term(dv, k, ds_out, w_out)
    if g is None:
        return None
    dots = final = None
    if ds_out is not None:  # the op ran without them
        dots = state_grad_dots(k, v, ds_out, w_out)
        final = (s_out.to(ds_out.dtype) * ds_out).sum((-1, -2))
    return slice_gate_grad_from_own(g, dg_own, docs, dots, final)
