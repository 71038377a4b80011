"""Multi-node launch on one machine: examples/multinode.sbatch as two "nodes" equals one launcher.

The sbatch script runs as SLURM would run it, with ``srun`` and ``scontrol`` replaced by small
stand-ins: ``srun`` starts examples/run_multinode.sh twice (two torchrun launchers, ``--nnodes 2
--nproc-per-node 1``, c10d rendezvous on localhost, gloo), one per "node". A tiny LASP run (SP=2
across the two nodes) must log the losses and grad norms of the same job started by one
``torchrun --nproc-per-node 2``, and leave one complete checkpoint in the shared ``--save``.

Also: an index cache that one rank does not see (node-local disks) makes every rank build its own
indices, with a warning; a ``--save`` that one rank does not see is refused at the save; the
launch scripts refuse settings they would otherwise ignore.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import stat
import subprocess
import sys

from megatron_lasp.testing import spawn

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYTHON = sys.executable

JOB = [
    "--model-preset", "tiny", "--mock-data", "--seq-length", "64", "--micro-batch-size", "2",
    "--global-batch-size", "4", "--train-iters", "3", "--lr", "3e-3", "--log-interval", "1",
    "--eval-interval", "0", "--seed", "5", "--make-vocab-size-divisible-by", "64",
    "--sequence-parallel-size", "2", "--sequence-parallel-mode", "lasp",
]

# srun: one copy of the command per node, each with its node's SLURM variables and log files.
FAKE_SRUN = """#!/usr/bin/env bash
while [[ "$1" == -* ]]; do shift; done
pids=()
for ((i = 0; i < SLURM_NNODES; i++)); do
  SLURM_NODEID=$i SLURM_PROCID=$i "$@" > "$FAKE_SLURM_LOGS/node$i.out" 2> "$FAKE_SLURM_LOGS/node$i.err" &
  pids+=($!)
done
rc=0
for p in "${pids[@]}"; do wait "$p" || rc=$?; done
exit $rc
"""
# scontrol: one line per node, many of them (a reader that stops early gets SIGPIPE)
FAKE_SCONTROL = """#!/usr/bin/env bash
[ "$1 $2" = "show hostnames" ] || exit 1
for i in $(seq 1 20000); do echo 127.0.0.1; done
"""

STEP = re.compile(r"iteration\s+(\d+)/\s*\d+ .*\| lm loss: (\S+) \| grad norm: (\S+) \|")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _steps(text):
    """[(iteration, lm loss, grad norm)] as logged (the strings: equal runs log equal digits)."""
    return [m.groups() for m in STEP.finditer(text)]


def _write_tool(directory, name, text):
    path = os.path.join(directory, name)
    with open(path, "w") as f:
        f.write(text)
    os.chmod(path, os.stat(path).st_mode | stat.S_IXUSR)


def test_sbatch_two_nodes_equal_one_launcher(tmp_path):
    bin_dir, logs, save = tmp_path / "bin", tmp_path / "logs", tmp_path / "shared" / "ckpt"
    bin_dir.mkdir()
    logs.mkdir()
    _write_tool(bin_dir, "srun", FAKE_SRUN)
    _write_tool(bin_dir, "scontrol", FAKE_SCONTROL)
    common = dict(os.environ, PYTHON=PYTHON, PYTHONPATH=REPO, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    env = dict(common, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", FAKE_SLURM_LOGS=str(logs),
               SLURM_SUBMIT_DIR=REPO, SLURM_JOB_NODELIST="node[0-1]", SLURM_NNODES="2", SLURM_JOB_ID="4242",
               GPUS_PER_NODE="1", MASTER_PORT=str(_free_port()), RDZV_TIMEOUT="240", SAVE=str(save),
               JOB_FLAGS=" ".join(JOB))
    nodes = subprocess.Popen(["bash", os.path.join(REPO, "examples", "multinode.sbatch")], env=env,
                             cwd=str(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             start_new_session=True)
    # The reference runs meanwhile: one launcher, two workers on this "node".
    one = subprocess.run([PYTHON, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                          str(_free_port()), os.path.join(REPO, "pretrain_linear_lm.py"), *JOB],
                         env=common, cwd=str(tmp_path), capture_output=True, text=True, timeout=420)
    try:
        launcher_log, _ = nodes.communicate(timeout=420)
    finally:
        if nodes.poll() is None:  # a hang: stop both "nodes" (their launchers and workers)
            os.killpg(nodes.pid, signal.SIGKILL)
    assert os.path.exists(logs / "node1.err"), f"srun never ran (exit {nodes.returncode}): {launcher_log[-3000:]}"
    node_logs = {i: (logs / f"node{i}.out").read_text() + (logs / f"node{i}.err").read_text() for i in (0, 1)}
    detail = launcher_log[-2000:] + "".join(f"\n--- node {i}\n{t[-3000:]}" for i, t in node_logs.items())
    assert nodes.returncode == 0, detail
    assert one.returncode == 0, one.stdout[-3000:] + one.stderr[-3000:]
    assert "2 nodes x 1 GPUs, rendezvous 127.0.0.1:" in launcher_log, launcher_log

    want = _steps(one.stdout)
    assert [s[0] for s in want] == ["1", "2", "3"], one.stdout[-3000:]
    # Global rank 0 logs; the rendezvous decides which node holds it.
    per_node = {i: _steps(t) for i, t in node_logs.items()}
    assert sorted(len(s) for s in per_node.values()) == [0, 3], detail
    got = per_node[0] or per_node[1]
    assert got == want, f"two nodes {got} != one launcher {want}"
    assert "world 2 = TP 1 x SP 2" in node_logs[0] + node_logs[1], detail

    # One checkpoint in the shared --save: the tracker and the shards of both ranks.
    assert (save / "latest_checkpointed_iteration.txt").read_text().strip() == "3"
    shards = sorted(n for n in os.listdir(save / "iter_0000003") if n.endswith(".distcp"))
    assert {n.split("_")[2] for n in shards} == {"0", "1"}, shards


def test_launcher_refuses_settings_it_would_ignore(tmp_path):
    """run_multinode.sh (and the sbatch outside SLURM): a setting that would not take effect is an error
    before anything starts."""
    script = os.path.join(REPO, "examples", "run_multinode.sh")
    base = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    base.update(PYTHON="false")  # nothing may be launched
    cases = [
        ({"NNODES": "2"}, "set MASTER=host:port"),
        ({"JOB_FLAGS": "--mock-data", "DATA": "/data/x_text_document"}, "with JOB_FLAGS put --data-path"),
        ({"DATA": "/data/x_text_document"}, "DATA needs TOKENIZER"),
        ({"TOKENIZER": "/tok"}, "TOKENIZER without DATA would be ignored"),
    ]
    outside = subprocess.run(["bash", os.path.join(REPO, "examples", "multinode.sbatch")], env=base,
                             capture_output=True, text=True, timeout=30, cwd=str(tmp_path))
    assert outside.returncode == 2 and "not inside a SLURM job" in outside.stderr, outside.stderr
    for extra, message in cases:
        env = {k: v for k, v in base.items() if k not in ("NNODES", "MASTER", "JOB_FLAGS", "DATA", "TOKENIZER")}
        proc = subprocess.run(["bash", script], env=dict(env, **extra), capture_output=True, text=True, timeout=30,
                              cwd=str(tmp_path))
        assert proc.returncode == 2 and message in proc.stderr, (extra, proc.stderr)
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def _with_a_blind_rank(rank, world_size, prefix, cache_root, save):
    """Rank 1 plays a node whose disk at the shared paths is its own: the index cache (datasets built
    with it blind, then with all ranks seeing the cache) and --save (a training run that saves)."""
    import logging

    from megatron_lasp import atomic
    from megatron_lasp.data.tokenizer import build_tokenizer
    from megatron_lasp.training import data, main
    from megatron_lasp.training.loop import TrainingError

    warnings = []
    handler = logging.Handler()
    handler.emit = lambda record: warnings.append(record.getMessage())
    logging.getLogger("megatron_lasp.training.data").addHandler(handler)
    sees = atomic._sees
    samples = {}
    for name, blind in (("blind", True), ("shared", False)):
        settings = data.DataSettings(
            mock_data=False, data_blend=([prefix], None), split="100,0,0",
            data_cache_path=os.path.join(cache_root, name), seq_length=32, eod_mask_loss=False, seed=5,
            train_iters=4, global_batch_size=4, eval_interval=0, eval_iters=0, skip_splits=(1, 2))
        atomic._sees = (lambda path: False) if blind and rank == 1 else sees
        train, _, _ = data.build_datasets(settings, build_tokenizer("ByteLevelTokenizer"))
        samples[name] = [train[i]["tokens"].tolist() for i in range(4)]
    atomic._sees = (lambda path: False) if rank == 1 else sees
    try:
        main(JOB + ["--train-iters", "1", "--save", save, "--save-interval", "1"], destroy=False)
        message = None
    except TrainingError as err:  # the loop's one-line form of the refused save
        message = str(err)
    return samples, warnings, message


def test_directories_not_shared_by_all_ranks(tmp_path):
    """An index cache one rank does not see: every rank builds its indices (the same samples), with
    a warning. A --save one rank does not see: the save is refused on every rank, nothing committed."""
    from megatron_lasp.data.preprocess import PreprocessConfig, preprocess_data

    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"text": f"document {i}" + " more" * (i % 7)}) + "\n" for i in range(200)))
    prefix = preprocess_data(PreprocessConfig(str(src), str(tmp_path / "d"), {"tokenizer_type": "ByteLevelTokenizer"},
                                              append_eod=True)).output_prefixes["text"]
    cache_root, save = tmp_path / "cache", tmp_path / "ckpt"
    (s0, warnings0, m0), (s1, _, m1) = spawn(_with_a_blind_rank, 2, (prefix, str(cache_root), str(save)), timeout=400)

    assert s0["blind"] == s1["blind"] == s0["shared"] == s1["shared"], (s0, s1)
    assert any("is not seen by rank(s) 1 on" in w and "builds its sample indices without a cache" in w
               for w in warnings0), warnings0
    assert not any(f.endswith(".npy") for _, _, files in os.walk(cache_root / "blind") for f in files)
    assert any(f.endswith(".npy") for _, _, files in os.walk(cache_root / "shared") for f in files)

    assert m0 == m1 and m0 is not None, (m0, m1)
    assert f"--save {save}: rank(s) 1 on " in m0 and "iter_0000001.tmp, which rank 0 created" in m0
    assert "a file system every node shares" in m0
    assert not (save / "latest_checkpointed_iteration.txt").exists() and not (save / "iter_0000001").exists()
