"""benchmarks/memory_peak.py: the peak of a --record-memory-history snapshot, by allocation site."""

from __future__ import annotations

import importlib.util
import os
import pickle
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "benchmarks", "memory_peak.py")


def _module():
    spec = importlib.util.spec_from_file_location("memory_peak", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _frames(fn, line):
    # innermost first, as torch records them: a C++ frame, then torch's, then ours
    return [{"filename": "??", "line": 0, "name": "c10::alloc"},
            {"filename": "/site/torch/autograd/function.py", "line": 5, "name": "apply"},
            {"filename": f"/repo/megatron_lasp/models/{fn}.py", "line": line, "name": fn}]


def _snapshot():
    """The weights (3 MiB, allocated before the trace) at 0x1000; in the trace A (8 MiB), then B
    (4 MiB) and C (2 MiB) while A lives; all three freed, then D (15 MiB) alone: the traced peak
    is D's 15 MiB, above A + B + C's 14 (no sum of everything ever allocated)."""
    MiB = 1 << 20
    alloc = lambda addr, size, fn, line: {"action": "alloc", "addr": addr, "size": size, "frames": _frames(fn, line)}
    free = lambda addr, size, done=True: {"action": "free_completed" if done else "free_requested",
                                          "addr": addr, "size": size, "frames": []}
    trace = [alloc(0x10000, 8 * MiB, "offload", 10), alloc(0x20000, 4 * MiB, "chunked", 20),
             alloc(0x30000, 2 * MiB, "chunked", 20), free(0x20000, 4 * MiB, done=False),
             free(0x20000, 4 * MiB), free(0x30000, 2 * MiB), free(0x10000, 8 * MiB),
             alloc(0x40000, 15 * MiB, "loss", 30)]
    segments = [{"device": 0, "address": 0x1000, "total_size": 32 * MiB,
                 "blocks": [{"size": 3 * MiB, "state": "active_allocated", "frames": []},
                            {"size": 29 * MiB, "state": "inactive", "frames": []}]},
                {"device": 0, "address": 0x40000, "total_size": 15 * MiB,
                 "blocks": [{"size": 15 * MiB, "state": "active_allocated", "frames": _frames("loss", 30)}]}]
    return {"segments": segments, "device_traces": [trace]}


def test_peak_replays_the_trace_and_counts_blocks_from_before_it():
    result = _module().peak(_snapshot())
    MiB = 1 << 20
    assert result["before_trace_bytes"] == 3 * MiB  # the weights; the loss block is in the trace
    assert result["traced_peak_bytes"] == 15 * MiB and result["peak_bytes"] == 18 * MiB  # D, not A+B+C
    sites = {s["site"]: (s["bytes"], s["blocks"]) for s in result["sites"]}
    assert sites == {"models/loss.py:30 loss": (15 * MiB, 1), "(no Python frame)": (3 * MiB, 1)}, sites


def test_the_peak_holds_what_is_live_together():
    snap = _snapshot()
    snap["device_traces"][0][-1]["size"] = 13 << 20  # D smaller than A + B + C (14 MiB)
    result = _module().peak(snap)
    sites = {s["site"]: s["bytes"] for s in result["sites"]}
    assert result["traced_peak_bytes"] == 14 << 20, result
    assert sites["models/chunked.py:20 chunked"] == 6 << 20 and sites["models/offload.py:10 offload"] == 8 << 20


def test_command_line_prints_and_refuses_a_bad_file(tmp_path):
    path = tmp_path / "s.pickle"
    path.write_bytes(pickle.dumps(_snapshot()))
    out = tmp_path / "peak.json"
    run = subprocess.run([sys.executable, SCRIPT, str(path), "--json", str(out)], capture_output=True, text=True)
    assert run.returncode == 0 and run.stdout.startswith("peak 0.02 GiB"), run
    assert "models/loss.py:30 loss" in run.stdout and out.exists()
    bad = tmp_path / "bad.pickle"
    bad.write_text("not a pickle")
    run = subprocess.run([sys.executable, SCRIPT, str(bad)], capture_output=True, text=True)
    assert run.returncode == 2 and run.stderr.count("\n") == 1 and run.stderr.startswith("error: "), run
