"""Hugging Face configuration of the megatron-lasp linear LM (TransNormerLLM style).

This file is copied, unchanged, into every exported model directory next to
``modeling_linear_lm.py``; it imports only ``transformers`` (no megatron, no megatron_lasp).

The fields mirror the megatron-lasp ``LinearLMConfig`` (``megatron_lasp/models/config.py``):
``decay_type`` / ``decay_layer_eps`` choose the per-head decay slopes (``lambda_h =
exp(-slope_h)``), or ``linear_attention_gate`` a per-token decay learned from the input (``mamba2``:
``g = -exp(A_log) * softplus(x W + dt_bias)``; ``gla``: ``g = logsigmoid(x W + b) /
gate_logit_normalizer``; ``lambda_t = exp(g_t)``), ``qk_feature_map`` / ``v_feature_map`` the feature maps, ``output_gate`` the
sigmoid gate, ``attention_norm_group_size`` the heads per RMSNorm group on the attention output,
``glu_type`` the MLP (``sglu``: ``(W1 x) * (W2 x)``; ``swiglu``: ``silu(W1 x) * (W2 x)``).
``linear_attention_type`` says what the linear layers are: ``lightning`` (the above) or
``gated_delta_net`` (Gated DeltaNet: ``linear_num_key_heads`` query/key heads of
``linear_key_head_dim`` and ``linear_num_value_heads`` value heads of ``linear_value_head_dim``
channels, a causal convolution of ``linear_conv_kernel_dim`` taps, the gated delta rule).
Hybrid models: ``layer_types`` (transformers' convention, as in Qwen3-Next) names each layer
``"linear_attention"`` or ``"full_attention"`` (causal softmax attention with RoPE, ``rope_theta``,
and ``num_key_value_heads`` key/value heads); megatron-lasp's ``hybrid_layer_pattern`` writes them
as ``L`` and ``*``.
"""

from transformers import PretrainedConfig

__all__ = ["LaspLinearLMConfig", "LAYER_TYPES"]

LAYER_TYPES = ("linear_attention", "full_attention")
"""The values of ``layer_types``."""

_CHOICES = {
    "linear_attention_type": ("lightning", "gated_delta_net"),
    "decay_type": ("tnl", "alibi", "none"),
    "linear_attention_gate": ("none", "mamba2", "gla"),
    "qk_feature_map": ("silu", "identity"),
    "v_feature_map": ("silu", "identity"),
    "glu_type": ("sglu", "swiglu"),
}


class LaspLinearLMConfig(PretrainedConfig):
    """Configuration of :class:`LaspLinearLMForCausalLM`.

    Args:
        vocab_size: rows of the embedding and of the output layer (padded vocabulary).
        hidden_size: model width.
        num_hidden_layers: number of blocks.
        num_attention_heads: heads of the token mixer.
        head_dim: channels per head (default ``hidden_size // num_attention_heads``).
        intermediate_size: GLU width.
        rms_norm_eps: epsilon of every RMSNorm.
        decay_type: 'tnl' (ALiBi slopes x ``(1 - l / (L - 1) + decay_layer_eps)``), 'alibi' or 'none'.
        decay_layer_eps: epsilon of the 'tnl' depth scaling.
        linear_attention_gate: 'none' (the fixed decay above), 'mamba2' or 'gla': a per-token,
            per-head log-decay computed from the block's normed input (``decay_proj``, and
            ``A_log`` / ``dt_bias`` for 'mamba2'), replacing the fixed decay.
        gate_logit_normalizer: the 'gla' gate's divisor of the log-sigmoid.
        qk_feature_map: 'silu' or 'identity', applied to q and k.
        v_feature_map: 'silu' or 'identity', applied to v.
        output_gate: multiply the normalised attention output by ``sigmoid(g_proj x)``.
        attention_norm_group_size: heads per RMSNorm group on the attention output.
        glu_type: 'sglu' or 'swiglu'.
        add_bias_linear: biases on every linear layer (not on the embedding or the output layer).
        tie_word_embeddings: the output layer shares the input embedding's weight.
        chunk_size: block length of the chunked (parallel) form used for prompts.
        initializer_range: std of the normal init of fresh weights.
        use_cache: return the recurrent-state cache by default.
        layer_types: one of :data:`LAYER_TYPES` per layer (None: every layer linear).
        num_key_value_heads: key/value heads of the full-attention layers (default: the heads).
        rope_theta: RoPE base of the full-attention layers.
        linear_attention_type: 'lightning' (the fields above) or 'gated_delta_net' (the fields below;
            the lightning ones are then unused).
        linear_conv_kernel_dim: Gated DeltaNet: taps of the causal convolution on q, k, v (default 4).
        linear_key_head_dim: Gated DeltaNet: channels per query/key head (default ``head_dim``).
        linear_value_head_dim: Gated DeltaNet: channels per value head (default ``head_dim``).
        linear_num_key_heads: Gated DeltaNet: query/key heads (default ``num_attention_heads``).
        linear_num_value_heads: Gated DeltaNet: value heads, a multiple of the key heads (default
            ``linear_num_key_heads``).
    """

    model_type = "lasp_linear_lm"
    keys_to_ignore_at_inference = ["cache", "past_key_values"]

    def layer_type(self, layer_idx: int) -> str:
        """``"linear_attention"`` or ``"full_attention"``: the kind of layer ``layer_idx``."""
        return LAYER_TYPES[0] if self.layer_types is None else self.layer_types[layer_idx]

    def __init__(
        self,
        vocab_size: int = 128,
        hidden_size: int = 64,
        num_hidden_layers: int = 2,
        num_attention_heads: int = 4,
        head_dim: int = None,
        intermediate_size: int = 96,
        rms_norm_eps: float = 1e-5,
        decay_type: str = "tnl",
        decay_layer_eps: float = 1e-5,
        linear_attention_gate: str = "none",
        gate_logit_normalizer: float = 16.0,
        qk_feature_map: str = "silu",
        v_feature_map: str = "silu",
        output_gate: bool = True,
        attention_norm_group_size: int = 1,
        glu_type: str = "sglu",
        add_bias_linear: bool = False,
        tie_word_embeddings: bool = False,
        chunk_size: int = 64,
        initializer_range: float = 0.02,
        use_cache: bool = True,
        bos_token_id: int = None,
        eos_token_id: int = None,
        pad_token_id: int = None,
        layer_types: list = None,
        num_key_value_heads: int = None,
        rope_theta: float = 10000.0,
        linear_attention_type: str = "lightning",
        linear_conv_kernel_dim: int = None,
        linear_key_head_dim: int = None,
        linear_value_head_dim: int = None,
        linear_num_key_heads: int = None,
        linear_num_value_heads: int = None,
        **kwargs,
    ):
        for name, allowed in _CHOICES.items():
            value = locals()[name]
            if value not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")
        if head_dim is None:
            if hidden_size % num_attention_heads != 0:
                raise ValueError(
                    f"hidden_size ({hidden_size}) must be divisible by num_attention_heads "
                    f"({num_attention_heads}), or set head_dim"
                )
            head_dim = hidden_size // num_attention_heads
        if attention_norm_group_size < 1 or num_attention_heads % attention_norm_group_size != 0:
            raise ValueError(
                f"attention_norm_group_size ({attention_norm_group_size}) must divide num_attention_heads "
                f"({num_attention_heads})"
            )
        if layer_types is not None:
            layer_types = list(layer_types)
            if len(layer_types) != num_hidden_layers or set(layer_types) - set(LAYER_TYPES):
                raise ValueError(f"layer_types must name each of the {num_hidden_layers} layers one of "
                                 f"{', '.join(LAYER_TYPES)}, got {layer_types}")
        if num_key_value_heads is None:
            num_key_value_heads = num_attention_heads
        if num_key_value_heads < 1 or num_attention_heads % num_key_value_heads != 0:
            raise ValueError(f"num_key_value_heads ({num_key_value_heads}) must divide num_attention_heads "
                             f"({num_attention_heads})")
        if not gate_logit_normalizer > 0:
            raise ValueError(f"gate_logit_normalizer must be positive, got {gate_logit_normalizer}")
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be positive, got {chunk_size}")
        if linear_attention_type == "gated_delta_net":
            linear_conv_kernel_dim = 4 if linear_conv_kernel_dim is None else linear_conv_kernel_dim
            linear_key_head_dim = linear_key_head_dim or head_dim
            linear_value_head_dim = linear_value_head_dim or head_dim
            linear_num_key_heads = linear_num_key_heads or num_attention_heads
            linear_num_value_heads = linear_num_value_heads or linear_num_key_heads
            for name, value in (("linear_conv_kernel_dim", linear_conv_kernel_dim),
                                ("linear_key_head_dim", linear_key_head_dim),
                                ("linear_value_head_dim", linear_value_head_dim),
                                ("linear_num_key_heads", linear_num_key_heads),
                                ("linear_num_value_heads", linear_num_value_heads)):
                if value < 1:
                    raise ValueError(f"{name} must be positive, got {value}")
            if linear_num_value_heads % linear_num_key_heads != 0:
                raise ValueError(f"linear_num_value_heads ({linear_num_value_heads}) must be a multiple of "
                                 f"linear_num_key_heads ({linear_num_key_heads})")
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.head_dim = head_dim
        self.intermediate_size = intermediate_size
        self.rms_norm_eps = rms_norm_eps
        self.decay_type = decay_type
        self.decay_layer_eps = decay_layer_eps
        self.linear_attention_gate = linear_attention_gate
        self.gate_logit_normalizer = gate_logit_normalizer
        self.qk_feature_map = qk_feature_map
        self.v_feature_map = v_feature_map
        self.output_gate = output_gate
        self.attention_norm_group_size = attention_norm_group_size
        self.glu_type = glu_type
        self.add_bias_linear = add_bias_linear
        self.tie_word_embeddings = tie_word_embeddings
        self.chunk_size = chunk_size
        self.initializer_range = initializer_range
        self.use_cache = use_cache
        self.layer_types = layer_types
        self.num_key_value_heads = num_key_value_heads
        self.rope_theta = rope_theta
        self.linear_attention_type = linear_attention_type
        self.linear_conv_kernel_dim = linear_conv_kernel_dim
        self.linear_key_head_dim = linear_key_head_dim
        self.linear_value_head_dim = linear_value_head_dim
        self.linear_num_key_heads = linear_num_key_heads
        self.linear_num_value_heads = linear_num_value_heads
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self.pad_token_id = pad_token_id
        super().__init__(
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )
