"""Hybrid models through the training loop: flags, sequence parallelism, recompute, checkpoints.

``pretrain_linear_lm``'s ``main`` on a tiny hybrid (``--hybrid-layer-pattern L*``, GQA) gives the
single-process losses at SP 2 (each softmax mode, with lasp / lasp2) and TP 2 with TP sequence
parallelism, with the chunked recompute and offloading of layer inputs and under
``--deterministic-mode``, and resumes from a
checkpoint to the same losses; the checkpoint (saved per layer) loads at PP 2 and TP 2 to the
single-process losses; a checkpoint of another pattern is refused with the flag named.
"""

import math

import pytest

from megatron_lasp.testing import spawn

BASE = [
    "--model-preset", "tiny", "--hybrid-layer-pattern", "L*", "--num-query-groups", "2", "--mock-data",
    "--seq-length", "64", "--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", "3",
    "--lr", "3e-3", "--lr-warmup-iters", "1", "--log-interval", "2", "--eval-interval", "0", "--seed", "7",
    "--make-vocab-size-divisible-by", "64",
]
RTOL = 2e-5


def _run(rank, world_size, configs):
    import contextlib
    import io

    from megatron_lasp.training import main

    out = []
    for extra in configs:
        err = io.StringIO()
        try:
            with contextlib.redirect_stderr(err):
                out.append(list(main(BASE + list(extra), destroy=False).losses))
        except (Exception, SystemExit) as e:  # a refused configuration: its message
            out.append(f"{type(e).__name__}: {e} {err.getvalue()}")
    import torch

    # --deterministic-mode is the run's own: torch's global flag is back to off after it
    return out + [torch.are_deterministic_algorithms_enabled()]


def _close(got, want, what):
    assert isinstance(got, list), (what, got)
    assert len(got) == len(want), (what, got, want)
    for i, (g, w) in enumerate(zip(got, want)):
        assert math.isfinite(g) and abs(g - w) <= RTOL * abs(w), f"{what}: iteration {i + 1}: {got} vs {want}"


def test_hybrid_training_layouts_recompute_and_resume(tmp_path):
    ckpt = str(tmp_path / "ckpt")
    single = {
        "plain": [],
        "deterministic": ["--deterministic-mode"],
        "chunked-recompute": ["--recompute-granularity", "full", "--recompute-chunk-size", "16"],
        "offload": ["--recompute-granularity", "full", "--cpu-offloading"],
        "save-2": ["--save", ckpt, "--save-interval", "2", "--exit-interval", "2"],
        "resume-3": ["--load", ckpt],
        "other-pattern": ["--load", ckpt, "--hybrid-layer-pattern", "*L"],
        "finetune": ["--load", ckpt, "--finetune"],
    }
    (runs,) = spawn(_run, 1, (list(single.values()),), timeout=600)
    got = dict(zip(single, runs))
    assert runs[len(single)] is False, "torch's deterministic flag stayed on after a --deterministic-mode run"
    want = got["plain"]
    assert isinstance(want, list) and len(set(want)) == 3, want
    _close(got["deterministic"], want, "--deterministic-mode")
    _close(got["chunked-recompute"], want, "chunked recompute")
    _close(got["offload"], want, "offloading")
    _close(got["save-2"], want[:2], "first two iterations")
    _close(got["resume-3"], want[2:], "resumed third iteration")
    assert "hybrid_layer_pattern" in str(got["other-pattern"]) and "--hybrid-layer-pattern" in str(
        got["other-pattern"]), got["other-pattern"]
    layouts = {
        "sp2-lasp-allgather": ["--sequence-parallel-size", "2"],
        "sp2-lasp2-ulysses": ["--sequence-parallel-size", "2", "--sequence-parallel-mode", "lasp2",
                              "--softmax-sequence-parallel-mode", "ulysses"],
        "sp2-chunked": ["--sequence-parallel-size", "2", "--recompute-granularity", "full",
                        "--recompute-chunk-size", "16"],
        "tp2-sp": ["--tensor-model-parallel-size", "2", "--sequence-parallel"],
        # the pipeline draws its init in another order: both stages start from the saved weights
        "pp2-finetune": ["--load", ckpt, "--finetune", "--pipeline-model-parallel-size", "2"],
        "tp2-finetune": ["--load", ckpt, "--finetune", "--tensor-model-parallel-size", "2"],
    }
    for rank_runs in spawn(_run, 2, (list(layouts.values()),), timeout=600):
        for name, losses in zip(layouts, rank_runs):
            _close(losses, got["finetune"] if name.endswith("finetune") else want, name)
