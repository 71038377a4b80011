"""Command-line flags of ``pretrain_linear_lm.py`` (Megatron-LM names where the concept exists),
parsed once into the run's :class:`~megatron_lasp.training.config.RunConfig`.

The argparse namespace never leaves this module. :func:`parse_config` parses and checks, in this
order: argparse's own checks (types, choices), the range of every numeric flag and path
(:data:`RANGES`, one table), the values that follow from others or from the machine (defaults
such as ``--ddp-impl``, flags that need a GPU), the rules between flags (the config records'
``__post_init__``) and the files the flags name. Every user mistake is an :class:`ArgumentError`
naming the flag to change; :func:`parse_args` turns it into argparse's one-line ``error: ...`` and
exit status 2. The checks that need the world size (parallel sizes, batch divisibility) are in
:func:`with_world_size`, run once the process group exists.

The library's errors (the model config, the parallel layout) name config fields, not flags;
:func:`config_error` turns one into a CLI error, naming flags through :func:`flag_of_field`.

Why one module over 600 lines: a flag, its range and the way it becomes the run config are read
and changed together; about 200 of the lines are the flag definitions, one function per group.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import os
import re
import sys
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Type, TypeVar

from megatron_lasp.atomic import check_directory_path
from megatron_lasp.data.tokenizer import TOKENIZER_PATH_KEYS, TokenizerSettings
from megatron_lasp.parallel.layout import check_sequence_split
from megatron_lasp.parallel.state import local_device, resolve_backend, validate_parallel_sizes
from megatron_lasp.training.config import (
    ArgumentError,
    CheckpointOptions,
    DataOptions,
    LoggingOptions,
    MemoryOptions,
    ModelOptions,
    OptimizerOptions,
    ParallelOptions,
    RunConfig,
    TrainingOptions,
)

logger = logging.getLogger(__name__)

__all__ = ["ArgumentError", "RunConfig", "build_parser", "config_error", "flag_of_field", "parse_args",
           "parse_config", "with_world_size"]

DDP_IMPLS = ("megatron", "torch", "fsdp")
LR_DECAY_STYLES = ("constant", "linear", "cosine", "inverse-square-root")
RECOMPUTE_GRANULARITIES = ("full", "selective")
RECOMPUTE_METHODS = ("uniform", "block")
RECOMPUTE_MODULES = ("core_attn", "mlp", "elementwise")
CUDA_GRAPH_IMPLS = ("none", "local")
CUDA_GRAPH_SCOPES = ("full_iteration",)

FIELD_FLAGS = {
    "context_parallel_size": "--sequence-parallel-size",
    "sequence_parallel_size": "--sequence-parallel-size",
    "offload_layer_inputs": "--cpu-offloading",
    "offload_num_layers": "--cpu-offloading-num-layers",
    "recompute_elementwise": "--recompute-modules elementwise",
    "normalization": "--normalization",
    "preset": "--model-preset",
    "add_bias_linear": "--add-bias-linear / --disable-bias-linear",
    "share_embeddings_and_output_weights": "--share-embeddings-and-output-weights / "
                                           "--untie-embeddings-and-output-weights",
}
"""Config fields (and library arguments) whose flag is not ``--`` + the field with dashes, that
have no underscore (only names with one are mapped otherwise), or that two flags set (one each
way): see :func:`flag_of_field`."""

ARCHITECTURE_FIELDS = ("num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size", "padded_vocab_size")
"""Fields that must match between a checkpoint and the run that resumes it."""


def is_rank_zero() -> bool:
    """Whether this process prints user errors: global rank 0 (torchrun's ``RANK``), or no launcher."""
    return os.environ.get("RANK", "0") == "0"


class UsageError(SystemExit):
    """A flag argparse itself refused (unknown, bad type or choice); already printed (rank 0).
    ``message`` is the line, the exit status is 2."""

    def __init__(self, message: str) -> None:
        super().__init__(2)
        self.message = message


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error on rank 0 only (no usage text; ``--help`` has it)."""

    def error(self, message):
        line = f"{self.prog}: error: {message} (see --help)"
        if is_rank_zero():
            print(line, file=sys.stderr, flush=True)
        raise UsageError(line)


class _HelpFormatter(argparse.HelpFormatter):
    """Shows a flag's default once, where it says something: not for switches (flags without a
    value), not for an unset default (None, ''), not where the help already states it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (action.nargs == 0 or default is None or default is argparse.SUPPRESS or default == ""
                or "default" in text):
            return text
        return text + " (default: %(default)s)"


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``pretrain_linear_lm.py`` (every flag documented in ``--help``)."""
    p = _Parser(
        prog="pretrain_linear_lm.py",
        description="Pretrain a linear-attention LM (TransNormerLLM style) with LASP sequence "
        "parallelism on megatron-core. Flags follow Megatron-LM where the concept exists.",
        formatter_class=_HelpFormatter,
    )
    for add in (_add_model_flags, _add_memory_flags, _add_fusion_flags, _add_parallel_flags, _add_training_flags,
                _add_optimizer_flags, _add_data_flags, _add_checkpoint_flags, _add_logging_flags):
        add(p)
    return p


def _add_model_flags(p: argparse.ArgumentParser) -> None:
    from megatron_lasp.models.config import (
        DECAY_TYPES,
        FEATURE_MAPS,
        GATES,
        GLU_TYPES,
        LINEAR_ATTENTION_TYPES,
        PRESETS,
        TRANSFORMER_IMPLS,
    )
    from megatron_lasp.ops.lightning_attn.utils import BACKENDS
    from megatron_lasp.ops.softmax_attn import SOFTMAX_KERNELS

    g = p.add_argument_group("model")
    g.add_argument("--model-preset", choices=tuple(PRESETS), default=None,
                   help="start from a preset architecture; the flags below override its fields")
    g.add_argument("--num-layers", type=int, default=None, help="number of transformer layers")
    g.add_argument("--hidden-size", type=int, default=None, help="model width d_model")
    g.add_argument("--num-attention-heads", type=int, default=None, help="linear-attention heads")
    g.add_argument("--ffn-hidden-size", type=int, default=None, help="channel-mixer (GLU) width")
    g.add_argument("--kv-channels", type=int, default=None,
                   help="channels per head (default --hidden-size / --num-attention-heads)")
    g.add_argument("--num-query-groups", type=int, default=None,
                   help="key/value heads of the softmax layers of a --hybrid-layer-pattern (GQA); without "
                   "softmax layers it must equal --num-attention-heads")
    g.add_argument("--hybrid-layer-pattern", default=None,
                   help="one character per layer, each layer with its MLP: L linear attention, * softmax "
                   "attention (megatron-core's hybrid symbol), e.g. LLL*LLL*; default: every layer L (presets "
                   "tnl-1b-hybrid-1to7 and tnl-1b-hybrid-1to3 set one)")
    g.add_argument("--rotary-base", type=float, default=None,
                   help="RoPE base of the softmax layers (default 10000)")
    g.add_argument("--softmax-kernel", choices=SOFTMAX_KERNELS, default="auto",
                   help="the softmax layers' library kernel: auto (GPU: SDPA's flash/cuDNN, flash-attention's "
                   "varlen kernel with packed documents; CPU: SDPA), sdpa, flex, varlen or math")
    g.add_argument("--normalization", choices=("RMSNorm",), default=None, help="pre-norm type")
    g.add_argument("--add-bias-linear", dest="add_bias_linear", action="store_const", const=True, default=None,
                   help="biases on the linear layers (default: none)")
    g.add_argument("--disable-bias-linear", dest="add_bias_linear", action="store_const", const=False,
                   help="no biases on the linear layers (the default)")
    g.add_argument("--hidden-dropout", type=float, default=None, help="dropout after attention and MLP")
    g.add_argument("--linear-attention-type", choices=LINEAR_ATTENTION_TYPES, default=None,
                   help="what the linear layers (L) are: lightning (TransNormerLLM's lightning attention; the "
                   "default) or gated_delta_net (Gated DeltaNet: short convolution, L2-normed q/k, delta rule "
                   "with a per-token gate; presets gdn-1b and gdn-1b-hybrid-1to3 set it)")
    g.add_argument("--linear-conv-kernel-dim", type=int, default=None,
                   help="gated_delta_net: taps of the causal short convolution on q, k, v (default 4)")
    g.add_argument("--linear-key-head-dim", type=int, default=None,
                   help="gated_delta_net: channels per query/key head (default --kv-channels)")
    g.add_argument("--linear-value-head-dim", type=int, default=None,
                   help="gated_delta_net: channels per value head (default --kv-channels)")
    g.add_argument("--linear-num-key-heads", type=int, default=None,
                   help="gated_delta_net: query/key heads (default --num-attention-heads)")
    g.add_argument("--linear-num-value-heads", type=int, default=None,
                   help="gated_delta_net: value heads, a multiple of the key heads (GVA; default "
                   "--linear-num-key-heads)")
    g.add_argument("--decay-type", choices=DECAY_TYPES, default=None,
                   help="per-head decay slopes of linear attention (default tnl)")
    g.add_argument("--decay-layer-eps", type=float, default=None,
                   help="epsilon of the tnl depth scaling of the decay (default 1e-5)")
    g.add_argument("--linear-attention-gate", choices=GATES, default=None,
                   help="per-token decay learned from the input instead of the fixed per-head decay: "
                        "mamba2 (dt / A_log) or gla (log-sigmoid); default none")
    g.add_argument("--gate-logit-normalizer", type=float, default=None,
                   help="with --linear-attention-gate gla: divisor of the log-sigmoid (default 16)")
    g.add_argument("--qk-feature-map", choices=FEATURE_MAPS, default=None, help="feature map on q and k (default silu)")
    g.add_argument("--v-feature-map", choices=FEATURE_MAPS, default=None, help="feature map on v (default silu)")
    g.add_argument("--no-output-gate", dest="output_gate", action="store_const", const=False, default=None,
                   help="drop the sigmoid output gate of linear attention")
    g.add_argument("--attention-norm-group-size", type=int, default=None,
                   help="heads per RMSNorm group on the attention output (default 1)")
    g.add_argument("--glu-type", choices=GLU_TYPES, default=None, help="channel mixer (default sglu)")
    g.add_argument("--share-embeddings-and-output-weights", dest="share_embeddings_and_output_weights",
                   action="store_const", const=True, default=None, help="tie the output layer to the embedding")
    g.add_argument("--untie-embeddings-and-output-weights", dest="share_embeddings_and_output_weights",
                   action="store_const", const=False, help="separate output layer (the default)")
    g.add_argument("--seq-length", type=int, default=None, required=False,
                   help="tokens per training sample (required)")
    g.add_argument("--make-vocab-size-divisible-by", type=int, default=128,
                   help="pad the vocabulary to a multiple of this x tensor-model-parallel size")
    g.add_argument("--init-method-std", type=float, default=None, help="std of the normal weight init")
    g.add_argument("--transformer-impl", choices=TRANSFORMER_IMPLS, default="local",
                   help="megatron-core module implementation; transformer_engine needs TE installed (GPU)")
    g.add_argument("--kernel-backend", choices=BACKENDS, default=None,
                   help="linear-attention kernels: triton (GPU default) or torch (CPU default)")
    g.add_argument("--recompute-granularity", choices=RECOMPUTE_GRANULARITIES, default=None,
                   help="activation recomputation (megatron-core's TransformerConfig)")
    g.add_argument("--recompute-method", choices=RECOMPUTE_METHODS, default=None,
                   help="with --recompute-granularity full: uniform or block")
    g.add_argument("--recompute-num-layers", type=int, default=None,
                   help="with --recompute-granularity full: layers per recompute unit / block")


def _add_memory_flags(p: argparse.ArgumentParser) -> None:
    from megatron_lasp.ops.cross_entropy import KERNELS as CROSS_ENTROPY_KERNELS

    g = p.add_argument_group("long-context memory")
    g.add_argument("--no-fused-linear-cross-entropy", dest="fused_linear_cross_entropy", action="store_false",
                   help="use megatron-core's output layer + vocab-parallel cross entropy (holds the "
                   "[tokens, vocab / tp] logits) instead of the fused loss chunked over tokens")
    g.add_argument("--cross-entropy-chunk-size", type=int, default=0,
                   help="tokens per chunk of the fused loss (0: about 2^28 logits per chunk, 4096 tokens "
                   "at vocab 64000)")
    g.add_argument("--cross-entropy-kernel", choices=CROSS_ENTROPY_KERNELS, default=None,
                   help="the fused loss's softmax part on each logit chunk: two Triton kernels (fewer passes "
                   "over the logits; the default on a GPU) or PyTorch ops (the default on CPU, the reference)")
    g.add_argument("--cpu-offloading", action="store_true",
                   help="move the layer inputs saved for activation recompute to pinned host memory "
                   "(side stream, overlapped) and prefetch them in backward; needs --recompute-granularity full")
    g.add_argument("--cpu-offloading-num-layers", type=int, default=None,
                   help="with --cpu-offloading: offload the inputs of the first N layers of each pipeline "
                   "stage only (they wait longest for their backward), keeping the others on the GPU: N "
                   "layer inputs in pinned host memory, the others in GPU memory (default: every layer)")
    g.add_argument("--recompute-chunk-size", type=int, default=0,
                   help="with --recompute-granularity full: recompute each layer with this project's "
                   "checkpoint, running the whole layer in chunks of this many tokens in forward and "
                   "backward, the attention state carried from chunk to chunk (a layer's activations "
                   "exist for one chunk; also across --sequence-parallel-mode lasp ranks, with or "
                   "without packed documents; with TP sequence parallelism or the other modes only the "
                   "MLP half is chunked); 0: megatron-core's recompute")


def _add_fusion_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("fusion and selective recompute")
    g.add_argument("--no-fusion", dest="fusion", action="store_false", default=None,
                   help="run the plain PyTorch elementwise ops instead of the fused Triton kernels "
                   "(norms, feature maps, norm x gate, GLU; fused by default on GPU, never on CPU), and the "
                   "multi-tensor AdamW instead of the fused one (--no-fused-adam)")
    g.add_argument("--no-fused-adam", dest="fused_adam", action="store_false", default=True,
                   help="with --ddp-impl megatron: torch's multi-tensor AdamW instead of its fused CUDA "
                   "kernel (what megatron-core runs without apex / Transformer Engine; --no-fusion "
                   "implies it)")
    g.add_argument("--cuda-graph-impl", choices=CUDA_GRAPH_IMPLS, default="none",
                   help="local: capture the training step's forward-backward in a CUDA graph and replay it "
                   "(needs --cuda-graph-scope full_iteration; GPU, megatron DDP, no packed documents, "
                   "SP / PP 1); cuts the host's launch overhead at short sequences")
    g.add_argument("--cuda-graph-scope", choices=CUDA_GRAPH_SCOPES, default=None,
                   help="what the graph holds: full_iteration (the whole forward-backward; the one scope "
                   "supported)")
    g.add_argument("--cuda-graph-warmup-steps", type=int, default=3,
                   help="eager steps before the capture (Triton compiles and autotunes there)")
    g.add_argument("--recompute-modules", nargs="+", choices=RECOMPUTE_MODULES, default=None,
                   help="with --recompute-granularity selective: core_attn (feature maps + attention "
                   "kernel, megatron-core's default), mlp (the whole MLP), elementwise (norm, gate and "
                   "GLU outputs: freed after the forward, recomputed before their backward; no matmul)")


def _add_parallel_flags(p: argparse.ArgumentParser) -> None:
    from megatron_lasp.parallel.softmax import SOFTMAX_SP_MODES
    from megatron_lasp.parallel.sp import SEQUENCE_PARALLEL_MODES

    g = p.add_argument_group("parallelism")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1, help="TP size")
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1,
                   help="PP size (megatron-core 1F1B schedule)")
    g.add_argument("--context-parallel-size", "--sequence-parallel-size", dest="context_parallel_size",
                   type=int, default=1,
                   help="sequence-parallel (LASP) group size = megatron-core's context-parallel size")
    g.add_argument("--sequence-parallel-mode", choices=SEQUENCE_PARALLEL_MODES, default="lasp",
                   help="how linear attention is parallelised over the sequence-parallel group")
    g.add_argument("--softmax-sequence-parallel-mode", choices=SOFTMAX_SP_MODES, default="allgather",
                   help="how the softmax layers of a --hybrid-layer-pattern are parallelised over the same group "
                   "and slices: allgather (K and V gathered; any head count), allgather-balanced (the same, "
                   "the heavier rank of each pair r, W-1-r handing its last queries to the other so that the "
                   "causal work is even) or ulysses (all-to-all to head shards; key/value heads per TP rank "
                   "divisible by the group size)")
    g.add_argument("--sequence-parallel", action="store_true",
                   help="Megatron's TP sequence parallelism (activation sharding inside the TP group); "
                   "unrelated to --sequence-parallel-mode")
    g.add_argument("--ddp-impl", choices=DDP_IMPLS, default=None,
                   help="data parallelism over the data x sequence-parallel group: megatron "
                   "(megatron-core DDP, GPU only; default on GPU), torch (DistributedDataParallel; "
                   "default on CPU) or fsdp (FSDP2 fully_shard, ZeRO-3 style)")
    g.add_argument("--use-distributed-optimizer", action="store_true",
                   help="ZeRO-1: shard the optimizer state over the data x sequence-parallel group "
                   "(with --ddp-impl megatron; GPU only)")
    g.add_argument("--distributed-backend", choices=("nccl", "gloo"), default=None,
                   help="torch.distributed backend (default nccl with CUDA, gloo on CPU); gloo with CUDA lets "
                        "several ranks share a GPU (a correctness check of a layout, not a fast path)")
    g.add_argument("--distributed-timeout-minutes", type=int, default=30, help="collective timeout")


def _add_training_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("training")
    g.add_argument("--micro-batch-size", type=int, default=1, help="samples per micro-batch per DP rank")
    g.add_argument("--global-batch-size", type=int, default=None,
                   help="samples per optimizer step (default micro batch x DP: no accumulation)")
    g.add_argument("--train-iters", type=int, default=None, help="optimizer steps to run (required)")
    g.add_argument("--seed", type=int, default=1234, help="random seed (weights, data order, mock data)")
    g.add_argument("--bf16", action="store_true", help="bf16 mixed precision (GPU)")
    g.add_argument("--fp16", action="store_true",
                   help="fp16 mixed precision with dynamic loss scaling (--ddp-impl megatron only)")
    g.add_argument("--clip-grad", type=float, default=1.0, help="clip the global grad norm (0: off)")
    g.add_argument("--deterministic-mode", action="store_true",
                   help="the same bits on every run of the same flags, for the softmax layers of a hybrid too: "
                        "torch.use_deterministic_algorithms, cuBLAS's fixed workspace, flex attention for packed "
                        "documents (flash-attention's backward sums dq with atomics); slower. The linear layers "
                        "are deterministic without it")


def _add_optimizer_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("optimizer and learning rate")
    g.add_argument("--lr", type=float, default=3e-4, help="peak learning rate")
    g.add_argument("--min-lr", type=float, default=0.0, help="learning rate at the end of decay")
    g.add_argument("--lr-decay-style", choices=LR_DECAY_STYLES, default="cosine", help="decay after warmup")
    g.add_argument("--lr-warmup-iters", type=int, default=0, help="linear warmup steps from 0")
    g.add_argument("--lr-decay-iters", type=int, default=None, help="decay steps (default --train-iters)")
    g.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay")
    g.add_argument("--adam-beta1", type=float, default=0.9, help="AdamW beta1")
    g.add_argument("--adam-beta2", type=float, default=0.95, help="AdamW beta2")
    g.add_argument("--adam-eps", type=float, default=1e-8, help="AdamW epsilon")


def _add_data_flags(p: argparse.ArgumentParser) -> None:
    from megatron_lasp.data.tokenizer import add_tokenizer_args

    g = p.add_argument_group("data")
    g.add_argument("--data-path", nargs="+", default=None,
                   help="dataset prefix(es) of .bin/.idx files, or a weighted blend '0.3 a 0.7 b'")
    g.add_argument("--split", default="969,30,1", help="train,valid,test proportions of --data-path")
    g.add_argument("--data-cache-path", default=None,
                   help="where megatron-core caches sample indices (default: index-cache/ next to the first "
                   "--data-path); the cache is keyed on the data files, so re-preprocessed data is re-indexed")
    g.add_argument("--mock-data", action="store_true",
                   help="deterministic random tokens (megatron-core's MockGPTDataset) instead of --data-path")
    g.add_argument("--eod-mask-loss", action="store_true", help="do not train on predicting EOD tokens")
    g.add_argument("--reset-attention-mask", action="store_true",
                   help="packed documents: the attention state restarts after every EOD token (each document "
                   "sees only itself), in every --sequence-parallel-mode; with --micro-batch-size > 1 each "
                   "sample is packed on its own (its start is a document start too)")
    g.add_argument("--reset-position-ids", action="store_true",
                   help="accepted for Megatron compatibility and has no effect: the model has no position "
                   "embedding (the decay carries position, and it restarts with --reset-attention-mask)")
    add_tokenizer_args(p, default_type="", add_vocab_size=False)
    # argparse keeps the tokenizer group's choices; an empty default means "not given"
    p.add_argument("--vocab-size", type=int, default=None,
                   help="NullTokenizer / --mock-data without a tokenizer: number of ordinary ids (EOD = this value)")


def _add_checkpoint_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("checkpointing")
    g.add_argument("--save", default=None, help="directory for checkpoints (iter_XXXXXXX/ + tracker file)")
    g.add_argument("--load", default=None, help="resume from this directory's latest checkpoint; it must hold "
                   "one unless it is also --save (then a first run starts from scratch)")
    g.add_argument("--save-interval", type=int, default=None, help="save every N iterations (and at the end)")
    g.add_argument("--ckpt-step", type=int, default=None,
                   help="with --load: load this iteration instead of the latest")
    g.add_argument("--no-load-optim", action="store_true",
                   help="load only the weights, not the optimizer state and LR schedule (weights and optimizer "
                   "state load at other TP/PP/SP/DP sizes; needed between --ddp-impl megatron and torch / fsdp, and for megatron's "
                   "distributed optimizer saved without --dist-ckpt-optim-fully-reshardable at other TP/PP sizes)")
    g.add_argument("--dist-ckpt-optim-fully-reshardable", action="store_true",
                   help="save megatron's distributed-optimizer state in the fully reshardable format "
                   "(loadable at other TP/PP sizes; slower) instead of dp_reshardable")
    g.add_argument("--no-load-rng", action="store_true", help="do not restore the RNG states")
    g.add_argument("--finetune", action="store_true",
                   help="load weights only and start at iteration 0 (implies --no-load-optim --no-load-rng)")
    g.add_argument("--overwrite-checkpoints", action="store_true",
                   help="let a run that does not continue --load's latest checkpoint (--finetune, a weights-only "
                   "checkpoint, --ckpt-step before the latest) save into the same directory: the iterations it "
                   "reaches are replaced and the tracker follows it (refused without this flag)")
    g.add_argument("--exit-interval", type=int, default=None,
                   help="stop (after saving, if --save) when the iteration is a multiple of this")
    g.add_argument("--exit-signal-handler", action="store_true",
                   help="on SIGTERM or SIGINT (Ctrl-C; torchrun and SLURM send SIGTERM) finish the step, save "
                   "(if --save) and exit 0; a second signal stops at once")
    g.add_argument("--exit-duration-in-mins", type=float, default=None,
                   help="save (if --save) and exit 0 after the first step that ends this many minutes after "
                   "start-up; set it below the job's time limit by more than a step and a save")
    g.add_argument("--override-opt-param-scheduler", action="store_true",
                   help="on resume, use this run's LR/weight-decay schedule flags instead of the checkpoint's")
    g.add_argument("--use-checkpoint-opt-param-scheduler", action="store_true",
                   help="on resume, keep the checkpoint's LR/weight-decay schedule, ignoring this run's flags")
    g.add_argument("--check-for-spiky-loss", action="store_true",
                   help="before each save, stop without saving if the loss of the weights to be saved exceeds "
                   "--spiky-loss-factor x the lowest loss of the run (every save checks for NaN/inf anyway)")
    g.add_argument("--spiky-loss-factor", type=float, default=10.0,
                   help="with --check-for-spiky-loss: how many times the lowest loss counts as a spike")


def _add_logging_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("evaluation and logging")
    g.add_argument("--eval-interval", type=int, default=None,
                   help=f"validate every N iterations (0: never; default {DEFAULT_EVAL_INTERVAL}); needs a "
                   "validation share in --split")
    g.add_argument("--eval-iters", type=int, default=10, help="validation batches per evaluation")
    g.add_argument("--log-interval", type=int, default=10, help="print a log line every N iterations")
    g.add_argument("--tensorboard-dir", default=None, help="write tensorboard scalars here (needs tensorboard)")
    g.add_argument("--peak-flops", type=float, default=989e12,
                   help="peak bf16 FLOP/s per GPU for MFU (H100/H200 dense: 989e12)")
    g.add_argument("--record-memory-history", action="store_true",
                   help="record the CUDA caching allocator's history on the logging rank and write it to "
                   "--memory-snapshot-path at every log line (view it at pytorch.org/memory_viz); GPU only")
    g.add_argument("--memory-snapshot-path", default=None,
                   help="with --record-memory-history: the snapshot file (default snapshot.pickle)")

# ----------------------------------------------------------------------------------------------
# ranges: every numeric flag and path flag, checked at parse time in this one table


def _positive(v) -> bool:
    return v >= 1


def _non_negative(v) -> bool:
    return v >= 0


def _finite_non_negative(v) -> bool:
    return 0 <= v < math.inf


def _finite_positive(v) -> bool:
    return 0 < v < math.inf


def _fraction(v) -> bool:
    return 0 <= v < 1


def _above_one(v) -> bool:
    return 1 < v < math.inf


_RULES: Dict[str, Tuple[Callable[[Any], bool], str]] = {
    "positive": (_positive, "must be positive"),
    ">=0": (_non_negative, "must be >= 0"),
    "finite>=0": (_finite_non_negative, "must be a finite number >= 0"),
    "finite>0": (_finite_positive, "must be a finite number > 0"),
    "[0,1)": (_fraction, "must be in [0, 1)"),
    ">1": (_above_one, "must be > 1"),
}

RANGES: Dict[str, str] = {
    # sizes and counts
    "num_layers": "positive", "hidden_size": "positive", "num_attention_heads": "positive",
    "ffn_hidden_size": "positive", "kv_channels": "positive", "num_query_groups": "positive",
    "attention_norm_group_size": "positive", "linear_conv_kernel_dim": "positive", "linear_key_head_dim": "positive",
    "linear_value_head_dim": "positive", "linear_num_key_heads": "positive", "linear_num_value_heads": "positive",
    "seq_length": "positive", "make_vocab_size_divisible_by": "positive",
    "vocab_size": "positive", "recompute_num_layers": "positive", "recompute_chunk_size": ">=0",
    "cpu_offloading_num_layers": "positive",
    "cross_entropy_chunk_size": ">=0", "tensor_model_parallel_size": "positive",
    "pipeline_model_parallel_size": "positive", "context_parallel_size": "positive",
    "micro_batch_size": "positive", "global_batch_size": "positive", "train_iters": "positive", "seed": ">=0",
    "cuda_graph_warmup_steps": "positive",
    # schedules and intervals
    "lr_warmup_iters": ">=0", "lr_decay_iters": "positive", "save_interval": "positive", "ckpt_step": ">=0",
    "exit_interval": "positive", "exit_duration_in_mins": "finite>0", "eval_interval": ">=0", "eval_iters": "positive", "log_interval": "positive",
    # timeouts
    "distributed_timeout_minutes": "positive",
    # real numbers
    "lr": "finite>=0", "min_lr": "finite>=0", "weight_decay": "finite>=0", "clip_grad": "finite>=0",
    "init_method_std": "finite>=0", "decay_layer_eps": "finite>=0", "hidden_dropout": "[0,1)",
    "gate_logit_normalizer": "finite>0",
    "adam_beta1": "[0,1)", "adam_beta2": "[0,1)", "adam_eps": "finite>0", "peak_flops": "finite>0",
    "spiky_loss_factor": ">1",
}
"""Every numeric flag's destination -> its rule in ``_RULES`` (an unset optional flag, None, passes)."""

DEFAULT_EVAL_INTERVAL = 1000
"""``--eval-interval`` when not given (not given and no validation share in ``--split``: no evaluation)."""

REQUIRED = ("train_iters", "seq_length")
"""Flags without a default that every run needs."""

DIRECTORY_FLAGS = ("save", "load", "data_cache_path", "tensorboard_dir")
"""Flags naming a directory (it or a parent being a file is refused at parse time)."""


def _flag(dest: str) -> str:
    return flag_of_field(dest) or "--" + dest.replace("_", "-")


def check_ranges(args: argparse.Namespace) -> None:
    """Check every numeric flag against :data:`RANGES` and every directory flag; raise
    :class:`ArgumentError` for the first one out of range."""
    for dest in REQUIRED:
        value = getattr(args, dest)
        if value is None or value < 1:
            raise ArgumentError(f"{_flag(dest)} is required and must be positive")
    for dest, rule in RANGES.items():
        value = getattr(args, dest)
        ok, what = _RULES[rule]
        if value is not None and not ok(value):
            raise ArgumentError(f"{_flag(dest)} {what}, got {value}")
    for dest in DIRECTORY_FLAGS:
        path = getattr(args, dest)
        if not path:
            continue
        if os.path.isfile(path):
            raise ArgumentError(f"{_flag(dest)} {path} is a file; give a directory")
        try:
            check_directory_path(path, f"{_flag(dest)} {path}")
        except ValueError as err:
            raise ArgumentError(str(err)) from None


# ----------------------------------------------------------------------------------------------
# from the flags to the run config


def default_on_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def _fill_defaults(args: argparse.Namespace, on_gpu: bool) -> None:
    """Fill the values that follow from other flags or from the machine, and refuse the flags this
    machine cannot run. Modifies ``args``."""
    args.split = normalize_split(args.split)
    shares = [float(x) for x in args.split.split(",")]
    if len(shares) < 2 or shares[1] == 0:
        if args.eval_interval:
            raise ArgumentError(f"--eval-interval {args.eval_interval} asks for evaluation, but --split {args.split} "
                                "gives the validation set no share; give it one (e.g. --split 98,2,0) or pass "
                                "--eval-interval 0")
        if args.eval_interval is None and is_rank_zero():
            logger.warning("--split %s gives the validation set no share: this run does not evaluate", args.split)
    if args.eval_interval is None:
        args.eval_interval = DEFAULT_EVAL_INTERVAL
    args.data_blend = parse_data_path(args.data_path) if args.data_path else None
    if not args.tokenizer_type and args.mock_data:
        args.tokenizer_type = "NullTokenizer"
        if args.vocab_size is None:
            # the preset's vocabulary (EOD included) for realistic mock runs, else 1024 ids
            args.vocab_size = _preset_vocab(args.model_preset) - 1
    if args.ddp_impl is None:
        args.ddp_impl = "megatron" if on_gpu else "torch"
    if args.kernel_backend is None:
        args.kernel_backend = "triton" if on_gpu else "torch"
    if args.cross_entropy_kernel is None:
        args.cross_entropy_kernel = "triton" if on_gpu else "torch"
    if not on_gpu:
        if args.ddp_impl == "megatron":
            raise ArgumentError("--ddp-impl megatron (megatron-core DDP and optimizer) needs CUDA; "
                                "on CPU use --ddp-impl torch or --ddp-impl fsdp")
        if args.bf16 or args.fp16:
            raise ArgumentError(f"{'--bf16' if args.bf16 else '--fp16'}: mixed precision needs a GPU; "
                                "drop the flag (CPU runs train in fp32)")
        if args.distributed_backend == "nccl":
            raise ArgumentError("--distributed-backend nccl needs CUDA; use gloo on CPU")
        if args.cross_entropy_kernel == "triton":
            import torch

            from megatron_lasp.ops.cross_entropy import check_kernel

            try:
                check_kernel("triton", torch.device("cpu"))
            except ValueError:
                raise ArgumentError("--cross-entropy-kernel triton needs CUDA (on CPU: TRITON_INTERPRET=1, "
                                    "Triton's interpreter); drop the flag") from None
    else:  # NCCL wants a GPU per process; gloo lets ranks share them (state.local_device)
        import torch

        try:
            local_device(resolve_backend(args.distributed_backend), 0, torch.cuda.device_count(),
                         int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
        except ValueError as err:
            raise ArgumentError(str(err)) from None
    if args.memory_snapshot_path is not None and not args.record_memory_history:
        raise ArgumentError("--memory-snapshot-path names where --record-memory-history writes; "
                            "add --record-memory-history or drop the path")
    if args.record_memory_history:
        if not on_gpu:
            raise ArgumentError("--record-memory-history records the CUDA caching allocator and needs a GPU; "
                                "drop it on CPU")
        if args.memory_snapshot_path is None:
            args.memory_snapshot_path = "snapshot.pickle"
        path = args.memory_snapshot_path
        if os.path.isdir(path):
            raise ArgumentError(f"--memory-snapshot-path: {path} is a directory; give a file path, "
                                f"e.g. {os.path.join(path, 'snapshot.pickle')}")
        try:
            check_directory_path(os.path.dirname(os.path.abspath(path)), f"--memory-snapshot-path {path}")
        except ValueError as err:
            raise ArgumentError(str(err)) from None
    if args.cuda_graph_impl != "none" and not on_gpu:
        raise ArgumentError("--cuda-graph-impl local captures CUDA graphs and needs a GPU; drop it on CPU")
    if args.recompute_granularity == "full" and args.recompute_method is None:
        args.recompute_method = "uniform"
        if args.recompute_num_layers is None:
            args.recompute_num_layers = 1
    if args.sequence_parallel and args.tensor_model_parallel_size == 1:
        args.sequence_parallel = False  # as megatron-core: TP sequence parallelism needs TP > 1
    if args.lr_decay_iters is None:
        args.lr_decay_iters = args.train_iters
    if args.finetune:
        args.no_load_optim = args.no_load_rng = True


_Record = TypeVar("_Record")


def _record(cls: Type[_Record], args: argparse.Namespace, **values: Any) -> _Record:
    """The config record ``cls`` from the flags of the same names (``values`` override)."""
    for f in dataclasses.fields(cls):
        if f.name not in values and hasattr(args, f.name):
            values[f.name] = getattr(args, f.name)
    return cls(**values)


def _as_tuple(value: Optional[Sequence[str]]) -> Optional[Tuple[str, ...]]:
    return None if value is None else tuple(value)


def _config_from_namespace(args: argparse.Namespace) -> RunConfig:
    """The frozen run config of the (checked, filled) flags; the records check their rules."""
    return RunConfig(
        model=_record(ModelOptions, args),
        memory=_record(MemoryOptions, args, recompute_modules=_as_tuple(args.recompute_modules)),
        parallel=_record(ParallelOptions, args),
        training=_record(TrainingOptions, args),
        optimizer=_record(OptimizerOptions, args),
        data=_record(DataOptions, args, tokenizer=TokenizerSettings.from_mapping(args),
                     data_path=_as_tuple(args.data_path)),
        checkpoint=_record(CheckpointOptions, args),
        logging=_record(LoggingOptions, args),
    )


def _check_files(config: RunConfig) -> None:
    """The files and packages the flags name exist."""
    if config.data.data_blend:
        for prefix in config.data.data_blend[0]:
            missing = [f"{prefix}{ext}" for ext in (".bin", ".idx") if not os.path.isfile(prefix + ext)]
            if missing:
                raise ArgumentError(f"--data-path: dataset file {missing[0]} not found "
                                    "(give the prefix without .bin/.idx; see tools/preprocess_data.py)")
    for key in TOKENIZER_PATH_KEYS:
        path = getattr(config.data.tokenizer, key)
        if path and not os.path.exists(path):
            raise ArgumentError(f"{flag_of_field(key)}: {path} not found")
    ckpt = config.checkpoint
    same_dir = bool(ckpt.load and ckpt.save and os.path.abspath(ckpt.load) == os.path.abspath(ckpt.save))
    if ckpt.load and not os.path.isdir(ckpt.load) and not same_dir:
        # --load DIR --save DIR (auto-resume) may start before DIR exists
        raise ArgumentError(f"--load: directory {ckpt.load} not found")
    if config.logging.tensorboard_dir:
        from megatron_lasp.training.logging_utils import tensorboard_available

        if not tensorboard_available():
            raise ArgumentError("--tensorboard-dir needs the tensorboard package: pip install tensorboard "
                                "(or pip install -e .[tensorboard]); or drop the flag")


def parse_config(argv: Optional[List[str]] = None, world_size: Optional[int] = None) -> RunConfig:
    """The run config of ``argv`` (default ``sys.argv[1:]``), checked.

    The model's own rules (heads over TP/SP, Transformer Engine installed, ...) are checked when
    its config is built (``model_config_from_run``, errors through :func:`config_error`).

    Args:
        argv: the flags.
        world_size: number of processes; when given, :func:`with_world_size` follows.

    Raises:
        SystemExit(2): argparse's own errors (unknown flag, bad type or choice), printed.
        ArgumentError: any other mistake in the flags.
    """
    args = build_parser().parse_args(argv)
    check_ranges(args)
    _fill_defaults(args, default_on_gpu())
    config = _config_from_namespace(args)
    _check_files(config)
    if world_size is not None:
        config = with_world_size(config, world_size)
    return config


def parse_args(argv: Optional[List[str]] = None, world_size: Optional[int] = None) -> RunConfig:
    """:func:`parse_config` as a command line does it: a user mistake prints a one-line
    ``error:`` (rank 0) and exits with status 2."""
    try:
        return parse_config(argv, world_size)
    except ArgumentError as err:
        build_parser().error(str(err))


def with_world_size(config: RunConfig, world_size: int) -> RunConfig:
    """``config`` with the values that need the number of processes: the data-parallel and world
    sizes, the global batch (if not given) and the micro-batches per step.

    Raises:
        ArgumentError: sizes that do not fit the world, the heads or the sequence length that do
            not split over the groups, a global batch that does not divide.
    """
    from megatron_lasp.models.config import (
        PRESETS,
        SOFTMAX_LAYER,
        check_delta_head_split,
        check_head_split,
        check_softmax_head_split,
    )

    par, train = config.parallel, config.training
    tp, cp = par.tensor_model_parallel_size, par.context_parallel_size
    preset = PRESETS[config.model.model_preset].fields if config.model.model_preset is not None else {}

    def model_field(name):
        value = getattr(config.model, name)
        return preset.get(name) if value is None else value

    heads = model_field("num_attention_heads")
    try:
        dp = validate_parallel_sizes(world_size, tp, cp, par.pipeline_model_parallel_size)
        if config.model.linear_type() == "gated_delta_net":  # its own heads split over ulysses
            check_head_split(heads, tp, cp, "lasp")
            key_heads = model_field("linear_num_key_heads") or heads
            check_delta_head_split(key_heads, model_field("linear_num_value_heads") or key_heads, tp, cp,
                                   par.sequence_parallel_mode)
        else:
            check_head_split(heads, tp, cp, par.sequence_parallel_mode)
        if SOFTMAX_LAYER in (model_field("hybrid_layer_pattern") or ""):
            check_softmax_head_split(heads, model_field("num_query_groups"), tp, cp,
                                     par.softmax_sequence_parallel_mode)
        check_sequence_split(train.seq_length, cp, "seq_length")
    except ValueError as err:
        raise config_error(err) from None
    mbs = train.micro_batch_size
    gbs = train.global_batch_size if train.global_batch_size is not None else mbs * dp
    if gbs % (mbs * dp) != 0:
        raise ArgumentError(
            f"--global-batch-size ({gbs}) must be divisible by --micro-batch-size "
            f"({mbs}) x data-parallel size ({dp}) = {mbs * dp}"
        )
    if par.sequence_parallel and train.seq_length // cp % tp:
        raise ArgumentError(
            f"--sequence-parallel needs the tokens per sequence-parallel rank "
            f"({train.seq_length // cp}) to be divisible by --tensor-model-parallel-size ({tp})"
        )
    return dataclasses.replace(
        config,
        parallel=dataclasses.replace(par, world_size=world_size, data_parallel_size=dp),
        training=dataclasses.replace(train, global_batch_size=gbs, num_micro_batches=gbs // (mbs * dp)),
    )


# ----------------------------------------------------------------------------------------------
# flag names and parsing helpers


_FLAGS: Optional[dict] = None


def flag_of_field(name: str) -> Optional[str]:
    """The flag that sets config field ``name`` (:data:`FIELD_FLAGS`, else the parser's flag whose
    destination is ``name``), or None."""
    global _FLAGS
    if _FLAGS is None:
        _FLAGS = {a.dest: a.option_strings[0] for a in build_parser()._actions
                  if a.option_strings and a.option_strings[0].startswith("--") and "_" in a.dest}
        _FLAGS.update(FIELD_FLAGS)
    return _FLAGS.get(name)


def config_error(err: Exception) -> ArgumentError:
    """A library error (model config, parallel sizes, layout) as a one-line CLI error: its first
    line, with every config field name replaced by its flag (:func:`flag_of_field`)."""
    text = str(err).strip()
    line = text.splitlines()[0] if text else repr(err)

    def flag(match: "re.Match") -> str:
        return flag_of_field(match.group(0)) or match.group(0)

    return ArgumentError(re.sub(r"(?<![\w-])[a-z][a-z0-9_]*(?![\w-])", flag, line))


def normalize_split(text: str) -> str:
    """Check ``--split`` ('969,30,1', '98/2/0', '1'): up to 3 non-negative numbers, not all zero."""
    parts = [t.strip() for t in re.split(r"[,/]", str(text))]
    number = re.compile(r"\d+(\.\d*)?|\.\d+")  # what megatron-core's split parser reads
    values = [float(t) for t in parts] if all(number.fullmatch(t) for t in parts) else None
    if not values or len(values) > 3 or any(not (v >= 0 and v < float("inf")) for v in values) or sum(values) <= 0:
        raise ArgumentError(f"--split {text!r}: give up to 3 non-negative train,valid,test weights, "
                            "not all zero, e.g. --split 969,30,1")
    return ",".join(parts)


def _preset_vocab(preset: Optional[str]) -> int:
    if preset is None:
        return 1024
    from megatron_lasp.models.config import preset_vocab_size

    return preset_vocab_size(preset)


def parse_data_path(tokens: Sequence[str]):
    """``--data-path`` -> megatron-core blend ``([prefix, ...], [weight, ...] or None)``.

    Accepts ``a`` / ``a b`` (equal weights) or ``0.3 a 0.7 b`` (positive weights, normalised later
    by megatron-core).
    """
    tokens = list(tokens)

    def is_number(s: str) -> bool:
        try:
            float(s)
            return True
        except ValueError:
            return False

    if any(is_number(t) for t in tokens):
        if len(tokens) % 2 or not all(is_number(t) for t in tokens[0::2]) or any(is_number(t) for t in tokens[1::2]):
            raise ArgumentError("--data-path: a weighted blend is 'WEIGHT PREFIX [WEIGHT PREFIX ...]'")
        weights = [float(w) for w in tokens[0::2]]
        bad = [w for w in weights if not _finite_positive(w)]
        if bad:
            raise ArgumentError(f"--data-path: blend weights must be finite numbers > 0, got {bad[0]:g}; "
                                "drop a dataset rather than weigh it 0")
        return list(tokens[1::2]), weights
    return tokens, None
