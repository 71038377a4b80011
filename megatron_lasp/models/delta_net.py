"""Gated DeltaNet (arXiv 2412.06464; the Qwen3-Next / Kimi-style layer) as a megatron-core ``self_attention``.

Per layer, on activations ``[s, b, hidden]`` (``s``: this rank's tokens), with ``Hk`` query/key
heads of ``Dk`` channels, ``Hv = r Hk`` value heads of ``Dv`` channels (GVA: value head ``j``
reads key head ``j // r``)::

    q, k, v, z, b, a = split(in_proj(x))                      # ColumnParallelLinear, key-head groups over TP
    q, k, v = silu(conv1d(q, k, v))                           # causal depthwise, K taps, per channel
    q, k = l2norm(q), l2norm(k)                               # then repeated r times for GVA
    beta = sigmoid(b);  g = -exp(A_log) * softplus(a + dt_bias)          # fp32, per token and value head
    o = gated_delta_rule_sp(q, k, v, g, beta, sp_group, mode)  # S_t = exp(g_t)(I - beta k k^T) S + beta k v^T
    o = RMSNorm(o) * out_norm.weight * silu(z)                # per value head, one [Dv] weight
    out = out_proj(o)                                         # RowParallelLinear

Parameters (megatron-core's ``GatedDeltaNet`` names): ``in_proj.weight [Hk (2 Dk + 2 r Dv + 2 r),
hidden]``, ``conv1d.weight [Hk (2 Dk + r Dv), 1, K]``, ``A_log [Hv]``, ``dt_bias [Hv]``,
``out_norm.weight [Dv]``, ``out_proj.weight [hidden, Hv Dv]``. Layouts, init and the math:
``README.md`` in this folder, "Gated DeltaNet layers".

What differs from megatron-core's ``megatron/core/ssm/gated_delta_net.py`` (whose module cannot be
used here: it needs fla and causal-conv1d, has no CPU path and no sequence parallelism over
contiguous slices with packed documents):

- ``in_proj`` rows and ``conv1d`` channels are grouped per key head (key head ``i``:
  ``q_i, k_i, v, z, b, a`` of its ``r`` value heads; Qwen3-Next's ``in_proj_qkvz`` / ``in_proj_ba``
  order), so a TP split is a plain slice of whole groups and the layout does not depend on the TP
  size. megatron-core orders each rank's rows ``[q | k | v | z | b | a]`` of its own heads (one
  layout per TP size, resharded by split factories in its checkpoints).
- the short convolution masks the taps that reach into an earlier packed document, and under
  sequence parallelism reads the previous rank's last ``K - 1`` inputs (:func:`~megatron_lasp.parallel.halo.conv_halo`);
  the op is :func:`~megatron_lasp.parallel.gated_delta_rule_sp` (every SP mode, packed
  documents); the convolution runs as ``K`` shifted multiply-adds in fp32 on ``[s, b, C]`` (no
  transposes, no causal-conv1d).
- ``out_norm.weight`` is shared by the value heads, as megatron-core's, and its gradient is summed
  over TP ranks (each holds other heads); ``A_log`` / ``dt_bias`` / ``conv1d`` are drawn for all
  heads and sliced (a seeded model is the same at every TP size); ``dt_bias`` follows Mamba2's init
  (megatron-core sets it to 1).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

from megatron_lasp.models.attention import StateCarry, recurrent_layer_documents
from megatron_lasp.models.config import LinearLMConfig
from megatron_lasp.models.gate import mamba2_gate_init
from megatron_lasp.ops import fused as fused_ops
from megatron_lasp.parallel import gated_delta_rule_sp
from megatron_lasp.parallel.halo import conv_halo

__all__ = ["GatedDeltaNet", "GatedDeltaNetSubmodules", "ShortConvolution", "GatedRMSNorm", "document_positions",
           "L2NORM_EPS"]

L2NORM_EPS = 1e-6
"""The epsilon of the q / k L2 norm (``x / sqrt(|x|^2 + eps)``, fla's and Qwen3-Next's)."""

_OP_BACKENDS = {None: None, "torch": "torch", "triton": None}
"""``kernel_backend`` -> the delta rule's backend: 'triton' (the GPU default of the lightning
kernels) picks fla's Triton kernels where fla imports (else the chunked PyTorch op, with one warning)."""


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for half inputs, fp64 for fp64 (the elementwise math's precision)."""
    return torch.promote_types(dtype, torch.float32)


def document_positions(cu_seqlens: torch.Tensor, batch: int, length: int, rank: int, world: int) -> torch.Tensor:
    """``[length, batch]`` int64: each token of this rank's slice counted from its document's start.

    Args:
        cu_seqlens: global document starts over the ``batch * length * world`` tokens of the whole
            sequence's rows laid end to end (``megatron_lasp.parallel.lightning_attn_sp``'s
            convention); a row start is a document start whether listed or not.
        batch, length: the slice's rows and tokens per row; rank, world: its place in the group.
    """
    T = length * world
    cu = cu_seqlens.to(torch.int64)
    t = torch.arange(rank * length, (rank + 1) * length, device=cu.device, dtype=torch.int64)
    row_start = torch.arange(batch, device=cu.device, dtype=torch.int64) * T
    flat = row_start.view(1, -1) + t.view(-1, 1)  # [length, batch]
    start = cu[torch.searchsorted(cu, flat, right=True) - 1]
    return flat - torch.maximum(start, row_start.view(1, -1))


class ShortConvolution(MegatronModule):
    """The causal depthwise convolution of ``K`` taps on q, k, v, followed by SiLU (``conv1d``).

    ``weight [C_local, 1, K]`` (``nn.Conv1d``'s layout, no bias): output channel ``c`` at token
    ``t`` is ``sum_i weight[c, 0, i] x[t - (K - 1 - i), c]``; tap ``K - 1`` is the current token.
    Init: ``nn.Conv1d``'s default, uniform in ``+-1/sqrt(K)``, drawn for all channels and sliced.

    Args:
        config: the model config.
        channels: all channels (every TP rank's); local: ``slice`` of them on this rank.
        kernel_size: ``K``.
    """

    def __init__(self, config: LinearLMConfig, channels: int, local: slice, kernel_size: int):
        super().__init__(config=config)
        self.kernel_size = kernel_size
        if config.perform_initialization:
            bound = 1.0 / math.sqrt(kernel_size)
            weight = torch.empty(channels, 1, kernel_size).uniform_(-bound, bound)
        else:  # the values come from a checkpoint
            weight = torch.empty(channels, 1, kernel_size)
        device = None if config.use_cpu_initialization else torch.cuda.current_device()
        self.weight = torch.nn.Parameter(weight[local].to(device=device, dtype=config.params_dtype))
        set_tensor_model_parallel_attributes(self.weight, is_parallel=True, dim=0, stride=1)

    def forward(self, x: torch.Tensor, halo: Optional[torch.Tensor] = None,
                positions: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``x [s, b, C]`` -> ``silu(conv(x)) [s, b, C]`` in ``x``'s dtype (fp32 math).

        Args:
            halo: ``[K - 1, b, C]``, the inputs before ``x`` (the previous rank's); None: zeros.
            positions: ``[s, b]`` int, each token's position in its packed document: a tap that
                reaches further back reads zero. None: no documents.
        """
        s, K = x.shape[0], self.kernel_size
        if halo is None:
            halo = x.new_zeros((K - 1,) + tuple(x.shape[1:]))
        padded = torch.cat([halo, x], dim=0) if K > 1 else x  # [s + K - 1, b, C]
        w = self.weight.to(_compute_dtype(x.dtype)).squeeze(1)  # [C, K]
        out = None
        for i in range(K):
            lag = K - 1 - i
            term = padded[i:i + s] * w[:, i]
            if positions is not None and lag > 0:
                term = term.masked_fill((positions < lag).unsqueeze(-1), 0.0)
            out = term if out is None else out + term
        return F.silu(out).to(x.dtype)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata=None):
        """The weight is TP-sharded along dim 0 (the channels)."""
        return make_sharded_tensors_for_checkpoint({"weight": self.weight}, prefix, {"weight": 0}, sharded_offsets)


class GatedRMSNorm(MegatronModule):
    """``RMSNorm(o) * weight * silu(z)`` per value head (``out_norm``), one ``[Dv]`` weight for all
    heads, replicated over TP; its gradient is summed over the TP group (each rank normalises other
    heads), so every TP rank holds the whole gradient.

    Shapes: ``o, z [..., Dv]`` -> ``[..., Dv]`` in ``o``'s dtype (fp32 math).
    """

    def __init__(self, config: LinearLMConfig, head_dim: int, eps: float, tp_group):
        super().__init__(config=config)
        self.eps, self.tp_group = eps, tp_group
        device = None if config.use_cpu_initialization else torch.cuda.current_device()
        self.weight = torch.nn.Parameter(torch.ones(head_dim, dtype=config.params_dtype, device=device))

    def forward(self, o: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        weight = self.weight
        if self.tp_group.size() > 1:
            weight = tensor_parallel.copy_to_tensor_model_parallel_region(weight, group=self.tp_group)
        cdt = _compute_dtype(o.dtype)
        x = o.to(cdt)
        y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * weight.to(cdt)
        return (y * F.silu(z.to(cdt))).to(o.dtype)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata=None):
        """The weight is replicated over TP."""
        return make_sharded_tensors_for_checkpoint({"weight": self.weight}, prefix, {}, sharded_offsets)


@dataclass
class GatedDeltaNetSubmodules:
    """Submodules of :class:`GatedDeltaNet` (classes or ``ModuleSpec``)."""

    in_proj: Union[ModuleSpec, type] = None
    """The fused q, k, v, z, b, a projection: a column-parallel linear."""
    out_proj: Union[ModuleSpec, type] = None
    """The output projection: a row-parallel linear."""


class GatedDeltaNet(MegatronModule):
    """Gated DeltaNet token mixer; plugs into ``TransformerLayerSubmodules.self_attention``.

    Built by megatron-core's ``TransformerLayer`` as ``(config, submodules, layer_number,
    pg_collection, ...)`` and called as ``forward(hidden_states [s, b, hidden], attention_mask=...,
    packed_seq_params=..., **unused) -> (out [s, b, hidden], bias or None)``; see the module
    docstring. The attention mask and rotary arguments are ignored (causal by construction).
    """

    def __init__(
        self,
        config: LinearLMConfig,
        submodules: GatedDeltaNetSubmodules,
        layer_number: int,
        pg_collection: Optional[ProcessGroupCollection] = None,
        **unused,  # cp_comm_type, name, attn_mask_type
    ):
        super().__init__(config=config)
        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups()
        self.config: LinearLMConfig = config
        self.layer_number = layer_number
        self.tp_group, self.sp_group = pg_collection.tp, pg_collection.cp
        tp_size, tp_rank = self.tp_group.size(), self.tp_group.rank()
        self.key_dim, self.value_dim = config.linear_key_head_dim, config.linear_value_head_dim
        key_heads, value_heads = config.linear_num_key_heads, config.linear_num_value_heads
        self.ratio = value_heads // key_heads  # value heads per key head (GVA)
        self.local_key_heads, self.local_value_heads = key_heads // tp_size, value_heads // tp_size
        # per key head: conv channels q, k, v (of its value heads), then z, b, a
        self.conv_width = 2 * self.key_dim + self.ratio * self.value_dim
        self.group_width = self.conv_width + self.ratio * self.value_dim + 2 * self.ratio
        self.recompute_core = (
            config.recompute_granularity == "selective" and "core_attn" in (config.recompute_modules or [])
        )
        self.recompute_elementwise = bool(getattr(config, "recompute_elementwise", False))
        self.op_backend = _OP_BACKENDS[config.kernel_backend]
        self._sp_checked = False  # see _core
        self._carry: Optional[StateCarry] = None

        self.in_proj = build_module(
            submodules.in_proj,
            config.hidden_size,
            key_heads * self.group_width,
            config=config,
            init_method=config.init_method,
            gather_output=False,
            bias=config.add_bias_linear,
            skip_bias_add=False,
            is_expert=False,
            tp_comm_buffer_name="qkv",
            tp_group=self.tp_group,
        )
        local_keys = slice(tp_rank * self.local_key_heads, (tp_rank + 1) * self.local_key_heads)
        self.conv1d = ShortConvolution(
            config, key_heads * self.conv_width,
            slice(local_keys.start * self.conv_width, local_keys.stop * self.conv_width),
            config.linear_conv_kernel_dim,
        )
        if config.perform_initialization:
            a_log, dt_bias = mamba2_gate_init(value_heads)
        else:
            a_log, dt_bias = torch.empty(value_heads), torch.empty(value_heads)
        local_values = slice(tp_rank * self.local_value_heads, (tp_rank + 1) * self.local_value_heads)
        device = None if config.use_cpu_initialization else torch.cuda.current_device()
        self.A_log = torch.nn.Parameter(a_log[local_values].to(device=device, dtype=config.params_dtype))
        self.dt_bias = torch.nn.Parameter(dt_bias[local_values].to(device=device, dtype=config.params_dtype))
        for p in (self.A_log, self.dt_bias):
            set_tensor_model_parallel_attributes(p, is_parallel=True, dim=0, stride=1)
        self.out_norm = GatedRMSNorm(config, self.value_dim, config.layernorm_epsilon, self.tp_group)
        self.out_proj = build_module(
            submodules.out_proj,
            value_heads * self.value_dim,
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

    # ------------------------------------------------------------------------------------------

    def _split(self, mixed: torch.Tensor):
        """``in_proj``'s output ``[s, b, Hk_l * group]`` -> ``(qkv [s, b, Hk_l * conv_width],
        z [s, b, Hv_l, Dv], b [s, b, Hv_l], a [s, b, Hv_l])`` (the pre-activation parts)."""
        s, b = mixed.shape[:2]
        r, Dv = self.ratio, self.value_dim
        groups = mixed.view(s, b, self.local_key_heads, self.group_width)
        qkv, z, beta, alpha = groups.split([self.conv_width, r * Dv, r, r], dim=-1)
        return (qkv.reshape(s, b, -1), z.reshape(s, b, self.local_value_heads, Dv),
                beta.reshape(s, b, -1), alpha.reshape(s, b, -1))

    carries_over_sp = False
    """The whole-layer chunked recompute (``chunked.py``) carries this layer's state from chunk to
    chunk on one rank only; on a rank of a sequence-parallel group the layer runs whole and only
    the MLP in chunks."""

    @contextlib.contextmanager
    def carrying(self, carry: StateCarry):
        """Within the block, the layer runs on a piece of the sequence that continues from
        ``carry.initial`` and sets ``carry.final`` (the whole-layer chunked recompute on one rank,
        ``chunked.py``). The carried state is ``(S [b, Hv_l, Dk, Dv] fp32, tail [b, K - 1, C])``:
        the delta-rule state and the convolution's last ``K - 1`` inputs (batch first, so that
        the chunked layer can zero a row whose document starts at the chunk); None: zeros."""
        self._carry = carry
        try:
            yield carry
        finally:
            self._carry = None

    def _core(self, qkv, halo, beta, alpha, positions=None, cu_seqlens=None, initial_state=None,
              want_final: bool = False):
        """Convolution, norms, gates and the sequence-parallel op: ``o [s, b, Hv_l, Dv]``.

        The op's first call checks that the SP ranks agree on the shapes (one small collective and
        a host sync); every rank runs the same layers in the same order, so later calls skip it.

        ``qkv [s, b, Hk_l * conv_width]`` before the convolution, ``halo [K - 1, b, ...]`` of it,
        ``beta`` / ``alpha [s, b, Hv_l]`` before their activations, ``positions [s, b]`` (packed
        documents) or None. With ``want_final`` (a chunk of the chunked recompute, one rank):
        ``(o, final state)`` from ``initial_state``.
        """
        s, b = qkv.shape[:2]
        Dk, r = self.key_dim, self.ratio
        x = self.conv1d(qkv, halo, positions).view(s, b, self.local_key_heads, self.conv_width)
        q, k, v = x.split([Dk, Dk, r * self.value_dim], dim=-1)
        q, k = _l2norm(q), _l2norm(k)
        if r > 1:
            q, k = q.repeat_interleave(r, dim=2), k.repeat_interleave(r, dim=2)
        v = v.reshape(s, b, self.local_value_heads, self.value_dim)
        cdt = _compute_dtype(q.dtype)
        g = -torch.exp(self.A_log.to(cdt)) * F.softplus(alpha.to(cdt) + self.dt_bias.to(cdt))
        beta = torch.sigmoid(beta.to(cdt))
        out = gated_delta_rule_sp(
            q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), g.transpose(0, 1), beta.transpose(0, 1),
            self.sp_group, mode=self.config.sequence_parallel_mode, backend=self.op_backend, cu_seqlens=cu_seqlens,
            validate=None if not self._sp_checked else False,
            initial_state=initial_state, output_final_state=want_final,
        )
        self._sp_checked = True
        if want_final:
            return out[0].transpose(0, 1), out[1]
        return out.transpose(0, 1)

    def forward(
        self, hidden_states: torch.Tensor, attention_mask=None, inference_context=None, packed_seq_params=None, **unused
    ):
        """``[s, b, hidden]`` -> ``(out [s, b, hidden], bias [hidden] or None)``.

        ``packed_seq_params``: packed documents, its ``cu_seqlens_q`` the document starts with
        global offsets (as :class:`~megatron_lasp.models.attention.LinearSelfAttention` reads
        them): the convolution does not reach across a start and the state restarts there.

        Raises:
            NotImplementedError: for megatron-core's incremental inference (``inference_context``).
            ValueError: ``packed_seq_params`` without ``cu_seqlens_q``.
        """
        cu_seqlens = recurrent_layer_documents("GatedDeltaNet", inference_context, packed_seq_params)
        mixed, _ = self.in_proj(hidden_states)
        if self.recompute_elementwise:  # the input norm's output, if tagged
            fused_ops.discard_until_backward(hidden_states, mixed)
        qkv, z, beta, alpha = self._split(mixed)
        s, b = qkv.shape[:2]
        sp = self.sp_group
        rank, world = sp.rank(), sp.size()
        positions = None
        if cu_seqlens is not None:
            positions = document_positions(cu_seqlens.to(qkv.device), b, s, rank, world)
        if self._carry is not None:
            o = self._core_carrying(self._carry, qkv, beta, alpha, positions, cu_seqlens)
        else:
            halo = None
            if world > 1:
                first = None if positions is None else positions[0]
                halo = conv_halo(qkv, self.conv1d.kernel_size - 1, sp, first)
            extra = () if cu_seqlens is None else (positions, cu_seqlens)
            if self.recompute_core:
                o = tensor_parallel.checkpoint(self._core, False, qkv, halo, beta, alpha, *extra)
            else:
                o = self._core(qkv, halo, beta, alpha, *extra)
        o = self.out_norm(o, z).reshape(s, b, self.local_value_heads * self.value_dim)
        return self.out_proj(o)

    def _core_carrying(self, carry: StateCarry, qkv, beta, alpha, positions, cu_seqlens):
        """:meth:`_core` on a chunk that continues from ``carry.initial`` (one rank); sets ``carry.final``."""
        assert self.sp_group.size() == 1, "GatedDeltaNet carries its state from chunk to chunk on one rank only"
        s = qkv.shape[0]
        state, tail = (None, None) if carry.initial is None else carry.initial
        halo = None if tail is None else tail.transpose(0, 1)  # [K - 1, b, C]
        last_start = None
        if positions is not None:
            # the chunk's own documents restart at its first token; the row's first one continues
            # from the chunk before, so its taps may reach back into the halo, whose entries of an
            # earlier document are zero (_conv_tail; and the chunked layer zeroes the carried state
            # of a row whose document starts here)
            last_start = (s - 1) - positions[-1]  # [b]: where the row's last document starts in the chunk
            first = positions == torch.arange(s, device=positions.device)[:, None]
            positions = torch.where(first, positions + (self.conv1d.kernel_size - 1), positions)
        extra = (None, None) if cu_seqlens is None else (positions, cu_seqlens)
        out = self._core(qkv, halo, beta, alpha, *extra, initial_state=state, want_final=carry.want_final)
        if not carry.want_final:
            return out
        o, final = out
        carry.final = (final, self._conv_tail(qkv, halo, last_start).transpose(0, 1))
        return o

    def _conv_tail(self, qkv, halo, last_start):
        """The convolution's last ``K - 1`` inputs after a chunk ``qkv [s, b, C]`` that followed
        ``halo`` (None: zeros): ``[K - 1, b, C]``, chunk positions ``s - K + 1 ... s - 1``, with the
        entries before the row's last document start in the chunk (``last_start [b]``) zeroed."""
        s, width = qkv.shape[0], self.conv1d.kernel_size - 1
        tail = qkv[max(0, s - width):]
        if tail.shape[0] < width:  # a chunk shorter than the convolution's reach: the rest from before it
            before = halo if halo is not None else qkv.new_zeros((width,) + tuple(qkv.shape[1:]))
            tail = torch.cat([before, tail])[-width:]
        if last_start is not None:  # only the last document's inputs reach the next chunk
            at = torch.arange(s - width, s, device=tail.device)[:, None]  # (the halo's: < 0)
            own = (at >= last_start[None, :]) | (last_start[None, :] == 0)  # no start inside: all of it
            tail = tail * own.to(tail.dtype)[..., None]
        return tail

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata=None):
        """``A_log`` / ``dt_bias`` TP-sharded along dim 0 (the value heads), the submodules their own."""
        own = {"A_log": self.A_log, "dt_bias": self.dt_bias}
        result = make_sharded_tensors_for_checkpoint(own, prefix, {name: 0 for name in own}, sharded_offsets)
        for name in ("in_proj", "conv1d", "out_norm", "out_proj"):
            module = getattr(self, name)
            result.update(module.sharded_state_dict(f"{prefix}{name}.", sharded_offsets, metadata))
        return result


def _l2norm(x: torch.Tensor) -> torch.Tensor:
    """``x / sqrt(|x|^2 + eps)`` over the last dimension (fp32 math), in ``x``'s dtype."""
    xf = x.to(_compute_dtype(x.dtype))
    return (xf * torch.rsqrt(xf.pow(2).sum(-1, keepdim=True) + L2NORM_EPS)).to(x.dtype)
