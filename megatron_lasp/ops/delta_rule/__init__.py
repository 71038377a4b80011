"""Gated delta rule: Gated DeltaNet's token mixer, a linear-attention recurrence with error correction.

Layout: q, k ``[B, T, H, Dk]``, v ``[B, T, H, Dv]`` (``Dv`` may differ from ``Dk``), g and beta
``[B, T, H]`` (log-decays ``<= 0`` and write strengths), states ``[B, H, Dk, Dv]`` fp32 (fp64 for
fp64 inputs). Per row and head::

    S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T,     o_t = S_t^T (scale q_t)

Math, the chunked form and its derivation: README.md in this folder.

Autograd API:
    ``chunk_gated_delta_rule(q, k, v, g, beta, scale=None, initial_state=None,
    output_final_state=False, cu_seqlens=None, backend=None) -> (o, final_state)`` and the
    reference ``naive_recurrent_gated_delta_rule`` (same, no ``backend``; token by token).
    ``scale`` None means ``Dk ** -0.5``; ``final_state`` is None unless asked for. Gradients flow
    to q, k, v, g, beta and initial_state. ``cu_seqlens``: packed documents in this repository's
    convention (``lightning_attn/documents.py``): document starts over the ``B * T`` tokens of the
    rows laid end to end; the state restarts at every document start, ``initial_state[b]`` feeds
    row ``b``'s first document and ``final_state[b]`` is the state after its last one.

Sequence parallelism: the op is linear in the state that enters it; running it on ``[v | 0]``
from ``[0 | I]`` gives a slice's local output and state together with how it maps an entering
state (README.md, "Sequence parallelism").

Backends: "torch" (chunked pure PyTorch, the WY / UT-transform form, backward by autograd; the CPU
path) and "fla" (flash-linear-attention's Triton kernels, CUDA only). Default: "fla" for CUDA
tensors when fla imports, "torch" otherwise (on CUDA with one warning).

Files: ``chunk.py`` the entry point (validation, backend choice, the adapter of packed documents
to fla's per-sequence states, :class:`FlaDocuments`); ``torch_chunk.py`` the chunked PyTorch
backend; ``naive.py`` the reference. Packed-document helpers come from ``lightning_attn.documents``
and the gate factors of the chunked form from ``lightning_attn.torch_chunk``.
"""

from .chunk import BACKENDS, FlaDocuments, chunk_gated_delta_rule, resolve_backend
from .naive import naive_recurrent_gated_delta_rule
from .torch_chunk import CHUNK_SIZE, torch_chunk_gated_delta_rule

__all__ = [
    "chunk_gated_delta_rule",
    "naive_recurrent_gated_delta_rule",
    "torch_chunk_gated_delta_rule",
    "FlaDocuments",
    "resolve_backend",
    "BACKENDS",
    "CHUNK_SIZE",
]
