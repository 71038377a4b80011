"""Lightning attention: causal linear attention with a per-head constant decay.

Layout: q, k ``[B, T, H, Dk]``, v ``[B, T, H, Dv]``, slopes ``[H]`` (``lam = exp(-slopes)``),
states ``[B, H, Dk, Dv]`` fp32. Math and derivations: README.md in this folder.

Autograd API:
    ``chunk_lightning_attn(q, k, v, slopes, initial_state=None, output_final_state=False,
    backend=None, cu_seqlens=None) -> (o, final_state)`` and the reference
    ``naive_recurrent_lightning_attn`` (same, no ``backend``; token by token, fp32).
    ``cu_seqlens``: packed documents, flash-attention's convention (``documents.py``); the state
    restarts at every document start.

Functional API (no autograd; what the sequence-parallel layers build on):
    ``lightning_attn_fwd(q, k, v, slopes, initial_state, output_final_state, backend)
    -> (o, final_state, saved)`` and
    ``lightning_attn_bwd(q, k, v, slopes, do, *, saved, d_final_state=None)
    -> (dq, dk, dv, d_initial_state)``.
    ``saved`` (:class:`LightningAttnSaved`) holds the cached states of the forward (KV-state
    caching) and its backend, which the backward runs on; ``d_final_state`` may be None (zero).
    ``d_initial_state`` is always computed (fp32). An autograd Function keeps ``saved`` with
    ``saved.save_to(ctx, *tensors)`` and gets it back with ``LightningAttnSaved.restore_from(ctx)``.
    ``lightning_attn_fwd_phases`` / ``lightning_attn_bwd_phases``: the same split in two, the
    state-only pass first (``final_state`` / ``d_initial_state`` at once), the rest in ``finish()``.
    By linearity, a layer that adds ``decay_powers(slopes, T)[:, t] * (q_t @ S_in)`` itself can
    run fwd with ``initial_state=None`` and bwd with ``d_final_state=None``.

Per-token gates (data-dependent decay, ``gate.py``): every entry point above takes the keyword
``g`` (``[B, T, H]`` float log-decays ``<= 0``, ``S_t = exp(g_t) S_{t-1} + k_t^T v_t``) with
``slopes=None``; the fixed decay is ``g = -slopes``. The backward then also returns ``dg``
(``lightning_attn_bwd -> (dq, dk, dv, d_initial_state, dg)``, the phases' ``finish() -> (dq, dk,
dv, dg)``) and ``chunk_lightning_attn`` gives ``g`` its gradient. For the sequence-parallel
layers: :class:`SliceGate` (how a slice transforms a state crossing it, per row and head, in log
space, documents included) and :func:`gate_grad` (``dg`` from a slice's total ``dq``, ``dk``, final
state and its gradient).

Backends: "triton" (CUDA; CPU only under ``TRITON_INTERPRET=1``) and "torch" (chunked pure
PyTorch, the CPU training path). Default: triton for CUDA tensors, torch otherwise. The triton
backend takes ``triton_options`` (:class:`TritonOptions`: launch overrides for benchmark sweeps,
NaN-poisoned buffers for tests) in the forward; the backward reuses them through ``saved``.

Files: ``chunk.py`` the entry points above (validation, backend dispatch, autograd);
``torch_chunk.py`` and ``triton_chunk.py`` the two backends (the latter: the Triton kernels, their
launch heuristic and launches); ``naive.py`` the references; ``documents.py`` packed documents;
``utils.py`` input checks, backend choice and decay helpers.
"""

from .chunk import (
    LightningAttnSaved,
    TritonOptions,
    chunk_lightning_attn,
    lightning_attn_bwd,
    lightning_attn_bwd_phases,
    lightning_attn_fwd,
    lightning_attn_fwd_phases,
)
from .documents import check_cu_seqlens, cu_seqlens_from_position_ids, doc_ids_from_cu_seqlens
from .gate import SliceGate, block_cumsum, gate_grad, reverse_cumsum_docs, segment_gate_grad
from .naive import naive_chunk_lightning_attn, naive_recurrent_lightning_attn
from .utils import MAX_HEAD_DIM, decay_powers, state_decay

__all__ = [
    "chunk_lightning_attn",
    "naive_recurrent_lightning_attn",
    "naive_chunk_lightning_attn",
    "lightning_attn_fwd",
    "lightning_attn_bwd",
    "lightning_attn_fwd_phases",
    "lightning_attn_bwd_phases",
    "LightningAttnSaved",
    "TritonOptions",
    "decay_powers",
    "state_decay",
    "MAX_HEAD_DIM",
    "check_cu_seqlens",
    "cu_seqlens_from_position_ids",
    "doc_ids_from_cu_seqlens",
    "SliceGate",
    "gate_grad",
    "segment_gate_grad",
    "block_cumsum",
    "reverse_cumsum_docs",
]
