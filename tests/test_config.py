"""The run config (``training/config.py``, ``training/arguments.py``): what the flags may ask for,
what is refused up front with a one-line error, and that nothing asked for is silently ignored."""

from __future__ import annotations

import itertools
import math

import pytest

from megatron_lasp.testing import spawn

BASE = ["--model-preset", "tiny", "--mock-data", "--seq-length", "64", "--micro-batch-size", "2",
        "--train-iters", "1", "--eval-interval", "0", "--log-interval", "1", "--make-vocab-size-divisible-by", "64"]


def _refusal(argv):
    """The one-line ArgumentError of ``argv`` (parse + model config), or None if accepted."""
    from megatron_lasp.training.arguments import ArgumentError, parse_config
    from megatron_lasp.training.loop import model_config_from_run

    try:
        model_config_from_run(parse_config(argv))
    except ArgumentError as err:
        return str(err)
    return None


# ----------------------------------------------------------------------------------------------
# recompute: every combination works or is refused before anything runs

_RECOMPUTE_AXES = {
    "granularity": [None, "full", "selective"],
    "method": [None, "uniform", "block"],
    "layers": [None, "0", "1", "2", "3"],
    "chunk": [None, "32"],
    "modules": [None, "core_attn", "elementwise"],
}


def _recompute_argv(granularity, method, layers, chunk, modules, pp=None):
    argv = list(BASE)
    for flag, value in (("--recompute-granularity", granularity), ("--recompute-method", method),
                        ("--recompute-num-layers", layers), ("--recompute-chunk-size", chunk),
                        ("--recompute-modules", modules), ("--pipeline-model-parallel-size", pp)):
        if value is not None:
            argv += [flag, value]
    return argv


def _recompute_combinations():
    """(combination, argv, refusal or None) for every combination of the axes (tiny: 2 layers)."""
    out = []
    for combo in itertools.product(*_RECOMPUTE_AXES.values()):
        argv = _recompute_argv(*combo)
        out.append((combo, argv, _refusal(argv)))
    return out


def _train_each(rank, world_size, argvs):
    from megatron_lasp.training import main

    return [list(main(argv, destroy=False).losses) for argv in argvs]


def test_every_recompute_combination_runs_or_is_refused():
    results = _recompute_combinations()
    accepted = [(combo, argv) for combo, argv, refusal in results if refusal is None]
    for combo, _, refusal in results:
        if refusal is not None:
            assert "\n" not in refusal and "--recompute" in refusal, (combo, refusal)
    refused = {combo: refusal for combo, _, refusal in results}
    # megatron-core loops forever on zero layers per unit, and runs past the last layer when the
    # count does not divide them: both are refused at parse time, naming the flag
    assert "--recompute-num-layers must be positive, got 0" in refused[("full", "uniform", "0", None, None)]
    assert "must divide the layers per pipeline stage (2)" in refused[("full", "uniform", "3", None, None)]
    assert "must be at most the layers per pipeline stage (2)" in refused[("full", "block", "3", None, None)]
    assert "needs --recompute-granularity full" in refused[(None, None, "1", None, None)]
    assert refused[("full", "block", "1", None, None)] is None and refused[("full", None, None, "32", None)] is None
    # each accepted combination trains (one step, finite loss); the flags reach the model the same
    # way whatever else is set, so one run per distinct set of accepted flags
    assert 8 <= len(accepted) <= 20, [c for c, _ in accepted]
    (losses,) = spawn(_train_each, 1, ([argv for _, argv in accepted],), timeout=600)
    for (combo, _), run in zip(accepted, losses):
        assert len(run) == 1 and math.isfinite(run[0]), (combo, run)


def test_recompute_layers_count_per_pipeline_stage():
    # 2 layers over 2 stages: 1 layer per stage, so 2 per recompute unit does not divide
    argv = _recompute_argv("full", "uniform", "2", None, None, pp="2")
    assert "must divide the layers per pipeline stage (1)" in _refusal(argv)
    assert _refusal(_recompute_argv("full", "uniform", "1", None, None, pp="2")) is None
