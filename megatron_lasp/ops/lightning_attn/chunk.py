"""Chunked lightning attention: Triton kernels, the functional fwd/bwd entry points and autograd.

Entry points (same signatures for both backends, see the package docstring):

- :func:`lightning_attn_fwd` / :func:`lightning_attn_bwd`: functional, no autograd; what the
  sequence-parallel layers call.
- :func:`chunk_lightning_attn`: the autograd op; its Function only calls the two above.
"""

import dataclasses
from typing import Optional, Tuple

import torch

from .torch_chunk import TORCH_BLOCK_SIZE, torch_lightning_attn_bwd, torch_lightning_attn_fwd
from .utils import check_inputs, resolve_backend

__all__ = ["LightningAttnSaved", "lightning_attn_fwd", "lightning_attn_bwd", "chunk_lightning_attn"]


@dataclasses.dataclass
class LightningAttnSaved:
    """What the forward keeps for the backward (KV-state caching).

    Attributes:
        backend: the backend that produced it ("triton" or "torch").
        states: fp32 ``[B, H, N, Dk, Dv]``, the state entering each of the ``N`` spans of
            ``span`` tokens (initial state included).
        span: tokens per cached state (the torch backend's block; the triton backend's segment).
    """

    backend: str
    states: torch.Tensor
    span: int


def _triton_fwd(q, k, v, slopes, initial_state, output_final_state):
    raise NotImplementedError("the triton backend is not written yet; use backend='torch'")


def _triton_bwd(q, k, v, slopes, do, d_final_state, saved):
    raise NotImplementedError("the triton backend is not written yet; use backend='torch'")


def lightning_attn_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slopes: torch.Tensor,
    initial_state: Optional[torch.Tensor] = None,
    output_final_state: bool = False,
    backend: Optional[str] = None,
) -> Tuple[torch.Tensor, Optional[torch.Tensor], LightningAttnSaved]:
    """Forward without autograd.

    Args:
        q, k: ``[B, T, H, Dk]``; v: ``[B, T, H, Dv]`` (fp32, fp16 or bf16; fp64 on "torch").
        slopes: ``[H]`` fp32, ``lam_h = exp(-slopes[h])``.
        initial_state: ``[B, H, Dk, Dv]`` fp32 or None (zeros).
        output_final_state: also return the state after the last token.
        backend: "triton", "torch" or None (see :func:`utils.resolve_backend`).

    Returns:
        ``(o [B, T, H, Dv] in q's dtype, final_state fp32 [B, H, Dk, Dv] or None, saved)``;
        ``saved`` is a :class:`LightningAttnSaved` to hand to :func:`lightning_attn_bwd`.
    """
    backend = resolve_backend(backend, q.device)
    check_inputs(q, k, v, slopes, initial_state, backend)
    if backend == "torch":
        o, final, states = torch_lightning_attn_fwd(q, k, v, slopes, initial_state, output_final_state)
        return o, final, LightningAttnSaved("torch", states, TORCH_BLOCK_SIZE)
    return _triton_fwd(q, k, v, slopes, initial_state, output_final_state)


def lightning_attn_bwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slopes: torch.Tensor,
    do: torch.Tensor,
    d_final_state: Optional[torch.Tensor] = None,
    initial_state: Optional[torch.Tensor] = None,
    saved: Optional[LightningAttnSaved] = None,
    backend: Optional[str] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward without autograd.

    Args:
        q, k, v, slopes: the forward's inputs.
        do: ``[B, T, H, Dv]``, gradient of ``o``.
        d_final_state: ``[B, H, Dk, Dv]`` gradient of the final state, or None (zeros).
        initial_state: the forward's initial state; only read when ``saved`` is None.
        saved: the forward's :class:`LightningAttnSaved`; None recomputes the forward states.
        backend: as in :func:`lightning_attn_fwd` (must match ``saved.backend``).

    Returns:
        ``(dq, dk, dv, d_initial_state)``: ``dq``/``dk``/``dv`` in their input's dtype;
        ``d_initial_state`` fp32 ``[B, H, Dk, Dv]`` is always computed (it equals
        ``lam^T dS_T + sum_t lam^(t+1) q_t^T do_t``, which a sequence-parallel layer needs to send
        to the previous rank even when the forward had no initial state).
    """
    backend = resolve_backend(backend, q.device)
    check_inputs(q, k, v, slopes, initial_state, backend)
    if do.shape != v.shape:
        raise ValueError(f"lightning attention: do must have v's shape {tuple(v.shape)}, got {tuple(do.shape)}")
    if d_final_state is not None and d_final_state.shape != (q.shape[0], q.shape[2], q.shape[3], v.shape[3]):
        raise ValueError(f"lightning attention: d_final_state must be [B, H, Dk, Dv], got {tuple(d_final_state.shape)}")
    if saved is None:
        saved = lightning_attn_fwd(q, k, v, slopes, initial_state, False, backend)[2]
    if saved.backend != backend:
        raise ValueError(f"lightning attention: `saved` comes from the {saved.backend} backend, "
                         f"backward asked for {backend}")
    do = do.to(q.dtype)
    if backend == "torch":
        return torch_lightning_attn_bwd(q, k, v, slopes, do, d_final_state, saved.states, saved.span)
    return _triton_bwd(q, k, v, slopes, do, d_final_state, saved)


class _LightningAttnFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, slopes, initial_state, output_final_state, backend):
        o, final, saved = lightning_attn_fwd(q, k, v, slopes, initial_state, output_final_state, backend)
        ctx.save_for_backward(q, k, v, slopes, saved.states)
        ctx.saved_meta = (saved.backend, saved.span)
        ctx.state_dtype = None if initial_state is None else initial_state.dtype
        return o, final

    @staticmethod
    def backward(ctx, do, d_final):
        q, k, v, slopes, states = ctx.saved_tensors
        backend, span = ctx.saved_meta
        saved = LightningAttnSaved(backend, states, span)
        dq, dk, dv, dh0 = lightning_attn_bwd(q, k, v, slopes, do, d_final, None, saved, backend)
        if ctx.state_dtype is None:
            dh0 = None
        else:
            dh0 = dh0.to(ctx.state_dtype)
        return dq, dk, dv, None, dh0, None, None


def chunk_lightning_attn(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slopes: torch.Tensor,
    initial_state: Optional[torch.Tensor] = None,
    output_final_state: bool = False,
    backend: Optional[str] = None,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Causal linear attention with per-head constant decay (lightning attention), autograd-enabled.

    ``o_t = sum_{s<=t} lam^(t-s) (q_t . k_s) v_s + lam^(t+1) q_t S_0`` with ``lam = exp(-slopes)``;
    no softmax, scaling or normalisation.

    Args:
        q, k: ``[B, T, H, Dk]``; v: ``[B, T, H, Dv]`` (fp32, fp16 or bf16); Dk, Dv <= 256.
        slopes: ``[H]`` fp32 (no gradient).
        initial_state: ``[B, H, Dk, Dv]`` fp32 ``S_0`` or None.
        output_final_state: return ``S_T = lam^T S_0 + sum_s lam^(T-1-s) k_s^T v_s``.
        backend: "triton", "torch", or None (triton on CUDA, torch otherwise;
            ``$MEGATRON_LASP_KERNEL_BACKEND`` overrides the default).

    Returns:
        ``(o [B, T, H, Dv] in q's dtype, final_state fp32 [B, H, Dk, Dv] or None)``.
    """
    return _LightningAttnFunction.apply(q, k, v, slopes, initial_state, output_final_state, backend)
