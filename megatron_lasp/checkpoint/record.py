"""What a checkpoint records besides the tensors: the model's architecture, the vocabulary, the
tokenizer and the parallel layout (``config.json``) and the run's flags (``args.json``); and the
check that a model to be loaded is the one recorded.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_lasp.checkpoint.layout import FORMAT_VERSION, MODEL_TYPE, CheckpointError, read_config, read_tracker
from megatron_lasp.data.tokenizer import TokenizerSettings

RUNTIME_CONFIG_FIELDS = (
    "sequence_parallel_mode",
    "softmax_sequence_parallel_mode",
    "softmax_kernel",
    "kernel_backend",
    "transformer_impl",
    "fusion",
    "recompute_granularity",
    "recompute_method",
    "recompute_num_layers",
    "recompute_modules",
    "recompute_elementwise",
    "recompute_chunk_size",
    "offload_layer_inputs",
    "offload_num_layers",
    "fused_linear_cross_entropy",
    "cross_entropy_chunk_size",
    "cross_entropy_kernel",
)
"""LinearLMConfig fields that say how to run, not what the model is (kernels, recompute, offloading,
the loss's chunking): not part of config.json's model, neither compared on resume nor applied when
a checkpoint is loaded for inference or export (older checkpoints may record some: ignored)."""

FINE_TUNE_FIELDS = ("init_method_std", "hidden_dropout", "attention_dropout")
"""Recorded architecture fields that a resume may change (initialization, dropout)."""

_TRANSFORMER_FIELDS_KEPT = ("num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size", "kv_channels",
                            "normalization", "layernorm_epsilon", "add_bias_linear", "init_method_std",
                            "hidden_dropout", "attention_dropout", "num_query_groups", "linear_conv_kernel_dim",
                            "linear_key_head_dim", "linear_value_head_dim", "linear_num_key_heads",
                            "linear_num_value_heads")
"""megatron-core ``TransformerConfig`` fields that describe the model (its others say how to run)."""


@dataclass(frozen=True)
class RunRecord:
    """What a checkpoint records about the run that wrote it, besides the model (``config.json``'s
    vocabulary, tokenizer and layout; ``args.json``). The defaults describe one process."""

    vocab_size_tokenizer: Optional[int]
    """The tokenizer's ids (None: unknown)."""
    padded_vocab_size: int
    """Rows of the embedding table."""
    seq_length: Optional[int]
    """Tokens per training sample (None: unknown)."""
    tokenizer: TokenizerSettings
    """What builds the tokenizer."""
    tensor_model_parallel_size: int = 1
    """TP size."""
    pipeline_model_parallel_size: int = 1
    """PP size."""
    context_parallel_size: int = 1
    """Sequence-parallel (LASP) size."""
    data_parallel_size: int = 1
    """DP size (without SP)."""
    sequence_parallel_mode: str = "lasp"
    """How linear attention ran over the sequence-parallel group."""
    ddp_impl: str = "torch"
    """Data-parallel implementation (its optimizer state loads only into the same kind)."""
    use_distributed_optimizer: bool = False
    """megatron-core's distributed optimizer (ZeRO-1)."""
    dist_ckpt_optim_fully_reshardable: bool = False
    """Save the distributed optimizer's state fully reshardable instead of ``dp_reshardable``."""
    world_size: int = 1
    """Number of processes (RNG states restore only at the same one)."""
    flags: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    """The run's settings as ``args.json`` holds them (JSON types only)."""

    @property
    def optimizer_sharding_type(self) -> str:
        """megatron-core DistributedOptimizer checkpoint format: DP-reshardable (fast) or fully reshardable."""
        return "fully_reshardable" if self.dist_ckpt_optim_fully_reshardable else "dp_reshardable"


@dataclass(frozen=True)
class FieldNames:
    """How the caller names architecture fields in a refusal (training: its flags)."""

    sizes: Tuple[str, ...]
    """Fields compared first, in this order (``padded_vocab_size`` among them if wanted); every
    other recorded field follows."""
    setter: Callable[[str], Optional[str]]
    """What sets field ``name`` (a flag, or words), or None when nothing the user passes does."""


def model_fields(config) -> Dict[str, Any]:
    """The architecture fields of a ``LinearLMConfig`` (JSON types only): config.json's ``model``."""
    base = {f.name for f in dataclasses.fields(TransformerConfig)}
    out = {}
    for f in dataclasses.fields(config):
        if f.name in RUNTIME_CONFIG_FIELDS or (f.name in base and f.name not in _TRANSFORMER_FIELDS_KEPT):
            continue
        value = getattr(config, f.name)
        if isinstance(value, (bool, int, float, str)) or value is None:
            out[f.name] = value
    return out


LATER_FIELDS = {"linear_attention_gate": "none", "gate_logit_normalizer": 16.0, "linear_attention_type": "lightning"}
"""Architecture fields newer than some checkpoints, with the value the models of those checkpoints
have (so that, e.g., a gated run refuses a checkpoint saved before the gate existed by its field)."""


def architecture_fields(model: Mapping[str, Any]) -> Dict[str, Any]:
    """config.json's ``model`` section without :data:`RUNTIME_CONFIG_FIELDS` (which checkpoints
    saved before some of them were runtime fields record), :data:`LATER_FIELDS` filled in where
    absent: ``LinearLMConfig`` keyword arguments."""
    fields = dict(LATER_FIELDS)
    fields.update((name, value) for name, value in model.items() if name not in RUNTIME_CONFIG_FIELDS)
    return fields


def config_dict(config, run: RunRecord) -> Dict[str, Any]:
    """What ``config.json`` holds: the model fields, vocabulary, tokenizer and the saved layout."""
    return {
        "format_version": FORMAT_VERSION,
        "model_type": MODEL_TYPE,
        "model": model_fields(config),
        "vocab_size": run.vocab_size_tokenizer,
        "padded_vocab_size": run.padded_vocab_size,
        "seq_length": run.seq_length,
        "tokenizer": run.tokenizer.as_dict(),
        "parallel": {
            "tensor_model_parallel_size": run.tensor_model_parallel_size,
            "pipeline_model_parallel_size": run.pipeline_model_parallel_size,
            "context_parallel_size": run.context_parallel_size,
            "data_parallel_size": run.data_parallel_size,
            "sequence_parallel_mode": run.sequence_parallel_mode,
            "ddp_impl": run.ddp_impl,
            "use_distributed_optimizer": run.use_distributed_optimizer,
            "optimizer_sharding_type": run.optimizer_sharding_type if run.use_distributed_optimizer else None,
            "world_size": run.world_size,
        },
    }


def check_architecture(root: str, run: RunRecord, config, names: FieldNames,
                       iteration: Optional[int] = None) -> None:
    """Raise :class:`CheckpointError` naming the first architecture field that differs.

    The sizes first (``names.sizes``), then every other field the checkpoint records except
    :data:`FINE_TUNE_FIELDS` (runtime fields are never compared: :data:`RUNTIME_CONFIG_FIELDS`).
    Does nothing when ``root`` holds no checkpoint yet (the run starts from scratch).
    """
    if iteration is None and (not os.path.isdir(root) or read_tracker(root) is None):
        return
    _, saved = read_config(root, iteration)
    current = dict(model_fields(config), padded_vocab_size=run.padded_vocab_size)
    saved_fields = dict(architecture_fields(saved["model"]), padded_vocab_size=saved["padded_vocab_size"])
    for name in names.sizes + tuple(n for n in saved_fields if n not in names.sizes):
        compared = name in names.sizes or (name in current and name not in FINE_TUNE_FIELDS)
        if compared and name in saved_fields and saved_fields[name] != current.get(name):
            setter = names.setter(name)
            hint = f"change {setter} to match" if setter else "this run builds another model than the checkpoint's"
            raise CheckpointError(f"--load {root}: checkpoint has {name}={saved_fields[name]} but this run has "
                                  f"{name}={current.get(name)}; {hint}")
