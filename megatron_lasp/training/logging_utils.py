"""Training log lines (Megatron's format), throughput / FLOPs / MFU, tensorboard scalars, and a
readable start-up (:func:`quiet_megatron_core`).

FLOPs of the linear-attention LM (what ``TFLOP/s/GPU`` and ``MFU`` count), per trained token:

    training FLOPs / token = 6 * P_matmul + 3 * L * H * (4 * B * d + 4 * d^2)

- ``6 * P_matmul``: every weight matrix is used in one multiply-add (2 FLOPs) per token forward
  and twice as much backward (input and weight gradients). ``P_matmul`` counts the weights that
  multiply activations: per layer the fused q/k/v(/gate) projection ``h x parts * H * d``, the
  output projection ``H * d x h`` and the GLU channel mixer ``3 * h * f``, and with a per-token gate
  (``linear_attention_gate``) its projection ``h x H``; plus the output layer ``h x V``. Embedding
  lookups, norms and the gate's elementwise math (softplus / log-sigmoid, the decay factors inside
  the kernel) are not matmuls and are not counted.
- ``3 * L * H * (...)``: the chunked linear attention, forward cost per token and head with chunk
  size ``B`` and head dim ``d``: intra-chunk ``Q K^T`` and ``(Q K^T) V`` over a full ``B`` block
  (``2 * 2 * B * d``; the causal half is computed and masked), inter-chunk ``Q S`` and the state
  update ``K^T V`` (``2 * 2 * d^2``); backward is counted as twice the forward.

Hybrid models (``hybrid_layer_pattern``): a softmax layer's projections are ``h x (H + 2 G) d``
(q, and k, v for ``G = num_query_groups`` key/value heads; no gate) and ``H d x h``, counted in
``P_matmul`` like the rest; its attention adds, per token of a ``N``-token sequence,
``3 * 2 * H * d * (N + 1)``: forward ``Q K^T`` and ``P V`` against the ``(N + 1) / 2`` keys a
causal query reads on average (``2 * 2 * d`` FLOPs per key and head), backward twice that. Packed
documents are counted as whole rows (the model's FLOPs, not the masked work).

Gated DeltaNet layers (``linear_attention_type='gated_delta_net'``; ``Hk`` / ``Hv`` key / value
heads of ``Dk`` / ``Dv`` channels, ``K`` convolution taps): the projections ``in_proj``
``h x (2 Hk Dk + 2 Hv Dv + 2 Hv)`` (q, k, v, the output gate z, beta and the decay input) and
``out_proj`` ``Hv Dv x h`` count in ``P_matmul``; the layer's core, forward per token, is the
short convolution ``2 K (2 Hk Dk + Hv Dv)`` plus, per value head, the chunked delta rule's
matmuls with chunk ``B`` (the WY form, fla's kernels): ``K K^T`` ``2 B Dk``, the chunk's
triangular system applied to ``[V | K]`` ``2 B (Dk + Dv)``, ``Q K^T`` ``2 B Dk`` and its product
with the corrected values ``2 B Dv``, and three state products ``W S``, ``Q S``, ``K^T U`` of
``2 Dk Dv`` each: ``6 B Dk + 4 B Dv + 6 Dk Dv`` (the inversion of the ``B x B`` triangle and the
elementwise work are not counted). Backward counts twice the forward, as for lightning layers.

So MFU = (FLOPs / token x tokens / s) / (number of GPUs x ``--peak-flops``). On CPU MFU is n/a.

MFU counts the model's FLOPs, not the work a run does: activation recompute runs part of the
forward again in the backward. :func:`recompute_flops_per_token` counts that part (full or
whole-layer chunked recompute: each recomputed layer's forward, ``2 * P_layer`` plus its
attention forward, so about 8N for the 6N counted; selective ``core_attn``: the attention
forward; ``mlp``: the channel mixer's forward), and the benchmarks report the hardware FLOPs
utilization (HFU, with that work counted) beside the MFU.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import os
import time
import warnings
from typing import Dict, Optional

import torch

from megatron_lasp.atomic import atomic_file

logger = logging.getLogger(__name__)

MEGATRON_CORE_WARNINGS = (
    r"(Transformer Engine and Apex are|Apex is|Transformer Engine is) not installed",
    r"full scope is deprecated",
)
"""megatron-core's import-time warnings (``warnings.warn`` message prefixes) that every process
repeats at start-up: the missing optional accelerators (one line of ours says it instead) and a
deprecation inside its own config defaults."""


class MegatronCoreLogFilter(logging.Filter):
    """Condense megatron-core's INFO start-up records: drop the Megatron-FSDP detection notes, the
    per-file index reading and the index-cache lines (a ``Build and save`` line stays: building
    can take a while), and cut the dataset builder's config dump (a line of ~1,500 characters)
    to the split sizes; drop megatron-core 0.16's "Unknown MLP type" warning, which it gives
    every layer whose MLP is a subclass of its ``MLP`` (ours, ``LinearLMMLP``) although that MLP
    builds with the default arguments it announces. Other warnings and errors pass unchanged."""

    DROP = ("megatron.core.distributed.fsdp", "megatron.core.datasets.indexed_dataset",
            "megatron.core.datasets.blended_megatron_dataset_config")

    def filter(self, record: logging.LogRecord) -> bool:
        name = record.name
        if name == "megatron.core.transformer.transformer_layer" and record.levelno == logging.WARNING:
            return not record.getMessage().startswith("Unknown MLP type")
        if record.levelno > logging.INFO or not name.startswith("megatron.core."):
            return True
        if name.startswith(self.DROP):
            return False
        if name.startswith("megatron.core.datasets.") and name.endswith("_dataset_builder"):
            message = record.getMessage()
            if " and config=" in message:
                record.msg, record.args = message.split(" and config=")[0], ()
            return True
        if name == "megatron.core.datasets.gpt_dataset":
            return record.getMessage().startswith("Build and save")
        return True


def quiet_megatron_core() -> None:
    """Keep megatron-core's start-up notes from burying the first lines of a run: silence
    :data:`MEGATRON_CORE_WARNINGS` (logging one line instead where an accelerator is missing) and
    put :class:`MegatronCoreLogFilter` on the root logger's handlers. Called by the training entry
    point once it has configured logging; the library itself never changes these settings."""
    for pattern in MEGATRON_CORE_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern, category=UserWarning)
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, MegatronCoreLogFilter) for f in handler.filters):
            handler.addFilter(MegatronCoreLogFilter())
    missing = [name for name, module in (("Transformer Engine", "transformer_engine"), ("Apex", "apex"))
               if importlib.util.find_spec(module) is None]
    if missing:
        logger.info("%s not installed: megatron-core uses its torch fallbacks", " and ".join(missing))


DEFAULT_CHUNK_SIZE = 64
"""Chunk (block) size assumed for the attention FLOPs (the kernels' block) unless one is given."""


def flops_per_token(config, vocab_size: int, chunk_size: Optional[int] = None,
                    seq_length: Optional[int] = None) -> float:
    """Training FLOPs per token of the whole model (formula in the module docstring).

    Args:
        config: the model config (``num_layers, hidden_size, num_attention_heads, kv_channels,
            ffn_hidden_size``, optional ``output_gate``, ``linear_attention_gate``,
            ``hybrid_layer_pattern``, ``num_query_groups``; with ``linear_attention_type
            'gated_delta_net'`` its ``linear_*`` sizes).
        vocab_size: padded vocabulary size (output layer width).
        chunk_size: the attention kernel's block size (default :data:`DEFAULT_CHUNK_SIZE`).
        seq_length: tokens per sequence; needed by a hybrid's softmax layers (their work per
            token grows with it), ignored otherwise.

    Raises:
        ValueError: a hybrid config without ``seq_length``.
    """
    forward = _layer_flops(config, chunk_size, seq_length, "flops_per_token")
    # forward + backward (twice the forward) of the layers, and of the output layer h x V
    return 3.0 * forward["layers"] + 6.0 * config.hidden_size * vocab_size


def _layer_flops(config, chunk_size: Optional[int], seq_length: Optional[int], caller: str) -> Dict[str, float]:
    """Forward FLOPs per token: of one layer's parts (``linear_proj``, ``linear_attn``,
    ``softmax_proj``, ``softmax_attn``, ``mlp``: 2 per weight of the matmuls, the attention as in
    the module docstring), the layer counts (``linear_layers``, ``softmax_layers``) and of all
    layers together (``layers``).

    Raises:
        ValueError: a hybrid config without ``seq_length`` (the message begins with ``caller``).
    """
    h, H, L = config.hidden_size, config.num_attention_heads, config.num_layers
    softmax_layers = (getattr(config, "hybrid_layer_pattern", None) or "").count("*")
    if softmax_layers and not seq_length:
        raise ValueError(f"{caller}: a hybrid model's softmax layers need seq_length")
    d = config.kv_channels or h // H
    f = config.ffn_hidden_size
    parts = 4 if getattr(config, "output_gate", False) else 3
    glu = 3 if getattr(config, "gated_linear_unit", True) else 2
    G = getattr(config, "num_query_groups", None) or H
    gate = 0 if getattr(config, "linear_attention_gate", "none") in (None, "none") else h * H
    B = chunk_size or DEFAULT_CHUNK_SIZE
    if getattr(config, "linear_attention_type", "lightning") == "gated_delta_net":
        linear_proj, linear_attn = _delta_net_flops(config, B)
    else:
        linear_proj, linear_attn = 2.0 * (h * parts * H * d + H * d * h + gate), float(H * (4 * B * d + 4 * d * d))
    out = {
        "linear_proj": linear_proj,
        "linear_attn": linear_attn,
        "softmax_proj": 2.0 * (h * (H + 2 * G) * d + H * d * h),
        "softmax_attn": 2.0 * H * d * ((seq_length or 0) + 1),
        "mlp": 2.0 * glu * h * f,
        "linear_layers": L - softmax_layers,
        "softmax_layers": softmax_layers,
    }
    out["layers"] = (out["linear_layers"] * (out["linear_proj"] + out["linear_attn"] + out["mlp"])
                     + softmax_layers * (out["softmax_proj"] + out["softmax_attn"] + out["mlp"]))
    return out


def _delta_net_flops(config, B: int) -> tuple:
    """A Gated DeltaNet layer's forward FLOPs per token: ``(projections, core)``, the core being the
    short convolution and the chunked delta rule (module docstring; what ``core_attn`` recomputes)."""
    h, K = config.hidden_size, config.linear_conv_kernel_dim
    Hk, Hv = config.linear_num_key_heads, config.linear_num_value_heads
    Dk, Dv = config.linear_key_head_dim, config.linear_value_head_dim
    proj = 2.0 * (h * (2 * Hk * Dk + 2 * Hv * Dv + 2 * Hv) + Hv * Dv * h)
    conv = 2.0 * K * (2 * Hk * Dk + Hv * Dv)
    return proj, conv + float(Hv * (6 * B * Dk + 4 * B * Dv + 6 * Dk * Dv))


def recompute_flops_per_token(config, chunk_size: Optional[int] = None, seq_length: Optional[int] = None) -> float:
    """FLOPs per token that activation recompute adds to a training step (the forward work run again
    in the backward), for the hardware FLOPs utilization; 0 without recompute.

    Full recompute (``recompute_granularity="full"``, whole-layer chunks included) reruns each
    recomputed layer's forward: every layer with ``recompute_method="uniform"``, the first
    ``recompute_num_layers`` with ``"block"``. Selective recompute reruns the modules named in
    ``recompute_modules``: ``core_attn`` (the attention kernels), ``mlp`` (the channel mixer);
    the elementwise work is not counted (no matmuls).

    Raises:
        ValueError: a hybrid config without ``seq_length``.
    """
    granularity = getattr(config, "recompute_granularity", None)
    if granularity not in ("full", "selective"):
        return 0.0
    forward = _layer_flops(config, chunk_size, seq_length, "recompute_flops_per_token")
    L = config.num_layers
    if granularity == "full":
        layers = L
        if getattr(config, "recompute_method", None) == "block":
            layers = min(getattr(config, "recompute_num_layers", None) or L, L)
        # the recomputed layers' mix of kinds: in proportion (exact for uniform recompute)
        return layers / L * forward["layers"]
    modules = set(getattr(config, "recompute_modules", None) or ())
    extra = 0.0
    if "core_attn" in modules:
        extra += (forward["linear_layers"] * forward["linear_attn"]
                  + forward["softmax_layers"] * forward["softmax_attn"])
    if "mlp" in modules:
        extra += L * forward["mlp"]
    return extra


def memory_gib() -> float:
    """Peak GPU memory allocated on this device (GiB), or this process's resident memory on CPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    import psutil

    return psutil.Process().memory_info().rss / 2**30


class MemoryHistory:
    """``--record-memory-history``: this process records the CUDA caching allocator's events (each
    allocation and free with its Python and C++ stack, the last ``max_entries``), and :meth:`dump`
    replaces ``path`` by a snapshot of them and of the memory now held (written beside it, then
    renamed), for pytorch.org/memory_viz. Memory allocated before the recording starts shows in
    the snapshot without a stack."""

    def __init__(self, path: str, max_entries: int = 1_000_000) -> None:
        self.path = path
        torch.cuda.memory._record_memory_history(max_entries=max_entries)

    def dump(self) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        with atomic_file(self.path) as tmp:
            torch.cuda.memory._dump_snapshot(tmp)

    def stop(self) -> None:
        torch.cuda.memory._record_memory_history(enabled=None)


def _duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h:d}:{m:02d}:{s:02d}"


def format_log_line(
    *,
    iteration: int,
    train_iters: int,
    consumed_samples: int,
    ms_per_iter: float,
    lr: float,
    loss: float,
    grad_norm: float,
    tokens_per_s: float,
    tflops_per_gpu: float,
    mfu: Optional[float],
    mem_gib: float,
) -> str:
    """One Megatron-style log line with a progress indication (percent + ETA)."""
    eta = (train_iters - iteration) * ms_per_iter / 1000.0
    fields = [
        f" iteration {iteration:8d}/{train_iters:8d}",
        f"consumed samples: {consumed_samples:12d}",
        f"elapsed time per iteration (ms): {ms_per_iter:.1f}",
        f"learning rate: {lr:.6E}",
        f"lm loss: {loss:.6E}",
        f"grad norm: {grad_norm:.3f}",
        f"tokens/s: {tokens_per_s:.0f}",
        f"TFLOP/s/GPU: {tflops_per_gpu:.2f}",
        f"MFU: {'n/a' if mfu is None else f'{100.0 * mfu:.1f}%'}",
        f"mem GiB: {mem_gib:.2f}",
    ]
    fields.append(f"progress: {100.0 * iteration / train_iters:.1f}% ETA {_duration(eta)}")
    return " | ".join(fields) + " |"


class TensorboardWriter:
    """Scalars to ``--tensorboard-dir`` (one writer, on the logging rank)."""

    def __init__(self, log_dir: str) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as err:  # tensorboard is an optional extra
            raise RuntimeError(
                "--tensorboard-dir needs the tensorboard package: pip install tensorboard "
                "(or pip install -e .[tensorboard]); drop the flag to train without it"
            ) from err
        self.writer = SummaryWriter(log_dir=log_dir)

    def add_scalars(self, values: Dict[str, float], step: int) -> None:
        for name, value in values.items():
            if value is not None and math.isfinite(value):
                self.writer.add_scalar(name, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def tensorboard_available() -> bool:
    """Whether ``torch.utils.tensorboard`` can be imported."""
    try:
        import torch.utils.tensorboard  # noqa: F401
    except ImportError:
        return False
    return True


class Stopwatch:
    """Wall time between log lines (synchronizes the GPU so the time covers the work)."""

    def __init__(self) -> None:
        self.start = time.perf_counter()

    def lap(self) -> float:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        now = time.perf_counter()
        elapsed, self.start = now - self.start, now
        return elapsed
