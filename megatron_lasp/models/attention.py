"""The linear-attention token mixer (TransNormerLLM style) as a megatron-core ``self_attention``.

Per layer, on activations ``[s, b, hidden]`` (``s``: this rank's tokens)::

    q, k, v, u = split(linear_qkv(x))              # ColumnParallelLinear, heads split over TP
    o = lightning_attn_sp(phi(q), phi(k), psi(v), slopes, sp_group, mode)   # causal, decayed
    # or, with linear_attention_gate (gate.py): g = gate(x) [s, b, h] and
    # o = lightning_attn_sp(phi(q), phi(k), psi(v), None, sp_group, mode, g=g)
    o = GroupRMSNorm(o) * sigmoid(u)               # norm per head (group), optional gate
    out = linear_proj(o)                           # RowParallelLinear

Fused projection layout (one master weight ``[H * P * D, hidden]``, ``P`` = 4 with the gate, 3
without): rows are ordered head-major ``[head 0: q, k, v, u | head 1: q, k, v, u | ...]``, each
part ``D`` rows. A TP split of the rows therefore gives each rank whole heads and the layout is the
same for any TP size (see ``README.md`` in this folder).

Copies on the way to the kernel (``[s, b, h, d]`` -> the op's ``[b, s, h, d]``): q, k, v are
strided views of the projection output and ``transpose(0, 1)`` is a view; the feature maps
(SiLU) write one new tensor each (none for 'identity'). The Triton kernels take any strides with a
unit last stride, so nothing else is copied; for micro-batch 1 (the long-sequence case) every
layout change is free. The output ``[b, s, h, d]`` goes back to ``[s, b, h, d]`` as a view; the
norm and the gate each write one new tensor (elementwise work needed anyway), and the reshape to
the row-parallel input ``[s, b, h * d]`` is free for b = 1 (one copy otherwise). The torch
backend blocks its inputs itself (one copy, inherent to it).

Fused path (``config.fused``, the GPU default; ``megatron_lasp.ops.fused``): one kernel splits the
projection output and writes ``phi(q), phi(k), psi(v)`` and ``sigmoid(u)`` (its backward writes
the whole projection gradient at once: no zero-filled slice gradients, no accumulation), and one
kernel computes ``GroupRMSNorm(o) * sigmoid(u)`` straight from the kernel's ``[b, s, h, d]``
output into the row-parallel input ``[s, b, h * d]`` (fp32 math, one rounding). With
``config.recompute_elementwise`` the norm x gate output is freed once ``linear_proj`` has run and
recomputed before its backward; the input norm's output likewise around ``linear_qkv``.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import List, Optional, Union

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module

from megatron_lasp.models.config import LinearLMConfig
from megatron_lasp.models.gate import GateSubmodules, LinearAttentionGate
from megatron_lasp.models.norms import GroupRMSNorm
from megatron_lasp.ops import fused as fused_ops
from megatron_lasp.ops.lightning_attn import chunk_lightning_attn
from megatron_lasp.parallel import lightning_attn_sp

__all__ = ["LinearAttentionSubmodules", "LinearSelfAttention", "StateCarry", "alibi_slopes", "layer_slopes",
           "recurrent_layer_documents"]


def alibi_slopes(num_heads: int) -> List[float]:
    """ALiBi slopes for ``num_heads`` heads: ``2^(-8 i / n)``, i = 1..n, for a power of two n.

    For other ``n``, the slopes of the nearest lower power of two ``m`` followed by every other
    slope of ``2 m`` heads (as ALiBi and TransNormerLLM define them).
    """

    def power_of_two(n: int) -> List[float]:
        start = 2.0 ** (-8.0 / n)
        return [start ** (i + 1) for i in range(n)]

    if num_heads & (num_heads - 1) == 0:
        return power_of_two(num_heads)
    m = 2 ** int(math.floor(math.log2(num_heads)))
    return power_of_two(m) + power_of_two(2 * m)[0::2][: num_heads - m]


def layer_slopes(config: LinearLMConfig, layer_number: int) -> torch.Tensor:
    """All heads' decay slopes of one layer, fp32 ``[num_attention_heads]`` on the CPU (decay = exp(-slope)).

    Args:
        config: ``decay_type`` ('tnl', 'alibi', 'none'), ``decay_layer_eps``, ``num_layers``.
        layer_number: the GLOBAL 1-based layer number (megatron-core's ``layer_number``).

    'tnl' scales layer ``l = layer_number - 1`` of ``L`` by ``1 - l / (L - 1) + eps``
    (for ``L = 1`` the factor is ``1 + eps``).
    """
    heads = config.num_attention_heads
    if config.decay_type == "none":
        return torch.zeros(heads, dtype=torch.float32, device="cpu")
    slopes = torch.tensor(alibi_slopes(heads), dtype=torch.float64, device="cpu")
    if config.decay_type == "tnl":
        L, l = config.num_layers, layer_number - 1
        depth = 0.0 if L == 1 else l / (L - 1)
        slopes = slopes * (1.0 - depth + config.decay_layer_eps)
    return slopes.float()


_FEATURE_MAPS = {"silu": F.silu, "identity": None}


def recurrent_layer_documents(name: str, inference_context, packed_seq_params) -> Optional[torch.Tensor]:
    """The packed documents' starts (``packed_seq_params.cu_seqlens_q``, global offsets) of a call
    of a recurrent token mixer (``name``), None without documents.

    Raises:
        NotImplementedError: for megatron-core's incremental inference (``inference_context``: it
            would feed only the new tokens, and these layers keep no recurrent state between calls).
        ValueError: ``packed_seq_params`` without ``cu_seqlens_q``.
    """
    if inference_context is not None:
        raise NotImplementedError(f"{name} has no incremental-decoding state: run the full sequence without "
                                  "inference_context, or generate with the HF conversion")
    if packed_seq_params is None:
        return None
    cu_seqlens = getattr(packed_seq_params, "cu_seqlens_q", None)
    if cu_seqlens is None:
        raise ValueError(f"{name}: packed_seq_params needs cu_seqlens_q (the document starts)")
    return cu_seqlens


@dataclass
class LinearAttentionSubmodules:
    """Submodules of :class:`LinearSelfAttention` (classes or ``ModuleSpec``)."""

    linear_qkv: Union[ModuleSpec, type] = None
    """Fused q, k, v (+ gate) projection: a column-parallel linear (or TE layernorm-linear)."""
    linear_proj: Union[ModuleSpec, type] = None
    """Output projection: a row-parallel linear."""
    gate: Union[ModuleSpec, type, None] = None
    """The per-token gate (:class:`~megatron_lasp.models.gate.LinearAttentionGate`), built only
    with ``config.linear_attention_gate != 'none'``."""


@dataclass
class StateCarry:
    """The recurrent state across a call of :meth:`LinearSelfAttention.carrying`: the state the
    attention starts from (``initial``, fp32 ``[b, heads, d, d]`` or None: zeros) and, when
    ``want_final``, the state after its last token (``final``, set by the call; differentiable)."""

    initial: Optional[torch.Tensor] = None
    want_final: bool = True
    final: Optional[torch.Tensor] = None
    cut: bool = False
    """The first backward pass of a sequence-parallel chunk (``chunked.py``): the projection output
    (``mixed``) and the attention output (``o``, ``[b, s, h, d]``) become leaves that collect
    their gradients, q is kept (``q``), and no gradient reaches q, k, v."""
    mixed: Optional[torch.Tensor] = None
    g: Optional[torch.Tensor] = None
    """With a gate: its output ``[s, b, h]``, a leaf like ``mixed`` under ``cut``."""
    o: Optional[torch.Tensor] = None
    q: Optional[torch.Tensor] = None


class LinearSelfAttention(MegatronModule):
    """TNL token mixer; plugs into ``TransformerLayerSubmodules.self_attention``.

    Built by megatron-core's ``TransformerLayer`` as
    ``(config, submodules, layer_number, pg_collection, [cp_comm_type], [name])`` and called as
    ``forward(hidden_states [s, b, hidden], attention_mask=..., **unused) -> (out [s, b, hidden],
    bias or None)``. The attention mask and rotary arguments are ignored: the attention is causal
    and position is carried by the decay.

    ``slopes``: fp32 ``[heads on this TP rank]`` on the module's device, not a parameter or a
    buffer (nothing in the state dict): they follow from the config, are kept as Python floats
    and made a tensor once per device, so no cast of the module can round them and a
    ``to_empty()`` after a meta-device build cannot leave them uninitialised.
    """

    def __init__(
        self,
        config: LinearLMConfig,
        submodules: LinearAttentionSubmodules,
        layer_number: int,
        pg_collection: Optional[ProcessGroupCollection] = None,
        **unused,  # cp_comm_type, name, attn_mask_type: meaningless for linear attention
    ):
        super().__init__(config=config)
        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups()
        self.config: LinearLMConfig = config
        self.layer_number = layer_number
        self.tp_group = pg_collection.tp
        self.sp_group = pg_collection.cp
        tp_size = self.tp_group.size()
        tp_rank = self.tp_group.rank()
        self.head_dim = config.kv_channels
        self.local_heads = config.num_attention_heads // tp_size
        self.parts = config.qkv_parts
        self.recompute_core = (
            config.recompute_granularity == "selective" and "core_attn" in (config.recompute_modules or [])
        )
        self.fused = bool(getattr(config, "fused", False))
        self.recompute_elementwise = bool(getattr(config, "recompute_elementwise", False))

        self.linear_qkv = build_module(
            submodules.linear_qkv,
            config.hidden_size,
            config.attention_projection_size * self.parts,
            config=config,
            init_method=config.init_method,
            gather_output=False,
            bias=config.add_bias_linear,
            skip_bias_add=False,
            is_expert=False,
            tp_comm_buffer_name="qkv",
            tp_group=self.tp_group,
        )
        self.out_norm = GroupRMSNorm(
            config, self.local_heads, self.head_dim, config.attention_norm_group_size, config.layernorm_epsilon
        )
        self.linear_proj = build_module(
            submodules.linear_proj,
            config.attention_projection_size,
            config.hidden_size,
            config=config,
            init_method=config.output_layer_init_method,
            bias=config.add_bias_linear,
            input_is_parallel=True,
            skip_bias_add=True,
            is_expert=False,
            tp_comm_buffer_name="proj",
            tp_group=self.tp_group,
        )
        self.gate = None
        if config.gated:
            gate_spec = submodules.gate or ModuleSpec(
                module=LinearAttentionGate, submodules=GateSubmodules(linear=tensor_parallel.ColumnParallelLinear)
            )
            self.gate = build_module(gate_spec, config=config, tp_group=self.tp_group)
        head_slice = slice(tp_rank * self.local_heads, (tp_rank + 1) * self.local_heads)
        self._slope_values = tuple(layer_slopes(config, layer_number)[head_slice].tolist())
        self._slopes_by_device = {}
        self._sp_checked = False  # see _attention
        self._carry: Optional[StateCarry] = None  # see carrying

    @contextlib.contextmanager
    def carrying(self, carry: StateCarry):
        """Within the block, the attention runs on a piece of the sequence that continues from
        ``carry.initial`` and sets ``carry.final`` (a layer run chunk by chunk, ``chunked.py``).

        The caller owns the sequence-parallel exchange (no collective runs inside).
        """
        self._carry = carry
        try:
            yield carry
        finally:
            self._carry = None

    @property
    def slopes(self) -> torch.Tensor:
        """This TP rank's decay slopes, fp32 ``[local heads]``, on the device of the module's weights."""
        device = self.out_norm.weight.device
        if device not in self._slopes_by_device:
            self._slopes_by_device[device] = torch.tensor(self._slope_values, dtype=torch.float32, device=device)
        return self._slopes_by_device[device]

    def _attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g=None, cu_seqlens=None) -> torch.Tensor:
        """The sequence-parallel kernel on ``[s, b, h, d]`` views -> o ``[s, b, h, d]``.

        ``g``: the per-token log-decays ``[s, b, h]`` fp32 of a gated layer (None: the fixed slopes).

        The first call checks that the SP ranks agree on the shapes (one small collective and a
        host sync); every rank runs the same layers in the same order, so later calls skip it.
        Inside :meth:`carrying`, the kernel starts from and returns the carried state instead.
        """
        carry = self._carry
        decay = self._decay(g)
        if carry is not None:
            with torch.no_grad() if carry.cut else contextlib.nullcontext():
                o, carry.final = chunk_lightning_attn(
                    q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), decay["slopes"],
                    initial_state=carry.initial, output_final_state=carry.want_final,
                    backend=self.config.kernel_backend, cu_seqlens=cu_seqlens, g=decay["g"],
                )
            if carry.cut:
                carry.q = q.detach()
                o = carry.o = o.requires_grad_(True)
            return o.transpose(0, 1)
        o = lightning_attn_sp(
            q.transpose(0, 1),
            k.transpose(0, 1),
            v.transpose(0, 1),
            decay["slopes"],
            self.sp_group,
            g=decay["g"],
            mode=self.config.sequence_parallel_mode,
            backend=self.config.kernel_backend,
            validate=None if not self._sp_checked else False,
            cu_seqlens=cu_seqlens,
        )
        self._sp_checked = True
        return o.transpose(0, 1)

    def _decay(self, g: Optional[torch.Tensor]) -> dict:
        """The op's decay keywords: ``slopes`` (fixed) or ``g`` as ``[b, s, h]`` (gated)."""
        if g is None:
            return {"slopes": self.slopes, "g": None}
        return {"slopes": None, "g": g.transpose(0, 1)}

    def qkv(self, hidden_states: torch.Tensor):
        """``(mixed, q, k, v)``: the projection of the normed input and the kernel's inputs
        (after the feature maps), ``[s, b, h, d]``; what a chunked layer recomputes alone."""
        mixed, _ = self.linear_qkv(hidden_states)
        if self.fused:
            return (mixed, *self._fused_features(mixed)[:3])
        parts = self._split(mixed)
        return (mixed, *self._feature_maps(parts[:, :, :, 0], parts[:, :, :, 1], parts[:, :, :, 2]))

    def _split(self, mixed: torch.Tensor) -> torch.Tensor:
        """The projection output ``[s, b, h * P * d]`` as ``[s, b, h, P, d]`` (q, k, v, gate)."""
        s, b = mixed.shape[:2]
        return mixed.view(s, b, self.local_heads, self.parts, self.head_dim)

    def _feature_maps(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """``phi(q), phi(k), psi(v)`` (plain PyTorch path)."""
        phi = _FEATURE_MAPS[self.config.qk_feature_map]
        psi = _FEATURE_MAPS[self.config.v_feature_map]
        if phi is not None:
            q, k = phi(q), phi(k)
        if psi is not None:
            v = psi(v)
        return q, k, v

    def _fused_features(self, mixed: torch.Tensor):
        """One kernel: ``mixed`` -> ``(phi(q), phi(k), psi(v), sigmoid(gate) or None)``."""
        return fused_ops.qkv_features(
            mixed, self.local_heads, self.parts, self.head_dim,
            self.config.qk_feature_map == "silu", self.config.v_feature_map == "silu",
        )

    def _core(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g=None, cu_seqlens=None) -> torch.Tensor:
        """Feature maps + sequence-parallel kernel: ``[s, b, h, d]`` views (``g [s, b, h]`` or None)
        -> o ``[s, b, h, d]``."""
        return self._attention(*self._feature_maps(q, k, v), g, cu_seqlens)

    def _core_fused(self, mixed: torch.Tensor, g=None, cu_seqlens=None):
        """Fused feature maps + gate sigmoid, then the kernel: ``mixed`` -> ``(o [s, b, h, d], sg or None)``."""
        q, k, v, sg = self._fused_features(mixed)
        o = self._attention(q, k, v, g, cu_seqlens)
        return (o, sg) if sg is not None else o

    def _forward_fused(self, hidden_states: torch.Tensor, mixed: torch.Tensor, g=None, cu_seqlens=None):
        extra = () if cu_seqlens is None else (cu_seqlens,)
        if self.recompute_core:
            out = tensor_parallel.checkpoint(self._core_fused, False, mixed, g, *extra)
        else:
            out = self._core_fused(mixed, g, *extra)
        o, sg = out if self.parts == 4 else (out, None)
        y = fused_ops.norm_gate(o, sg, self.out_norm.weight, self.out_norm.group_size, self.out_norm.eps,
                                recompute=self.recompute_elementwise)
        result = self.linear_proj(y)
        if self.recompute_elementwise:
            fused_ops.discard_until_backward(y, result[0])
        return result

    def forward(
        self, hidden_states: torch.Tensor, attention_mask=None, inference_context=None, packed_seq_params=None, **unused
    ):
        """``[s, b, hidden]`` -> ``(out [s, b, hidden], bias [hidden] or None)``.

        ``packed_seq_params``: packed documents. Its ``cu_seqlens_q`` holds the document starts
        with global offsets in the ``b x s_full`` tokens of the whole sequence's rows laid end to
        end (int, first 0, last ``b * s_full``, the same on every rank; see
        ``megatron_lasp.parallel.lightning_attn_sp``); the recurrent state restarts at each
        start. ``qkv_format`` is not read (the activations stay ``[s, b, h]``).

        Raises:
            NotImplementedError: for megatron-core's incremental inference (``inference_context``:
                it would feed only the new tokens, and this module keeps no recurrent state).
            ValueError: ``packed_seq_params`` without ``cu_seqlens_q``.
        """
        cu_seqlens = recurrent_layer_documents("LinearSelfAttention", inference_context, packed_seq_params)
        mixed, _ = self.linear_qkv(hidden_states)
        g = self.gate(hidden_states) if self.gate is not None else None
        if self._carry is not None and self._carry.cut:
            mixed = self._carry.mixed = mixed.detach().requires_grad_(True)
            if g is not None:
                g = self._carry.g = g.detach().requires_grad_(True)
        if self.recompute_elementwise:  # the input norm's output, if tagged
            fused_ops.discard_until_backward(hidden_states, mixed, *(() if g is None else (g,)))
        if self.fused:
            return self._forward_fused(hidden_states, mixed, g, cu_seqlens)
        s, b = mixed.shape[:2]
        mixed = self._split(mixed)
        q, k, v = mixed[:, :, :, 0], mixed[:, :, :, 1], mixed[:, :, :, 2]
        extra = () if cu_seqlens is None else (cu_seqlens,)
        if self.recompute_core:
            o = tensor_parallel.checkpoint(self._core, False, q, k, v, g, *extra)
        else:
            o = self._core(q, k, v, g, *extra)
        o_pre = o
        o = self.out_norm(o)
        if self.parts == 4:
            o = o * torch.sigmoid(mixed[:, :, :, 3])
        o = o.reshape(s, b, self.local_heads * self.head_dim)
        if self.recompute_elementwise:
            o = o.contiguous()  # the product follows the kernel's [b, s] layout; a dense copy can be freed
            o_kept, u_kept = o_pre.detach(), mixed[:, :, :, 3].detach() if self.parts == 4 else None

            def norm_gate_again():
                y = self.out_norm(o_kept)
                if u_kept is not None:
                    y = y * torch.sigmoid(u_kept)
                return y.reshape(s, b, self.local_heads * self.head_dim)

            fused_ops.mark_recomputable(o, norm_gate_again)
        result = self.linear_proj(o)
        if self.recompute_elementwise:
            fused_ops.discard_until_backward(o, result[0])
        return result
