"""Per-token gates of the linear attention: data-dependent log-decays ``g [s, b, heads] <= 0``.

The fixed-decay layer keeps one decay per head (``exp(-slope)``); a gated layer learns, per token
and head, the log-decay ``g_t`` of ``S_t = exp(g_t) S_{t-1} + k_t^T v_t`` from the layer's normed
input ``x``. Two published recipes (``linear_attention_gate``; math and init in ``README.md`` of
this folder, "Per-token gates"):

- ``mamba2`` (Mamba2 / SSD): ``dt = x W_dt`` (one value per head), ``g = -exp(A_log) *
  softplus(dt + dt_bias)``. ``A = exp(A_log)`` starts uniform in ``[1, 16]``, ``softplus(dt_bias)``
  log-uniform in ``[1e-3, 1e-1]`` (floored at ``1e-4``), so that a token's initial decay is
  ``exp(-A dt)``. ``W_dt`` has no bias (``dt_bias`` is it).
- ``gla`` (simple GLA, one gate per head): ``g = logsigmoid(x W_g + b_g) / gate_logit_normalizer``
  (16 as published: a gate near 1 at init, ``exp(logsigmoid(0) / 16) = 0.958``); ``b_g`` starts at 0.

:class:`LinearAttentionGate` holds the projection (a ``ColumnParallelLinear`` ``hidden -> heads``,
heads split over TP like q, k, v: rank ``r`` holds heads ``[r H / tp, (r + 1) H / tp)``) and the
per-head parameters (``A_log``, ``dt_bias``: TP-sharded along their only dimension), and returns
``g`` in fp32. The per-head parameters are drawn for ALL heads from torch's default generator
(seeded alike on every rank) and sliced, so a seeded model is the same for every TP size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Union

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

__all__ = ["GATES", "GateSubmodules", "LinearAttentionGate", "mamba2_gate_init", "MAMBA2_A_RANGE",
           "MAMBA2_DT_RANGE", "MAMBA2_DT_FLOOR"]

GATES = ("none", "mamba2", "gla")
"""``linear_attention_gate`` values: 'none' is the fixed per-head decay (no gate module)."""

MAMBA2_A_RANGE = (1.0, 16.0)
"""Mamba2's ``A_init_range``: ``A = exp(A_log)`` uniform in it at init."""
MAMBA2_DT_RANGE = (1e-3, 1e-1)
"""Mamba2's ``(dt_min, dt_max)``: ``softplus(dt_bias)`` log-uniform in it at init."""
MAMBA2_DT_FLOOR = 1e-4
"""Mamba2's ``dt_init_floor``: the initial ``softplus(dt_bias)`` is at least this."""


def mamba2_gate_init(heads: int) -> tuple:
    """``(A_log, dt_bias)`` fp32 ``[heads]`` drawn as Mamba2 does (default torch generator).

    ``dt ~ exp(U(log dt_min, log dt_max))`` clamped at the floor, ``dt_bias = dt + log(-expm1(-dt))``
    (the inverse of softplus, so ``softplus(dt_bias) = dt``); ``A ~ U(1, 16)``, ``A_log = log A``.
    """
    lo, hi = MAMBA2_DT_RANGE
    dt = torch.exp(torch.rand(heads, dtype=torch.float64) * (math.log(hi) - math.log(lo)) + math.log(lo))
    dt = dt.clamp(min=MAMBA2_DT_FLOOR)
    dt_bias = dt + torch.log(-torch.expm1(-dt))
    a = torch.empty(heads, dtype=torch.float64).uniform_(*MAMBA2_A_RANGE)
    return torch.log(a).float(), dt_bias.float()


@dataclass
class GateSubmodules:
    """Submodules of :class:`LinearAttentionGate` (classes or ``ModuleSpec``)."""

    linear: Union[ModuleSpec, type] = None
    """The gate projection ``hidden -> heads``: a column-parallel linear."""


class LinearAttentionGate(MegatronModule):
    """The per-token log-decay of a gated linear-attention layer (see the module docstring).

    Args:
        config: the model config (``linear_attention_gate``, ``gate_logit_normalizer``,
            ``num_attention_heads``, ``hidden_size``, ``params_dtype``, ``use_cpu_initialization``).
        submodules: :class:`GateSubmodules`.
        tp_group: the tensor-parallel group (heads split over it).

    Shapes: ``forward(x [s, b, hidden]) -> g [s, b, local heads]`` fp32, ``<= 0``. With TP
    sequence parallelism ``x`` is this TP rank's slice of the tokens and the projection gathers
    them (as ``linear_qkv`` does).
    """

    def __init__(self, config, submodules: GateSubmodules, tp_group):
        super().__init__(config=config)
        self.kind = config.linear_attention_gate
        assert self.kind in GATES[1:], "the fixed decay builds no gate"
        heads, tp_size, tp_rank = config.num_attention_heads, tp_group.size(), tp_group.rank()
        self.local_heads = heads // tp_size
        self.normalizer = float(config.gate_logit_normalizer)
        self.linear = build_module(
            submodules.linear,
            config.hidden_size,
            heads,
            config=config,
            init_method=config.init_method,
            gather_output=False,
            bias=self.kind == "gla",  # Mamba2's dt bias is dt_bias below; GLA's b_g starts at 0
            skip_bias_add=False,
            is_expert=False,
            tp_comm_buffer_name="gate",
            tp_group=tp_group,
        )
        if self.kind == "mamba2":
            if config.perform_initialization:
                a_log, dt_bias = mamba2_gate_init(heads)
            else:  # the values come from a checkpoint (megatron-core's convention for its weights)
                a_log, dt_bias = torch.empty(heads), torch.empty(heads)
            mine = slice(tp_rank * self.local_heads, (tp_rank + 1) * self.local_heads)
            device = None if config.use_cpu_initialization else torch.cuda.current_device()
            self.A_log = torch.nn.Parameter(a_log[mine].to(device=device, dtype=config.params_dtype))
            self.dt_bias = torch.nn.Parameter(dt_bias[mine].to(device=device, dtype=config.params_dtype))
            for p in (self.A_log, self.dt_bias):
                set_tensor_model_parallel_attributes(p, is_parallel=True, dim=0, stride=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [s, b, hidden]`` -> ``g [s, b, local heads]`` fp32 (the gate math runs in fp32)."""
        raw, _ = self.linear(x)
        raw = raw.float()
        if self.kind == "mamba2":
            return -torch.exp(self.A_log.float()) * F.softplus(raw + self.dt_bias.float())
        return F.logsigmoid(raw) / self.normalizer

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata=None):
        """``A_log`` / ``dt_bias`` TP-sharded along dim 0 (the heads); the projection as megatron-core's."""
        own = {name: p for name, p in self._parameters.items() if p is not None}
        result = make_sharded_tensors_for_checkpoint(own, prefix, {name: 0 for name in own}, sharded_offsets)
        result.update(self.linear.sharded_state_dict(f"{prefix}linear.", sharded_offsets, metadata))
        return result
