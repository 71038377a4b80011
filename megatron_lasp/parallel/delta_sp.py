"""``gated_delta_rule_sp``: the gated delta rule (Gated DeltaNet's token mixer) over a sequence
split across a process group, in the four sequence-parallel modes of ``lightning_attn_sp``.

The recurrence (``megatron_lasp/ops/delta_rule``), per row and head, state ``S [Dk, Dv]``::

    S_t = A_t S_{t-1} + beta_t k_t v_t^T,   A_t = exp(g_t) (I - beta_t k_t k_t^T),   o_t = S_t^T (scale q_t)

is linear in the state entering a slice. A slice of ``C`` tokens therefore acts on the state
``S_in`` that enters it through two things it can compute without knowing ``S_in``: the product
of its transitions ``P = A_C ... A_1`` (``[Dk, Dk]`` per head) and the "transported" queries
``q~_t = (A_t ... A_1)^T scale q_t``::

    S_out = P S_in + S_loc,     o_t = o_loc_t + q~_t S_in

where ``S_loc`` and ``o_loc`` are the slice's own state and outputs from a zero state. One kernel
call gives all four: the op run with values ``[v | 0]`` and initial state ``[0 | I]`` (the identity
in ``Dk`` extra value columns) returns outputs ``[o_loc | q~]`` and final state ``[S_loc | P]``
(``ops/delta_rule/README.md``). This replaces the scalar decay's ``lam^C`` and ``diag(a) Q`` of
the lightning modes (``parallel/README.md``): the state passed between ranks is still one
``[Dk, Dv]`` per head, and the slice's transform one ``[Dk, Dk]`` per head. Its price is the
kernel's work on ``Dv + Dk`` value columns on every rank after the first (about twice the op's
work for ``Dk = Dv``), paid where the ranks would otherwise wait for each other.

The modes (one function each below; the autograd of every mode is PyTorch's own, through the op's
backward and the differentiable communication of this module):

- ``lasp``: rank r receives ``S_in`` from rank r-1 after its own kernel call and sends
  ``S_out = P S_in + S_loc`` on at once; the backward passes ``dS_in = P^T dS_out + q~^T dO`` back
  the same way before the kernel's backward. The first rank runs the plain op from the initial state.
- ``lasp2``: one all-gather of every slice's ``(S_loc, P)``; each rank folds the slices before it.
- ``ulysses``: all-to-all to head shards, the op on the whole sequence, all-to-all back.
- ``allgather``: all-gather of k, v, g and beta; each rank runs the op over the prefix before its
  slice for the entering state, then its slice from it (work and traffic grow with the length).

Packed documents (``cu_seqlens``, global offsets, as in ``lightning_attn_sp``): the kernel restarts
the state at the slice's own document starts, so ``P`` and ``q~`` are zero after the first one;
a slice that starts with a document takes no entering state (``keep`` of
:func:`megatron_lasp.parallel.slices.window_documents`).

Initial state: enters the first slice (each row's first document); its gradient arrives on the
group's first rank (the others get zeros or none), so a sum over the group is the one-device
gradient. Final state: the same on every rank; the gradients that reach it are summed.
"""

from __future__ import annotations

from typing import Callable, Dict, Optional, Tuple, Union

import torch
import torch.distributed as dist

from megatron_lasp.parallel.comm import (
    GroupInfo,
    all_gather_flat,
    from_last_rank,
    group_info,
    recv_state,
    reduce_scatter_flat,
    send_state,
    state_dtype,
    sum_over_group,
)
from megatron_lasp.parallel.slices import window_documents
from megatron_lasp.parallel.sp import _check_across_group, _validate_default
from megatron_lasp.parallel.ulysses import _heads_to_seq, _seq_to_heads

__all__ = ["gated_delta_rule_sp", "DELTA_SP_MODES"]


def _op(*args, **kwargs):
    from megatron_lasp.ops.delta_rule import chunk_gated_delta_rule

    return chunk_gated_delta_rule(*args, **kwargs)


# ----------------------------------------------------------------------------------------------
# differentiable communication


def _anchor(device: torch.device) -> torch.Tensor:
    """A leaf that requires grad: makes a Function without differentiable inputs part of the graph."""
    return torch.zeros((), device=device, requires_grad=torch.is_grad_enabled())


class _Attach(torch.autograd.Function):
    """``o`` unchanged; every other input gets a zero gradient whenever ``o`` gets one, so that the
    backward of the communication behind them runs on every rank (a collective or a receive in a
    backward must run on all ranks or on none)."""

    @staticmethod
    def forward(ctx, o, *others):
        ctx.shapes = [(t.shape, t.dtype, t.device) for t in others]
        return o.view_as(o)

    @staticmethod
    def backward(ctx, do):
        return (do,) + tuple(torch.zeros((), dtype=dt, device=dev).expand(shape) for shape, dt, dev in ctx.shapes)


def _attach(o: torch.Tensor, *others: Optional[torch.Tensor]) -> torch.Tensor:
    others = tuple(t for t in others if t is not None and t.requires_grad)
    return _Attach.apply(o, *others) if others and torch.is_grad_enabled() else o


class _Recv(torch.autograd.Function):
    """Forward: receive a state from ``src``; backward: send its gradient back there.

    ``ties`` are the slice's inputs (they get no gradient from here): they put the node on every
    path from the output to what the inputs come from, so that a backward restricted to some
    tensors (``torch.autograd.grad(..., inputs=...)``, as a recompute runs it) still sends the
    gradient the previous rank waits for. (A lone leaf would be pruned from such a backward.)"""

    @staticmethod
    def forward(ctx, shape, dtype, src: int, group, *ties):
        out = torch.empty(shape, dtype=dtype, device=ties[0].device)
        recv_state(out, src, group).wait()
        ctx.src, ctx.group, ctx.n = src, group, len(ties)
        return out

    @staticmethod
    def backward(ctx, grad):
        send_state(grad.contiguous(), ctx.src, ctx.group).wait()
        return (None,) * (4 + ctx.n)


def _ties(*xs: torch.Tensor):
    """The inputs that require grad (a leaf that does when none does and grad is on)."""
    wanting = tuple(x for x in xs if x.requires_grad)
    return wanting or (_anchor(xs[0].device),)


class _Send(torch.autograd.Function):
    """Forward: start sending ``x`` to ``dst`` (the work is returned through ``box``); backward:
    receive the gradient of ``x`` from there. Returns a scalar to :func:`_attach` to the output."""

    @staticmethod
    def forward(ctx, x, dst: int, group, box: list):
        box.append(send_state(x.detach(), dst, group))
        ctx.dst, ctx.group = dst, group
        ctx.shape, ctx.dtype = x.shape, x.dtype
        return x.new_zeros(())

    @staticmethod
    def backward(ctx, _):
        grad = torch.empty(ctx.shape, dtype=ctx.dtype, device=_.device)
        recv_state(grad, ctx.dst, ctx.group).wait()
        return grad, None, None, None


def _by_dtype(xs):
    """Indices of ``xs`` grouped by dtype, groups in order of first appearance (the same on every rank)."""
    groups: Dict[torch.dtype, list] = {}
    for i, x in enumerate(xs):
        groups.setdefault(x.dtype, []).append(i)
    return list(groups.values())


class _AllGather(torch.autograd.Function):
    """For each input ``x``: ``[W, *x.shape]``, every rank's ``x`` in group order (one all-gather
    per dtype); backward: the sum of every rank's gradient of its part (one reduce-scatter per
    dtype). One node for all inputs: the collectives of its backward run in one order on every rank."""

    @staticmethod
    def forward(ctx, info: GroupInfo, *xs):
        ctx.info, ctx.shapes = info, [x.shape for x in xs]
        out = [None] * len(xs)
        for idx in _by_dtype(xs):
            flat = torch.cat([xs[i].reshape(-1) for i in idx])
            full = flat.new_empty(info.size * flat.numel())
            all_gather_flat(full, flat, info.group)
            full = full.view(info.size, -1)
            col = 0
            for i in idx:
                n = xs[i].numel()
                out[i] = full[:, col:col + n].reshape((info.size,) + tuple(xs[i].shape))
                col += n
        return tuple(out)

    @staticmethod
    def backward(ctx, *grads):
        info = ctx.info
        out = [None] * len(grads)
        for idx in _by_dtype(grads):
            full = torch.cat([grads[i].reshape(info.size, -1) for i in idx], dim=1).contiguous()
            part = full.new_empty(full.shape[1])
            reduce_scatter_flat(part, full.view(-1), info.group)
            col = 0
            for i in idx:
                n = grads[i][0].numel()
                out[i] = part[col:col + n].view(ctx.shapes[i])
                col += n
        return (None,) + tuple(out)


def _all_gather(info: GroupInfo, *xs):
    return _AllGather.apply(info, *xs)


class _FinalFromLast(torch.autograd.Function):
    """``(o, final)``: the last rank's ``s_out`` on every rank; the gradients that reach ``final``
    on the ranks are summed into the last rank's ``s_out``. One node with ``o`` so that its
    backward (a collective) runs on every rank whenever ``o`` gets a gradient."""

    @staticmethod
    def forward(ctx, o, s_out, info: GroupInfo):
        ctx.info = info
        return o.view_as(o), from_last_rank(s_out, s_out, info)

    @staticmethod
    def backward(ctx, do, d_final):
        total = sum_over_group(d_final, ctx.info)  # undefined gradients arrive as zeros
        return do, (total if ctx.info.rank == ctx.info.size - 1 else torch.zeros_like(total)), None


def _final_from_last(o, s_out, info):
    if not torch.is_grad_enabled() or not (o.requires_grad or s_out.requires_grad):
        return o, from_last_rank(s_out, s_out, info)
    return _FinalFromLast.apply(o, s_out, info)


class _GradOnFirstRank(torch.autograd.Function):
    """Identity; the gradient is summed over the group and given whole to its first rank."""

    @staticmethod
    def forward(ctx, h0, info: GroupInfo):
        ctx.info = info
        return h0.view_as(h0)

    @staticmethod
    def backward(ctx, grad):
        total = sum_over_group(grad, ctx.info)
        return (total if ctx.info.rank == 0 else torch.zeros_like(total)), None


def _regroup(fn, xs, info):
    """``fn`` (an all-to-all of a list of same-dtype tensors) applied per dtype group of ``xs``."""
    out = [None] * len(xs)
    for idx in _by_dtype(xs):
        for i, y in zip(idx, fn([xs[i].contiguous() for i in idx], info)):
            out[i] = y
    return tuple(out)


class _SeqToHeads(torch.autograd.Function):
    """``[B, C, H, D_i]`` slices -> ``[B, W C, H / W, D_i]`` head shards (one all-to-all per dtype);
    backward: back. One node for all inputs (its collectives run in one order on every rank)."""

    @staticmethod
    def forward(ctx, info: GroupInfo, *xs):
        ctx.info = info
        return _regroup(_seq_to_heads, xs, info)

    @staticmethod
    def backward(ctx, *grads):
        return (None,) + _regroup(_heads_to_seq, grads, ctx.info)


class _HeadsToSeq(torch.autograd.Function):
    """The inverse of :class:`_SeqToHeads`."""

    @staticmethod
    def forward(ctx, info: GroupInfo, *xs):
        ctx.info = info
        return _regroup(_heads_to_seq, xs, info)

    @staticmethod
    def backward(ctx, *grads):
        return (None,) + _regroup(_seq_to_heads, grads, ctx.info)


# ----------------------------------------------------------------------------------------------
# one slice


def _transform_pass(q, k, v, g, beta, scale, cu, backend):
    """The slice from a zero state and its transform: ``(o_loc, S_loc, q~, P)`` (see the module docstring)."""
    B, C, H, Dk = q.shape
    Dv = v.shape[-1]
    sdt = state_dtype(q.dtype)
    v_aug = torch.cat([v, v.new_zeros(B, C, H, Dk)], dim=-1)
    eye = torch.eye(Dk, dtype=sdt, device=q.device).expand(B, H, Dk, Dk)
    h0_aug = torch.cat([torch.zeros(B, H, Dk, Dv, dtype=sdt, device=q.device), eye], dim=-1)
    o, s = _op(q, k, v_aug, g, beta, scale=scale, initial_state=h0_aug, output_final_state=True,
               cu_seqlens=cu, backend=backend)
    return o[..., :Dv], s[..., :Dv], o[..., Dv:], s[..., Dv:]


def _enter(o_loc, q_t, s_in):
    """``o_loc + q~ S_in``: ``q~ [B, C, H, Dk]``, ``S_in [B, H, Dk, Dv]`` (in q~'s dtype, as the kernels do)."""
    term = torch.matmul(q_t.transpose(1, 2), s_in.to(q_t.dtype)).transpose(1, 2)
    return o_loc + term


def _masked(s, keep):
    return s if keep is None else s * keep.to(s.dtype)


# ----------------------------------------------------------------------------------------------
# the modes: (q, k, v, g, beta, info, h0, want_final, cu, scale, backend) -> (o, final)


def _lasp(q, k, v, g, beta, info, h0, want_final, cu, scale, backend):
    B, C, H, Dk = q.shape
    Dv = v.shape[-1]
    cu_loc, keep = window_documents(cu, B, C * info.size, info.rank * C, (info.rank + 1) * C)
    if info.rank == 0:
        o, s_out = _op(q, k, v, g, beta, scale=scale, initial_state=h0, output_final_state=True,
                       cu_seqlens=cu_loc, backend=backend)
    else:
        o_loc, s_loc, q_t, P = _transform_pass(q, k, v, g, beta, scale, cu_loc, backend)
        s_in = _masked(_Recv.apply((B, H, Dk, Dv), state_dtype(q.dtype), info.prev, info.group,
                                   *_ties(q, k, v, g, beta)), keep)
        # the last rank's S_out is the final state: formed only when asked for
        s_out = torch.matmul(P, s_in) + s_loc if info.next is not None or want_final else None
        o = _enter(o_loc, q_t, s_in)
    box: list = []
    if info.next is not None:
        o = _attach(o, _Send.apply(s_out, info.next, info.group, box))
    final = None
    if want_final:
        o, final = _final_from_last(o, s_out, info)
    for work in box:
        work.wait()
    return o, final


def _fold(s_all, p_all, upto: int, like):
    """The state after slices ``[0, upto)``: ``S <- P_j S + S_loc_j`` from zero."""
    s = torch.zeros_like(like)
    for j in range(upto):
        s = torch.matmul(p_all[j], s) + s_all[j]
    return s


def _lasp2(q, k, v, g, beta, info, h0, want_final, cu, scale, backend):
    B, C, H, Dk = q.shape
    cu_loc, keep = window_documents(cu, B, C * info.size, info.rank * C, (info.rank + 1) * C)
    if info.rank == 0:
        o, s_loc = _op(q, k, v, g, beta, scale=scale, initial_state=h0, output_final_state=True,
                       cu_seqlens=cu_loc, backend=backend)
        P = torch.zeros(B, H, Dk, Dk, dtype=s_loc.dtype, device=q.device)
        q_t = None
    else:
        o, s_loc, q_t, P = _transform_pass(q, k, v, g, beta, scale, cu_loc, backend)
        P = _masked(P, keep)
    s_all, p_all = _all_gather(info, s_loc, P)  # [W, B, H, Dk, Dv], [W, B, H, Dk, Dk]
    if q_t is not None:
        o = _enter(o, q_t, _masked(_fold(s_all, p_all, info.rank, s_loc), keep))
    final = _fold(s_all, p_all, info.size, s_loc) if want_final else None
    return _attach(o, s_all, p_all), final


def _ulysses(q, k, v, g, beta, info, h0, want_final, cu, scale, backend):
    H = q.shape[2]
    hl = H // info.size
    qh, kh, vh, gh, bh = _SeqToHeads.apply(info, q, k, v, g.unsqueeze(-1), beta.unsqueeze(-1))
    h0_part = None if h0 is None else h0[:, info.rank * hl:(info.rank + 1) * hl]
    o, final = _op(qh, kh, vh, gh.squeeze(-1), bh.squeeze(-1), scale=scale, initial_state=h0_part,
                   output_final_state=want_final, cu_seqlens=cu, backend=backend)
    (o,) = _HeadsToSeq.apply(info, o)
    if want_final:
        (parts,) = _all_gather(info, final)  # [W, B, H / W, Dk, Dv]
        final = parts.transpose(0, 1).reshape(parts.shape[1], H, *parts.shape[3:])
    return o, final


def _allgather(q, k, v, g, beta, info, h0, want_final, cu, scale, backend):
    B, C, H, Dk = q.shape
    T = C * info.size
    r = info.rank
    gathered = _all_gather(info, k, v, g, beta)  # [W, B, C, ...] each
    cu_loc, keep = window_documents(cu, B, T, r * C, (r + 1) * C)
    s_in = h0
    if r > 0:
        k_pre, v_pre, g_pre, b_pre = (x[:r].transpose(0, 1).reshape(B, r * C, *x.shape[3:]) for x in gathered)
        cu_pre, _ = window_documents(cu, B, T, 0, r * C)
        # the prefix's outputs are not used: its keys stand in for its queries
        _, s_in = _op(k_pre, k_pre, v_pre, g_pre, b_pre, scale=scale, initial_state=h0, output_final_state=True,
                      cu_seqlens=cu_pre, backend=backend)
        s_in = _masked(s_in, keep)
    o, s_out = _op(q, k, v, g, beta, scale=scale, initial_state=s_in, output_final_state=want_final,
                   cu_seqlens=cu_loc, backend=backend)
    o = _attach(o, *gathered)
    final = None
    if want_final:
        o, final = _final_from_last(o, s_out, info)
    return o, final


DELTA_SP_MODES: Dict[str, Callable] = {"lasp": _lasp, "lasp2": _lasp2, "ulysses": _ulysses, "allgather": _allgather}
"""The delta rule's sequence-parallel modes, by the names of ``lightning_attn_sp``'s."""


def gated_delta_rule_sp(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    group: Optional[dist.ProcessGroup] = None,
    mode: str = "lasp",
    backend: Optional[str] = None,
    *,
    scale: Optional[float] = None,
    initial_state: Optional[torch.Tensor] = None,
    output_final_state: bool = False,
    cu_seqlens: Optional[torch.Tensor] = None,
    validate: Optional[bool] = None,
) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """The gated delta rule of a sequence split contiguously over ``group``.

    Rank ``i`` of ``group`` holds tokens ``[i C, (i+1) C)`` of every row. The result equals
    ``chunk_gated_delta_rule(q, k, v, g, beta, scale, initial_state, cu_seqlens=...)`` on the whole
    sequence, sliced; gradients flow to q, k, v, g, beta (and ``initial_state``).

    Args:
        q, k: ``[B, C, H, Dk]``; v: ``[B, C, H, Dv]``: this rank's slice.
        g: ``[B, C, H]`` float log-decays ``<= 0``; beta: ``[B, C, H]``.
        group: the sequence-parallel group; None or one rank runs the op itself.
        mode: "lasp", "lasp2", "ulysses" (heads divisible by the group size) or "allgather".
        backend: the op's backend ("torch", "fla"; default by device).
        scale: the query scale (default ``Dk ** -0.5``).
        initial_state: ``[B, H, Dk, Dv]``, the state entering each row's first document, the same
            on every rank; its gradient arrives on the group's first rank.
        output_final_state: also return the state after each row's last document, the same on
            every rank; the gradients that reach it on the ranks are summed.
        cu_seqlens: packed documents with global offsets over the ``B * W C`` tokens of the whole
            sequence's rows laid end to end, the same tensor on every rank.
        validate: check with one small all-gather that the ranks agree on shapes, dtype, mode,
            initial state and documents (default: on unless ``$MEGATRON_LASP_SP_VALIDATE=0``).

    Returns:
        ``o [B, C, H, Dv]`` (q's dtype), or ``(o, final_state)`` with ``output_final_state``.
    """
    if mode not in DELTA_SP_MODES:
        raise ValueError(f"gated_delta_rule_sp: unknown mode {mode!r}; mode must be one of {', '.join(DELTA_SP_MODES)}")
    world = 1 if group is None else dist.get_world_size(group)
    if world == 1:
        o, final = _op(q, k, v, g, beta, scale=scale, initial_state=initial_state,
                       output_final_state=output_final_state, cu_seqlens=cu_seqlens, backend=backend)
        return (o, final) if output_final_state else o
    for name, x in (("g", g), ("beta", beta)):
        if not isinstance(x, torch.Tensor) or tuple(x.shape) != tuple(q.shape[:3]):
            raise ValueError(f"gated_delta_rule_sp: {name} must be [B, C, H] = {list(q.shape[:3])} (this rank's "
                             f"slice), got {list(getattr(x, 'shape', []))}")
    if mode == "ulysses" and q.shape[2] % world:
        raise ValueError(f"gated_delta_rule_sp: mode 'ulysses' needs the heads ({q.shape[2]}) divisible by the "
                         f"sequence-parallel size ({world}); use lasp or lasp2")
    if validate is None:
        validate = _validate_default()
    if validate:
        _check_across_group(q, v, mode, group, cu_seqlens, gated=True, initial_state=initial_state,
                            output_final_state=output_final_state, where="gated_delta_rule_sp")
    if scale is None:
        scale = q.shape[-1] ** -0.5
    info = group_info(group)
    h0 = initial_state
    if h0 is not None:
        h0 = h0.to(state_dtype(q.dtype))
        if mode in ("ulysses", "allgather") and h0.requires_grad and torch.is_grad_enabled():
            h0 = _GradOnFirstRank.apply(h0, info)
    o, final = DELTA_SP_MODES[mode](q, k, v, g, beta, info, h0, output_final_state, cu_seqlens, scale, backend)
    return (o, final) if output_final_state else o
