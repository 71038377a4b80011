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


# ----------------------------------------------------------------------------------------------
# ranges and help: one-line errors at parse time, each default shown once


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--hidden-dropout", "1.5"], "--hidden-dropout must be in [0, 1), got 1.5"),
        (["--adam-beta2", "1"], "--adam-beta2 must be in [0, 1), got 1.0"),
        (["--init-method-std", "-0.1"], "--init-method-std must be a finite number >= 0, got -0.1"),
        (["--micro-batch-size", "0"], "--micro-batch-size must be positive, got 0"),
        (["--num-layers", "0"], "--num-layers must be positive, got 0"),
        (["--ffn-hidden-size", "0"], "--ffn-hidden-size must be positive, got 0"),
        (["--distributed-timeout-minutes", "0"], "--distributed-timeout-minutes must be positive, got 0"),
        (["--exit-duration-in-mins", "0"], "--exit-duration-in-mins must be a finite number > 0, got 0.0"),
        (["--lr", "nan"], "--lr must be a finite number >= 0, got nan"),
        (["--seed", "-1"], "--seed must be >= 0, got -1"),
        (["--mock-data", "--data-path", "0", "a"], "blend weights must be finite numbers > 0, got 0"),
    ],
    ids=["dropout", "beta2", "std", "mbs", "layers", "ffn", "timeout", "duration", "lr-nan", "seed", "blend-zero"],
)
def test_numeric_flags_are_range_checked_at_parse_time(extra, needle):
    from megatron_lasp.training.arguments import ArgumentError, parse_config

    argv = [a for a in BASE if a != "--mock-data"] if "--data-path" in extra else BASE
    with pytest.raises(ArgumentError) as info:
        parse_config(argv + [a for a in extra if not ("--data-path" in extra and a == "--mock-data")])
    assert needle in str(info.value) and "\n" not in str(info.value), str(info.value)


def test_directory_flags_under_a_file_are_refused(tmp_path):
    from megatron_lasp.training.arguments import ArgumentError, parse_config

    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    for flag in ("--save", "--data-cache-path", "--tensorboard-dir"):
        with pytest.raises(ArgumentError, match=f"{flag} .*: .*a_file is a file, not a directory"):
            parse_config(BASE + [flag, str(blocker / "sub")])
    with pytest.raises(ArgumentError, match="--save .*a_file is a file; give a directory"):
        parse_config(BASE + ["--save", str(blocker)])


def test_help_shows_each_default_once():
    from megatron_lasp.training.arguments import build_parser

    parser = build_parser()
    formatter = parser._get_formatter()
    for action in parser._actions:
        if not action.option_strings or action.dest == "help":
            continue
        text = formatter._expand_help(action) if action.help else ""
        if "(default: " in text:  # added by the formatter: the help must not state it as well
            assert text.count("default") == 1, (action.option_strings, text)
        assert "(default: None)" not in text and "(default: False)" not in text, (action.option_strings, text)
        if action.nargs == 0:  # switches: a default of True/False says nothing
            assert "(default: True)" not in text, (action.option_strings, text)
    text = parser.format_help()
    assert "(default: 3e-4)" in text.replace("0.0003", "3e-4")  # values still shown where they say something
    assert "needed when TP/PP/SP/DP sizes" not in text


# ----------------------------------------------------------------------------------------------
# asked-for but impossible: refused, never silently ignored


def test_evaluation_without_a_validation_share_is_refused():
    from megatron_lasp.training.arguments import ArgumentError, parse_config

    base = [a for a in BASE]
    i = base.index("--eval-interval")
    base[i + 1] = "5"
    with pytest.raises(ArgumentError, match=r"--eval-interval 5 asks for evaluation, but --split 100,0,0"):
        parse_config(base + ["--split", "100,0,0"])
    no_eval = base[:i] + base[i + 2:]
    config = parse_config(no_eval + ["--split", "100,0,0"])  # not asked for: a warning, no error
    assert config.logging.eval_interval == 1000
    assert parse_config(base + ["--split", "98,2,0"]).logging.eval_interval == 5


def _startup_errors(rank, world_size, cases):
    from megatron_lasp.training import main
    from megatron_lasp.training.loop import StartupError

    out = {}
    for name, argv in cases:
        try:
            state = main(argv, destroy=False)
            out[name] = ("ok", list(state.losses))
        except StartupError as err:
            out[name] = ("startup", err.message)
    return out


def _corpus(tmp_path, append_eod):
    from megatron_lasp.data.preprocess import PreprocessConfig, preprocess_data

    src = tmp_path / "docs.jsonl"
    src.write_text("".join('{"text": "document number %d, some text"}\n' % i for i in range(200)))
    name = "eod" if append_eod else "noeod"
    return preprocess_data(PreprocessConfig(str(src), str(tmp_path / name), {"tokenizer_type": "ByteLevelTokenizer"},
                                            append_eod=append_eod)).output_prefixes["text"]


def test_reset_attention_mask_needs_eod_tokens(tmp_path):
    data = [a for a in BASE if a != "--mock-data"] + ["--tokenizer-type", "ByteLevelTokenizer", "--split", "100,0,0",
                                                     "--data-cache-path", str(tmp_path / "cache"),
                                                     "--reset-attention-mask"]
    cases = [("noeod", data + ["--data-path", _corpus(tmp_path, False)]),
             ("eod", data + ["--data-path", _corpus(tmp_path, True)])]
    (r,) = spawn(_startup_errors, 1, (cases,), timeout=300)
    assert r["noeod"][0] == "startup" and "holds no EOD token" in r["noeod"][1], r["noeod"]
    assert "--append-eod" in r["noeod"][1] and "drop --reset-attention-mask" in r["noeod"][1]
    assert r["eod"][0] == "ok" and len(r["eod"][1]) == 1, r["eod"]


# ----------------------------------------------------------------------------------------------
# no run overwrites checkpoints it did not write


def _tree(root):
    import os

    out = {}
    for dirpath, _, files in os.walk(root):
        for f in files:
            path = os.path.join(dirpath, f)
            out[os.path.relpath(path, root)] = os.path.getmtime(path), os.path.getsize(path)
    return out


def test_finetune_and_branching_into_load_dir_are_refused(tmp_path):
    d = str(tmp_path / "run")
    same = ["--load", d, "--save", d]
    cases = [("pretrain", BASE + ["--train-iters", "3", "--save", d, "--save-interval", "1"])]
    spawn(_startup_errors, 1, (cases,), timeout=300)
    before = _tree(d)
    assert {"iter_0000001", "iter_0000003"} <= {k.split("/")[0] for k in before}
    cases = [
        ("finetune", BASE + same + ["--finetune", "--train-iters", "3"]),
        ("branch", BASE + same + ["--ckpt-step", "1", "--train-iters", "3"]),
        ("latest", BASE + same + ["--ckpt-step", "3", "--train-iters", "4", "--lr-decay-iters", "3"]),  # continues the latest: allowed
    ]
    (r,) = spawn(_startup_errors, 1, (cases,), timeout=300)
    assert r["finetune"][0] == "startup", r["finetune"]
    assert "--finetune restarts at iteration 0" in r["finetune"][1] and "iterations 1, 2, 3" in r["finetune"][1]
    assert "--overwrite-checkpoints" in r["finetune"][1] and "another --save" in r["finetune"][1]
    assert r["branch"][0] == "startup" and "--ckpt-step 1 branches" in r["branch"][1], r["branch"]
    assert "iterations 2, 3" in r["branch"][1]
    assert r["latest"][0] == "ok" and len(r["latest"][1]) == 1, r["latest"]
    after = _tree(d)
    assert {k: v for k, v in after.items() if k in before and "iter_0000004" not in k and "latest" not in k} == {
        k: v for k, v in before.items() if "latest" not in k}
    (r,) = spawn(_startup_errors, 1, ([("allowed", BASE + same + ["--finetune", "--train-iters", "2",
                                                                   "--overwrite-checkpoints"])],), timeout=300)
    assert r["allowed"][0] == "ok" and len(r["allowed"][1]) == 2, r["allowed"]
    with open(f"{d}/latest_checkpointed_iteration.txt") as f:
        assert f.read().strip() == "2"


# ----------------------------------------------------------------------------------------------
# stopping: signals, time limits, Ctrl-C, torchrun


def test_exit_duration_saves_and_stops(tmp_path):
    d = str(tmp_path / "run")
    cases = [("timed", BASE + ["--train-iters", "50", "--save", d, "--exit-duration-in-mins", "1e-6"])]
    (r,) = spawn(_startup_errors, 1, (cases,), timeout=300)
    assert r["timed"][0] == "ok" and len(r["timed"][1]) == 1, r["timed"]  # stopped after the first step
    with open(f"{d}/latest_checkpointed_iteration.txt") as f:
        assert f.read().strip() == "1"


def _cli(argv, tmp_path, signum=None, launcher=None):
    """Run the CLI (optionally under a launcher); send ``signum`` once it logs an iteration.
    Returns (exit status, stdout, stderr lines that are not Python warnings)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cmd = [sys.executable] + (launcher or []) + [os.path.join(repo, "pretrain_linear_lm.py")] + argv
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", PYTHONPATH=repo)
    out_path, err_path = tmp_path / "stdout.txt", tmp_path / "stderr.txt"
    with open(out_path, "w") as out, open(err_path, "w") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env, cwd=str(tmp_path))
        if signum is not None:
            deadline = time.time() + 240
            while " iteration " not in out_path.read_text() and proc.poll() is None and time.time() < deadline:
                time.sleep(0.2)
            proc.send_signal(signum)
        code = proc.wait(timeout=300)
    lines = [ln for ln in err_path.read_text().splitlines() if ln.strip()]
    return code, out_path.read_text(), lines


def _launcher():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return ["-m", "megatron_lasp.training.launch", "--nproc-per-node", "2", "--master-port", str(port)]


def test_exit_signal_handler_saves_and_exits_zero(tmp_path):
    """Without a launcher the run exits 0; under torchrun (forwarding SIGTERM to both workers, SP 2)
    both ranks save the same iteration and the launcher says so in one line."""
    import signal

    d = tmp_path / "run"
    argv = BASE + ["--train-iters", "100000", "--save", str(d), "--exit-signal-handler"]
    code, out, err = _cli(argv, tmp_path, signal.SIGTERM)
    assert code == 0, (code, out[-2000:], err)
    saved = int((d / "latest_checkpointed_iteration.txt").read_text())
    assert 1 <= saved < 100000 and f"exiting at iteration {saved}: received SIGTERM" in out, out[-2000:]

    d2 = tmp_path / "run2"
    argv = BASE + ["--train-iters", "100000", "--save", str(d2), "--exit-signal-handler", "--sequence-parallel-size", "2"]
    code, out, err = _cli(argv, tmp_path, signal.SIGTERM, launcher=_launcher())
    assert code == 128 + signal.SIGTERM, (code, err)
    saved = int((d2 / "latest_checkpointed_iteration.txt").read_text())
    assert f"exiting at iteration {saved}: received SIGTERM" in out, out[-2000:]
    assert sorted(p.name for p in (d2 / f"iter_{saved:07d}").glob("__*_0.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    ours = [ln for ln in err if ln.startswith("launch:")]
    assert len(ours) == 1 and "SIGTERM" in ours[0] and not any("Traceback" in ln for ln in err), err


def test_ctrl_c_without_the_handler_is_one_line(tmp_path):
    import signal

    code, out, err = _cli(BASE + ["--train-iters", "100000"], tmp_path, signal.SIGINT)
    assert code == 130, (code, err)
    assert len(err) == 1 and "interrupted" in err[0] and "--exit-signal-handler" in err[0], err
    assert "Traceback" not in out


def test_launcher_reports_a_clean_error_in_one_line(tmp_path):
    """Under ``python -m megatron_lasp.training.launch`` (torchrun's flags) a bad flag on 2 workers is
    one line and exit status 2, not torchrun's ChildFailedError report."""
    launcher = _launcher()
    code, out, err = _cli(BASE + ["--eval-interval", "5", "--split", "100,0,0"], tmp_path, launcher=launcher)
    errors = [ln for ln in err if "error" in ln.lower()]
    assert code == 2, (code, err)
    assert len(errors) == 1 and "--eval-interval 5 asks for evaluation" in errors[0], err
    assert not any("ChildFailedError" in ln or "Traceback" in ln for ln in err), err


# ----------------------------------------------------------------------------------------------
# a readable start-up


def test_megatron_core_start_up_notes_are_condensed():
    import logging
    import warnings

    from megatron_lasp.training.logging_utils import MegatronCoreLogFilter, quiet_megatron_core

    def record(name, level, msg):
        return logging.LogRecord(name, level, __file__, 1, msg, (), None)

    keep = MegatronCoreLogFilter()
    dump = record("megatron.core.datasets.blended_megatron_dataset_builder", logging.INFO,
                  "Building GPTDataset splits with sizes=[48, 24, 8] and config=GPTDatasetConfig(" + "x" * 1500 + ")")
    assert keep.filter(dump) and dump.getMessage() == "Building GPTDataset splits with sizes=[48, 24, 8]"
    assert not keep.filter(record("megatron.core.datasets.indexed_dataset", logging.INFO, "\tExtract the sequence lengths"))
    assert not keep.filter(record("megatron.core.distributed.fsdp.src.megatron_fsdp.mixed_precision", logging.INFO,
                                  "Using Megatron-FSDP without Transformer Engine."))
    assert keep.filter(record("megatron.core.datasets.gpt_dataset", logging.INFO, "Build and save the GPTDataset train indices"))
    assert not keep.filter(record("megatron.core.datasets.gpt_dataset", logging.INFO, "\tLoad the sample index from x.npy"))
    # warnings, our own records and megatron-core's other notes pass unchanged
    assert keep.filter(record("megatron.core.datasets.indexed_dataset", logging.WARNING, "something odd"))
    assert keep.filter(record("megatron_lasp.training.loop", logging.INFO, "training: 3 iterations"))
    assert keep.filter(record("megatron.core.optimizer_param_scheduler", logging.INFO, "> learning rate decay style"))
    handlers = {h: list(h.filters) for h in logging.getLogger().handlers}
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            quiet_megatron_core()
            warnings.warn("Transformer Engine and Apex are not installed. Falling back to Torch optimizers.",
                          UserWarning)
            warnings.warn("Apex is not installed. Falling back to Torch Norm", UserWarning)
            warnings.warn("something else", UserWarning)
        assert [str(w.message) for w in caught] == ["something else"]
    finally:
        for handler, filters in handlers.items():
            handler.filters[:] = filters


# ----------------------------------------------------------------------------------------------
# CUDA graphs: what a captured step cannot hold is refused up front

GRAPH = ["--cuda-graph-impl", "local", "--cuda-graph-scope", "full_iteration"]


def test_cuda_graph_flags_are_checked():
    import dataclasses

    from megatron_lasp.training.arguments import ArgumentError, parse_config

    replace = dataclasses.replace
    with pytest.raises(ArgumentError, match="--cuda-graph-impl local captures CUDA graphs and needs a GPU"):
        parse_config(BASE + GRAPH)
    config = parse_config(BASE)
    assert config.training.cuda_graph_impl == "none" and not config.training.cuda_graphs
    with pytest.raises(ArgumentError, match="add --cuda-graph-scope full_iteration"):
        replace(config.training, cuda_graph_impl="local")
    with pytest.raises(ArgumentError, match="--cuda-graph-scope needs --cuda-graph-impl local"):
        replace(config.training, cuda_graph_scope="full_iteration")
    with pytest.raises(ArgumentError, match="fp16's dynamic loss scale"):
        replace(config.training, cuda_graph_impl="local", cuda_graph_scope="full_iteration", fp16=True)
    graph = replace(config.training, cuda_graph_impl="local", cuda_graph_scope="full_iteration")
    parallel = replace(config.parallel, ddp_impl="megatron")
    assert replace(config, training=graph, parallel=parallel).training.cuda_graphs  # the default path: accepted
    refusals = [
        (dict(parallel=config.parallel), "--ddp-impl torch"),
        (dict(parallel=replace(parallel, pipeline_model_parallel_size=2)), "--pipeline-model-parallel-size > 1"),
        (dict(parallel=replace(parallel, context_parallel_size=2)), "--sequence-parallel-size > 1"),
        (dict(parallel=parallel, memory=replace(config.memory, recompute_granularity="full", cpu_offloading=True)),
         "--cpu-offloading"),
        (dict(parallel=parallel, data=replace(config.data, reset_attention_mask=True)), "--reset-attention-mask"),
        (dict(parallel=parallel, model=replace(config.model, hidden_dropout=0.1)), "--hidden-dropout > 0"),
    ]
    for change, needle in refusals:
        with pytest.raises(ArgumentError) as info:
            replace(config, training=graph, **{"parallel": parallel, **change})
        message = str(info.value)
        assert message.startswith("--cuda-graph-impl local cannot capture a step with " + needle), message
        assert "\n" not in message, message
    with pytest.raises(ArgumentError, match="--cuda-graph-warmup-steps must be positive, got 0"):
        parse_config(BASE + ["--cuda-graph-warmup-steps", "0"])


# ----------------------------------------------------------------------------------------------
# --record-memory-history (Megatron-LM's flag): GPU only, the snapshot path checked up front


def test_memory_history_flags_are_checked(monkeypatch, tmp_path):
    from megatron_lasp.training import arguments
    from megatron_lasp.training.arguments import ArgumentError, parse_config

    monkeypatch.setattr(arguments, "default_on_gpu", lambda: False)
    with pytest.raises(ArgumentError, match="^--record-memory-history records the CUDA caching allocator and needs a GPU"):
        parse_config(BASE + ["--record-memory-history"])
    with pytest.raises(ArgumentError, match="^--memory-snapshot-path names where --record-memory-history writes"):
        parse_config(BASE + ["--memory-snapshot-path", str(tmp_path / "s.pickle")])
    assert not parse_config(BASE).logging.record_memory_history
    # on a GPU host (gloo and torch DDP: no device needed to parse)
    monkeypatch.setattr(arguments, "default_on_gpu", lambda: True)
    gpu = BASE + ["--ddp-impl", "torch", "--distributed-backend", "gloo", "--record-memory-history"]
    assert parse_config(gpu).logging.memory_snapshot_path == "snapshot.pickle"
    target = tmp_path / "new" / "run.pickle"
    assert parse_config(gpu + ["--memory-snapshot-path", str(target)]).logging.memory_snapshot_path == str(target)
    with pytest.raises(ArgumentError, match="is a directory; give a file path, e.g. .*snapshot.pickle$"):
        parse_config(gpu + ["--memory-snapshot-path", str(tmp_path)])
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(ArgumentError, match="is a file, not a directory"):
        parse_config(gpu + ["--memory-snapshot-path", str(blocker / "s.pickle")])
    assert blocker.read_text() == "x"


def _memory_history_calls(rank, world_size, path, fail_at=None):
    """A CPU run with --record-memory-history, the GPU check bypassed and the recorder replaced by
    one that logs its calls (the real one: tests/test_gpu.py); ``fail_at``: the step that raises
    (as running out of memory would), and the final dump fails too."""
    from megatron_lasp.training import arguments, logging_utils, loop, main

    calls = []
    step = loop.train_step

    def failing_step(state):
        if state.iteration + 1 == fail_at:
            raise RuntimeError("CUDA out of memory (simulated)")
        return step(state)

    loop.train_step = failing_step

    class Recorder:
        def __init__(self, p):
            calls.append(("start", p))

        def dump(self):
            calls.append("dump")
            if fail_at and len(calls) > 2:
                raise OSError("disk full (simulated)")

        def stop(self):
            calls.append("stop")

    arguments.default_on_gpu = lambda: True
    logging_utils.MemoryHistory = Recorder
    try:
        main(BASE + ["--train-iters", "3", "--ddp-impl", "torch", "--distributed-backend", "gloo", "--kernel-backend",
                     "torch", "--cross-entropy-kernel", "torch", "--record-memory-history", "--memory-snapshot-path",
                     path])
    except RuntimeError as err:
        calls.append(str(err))
    return calls


def test_memory_history_is_written_at_each_log_line_and_at_the_end(tmp_path):
    path = str(tmp_path / "run.pickle")
    calls = spawn(_memory_history_calls, 1, (path,), timeout=300, init_process_group=False)[0]
    assert calls == [("start", path), "dump", "dump", "dump", "dump", "stop"], calls
    # a run ended by an error still writes its snapshot; a failing write does not hide the error
    calls = spawn(_memory_history_calls, 1, (path, 2), timeout=300, init_process_group=False)[0]
    assert calls == [("start", path), "dump", "dump", "stop", "CUDA out of memory (simulated)"], calls
