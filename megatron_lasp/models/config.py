"""``LinearLMConfig``: megatron-core's ``TransformerConfig`` plus the linear-attention fields.

The config owns the model's rules: ``__post_init__`` checks the new fields and how the heads split
over the tensor- and sequence-parallel groups, with ``ValueError`` messages that name the config
fields to change (the training CLI maps field names to its flags). Presets (``tiny``,
``tnl-385m``, ``tnl-1b``, ``tnl-7b``; ``tnl-1b-mamba2`` / ``tnl-1b-gla``: TNL-1B with a per-token
gate; ``gdn-1b`` / ``gdn-1b-hybrid-1to3``: TNL-1B's sizes with Gated DeltaNet layers) follow the TransNormerLLM table in ``megatron_lasp/models/README.md`` (Presets);
:func:`linear_lm_config` builds a config from a preset plus overrides, and
:func:`preset_vocab_size` gives the preset's vocabulary.

Fields of ``TransformerConfig`` whose defaults differ here (TNL-style model): ``normalization``
(RMSNorm), ``gated_linear_unit`` (True; ``activation_func`` is set from ``glu_type``),
``add_bias_linear`` (False), ``hidden_dropout`` / ``attention_dropout`` (0), ``transformer_impl``
(``local``).
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass, field
from typing import Any, Dict, Optional

import torch
import torch.nn.functional as F
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_lasp.models.gate import GATES
from megatron_lasp.ops.cross_entropy import KERNELS as CROSS_ENTROPY_KERNELS
from megatron_lasp.ops.lightning_attn.utils import BACKENDS, MAX_HEAD_DIM
from megatron_lasp.ops.softmax_attn import SOFTMAX_KERNELS
from megatron_lasp.parallel.softmax import SOFTMAX_SP_MODES
from megatron_lasp.parallel.sp import SEQUENCE_PARALLEL_MODES

__all__ = [
    "LinearLMConfig",
    "PRESETS",
    "DECAY_TYPES",
    "GATES",
    "FEATURE_MAPS",
    "GLU_TYPES",
    "TRANSFORMER_IMPLS",
    "linear_lm_config",
    "preset_vocab_size",
    "te_available",
    "TE_MISSING_MESSAGE",
    "sglu_identity",
    "check_head_split",
    "check_softmax_head_split",
    "LINEAR_LAYER",
    "SOFTMAX_LAYER",
    "LINEAR_ATTENTION_TYPES",
    "check_delta_head_split",
]

DECAY_TYPES = ("tnl", "alibi", "none")
LINEAR_ATTENTION_TYPES = ("lightning", "gated_delta_net")
"""What a linear layer (``'L'``) is: TransNormerLLM's lightning attention (``attention.py``) or
Gated DeltaNet (``delta_net.py``); megatron-core's names (``--linear-attention-type``)."""
DELTA_NET_FIELDS = ("linear_conv_kernel_dim", "linear_key_head_dim", "linear_value_head_dim",
                    "linear_num_key_heads", "linear_num_value_heads")
"""The fields only a Gated DeltaNet layer reads (None for lightning layers)."""
FEATURE_MAPS = ("silu", "identity")
GLU_TYPES = ("sglu", "swiglu")
TRANSFORMER_IMPLS = ("local", "transformer_engine")

TE_MISSING_MESSAGE = (
    "transformer_impl transformer_engine needs Transformer Engine: pip install -e .[te] on a GPU "
    "machine, or use transformer_impl local"
)


def te_available() -> bool:
    """Whether Transformer Engine can be imported (checked without importing it)."""
    return importlib.util.find_spec("transformer_engine") is not None


def check_head_split(
    num_attention_heads: int,
    tensor_model_parallel_size: int = 1,
    context_parallel_size: int = 1,
    sequence_parallel_mode: str = "lasp",
) -> int:
    """The rule of how the heads split over TP and (ulysses) SP; return the heads per TP rank.

    Raises:
        ValueError: naming the fields, when the heads do not divide over tensor-parallel ranks, or
            (``ulysses``) the heads per tensor-parallel rank do not divide over the SP group.
    """
    heads, tp, sp = num_attention_heads, tensor_model_parallel_size, context_parallel_size
    if heads % tp != 0:
        raise ValueError(
            f"num_attention_heads ({heads}) must be divisible by tensor_model_parallel_size ({tp})"
        )
    local_heads = heads // tp
    if sequence_parallel_mode == "ulysses" and local_heads % sp != 0:
        raise ValueError(
            f"sequence_parallel_mode ulysses needs the heads per tensor-parallel rank ({local_heads}) "
            f"to be divisible by context_parallel_size ({sp}); change the sizes or use "
            f"sequence_parallel_mode lasp"
        )
    return local_heads


def check_delta_head_split(
    num_key_heads: int,
    num_value_heads: int,
    tensor_model_parallel_size: int = 1,
    context_parallel_size: int = 1,
    sequence_parallel_mode: str = "lasp",
) -> None:
    """The rule of how a Gated DeltaNet layer's heads split over TP and (ulysses) SP.

    Each TP rank holds whole key heads with the value heads that read them (GVA: value head ``j``
    reads key head ``j // (num_value_heads / num_key_heads)``).

    Raises:
        ValueError: naming the fields, when the value heads are not a multiple of the key heads,
            the key heads do not divide over the tensor-parallel ranks, or (``ulysses``) the value
            heads per tensor-parallel rank do not divide over the SP group.
    """
    hk, hv, tp, sp = num_key_heads, num_value_heads, tensor_model_parallel_size, context_parallel_size
    if hv % hk != 0:
        raise ValueError(f"linear_num_value_heads ({hv}) must be a multiple of linear_num_key_heads ({hk}) "
                         "(each key head is read by the same number of value heads)")
    if hk % tp != 0:
        raise ValueError(f"linear_num_key_heads ({hk}) must be divisible by tensor_model_parallel_size ({tp})")
    if sequence_parallel_mode == "ulysses" and (hv // tp) % sp != 0:
        raise ValueError(
            f"sequence_parallel_mode ulysses needs the Gated DeltaNet value heads per tensor-parallel rank "
            f"({hv // tp}) to be divisible by context_parallel_size ({sp}); change the sizes or use "
            "sequence_parallel_mode lasp"
        )


LINEAR_LAYER, SOFTMAX_LAYER = "L", "*"
LAYER_SYMBOLS = (LINEAR_LAYER, SOFTMAX_LAYER)
"""The characters of ``hybrid_layer_pattern``."""


def check_softmax_head_split(
    num_attention_heads: int,
    num_query_groups: Optional[int],
    tensor_model_parallel_size: int = 1,
    context_parallel_size: int = 1,
    softmax_sequence_parallel_mode: str = "allgather",
) -> None:
    """The rule of how the softmax layers' query and key/value heads split over TP and SP.

    Raises:
        ValueError: naming the fields, when the key/value heads do not divide the query heads or
            the tensor-parallel size, or (ulysses) the heads per tensor-parallel rank do not divide
            the sequence-parallel size.
    """
    groups = num_query_groups or num_attention_heads
    tp, sp = tensor_model_parallel_size, context_parallel_size
    if num_attention_heads % groups != 0 or groups % tp != 0:
        raise ValueError(
            f"num_query_groups ({groups}) must divide num_attention_heads ({num_attention_heads}) and be "
            f"divisible by tensor_model_parallel_size ({tp}) (the softmax layers' key/value heads)"
        )
    if softmax_sequence_parallel_mode == "ulysses" and (groups // tp) % sp != 0:
        raise ValueError(
            f"softmax_sequence_parallel_mode ulysses needs the key/value heads per tensor-parallel rank "
            f"({groups // tp}) to be divisible by context_parallel_size ({sp}); use "
            "softmax_sequence_parallel_mode allgather or change num_query_groups"
        )


def sglu_identity(x: torch.Tensor) -> torch.Tensor:
    """The "activation" of SGLU: none, so that the MLP computes ``(W1 x) * (W2 x)``."""
    return x


@dataclass
class LinearLMConfig(TransformerConfig):
    """Configuration of the TransNormerLLM-style linear-attention LM (see the module docstring)."""

    # ---- TransformerConfig fields with TNL defaults -------------------------------------------
    normalization: str = "RMSNorm"
    """Pre-norm type; only RMSNorm is supported (--normalization)."""
    gated_linear_unit: bool = True
    """GLU MLP; always True here (set from glu_type)."""
    add_bias_linear: bool = False
    """Biases on the linear layers (--add-bias-linear / --disable-bias-linear)."""
    hidden_dropout: float = 0.0
    """Dropout after attention and MLP (--hidden-dropout)."""
    attention_dropout: float = 0.0
    """Unused by linear attention (kept for megatron-core)."""
    transformer_impl: str = "local"
    """'local' (megatron-core's torch modules) or 'transformer_engine' (--transformer-impl)."""

    # ---- linear attention ---------------------------------------------------------------------
    sequence_parallel_mode: str = "lasp"
    """How attention runs over the sequence-parallel (context-parallel) group: lasp, lasp2,
    ulysses or allgather (--sequence-parallel-mode)."""
    kernel_backend: Optional[str] = None
    """Lightning-attention kernel backend: None (triton on CUDA, torch on CPU), 'torch' or
    'triton' (--kernel-backend)."""
    decay_type: str = "tnl"
    """Per-head decay slopes: 'tnl' (ALiBi slopes x (1 - l/(L-1) + decay_layer_eps)), 'alibi'
    (ALiBi slopes, same in every layer) or 'none' (no decay) (--decay-type)."""
    decay_layer_eps: float = 1e-5
    """The epsilon of the 'tnl' depth scaling, keeping the last layer's decay non-zero
    (--decay-layer-eps)."""
    linear_attention_type: str = "lightning"
    """What a linear layer is: 'lightning' (TransNormerLLM's lightning attention, the fields above
    and below) or 'gated_delta_net' (Gated DeltaNet, ``delta_net.py``: the ``linear_*`` fields
    below) (--linear-attention-type)."""
    linear_conv_kernel_dim: Optional[int] = None
    """Gated DeltaNet: taps of the causal depthwise convolution on q, k, v; None: 4 (gated_delta_net),
    unused by lightning layers (--linear-conv-kernel-dim)."""
    linear_key_head_dim: Optional[int] = None
    """Gated DeltaNet: channels per query/key head; None: kv_channels (--linear-key-head-dim)."""
    linear_value_head_dim: Optional[int] = None
    """Gated DeltaNet: channels per value head; None: kv_channels (--linear-value-head-dim)."""
    linear_num_key_heads: Optional[int] = None
    """Gated DeltaNet: query/key heads; None: num_attention_heads (--linear-num-key-heads)."""
    linear_num_value_heads: Optional[int] = None
    """Gated DeltaNet: value heads, a multiple of the key heads (GVA); None: linear_num_key_heads
    (--linear-num-value-heads)."""
    linear_attention_gate: str = "none"
    """Per-token, per-head log-decay learned from the input (``gate.py``): 'none' (the fixed decay
    of ``decay_type``, the fast path), 'mamba2' (``-exp(A_log) * softplus(x W_dt + dt_bias)``) or
    'gla' (``logsigmoid(x W_g + b_g) / gate_logit_normalizer``); a gate replaces the fixed decay
    (--linear-attention-gate)."""
    gate_logit_normalizer: float = 16.0
    """The 'gla' gate's divisor of the log-sigmoid (16 as published; --gate-logit-normalizer)."""
    qk_feature_map: str = "silu"
    """Feature map on q and k: 'silu' (TNL) or 'identity' (--qk-feature-map)."""
    v_feature_map: str = "silu"
    """Feature map on v: 'silu' (TNL) or 'identity' (--v-feature-map)."""
    output_gate: bool = True
    """Sigmoid output gate, fused into the QKV projection as a fourth part (--no-output-gate)."""
    attention_norm_group_size: int = 1
    """Heads per RMSNorm group on the attention output (1: per head). Groups never straddle TP
    ranks, so TP gives the TP=1 result (--attention-norm-group-size)."""
    glu_type: str = "sglu"
    """MLP: 'sglu' ((W1 x) * (W2 x), no activation, TNL) or 'swiglu' (silu(W1 x) * (W2 x))
    (--glu-type)."""
    share_embeddings_and_output_weights: bool = False
    """Tie the output layer to the input embedding (--share-embeddings-and-output-weights;
    megatron's --untie-embeddings-and-output-weights is the opposite)."""
    fusion: Optional[bool] = None
    """Fused Triton kernels for the elementwise work around the matmuls (norms, feature maps,
    norm x gate, GLU product; ``megatron_lasp.ops.fused``). None: on with CUDA, off on CPU;
    False: the plain PyTorch path everywhere (--no-fusion)."""
    recompute_elementwise: bool = False
    """Selective recompute of elementwise outputs that the next matmul saves (the pre-norms'
    outputs, the gated attention norm, the GLU product): freed after the forward, recomputed from
    the tensors kept anyway right before their backward; no matmul is recomputed. Needs
    recompute_granularity 'selective' (--recompute-modules elementwise)."""

    # ---- hybrid models: softmax-attention layers among the linear ones (softmax_attention.py) --
    hybrid_layer_pattern: Optional[str] = None
    """One character per layer, each layer with its MLP: 'L' linear attention, '*' softmax
    attention (megatron-core's hybrid symbol), e.g. 'LLL*LLL*'; None: every layer linear
    (--hybrid-layer-pattern). The softmax layers use num_query_groups key/value heads (GQA) and
    RoPE (rotary_base); the linear layers keep one key/value head per head."""
    softmax_sequence_parallel_mode: str = "allgather"
    """How the softmax layers run over the sequence-parallel group: 'allgather' (K and V gathered),
    'allgather-balanced' (the same with the causal work evened out over the ranks) or 'ulysses'
    (all-to-all to head shards) (--softmax-sequence-parallel-mode)."""
    softmax_kernel: str = "auto"
    """The softmax layers' library kernel: auto, sdpa, flex, varlen or math
    (megatron_lasp/ops/softmax_attn) (--softmax-kernel)."""
    rotary_base: float = 10000.0
    """RoPE base of the softmax layers (--rotary-base)."""

    # ---- long-context memory (megatron_lasp/models/loss.py, offload.py, chunked.py) ----------
    fused_linear_cross_entropy: bool = True
    """Output layer + cross-entropy chunked over tokens, never holding the [tokens, vocab] logits
    (--no-fused-linear-cross-entropy: megatron-core's output layer and vocab-parallel loss)."""
    cross_entropy_chunk_size: int = 0
    """Tokens per chunk of the fused loss; 0: about 2^28 logits per chunk (--cross-entropy-chunk-size)."""
    cross_entropy_kernel: str = "torch"
    """The fused loss's softmax part on each logit chunk: 'torch' (PyTorch ops, the reference) or
    'triton' (megatron_lasp/ops/cross_entropy, fewer passes over the logits; what training on a GPU
    uses unless --cross-entropy-kernel says otherwise)."""
    offload_layer_inputs: bool = False
    """Move the layer inputs saved for activation recompute to pinned host memory in forward
    (side stream) and prefetch them in backward (--cpu-offloading)."""
    offload_num_layers: Optional[int] = None
    """With offload_layer_inputs: move those of the first this many layers of each pipeline stage
    only, the others stay on the device; None: every layer (--cpu-offloading-num-layers)."""
    recompute_chunk_size: int = 0
    """> 0: this project's per-layer recompute instead of megatron-core's: only the layer input is
    kept, and each layer runs (forward, recompute and backward) in chunks of this many tokens,
    the attention's state carried from chunk to chunk, also across the ranks of a lasp group
    (chunked.py); with TP sequence parallelism or the other SP modes only the MLP half is chunked
    (--recompute-chunk-size). Needs recompute_granularity None (it
    replaces it)."""
    softmax_query_chunks_from: int = 262144
    """With recompute_chunk_size: a hybrid's softmax layer runs in query chunks (chunked.py) when
    the whole sequence (all sequence-parallel ranks) has at least this many tokens; below, its
    attention runs over the whole sequence and its MLP in chunks. Query chunks hold the layer's
    working set to one chunk's, but a chunk's queries attend to more keys than queries, and there
    the flash kernel runs at about 320 TFLOP/s against 530 for the square causal call (H100): at
    128K tokens of the 1:7 hybrid they saved 2.5 of 34.5 GiB and cost 28% of the step."""

    def __post_init__(self) -> None:
        self._check_linear_lm_fields()
        self.gated_linear_unit = True
        self.activation_func = sglu_identity if self.glu_type == "sglu" else F.silu
        if self.is_hybrid:
            # layers of two kinds have differently shaped weights: checkpoint them per layer
            # (megatron-core stacks homogeneous layers into one tensor per weight)
            self.hetereogenous_dist_checkpoint = True
        if self.pipeline_model_parallel_size > 1 and self.pipeline_dtype is None:
            self.pipeline_dtype = self.params_dtype
        super().__post_init__()
        if self.delta_net:
            self._resolve_delta_net_fields()
        if self.num_query_groups not in (None, self.num_attention_heads) and not self.is_hybrid:
            raise ValueError(
                f"num_query_groups ({self.num_query_groups}) must equal num_attention_heads "
                f"({self.num_attention_heads}): linear attention has one key/value head per head "
                "(grouped-query attention is for the softmax layers of a hybrid_layer_pattern)"
            )
        if self.is_hybrid:
            check_softmax_head_split(self.num_attention_heads, self.num_query_groups,
                                     self.tensor_model_parallel_size, self.context_parallel_size,
                                     self.softmax_sequence_parallel_mode)
        if self.kv_channels > MAX_HEAD_DIM and not self.delta_net:
            raise ValueError(
                f"head dim kv_channels ({self.kv_channels}) exceeds the kernels' limit "
                f"{MAX_HEAD_DIM}; use more num_attention_heads"
            )

    def _check_linear_lm_fields(self) -> None:
        choices = {
            "sequence_parallel_mode": SEQUENCE_PARALLEL_MODES,
            "kernel_backend": (None, *BACKENDS),
            "decay_type": DECAY_TYPES,
            "linear_attention_type": LINEAR_ATTENTION_TYPES,
            "linear_attention_gate": GATES,
            "qk_feature_map": FEATURE_MAPS,
            "v_feature_map": FEATURE_MAPS,
            "glu_type": GLU_TYPES,
            "transformer_impl": TRANSFORMER_IMPLS,
            "normalization": ("RMSNorm",),
            "softmax_sequence_parallel_mode": SOFTMAX_SP_MODES,
            "softmax_kernel": SOFTMAX_KERNELS,
        }
        for name, allowed in choices.items():
            value = getattr(self, name)
            if value not in allowed:
                shown = ", ".join(str(a) for a in allowed)
                raise ValueError(f"{name} must be one of {shown}, got {value!r}")
        if self.transformer_impl == "transformer_engine" and not te_available():
            raise ValueError(TE_MISSING_MESSAGE)
        self._check_delta_net_fields()
        if self.gated and self.transformer_impl == "transformer_engine":
            # TE fuses the input norm into linear_qkv: the gate projection would see the un-normed input
            raise ValueError(
                f"linear_attention_gate {self.linear_attention_gate} needs transformer_impl local "
                "(Transformer Engine fuses the input norm into the q/k/v projection only)"
            )
        if not (self.gate_logit_normalizer > 0.0 and math.isfinite(self.gate_logit_normalizer)):
            raise ValueError(f"gate_logit_normalizer must be a finite number > 0, got {self.gate_logit_normalizer}")
        if (
            self.recompute_granularity == "selective"
            and "layernorm" in (self.recompute_modules or [])
            and self.transformer_impl == "local"
        ):
            # megatron-core's output-discarding checkpoint reads Transformer Engine's FP8 state
            raise ValueError(
                "recompute_modules layernorm needs transformer_impl transformer_engine; with the "
                "local implementation use core_attn and/or mlp (or recompute_granularity full)"
            )
        self._check_hybrid_fields()
        if self.cross_entropy_kernel not in CROSS_ENTROPY_KERNELS:
            raise ValueError(f"cross_entropy_kernel {self.cross_entropy_kernel!r} must be one of "
                             f"{', '.join(map(repr, CROSS_ENTROPY_KERNELS))}")
        if self.cross_entropy_chunk_size < 0 or self.recompute_chunk_size < 0:
            raise ValueError(
                f"cross_entropy_chunk_size ({self.cross_entropy_chunk_size}) and recompute_chunk_size "
                f"({self.recompute_chunk_size}) must be >= 0"
            )
        if self.recompute_chunk_size > 0 and self.recompute_granularity is not None:
            raise ValueError(
                "recompute_chunk_size replaces megatron-core's recompute: set recompute_granularity None"
            )
        if self.recompute_chunk_size > 0 and self.hidden_dropout > 0:
            raise ValueError("recompute_chunk_size needs hidden_dropout 0 (it does not replay the dropout RNG)")
        if self.offload_num_layers is not None:
            per_stage = self.num_layers // max(self.pipeline_model_parallel_size, 1)
            if not self.offload_layer_inputs:
                raise ValueError("offload_num_layers needs offload_layer_inputs")
            if not 1 <= self.offload_num_layers <= per_stage:
                raise ValueError(f"offload_num_layers ({self.offload_num_layers}) must be between 1 and the layers "
                                 f"per pipeline stage ({per_stage})")
        if self.recompute_elementwise and self.recompute_granularity != "selective":
            raise ValueError(
                "recompute_elementwise needs recompute_granularity selective "
                f"(got {self.recompute_granularity!r})"
            )
        if not (self.decay_layer_eps >= 0.0 and math.isfinite(self.decay_layer_eps)):
            raise ValueError(f"decay_layer_eps must be a finite number >= 0, got {self.decay_layer_eps}")
        if self.num_layers < 1:
            raise ValueError(f"num_layers must be positive, got {self.num_layers}")
        heads, tp = self.num_attention_heads, self.tensor_model_parallel_size
        if heads < 1 or self.hidden_size < 1:
            raise ValueError(
                f"num_attention_heads ({heads}) and hidden_size ({self.hidden_size}) must be positive"
            )
        # a Gated DeltaNet model's ulysses split is of its own heads (_resolve_delta_net_fields)
        local_heads = check_head_split(heads, tp, self.context_parallel_size,
                                       "lasp" if self.delta_net else self.sequence_parallel_mode)
        group = self.attention_norm_group_size
        if group < 1 or local_heads % group != 0:
            raise ValueError(
                f"attention_norm_group_size ({group}) must be positive and divide the heads per "
                f"tensor-parallel rank ({heads} / {tp} = {local_heads}), so no norm group straddles ranks"
            )
        if self.kv_channels is None and self.hidden_size % heads != 0:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads ({heads}), "
                f"or set kv_channels"
            )

    _LIGHTNING_ONLY = {"linear_attention_gate": "none", "decay_type": "tnl", "decay_layer_eps": 1e-5,
                       "qk_feature_map": "silu", "v_feature_map": "silu", "output_gate": True,
                       "attention_norm_group_size": 1}
    """Lightning-attention fields (with their defaults) that a Gated DeltaNet layer does not read."""

    def _check_delta_net_fields(self) -> None:
        """The fields of one kind of linear layer are refused with the other kind."""
        if not self.delta_net:
            given = [name for name in DELTA_NET_FIELDS if getattr(self, name) is not None]
            if given:
                raise ValueError(f"{given[0]} is read by linear_attention_type gated_delta_net only: drop it "
                                 "or set linear_attention_type gated_delta_net")
            return
        for name, default in self._LIGHTNING_ONLY.items():
            if getattr(self, name) != default:
                raise ValueError(f"{name} is read by linear_attention_type lightning only (a Gated DeltaNet layer "
                                 f"has its own gate, output gate and norm): drop it or set linear_attention_type "
                                 "lightning")
        for name in DELTA_NET_FIELDS:
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.transformer_impl == "transformer_engine":
            raise ValueError("linear_attention_type gated_delta_net needs transformer_impl local (its layer is "
                             "built from megatron-core's local linears only)")

    def _resolve_delta_net_fields(self) -> None:
        """Fill the Gated DeltaNet sizes left None (from ``kv_channels`` and the heads) and check
        how its heads split."""
        if self.linear_conv_kernel_dim is None:
            self.linear_conv_kernel_dim = 4
        if self.linear_key_head_dim is None:
            self.linear_key_head_dim = self.kv_channels
        if self.linear_value_head_dim is None:
            self.linear_value_head_dim = self.kv_channels
        if self.linear_num_key_heads is None:
            self.linear_num_key_heads = self.num_attention_heads
        if self.linear_num_value_heads is None:
            self.linear_num_value_heads = self.linear_num_key_heads
        check_delta_head_split(self.linear_num_key_heads, self.linear_num_value_heads,
                               self.tensor_model_parallel_size, self.context_parallel_size,
                               self.sequence_parallel_mode)

    def _check_hybrid_fields(self) -> None:
        pattern = self.hybrid_layer_pattern
        if pattern is None:
            return
        if not isinstance(pattern, str) or set(pattern) - set(LAYER_SYMBOLS) or len(pattern) != self.num_layers:
            raise ValueError(
                f"hybrid_layer_pattern must have one character per layer ({self.num_layers}), each "
                f"'L' (linear attention) or '*' (softmax attention), got {pattern!r}"
            )
        if not (self.rotary_base > 0 and math.isfinite(self.rotary_base)):
            raise ValueError(f"rotary_base must be a finite number > 0, got {self.rotary_base}")

    @property
    def layer_kinds(self) -> str:
        """One character per layer: 'L' linear, '*' softmax (all 'L' without a pattern)."""
        return self.hybrid_layer_pattern or LINEAR_LAYER * self.num_layers

    @property
    def is_hybrid(self) -> bool:
        """Whether some layer is a softmax-attention layer."""
        return SOFTMAX_LAYER in (self.hybrid_layer_pattern or "")

    @property
    def head_dim(self) -> int:
        """Channels per head (``kv_channels``)."""
        return self.kv_channels

    @property
    def attention_projection_size(self) -> int:
        """Heads x head dim: the width of each of q, k, v (and the gate)."""
        return self.num_attention_heads * self.kv_channels

    @property
    def fused(self) -> bool:
        """Whether the fused elementwise kernels are used (``fusion``, resolved for this machine)."""
        if self.fusion is None:
            return torch.cuda.is_available()
        return bool(self.fusion)

    @property
    def delta_net(self) -> bool:
        """Whether the linear layers are Gated DeltaNet (``linear_attention_type``)."""
        return self.linear_attention_type == "gated_delta_net"

    @property
    def gated(self) -> bool:
        """Whether the linear attention has a per-token gate (``linear_attention_gate != 'none'``)."""
        return self.linear_attention_gate != "none"

    @property
    def qkv_parts(self) -> int:
        """Parts of the fused input projection per head: q, k, v (+ the gate)."""
        return 4 if self.output_gate else 3


@dataclass(frozen=True)
class _Preset:
    vocab_size: int
    fields: Dict[str, Any] = field(default_factory=dict)


PRESETS: Dict[str, _Preset] = {
    # CPU tests: 2 layers, 4 heads x 16, GLU 96, vocab 128.
    "tiny": _Preset(128, dict(num_layers=2, hidden_size=64, num_attention_heads=4, ffn_hidden_size=96)),
    "tnl-385m": _Preset(
        64000, dict(num_layers=24, hidden_size=1024, num_attention_heads=8, ffn_hidden_size=2816)
    ),
    "tnl-1b": _Preset(
        64000, dict(num_layers=16, hidden_size=2048, num_attention_heads=16, ffn_hidden_size=5632)
    ),
    # Hybrids of TNL-1B's size: one softmax-attention layer in eight (MiniMax-01's ratio) or in four
    # (Qwen3-Next's, Kimi Linear's), each the last of its group; GQA with 4 key/value heads.
    "tnl-1b-hybrid-1to7": _Preset(
        64000, dict(num_layers=16, hidden_size=2048, num_attention_heads=16, ffn_hidden_size=5632,
                    hybrid_layer_pattern="LLLLLLL*" * 2, num_query_groups=4)
    ),
    "tnl-1b-hybrid-1to3": _Preset(
        64000, dict(num_layers=16, hidden_size=2048, num_attention_heads=16, ffn_hidden_size=5632,
                    hybrid_layer_pattern="LLL*" * 4, num_query_groups=4)
    ),
    # TNL-1B with a per-token gate instead of the fixed decay (the same flag works on every preset)
    "tnl-1b-mamba2": _Preset(
        64000, dict(num_layers=16, hidden_size=2048, num_attention_heads=16, ffn_hidden_size=5632,
                    linear_attention_gate="mamba2")
    ),
    "tnl-1b-gla": _Preset(
        64000, dict(num_layers=16, hidden_size=2048, num_attention_heads=16, ffn_hidden_size=5632,
                    linear_attention_gate="gla")
    ),
    # Gated DeltaNet (arXiv 2412.06464) at TNL-1B's width and depth: 16 query/key and 16 value heads
    # of 128 (the defaults from the heads and kv_channels), and a Qwen3-Next-like hybrid of them with
    # one softmax layer in four (GQA with 4 key/value heads)
    "gdn-1b": _Preset(
        64000, dict(num_layers=16, hidden_size=2048, num_attention_heads=16, ffn_hidden_size=5632,
                    linear_attention_type="gated_delta_net")
    ),
    "gdn-1b-hybrid-1to3": _Preset(
        64000, dict(num_layers=16, hidden_size=2048, num_attention_heads=16, ffn_hidden_size=5632,
                    linear_attention_type="gated_delta_net", hybrid_layer_pattern="LLL*" * 4, num_query_groups=4)
    ),
    "tnl-7b": _Preset(
        64000, dict(num_layers=30, hidden_size=4096, num_attention_heads=32, ffn_hidden_size=11008)
    ),
}
"""Model presets: vocabulary size and the config fields (head dim = hidden / heads)."""


def _check_preset(preset: str) -> _Preset:
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {', '.join(PRESETS)}, got {preset!r}")
    return PRESETS[preset]


def preset_vocab_size(preset: str) -> int:
    """The vocabulary size of a preset (64000 for the TNL models)."""
    return _check_preset(preset).vocab_size


def linear_lm_config(preset: str = "tiny", **overrides: Any) -> LinearLMConfig:
    """Build a :class:`LinearLMConfig` from a preset and field overrides.

    Args:
        preset: one of :data:`PRESETS`.
        **overrides: any ``LinearLMConfig`` / ``TransformerConfig`` field (parallel sizes,
            ``sequence_parallel``, ``params_dtype``, ``recompute_granularity`` ...).

    Raises:
        ValueError: unknown preset, or a field value that fails validation.
    """
    fields = dict(_check_preset(preset).fields)
    fields.update(overrides)
    return LinearLMConfig(**fields)
