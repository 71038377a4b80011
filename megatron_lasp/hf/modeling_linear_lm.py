"""Hugging Face model of the megatron-lasp linear LM: pure PyTorch, CPU capable.

Over ~600 lines on purpose: the whole model (attention, cache, layers, generation) ships with every
export as one self-contained file that its users read and load as a unit.

This file is copied, unchanged, into every exported model directory next to
``configuration_linear_lm.py``; it imports only ``torch`` and ``transformers`` (no megatron, no
Triton), so ``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`` works anywhere.

Per block (pre-norm)::

    h = x + o_proj(g * RMSNorm_group(LinAttn(phi(q_proj x'), phi(k_proj x'), psi(v_proj x'))))
    y = h + down_proj(act(gate_proj h') * up_proj h')           # x', h': RMSNorm of x, h

with ``g = sigmoid(g_proj x')`` when ``output_gate``, ``phi`` / ``psi`` the feature maps, ``act``
the identity (SGLU) or SiLU (SwiGLU). ``LinAttn`` is causal linear attention with a fixed decay
``lambda_h = exp(-slope_h)`` per head, no softmax and no denominator::

    o_t = sum_{s <= t} lambda^(t - s) (q_t . k_s) v_s
        = q_t S_t  with  S_t = lambda S_{t-1} + k_t^T v_t   (state [Dk, Dv], fp32)

With ``config.linear_attention_gate`` the decay is learned per token and head instead,
``S_t = exp(g_t) S_{t-1} + k_t^T v_t`` with the log-decay ``g_t <= 0`` computed (fp32) from the
block's normed input ``x'``::

    mamba2:  g_t = -exp(A_log) * softplus(decay_proj x'_t + dt_bias)
    gla:     g_t = logsigmoid(decay_proj x'_t) / gate_logit_normalizer      (decay_proj with bias)

Generation applies each new token's gate to the state in the recurrent step (still O(1) per token).

Prompts run the chunked form (:func:`chunk_linear_attention`, quadratic only inside blocks of
``config.chunk_size`` tokens), which also returns the final state; generation then advances the
state one token at a time (:func:`recurrent_linear_attention`): O(1) memory and work per token.
The states live in :class:`LaspLinearLMCache` (one ``[B, H, Dk, Dv]`` fp32 tensor per layer),
passed as ``cache`` (``past_key_values`` is accepted too) and returned in the output.

Gated DeltaNet (``config.linear_attention_type == "gated_delta_net"``): the linear layers' token
mixer is instead (``Hk`` query/key heads of ``Dk``, ``Hv = r Hk`` value heads of ``Dv``; value head
``j`` reads key head ``j // r``)::

    q, k, v = silu(causal_conv(q_proj x', k_proj x', v_proj x'))     # depthwise, K taps
    q, k = l2norm(q) * Dk^-0.5, l2norm(k);  beta = sigmoid(b_proj x');  g = -exp(A_log) softplus(a_proj x' + dt_bias)
    S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T,   o_t = S_t^T q_t        (state [Dk, Dv], fp32)
    h = x + o_proj(RMSNorm(o) * o_norm.weight * silu(g_proj x'))

Prompts run its chunked (WY) form (:func:`chunk_gated_delta_rule`), generation the recurrent step
(:func:`recurrent_gated_delta_rule`); the cache keeps, per such layer, the state and the last
``K - 1`` convolution inputs (:func:`short_convolution`): still O(1) per token.

Hybrid models (``config.layer_types``): a ``"full_attention"`` layer replaces the token mixer by
causal softmax attention with RoPE (``rope_theta``, rotate-half convention, positions counted from
the row's first token) and ``num_key_value_heads`` key/value heads (GQA); its keys and values go to
a transformers ``DynamicLayer`` of the same cache, while the linear layers keep their O(1) state.

Padding: positions where ``attention_mask`` is 0 contribute nothing to the state (their value
vectors are zeroed), so left-padded batches give the same tokens as unpadded single prompts.

Packed documents: ``cu_seqlens`` (flash-attention's document starts over the ``B * T`` tokens of
the rows laid end to end; ``cu_seq_lens_q`` from transformers' packing collator is read too) or
``position_ids`` that restart at 0 (a token at position 0 after the row start begins a document)
restart the state at every document start, so each document gives the logits it gives alone. A
cache / the state from earlier calls feeds only the first document of each row (the softmax layers
likewise: their cached keys belong to each row's first document).
"""

from __future__ import annotations

import math
from typing import List, Optional, Tuple

import re

import torch
import torch.nn.functional as F
import transformers
from torch import nn

MIN_TRANSFORMERS_VERSION = (5, 17)
"""The oldest ``transformers`` this file is tested with. 4.x computes wrong cached generations
(it feeds the prompt into the recurrent state again at every step), so it is refused."""


def _check_transformers_version(version: str) -> None:
    m = re.match(r"(\d+)\.(\d+)", version)
    if m is None or (int(m.group(1)), int(m.group(2))) < MIN_TRANSFORMERS_VERSION:
        floor = ".".join(map(str, MIN_TRANSFORMERS_VERSION))
        raise ImportError(
            f"this model needs transformers>={floor} (found {version}): pip install 'transformers>={floor},<6'"
        )


_check_transformers_version(transformers.__version__)

from transformers import GenerationMixin, PreTrainedModel  # noqa: E402
from transformers.cache_utils import Cache, DynamicLayer  # noqa: E402
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast  # noqa: E402
from transformers.utils import logging  # noqa: E402

try:  # a package import (megatron_lasp.hf) or a flat one (the exported directory)
    from .configuration_linear_lm import LaspLinearLMConfig
except ImportError:  # pragma: no cover - loaded as a top-level module
    from configuration_linear_lm import LaspLinearLMConfig

logger = logging.get_logger(__name__)

__all__ = [
    "LaspLinearLMCache",
    "LaspLinearLMForCausalLM",
    "LaspLinearLMModel",
    "LaspLinearLMPreTrainedModel",
    "LaspSoftmaxAttention",
    "alibi_slopes",
    "LaspGatedDeltaNet",
    "chunk_gated_delta_rule",
    "chunk_linear_attention",
    "layer_slope_values",
    "layer_slopes",
    "recurrent_gated_delta_rule",
    "recurrent_linear_attention",
    "short_convolution",
]

# transformers renamed the cache field of model outputs from ``past_key_values`` to ``cache``.
_CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"
assert _CACHE_FIELD in BaseModelOutputWithPast.__dataclass_fields__


# ---------------------------------------------------------------------------------------------
# decay slopes
# ---------------------------------------------------------------------------------------------


def alibi_slopes(num_heads: int) -> List[float]:
    """ALiBi slopes: ``2^(-8 i / n)`` for i = 1..n when n is a power of two; otherwise the slopes
    of the largest power of two ``m < n`` followed by every other slope of ``2 m`` heads."""

    def power_of_two(n: int) -> List[float]:
        start = 2.0 ** (-8.0 / n)
        return [start ** (i + 1) for i in range(n)]

    if num_heads & (num_heads - 1) == 0:
        return power_of_two(num_heads)
    m = 2 ** int(math.floor(math.log2(num_heads)))
    return power_of_two(m) + power_of_two(2 * m)[0::2][: num_heads - m]


def layer_slope_values(config: LaspLinearLMConfig, layer_idx: int) -> List[float]:
    """Decay slopes of layer ``layer_idx`` (0-based) as Python (fp64) floats, one per head.

    'tnl' scales the ALiBi slopes of layer ``l`` of ``L`` by ``1 - l / (L - 1) + decay_layer_eps``
    (``1 + eps`` for ``L = 1``); 'alibi' uses them unscaled; 'none' gives zeros (no decay).
    """
    heads = config.num_attention_heads
    if config.decay_type == "none":
        return [0.0] * heads
    slopes = alibi_slopes(heads)
    if config.decay_type == "tnl":
        num_layers = config.num_hidden_layers
        depth = 0.0 if num_layers == 1 else layer_idx / (num_layers - 1)
        factor = 1.0 - depth + config.decay_layer_eps
        slopes = [x * factor for x in slopes]
    return slopes


def layer_slopes(config: LaspLinearLMConfig, layer_idx: int, device=None) -> torch.Tensor:
    """:func:`layer_slope_values` rounded once to fp32: ``[num_attention_heads]``."""
    values = layer_slope_values(config, layer_idx)
    return torch.tensor(values, dtype=torch.float64, device=device).float()


# ---------------------------------------------------------------------------------------------
# linear attention: recurrent and chunked forms
# ---------------------------------------------------------------------------------------------


def recurrent_linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slopes: Optional[torch.Tensor],
    initial_state: Optional[torch.Tensor] = None,
    g: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Token-by-token recurrence ``S_t = lambda S_{t-1} + k_t^T v_t``, ``o_t = q_t S_t`` (fp32).

    Args:
        q, k: ``[B, H, T, Dk]``; v: ``[B, H, T, Dv]``.
        slopes: ``[H]``, ``lambda_h = exp(-slopes[h])``; None with ``g``.
        initial_state: ``[B, H, Dk, Dv]`` or None (zeros).
        g: per-token log-decays ``[B, H, T]`` (``lambda_t = exp(g_t)``) instead of ``slopes``.

    Returns:
        ``(o [B, H, T, Dv] in q's dtype, final state [B, H, Dk, Dv] fp32)``.
    """
    B, H, T, Dk = q.shape
    Dv = v.shape[-1]
    if g is None:
        lam = torch.exp(-slopes.to(device=q.device, dtype=torch.float32)).view(1, H, 1, 1)
    else:
        lam_t = torch.exp(g.float()).view(B, H, T, 1, 1)
    state = q.new_zeros(B, H, Dk, Dv, dtype=torch.float32) if initial_state is None else initial_state.float()
    qf, kf, vf = q.float(), k.float(), v.float()
    outs = []
    for t in range(T):
        if g is not None:
            lam = lam_t[:, :, t]
        state = lam * state + kf[:, :, t, :, None] * vf[:, :, t, None, :]
        outs.append(torch.einsum("bhk,bhkv->bhv", qf[:, :, t], state))
    return torch.stack(outs, dim=2).to(q.dtype), state


def chunk_linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slopes: torch.Tensor,
    initial_state: Optional[torch.Tensor] = None,
    chunk_size: int = 64,
    doc_ids: Optional[torch.Tensor] = None,
    g: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Chunked (block-parallel) form of :func:`recurrent_linear_attention`, same arguments/returns.

    Inside a block of ``C`` tokens (local index i; the last block may be shorter), with the
    incoming state ``S``::

        O = [(Q K^T) * M] V + diag(lambda^(i+1)) Q S,      M_ij = lambda^(i-j) for i >= j else 0
        S <- lambda^C S + (diag(lambda^(C-1-i)) K)^T V

    All arithmetic is fp32; the work is quadratic only inside a block. ``doc_ids [B, T]`` (the
    document of each token, non-decreasing per row) masks every factor by "same document": the
    state restarts at each document start; ``initial_state`` feeds each row's first document.

    Per-token gates ``g [B, H, T]`` (``slopes=None``): with ``c_i`` the block's inclusive
    cumulative sum of ``g``, ``lambda^(i-j)`` becomes ``exp(c_i - c_j)`` (formed only for ``i >=
    j``, so no ``exp`` of a positive number), ``lambda^(i+1)`` becomes ``exp(c_i)``,
    ``lambda^(n-1-i)`` becomes ``exp(c_last - c_i)`` and ``lambda^n`` becomes ``exp(c_last)``.
    """
    B, H, T, Dk = q.shape
    Dv = v.shape[-1]
    state = q.new_zeros(B, H, Dk, Dv, dtype=torch.float32) if initial_state is None else initial_state.float()
    C = max(1, min(chunk_size, T))
    idx = torch.arange(C, device=q.device, dtype=torch.float32)
    diff = idx[:, None] - idx[None, :]
    if g is None:
        s = slopes.to(device=q.device, dtype=torch.float32).view(H, 1, 1)
        decay_full = torch.where(diff >= 0, torch.exp(-s * diff.clamp(min=0)), torch.zeros((), device=q.device))
        decay_in_full = torch.exp(-s[:, 0] * (idx + 1)).unsqueeze(-1)  # [H, C, 1]: lambda^(i+1)
    else:
        gf = g.float()
    qf, kf, vf = q.float(), k.float(), v.float()
    outs = []
    for start in range(0, T, C):
        n = min(C, T - start)
        qc, kc, vc = qf[:, :, start : start + n], kf[:, :, start : start + n], vf[:, :, start : start + n]
        if g is None:
            mask, decay_in = decay_full[:, :n, :n], decay_in_full[:, :n]
            decay_out = torch.exp(-s[:, 0] * (n - 1 - idx[:n])).unsqueeze(-1)  # [H, n, 1]: lambda^(n-1-i)
            across = torch.exp(-s * n)
        else:
            c = gf[:, :, start : start + n].cumsum(-1)  # [B, H, n]
            pair = (c[..., :, None] - c[..., None, :]).masked_fill(diff[:n, :n] < 0, float("-inf"))
            mask = pair.exp()  # [B, H, n, n]
            decay_in = c.exp().unsqueeze(-1)  # [B, H, n, 1]
            decay_out = (c[..., -1:] - c).exp().unsqueeze(-1)  # [B, H, n, 1]
            across = c[..., -1].exp().view(B, H, 1, 1)
        if doc_ids is not None:  # same-document masks; e: the document of the entering state
            d = doc_ids[:, start : start + n]
            e, last = doc_ids[:, max(start - 1, 0)], d[:, -1]
            mask = mask * (d[:, :, None] == d[:, None, :]).float()[:, None]
            decay_in = decay_in * (d == e[:, None]).float()[:, None, :, None]
            decay_out = decay_out * (d == last[:, None]).float()[:, None, :, None]
            across = across * (e == last).float().view(B, 1, 1, 1)
        scores = (qc @ kc.transpose(-1, -2)) * mask  # [B, H, n, n]
        o = scores @ vc + decay_in * (qc @ state)
        state = across * state + (kc * decay_out).transpose(-1, -2) @ vc
        outs.append(o)
    o = torch.cat(outs, dim=2) if outs else qf.new_zeros(B, H, 0, Dv)
    return o.to(q.dtype), state


# ---------------------------------------------------------------------------------------------
# Gated DeltaNet: short convolution and the gated delta rule (recurrent and chunked forms)
# ---------------------------------------------------------------------------------------------


def short_convolution(
    x: torch.Tensor, weight: torch.Tensor, conv_state: Optional[torch.Tensor] = None,
    doc_ids: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Causal depthwise convolution + SiLU: ``out_t = silu(sum_i weight[:, i] x_{t - (K - 1 - i)})``.

    Args:
        x: ``[B, T, C]`` the inputs.
        weight: ``[C, K]``; tap ``K - 1`` multiplies the current token.
        conv_state: ``[B, K - 1, C]``, the inputs before ``x`` (an earlier call's), or None (zeros).
        doc_ids: ``[B, T]`` packed documents: a tap reaching into another document reads zero (the
            ``conv_state`` tokens belong to each row's first document).

    Returns:
        ``(out [B, T, C] in x's dtype (fp32 math), the new conv_state [B, K - 1, C])``.
    """
    B, T, C = x.shape
    K = weight.shape[-1]
    prev = x.new_zeros(B, K - 1, C) if conv_state is None else conv_state.to(x.dtype)
    padded = torch.cat([prev, x], dim=1)  # [B, K - 1 + T, C]
    w = weight.float()
    src_docs = None
    if doc_ids is not None:
        src_docs = torch.cat([doc_ids[:, :1].expand(B, K - 1), doc_ids], dim=1)
    out = torch.zeros(B, T, C, device=x.device, dtype=torch.float32)
    for i in range(K):
        term = padded[:, i:i + T].float() * w[:, i]
        if src_docs is not None and i < K - 1:
            term = term * (src_docs[:, i:i + T] == doc_ids).unsqueeze(-1).float()
        out = out + term
    return F.silu(out).to(x.dtype), padded[:, T:]


def recurrent_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    initial_state: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Token by token ``S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T``,
    ``o_t = S_t^T q_t`` (fp32; ``q`` already scaled).

    Args:
        q, k: ``[B, H, T, Dk]``; v: ``[B, H, T, Dv]``; g, beta: ``[B, H, T]``.
        initial_state: ``[B, H, Dk, Dv]`` or None (zeros).

    Returns:
        ``(o [B, H, T, Dv] in q's dtype, final state [B, H, Dk, Dv] fp32)``.
    """
    B, H, T, Dk = q.shape
    Dv = v.shape[-1]
    state = q.new_zeros(B, H, Dk, Dv, dtype=torch.float32) if initial_state is None else initial_state.float()
    qf, kf, vf, gf, bf = q.float(), k.float(), v.float(), g.float(), beta.float()
    outs = []
    for t in range(T):
        kt = kf[:, :, t]
        state = torch.exp(gf[:, :, t])[..., None, None] * state
        u = bf[:, :, t, None] * (vf[:, :, t] - torch.einsum("bhk,bhkv->bhv", kt, state))
        state = state + kt[..., :, None] * u[..., None, :]
        outs.append(torch.einsum("bhk,bhkv->bhv", qf[:, :, t], state))
    o = torch.stack(outs, dim=2) if outs else qf.new_zeros(B, H, 0, Dv)
    return o.to(q.dtype), state


def chunk_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    initial_state: Optional[torch.Tensor] = None,
    chunk_size: int = 64,
    doc_ids: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Chunked (WY) form of :func:`recurrent_gated_delta_rule`, same arguments and returns.

    Written as ``S_i = exp(g_i) S_{i-1} + k_i u_i^T`` with the corrected values
    ``u_i = beta_i (v_i - exp(g_i) S_{i-1}^T k_i)``: inside a block of ``C`` tokens (local index
    ``i``, ``c_i`` the block's inclusive cumulative sum of ``g``, ``S`` the entering state)::

        (I + A) U = diag(beta) V - diag(beta exp(c)) K S,   A_ij = beta_i exp(c_i - c_j) k_i . k_j  (j < i)
        O = [(Q K^T) * M] U + diag(exp(c)) Q S,            M_ij = exp(c_i - c_j)  (j <= i)
        S <- exp(c_last) S + (diag(exp(c_last - c)) K)^T U

    one triangular solve per block (for ``[V | K]`` at once, so that ``U = U_v - W S``). fp32;
    ``doc_ids [B, T]`` masks every factor by "same document" (the state restarts at each start;
    ``initial_state`` feeds each row's first document).
    """
    B, H, T, Dk = q.shape
    Dv = v.shape[-1]
    state = q.new_zeros(B, H, Dk, Dv, dtype=torch.float32) if initial_state is None else initial_state.float()
    C = max(1, min(chunk_size, T))
    idx = torch.arange(C, device=q.device)
    qf, kf, vf, gf, bf = q.float(), k.float(), v.float(), g.float(), beta.float()
    outs = []
    for start in range(0, T, C):
        n = min(C, T - start)
        sl = slice(start, start + n)
        qc, kc, vc, bc = qf[:, :, sl], kf[:, :, sl], vf[:, :, sl], bf[:, :, sl, None]
        c = gf[:, :, sl].cumsum(-1)  # [B, H, n]
        lower = idx[:n, None] >= idx[None, :n]
        M = (c[..., :, None] - c[..., None, :]).masked_fill(~lower, float("-inf")).exp()  # [B, H, n, n]
        a = c.exp().unsqueeze(-1)  # [B, H, n, 1]: exp(c_i), the entering state's weight
        d = (c[..., -1:] - c).exp().unsqueeze(-1)  # [B, H, n, 1]: exp(c_last - c_j)
        across = c[..., -1].exp().view(B, H, 1, 1)
        if doc_ids is not None:  # same-document masks; e: the document of the entering state
            docs = doc_ids[:, sl]
            e, last = doc_ids[:, max(start - 1, 0)], docs[:, -1]
            M = M * (docs[:, :, None] == docs[:, None, :]).float()[:, None]
            a = a * (docs == e[:, None]).float()[:, None, :, None]
            d = d * (docs == last[:, None]).float()[:, None, :, None]
            across = across * (e == last).float().view(B, 1, 1, 1)
        A = bc * (kc @ kc.transpose(-1, -2)) * M.tril(-1)
        rhs = torch.cat([bc * vc, (bc * a) * kc], dim=-1)
        u_v, w = torch.linalg.solve_triangular(A, rhs, upper=False, unitriangular=True).split([Dv, Dk], dim=-1)
        u = u_v - w @ state  # [B, H, n, Dv]
        outs.append(((qc @ kc.transpose(-1, -2)) * M) @ u + (a * qc) @ state)
        state = across * state + (d * kc).transpose(-1, -2) @ u
    o = torch.cat(outs, dim=2) if outs else qf.new_zeros(B, H, 0, Dv)
    return o.to(q.dtype), state


# ---------------------------------------------------------------------------------------------
# cache
# ---------------------------------------------------------------------------------------------


class _RecurrentStateLayer:
    """One layer's recurrent state ``[B, H, Dk, Dv]`` fp32 (None before the first forward) and, for
    a Gated DeltaNet layer, its convolution's last ``K - 1`` inputs ``conv [B, K - 1, C]``."""

    is_compileable = False
    is_croppable = False
    is_sliding = False
    supports_early_init = False
    is_initialized = False

    def __init__(self):
        self.state: Optional[torch.Tensor] = None
        self.conv: Optional[torch.Tensor] = None

    def _apply(self, fn) -> None:
        """``tensor = fn(tensor)`` for the state and the conv inputs (those present)."""
        if self.state is not None:
            self.state = fn(self.state)
        if self.conv is not None:
            self.conv = fn(self.conv)

    def reset(self) -> None:
        self._apply(lambda t: t.zero_())

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._apply(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._apply(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._apply(lambda t: t[indices, ...])

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("a recurrent state cannot be cropped (it does not keep past tokens)")

    def offload(self) -> None:
        self._apply(lambda t: t.to("cpu", non_blocking=True))

    def prefetch(self) -> None:
        pass

    def get_max_length(self) -> int:
        return -1

    def __repr__(self) -> str:
        shape = None if self.state is None else tuple(self.state.shape)
        conv = "" if self.conv is None else f", conv={tuple(self.conv.shape)}"
        return f"RecurrentStateLayer(state={shape}{conv})"


class LaspLinearLMCache(Cache):
    """Per-layer recurrent states of the linear LM: O(1) memory in the sequence length.

    ``cache.get_state(i)`` / ``cache.set_state(i, S)`` read and write layer ``i``'s ``[B, H, Dk,
    Dv]`` fp32 state (a Gated DeltaNet layer's convolution inputs: ``get_conv_state`` /
    ``set_conv_state``, ``[B, K - 1, C]``); ``get_seq_length()`` counts the tokens consumed so far. A hybrid's
    full-attention layers (``full_attention[i]``) hold transformers' ``DynamicLayer`` instead,
    filled by ``cache.update(keys, values, i)`` (``[B, Hkv, T, D]``).
    """

    def __init__(self, num_layers: int, full_attention: Optional[List[bool]] = None):
        full_attention = full_attention or [False] * num_layers
        layers = [DynamicLayer() if full else _RecurrentStateLayer() for full in full_attention]
        try:
            super().__init__(layers=layers)
        except TypeError:  # transformers versions whose Cache() takes no layers
            super().__init__()
            self.layers = layers
        self.seen_tokens = 0

    def get_state(self, layer_idx: int) -> Optional[torch.Tensor]:
        """Layer ``layer_idx``'s state ``[B, H, Dk, Dv]`` (None before the first token)."""
        return self.layers[layer_idx].state

    def set_state(self, layer_idx: int, state: torch.Tensor) -> None:
        """Replace layer ``layer_idx``'s state."""
        self.layers[layer_idx].state = state

    def get_conv_state(self, layer_idx: int) -> Optional[torch.Tensor]:
        """A Gated DeltaNet layer's last ``K - 1`` convolution inputs ``[B, K - 1, C]`` (None before the first token)."""
        return self.layers[layer_idx].conv

    def set_conv_state(self, layer_idx: int, conv: torch.Tensor) -> None:
        """Replace layer ``layer_idx``'s convolution inputs."""
        self.layers[layer_idx].conv = conv

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Tokens consumed so far."""
        return self.seen_tokens

    def get_max_length(self, layer_idx: Optional[int] = None) -> int:
        """-1: no limit on the sequence length."""
        return -1

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> Tuple[int, int]:
        return query_length + self.seen_tokens, 0

    def reset(self) -> None:
        super().reset()
        self.seen_tokens = 0

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("a recurrent state cannot be cropped (it does not keep past tokens)")

    @property
    def is_linear(self) -> List[bool]:
        return [isinstance(layer, _RecurrentStateLayer) for layer in self.layers]

    @property
    def is_sliding(self) -> List[bool]:
        return [False] * len(self.layers)

    @property
    def is_dummy(self) -> List[bool]:
        return [False] * len(self.layers)

    @property
    def is_compileable(self) -> bool:
        return False

    @property
    def is_croppable(self) -> bool:
        return False

    @property
    def is_initialized(self) -> bool:
        return all(_filled(layer) is not None for layer in self.layers)

    @property
    def batch_size(self) -> int:
        sizes = {_filled(layer).shape[0] for layer in self.layers if _filled(layer) is not None}
        return sizes.pop() if len(sizes) == 1 else -1


def _filled(layer) -> Optional[torch.Tensor]:
    """A cache layer's tensor with the batch first (the state, or the keys), None while empty."""
    if isinstance(layer, _RecurrentStateLayer):
        return layer.state
    return layer.keys if layer.is_initialized else None


# ---------------------------------------------------------------------------------------------
# modules
# ---------------------------------------------------------------------------------------------


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x32 = x.float()
    y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return (y * weight.float()).to(x.dtype)


class LaspRMSNorm(nn.Module):
    """RMSNorm over the last dim, computed in fp32: ``[..., n] -> [..., n]``."""

    def __init__(self, size: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _rms_norm(x, self.weight, self.eps)


class LaspGroupRMSNorm(nn.Module):
    """RMSNorm over groups of ``group_size`` heads: ``[..., H, D] -> [..., H, D]``."""

    def __init__(self, num_heads: int, head_dim: int, group_size: int, eps: float):
        super().__init__()
        self.eps = eps
        self.num_heads, self.head_dim, self.group_size = num_heads, head_dim, group_size
        self.weight = nn.Parameter(torch.ones(num_heads * head_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-2]
        groups = self.num_heads // self.group_size
        xg = x.reshape(*lead, groups, self.group_size * self.head_dim)
        w = self.weight.view(groups, self.group_size * self.head_dim)
        return _rms_norm(xg, w, self.eps).view(*lead, self.num_heads, self.head_dim)


_FEATURE_MAPS = {"silu": F.silu, "identity": None}


class LaspLinearAttention(nn.Module):
    """The token mixer: ``[B, T, hidden] -> [B, T, hidden]``, advancing ``cache`` if given."""

    def __init__(self, config: LaspLinearLMConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.head_dim = config.num_attention_heads, config.head_dim
        self.chunk_size = config.chunk_size
        width = self.num_heads * self.head_dim
        bias = config.add_bias_linear
        self.q_proj = nn.Linear(config.hidden_size, width, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, width, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, width, bias=bias)
        self.g_proj = nn.Linear(config.hidden_size, width, bias=bias) if config.output_gate else None
        self.o_norm = LaspGroupRMSNorm(
            self.num_heads, self.head_dim, config.attention_norm_group_size, config.rms_norm_eps
        )
        self.o_proj = nn.Linear(width, config.hidden_size, bias=bias)
        self.qk_map = _FEATURE_MAPS[config.qk_feature_map]
        self.v_map = _FEATURE_MAPS[config.v_feature_map]
        # Python floats, not a buffer: never loaded, cast, or created on the meta device.
        self.slope_values = layer_slope_values(config, layer_idx)
        self.gate = getattr(config, "linear_attention_gate", "none")
        self.decay_proj = None
        if self.gate != "none":  # the per-token decay replaces the slopes
            self.gate_logit_normalizer = float(config.gate_logit_normalizer)
            self.decay_proj = nn.Linear(config.hidden_size, self.num_heads, bias=self.gate == "gla")
            if self.gate == "mamba2":
                self.A_log = nn.Parameter(torch.zeros(self.num_heads))
                self.dt_bias = nn.Parameter(torch.zeros(self.num_heads))

    def log_decay(self, x: torch.Tensor) -> torch.Tensor:
        """The per-token log-decays ``g [B, T, H]`` fp32 of the normed input ``x [B, T, hidden]``."""
        raw = self.decay_proj(x).float()
        if self.gate == "mamba2":
            return -torch.exp(self.A_log.float()) * F.softplus(raw + self.dt_bias.float())
        return F.logsigmoid(raw) / self.gate_logit_normalizer

    def forward(
        self,
        x: torch.Tensor,
        cache: Optional[LaspLinearLMCache] = None,
        token_mask: Optional[torch.Tensor] = None,
        doc_ids: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        B, T, _ = x.shape
        heads = (B, T, self.num_heads, self.head_dim)
        q, k, v = self.q_proj(x).view(heads), self.k_proj(x).view(heads), self.v_proj(x).view(heads)
        if self.qk_map is not None:
            q, k = self.qk_map(q), self.qk_map(k)
        if self.v_map is not None:
            v = self.v_map(v)
        g = slopes = None
        if self.decay_proj is not None:
            g = self.log_decay(x)
        if token_mask is not None:  # padded positions add nothing to the state (nor decay it)
            v = v * token_mask[:, :, None, None].to(v.dtype)
            if g is not None:
                g = g * token_mask[:, :, None].to(g.dtype)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, H, T, D]
        if g is None:
            slopes = torch.tensor(self.slope_values, dtype=torch.float64, device=x.device).float()
        else:
            g = g.transpose(1, 2)  # [B, H, T]
        initial_state = cache.get_state(self.layer_idx) if cache is not None else None
        if initial_state is not None and T == 1:
            o, state = recurrent_linear_attention(q, k, v, slopes, initial_state, g=g)
        else:
            o, state = chunk_linear_attention(q, k, v, slopes, initial_state, self.chunk_size, doc_ids, g=g)
        if cache is not None:
            cache.set_state(self.layer_idx, state)
        o = self.o_norm(o.transpose(1, 2))  # [B, T, H, D]
        if self.g_proj is not None:
            o = o * torch.sigmoid(self.g_proj(x).view(heads))
        return self.o_proj(o.reshape(B, T, self.num_heads * self.head_dim))


class LaspGatedRMSNorm(nn.Module):
    """``RMSNorm(x) * weight * silu(z)`` over the last dim (one ``[n]`` weight for all heads), fp32 math."""

    def __init__(self, size: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(size))

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight.float()
        return (y * F.silu(z.float())).to(x.dtype)


def _l2norm(x: torch.Tensor) -> torch.Tensor:
    """``x / sqrt(|x|^2 + 1e-6)`` over the last dim, fp32."""
    x32 = x.float()
    return x32 * torch.rsqrt(x32.pow(2).sum(-1, keepdim=True) + 1e-6)


class LaspShortConvolution(nn.Conv1d):
    """A depthwise convolution's weight ``[C, 1, K]`` (``nn.Conv1d``'s layout, no bias); the causal,
    document-aware computation is :func:`short_convolution`."""

    def __init__(self, channels: int, kernel_size: int):
        super().__init__(channels, channels, kernel_size, groups=channels, bias=False)


class LaspGatedDeltaNet(nn.Module):
    """The Gated DeltaNet token mixer: ``[B, T, hidden] -> [B, T, hidden]``, advancing ``cache`` if given."""

    def __init__(self, config: LaspLinearLMConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_key_heads, self.num_value_heads = config.linear_num_key_heads, config.linear_num_value_heads
        self.key_dim, self.value_dim = config.linear_key_head_dim, config.linear_value_head_dim
        self.chunk_size = config.chunk_size
        h, bias, K = config.hidden_size, config.add_bias_linear, config.linear_conv_kernel_dim
        qk, vv, heads = self.num_key_heads * self.key_dim, self.num_value_heads * self.value_dim, self.num_value_heads
        self.q_proj = nn.Linear(h, qk, bias=bias)
        self.k_proj = nn.Linear(h, qk, bias=bias)
        self.v_proj = nn.Linear(h, vv, bias=bias)
        self.g_proj = nn.Linear(h, vv, bias=bias)  # the output gate z
        self.b_proj = nn.Linear(h, heads, bias=bias)  # beta = sigmoid(b)
        self.a_proj = nn.Linear(h, heads, bias=bias)  # the decay's input
        self.q_conv1d = LaspShortConvolution(qk, K)
        self.k_conv1d = LaspShortConvolution(qk, K)
        self.v_conv1d = LaspShortConvolution(vv, K)
        self.A_log = nn.Parameter(torch.zeros(heads))
        self.dt_bias = nn.Parameter(torch.zeros(heads))
        self.o_norm = LaspGatedRMSNorm(self.value_dim, config.rms_norm_eps)
        self.o_proj = nn.Linear(vv, h, bias=bias)

    def forward(
        self,
        x: torch.Tensor,
        cache: Optional[LaspLinearLMCache] = None,
        token_mask: Optional[torch.Tensor] = None,
        doc_ids: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        B, T, _ = x.shape
        Hk, Hv, Dk, Dv = self.num_key_heads, self.num_value_heads, self.key_dim, self.value_dim
        mixed = torch.cat([self.q_proj(x), self.k_proj(x), self.v_proj(x)], dim=-1)  # [B, T, C]
        beta = torch.sigmoid(self.b_proj(x).float())
        g = -torch.exp(self.A_log.float()) * F.softplus(self.a_proj(x).float() + self.dt_bias.float())
        if token_mask is not None:  # padded positions: no convolution input, no write, no decay
            keep = token_mask[:, :, None]
            mixed, beta, g = mixed * keep.to(mixed.dtype), beta * keep.float(), g * keep.float()
        weight = torch.cat([self.q_conv1d.weight, self.k_conv1d.weight, self.v_conv1d.weight], dim=0)[:, 0]
        conv_state = cache.get_conv_state(self.layer_idx) if cache is not None else None
        conv, conv_state = short_convolution(mixed, weight, conv_state, doc_ids)
        q, k, v = conv.split([Hk * Dk, Hk * Dk, Hv * Dv], dim=-1)
        q = _l2norm(q.view(B, T, Hk, Dk)) * Dk ** -0.5
        k = _l2norm(k.view(B, T, Hk, Dk))
        r = Hv // Hk  # value head j reads key head j // r
        q, k = q.repeat_interleave(r, dim=2), k.repeat_interleave(r, dim=2)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.reshape(B, T, Hv, Dv).transpose(1, 2)  # [B, H, T, D]
        g, beta = g.transpose(1, 2), beta.transpose(1, 2)  # [B, H, T]
        initial_state = cache.get_state(self.layer_idx) if cache is not None else None
        if initial_state is not None and T == 1:
            o, state = recurrent_gated_delta_rule(q, k, v, g, beta, initial_state)
        else:
            o, state = chunk_gated_delta_rule(q, k, v, g, beta, initial_state, self.chunk_size, doc_ids)
        if cache is not None:
            cache.set_state(self.layer_idx, state)
            cache.set_conv_state(self.layer_idx, conv_state)
        o = self.o_norm(o.transpose(1, 2).to(x.dtype), self.g_proj(x).view(B, T, Hv, Dv))
        return self.o_proj(o.reshape(B, T, Hv * Dv))


def _rotate(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """RoPE (rotate-half convention): ``x [B, H, T, D]`` at ``positions [T]``, angles in fp32."""
    D = x.shape[-1]
    inv_freq = 1.0 / (theta ** (torch.arange(0, D, 2, dtype=torch.float32, device=x.device) / D))
    angles = torch.outer(positions.to(torch.float32), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)  # [T, D]
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class LaspSoftmaxAttention(nn.Module):
    """A hybrid's full-attention token mixer: ``[B, T, hidden] -> [B, T, hidden]``.

    Causal softmax attention, RoPE on q and k, ``num_key_value_heads`` key/value heads; the keys
    and values of earlier tokens come from (and the new ones go to) the cache's ``DynamicLayer``.
    """

    def __init__(self, config: LaspLinearLMConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim, self.rope_theta = config.head_dim, config.rope_theta
        bias = config.add_bias_linear
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=bias)

    def forward(self, x, cache=None, token_mask=None, doc_ids=None, key_mask=None) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        past = cache.layers[self.layer_idx].get_seq_length() if cache is not None else 0
        positions = torch.arange(past, past + T, device=x.device)
        q, k = _rotate(q, positions, self.rope_theta), _rotate(k, positions, self.rope_theta)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        Tk = k.shape[2]
        # query i (position past + i) reads key j <= past + i; padded keys and other documents never
        allowed = torch.arange(Tk, device=x.device)[None, :] <= positions[:, None]  # [T, Tk]
        allowed = allowed[None].expand(B, T, Tk)
        if key_mask is not None and key_mask.shape[-1] == Tk:
            allowed = allowed & key_mask[:, None, :].bool()
        if doc_ids is not None:  # earlier calls' keys belong to each row's first document
            k_docs = torch.cat([doc_ids[:, :1].expand(B, Tk - T), doc_ids], dim=1)
            allowed = allowed & (doc_ids[:, :, None] == k_docs[:, None, :])
        allowed = allowed | (torch.arange(Tk, device=x.device)[None, :] == positions[:, None])[None]  # no empty rows
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed[:, None], enable_gqa=self.num_kv_heads != self.num_heads)
        return self.o_proj(o.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim))


class LaspMLP(nn.Module):
    """GLU MLP: ``down_proj(act(gate_proj x) * up_proj x)``, act = identity (SGLU) or SiLU."""

    def __init__(self, config: LaspLinearLMConfig):
        super().__init__()
        bias = config.add_bias_linear
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=bias)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=bias)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=bias)
        self.swiglu = config.glu_type == "swiglu"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.gate_proj(x)
        if self.swiglu:
            gate = F.silu(gate)
        return self.down_proj(gate * self.up_proj(x))


class LaspDecoderLayer(nn.Module):
    """Pre-norm block: ``x + attn(norm(x))``, then ``h + mlp(norm(h))``."""

    def __init__(self, config: LaspLinearLMConfig, layer_idx: int):
        super().__init__()
        self.input_norm = LaspRMSNorm(config.hidden_size, config.rms_norm_eps)
        full = config.layer_type(layer_idx) == "full_attention"
        delta = getattr(config, "linear_attention_type", "lightning") == "gated_delta_net"
        mixer = LaspSoftmaxAttention if full else LaspGatedDeltaNet if delta else LaspLinearAttention
        self.attn = mixer(config, layer_idx)
        self.mlp_norm = LaspRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = LaspMLP(config)

    def forward(self, x, cache=None, token_mask=None, doc_ids=None, key_mask=None):
        kwargs = {"key_mask": key_mask} if isinstance(self.attn, LaspSoftmaxAttention) else {}
        h = x + self.attn(self.input_norm(x), cache=cache, token_mask=token_mask, doc_ids=doc_ids, **kwargs)
        return h + self.mlp(self.mlp_norm(h))


class LaspLinearLMPreTrainedModel(PreTrainedModel):
    """Common base: config class, weight init (transformers' default: normal linears and
    embeddings, ones for the RMSNorms), no default KV cache, gradient checkpointing per block."""

    config_class = LaspLinearLMConfig
    base_model_prefix = "model"
    _no_split_modules = ["LaspDecoderLayer"]
    supports_gradient_checkpointing = True
    _is_stateful = True  # a recurrent state cannot be rolled back (no assisted generation)

    def _init_weights(self, module):
        """transformers' default, plus the Mamba2 recipe for a gated layer's (and a Gated DeltaNet
        layer's) ``A_log`` / ``dt_bias``: ``A = exp(A_log)`` uniform in [1, 16], ``softplus(dt_bias)``
        log-uniform in [1e-3, 1e-1] (floored at 1e-4), and ``nn.Conv1d``'s uniform init for the
        Gated DeltaNet convolutions; weights loaded from a checkpoint are left alone."""
        super()._init_weights(module)
        mamba2 = isinstance(module, LaspLinearAttention) and module.gate == "mamba2"
        if mamba2 or isinstance(module, LaspGatedDeltaNet):
            heads = module.A_log.numel()
            dt = torch.exp(torch.rand(heads, dtype=torch.float64) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
            dt = dt.clamp(min=1e-4)
            a = torch.empty(heads, dtype=torch.float64).uniform_(1.0, 16.0)
            for param, values in ((module.A_log, torch.log(a)), (module.dt_bias, dt + torch.log(-torch.expm1(-dt)))):
                if not getattr(param, "_is_hf_initialized", False):
                    with torch.no_grad():
                        param.copy_(values.to(param.dtype))
        if isinstance(module, LaspShortConvolution) and not getattr(module.weight, "_is_hf_initialized", False):
            bound = 1.0 / math.sqrt(module.weight.shape[-1])  # nn.Conv1d's default, as megatron-lasp draws it
            with torch.no_grad():
                module.weight.uniform_(-bound, bound)

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        # generate() must not create a key/value cache; forward() creates LaspLinearLMCache.
        return False


def _cache_from_kwargs(cache, kwargs) -> Optional[Cache]:
    legacy = kwargs.pop("past_key_values", None)
    return cache if cache is not None else legacy


def _document_ids(cu_seqlens, position_ids, B: int, T: int, device) -> Optional[torch.Tensor]:
    """``[B, T]`` document ids of packed documents, or None (one document per row).

    From ``cu_seqlens`` (starts over the ``B * T`` tokens, first 0, last ``B * T``) or, without
    it, from ``position_ids [B, T]`` restarting at 0 (a 0 after the row start begins a document).
    """
    if cu_seqlens is not None:
        cu = torch.as_tensor(cu_seqlens, device=device).long().view(-1)
        if cu.numel() < 2 or int(cu[0]) != 0 or int(cu[-1]) != B * T or bool((cu[1:] < cu[:-1]).any()):
            raise ValueError(f"cu_seqlens must be non-decreasing document starts from 0 to B * T = {B * T}, "
                             f"got {cu.tolist()}")
        flat = torch.arange(B * T, device=device)
        return (torch.searchsorted(cu, flat, right=True) - 1).view(B, T)
    if position_ids is None or position_ids.dim() != 2 or position_ids.shape != (B, T) or T < 2:
        return None
    starts = position_ids[:, 1:] == 0
    if not bool(starts.any()):
        return None
    return torch.cat([position_ids.new_zeros(B, 1), starts.long().cumsum(1)], dim=1)


class LaspLinearLMModel(LaspLinearLMPreTrainedModel):
    """Embedding, blocks and final norm: ``input_ids [B, T] -> hidden states [B, T, hidden]``."""

    # ``AutoModel`` on an exported directory: the causal LM's output layer is not part of it.
    _keys_to_ignore_on_load_unexpected = [r"^lm_head\."]

    def __init__(self, config: LaspLinearLMConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList([LaspDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = LaspRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.gradient_checkpointing = False  # set by gradient_checkpointing_enable()
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def forward(
        self,
        input_ids: Optional[torch.LongTensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.LongTensor] = None,
        cache: Optional[Cache] = None,
        inputs_embeds: Optional[torch.Tensor] = None,
        use_cache: Optional[bool] = None,
        output_hidden_states: Optional[bool] = None,
        return_dict: Optional[bool] = None,
        **kwargs,
    ):
        """Run the blocks.

        Args:
            input_ids: ``[B, T]`` (or ``inputs_embeds [B, T, hidden]``).
            attention_mask: ``[B, T_past + T]`` with 0 at padded positions, or None.
            position_ids: ``[B, T]``; only read for packed documents: a 0 after a row's start
                begins a document (the state restarts). Otherwise the decay carries position.
            cache: a :class:`LaspLinearLMCache` holding the state after earlier tokens, or None.
            use_cache: return the (created or advanced) cache.
            output_hidden_states: also return every block's input and the final output.
            cu_seqlens (keyword, or transformers' ``cu_seq_lens_q``): packed documents, the
                starts over the ``B * T`` tokens (flash-attention's convention); wins over
                ``position_ids``.

        Returns:
            ``BaseModelOutputWithPast``: ``last_hidden_state [B, T, hidden]``, ``hidden_states``,
            the cache (``cache`` / ``past_key_values`` depending on the transformers version).
        """
        cache = _cache_from_kwargs(cache, kwargs)
        cu_seqlens = kwargs.pop("cu_seqlens", None)
        if cu_seqlens is None:
            cu_seqlens = kwargs.pop("cu_seq_lens_q", None)
        use_cache = self.config.use_cache if use_cache is None else use_cache
        checkpointing = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        if checkpointing:
            # The backward pass recomputes each block from its input; a block that advanced the
            # cache would be recomputed from the advanced state.
            if cache is not None and cache.get_seq_length() > 0:
                raise ValueError("gradient checkpointing cannot continue from a filled cache: pass cache=None")
            if use_cache:
                logger.warning_once("use_cache=True is incompatible with gradient checkpointing: using use_cache=False")
            use_cache, cache = False, None
        output_hidden_states = (
            self.config.output_hidden_states if output_hidden_states is None else output_hidden_states
        )
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        T = x.shape[1]
        if cache is not None and not isinstance(cache, LaspLinearLMCache):
            if cache.get_seq_length() != 0:
                raise TypeError(
                    f"this model keeps recurrent states in a LaspLinearLMCache, got a filled {type(cache).__name__}"
                )
            cache = None  # an empty key/value cache made by generic code: replace it
        if cache is None and use_cache:
            cache = LaspLinearLMCache(self.config.num_hidden_layers, [
                self.config.layer_type(i) == "full_attention" for i in range(self.config.num_hidden_layers)])
        token_mask = key_mask = None
        if attention_mask is not None and attention_mask.dim() == 2:
            token_mask = attention_mask[:, -T:]
            if bool(token_mask.all()):
                token_mask = None
            if not bool(attention_mask.all()):
                key_mask = attention_mask  # the softmax layers' keys: cached and new
        doc_ids = _document_ids(cu_seqlens, position_ids, x.shape[0], T, x.device)
        hidden = [] if output_hidden_states else None
        for layer in self.layers:
            if hidden is not None:
                hidden.append(x)
            if checkpointing:
                x = self._gradient_checkpointing_func(layer.__call__, x, None, token_mask, doc_ids, key_mask)
            else:
                x = layer(x, cache=cache, token_mask=token_mask, doc_ids=doc_ids, key_mask=key_mask)
        x = self.norm(x)
        if hidden is not None:
            hidden.append(x)
        if cache is not None:
            cache.seen_tokens += T
        return BaseModelOutputWithPast(
            last_hidden_state=x,
            hidden_states=tuple(hidden) if hidden is not None else None,
            **{_CACHE_FIELD: cache if use_cache else None},
        )


class LaspLinearLMForCausalLM(LaspLinearLMPreTrainedModel, GenerationMixin):
    """The linear LM with its output layer; ``generate()`` uses the recurrent-state cache."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: LaspLinearLMConfig):
        super().__init__(config)
        self.model = LaspLinearLMModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def prepare_inputs_for_generation(
        self, input_ids, next_sequence_length=None, cache=None, inputs_embeds=None, **kwargs
    ):
        """As transformers' default (``inputs_embeds`` feed the prompt, ``input_ids`` the generated
        tokens); when ``generate()`` resumes from a filled cache with the whole sequence so far,
        only the tokens the state has not consumed are fed (a recurrent state cannot skip tokens
        it has already seen the way a key/value cache is sliced)."""
        cache = cache if cache is not None else kwargs.pop("past_key_values", None)
        if (
            next_sequence_length is None
            and inputs_embeds is None
            and isinstance(cache, LaspLinearLMCache)
            and 0 < cache.seen_tokens < input_ids.shape[1]
        ):
            next_sequence_length = input_ids.shape[1] - cache.seen_tokens
        return super().prepare_inputs_for_generation(
            input_ids, next_sequence_length=next_sequence_length, cache=cache, inputs_embeds=inputs_embeds, **kwargs
        )

    def forward(
        self,
        input_ids: Optional[torch.LongTensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.LongTensor] = None,
        cache: Optional[Cache] = None,
        inputs_embeds: Optional[torch.Tensor] = None,
        labels: Optional[torch.LongTensor] = None,
        use_cache: Optional[bool] = None,
        output_hidden_states: Optional[bool] = None,
        return_dict: Optional[bool] = None,
        logits_to_keep: int = 0,
        **kwargs,
    ):
        """Logits, and the next-token loss when ``labels [B, T]`` are given (-100 ignored).

        The loss is transformers' causal-LM loss (as Llama's): the mean over the predicted tokens,
        or, when ``num_items_in_batch`` is passed (``Trainer`` does, under gradient accumulation
        and data parallelism), their sum divided by it.

        Args: as :meth:`LaspLinearLMModel.forward`, plus ``labels``, ``logits_to_keep`` (0: all
        positions, n: the last n) and the loss keywords ``num_items_in_batch``,
        ``ignore_index``, ``shift_labels``.

        Returns:
            ``CausalLMOutputWithPast``: ``logits [B, T or n, vocab]``, ``loss``, the cache.
        """
        cache = _cache_from_kwargs(cache, kwargs)
        packed = {key: kwargs[key] for key in ("cu_seqlens", "cu_seq_lens_q") if key in kwargs}
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            **packed,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
        )
        h = out.last_hidden_state
        if logits_to_keep:
            h = h[:, -logits_to_keep:]
        logits = self.lm_head(h)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        cache = out[_CACHE_FIELD] if _CACHE_FIELD in out else None
        result = CausalLMOutputWithPast(
            loss=loss, logits=logits, hidden_states=out.hidden_states, **{_CACHE_FIELD: cache}
        )
        if return_dict is False:
            return result.to_tuple()
        return result
