"""RMSNorms of the linear LM (local implementation).

- :class:`RMSNorm`: the pre-norms and the final norm over the hidden dimension. Unlike
  megatron-core's ``WrappedTorchNorm`` it supports Megatron's TP sequence parallelism: its input
  is this TP rank's slice of the sequence, so its weight gradient is partial per TP rank; the
  weight is marked ``sequence_parallel=True`` so that gradient reduction (megatron-core's
  ``finalize_model_grads``, or our own loop) all-reduces it over the TP group.
- :class:`GroupRMSNorm`: the norm on the attention output, over groups of heads that never
  straddle TP ranks, so that TP gives exactly the TP=1 result without any communication. Its
  weight is sharded over TP like the heads (``partition_dim=0``).

With ``config.fused`` (the default on GPU) both run the Triton kernels of
``megatron_lasp.ops.fused`` (one kernel forward, one backward); otherwise the PyTorch reference.
With ``config.recompute_elementwise`` the RMSNorm output is tagged so that its consumer can
discard it until the backward (see ``megatron_lasp.ops.fused.recompute``).
"""

from __future__ import annotations

import torch
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

from megatron_lasp.ops import fused as fused_ops
from megatron_lasp.ops.fused.reference import rms_norm_ref as _rms_norm


class RMSNorm(MegatronModule):
    """RMSNorm over the hidden size, TP-sequence-parallel aware.

    Args:
        config: the model config (``sequence_parallel``, ``params_dtype``, ``use_cpu_initialization``).
        hidden_size: normalised width.
        eps: added to the mean square.

    Shapes: ``[s, b, hidden] -> [s, b, hidden]``.
    """

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **unused):
        super().__init__(config=config)
        self.eps = eps
        device = None if config.use_cpu_initialization else torch.cuda.current_device()
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype, device=device))
        setattr(self.weight, "sequence_parallel", bool(config.sequence_parallel))
        self.fused = bool(getattr(config, "fused", False))
        self.recompute = bool(getattr(config, "recompute_elementwise", False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fused_ops.rms_norm(x, self.weight, self.eps, fused=self.fused, recompute=self.recompute)


class GroupRMSNorm(MegatronModule):
    """RMSNorm over groups of ``group_size`` heads, weight sharded over TP with the heads.

    Args:
        config: the model config.
        local_heads: heads on this TP rank.
        head_dim: channels per head.
        group_size: heads per normalisation group (divides ``local_heads``).
        eps: added to the mean square.

    Shapes: ``[..., local_heads, head_dim] -> [..., local_heads, head_dim]``.
    """

    def __init__(
        self, config: TransformerConfig, local_heads: int, head_dim: int, group_size: int, eps: float = 1e-5
    ):
        super().__init__(config=config)
        assert local_heads % group_size == 0, "validated by LinearLMConfig"
        self.eps = eps
        self.local_heads, self.head_dim, self.group_size = local_heads, head_dim, group_size
        device = None if config.use_cpu_initialization else torch.cuda.current_device()
        self.weight = torch.nn.Parameter(
            torch.ones(local_heads * head_dim, dtype=config.params_dtype, device=device)
        )
        set_tensor_model_parallel_attributes(self.weight, is_parallel=True, dim=0, stride=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-2]
        groups = self.local_heads // self.group_size
        xg = x.reshape(*lead, groups, self.group_size * self.head_dim)
        w = self.weight.view(groups, self.group_size * self.head_dim)
        return _rms_norm(xg, w, self.eps).view(*lead, self.local_heads, self.head_dim)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata=None):
        """The weight is TP-sharded along dim 0 (like the heads)."""
        state_dict = self.state_dict(prefix="", keep_vars=True)
        return make_sharded_tensors_for_checkpoint(state_dict, prefix, {"weight": 0}, sharded_offsets)
