"""Runs that cannot lose work or train on garbage: every bad input ends in one line and exit 2.

Most scenarios run in one spawned process, one after another (``main`` in-process, the process
groups re-created between runs); the parent prepares the directories and checks that nothing
was written or deleted. Tiny model, mock data unless the test is about real data.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from megatron_lasp.testing import spawn

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYTHON = sys.executable

BASE = [
    "--model-preset", "tiny", "--mock-data", "--seq-length", "32", "--micro-batch-size", "2",
    "--global-batch-size", "2", "--train-iters", "2", "--lr", "3e-3", "--log-interval", "1",
    "--eval-interval", "0", "--seed", "5", "--make-vocab-size-divisible-by", "64",
]
LOCK = ".megatron_lasp.lock"


def _run_cases(rank, world_size, cases):
    """``main(argv)`` for each case: ("ok", losses) / ("startup", code, message) / ("training", message)."""
    from megatron_lasp.training import TrainingError, main
    from megatron_lasp.training.loop import StartupError

    out = {}
    for name, argv in cases:
        try:
            out[name] = ("ok", list(main(list(argv), destroy=False).losses))
        except StartupError as err:
            out[name] = ("startup", err.code, err.message)
        except TrainingError as err:
            out[name] = ("training", str(err))
    return out


def _snapshot(root):
    """{relative path: sha256} of every file under ``root`` (to prove nothing changed)."""
    out = {}
    for dirpath, _, files in os.walk(root):
        for f in files:
            p = os.path.join(dirpath, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, root)] = hashlib.sha256(fh.read()).hexdigest()
    return out


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A checkpoint directory with iterations 1 and 2 (tracker at 2)."""
    root = str(tmp_path_factory.mktemp("ckpt") / "run")
    (res,) = spawn(_run_cases, 1, ([("save", BASE + ["--save", root, "--save-interval", "1"])],))
    assert res["save"][0] == "ok", res
    return root


def _copy(ckpt, tmp_path, name):
    dst = str(tmp_path / name)
    shutil.copytree(ckpt, dst)
    return dst


def test_checkpoint_misuse_is_refused_and_recoverable(ckpt, tmp_path):
    d = {n: _copy(ckpt, tmp_path, n) for n in ("notracker", "occupied", "locked", "stale", "sched", "damaged",
                                                "nocommon", "weights", "done")}
    os.remove(os.path.join(d["notracker"], "latest_checkpointed_iteration.txt"))
    with open(os.path.join(d["stale"], LOCK), "w") as f:
        f.write("999999999 some-host-that-died\n")
    shard = sorted(x for x in os.listdir(os.path.join(d["damaged"], "iter_0000002")) if x.endswith(".distcp"))[0]
    shard_path = os.path.join(d["damaged"], "iter_0000002", shard)
    with open(shard_path, "r+b") as f:
        f.truncate(100)
    os.remove(os.path.join(d["nocommon"], "iter_0000002", "common.pt"))
    cfg_path = os.path.join(d["weights"], "iter_0000002", "config.json")
    cfg = json.load(open(cfg_path))
    cfg.update(weights_only=True, converted_from="/somewhere/hf")
    json.dump(cfg, open(cfg_path, "w"))
    empty = tmp_path / "empty"
    empty.mkdir()
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    before = {k: _snapshot(v) for k, v in d.items()}

    from megatron_lasp.checkpoint.lock import SaveLock

    held = SaveLock(d["locked"]).acquire()  # another "run" holds --save
    try:
        resume = lambda name, *extra: BASE + ["--load", d[name], "--save", d[name], *extra]  # noqa: E731
        cases = [
            ("notracker", resume("notracker", "--train-iters", "3", "--lr-decay-iters", "2")),
            ("occupied", BASE + ["--save", d["occupied"]]),
            ("locked", resume("locked")),
            ("stale", resume("stale", "--train-iters", "3", "--lr-decay-iters", "2")),
            ("sched", resume("sched", "--train-iters", "4")),
            ("sched_lr", resume("sched", "--lr", "1e-3")),
            ("damaged", resume("damaged")),
            ("nocommon", resume("nocommon")),
            ("ckpt_step", resume("damaged", "--ckpt-step", "7")),
            ("empty_load", BASE + ["--load", str(empty)]),
            ("unwritable", BASE + ["--save", str(blocker / "sub")]),
            ("weights", BASE + ["--load", d["weights"], "--train-iters", "3"]),
            ("done", resume("done")),
        ]
        (r,) = spawn(_run_cases, 1, (cases,), timeout=300)
    finally:
        held.release()
    after = {k: _snapshot(v) for k, v in d.items()}

    def startup(name, *needles):
        assert r[name][:2] == ("startup", 2), (name, r[name])
        msg = r[name][2]
        assert "\n" not in msg and all(n in msg for n in needles), (name, msg)

    # tracker lost after the rename: resumes from the newest complete iteration, overwrites nothing
    assert r["notracker"][0] == "ok" and len(r["notracker"][1]) == 1, r["notracker"]
    assert open(os.path.join(d["notracker"], "latest_checkpointed_iteration.txt")).read().strip() == "3"
    assert {k: v for k, v in after["notracker"].items() if k in before["notracker"]} == before["notracker"]
    startup("occupied", "already holds checkpoints (iterations 1, 2)", f"--load {d['occupied']}")
    startup("locked", "in use by another run", f"pid {os.getpid()}")
    assert r["stale"][0] == "ok" and not os.path.exists(os.path.join(d["stale"], LOCK)), r["stale"]
    startup("sched", "--lr-decay-iters (default --train-iters) 2 -> 4", "--override-opt-param-scheduler",
            "--use-checkpoint-opt-param-scheduler")
    startup("sched_lr", "--lr 0.003 -> 0.001")
    startup("damaged", shard_path, "truncated", ": 1 (choose one with --ckpt-step)")
    startup("nocommon", "common.pt is missing", ": 1 (choose one with --ckpt-step)")
    startup("ckpt_step", "--ckpt-step 7", "saved iterations: 1, 2")
    startup("empty_load", "holds no checkpoint", "drop --load")
    startup("unwritable", "is a file, not a directory", "--save")
    assert not (blocker / "sub").exists()
    # a converted (weights-only) checkpoint without --finetune: weights loaded, starts at iteration 0
    assert r["weights"][0] == "ok" and len(r["weights"][1]) == 3, r["weights"]
    assert r["done"] == ("ok", []), r["done"]
    for name in ("occupied", "locked", "sched", "damaged", "nocommon", "weights", "done"):
        assert after[name] == before[name], f"{name}: files changed"
    assert not os.path.exists(os.path.join(d["locked"], LOCK))


def test_schedule_override_flags(ckpt, tmp_path):
    d = _copy(ckpt, tmp_path, "sched")
    resume = BASE + ["--load", d, "--save", d, "--train-iters", "3"]
    cases = [("override", resume + ["--override-opt-param-scheduler"]),
             ("keep", resume + ["--use-checkpoint-opt-param-scheduler", "--train-iters", "4",
                                "--save", str(tmp_path / "other"), "--load", d])]
    (r,) = spawn(_run_cases, 1, (cases,))
    assert r["override"][0] == "ok" and len(r["override"][1]) == 1, r
    assert r["keep"][0] == "ok" and len(r["keep"][1]) == 1, r  # resumed from 3 (the override's save)


def _two_rank_lock(rank, world_size, save):
    return _run_cases(rank, world_size, [("locked", BASE + ["--global-batch-size", "4", "--save", save])])


def test_lock_refusal_is_agreed_by_every_rank(tmp_path):
    from megatron_lasp.checkpoint.lock import SaveLock

    save = str(tmp_path / "busy")
    held = SaveLock(save).acquire()
    try:
        results = spawn(_two_rank_lock, 2, (save,))
    finally:
        held.release()
    for r in results:
        assert r["locked"][:2] == ("startup", 2) and "in use by another run" in r["locked"][2], results


# ----------------------------------------------------------------------------------------------
# data


def _dataset(tmp_path, name, texts, tokenizer, force=False):
    from megatron_lasp.data.preprocess import PreprocessConfig, preprocess_data

    src = tmp_path / f"{name}.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return preprocess_data(PreprocessConfig(str(src), str(tmp_path / name), tokenizer, append_eod=True,
                                            force=force)).output_prefixes["text"]


def test_data_problems_are_one_line(tmp_path):
    byte = {"tokenizer_type": "ByteLevelTokenizer"}
    small = _dataset(tmp_path, "small", [f"document number {i} " * 3 for i in range(300)], byte)
    other = _dataset(tmp_path, "other", [f"other text {i}" for i in range(50)], byte)
    null = _dataset(tmp_path, "null", [" ".join(str(900 + j) for j in range(40)) for _ in range(20)],
                    {"tokenizer_type": "NullTokenizer", "vocab_size": 1000})
    foreign = str(tmp_path / "foreign_text_document")
    shutil.copy(small + ".bin", foreign + ".bin")
    shutil.copy(other + ".idx", foreign + ".idx")
    truncated = str(tmp_path / "trunc_text_document")
    shutil.copy(small + ".bin", truncated + ".bin")
    shutil.copy(small + ".idx", truncated + ".idx")
    with open(truncated + ".bin", "r+b") as f:
        f.truncate(os.path.getsize(small + ".bin") - 10)
    cache = str(tmp_path / "cache")
    no_cache = [a for a in BASE if a != "--mock-data"] + ["--tokenizer-type", "ByteLevelTokenizer"]
    real = no_cache + ["--data-cache-path", cache]
    (tmp_path / "a_file").write_text("")
    beside_file = tmp_path / "beside"  # the default cache, index-cache/ next to the data, is a file there
    beside_file.mkdir()
    shutil.copy(small + ".bin", beside_file / "d.bin")
    shutil.copy(small + ".idx", beside_file / "d.idx")
    (beside_file / "index-cache").write_text("")
    cases = [
        ("cache_in_file", real + ["--data-path", small, "--data-cache-path", str(tmp_path / "a_file" / "c")]),
        ("default_cache_file", no_cache + ["--data-path", str(beside_file / "d")]),
        # 300 documents, the default --split 969,30,1: the test split is empty and unused -> skipped
        ("default_split", real + ["--data-path", small, "--eval-interval", "1", "--eval-iters", "1"]),
        ("valid_empty", real + ["--data-path", small, "--split", "999,1,0", "--eval-interval", "1"]),
        ("valid_unused", real + ["--data-path", small, "--split", "999,1,0"]),
        ("foreign", real + ["--data-path", foreign]),
        ("truncated", real + ["--data-path", truncated]),
        ("tokenizer", real + ["--data-path", null]),
    ]
    before = _snapshot(str(tmp_path))
    (r,) = spawn(_run_cases, 1, (cases,), timeout=300)
    assert r["default_split"][0] == "ok" and len(r["default_split"][1]) == 2, r["default_split"]
    assert r["valid_unused"][0] == "ok", r["valid_unused"]

    def startup(name, *needles):
        assert r[name][:2] == ("startup", 2), (name, r[name])
        assert all(n in r[name][2] for n in needles), (name, r[name][2])

    startup("cache_in_file", f"--data-cache-path {tmp_path / 'a_file' / 'c'}: {tmp_path / 'a_file'} is a file, not a "
                             "directory")
    startup("default_cache_file", f"{beside_file / 'index-cache'} is a file", "--data-cache-path")
    startup("valid_empty", "--split 999,1,0", "valid split", small, "--eval-interval 0")
    startup("foreign", foreign + ".bin", "different preprocessing runs", "tools/preprocess_data.py")
    startup("truncated", truncated + ".bin", "truncated")
    startup("tokenizer", null + ".bin", "token id 1000", "another tokenizer")
    after = _snapshot(str(tmp_path))
    assert {k: v for k, v in after.items() if not k.startswith("cache")} == before


def test_index_cache_is_keyed_on_the_files(tmp_path):
    from types import SimpleNamespace

    from megatron_lasp.training.data import index_cache_path

    byte = {"tokenizer_type": "ByteLevelTokenizer"}
    prefix = _dataset(tmp_path, "d", ["first version"] * 20, byte)
    args = SimpleNamespace(mock_data=False, data_blend=([prefix], None), data_cache_path=str(tmp_path / "c"))
    first = index_cache_path(args)
    assert index_cache_path(args) == first and first.startswith(str(tmp_path / "c"))
    time.sleep(0.01)
    _dataset(tmp_path, "d", ["second version"] * 20, byte, force=True)  # re-preprocessed into the same prefix
    assert index_cache_path(args) != first


def test_corrupt_tokenizer_file_is_named(tmp_path):
    from megatron_lasp.data.tokenizer import TokenizerSettings
    from megatron_lasp.training.data import build_tokenizer

    (tmp_path / "tokenizer.json").write_text('{"model": {"type": "BPE", "vocab": ')
    settings = TokenizerSettings(tokenizer_type="HuggingFaceTokenizer", tokenizer_model=str(tmp_path))
    with pytest.raises(ValueError) as info:  # DataError or the tokenizer's own one-line ValueError
        build_tokenizer(settings)
    assert str(tmp_path / "tokenizer.json") in str(info.value) and "\n" not in str(info.value)


# ----------------------------------------------------------------------------------------------
# flags


@pytest.mark.parametrize(
    "extra, world, needle",
    [
        (["--global-batch-size", "0"], None, "--global-batch-size must be positive"),
        (["--eval-interval", "-1"], None, "--eval-interval must be >= 0"),
        (["--split", "abc"], None, "--split 'abc'"),
        (["--split", "0,0,0"], None, "--split '0,0,0'"),
        (["--lr", "-1"], None, "--lr must be a finite number >= 0"),
        (["--fp16"], None, "--fp16: mixed precision needs a GPU; drop the flag"),
        (["--bf16"], None, "--bf16: mixed precision needs a GPU; drop the flag"),
        (["--override-opt-param-scheduler", "--use-checkpoint-opt-param-scheduler"], None, "exclusive"),
        (["--ckpt-step", "3"], None, "--ckpt-step needs --load"),
        (["--tokenizer-type", "ByteLevelTokenizer", "--vocab-size", "100"], None,
         "--vocab-size is not used by --tokenizer-type ByteLevelTokenizer"),
        (["--tokenizer-type", "NullTokenizer", "--vocab-size", "100", "--merge-file", "merges.txt"], None,
         "--merge-file is not used by --tokenizer-type NullTokenizer"),
    ],
    ids=["gbs0", "eval-neg", "split-abc", "split-zero", "lr-neg", "fp16-cpu", "bf16-cpu", "sched-both", "step-no-load",
         "unread-vocab-size", "unread-merge-file"],
)
def test_flag_validation(extra, world, needle, capsys):
    from megatron_lasp.training.arguments import parse_args

    with pytest.raises(SystemExit) as info:
        parse_args(BASE + extra, world_size=world)
    assert info.value.code == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and needle in lines[0] and "usage" not in err, err


def test_vocab_size_sizes_mock_data():
    """--vocab-size without a tokenizer type (mock data) or with the null tokenizer is read, so allowed."""
    from megatron_lasp.training.arguments import parse_args

    for extra in ([], ["--tokenizer-type", "NullTokenizer"]):
        config = parse_args(BASE + extra + ["--vocab-size", "100"])
        assert config.data.tokenizer.tokenizer_type == "NullTokenizer" and config.data.tokenizer.vocab_size == 100


def test_pipeline_must_divide_layers():
    from megatron_lasp.training.arguments import ArgumentError, parse_args
    from megatron_lasp.training.loop import model_config_from_run

    config = parse_args(BASE + ["--pipeline-model-parallel-size", "3"], world_size=3)
    with pytest.raises(ArgumentError, match=r"--pipeline-model-parallel-size \(3\) must divide the number of layers \(2\)"):
        model_config_from_run(config)


def test_messages_name_existing_flags():
    """Every --flag quoted by the model config's and the training code's messages exists."""
    import re

    from megatron_lasp.training.arguments import build_parser

    known = {o for a in build_parser()._actions for o in a.option_strings}
    launcher = {"--nproc-per-node"}
    # training's data errors may point to the preprocessing tool's flags (e.g. --append-eod)
    with open(os.path.join(REPO, "tools", "preprocess_data.py")) as f:
        known |= set(re.findall(r"add_argument\(\s*\"(--[a-z0-9-]+)\"", f.read()))
    assert "--append-eod" in known
    import glob

    files = [os.path.relpath(f, REPO) for sub in ("models", "parallel", "training", "ops", "checkpoint")
             for f in glob.glob(os.path.join(REPO, "megatron_lasp", sub, "**", "*.py"), recursive=True)]
    assert len(files) > 10
    for rel in files:
        text = open(os.path.join(REPO, rel)).read()
        for flag in set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]+", text)):
            assert flag in known or flag in launcher, f"{rel} cites {flag}, which pretrain_linear_lm.py lacks"


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(args, nproc=2):
    cmd = [PYTHON, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-port",
           str(_free_port()), os.path.join(REPO, "pretrain_linear_lm.py")] + args
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1", PYTHONPATH=REPO)
    return cmd, env


def test_bad_flag_under_torchrun_prints_one_line(tmp_path):
    cmd, env = _torchrun(BASE + ["--split", "abc"])
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env, cwd=str(tmp_path))
    assert proc.returncode != 0
    ours = [ln for ln in proc.stderr.splitlines() if "pretrain_linear_lm.py: error:" in ln]
    assert len(ours) == 1 and "--split 'abc'" in ours[0], proc.stderr[-3000:]
    assert "usage:" not in proc.stderr


def test_workers_exit_when_the_launcher_dies(tmp_path):
    """SIGKILL torchrun alone: the worker notices, exits, and the last checkpoint stays loadable."""
    save = tmp_path / "run"
    cmd, env = _torchrun(BASE + ["--train-iters", "100000", "--save", str(save), "--save-interval", "3"], nproc=1)
    log = open(tmp_path / "stderr.txt", "w+")
    launcher = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log, env=env, cwd=str(tmp_path))
    try:
        deadline = time.time() + 150
        while not (save / "latest_checkpointed_iteration.txt").exists():
            assert launcher.poll() is None and time.time() < deadline, open(log.name).read()[-3000:]
            time.sleep(0.2)
        workers = _children(launcher.pid)
        assert workers, "no worker process found"
        launcher.send_signal(signal.SIGKILL)
        launcher.wait()
        deadline = time.time() + 30
        while any(_alive(p) for p in workers):
            assert time.time() < deadline, "workers still running 30 s after the launcher died"
            time.sleep(0.2)
        assert "the launcher (parent pid" in open(log.name).read()
    finally:
        if launcher.poll() is None:
            launcher.kill()
        for p in _children(launcher.pid):
            os.kill(p, signal.SIGKILL)
    from argparse import Namespace

    from megatron_lasp.checkpoint.io import resolve_load

    args = Namespace(load=str(save), save=str(save), ckpt_step=None)
    assert resolve_load(args) >= 3  # the tracker names a complete, undamaged checkpoint


def _children(pid):
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = open(f"/proc/{entry}/stat").read()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry))
    return out


def _alive(pid):
    try:
        state = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _probe_cases(rank, world_size, root):
    """Runs whose pre-save probe (a forward pass of the weights to be saved) sees a given loss."""
    from megatron_lasp.training import loop

    real = loop.run_forward_backward

    def fake(value):
        def run(state, dataset, consumed, forward_only):
            loss = real(state, dataset, consumed, forward_only)
            return value if forward_only else loss
        return run

    out = {}
    for name, value, extra in (("spike", 1000.0, ["--check-for-spiky-loss"]), ("nan", float("nan"), []),
                               ("no_check", 1000.0, [])):
        loop.run_forward_backward = fake(value)
        try:
            out[name] = _run_cases(rank, world_size, [(name, BASE + ["--save", f"{root}/{name}",
                                                                     "--save-interval", "1", *extra])])[name]
        finally:
            loop.run_forward_backward = real
    return out


def test_no_save_of_blown_up_weights(tmp_path):
    (r,) = spawn(_probe_cases, 1, (str(tmp_path),))
    assert r["spike"][0] == "training" and "--spiky-loss-factor 10" in r["spike"][1], r
    assert r["nan"][0] == "training" and "give lm loss nan" in r["nan"][1], r
    for name in ("spike", "nan"):
        assert "iteration 1" in r[name][1] and "no checkpoint saved" in r[name][1], r
        assert not (tmp_path / name).exists()  # nothing written (the lock's directory removed again)
    assert r["no_check"][0] == "ok"  # a high loss alone is no reason to stop without the flag
    assert (tmp_path / "no_check" / "latest_checkpointed_iteration.txt").read_text().strip() == "2"


def _refused_save(rank, world_size, root):
    from megatron_lasp.checkpoint import io

    real = io.ranks_not_seeing
    io.ranks_not_seeing = lambda directory: ([(1, "elsewhere")], "here")  # a rank on another disk
    try:
        return _run_cases(rank, world_size, [("save", BASE + ["--save", root, "--save-interval", "1"])])["save"]
    finally:
        io.ranks_not_seeing = real


def test_refused_save_is_one_line(tmp_path):
    """A save the checkpoint code refuses (here: a rank that does not see ``--save``) stops training
    with its one-line message (``cli_main``: exit 1, no traceback)."""
    root = str(tmp_path / "run")
    (r,) = spawn(_refused_save, 1, (root,))
    assert r[0] == "training", r
    assert r[1].startswith(f"--save {root}: ") and "every node shares" in r[1] and "\n" not in r[1], r
    assert not os.path.exists(os.path.join(root, "latest_checkpointed_iteration.txt"))
