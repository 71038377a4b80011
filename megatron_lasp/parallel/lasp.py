"""LASP-1: the fp32 state is passed along the sequence-parallel group, one hop per rank.

Forward on rank r (``parallel/README.md``, "LASP-1"), the schedule that keeps the hops off the
compute's critical path:

1. post the receive of ``S_in`` from rank r-1;
2. the state-only pass of the kernel on the local slice (segment states and their scan, a small
   part of the kernel's work) gives ``S_loc``;
3. wait for ``S_in`` and send ``S_out = lam^C S_in + S_loc`` to rank r+1 at once;
4. the output pass (intra term from the cached states) while the state travels;
5. add ``diag(a) Q S_in``.

On CUDA, steps 3 (wait, combine, send) run on a side stream, so the output pass of step 4 does
not wait for ``S_in`` either: the chain of W-1 hops overlaps every rank's output pass, and the
last rank ends after about ``max(kernel, state pass + hops)`` instead of ``kernel + hops``. On the
CPU (gloo) the steps run in this order on the host; results are bitwise those of the one-pass
schedule. On a gloo group with CUDA tensors (ranks sharing a GPU) each hop goes through pinned
host memory (``comm.send_state`` / ``comm.recv_state``): same results, no overlap to speak of.
The hop is :class:`megatron_lasp.parallel.hop.StateHop` and the slice's factors
:class:`megatron_lasp.parallel.slices.SliceTransform` (shared with the chunked layer).

Backward, the mirror: post the receive of ``dS`` (the gradient of ``S_out``) from rank r+1, the
state-gradient pass gives the local part of ``dS_in``; wait, send ``dS_in = lam^C dS +
(diag(a) Q)^T dO`` to rank r-1 at once (side stream on CUDA); then dQ, dK, dV of the slice, and
``diag(b) V dS^T`` added to dK and ``diag(b) K dS`` to dV. ``S_in`` is kept from the forward
(KV-state caching): it is folded into the kernel's cached segment states, so the kernel's dQ
already contains ``diag(a) dO S_in^T`` and nothing is communicated twice.

Packed documents: the kernel restarts the state at the slice's own boundaries, so ``S_loc`` is the
state since the slice's last boundary; ``S_in`` reaches only the tokens before the first boundary
(``a`` masked) and crosses the slice only if it has none (``lam^C`` -> 0); the backward mirrors it
(``b`` masked to the last document, ``dS_in`` kept only if the slice starts inside the document).

Per-token gates (``g``, ``slopes=None``): the same schedule with the slice's own transform
(``a``, ``b`` and the carry from its cumulative gate); ``S_out`` is kept for ``dg``, formed from the
slice's total gradients and ``<dS, S_out>`` (``parallel/README.md``, "Per-token gates").

Initial state ``h0``: the first rank's ``S_in`` (its hop starts from it instead of a received
state); in the backward the first rank keeps the ``dS_in`` it would send to a rank before it, which
is the gradient of ``h0`` (``parallel/README.md``, "The initial state"). The final state, when
asked for: the last rank's ``S_out`` (its hop keeps it), given to every rank by one all-reduce; its
gradient, summed over the ranks, is where the last rank's backward hop starts.
"""

from __future__ import annotations

from typing import Optional

import torch.distributed as dist

from megatron_lasp.ops.lightning_attn import lightning_attn_bwd_phases, lightning_attn_fwd_phases
from megatron_lasp.parallel.comm import GroupInfo, from_last_rank, group_info, state_dtype
from megatron_lasp.parallel.slices import (
    SliceDecays,
    SliceDocs,
    SliceFunction,
    SliceTransform,
    add_state_term,
    leaving_state_grads,
    with_entry_state,
)
from megatron_lasp.parallel.hop import StateHop

__all__ = ["lasp_attention"]


class _LaspFunction(SliceFunction):
    N_INPUTS = SliceFunction.N_INPUTS + 1  # overlap

    @staticmethod
    def forward(ctx, q, k, v, slopes, g, h0, want_final: bool, info: GroupInfo, backend,
                docs: Optional[SliceDocs] = None, triton_options=None, overlap: bool = True):
        B, C, H, Dk = q.shape
        # 1. post the receive of S_in (the first rank starts from h0; the last keeps its S_out,
        # the final state, when it is wanted)
        hop = StateHop((B, H, Dk, v.shape[-1]), state_dtype(q.dtype), q.device, info, forward=True, entry=h0,
                       keep_end=want_final)
        if not overlap:
            hop.wait()
        # 2. the state-only pass: S_loc before any output is computed
        s_loc, finish = lightning_attn_fwd_phases(q, k, v, slopes, backend, g=g,
                                                  doc_ids=None if docs is None else docs.local,
                                                  triton_options=triton_options)
        dec = SliceDecays.for_slice(slopes, g, C)
        tr = SliceTransform.of(dec, docs, info.rank)
        if overlap:
            # 3. wait for S_in, send S_out on at once (side stream on CUDA)
            s_in = hop.pass_on(s_loc, tr)
            # 4. the output pass while the state travels
            o, saved = finish()
        else:
            o, saved = finish()
            s_in = hop.pass_on(s_loc, tr)
        hop.join()
        # 5. the entering state's term
        if s_in is not None:
            add_state_term(o, q, s_in, tr.w_in)
        hop.finish()
        final = None if not want_final else from_last_rank(hop.end, s_loc, info)
        # per-token gates: dg needs the state leaving the slice (s_loc became it when passed on)
        s_out = s_loc if g is not None and (info.next is not None or want_final) else None
        SliceFunction.keep(ctx, saved, (q, k, v, slopes, g, s_in, s_out), (info, docs, overlap))
        ctx.want_final = want_final
        return o, final

    @staticmethod
    def backward(ctx, do, d_final):
        (q, k, v, slopes, g, s_in, s_out), saved, (info, docs, overlap) = SliceFunction.restore(ctx)
        B, C, H, Dk = q.shape
        # the last rank starts from the final state's gradient; the first keeps what it would send
        # to a rank before it: the gradient of h0
        hop = StateHop((B, H, Dk, v.shape[-1]), state_dtype(q.dtype), q.device, info, forward=False,
                       entry=SliceFunction.final_grad(ctx, d_final, info),
                       keep_end=SliceFunction.needs_initial_grad(ctx))
        if not overlap:
            hop.wait()
        dec = SliceDecays.for_slice(slopes, g, C)
        tr = SliceTransform.of(dec, docs, info.rank)
        if s_in is not None:
            saved = with_entry_state(saved, s_in, slopes, docs, dec)
        # 1. the state-gradient pass: the local part of dS_in first
        ds_loc, finish = lightning_attn_bwd_phases(q, k, v, slopes, do, saved=saved)
        # 2. wait for dS, send dS_in on at once (side stream on CUDA); the kernel's dS_0 is for
        # the slice's first document
        if overlap:
            ds = hop.pass_on(ds_loc, tr.transpose, tr.keep_in)
            # 3. the slice's gradients while the state gradient travels
            grads = finish()
        else:
            grads = finish()
            ds = hop.pass_on(ds_loc, tr.transpose, tr.keep_in)
        dq, dk, dv = grads[:3]
        hop.join()
        want_g = g is not None and ctx.needs_input_grad[4]
        dg = leaving_state_grads(k, v, dk, dv, ds, tr.w_out, s_out, g if want_g else None,
                                 grads[3] if want_g else None, docs)
        hop.finish()
        dh0 = SliceFunction.initial_grad(ctx, info.rank, hop.end, ds_loc)
        return _LaspFunction.input_grads(dq, dk, dv, dg, dh0)


def lasp_attention(q, k, v, slopes, group: dist.ProcessGroup, backend: Optional[str] = None,
                   docs: Optional[SliceDocs] = None, triton_options=None, *, g=None, initial_state=None,
                   output_final_state: bool = False, overlap: bool = True):
    """LASP-1 over ``group`` (inputs already validated by :func:`megatron_lasp.parallel.lightning_attn_sp`).

    Args:
        q, k: ``[B, C, H, Dk]``; v: ``[B, C, H, Dv]``: this rank's slice of the sequence.
        slopes: ``[H]`` fp32, the fixed decay; None with ``g``.
        group: the sequence-parallel group.
        backend: kernel backend.
        docs: packed documents (:class:`megatron_lasp.parallel.slices.SliceDocs`), or None.
        triton_options: the triton backend's :class:`megatron_lasp.ops.lightning_attn.TritonOptions`,
            or None.
        g: per-token gates ``[B, C, H]`` (log-decays ``<= 0``, this rank's slice) with
            ``slopes=None``; its gradient flows when it requires one.
        initial_state: ``[B, H, Dk, Dv]`` in the state dtype (fp32; fp64 for fp64 inputs), the
            state entering the group's first slice, the same on every rank, or None (zero). Its
            gradient: the whole one on the group's first rank, zeros on the others.
        output_final_state: also return the state after the group's last slice, the same on every
            rank; the gradients that reach it on the ranks are summed.
        overlap: the schedule above; False waits for the incoming state (gradient) before the
            kernel and sends after it, so each rank waits for every kernel before it (the same
            results: the baseline that ``benchmarks/gpu_check_sp.py`` times the overlap against).

    Returns:
        ``o [B, C, H, Dv]``, this rank's slice of the output; ``(o, final_state [B, H, Dk, Dv])``
        (state dtype) with ``output_final_state``.
    """
    o, final = _LaspFunction.apply(q, k, v, slopes, g, initial_state, output_final_state, group_info(group), backend,
                                   docs, triton_options, overlap)
    return (o, final) if output_final_state else o
