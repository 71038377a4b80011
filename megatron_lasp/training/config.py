"""The run's configuration: ``pretrain_linear_lm.py``'s flags, parsed once into frozen, typed records.

:class:`RunConfig` holds one record per concern (model, memory, parallelism, training, optimizer,
data, checkpoints, logging). ``training/arguments.py`` builds it from the command line (the
argparse namespace never leaves that module); the loop and every room read it, or the small
settings record a room takes (:meth:`RunConfig.optimizer_settings`, :meth:`RunConfig.data_settings`,
the tokenizer's ``TokenizerSettings``), never the flags themselves.

Field names are the flags' destinations (``--num-layers`` -> ``num_layers``), so a checkpoint's
``args.json`` (:meth:`RunConfig.flags`) keeps its keys. Where two checks meet:

- the range of a single flag (sizes > 0, probabilities <= 1, ...) is checked at parse time, in one
  table in ``arguments.py``;
- rules between fields of one concern are the record's ``__post_init__``, rules between concerns
  :class:`RunConfig`'s; both raise :class:`ArgumentError` naming the flag to change;
- what depends on the machine, the files or the world size is checked in ``arguments.py``, which
  fills in the values that follow from them (``ddp_impl``, ``kernel_backend``, the data-parallel
  size, the number of micro-batches) before the records are frozen.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

from megatron_lasp.data.tokenizer import TokenizerSettings
from megatron_lasp.training.data import DataSettings
from megatron_lasp.training.optim import OptimizerSettings

DataBlend = Tuple[List[str], Optional[List[float]]]


class ArgumentError(ValueError):
    """A user mistake in the flags; the message names the flag to change."""


@dataclass(frozen=True)
class ModelOptions:
    """The architecture: a preset and the fields given on the command line (None: the preset's or
    ``LinearLMConfig``'s default)."""

    model_preset: Optional[str] = None
    """Preset architecture the fields below override (``--model-preset``)."""
    num_layers: Optional[int] = None
    """Transformer layers."""
    hidden_size: Optional[int] = None
    """Model width d_model."""
    num_attention_heads: Optional[int] = None
    """Linear-attention heads."""
    ffn_hidden_size: Optional[int] = None
    """Channel-mixer (GLU) width."""
    kv_channels: Optional[int] = None
    """Channels per head."""
    num_query_groups: Optional[int] = None
    """Key/value heads of a hybrid's softmax layers (GQA); must equal the heads without them."""
    normalization: Optional[str] = None
    """Pre-norm type."""
    add_bias_linear: Optional[bool] = None
    """Biases on the linear layers."""
    hidden_dropout: Optional[float] = None
    """Dropout after attention and MLP."""
    decay_type: Optional[str] = None
    """Per-head decay slopes of linear attention."""
    decay_layer_eps: Optional[float] = None
    """Epsilon of the tnl depth scaling of the decay."""
    linear_attention_type: Optional[str] = None
    """What the linear layers are (lightning, gated_delta_net)."""
    linear_conv_kernel_dim: Optional[int] = None
    """Gated DeltaNet: taps of the short convolution."""
    linear_key_head_dim: Optional[int] = None
    """Gated DeltaNet: channels per query/key head."""
    linear_value_head_dim: Optional[int] = None
    """Gated DeltaNet: channels per value head."""
    linear_num_key_heads: Optional[int] = None
    """Gated DeltaNet: query/key heads."""
    linear_num_value_heads: Optional[int] = None
    """Gated DeltaNet: value heads."""
    linear_attention_gate: Optional[str] = None
    """Per-token gate of linear attention (none, mamba2, gla)."""
    gate_logit_normalizer: Optional[float] = None
    """Divisor of the gla gate's log-sigmoid."""
    qk_feature_map: Optional[str] = None
    """Feature map on q and k."""
    v_feature_map: Optional[str] = None
    """Feature map on v."""
    output_gate: Optional[bool] = None
    """Sigmoid output gate of linear attention."""
    attention_norm_group_size: Optional[int] = None
    """Heads per RMSNorm group on the attention output."""
    glu_type: Optional[str] = None
    """Channel mixer."""
    share_embeddings_and_output_weights: Optional[bool] = None
    """Tie the output layer to the embedding."""
    init_method_std: Optional[float] = None
    """Std of the normal weight init."""
    make_vocab_size_divisible_by: int = 128
    """Pad the vocabulary to a multiple of this x TP size."""
    transformer_impl: str = "local"
    """megatron-core module implementation."""
    kernel_backend: str = "torch"
    """Linear-attention kernels (``triton`` on GPU, ``torch`` on CPU by default)."""
    fusion: Optional[bool] = None
    """False: the plain PyTorch elementwise ops instead of the fused kernels (``--no-fusion``)."""
    hybrid_layer_pattern: Optional[str] = None
    """One character per layer, ``L`` linear or ``*`` softmax attention (None: the preset's, or all ``L``)."""
    rotary_base: Optional[float] = None
    """RoPE base of the softmax layers."""
    softmax_kernel: str = "auto"
    """The softmax layers' library kernel."""

    OVERRIDES = ("num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size", "kv_channels",
                 "num_query_groups", "normalization", "add_bias_linear", "hidden_dropout", "decay_type",
                 "decay_layer_eps", "linear_attention_type", "linear_conv_kernel_dim", "linear_key_head_dim",
                 "linear_value_head_dim", "linear_num_key_heads", "linear_num_value_heads", "linear_attention_gate",
                 "gate_logit_normalizer", "qk_feature_map", "v_feature_map", "output_gate", "attention_norm_group_size",
                 "glu_type", "share_embeddings_and_output_weights", "init_method_std", "hybrid_layer_pattern",
                 "rotary_base")

    def __post_init__(self) -> None:
        if self.model_preset is None:
            missing = [f"--{n.replace('_', '-')}" for n in ("num_layers", "hidden_size", "num_attention_heads")
                       if getattr(self, n) is None]
            if missing:
                raise ArgumentError(f"{', '.join(missing)} required without --model-preset")
        self._check_linear_type()
        gate = self.gate()
        if gate != "none":
            fixed = [f for f, v in (("--decay-type", self.decay_type), ("--decay-layer-eps", self.decay_layer_eps))
                     if v is not None]
            if fixed:
                raise ArgumentError(f"{' and '.join(fixed)} set the fixed decay, which the per-token gate "
                                    f"({gate}) replaces: drop {' and '.join(fixed)}")
        if self.gate_logit_normalizer is not None and gate != "gla":
            raise ArgumentError("--gate-logit-normalizer is read by --linear-attention-gate gla only: drop it "
                                "or add --linear-attention-gate gla")

    _DELTA_NET_FLAGS = (("linear_conv_kernel_dim", "--linear-conv-kernel-dim"),
                        ("linear_key_head_dim", "--linear-key-head-dim"),
                        ("linear_value_head_dim", "--linear-value-head-dim"),
                        ("linear_num_key_heads", "--linear-num-key-heads"),
                        ("linear_num_value_heads", "--linear-num-value-heads"))
    _LIGHTNING_FLAGS = (("linear_attention_gate", "--linear-attention-gate"), ("decay_type", "--decay-type"),
                        ("decay_layer_eps", "--decay-layer-eps"), ("gate_logit_normalizer", "--gate-logit-normalizer"),
                        ("qk_feature_map", "--qk-feature-map"), ("v_feature_map", "--v-feature-map"),
                        ("output_gate", "--no-output-gate"),
                        ("attention_norm_group_size", "--attention-norm-group-size"))

    def _check_linear_type(self) -> None:
        """The flags of one kind of linear layer are refused with the other kind."""
        kind = self.linear_type()
        if kind == "gated_delta_net":
            given = [flag for name, flag in self._LIGHTNING_FLAGS if getattr(self, name) is not None]
            if given:
                raise ArgumentError(f"{given[0]} is read by --linear-attention-type lightning only (a Gated DeltaNet "
                                    f"layer has its own gate, output gate and norm): drop {given[0]}")
        else:
            given = [flag for name, flag in self._DELTA_NET_FLAGS if getattr(self, name) is not None]
            if given:
                raise ArgumentError(f"{given[0]} is read by --linear-attention-type gated_delta_net only: drop it or "
                                    "add --linear-attention-type gated_delta_net")

    def _preset_field(self, name: str, default: Any) -> Any:
        """The preset's value of a ``LinearLMConfig`` field (``default`` without it)."""
        if self.model_preset is not None:
            from megatron_lasp.models.config import PRESETS

            preset = PRESETS.get(self.model_preset)
            if preset is not None:
                return preset.fields.get(name, default)
        return default

    def linear_type(self) -> str:
        """What the linear layers are: the flag's, else the preset's, else 'lightning'."""
        if self.linear_attention_type is not None:
            return self.linear_attention_type
        return self._preset_field("linear_attention_type", "lightning")

    def gate(self) -> str:
        """The linear attention's per-token gate: the flag's, else the preset's, else 'none'."""
        if self.linear_attention_gate is not None:
            return self.linear_attention_gate
        return self._preset_field("linear_attention_gate", "none")

    def overrides(self) -> Dict[str, Any]:
        """The ``LinearLMConfig`` fields given on the command line (those not None)."""
        return {name: getattr(self, name) for name in self.OVERRIDES if getattr(self, name) is not None}


@dataclass(frozen=True)
class MemoryOptions:
    """Activation recompute, offloading and the loss's chunking: how the model runs, not what it is."""

    recompute_granularity: Optional[str] = None
    """``full`` or ``selective`` activation recompute (None: none)."""
    recompute_method: Optional[str] = None
    """With full recompute: ``uniform`` or ``block``."""
    recompute_num_layers: Optional[int] = None
    """With full recompute: layers per recompute unit / block."""
    recompute_modules: Optional[Tuple[str, ...]] = None
    """With selective recompute: ``core_attn``, ``mlp``, ``elementwise``."""
    recompute_chunk_size: int = 0
    """With full recompute: run each layer in chunks of this many tokens (0: megatron-core's recompute)."""
    cpu_offloading: bool = False
    """Move the layer inputs saved for recompute to host memory."""
    cpu_offloading_num_layers: Optional[int] = None
    """With cpu_offloading: move those of each pipeline stage's first this many layers only (None: all)."""
    fused_linear_cross_entropy: bool = True
    """The output layer and loss fused and chunked over tokens."""
    cross_entropy_chunk_size: int = 0
    """Tokens per chunk of the fused loss (0: automatic)."""
    cross_entropy_kernel: str = "torch"
    """The fused loss's softmax part: 'torch' or 'triton' (the command line's default: triton on a GPU)."""

    def __post_init__(self) -> None:
        if self.recompute_chunk_size > 0 and self.recompute_granularity != "full":
            raise ArgumentError("--recompute-chunk-size needs --recompute-granularity full")
        if self.recompute_chunk_size > 0 and (self.recompute_method not in (None, "uniform")
                                              or self.recompute_num_layers not in (None, 1)):
            raise ArgumentError("--recompute-chunk-size recomputes one layer at a time: drop --recompute-method "
                                "block / --recompute-num-layers > 1")
        if self.cpu_offloading and self.recompute_granularity != "full":
            raise ArgumentError("--cpu-offloading moves the layer inputs saved for recompute: add "
                                "--recompute-granularity full")
        if self.cpu_offloading_num_layers is not None and not self.cpu_offloading:
            raise ArgumentError("--cpu-offloading-num-layers says how many layers --cpu-offloading moves: add "
                                "--cpu-offloading, or drop it")
        if self.recompute_modules is not None and self.recompute_granularity != "selective":
            raise ArgumentError("--recompute-modules needs --recompute-granularity selective")
        if self.recompute_method is not None and self.recompute_granularity != "full":
            raise ArgumentError("--recompute-method needs --recompute-granularity full")
        if self.recompute_num_layers is not None and self.recompute_granularity != "full":
            raise ArgumentError("--recompute-num-layers needs --recompute-granularity full")

    def check_layers(self, layers_per_stage: int) -> None:
        """The rules that need the model's depth: megatron-core's uniform recompute steps through a
        stage's layers ``recompute_num_layers`` at a time (a count that does not divide them runs
        past the last layer), block recompute takes the first ``recompute_num_layers``."""
        n = self.recompute_num_layers
        if self.recompute_granularity != "full" or self.recompute_chunk_size or n is None:
            return
        if self.recompute_method == "uniform" and layers_per_stage % n:
            raise ArgumentError(f"--recompute-num-layers ({n}) must divide the layers per pipeline stage "
                                f"({layers_per_stage}) with --recompute-method uniform; change it, or use "
                                "--recompute-method block to recompute the first N layers of each stage")
        if self.recompute_method == "block" and n > layers_per_stage:
            raise ArgumentError(f"--recompute-num-layers ({n}) must be at most the layers per pipeline stage "
                                f"({layers_per_stage}) with --recompute-method block")


@dataclass(frozen=True)
class ParallelOptions:
    """Process groups and data parallelism (the world-size facts are None until it is known)."""

    tensor_model_parallel_size: int = 1
    """TP size."""
    pipeline_model_parallel_size: int = 1
    """PP size."""
    context_parallel_size: int = 1
    """Sequence-parallel (LASP) size = megatron-core's context-parallel size."""
    sequence_parallel_mode: str = "lasp"
    """How linear attention is parallelised over the sequence-parallel group."""
    softmax_sequence_parallel_mode: str = "allgather"
    """How a hybrid's softmax layers are parallelised over the same group."""
    sequence_parallel: bool = False
    """Megatron's TP sequence parallelism (False at TP 1, as megatron-core)."""
    ddp_impl: str = "torch"
    """Data parallelism: ``megatron`` (GPU default), ``torch`` (CPU default) or ``fsdp``."""
    use_distributed_optimizer: bool = False
    """ZeRO-1 over the data x sequence-parallel group (megatron only)."""
    distributed_backend: Optional[str] = None
    """torch.distributed backend (None: nccl with CUDA, gloo on CPU)."""
    distributed_timeout_minutes: int = 30
    """Collective timeout."""
    world_size: Optional[int] = None
    """Number of processes (None until the process group exists)."""
    data_parallel_size: Optional[int] = None
    """DP size without SP (None until the world size is known)."""

    def __post_init__(self) -> None:
        if self.use_distributed_optimizer and self.ddp_impl != "megatron":
            raise ArgumentError("--use-distributed-optimizer needs --ddp-impl megatron "
                                "(--ddp-impl fsdp already shards the optimizer state)")


@dataclass(frozen=True)
class TrainingOptions:
    """The batch, the length of the run and its precision."""

    seq_length: int
    """Tokens per training sample."""
    train_iters: int
    """Optimizer steps to run."""
    micro_batch_size: int = 1
    """Samples per micro-batch per DP rank."""
    global_batch_size: Optional[int] = None
    """Samples per optimizer step (None until the world size is known, if not given)."""
    num_micro_batches: Optional[int] = None
    """Micro-batches per step and DP rank (None until the world size is known)."""
    seed: int = 1234
    """Random seed (weights, data order, mock data)."""
    bf16: bool = False
    """bf16 mixed precision."""
    fp16: bool = False
    """fp16 mixed precision with dynamic loss scaling."""
    deterministic_mode: bool = False
    """Deterministic algorithms only (torch's global switch, cuBLAS's fixed workspace)."""
    exit_interval: Optional[int] = None
    """Stop (after saving) when the iteration is a multiple of this."""
    exit_signal_handler: bool = False
    """On SIGTERM / SIGINT: finish the step, save, exit 0."""
    exit_duration_in_mins: Optional[float] = None
    """Save and stop once the run has been up this many minutes."""
    cuda_graph_impl: str = "none"
    """``local``: the step's forward-backward captured in a CUDA graph and replayed (``cuda_graph.py``)."""
    cuda_graph_scope: Optional[str] = None
    """What the graph holds: ``full_iteration`` (the only scope supported)."""
    cuda_graph_warmup_steps: int = 3
    """Eager steps before the capture."""

    def __post_init__(self) -> None:
        if self.bf16 and self.fp16:
            raise ArgumentError("--bf16 and --fp16 are exclusive")
        if self.cuda_graph_impl == "local" and self.cuda_graph_scope != "full_iteration":
            raise ArgumentError("--cuda-graph-impl local captures the whole forward-backward step: add "
                                "--cuda-graph-scope full_iteration (per-layer graphs are not supported)")
        if self.cuda_graph_scope is not None and self.cuda_graph_impl == "none":
            raise ArgumentError("--cuda-graph-scope needs --cuda-graph-impl local")
        if self.cuda_graph_impl == "local" and self.fp16:
            raise ArgumentError("--cuda-graph-impl local: fp16's dynamic loss scale is not graph-safe; use --bf16")

    @property
    def cuda_graphs(self) -> bool:
        """Whether the step's forward-backward runs from a CUDA graph."""
        return self.cuda_graph_impl == "local"


@dataclass(frozen=True)
class OptimizerOptions:
    """AdamW, gradient clipping and the LR schedule."""

    lr: float = 3e-4
    """Peak learning rate."""
    min_lr: float = 0.0
    """Learning rate at the end of decay."""
    lr_decay_style: str = "cosine"
    """Decay after warmup."""
    lr_warmup_iters: int = 0
    """Linear warmup steps from 0."""
    lr_decay_iters: int = 1
    """Decay steps (``--train-iters`` if not given)."""
    weight_decay: float = 0.01
    """AdamW weight decay."""
    adam_beta1: float = 0.9
    """AdamW beta1."""
    adam_beta2: float = 0.95
    """AdamW beta2."""
    adam_eps: float = 1e-8
    """AdamW epsilon."""
    clip_grad: float = 1.0
    """Clip the global grad norm (0: off)."""
    fused_adam: bool = True
    """megatron path: torch's fused AdamW kernel (``--no-fused-adam``)."""

    def __post_init__(self) -> None:
        if self.lr_warmup_iters >= max(self.lr_decay_iters, 1):
            raise ArgumentError(f"--lr-warmup-iters ({self.lr_warmup_iters}) must be in [0, --lr-decay-iters "
                                f"({self.lr_decay_iters}))")
        if self.min_lr > self.lr:
            raise ArgumentError(f"--min-lr ({self.min_lr}) must not exceed --lr ({self.lr})")


@dataclass(frozen=True)
class DataOptions:
    """Where the tokens come from and how samples are cut and masked."""

    tokenizer: TokenizerSettings
    """What builds the tokenizer (``--tokenizer-type`` and its files, ``--vocab-size``)."""
    data_path: Optional[Tuple[str, ...]] = None
    """``--data-path`` as given (prefixes, or a weighted blend)."""
    data_blend: Optional[DataBlend] = None
    """megatron-core blend of ``data_path``: ``([prefix, ...], [weight, ...] or None)``."""
    split: str = "969,30,1"
    """train,valid,test proportions (normalised: ``969,30,1``)."""
    data_cache_path: Optional[str] = None
    """Where megatron-core caches sample indices."""
    mock_data: bool = False
    """Deterministic random tokens instead of ``data_path``."""
    eod_mask_loss: bool = False
    """Do not train on predicting EOD tokens."""
    reset_attention_mask: bool = False
    """Packed documents: the attention state restarts after every EOD token."""
    reset_position_ids: bool = False
    """Megatron compatibility; no effect (no position embedding)."""

    def __post_init__(self) -> None:
        if self.mock_data and self.data_path:
            raise ArgumentError("give either --data-path or --mock-data, not both")
        if not self.mock_data and not self.data_path:
            raise ArgumentError("no training data: give --data-path PREFIX [...] or --mock-data")
        if not self.tokenizer.tokenizer_type:
            raise ArgumentError("--tokenizer-type is required with --data-path")
        if self.tokenizer.tokenizer_type == "NullTokenizer" and self.tokenizer.vocab_size is None:
            raise ArgumentError("--vocab-size is required with --tokenizer-type NullTokenizer")
        try:  # a tokenizer flag the type does not read (--vocab-size sizes mock data only as NullTokenizer's)
            self.tokenizer.check_flags()
        except ValueError as err:
            raise ArgumentError(str(err)) from None


@dataclass(frozen=True)
class CheckpointOptions:
    """Where checkpoints go, what a run loads, and the checks before each save."""

    save: Optional[str] = None
    """Directory for checkpoints."""
    load: Optional[str] = None
    """Resume from this directory."""
    save_interval: Optional[int] = None
    """Save every N iterations (and at the end)."""
    ckpt_step: Optional[int] = None
    """With ``load``: this iteration instead of the latest."""
    finetune: bool = False
    """Load weights only and start at iteration 0."""
    no_load_optim: bool = False
    """Load only the weights (implied by ``finetune``)."""
    no_load_rng: bool = False
    """Do not restore the RNG states (implied by ``finetune``)."""
    dist_ckpt_optim_fully_reshardable: bool = False
    """Save the distributed optimizer's state fully reshardable."""
    override_opt_param_scheduler: bool = False
    """On resume, this run's LR schedule wins."""
    use_checkpoint_opt_param_scheduler: bool = False
    """On resume, the checkpoint's LR schedule wins."""
    overwrite_checkpoints: bool = False
    """Let ``--finetune`` / ``--ckpt-step`` save into their ``--load`` directory over its checkpoints."""
    check_for_spiky_loss: bool = False
    """Stop without saving on a loss spike."""
    spiky_loss_factor: float = 10.0
    """How many times the lowest loss counts as a spike."""

    def __post_init__(self) -> None:
        if self.override_opt_param_scheduler and self.use_checkpoint_opt_param_scheduler:
            raise ArgumentError("--override-opt-param-scheduler and --use-checkpoint-opt-param-scheduler are exclusive")
        if self.save_interval is not None and not self.save:
            raise ArgumentError("--save-interval needs --save DIR")
        if self.ckpt_step is not None and not self.load:
            raise ArgumentError("--ckpt-step needs --load DIR")


@dataclass(frozen=True)
class LoggingOptions:
    """Log lines, evaluation and tensorboard."""

    log_interval: int = 10
    """Print a log line every N iterations."""
    eval_interval: int = 1000
    """Validate every N iterations (0: never)."""
    eval_iters: int = 10
    """Validation batches per evaluation."""
    tensorboard_dir: Optional[str] = None
    """Write tensorboard scalars here."""
    peak_flops: float = 989e12
    """Peak FLOP/s per GPU for MFU."""
    record_memory_history: bool = False
    """Record the CUDA allocator's history (logging rank) and write snapshots to ``memory_snapshot_path``."""
    memory_snapshot_path: Optional[str] = None
    """Where ``record_memory_history`` writes (resolved to ``snapshot.pickle`` when recording)."""


@dataclass(frozen=True)
class RunConfig:
    """Everything a training run was asked to do, one record per concern (see the module docstring)."""

    model: ModelOptions
    """The architecture."""
    memory: MemoryOptions
    """Recompute, offloading, the loss's chunking."""
    parallel: ParallelOptions
    """Process groups and data parallelism."""
    training: TrainingOptions
    """Batch, length and precision."""
    optimizer: OptimizerOptions
    """AdamW and the LR schedule."""
    data: DataOptions
    """Datasets and tokenizer."""
    checkpoint: CheckpointOptions
    """Saving and loading."""
    logging: LoggingOptions
    """Log lines and evaluation."""

    def __post_init__(self) -> None:
        if self.training.fp16 and self.parallel.ddp_impl != "megatron":
            raise ArgumentError("--fp16 (loss scaling) is supported with --ddp-impl megatron only; use --bf16")
        if self.training.cuda_graphs:
            self._check_cuda_graphs()

    def _check_cuda_graphs(self) -> None:
        """What a captured step cannot hold (``cuda_graph.py``): one line each, saying what to drop."""
        p, m, d = self.parallel, self.memory, self.data
        refusals = (
            (p.ddp_impl != "megatron", f"--ddp-impl {p.ddp_impl} (use --ddp-impl megatron)"),
            (p.pipeline_model_parallel_size > 1, "--pipeline-model-parallel-size > 1"),
            (p.context_parallel_size > 1, "--sequence-parallel-size > 1 (communication inside the step)"),
            (m.cpu_offloading, "--cpu-offloading (host copies inside the step)"),
            (d.reset_attention_mask, "--reset-attention-mask (packed documents read their starts on the host)"),
            (bool(self.model.hidden_dropout), "--hidden-dropout > 0 (random numbers inside the step)"),
        )
        for refused, what in refusals:
            if refused:
                raise ArgumentError(f"--cuda-graph-impl local cannot capture a step with {what}; drop one of them")

    @property
    def mixed_precision(self) -> Optional[str]:
        """``bf16``, ``fp16`` or None (fp32)."""
        return "bf16" if self.training.bf16 else "fp16" if self.training.fp16 else None

    def optimizer_settings(self) -> OptimizerSettings:
        """What ``optim.py`` reads (``--no-fusion`` turns the fused AdamW off too)."""
        o, p, t = self.optimizer, self.parallel, self.training
        return OptimizerSettings(
            ddp_impl=p.ddp_impl, bf16=t.bf16, fp16=t.fp16, use_distributed_optimizer=p.use_distributed_optimizer,
            sequence_parallel=p.sequence_parallel, lr=o.lr, min_lr=o.min_lr, weight_decay=o.weight_decay,
            adam_beta1=o.adam_beta1, adam_beta2=o.adam_beta2, adam_eps=o.adam_eps, clip_grad=o.clip_grad,
            lr_warmup_iters=o.lr_warmup_iters, lr_decay_iters=o.lr_decay_iters, lr_decay_style=o.lr_decay_style,
            train_iters=t.train_iters, fused_adam=o.fused_adam and self.model.fusion is not False,
        )

    def data_settings(self, skip_splits: Tuple[int, ...] = ()) -> DataSettings:
        """What ``data.py`` reads; ``skip_splits`` from its ``check_data``."""
        d, t, lg = self.data, self.training, self.logging
        return DataSettings(
            mock_data=d.mock_data, data_blend=d.data_blend, split=d.split, data_cache_path=d.data_cache_path,
            seq_length=t.seq_length, eod_mask_loss=d.eod_mask_loss, seed=t.seed, train_iters=t.train_iters,
            global_batch_size=t.global_batch_size, eval_interval=lg.eval_interval, eval_iters=lg.eval_iters,
            skip_splits=tuple(skip_splits), reset_attention_mask=d.reset_attention_mask,
        )

    def flags(self, **resolved: Any) -> Dict[str, Any]:
        """The run's settings as a checkpoint's ``args.json`` records them: every field by its flag
        destination, plus the ``resolved`` values (what start-up found: vocabulary, model sizes,
        what was loaded); JSON types only, sorted by name."""
        values: Dict[str, Any] = {}
        for group in dataclasses.fields(self):
            record = getattr(self, group.name)
            for f in dataclasses.fields(record):
                value = getattr(record, f.name)
                if isinstance(value, TokenizerSettings):
                    values.update(value.as_dict())
                else:
                    values[f.name] = value
        values.update(resolved)
        out = {}
        for key, value in sorted(values.items()):
            if isinstance(value, (bool, int, float, str)) or value is None:
                out[key] = value
            elif isinstance(value, (list, tuple)):
                out[key] = json.loads(json.dumps(value, default=str))
        return out
