"""The GLU channel mixer: megatron-core's ``MLP`` with the GLU product fused (and recomputable).

:class:`LinearLMMLP` only replaces ``forward`` for the plain dense GLU this model uses (SGLU
``(W1 x) * (W2 x)`` or SwiGLU, no bias-activation fusion, no clamp or offset, no per-token
scale): ``linear_fc1`` -> one fused kernel for ``act(a) * b`` (forward and backward, see
``megatron_lasp.ops.fused``) -> ``linear_fc2``. With ``config.recompute_elementwise`` the pre-MLP
norm's output and the GLU product are freed once the matmul that reads them has run, and
recomputed right before its backward. Any other case, and fusion and that recompute both off,
runs megatron-core's own ``forward``: a run with fusion off is the unmodified megatron-core MLP.

The layer spec names it (``specs.glu_mlp_spec``, in the form the installed megatron-core expects).
"""

from __future__ import annotations

import torch.nn.functional as F
from megatron.core.transformer.mlp import MLP

from megatron_lasp.models.config import sglu_identity
from megatron_lasp.ops import fused as fused_ops

__all__ = ["LinearLMMLP"]


class LinearLMMLP(MLP):
    """megatron-core ``MLP`` whose GLU product runs in one fused kernel (see the module docstring)."""

    def _plain_glu(self, per_token_scale) -> bool:
        cfg = self.config
        return (
            per_token_scale is None
            and cfg.gated_linear_unit
            and not cfg.bias_activation_fusion
            and not getattr(cfg, "use_te_activation_func", False)
            and getattr(cfg, "activation_func_clamp_value", None) is None
            and not getattr(cfg, "glu_linear_offset", 0.0)
            and cfg.activation_func in (sglu_identity, F.silu)
        )

    def forward(self, hidden_states, *args, **kwargs):
        """``[s, b, hidden] -> (out [s, b, hidden], bias or None)``, as megatron-core's ``MLP``."""
        per_token_scale = kwargs.get("per_token_scale", args[0] if args else None)
        fused = bool(getattr(self.config, "fused", False))
        recompute = bool(getattr(self.config, "recompute_elementwise", False))
        if not (fused or recompute) or not self._plain_glu(per_token_scale):
            return super().forward(hidden_states, *args, **kwargs)
        h, bias = self.linear_fc1(hidden_states)
        if recompute:
            fused_ops.discard_until_backward(hidden_states, h)
        if bias is not None:
            h = h + bias
        y = fused_ops.glu(h, silu=self.config.activation_func is F.silu, fused=fused, recompute=recompute)
        out, out_bias = self.linear_fc2(y)
        if recompute:
            fused_ops.discard_until_backward(y, out)
        return out, out_bias

