"""Causal softmax attention from library kernels (torch SDPA, flex_attention), for the hybrid models.

Layout: q ``[B, Tq, Hq, D]``, k ``[B, Tk, Hkv, D]``, v ``[B, Tk, Hkv, Dv]`` (``Hq`` a multiple of
``Hkv``: grouped-query attention), ``Tk >= Tq``. The queries are the **last** ``Tq`` positions of
the ``Tk`` keys (flash-attention's bottom-right causal alignment): query ``i`` sits at position
``Tk - Tq + i`` and sees key ``j`` iff ``j <= Tk - Tq + i`` (and, with packed documents, the two
lie in the same document). That one convention covers the whole sequence on one device
(``Tq = Tk``), a rank's slice against the gathered prefix (sequence parallelism, ``all-gather``)
and the last tokens of a generation step against the KV cache.

API:
    ``softmax_attn(q, k, v, *, q_docs=None, k_docs=None, scale=None, kernel="auto") -> o``
    ``auto_kernel(device_type, dtype, documents) -> str``: what ``kernel="auto"`` runs.
    ``naive_softmax_attn(q, k, v, cu_seqlens=None, scale=None) -> o`` (fp64-ready reference, one
    document at a time, explicit softmax).

Files: ``kernels.py`` (the dispatch to the library kernels), ``naive.py`` (the reference).
README.md: the kernels, their masks and when each is used.
"""

from .kernels import SOFTMAX_KERNELS, auto_kernel, softmax_attn
from .naive import naive_softmax_attn

__all__ = ["SOFTMAX_KERNELS", "auto_kernel", "softmax_attn", "naive_softmax_attn"]
