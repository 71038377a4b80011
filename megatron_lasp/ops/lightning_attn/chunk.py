"""Chunked lightning attention: the functional fwd/bwd entry points, backend dispatch and autograd.

The backends live beside this file: ``torch_chunk.py`` (pure PyTorch) and ``triton_chunk.py``
(the Triton kernels and their launch heuristic). This module validates the inputs, picks the
backend and wraps its result in a :class:`LightningAttnSaved`.

Entry points (same signatures for both backends, see the package docstring):

- :func:`lightning_attn_fwd` / :func:`lightning_attn_bwd`: functional, no autograd; what the
  sequence-parallel layers call.
- :func:`chunk_lightning_attn`: the autograd op; its Function only calls the two above.
"""

import dataclasses
from typing import Any, Callable, Optional, Tuple

import torch

from .documents import check_cu_seqlens, check_doc_ids, doc_ids_from_cu_seqlens
from .gate import block_cumsum, check_gate, segment_gate_grad
from .torch_chunk import (
    TORCH_BLOCK_SIZE,
    torch_lightning_attn_bwd_phases,
    torch_lightning_attn_fwd_phases,
)
from .triton_chunk import (
    TritonOptions,
    triton_gated_fwd_phases,
    triton_lightning_attn_bwd_phases,
    triton_lightning_attn_fwd_phases,
)
from .utils import check_inputs, resolve_backend

__all__ = ["LightningAttnSaved", "TritonOptions", "lightning_attn_fwd", "lightning_attn_bwd",
           "lightning_attn_fwd_phases", "lightning_attn_bwd_phases", "chunk_lightning_attn"]


@dataclasses.dataclass
class LightningAttnSaved:
    """What the forward keeps for the backward (KV-state caching).

    Attributes:
        backend: the backend that produced it ("triton" or "torch"); the backward runs on it.
        states: fp32 ``[B, H, N, Dk, Dv]``, the state entering each of the ``N`` spans of
            ``span`` tokens (initial state included).
        span: tokens per cached state (the torch backend's block; the triton backend's segment).
        config: the triton launch configuration (the backward must use the forward's).
        doc_ids: ``[B, T]`` int32 document ids of packed documents, or None (see ``documents.py``).
        gc: per-token gates only: ``[B, H, T']`` fp32 (fp64 for fp64 inputs), the gates' cumulative
            sums restarted every ``block`` tokens (``gate.block_cumsum``); None for a fixed decay.
        final_state: per-token gates only: ``[B, H, Dk, Dv]``, the state after the last token
            (always kept: ``dg`` needs it when a final-state gradient comes back).
        block: the block of ``gc`` (the torch backend's block; the triton backend's ``BT``).
    """

    backend: str
    states: torch.Tensor
    span: int
    config: Any = None
    doc_ids: Optional[torch.Tensor] = None
    gc: Optional[torch.Tensor] = None
    final_state: Optional[torch.Tensor] = None
    block: int = 0

    @property
    def gated(self) -> bool:
        """Whether the forward ran with per-token gates (the backward then also returns ``dg``)."""
        return self.gc is not None

    def save_to(self, ctx, *tensors: Optional[torch.Tensor]) -> None:
        """Keep ``tensors`` and this record on an autograd ``ctx`` (its tensors through
        ``ctx.save_for_backward``); :meth:`restore_from` gives both back in the backward."""
        ctx.save_for_backward(*tensors, self.states, self.doc_ids, self.gc, self.final_state)
        ctx.lightning_attn_saved = (self.backend, self.span, self.config, self.block)

    @classmethod
    def restore_from(cls, ctx) -> Tuple[tuple, "LightningAttnSaved"]:
        """``(tensors, saved)``: what :meth:`save_to` kept on ``ctx``, in the order given."""
        *tensors, states, doc_ids, gc, final_state = ctx.saved_tensors
        backend, span, config, block = ctx.lightning_attn_saved
        return tuple(tensors), cls(backend, states, span, config, doc_ids, gc, final_state, block)


def _check_do(do, v) -> None:
    if do.shape != v.shape:
        raise ValueError(f"lightning attention: do must have v's shape {tuple(v.shape)}, got {tuple(do.shape)}")


def lightning_attn_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slopes: torch.Tensor,
    initial_state: Optional[torch.Tensor] = None,
    output_final_state: bool = False,
    backend: Optional[str] = None,
    *,
    g: Optional[torch.Tensor] = None,
    cu_seqlens: Optional[torch.Tensor] = None,
    doc_ids: Optional[torch.Tensor] = None,
    triton_options: Optional[TritonOptions] = None,
) -> Tuple[torch.Tensor, Optional[torch.Tensor], LightningAttnSaved]:
    """Forward without autograd.

    Args:
        q, k: ``[B, T, H, Dk]``; v: ``[B, T, H, Dv]`` (fp32, fp16 or bf16; fp64 on "torch").
        slopes: ``[H]`` fp32, ``lam_h = exp(-slopes[h])``; None with ``g``.
        initial_state: ``[B, H, Dk, Dv]`` fp32 or None (zeros).
        output_final_state: also return the state after the last token.
        backend: "triton", "torch" or None (see :func:`utils.resolve_backend`).
        g: per-token gates ``[B, T, H]`` (log-decays ``<= 0``; ``S_t = exp(g_t) S_{t-1} + k_t^T v_t``)
            instead of ``slopes``; the backward then also returns ``dg``.
        cu_seqlens: packed documents, ``[N + 1]`` int starts over the ``B * T`` tokens (first 0,
            last ``B * T``; see ``documents.py``), or None. The state restarts at every document
            start; ``initial_state`` feeds only each row's first document and the final state is
            its last document's.
        doc_ids: the same as per-token document ids ``[B, T]`` (non-decreasing per row), instead
            of ``cu_seqlens`` (what the sequence-parallel layers pass).
        triton_options: launch overrides and buffer poisoning of the triton backend
            (:class:`TritonOptions`; the backward reuses them through ``saved``); ignored by "torch".

    Returns:
        ``(o [B, T, H, Dv] in q's dtype, final_state fp32 [B, H, Dk, Dv] or None, saved)``;
        ``saved`` is a :class:`LightningAttnSaved` to hand to :func:`lightning_attn_bwd`.
    """
    backend = resolve_backend(backend, q.device)
    check_inputs(q, k, v, slopes, initial_state, backend)
    check_gate(g, q, slopes)
    docs = resolve_doc_ids(q, cu_seqlens, doc_ids)
    final, finish = _fwd_phases(q, k, v, slopes, g, initial_state, output_final_state, backend, docs, triton_options)
    o, saved = finish()
    return o, final, saved


def resolve_doc_ids(q: torch.Tensor, cu_seqlens, doc_ids) -> Optional[torch.Tensor]:
    """Check ``cu_seqlens`` / ``doc_ids`` and return the ``doc_ids [B, T]`` (or None)."""
    B, T = q.shape[:2]
    if cu_seqlens is not None and doc_ids is not None:
        raise ValueError("lightning attention: give cu_seqlens or doc_ids, not both")
    if cu_seqlens is not None:
        check_cu_seqlens(cu_seqlens, B * T, q.device)
        return doc_ids_from_cu_seqlens(cu_seqlens, B, T, q.device)
    if doc_ids is not None:
        check_doc_ids(doc_ids, B, T, q.device)
    return doc_ids


def lightning_attn_bwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slopes: torch.Tensor,
    do: torch.Tensor,
    *,
    saved: Optional[LightningAttnSaved] = None,
    d_final_state: Optional[torch.Tensor] = None,
    initial_state: Optional[torch.Tensor] = None,
    backend: Optional[str] = None,
    cu_seqlens: Optional[torch.Tensor] = None,
    doc_ids: Optional[torch.Tensor] = None,
    g: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, ...]:
    """Backward without autograd.

    Args:
        q, k, v, slopes: the forward's inputs.
        do: ``[B, T, H, Dv]``, gradient of ``o``.
        saved: the forward's :class:`LightningAttnSaved` (the backward runs on its backend); None
            recomputes the forward states.
        d_final_state: ``[B, H, Dk, Dv]`` gradient of the final state, or None (zeros).
        initial_state, cu_seqlens, doc_ids, g: the forward's; only read when ``saved`` is None
            (``saved`` carries the states, the documents and the gates' cumulative sums).
        backend: the backend to recompute with when ``saved`` is None (as in
            :func:`lightning_attn_fwd`); with ``saved``, None or ``saved.backend``.

    Returns:
        ``(dq, dk, dv, d_initial_state)``: ``dq``/``dk``/``dv`` in their input's dtype;
        ``d_initial_state`` fp32 ``[B, H, Dk, Dv]`` is always computed (it equals
        ``lam^T dS_T + sum_t lam^(t+1) q_t^T do_t``, which a sequence-parallel layer needs to send
        to the previous rank even when the forward had no initial state). With per-token gates
        (``saved.gated``) a fifth entry ``dg [B, T, H]`` fp32 (fp64 for fp64 inputs).
    """
    if saved is not None:
        if backend is not None and backend != saved.backend:
            raise ValueError(f"lightning attention: `saved` comes from the {saved.backend} backend, "
                             f"backward asked for {backend}")
        backend = saved.backend
    backend = resolve_backend(backend, q.device)
    check_inputs(q, k, v, slopes, initial_state, backend)
    _check_do(do, v)
    if d_final_state is not None and d_final_state.shape != (q.shape[0], q.shape[2], q.shape[3], v.shape[3]):
        raise ValueError(f"lightning attention: d_final_state must be [B, H, Dk, Dv], got {tuple(d_final_state.shape)}")
    if saved is None:
        saved = lightning_attn_fwd(q, k, v, slopes, initial_state, False, backend, g=g,
                                   cu_seqlens=cu_seqlens, doc_ids=doc_ids)[2]
    elif (slopes is None) != saved.gated:
        raise ValueError("lightning attention: the backward needs the forward's decay: slopes for a fixed "
                         "decay, slopes=None for per-token gates (their sums come from `saved`)")
    return _bwd(q, k, v, slopes, do.to(q.dtype), d_final_state, saved)


def lightning_attn_fwd_phases(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slopes: torch.Tensor,
    backend: Optional[str] = None,
    *,
    g: Optional[torch.Tensor] = None,
    doc_ids: Optional[torch.Tensor] = None,
    triton_options: Optional[TritonOptions] = None,
) -> Tuple[torch.Tensor, Callable[[], Tuple[torch.Tensor, LightningAttnSaved]]]:
    """The forward with no initial state in two phases: ``(final_state, finish)``.

    The first phase is the state-only pass (the segment or block states and their scan), so the
    final state is ready before the output is computed; ``finish() -> (o, saved)`` runs the
    output pass. ``final_state``, ``o`` and ``saved`` equal :func:`lightning_attn_fwd`'s (what a
    sequence-parallel layer uses to send its state on before computing its output). ``g``: per-token
    gates instead of ``slopes`` (as in :func:`lightning_attn_fwd`).
    """
    backend = resolve_backend(backend, q.device)
    check_inputs(q, k, v, slopes, None, backend)
    check_gate(g, q, slopes)
    docs = resolve_doc_ids(q, None, doc_ids)
    return _fwd_phases(q, k, v, slopes, g, None, True, backend, docs, triton_options)


def lightning_attn_bwd_phases(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slopes: torch.Tensor,
    do: torch.Tensor,
    *,
    saved: LightningAttnSaved,
) -> Tuple[torch.Tensor, Callable[[], Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]]:
    """The backward with no final-state gradient in two phases: ``(d_initial_state, finish)``.

    The first phase is the state-gradient pass, so ``d_initial_state`` is ready before the
    gradients of the slice; ``finish() -> (dq, dk, dv)``, ``(dq, dk, dv, dg)`` with per-token gates
    (``slopes=None``; ``dg`` of ``finish``'s own terms, summed inside segments: a layer that adds the
    terms of a final-state gradient to ``dk`` adds theirs to ``dg``, see
    ``parallel.slices.leaving_state_grads``, or forms ``dg`` from its totals with :func:`gate.gate_grad`).
    Equal to :func:`lightning_attn_bwd` (on ``saved``'s backend).
    """
    if (slopes is None) != saved.gated:
        raise ValueError("lightning attention: the backward needs the forward's decay: slopes for a fixed "
                         "decay, slopes=None for per-token gates")
    check_inputs(q, k, v, slopes, None, saved.backend)
    _check_do(do, v)
    return _bwd_phases(q, k, v, slopes, do.to(q.dtype), None, saved)


def _fwd_phases(q, k, v, slopes, g, initial_state, output_final_state, backend, docs, triton_options):
    """``(final, finish)``, ``finish() -> (o, saved)``, on validated inputs."""
    if backend == "torch":
        gc = None if g is None else block_cumsum(g, TORCH_BLOCK_SIZE, _state_dtype(q.dtype))
        final, finish = torch_lightning_attn_fwd_phases(q, k, v, slopes, initial_state, doc_ids=docs, gc=gc)

        def torch_finish():
            o, states = finish()
            return o, LightningAttnSaved("torch", states, TORCH_BLOCK_SIZE, None, docs, gc,
                                         None if gc is None else final, TORCH_BLOCK_SIZE)

        return (final if output_final_state else None), torch_finish
    if g is not None:
        return _triton_gated_fwd_phases(q, k, v, g, initial_state, output_final_state, docs, triton_options)
    final, finish = triton_lightning_attn_fwd_phases(q, k, v, slopes, initial_state, output_final_state, docs,
                                                     triton_options)

    def triton_finish():
        o, states, cfg = finish()
        return o, LightningAttnSaved("triton", states, cfg.segment, cfg, docs)

    return final, triton_finish


def _triton_gated_fwd_phases(q, k, v, g, initial_state, output_final_state, docs, triton_options):
    final, finish = triton_gated_fwd_phases(q, k, v, g, initial_state, docs, triton_options)

    def triton_finish():
        o, states, cfg, gc = finish()
        return o, LightningAttnSaved("triton", states, cfg.segment, cfg, docs, gc, final, cfg.block)

    return (final if output_final_state else None), triton_finish


def _state_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _bwd_phases(q, k, v, slopes, do, d_final_state, saved: LightningAttnSaved):
    """``(d_initial_state, finish)``, ``finish() -> (dq, dk, dv)`` (``+ (dg,)`` gated), on validated inputs.

    ``dg`` comes from segment-local sums (README.md, "Gradient of the gates"): ``q.dq - k.dk``
    formed before dq, dk are rounded, and the state gradients at segment ends. The triton backend
    sums them in a kernel of its own; the torch backend hands them to ``gate.segment_gate_grad``."""
    if saved.backend == "triton":
        return triton_lightning_attn_bwd_phases(q, k, v, slopes, do, d_final_state, saved.states, saved.config,
                                                saved.doc_ids, saved.gc, saved.final_state)
    dh0, finish = torch_lightning_attn_bwd_phases(q, k, v, slopes, do, d_final_state, saved.states, saved.span,
                                                  doc_ids=saved.doc_ids, gc=saved.gc, gate_parts=saved.gated)
    if not saved.gated:
        return dh0, finish

    def gated_finish():
        dq, dk, dv, dots, d_states = finish()
        dg = segment_gate_grad(dots, saved.span, saved.states, saved.final_state, d_states, saved.doc_ids)
        return dq, dk, dv, dg

    return dh0, gated_finish


def _bwd(q, k, v, slopes, do, d_final_state, saved: LightningAttnSaved):
    """Backward on already validated inputs (the autograd Function skips the checks).

    ``(dq, dk, dv, d_initial_state)``, ``+ (dg,)`` with per-token gates."""
    dh0, finish = _bwd_phases(q, k, v, slopes, do, d_final_state, saved)
    grads = finish()
    return grads[:3] + (dh0,) + grads[3:]


class _LightningAttnFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, slopes, g, initial_state, output_final_state, backend, cu_seqlens, triton_options):
        o, final, saved = lightning_attn_fwd(q, k, v, slopes, initial_state, output_final_state, backend, g=g,
                                             cu_seqlens=cu_seqlens, triton_options=triton_options)
        saved.save_to(ctx, q, k, v, slopes)
        ctx.state_dtype = None if initial_state is None else initial_state.dtype
        ctx.g_dtype = None if g is None else g.dtype
        return o, final

    @staticmethod
    def backward(ctx, do, d_final):
        (q, k, v, slopes), saved = LightningAttnSaved.restore_from(ctx)
        if do is None:  # only the final state was used
            do = torch.zeros_like(v)
        grads = _bwd(q, k, v, slopes, do.to(q.dtype), d_final, saved)
        dq, dk, dv, dh0 = grads[:4]
        dg = grads[4].to(ctx.g_dtype) if saved.gated and ctx.needs_input_grad[4] else None
        if ctx.state_dtype is None:
            dh0 = None
        else:
            dh0 = dh0.to(ctx.state_dtype)
        return dq, dk, dv, None, dg, dh0, None, None, None, None


def chunk_lightning_attn(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slopes: Optional[torch.Tensor] = None,
    initial_state: Optional[torch.Tensor] = None,
    output_final_state: bool = False,
    backend: Optional[str] = None,
    cu_seqlens: Optional[torch.Tensor] = None,
    *,
    g: Optional[torch.Tensor] = None,
    triton_options: Optional[TritonOptions] = None,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Causal linear attention with per-head constant decay (lightning attention), autograd-enabled.

    ``o_t = sum_{s<=t} lam^(t-s) (q_t . k_s) v_s + lam^(t+1) q_t S_0`` with ``lam = exp(-slopes)``;
    no softmax, scaling or normalisation. With per-token gates ``g`` (and ``slopes=None``) the
    recurrence is ``S_t = exp(g_t) S_{t-1} + k_t^T v_t``, ``o_t = q_t S_t``.

    Args:
        q, k: ``[B, T, H, Dk]``; v: ``[B, T, H, Dv]`` (fp32, fp16 or bf16); Dk, Dv <= 256.
        slopes: ``[H]`` fp32 (no gradient); None with ``g``.
        initial_state: ``[B, H, Dk, Dv]`` fp32 ``S_0`` or None.
        output_final_state: return ``S_T = lam^T S_0 + sum_s lam^(T-1-s) k_s^T v_s``.
        backend: "triton", "torch", or None (triton on CUDA, torch otherwise).
        cu_seqlens: packed documents (flash-attention's convention): int32/int64 ``[N_docs + 1]``
            document starts in the ``B * T`` tokens of the rows laid end to end (for ``B = 1``, in
            the packed sequence), first 0, last ``B * T``; or None. The state restarts at every
            document start: each document gives what it gives alone. ``initial_state`` feeds
            only the first document of each row; the final state is the last document's.
            Values are checked when the tensor is on the CPU (on a GPU, only shape and dtype:
            a value check would synchronise the host).
        g: ``[B, T, H]`` float log-decays (``<= 0``, checked when on the CPU; the fixed decay is
            ``g = -slopes``); a gradient flows to it when it requires one.
        triton_options: see :func:`lightning_attn_fwd`.

    Returns:
        ``(o [B, T, H, Dv] in q's dtype, final_state fp32 [B, H, Dk, Dv] or None)``.
    """
    return _LightningAttnFunction.apply(q, k, v, slopes, g, initial_state, output_final_state, backend, cu_seqlens,
                                        triton_options)
