"""Input checks, backend choice and decay helpers shared by the lightning-attention backends."""

from typing import Optional

import torch

from megatron_lasp.ops import interpreting

__all__ = ["decay_powers", "state_decay", "resolve_backend", "check_inputs", "MAX_HEAD_DIM", "BACKENDS"]

MAX_HEAD_DIM = 256
BACKENDS = ("triton", "torch")
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def decay_powers(slopes: torch.Tensor, length: int, reverse: bool = False) -> torch.Tensor:
    """Per-position decay factors of a slice of ``length`` tokens, fp32 ``[H, length]``.

    ``reverse=False``: ``lam^(t+1)``, the weight of the state entering the slice at token ``t``
    (the ``a`` of ``parallel/README.md``). ``reverse=True``: ``lam^(length-1-t)``, the weight of token ``t`` in
    the state leaving the slice (the ``b`` of ``parallel/README.md``). ``lam = exp(-slopes)``.
    """
    t = torch.arange(length, device=slopes.device, dtype=torch.float32)
    expo = (length - 1 - t) if reverse else (t + 1)
    return torch.exp(-slopes.float()[:, None] * expo[None, :])


def state_decay(slopes: torch.Tensor, length: int) -> torch.Tensor:
    """``lam^length`` per head, fp32 ``[H]``: the decay of a state carried across ``length`` tokens."""
    return torch.exp(-slopes.float() * float(length))


def resolve_backend(backend: Optional[str], device: torch.device) -> str:
    """Pick the backend: the argument, else by device.

    ``None`` means "triton" for CUDA tensors and "torch" otherwise. Raises ``ValueError`` for an
    unknown name or for "triton" on CPU without ``TRITON_INTERPRET=1``.
    """
    if backend is None:
        backend = "triton" if device.type == "cuda" else "torch"
    if backend not in BACKENDS:
        raise ValueError(f"lightning attention: unknown backend {backend!r}; choose one of {BACKENDS}")
    if backend == "triton" and device.type != "cuda":
        if device.type != "cpu" or not interpreting():
            raise ValueError(f"lightning attention: the triton backend needs CUDA tensors (got {device.type}); "
                             "on CPU set TRITON_INTERPRET=1 to run it in Triton's interpreter, or use backend='torch'")
    return backend


def check_inputs(q, k, v, slopes, initial_state=None, backend: str = "torch") -> None:
    """Raise ``ValueError`` with a clear message for unsupported shapes, dtypes or devices."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            raise ValueError(f"lightning attention: {name} must be a 4-d tensor [B, T, H, D], "
                             f"got {getattr(x, 'shape', type(x))}")
    allowed = _FLOAT_DTYPES + ((torch.float64,) if backend == "torch" else ())
    if q.dtype not in allowed:
        raise ValueError(f"lightning attention: dtype {q.dtype} is not supported by the {backend} backend; "
                         f"use one of {allowed}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"lightning attention: q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.shape != q.shape:
        raise ValueError(f"lightning attention: k must have q's shape [B, T, H, Dk] {tuple(q.shape)}, "
                         f"got {tuple(k.shape)}")
    B, T, H, Dk = q.shape
    if v.shape[:3] != q.shape[:3]:
        raise ValueError(f"lightning attention: v must be [B, T, H, Dv] with q's B, T, H {(B, T, H)}, "
                         f"got {tuple(v.shape)}")
    Dv = v.shape[3]
    if T < 1 or B < 1 or H < 1:
        raise ValueError(f"lightning attention: empty input of shape {tuple(q.shape)}")
    if Dk > MAX_HEAD_DIM or Dv > MAX_HEAD_DIM or Dk < 1 or Dv < 1:
        raise ValueError(f"lightning attention: head dims Dk={Dk}, Dv={Dv} unsupported; "
                         f"both must be in [1, {MAX_HEAD_DIM}]")
    tensors = [("k", k), ("v", v)]
    if slopes is not None:  # None: per-token gates instead (checked by gate.check_gate)
        if not isinstance(slopes, torch.Tensor) or slopes.shape != (H,) or not slopes.is_floating_point():
            raise ValueError(f"lightning attention: slopes must be a float tensor of shape [H] = ({H},), "
                             f"got {getattr(slopes, 'shape', type(slopes))}")
        tensors.append(("slopes", slopes))
    if initial_state is not None:
        if not isinstance(initial_state, torch.Tensor) or initial_state.shape != (B, H, Dk, Dv):
            raise ValueError(f"lightning attention: initial_state must be [B, H, Dk, Dv] = {(B, H, Dk, Dv)}, "
                             f"got {getattr(initial_state, 'shape', type(initial_state))}")
        if not initial_state.is_floating_point():
            raise ValueError("lightning attention: initial_state must be a float tensor (fp32)")
        tensors.append(("initial_state", initial_state))
    for name, x in tensors:
        if x.device != q.device:
            raise ValueError(f"lightning attention: {name} is on {x.device} but q is on {q.device}; "
                             "move all inputs to one device")
