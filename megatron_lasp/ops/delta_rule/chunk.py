"""The gated delta rule's entry point: input checks, backend choice and the fla adapter.

Backends: "torch" (``torch_chunk.py``, chunked pure PyTorch, autograd through it) and "fla"
(flash-linear-attention's Triton kernels, ``fla.ops.gated_delta_rule.chunk_gated_delta_rule``,
its own autograd Function). Both take ``[B, T, H, D]`` tensors; the fla backend needs an adapter
only for packed documents, where this repository's convention (documents over the rows laid end to
end, one initial and one final state per row) differs from fla's (``B = 1``, one state per
sequence): :class:`FlaDocuments`.
"""

import dataclasses
import functools
import math
import warnings
from typing import Callable, Optional, Tuple

import torch

from megatron_lasp.ops.lightning_attn.documents import check_cu_seqlens, doc_ids_from_cu_seqlens

from .torch_chunk import torch_chunk_gated_delta_rule

__all__ = ["chunk_gated_delta_rule", "resolve_backend", "FlaDocuments", "BACKENDS"]

BACKENDS = ("torch", "fla")
_WHERE = "gated delta rule"
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@functools.lru_cache(maxsize=None)
def _fla_op() -> Optional[Callable]:
    """fla's ``chunk_gated_delta_rule``, or None when fla does not import (looked up once)."""
    try:
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule as fla_chunk_gated_delta_rule
    except ImportError:
        return None
    return fla_chunk_gated_delta_rule


@functools.lru_cache(maxsize=None)
def _warn_no_fla() -> None:
    warnings.warn("gated delta rule: flash-linear-attention (fla) is not installed, so CUDA tensors run on the "
                  "chunked PyTorch backend (slow); `pip install flash-linear-attention` for the Triton kernels",
                  stacklevel=3)


def resolve_backend(backend: Optional[str], device: torch.device) -> str:
    """The backend: the argument, else "fla" for CUDA tensors when fla imports, else "torch".

    CUDA tensors without fla fall back to "torch" with one warning per process. Raises
    ``ValueError`` for an unknown name, or "fla" on a non-CUDA device or without fla.
    """
    if backend is None:
        if device.type != "cuda":
            return "torch"
        if _fla_op() is not None:
            return "fla"
        _warn_no_fla()
        return "torch"
    if backend not in BACKENDS:
        raise ValueError(f"{_WHERE}: unknown backend {backend!r}; choose one of {BACKENDS} or None (automatic)")
    if backend == "fla":
        if device.type != "cuda":
            raise ValueError(f"{_WHERE}: the fla backend needs CUDA tensors (got {device.type}); use backend='torch'")
        if _fla_op() is None:
            raise ValueError(f"{_WHERE}: the fla backend needs flash-linear-attention "
                             "(`pip install flash-linear-attention`); or use backend='torch'")
    return backend


def _check_inputs(q, k, v, g, beta, scale, initial_state, backend: str) -> None:
    """Raise ``ValueError`` with a one-line message for unsupported shapes, dtypes, devices or values."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            raise ValueError(f"{_WHERE}: {name} must be a 4-d tensor [B, T, H, D], got {getattr(x, 'shape', type(x))}")
    allowed = _FLOAT_DTYPES + ((torch.float64,) if backend == "torch" else ())
    if q.dtype not in allowed:
        raise ValueError(f"{_WHERE}: dtype {q.dtype} is not supported by the {backend} backend; use one of {allowed}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"{_WHERE}: q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.shape != q.shape:
        raise ValueError(f"{_WHERE}: k must have q's shape [B, T, H, Dk] {tuple(q.shape)}, got {tuple(k.shape)}")
    B, T, H, Dk = q.shape
    if v.shape[:3] != q.shape[:3]:
        raise ValueError(f"{_WHERE}: v must be [B, T, H, Dv] with q's B, T, H {(B, T, H)}, got {tuple(v.shape)}")
    Dv = v.shape[3]
    if min(B, T, H, Dk, Dv) < 1:
        raise ValueError(f"{_WHERE}: empty input, q {tuple(q.shape)}, v {tuple(v.shape)}")
    for name, x in (("g", g), ("beta", beta)):
        if not isinstance(x, torch.Tensor) or tuple(x.shape) != (B, T, H) or not x.is_floating_point():
            got = f"{tuple(x.shape)} {x.dtype}" if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"{_WHERE}: {name} must be a float tensor [B, T, H] = {(B, T, H)}, got {got}")
    if initial_state is not None:
        if not isinstance(initial_state, torch.Tensor) or tuple(initial_state.shape) != (B, H, Dk, Dv):
            raise ValueError(f"{_WHERE}: initial_state must be [B, H, Dk, Dv] = {(B, H, Dk, Dv)}, "
                             f"got {getattr(initial_state, 'shape', type(initial_state))}")
        if not initial_state.is_floating_point():
            raise ValueError(f"{_WHERE}: initial_state must be a float tensor (fp32), got {initial_state.dtype}")
    for name, x in (("k", k), ("v", v), ("g", g), ("beta", beta), ("initial_state", initial_state)):
        if x is not None and x.device != q.device:
            raise ValueError(f"{_WHERE}: {name} is on {x.device} but q is on {q.device}; move all inputs to one device")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))
                              or not math.isfinite(scale)):
        raise ValueError(f"{_WHERE}: scale must be a finite number or None (Dk ** -0.5), got {scale!r}")
    # Values only on the CPU: on a GPU the check would synchronise the host (as for cu_seqlens).
    if g.device.type == "cpu" and not bool((g.detach() <= 0).all()):
        raise ValueError(f"{_WHERE}: g must hold log-decays <= 0 (e.g. -softplus(x) or logsigmoid(x)); "
                         "it has positive or NaN values")
    if beta.device.type == "cpu" and not bool(torch.isfinite(beta.detach()).all()):
        raise ValueError(f"{_WHERE}: beta has inf or NaN values")


@dataclasses.dataclass
class FlaDocuments:
    """Packed documents in fla's varlen form, and the map between the two state conventions.

    fla takes the tokens as one row (``B = 1``) with offsets of its sequences and one initial and
    final state per sequence. The offsets are this repository's ``cu_seqlens`` with the row starts
    merged in and empty documents dropped (they have no effect), so that every sequence is
    non-empty and lies in one row.

    Attributes:
        offsets: int64 ``[N + 1]`` on the CPU, fla's ``cu_seqlens``.
        first: int64 ``[B]``, the sequence that starts row ``b`` (it gets ``initial_state[b]``).
        last: int64 ``[B]``, the sequence that ends row ``b`` (its final state is row ``b``'s).
    """

    offsets: torch.Tensor
    first: torch.Tensor
    last: torch.Tensor

    @classmethod
    def from_cu_seqlens(cls, cu_seqlens: torch.Tensor, B: int, T: int) -> "FlaDocuments":
        """From validated ``cu_seqlens`` over ``B * T`` tokens (moved to the CPU: fla reads them there too)."""
        rows = torch.arange(B + 1, dtype=torch.int64) * T
        offsets = torch.unique(torch.cat([cu_seqlens.detach().to("cpu", torch.int64), rows]))  # sorted
        first = torch.searchsorted(offsets, rows[:-1])
        last = torch.searchsorted(offsets, rows[1:]) - 1
        return cls(offsets, first, last)

    @property
    def num_sequences(self) -> int:
        return self.offsets.numel() - 1

    def initial_states(self, initial_state: torch.Tensor) -> torch.Tensor:
        """``[B, H, Dk, Dv] -> [N, H, Dk, Dv]``: row ``b``'s state for its first sequence, zeros for the others."""
        zeros = initial_state.new_zeros(self.num_sequences, *initial_state.shape[1:])
        return zeros.index_copy(0, self.first.to(initial_state.device), initial_state)

    def final_states(self, final_state: torch.Tensor) -> torch.Tensor:
        """``[N, H, Dk, Dv] -> [B, H, Dk, Dv]``: each row's last sequence's state."""
        return final_state.index_select(0, self.last.to(final_state.device))


def _fla_forward(q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens):
    """The fla backend: gates and states in fp32, packed documents through :class:`FlaDocuments`."""
    op = _fla_op()
    g, beta = g.float(), beta.float()
    h0 = None if initial_state is None else initial_state.float()
    if cu_seqlens is None:
        return op(q, k, v, g, beta, scale=scale, initial_state=h0, output_final_state=output_final_state)
    B, T = q.shape[:2]
    docs = FlaDocuments.from_cu_seqlens(cu_seqlens, B, T)
    flat = [x.reshape(1, B * T, *x.shape[2:]) for x in (q, k, v, g, beta)]
    o, ht = op(*flat, scale=scale, initial_state=None if h0 is None else docs.initial_states(h0),
               output_final_state=output_final_state, cu_seqlens=docs.offsets.to(q.device))
    return o.reshape(v.shape), (None if ht is None else docs.final_states(ht))


def chunk_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: Optional[float] = None,
    initial_state: Optional[torch.Tensor] = None,
    output_final_state: bool = False,
    cu_seqlens: Optional[torch.Tensor] = None,
    backend: Optional[str] = None,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Gated delta rule (Gated DeltaNet's token mixer), autograd-enabled.

    Per batch row and head, ``S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T``
    and ``o_t = S_t^T (scale q_t)``, with ``S`` of shape ``[Dk, Dv]``. No normalisation of ``q`` or
    ``k`` happens here (the recurrence is stable for ``0 <= beta |k|^2 <= 2``, e.g. unit keys and
    ``beta`` in ``[0, 1]``). Gradients flow to every tensor input that requires one.

    Args:
        q, k: ``[B, T, H, Dk]``; v: ``[B, T, H, Dv]`` (fp32, fp16 or bf16; fp64 on "torch").
        g: ``[B, T, H]`` float log-decays (``<= 0``, checked when on the CPU).
        beta: ``[B, T, H]`` float write strengths (finite, checked when on the CPU).
        scale: the factor of ``q``; None means ``Dk ** -0.5``.
        initial_state: ``[B, H, Dk, Dv]`` float ``S_0``, or None (zeros).
        output_final_state: also return the state after the last token.
        cu_seqlens: packed documents, this repository's convention (``lightning_attn/documents.py``):
            int32/int64 ``[N_docs + 1]`` document starts in the ``B * T`` tokens of the rows laid
            end to end, first 0, last ``B * T`` (empty documents allowed); a row start is always a
            document start. The state restarts (zero) at every document start, except that each
            row's first document starts from ``initial_state[b]``; ``final_state[b]`` is the state
            after the row's last document. Values are checked when the tensor is on the CPU.
        backend: "torch", "fla" or None ("fla" for CUDA tensors when fla imports, else "torch").

    Returns:
        ``(o [B, T, H, Dv] in q's dtype, final_state [B, H, Dk, Dv] or None)``; the final state is
        fp32 (fp64 for fp64 inputs).
    """
    backend = resolve_backend(backend, q.device if isinstance(q, torch.Tensor) else torch.device("cpu"))
    _check_inputs(q, k, v, g, beta, scale, initial_state, backend)
    B, T, _, Dk = q.shape
    if cu_seqlens is not None:
        check_cu_seqlens(cu_seqlens, B * T, q.device, where=_WHERE)
    scale = Dk ** -0.5 if scale is None else float(scale)
    if backend == "fla":
        o, final = _fla_forward(q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens)
        return o, (final.float() if output_final_state else None)
    docs = None if cu_seqlens is None else doc_ids_from_cu_seqlens(cu_seqlens, B, T, q.device)
    o, final = torch_chunk_gated_delta_rule(q, k, v, g, beta, scale, initial_state, docs)
    return o, (final if output_final_state else None)
