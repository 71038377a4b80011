"""Training data: megatron-core GPT datasets (or mock tokens), cut into micro-batches and slices.

Sample order. The training set is a sequence of samples (megatron-core's ``GPTDataset`` over
``.bin/.idx`` files, a weighted ``BlendedDataset`` of several, or ``MockGPTDataset``). Iteration
``i`` consumes the global batch ``[c, c + G)`` with ``c`` the samples consumed before it and ``G``
the global batch size; micro-batch ``m`` of data-parallel rank ``r`` holds samples
``c + (m * DP + r) * b + [0, b)`` (``b`` = micro-batch size). The set of samples in a step does not
depend on DP or SP, so runs with different parallel sizes see the same global batches, and a
resumed run continues from ``consumed_samples`` exactly.

Within the model-parallel group: every TP rank reads the same samples; every SP rank reads the
whole sequence and keeps its contiguous slice (:func:`megatron_lasp.parallel.split_sequence`);
pipeline stages other than the first and the last read nothing (the first needs tokens and
positions, the last labels and the loss mask; both read all of them, as a stage can be both).

Packed documents (``--reset-attention-mask``): every rank that runs attention (every pipeline
stage, then) reads the micro-batch and derives the document starts from its EOD tokens on the
host (:func:`document_starts`): a document starts after each EOD and at every sample start. They
go to the model as one ``cu_seqlens`` over the ``b x s`` tokens of the micro-batch's samples laid
end to end (global offsets, the same on every SP rank): micro-batch > 1 thus means "each sample
is packed on its own", never a document running from one sample into the next. The tensor is
copied to the device once per micro-batch; the layers read it without a host sync.
"""

from __future__ import annotations

import hashlib
import logging
import os
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as dist

from megatron_lasp.atomic import check_directory_path, describe_ranks, ranks_not_seeing
from megatron_lasp.data.tokenizer import TOKENIZER_PATH_KEYS
from megatron_lasp.parallel.layout import sequence_slice_bounds

if TYPE_CHECKING:
    from megatron_lasp.data.tokenizer import TokenizerSettings

logger = logging.getLogger(__name__)

BATCH_KEYS = ("tokens", "labels", "loss_mask", "position_ids")
SPLIT_NAMES = ("train", "valid", "test")
VOCAB_SAMPLE_TOKENS = 1 << 20
"""Tokens read from each of the start, middle and end of a ``.bin`` to check its ids at start-up."""
_INDEX_HEADER = b"MMIDIDX\x00\x00"


class DataError(ValueError):
    """Training data that cannot be used as given; the message names the file and the fix."""


@dataclass(frozen=True)
class DataSettings:
    """What the datasets are built from (named as the run's flags)."""

    mock_data: bool
    """Deterministic random tokens (megatron-core's ``MockGPTDataset``) instead of ``data_blend``."""
    data_blend: Optional[Tuple[List[str], Optional[List[float]]]]
    """megatron-core blend of the dataset prefixes: ``([prefix, ...], [weight, ...] or None)``."""
    split: str
    """``train,valid,test`` proportions of the blend (``969,30,1``)."""
    data_cache_path: Optional[str]
    """Where megatron-core caches sample indices (None: ``index-cache/`` next to the first prefix)."""
    seq_length: int
    """Tokens per sample."""
    eod_mask_loss: bool
    """Do not train on predicting EOD tokens."""
    seed: int
    """Seed of the sample order and of the mock tokens."""
    train_iters: int
    """Optimizer steps of the run."""
    global_batch_size: int
    """Samples per optimizer step."""
    eval_interval: int
    """Steps between evaluations (0: never)."""
    eval_iters: int
    """Batches per evaluation."""
    skip_splits: Tuple[int, ...] = ()
    """Splits (0 train, 1 valid, 2 test) that get no tokens and are not used (:func:`check_data`)."""
    reset_attention_mask: bool = False
    """Packed documents: the data must hold EOD tokens (:func:`check_data` refuses data without)."""


def padded_vocab_size(vocab_size: int, divisible_by: int, tensor_model_parallel_size: int) -> int:
    """Round the vocabulary up to a multiple of ``divisible_by x TP`` (Megatron's padding)."""
    multiple = divisible_by * tensor_model_parallel_size
    return -(-vocab_size // multiple) * multiple


def build_tokenizer(settings: TokenizerSettings):
    """The project tokenizer of ``settings`` (see ``megatron_lasp.data``); :class:`DataError` if its
    files cannot be read."""
    try:
        return settings.build()
    except (ValueError, FileNotFoundError) as err:
        if isinstance(err, FileNotFoundError) or str(err).startswith("-"):  # the builder's own messages
            raise
        detail = str(err)
    except Exception as err:  # a damaged file: the tokenizer library's own error is not a flag's name
        detail = f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"
    files = [getattr(settings, key) for key in TOKENIZER_PATH_KEYS]
    files = [os.path.join(f, "tokenizer.json") if key == "tokenizer_model" and os.path.isdir(f) else f
             for key, f in zip(TOKENIZER_PATH_KEYS, files) if f]  # a HuggingFace tokenizer directory: its file
    named = ", ".join(files) or settings.tokenizer_type
    raise DataError(f"--tokenizer-type {settings.tokenizer_type}: cannot load the tokenizer from {named} ({detail[:200]}); "
                    "the file is damaged or of another kind: point the tokenizer flags to a valid one") from None


def _read_index(prefix: str):
    """(dtype, sequence lengths, sequence pointers) of ``prefix.idx``; :class:`DataError` if it is not one."""
    from megatron.core.datasets.indexed_dataset import DType

    path = prefix + ".idx"
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(34)
    if len(head) < 34 or head[:9] != _INDEX_HEADER or struct.unpack("<Q", head[9:17])[0] != 1:
        raise DataError(f"{path} is not a megatron-core index file; re-run tools/preprocess_data.py for {prefix}")
    try:
        dtype = DType.dtype_from_code(head[17])
    except Exception:
        raise DataError(f"{path}: unknown token dtype code {head[17]}; re-run tools/preprocess_data.py") from None
    sequences, documents = struct.unpack("<QQ", head[18:34])
    if size < 34 + 12 * sequences + 8 * documents:
        raise DataError(f"{path} is truncated ({size} bytes for {sequences} sequences); "
                        f"re-run tools/preprocess_data.py for {prefix}")
    mm = np.memmap(path, mode="r", dtype=np.uint8)
    lengths = np.frombuffer(mm, dtype=np.int32, count=sequences, offset=34)
    pointers = np.frombuffer(mm, dtype=np.int64, count=sequences, offset=34 + 4 * sequences)
    return np.dtype(dtype), lengths, pointers


def _check_pair(prefix: str, vocab: int, eod: Optional[int] = None) -> np.ndarray:
    """Check ``prefix.bin`` against ``prefix.idx`` (size, dtype) and a sample of its ids (with ``eod``:
    the sample holds that token); return the lengths."""
    dtype, lengths, pointers = _read_index(prefix)
    bin_path = prefix + ".bin"
    expected = int(pointers[-1]) + int(lengths[-1]) * dtype.itemsize if len(lengths) else 0
    actual = os.path.getsize(bin_path)
    if actual != expected:
        what = "truncated" if actual < expected else "longer than its index"
        raise DataError(f"{bin_path} has {actual} bytes but {prefix}.idx describes {expected} ({len(lengths)} "
                        f"sequences of {dtype.name} tokens): the .bin is {what} or the pair comes from different "
                        f"preprocessing runs; re-run tools/preprocess_data.py for {prefix}")
    tokens = actual // dtype.itemsize
    if tokens:
        data = np.memmap(bin_path, mode="r", dtype=dtype)
        n = VOCAB_SAMPLE_TOKENS
        starts = sorted({0, max(0, tokens // 2 - n // 2), max(0, tokens - n)})
        top = max(int(data[a:a + n].max()) for a in starts)
        low = min(int(data[a:a + n].min()) for a in starts)
        if eod is not None and not any(bool((data[a:a + n] == eod).any()) for a in starts):
            read = min(tokens, n * len(starts))
            raise DataError(f"--reset-attention-mask: {bin_path} holds no EOD token (id {eod}) in the {read} tokens "
                            "read, so its documents would run into each other; preprocess it with --append-eod "
                            "(tools/preprocess_data.py), or drop --reset-attention-mask")
        if top >= vocab or low < 0:
            bad = top if top >= vocab else low
            raise DataError(f"{bin_path} holds token id {bad}, outside the tokenizer's {vocab} ids: it was "
                            "tokenized with another tokenizer; pass the tokenizer flags it was made with, or "
                            "re-run tools/preprocess_data.py with these")
    return lengths


def _check_cache_path(settings: DataSettings) -> None:
    """The default index cache (next to the data) must be able to be a directory: megatron-core's
    ``makedirs`` would fail late and on rank 0 only. (A given ``--data-cache-path`` is checked with
    the flags.)"""
    if settings.data_cache_path or settings.mock_data or not settings.data_blend:
        return
    path = _default_cache_base(settings.data_blend[0])
    try:
        check_directory_path(path, f"the index cache {path} (next to --data-path; or pass --data-cache-path)")
    except ValueError as err:
        raise DataError(str(err)) from None


def check_data(settings: DataSettings, tokenizer) -> Tuple[int, ...]:
    """Check the ``--data-path`` datasets before megatron-core builds its indices; no collectives.

    Checks that the index cache can be a directory, every ``.bin``/``.idx`` pair (sizes, dtype,
    token ids) and the ``--split``: a split that receives no tokens would make megatron-core's
    ``GPTDataset`` loop forever, so an empty split this run uses (train; valid when
    ``--eval-interval`` > 0) is an error and an unused empty one is skipped with a warning.

    Returns:
        the splits to skip (``DataSettings.skip_splits``).

    Raises:
        DataError: naming the file or flag to change.
    """
    from megatron.core.datasets.blended_megatron_dataset_config import (
        convert_split_vector_to_split_matrix,
        parse_and_normalize_split,
    )

    _check_cache_path(settings)
    skip: List[int] = []
    if settings.mock_data or not settings.data_blend:
        return ()
    split = settings.split
    matrix = convert_split_vector_to_split_matrix(parse_and_normalize_split(split))
    used = {0: "training", 1: "evaluation (--eval-interval)" if settings.eval_interval else None, 2: None}
    for prefix in settings.data_blend[0]:
        lengths = _check_pair(prefix, tokenizer.vocab_size, tokenizer.eod if settings.reset_attention_mask else None)
        n = len(lengths)
        for i, bounds in enumerate(matrix):
            if bounds is None or i in skip:
                continue
            beg, end = int(round(bounds[0] * n)), int(round(bounds[1] * n))
            if int(lengths[beg:end].astype(np.int64).sum()) > 0:
                continue
            if used[i]:
                raise DataError(f"--split {split} gives the {SPLIT_NAMES[i]} split {end - beg} of the {n} "
                                f"documents of {prefix}, no tokens, but {used[i]} needs it; give it a larger share "
                                f"(e.g. --split 90,10,0){' or pass --eval-interval 0' if i == 1 else ''}")
            logger.warning("--split %s gives the %s split no documents of %s; it is not used, skipping it",
                           split, SPLIT_NAMES[i], prefix)
            skip.append(i)
    return tuple(skip)


def _default_cache_base(prefixes: Sequence[str]) -> str:
    return os.path.join(os.path.dirname(os.path.abspath(prefixes[0])), "index-cache")


def index_cache_path(settings: DataSettings) -> Optional[str]:
    """Where megatron-core caches the sample indices: keyed on the data files (path, size, mtime).

    megatron-core keys its cache on the flags only, so re-preprocessing into the same prefix
    would reuse indices of the old files.
    """
    if settings.mock_data or not settings.data_blend:
        return settings.data_cache_path
    prefixes = settings.data_blend[0]
    key = hashlib.sha256()
    for prefix in prefixes:
        for ext in (".bin", ".idx"):
            st = os.stat(prefix + ext)
            key.update(f"{os.path.abspath(prefix + ext)}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    base = settings.data_cache_path or _default_cache_base(prefixes)
    return os.path.join(base, f"{os.path.basename(prefixes[0])}-{key.hexdigest()[:16]}")


def dataset_sizes(settings: DataSettings) -> List[int]:
    """Samples needed from the train / valid / test splits for the whole run."""
    batch = settings.global_batch_size
    train = settings.train_iters * batch
    evals = settings.train_iters // settings.eval_interval + 1 if settings.eval_interval else 0
    valid = evals * settings.eval_iters * batch
    test = settings.eval_iters * batch
    return [train, valid, test]


def build_datasets(settings: DataSettings, tokenizer) -> list:
    """Build the (train, valid, test) datasets with megatron-core's BlendedMegatronDatasetBuilder.

    Every rank builds (megatron-core builds on rank 0 first, then the others read its index cache).
    An index cache that some ranks do not see (node-local disks) would make them fail: then every
    rank builds its indices in memory instead (the same indices; each rank pays the build), with a
    warning. Collective.

    Returns:
        three datasets (or None for a split with no samples), each indexable by sample number and
        returning megatron-core's sample dict (``tokens, labels, loss_mask, position_ids`` of
        ``[seq_length]``).
    """
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, MockGPTDataset

    cache = index_cache_path(settings)
    if cache and dist.is_initialized() and dist.get_world_size() > 1:
        blind, host0 = ranks_not_seeing(cache)
        if blind:
            if dist.get_rank() == 0:
                logger.warning("the index cache %s (on %s) is not seen by %s: every rank builds its sample indices "
                               "without a cache; put --data-cache-path on a file system all nodes share to build "
                               "them once", cache, host0, describe_ranks(blind))
            cache = None
    config = GPTDatasetConfig(
        random_seed=settings.seed,
        sequence_length=settings.seq_length,
        blend=settings.data_blend,
        split=settings.split,
        path_to_cache=cache,
        tokenizer=tokenizer.as_megatron_tokenizer(),
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=settings.eod_mask_loss,
        create_attention_mask=False,
    )
    for i in settings.skip_splits:  # empty and unused (check_data): megatron-core would hang
        config.split_matrix[i] = None
    cls = MockGPTDataset if settings.mock_data else GPTDataset
    sizes = dataset_sizes(settings)
    datasets = BlendedMegatronDatasetBuilder(cls, sizes, lambda: True, config).build()
    logger.info("datasets built: train %s, valid %s, test %s samples requested", *sizes)
    return list(datasets)


@dataclass
class BatchLayout:
    """Where this rank's micro-batches come from and which part of them it keeps."""

    micro_batch_size: int
    """Samples per micro-batch."""
    num_micro_batches: int
    """Micro-batches per step on each data-parallel rank."""
    dp_rank: int
    """Data-parallel rank (without SP)."""
    dp_size: int
    """Data-parallel size (without SP)."""
    sp_rank: int
    """Rank in the sequence-parallel group."""
    sp_size: int
    """Sequence-parallel group size."""
    needs_data: bool
    """False on middle pipeline stages."""
    vocab_size: Optional[int] = None
    """The tokenizer's ids: a token id at or above it stops the run (data of another tokenizer)."""
    eod_token: Optional[int] = None
    """With ``--reset-attention-mask``: the EOD id whose successors start a document."""

    @property
    def global_batch_size(self) -> int:
        return self.micro_batch_size * self.num_micro_batches * self.dp_size

    def sample_indices(self, consumed: int, micro: int) -> range:
        """Sample numbers of micro-batch ``micro`` of the step that starts at ``consumed``."""
        start = consumed + (micro * self.dp_size + self.dp_rank) * self.micro_batch_size
        return range(start, start + self.micro_batch_size)


def collate(samples: Sequence[Dict[str, object]]) -> Dict[str, torch.Tensor]:
    """Stack megatron-core sample dicts into ``[b, s]`` tensors (tokens/labels/position ids int64)."""
    out = {}
    for key in BATCH_KEYS:
        values = [torch.as_tensor(s[key]) for s in samples]
        out[key] = torch.stack(values)
    out["tokens"] = out["tokens"].long()
    out["labels"] = out["labels"].long()
    out["position_ids"] = out["position_ids"].long()
    out["loss_mask"] = out["loss_mask"].float()
    return out


def slice_batch(batch: Dict[str, torch.Tensor], sp_rank: int, sp_size: int) -> Dict[str, torch.Tensor]:
    """This SP rank's contiguous slice of every ``[b, s]`` tensor of ``batch``."""
    seq = batch["tokens"].size(1)
    start, end = sequence_slice_bounds(seq, sp_rank, sp_size)
    return {k: v[:, start:end].contiguous() for k, v in batch.items()}


def document_starts(tokens: torch.Tensor, eod_token: int) -> torch.Tensor:
    """``cu_seqlens`` int32 (on ``tokens``' device) of the packed documents of ``tokens [b, s]``.

    A document starts at every sample start and right after every EOD token (the EOD ends the
    document before it, as in Megatron's ``--reset-attention-mask``); offsets index the ``b x s``
    tokens of the samples laid end to end, first 0, last ``b * s``.
    """
    b, s = tokens.shape
    starts = torch.zeros(b, s, dtype=torch.bool, device=tokens.device)
    starts[:, 0] = True
    starts[:, 1:] = tokens[:, :-1] == eod_token
    flat = torch.nonzero(starts.reshape(-1), as_tuple=False).view(-1)
    return torch.cat([flat, flat.new_tensor([b * s])]).to(torch.int32)


def read_step(dataset, layout: BatchLayout, consumed: int, device: torch.device) -> List[Optional[dict]]:
    """Read the micro-batches of one step for this rank.

    Returns:
        ``num_micro_batches`` dicts with ``tokens, labels, loss_mask, position_ids`` of
        ``[b, s / SP]`` on ``device``, ``full_tokens`` (the count of loss tokens of the
        micro-batch's full sequences, a float) and, with ``layout.eod_token``, ``cu_seqlens``
        (:func:`document_starts` of the full sequences, on ``device``); or ``None`` entries on
        middle pipeline stages.
    """
    if not layout.needs_data:
        return [None] * layout.num_micro_batches
    batches = []
    for m in range(layout.num_micro_batches):
        indices = layout.sample_indices(consumed, m)
        full = collate([dataset[i] for i in indices])
        top = max(int(full["tokens"].max()), int(full["labels"].max()))
        if layout.vocab_size is not None and top >= layout.vocab_size:
            raise DataError(f"samples {indices.start}-{indices.stop - 1} hold token id {top} "
                            f">= the tokenizer's {layout.vocab_size} ids: the data was tokenized with another "
                            "tokenizer; pass its tokenizer flags or re-run tools/preprocess_data.py")
        local = slice_batch(full, layout.sp_rank, layout.sp_size)
        if layout.eod_token is not None:
            local["cu_seqlens"] = document_starts(full["tokens"], layout.eod_token)
        local = {k: v.to(device, non_blocking=True) for k, v in local.items()}
        local["full_tokens"] = float(full["loss_mask"].sum())
        batches.append(local)
    return batches


def global_loss_tokens(batches: List[Optional[dict]], dp_group: Optional[dist.ProcessGroup], device) -> float:
    """Loss tokens (loss-mask sum) of the whole global batch: this rank's samples summed over DP.

    Call on the ranks that read data (all ranks of one pipeline stage call it together).
    """
    local = sum(b["full_tokens"] for b in batches)
    total = torch.tensor([local], dtype=torch.float64, device=device)
    if dp_group is not None and dist.get_world_size(dp_group) > 1:
        dist.all_reduce(total, group=dp_group)
    return float(total.item())
