"""Command-line flags of ``pretrain_linear_lm.py`` (Megatron-LM names where the concept exists).

:func:`build_parser` returns the parser, :func:`parse_args` parses and validates: every user
mistake ends in argparse's one-line ``error: ...`` and exit status 2, naming the flag to change.
:func:`validate_args` checks the flags (once, before the process group exists); the checks that
need the world size (parallel sizes, batch divisibility) are in :func:`validate_world_size`, run
once the process group exists (or from :func:`parse_args` with ``world_size``).

The library's errors (the model config, the parallel layout) name config fields, not flags;
:func:`config_error` turns one into a CLI error, naming flags through :func:`flag_of_field`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
from typing import Any, Dict, List, Optional, Sequence, Type, TypeVar

from megatron_lasp.parallel.layout import check_sequence_split
from megatron_lasp.parallel.state import local_device, resolve_backend, validate_parallel_sizes

DDP_IMPLS = ("megatron", "torch", "fsdp")
LR_DECAY_STYLES = ("constant", "linear", "cosine", "inverse-square-root")
RECOMPUTE_GRANULARITIES = ("full", "selective")
RECOMPUTE_METHODS = ("uniform", "block")
RECOMPUTE_MODULES = ("core_attn", "mlp", "elementwise")

FIELD_FLAGS = {
    "context_parallel_size": "--sequence-parallel-size",
    "sequence_parallel_size": "--sequence-parallel-size",
    "offload_layer_inputs": "--cpu-offloading",
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


class ArgumentError(ValueError):
    """A user mistake in the flags; the message names the flag to change."""


def is_rank_zero() -> bool:
    """Whether this process prints user errors: global rank 0 (torchrun's ``RANK``), or no launcher."""
    return os.environ.get("RANK", "0") == "0"


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error on rank 0 only (no usage text; ``--help`` has it)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n" if is_rank_zero() else None)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``pretrain_linear_lm.py`` (every flag documented in ``--help``)."""
    from megatron_lasp.data.tokenizer import add_tokenizer_args

    from megatron_lasp.models.config import (
        DECAY_TYPES,
        FEATURE_MAPS,
        GLU_TYPES,
        PRESETS,
        TRANSFORMER_IMPLS,
    )
    from megatron_lasp.ops.lightning_attn.utils import BACKENDS
    from megatron_lasp.parallel.sp import SEQUENCE_PARALLEL_MODES

    p = _Parser(
        prog="pretrain_linear_lm.py",
        description="Pretrain a linear-attention LM (TransNormerLLM style) with LASP sequence "
        "parallelism on megatron-core. Flags follow Megatron-LM where the concept exists.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )

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
                   help="accepted for Megatron compatibility; must equal --num-attention-heads")
    g.add_argument("--normalization", choices=("RMSNorm",), default=None, help="pre-norm type")
    g.add_argument("--add-bias-linear", dest="add_bias_linear", action="store_const", const=True, default=None,
                   help="biases on the linear layers (default: none)")
    g.add_argument("--disable-bias-linear", dest="add_bias_linear", action="store_const", const=False,
                   help="no biases on the linear layers (the default)")
    g.add_argument("--hidden-dropout", type=float, default=None, help="dropout after attention and MLP")
    g.add_argument("--decay-type", choices=DECAY_TYPES, default=None,
                   help="per-head decay slopes of linear attention (default tnl)")
    g.add_argument("--decay-layer-eps", type=float, default=None,
                   help="epsilon of the tnl depth scaling of the decay (default 1e-5)")
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

    g = p.add_argument_group("long-context memory")
    g.add_argument("--no-fused-linear-cross-entropy", dest="fused_linear_cross_entropy", action="store_false",
                   help="use megatron-core's output layer + vocab-parallel cross entropy (holds the "
                   "[tokens, vocab / tp] logits) instead of the fused loss chunked over tokens")
    g.add_argument("--cross-entropy-chunk-size", type=int, default=0,
                   help="tokens per chunk of the fused loss (0: about 2^28 logits per chunk, 4096 tokens "
                   "at vocab 64000)")
    g.add_argument("--cpu-offloading", action="store_true",
                   help="move the layer inputs saved for activation recompute to pinned host memory "
                   "(side stream, overlapped) and prefetch them in backward; needs --recompute-granularity full")
    g.add_argument("--recompute-chunk-size", type=int, default=0,
                   help="with --recompute-granularity full: recompute each layer with this project's "
                   "checkpoint, running the whole layer in chunks of this many tokens in forward and "
                   "backward, the attention state carried from chunk to chunk (a layer's activations "
                   "exist for one chunk; also across --sequence-parallel-mode lasp ranks, with or "
                   "without packed documents; with TP sequence parallelism or the other modes only the "
                   "MLP half is chunked); 0: megatron-core's recompute")

    g = p.add_argument_group("fusion and selective recompute")
    g.add_argument("--no-fusion", dest="fusion", action="store_false", default=None,
                   help="run the plain PyTorch elementwise ops instead of the fused Triton kernels "
                   "(norms, feature maps, norm x gate, GLU; fused by default on GPU, never on CPU), and the "
                   "multi-tensor AdamW instead of the fused one (--no-fused-adam)")
    g.add_argument("--no-fused-adam", dest="fused_adam", action="store_false", default=True,
                   help="with --ddp-impl megatron: torch's multi-tensor AdamW instead of its fused CUDA "
                   "kernel (what megatron-core runs without apex / Transformer Engine; --no-fusion "
                   "implies it)")
    g.add_argument("--recompute-modules", nargs="+", choices=RECOMPUTE_MODULES, default=None,
                   help="with --recompute-granularity selective: core_attn (feature maps + attention "
                   "kernel, megatron-core's default), mlp (the whole MLP), elementwise (norm, gate and "
                   "GLU outputs: freed after the forward, recomputed before their backward; no matmul)")

    g = p.add_argument_group("parallelism")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1, help="TP size")
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1,
                   help="PP size (megatron-core 1F1B schedule)")
    g.add_argument("--context-parallel-size", "--sequence-parallel-size", dest="context_parallel_size",
                   type=int, default=1,
                   help="sequence-parallel (LASP) group size = megatron-core's context-parallel size")
    g.add_argument("--sequence-parallel-mode", choices=SEQUENCE_PARALLEL_MODES, default="lasp",
                   help="how linear attention is parallelised over the sequence-parallel group")
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

    g = p.add_argument_group("checkpointing")
    g.add_argument("--save", default=None, help="directory for checkpoints (iter_XXXXXXX/ + tracker file)")
    g.add_argument("--load", default=None, help="resume from this directory's latest checkpoint; it must hold "
                   "one unless it is also --save (then a first run starts from scratch)")
    g.add_argument("--save-interval", type=int, default=None, help="save every N iterations (and at the end)")
    g.add_argument("--ckpt-step", type=int, default=None,
                   help="with --load: load this iteration instead of the latest")
    g.add_argument("--no-load-optim", action="store_true",
                   help="load only the weights (needed when TP/PP/SP/DP sizes or --ddp-impl changed)")
    g.add_argument("--dist-ckpt-optim-fully-reshardable", action="store_true",
                   help="save megatron's distributed-optimizer state in the fully reshardable format "
                   "(loadable at other TP/PP sizes; slower) instead of dp_reshardable")
    g.add_argument("--no-load-rng", action="store_true", help="do not restore the RNG states")
    g.add_argument("--finetune", action="store_true",
                   help="load weights only and start at iteration 0 (implies --no-load-optim --no-load-rng)")
    g.add_argument("--exit-interval", type=int, default=None,
                   help="stop (after saving, if --save) when the iteration is a multiple of this")
    g.add_argument("--override-opt-param-scheduler", action="store_true",
                   help="on resume, use this run's LR/weight-decay schedule flags instead of the checkpoint's")
    g.add_argument("--use-checkpoint-opt-param-scheduler", action="store_true",
                   help="on resume, keep the checkpoint's LR/weight-decay schedule, ignoring this run's flags")
    g.add_argument("--check-for-spiky-loss", action="store_true",
                   help="before each save, stop without saving if the loss of the weights to be saved exceeds "
                   "--spiky-loss-factor x the lowest loss of the run (every save checks for NaN/inf anyway)")
    g.add_argument("--spiky-loss-factor", type=float, default=10.0,
                   help="with --check-for-spiky-loss: how many times the lowest loss counts as a spike")

    g = p.add_argument_group("evaluation and logging")
    g.add_argument("--eval-interval", type=int, default=1000, help="validate every N iterations (0: never)")
    g.add_argument("--eval-iters", type=int, default=10, help="validation batches per evaluation")
    g.add_argument("--log-interval", type=int, default=10, help="print a log line every N iterations")
    g.add_argument("--tensorboard-dir", default=None, help="write tensorboard scalars here (needs tensorboard)")
    g.add_argument("--peak-flops", type=float, default=989e12,
                   help="peak bf16 FLOP/s per GPU for MFU (H100/H200 dense: 989e12)")
    return p


def _error(parser: argparse.ArgumentParser, message: str):
    parser.error(message)


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


_Settings = TypeVar("_Settings")


def settings_from_args(cls: Type[_Settings], args: argparse.Namespace, **values: Any) -> _Settings:
    """The settings dataclass ``cls`` (fields named as flag destinations) from the parsed flags.

    Each field takes ``args``'s value of the same name; ``values`` give the fields that are not a
    flag (or override one). A field with a default that ``args`` lacks keeps its default.
    """
    for f in dataclasses.fields(cls):
        if f.name not in values and hasattr(args, f.name):
            values[f.name] = getattr(args, f.name)
    return cls(**values)


def recorded_flags(args: argparse.Namespace) -> Dict[str, Any]:
    """The flags (and the values filled in from them) as a checkpoint's ``args.json`` records them:
    JSON types only, sorted by name."""
    out = {}
    for key, value in sorted(vars(args).items()):
        if isinstance(value, (bool, int, float, str)) or value is None:
            out[key] = value
        elif isinstance(value, (list, tuple)):
            out[key] = json.loads(json.dumps(value, default=str))
    return out


def config_error(err: Exception) -> ArgumentError:
    """A library error (model config, parallel sizes, layout) as a one-line CLI error: its first
    line, with every config field name replaced by its flag (:func:`flag_of_field`)."""
    text = str(err).strip()
    line = text.splitlines()[0] if text else repr(err)

    def flag(match: "re.Match") -> str:
        return flag_of_field(match.group(0)) or match.group(0)

    return ArgumentError(re.sub(r"(?<![\w-])[a-z][a-z0-9_]*(?![\w-])", flag, line))


def default_on_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def validate_args(args: argparse.Namespace, world_size: Optional[int] = None) -> argparse.Namespace:
    """Fill defaults that depend on others and check the flags; raise :class:`ArgumentError`.

    The model's own rules (heads over TP/SP, Transformer Engine installed, ...) are checked when
    its config is built (``model_config_from_args``, errors through :func:`config_error`).

    Args:
        args: parsed flags (modified in place: defaults filled, ``data_blend`` parsed).
        world_size: number of processes; when given, :func:`validate_world_size` follows.

    Returns:
        ``args``.
    """
    on_gpu = default_on_gpu()
    if args.train_iters is None or args.train_iters < 1:
        raise ArgumentError("--train-iters is required and must be positive")
    if args.seq_length is None or args.seq_length < 1:
        raise ArgumentError("--seq-length is required and must be positive")
    if args.model_preset is None:
        missing = [f"--{n.replace('_', '-')}" for n in ("num_layers", "hidden_size", "num_attention_heads")
                   if getattr(args, n) is None]
        if missing:
            raise ArgumentError(f"{', '.join(missing)} required without --model-preset")
    for name in ("micro_batch_size", "log_interval", "eval_iters", "make_vocab_size_divisible_by"):
        if getattr(args, name) < 1:
            raise ArgumentError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    for name in ("save_interval", "exit_interval", "global_batch_size", "lr_decay_iters"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ArgumentError(f"--{name.replace('_', '-')} must be positive, got {value}")
    for name in ("eval_interval", "lr_warmup_iters", "ckpt_step"):
        value = getattr(args, name)
        if value is not None and value < 0:
            raise ArgumentError(f"--{name.replace('_', '-')} must be >= 0, got {value}")
    for name in ("lr", "min_lr", "weight_decay", "clip_grad"):
        value = getattr(args, name)
        if not (value >= 0 and value < float("inf")):
            raise ArgumentError(f"--{name.replace('_', '-')} must be a finite number >= 0, got {value}")
    for name in ("adam_beta1", "adam_beta2"):
        if not 0 <= getattr(args, name) < 1:
            raise ArgumentError(f"--{name.replace('_', '-')} must be in [0, 1), got {getattr(args, name)}")
    if not args.adam_eps > 0:
        raise ArgumentError(f"--adam-eps must be positive, got {args.adam_eps}")
    args.split = normalize_split(args.split)
    if args.override_opt_param_scheduler and args.use_checkpoint_opt_param_scheduler:
        raise ArgumentError("--override-opt-param-scheduler and --use-checkpoint-opt-param-scheduler are exclusive")
    if not args.spiky_loss_factor > 1:
        raise ArgumentError(f"--spiky-loss-factor must be > 1, got {args.spiky_loss_factor}")

    # long-context memory: how the flags spell the chunked recompute (the sizes' own rules are
    # the model config's, checked when it is built)
    if args.recompute_chunk_size > 0 and args.recompute_granularity != "full":
        raise ArgumentError("--recompute-chunk-size needs --recompute-granularity full")
    if args.recompute_chunk_size > 0 and (args.recompute_method not in (None, "uniform")
                                          or args.recompute_num_layers not in (None, 1)):
        raise ArgumentError("--recompute-chunk-size recomputes one layer at a time: drop --recompute-method "
                            "block / --recompute-num-layers > 1")
    if args.cpu_offloading and args.recompute_granularity != "full":
        raise ArgumentError("--cpu-offloading moves the layer inputs saved for recompute: add "
                            "--recompute-granularity full")

    # data
    if args.mock_data and args.data_path:
        raise ArgumentError("give either --data-path or --mock-data, not both")
    if not args.mock_data and not args.data_path:
        raise ArgumentError("no training data: give --data-path PREFIX [...] or --mock-data")
    args.data_blend = None
    if args.data_path:
        args.data_blend = parse_data_path(args.data_path)
        for prefix in args.data_blend[0]:
            missing = [f"{prefix}{ext}" for ext in (".bin", ".idx") if not os.path.isfile(prefix + ext)]
            if missing:
                raise ArgumentError(f"--data-path: dataset file {missing[0]} not found "
                                    "(give the prefix without .bin/.idx; see tools/preprocess_data.py)")
    if not args.tokenizer_type:
        if not args.mock_data:
            raise ArgumentError("--tokenizer-type is required with --data-path")
        args.tokenizer_type = "NullTokenizer"
        if args.vocab_size is None:
            # the preset's vocabulary (EOD included) for realistic mock runs, else 1024 ids
            args.vocab_size = _preset_vocab(args.model_preset) - 1
    if args.tokenizer_type == "NullTokenizer" and args.vocab_size is None:
        raise ArgumentError("--vocab-size is required with --tokenizer-type NullTokenizer")
    from megatron_lasp.data.tokenizer import TOKENIZER_PATH_KEYS

    for key in TOKENIZER_PATH_KEYS:
        path = getattr(args, key)
        if path and not os.path.exists(path):
            raise ArgumentError(f"{flag_of_field(key)}: {path} not found")

    # precision and implementations
    if args.bf16 and args.fp16:
        raise ArgumentError("--bf16 and --fp16 are exclusive")
    if args.ddp_impl is None:
        args.ddp_impl = "megatron" if on_gpu else "torch"
    if args.ddp_impl == "megatron" and not on_gpu:
        raise ArgumentError("--ddp-impl megatron (megatron-core DDP and optimizer) needs CUDA; "
                            "on CPU use --ddp-impl torch or --ddp-impl fsdp")
    if args.use_distributed_optimizer and args.ddp_impl != "megatron":
        raise ArgumentError("--use-distributed-optimizer needs --ddp-impl megatron "
                            "(--ddp-impl fsdp already shards the optimizer state)")
    if (args.bf16 or args.fp16) and not on_gpu:
        raise ArgumentError(f"{'--bf16' if args.bf16 else '--fp16'}: mixed precision needs a GPU; "
                            "drop the flag (CPU runs train in fp32)")
    if args.fp16 and args.ddp_impl != "megatron":
        raise ArgumentError("--fp16 (loss scaling) is supported with --ddp-impl megatron only; use --bf16")
    if args.kernel_backend is None:
        args.kernel_backend = "triton" if on_gpu else "torch"
    if args.distributed_backend == "nccl" and not on_gpu:
        raise ArgumentError("--distributed-backend nccl needs CUDA; use gloo on CPU")
    if on_gpu:  # NCCL wants a GPU per process; gloo lets ranks share them (state.local_device)
        import torch

        try:
            local_device(resolve_backend(args.distributed_backend), 0, torch.cuda.device_count(),
                         int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
        except ValueError as err:
            raise ArgumentError(str(err)) from None
    if args.recompute_granularity == "full" and args.recompute_method is None:
        args.recompute_method = "uniform"
        if args.recompute_num_layers is None:
            args.recompute_num_layers = 1
    if args.recompute_modules is not None and args.recompute_granularity != "selective":
        raise ArgumentError("--recompute-modules needs --recompute-granularity selective")
    if args.recompute_method is not None and args.recompute_granularity != "full":
        raise ArgumentError("--recompute-method needs --recompute-granularity full")
    if args.sequence_parallel and args.tensor_model_parallel_size == 1:
        args.sequence_parallel = False  # as megatron-core: TP sequence parallelism needs TP > 1

    # schedule
    if args.lr_decay_iters is None:
        args.lr_decay_iters = args.train_iters
    if args.lr_warmup_iters < 0 or args.lr_warmup_iters >= max(args.lr_decay_iters, 1):
        raise ArgumentError(f"--lr-warmup-iters ({args.lr_warmup_iters}) must be in [0, --lr-decay-iters "
                            f"({args.lr_decay_iters}))")
    if args.min_lr > args.lr:
        raise ArgumentError(f"--min-lr ({args.min_lr}) must not exceed --lr ({args.lr})")
    if args.save_interval is not None and not args.save:
        raise ArgumentError("--save-interval needs --save DIR")
    same_dir = bool(args.load and args.save and os.path.abspath(args.load) == os.path.abspath(args.save))
    if args.load and not os.path.isdir(args.load) and not same_dir:
        # --load DIR --save DIR (auto-resume) may start before DIR exists
        raise ArgumentError(f"--load: directory {args.load} not found")
    if args.ckpt_step is not None and not args.load:
        raise ArgumentError("--ckpt-step needs --load DIR")
    if args.finetune:
        args.no_load_optim = args.no_load_rng = True
    if args.tensorboard_dir:
        from megatron_lasp.training.logging_utils import tensorboard_available

        if not tensorboard_available():
            raise ArgumentError("--tensorboard-dir needs the tensorboard package: pip install tensorboard "
                                "(or pip install -e .[tensorboard]); or drop the flag")

    if world_size is not None:
        validate_world_size(args, world_size)
    return args


def validate_world_size(args: argparse.Namespace, world_size: int) -> argparse.Namespace:
    """The checks that need the number of processes; sets ``data_parallel_size``, ``world_size``,
    ``num_micro_batches`` (and ``global_batch_size`` if not given). Run after :func:`validate_args`.

    Raises:
        ArgumentError: sizes that do not fit the world, the heads or the sequence length that do
            not split over the groups, a global batch that does not divide.
    """
    from megatron_lasp.models.config import PRESETS, check_head_split

    tp, cp = args.tensor_model_parallel_size, args.context_parallel_size
    heads = args.num_attention_heads
    if heads is None and args.model_preset is not None:
        heads = PRESETS[args.model_preset].fields["num_attention_heads"]
    try:
        dp = validate_parallel_sizes(world_size, tp, cp, args.pipeline_model_parallel_size)
        check_head_split(heads, tp, cp, args.sequence_parallel_mode)
        check_sequence_split(args.seq_length, cp, "seq_length")
    except ValueError as err:
        raise config_error(err) from None
    args.data_parallel_size = dp
    if args.global_batch_size is None:
        args.global_batch_size = args.micro_batch_size * dp
    if args.global_batch_size % (args.micro_batch_size * dp) != 0:
        raise ArgumentError(
            f"--global-batch-size ({args.global_batch_size}) must be divisible by --micro-batch-size "
            f"({args.micro_batch_size}) x data-parallel size ({dp}) = {args.micro_batch_size * dp}"
        )
    args.num_micro_batches = args.global_batch_size // (args.micro_batch_size * dp)
    args.world_size = world_size
    if args.sequence_parallel and args.seq_length // cp % tp:
        raise ArgumentError(
            f"--sequence-parallel needs the tokens per sequence-parallel rank "
            f"({args.seq_length // cp}) to be divisible by --tensor-model-parallel-size ({tp})"
        )
    return args


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

    Accepts ``a`` / ``a b`` (equal weights) or ``0.3 a 0.7 b`` (weights, normalised later by
    megatron-core).
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
        if any(w < 0 for w in weights) or sum(weights) <= 0:
            raise ArgumentError("--data-path: blend weights must be non-negative and not all zero")
        return list(tokens[1::2]), weights
    return tokens, None


def parse_args(argv: Optional[List[str]] = None, world_size: Optional[int] = None) -> argparse.Namespace:
    """Parse and validate; on a user mistake print ``usage`` + a one-line error and exit(2)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        validate_args(args, world_size)
    except ArgumentError as err:
        _error(parser, str(err))
    return args
