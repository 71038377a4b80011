"""Training with packed documents (``--reset-attention-mask``): SP layouts give the SP=1 losses.

(Every SP mode is exact with documents in tests/test_packed_sp.py; here lasp and lasp2 carry the
boundaries through the data path, the model and the schedule, and PP=2 with full recompute checks
that every stage gets them and that a recomputed layer reads its own micro-batch's.)

The data is a small corpus of short documents (3-40 tokens, EOD appended, NullTokenizer ids), so
every 64-token sample holds several documents. Micro-batch 2 exercises the "each sample packed on
its own" rule; the losses must differ from a run without the flag (the boundaries do something).
"""

from __future__ import annotations

import math

import pytest
import torch

from megatron_lasp.testing import number_docs_corpus, spawn

VOCAB = 100
RTOL = 2e-5


@pytest.fixture(scope="module")
def short_docs_prefix(tmp_path_factory):
    root = tmp_path_factory.mktemp("packed")
    return number_docs_corpus(str(root), 400, (3, 40), VOCAB), str(root / "cache")


def _argv(prefix, cache, extra):
    return [
        "--model-preset", "tiny", "--data-path", prefix, "--split", "100,0,0", "--data-cache-path", cache,
        "--tokenizer-type", "NullTokenizer", "--vocab-size", str(VOCAB), "--seq-length", "64",
        "--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", "3", "--lr", "3e-3",
        "--lr-warmup-iters", "1", "--log-interval", "2", "--eval-interval", "0", "--seed", "7",
        "--make-vocab-size-divisible-by", "64", "--eod-mask-loss",
    ] + list(extra)


def _run(rank, world_size, prefix, cache, configs):
    from megatron_lasp.training import main

    return [list(main(_argv(prefix, cache, extra), destroy=False).losses) for extra in configs]


def _assert_equal(got, want, what):
    assert len(got) == len(want) and all(math.isfinite(g) for g in got), (what, got, want)
    for i, (g, w) in enumerate(zip(got, want)):
        assert abs(g - w) <= RTOL * abs(w), f"{what}: iteration {i + 1}: {g!r} != {w!r} ({got} vs {want})"


def test_reset_attention_mask_sp_layouts_match_single_process(short_docs_prefix, tmp_path):
    prefix, cache = short_docs_prefix
    reset = ["--reset-attention-mask", "--reset-position-ids"]
    # PP builds the stages' weights differently: its runs start from a saved SP=1 step
    ckpt = str(tmp_path / "init")
    save = reset + ["--train-iters", "1", "--lr-warmup-iters", "0", "--save", ckpt]
    finetune = reset + ["--load", ckpt, "--finetune"]
    want, plain, _, want_ft = spawn(_run, 1, (prefix, cache, [reset, [], save, finetune]))[0]
    assert all(abs(a - b) > 1e-4 * abs(b) for a, b in zip(want, plain)), (
        f"--reset-attention-mask changed nothing: {want} vs {plain}")
    configs = {
        "sp2-lasp": reset + ["--sequence-parallel-size", "2", "--sequence-parallel-mode", "lasp"],
        "sp2-lasp2-mbs1": reset + ["--sequence-parallel-size", "2", "--sequence-parallel-mode", "lasp2",
                                   "--micro-batch-size", "1"],
        "pp2-recompute": finetune + ["--pipeline-model-parallel-size", "2", "--recompute-granularity", "full"],
    }
    for rank_losses in spawn(_run, 2, (prefix, cache, list(configs.values())), timeout=420):
        for name, losses in zip(configs, rank_losses):
            _assert_equal(losses, want_ft if name.startswith("pp2") else want, name)


def test_document_starts_from_eod():
    from megatron_lasp.training.data import document_starts

    eod = 9
    tokens = torch.tensor([[1, 2, 9, 3, 9, 9], [9, 4, 5, 6, 7, 9]])
    # row 0: docs start at 0, 3 (after the EOD at 2), 5, and none after the last token's EOD;
    # row 1: starts at its own start (6) and after its first token's EOD (7)
    assert document_starts(tokens, eod).tolist() == [0, 3, 5, 6, 7, 12]
    assert document_starts(tokens, eod).dtype == torch.int32
