"""Rebuild sp_loss_curves.json / .png of the GPU call of 2026-12-07b from its training logs.

That call's bench_sp_loss_curves.py ran all three trainings (SP = 1, 2, 4 on one H100, 50 steps each,
return code 0) but read 0 steps back: its log parser still looked for the startup line under the
logger's old module name. The parser is fixed (and a CPU test now parses a real training log);
this script applies it to the logs that call returned (``gpu_1207b_bench_sp_runs.log``, the three
logs concatenated in SP order) and to the call's own JSON (commands, seconds, return codes).

    python docs/benchmarks/logs/sp_loss_curves_rebuild.py RESULT_JSON LOG OUT_DIR
"""
import json
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
sys.path[:0] = [REPO, os.path.join(REPO, "benchmarks")]

from bench_loss_parity import from_logs  # noqa: E402
from bench_sp_loss_curves import _write, summarize  # noqa: E402

old_json, log, out = sys.argv[1:4]
old = json.load(open(old_json))
names = list(old["runs"])
parsed = from_logs([log], names)
runs = {n: {**old["runs"][n], **{k: parsed[n][k] for k in ("steps", "loss", "grad_norm")}} for n in names}
meta = {k: old[k] for k in ("model", "seq_length", "steps", "data")}
doc = summarize(runs, old["command"].split()[2:], **meta)
doc.update(device=old.get("device"), torch=old.get("torch"), rebuilt_from_logs=os.path.basename(log))
_write(doc, out)
for n in names:
    d = doc.get(f"{n}_vs_sp1")
    print(n, len(runs[n]["loss"]), "steps", "" if not d else f"max |diff| {d['max']:.4g} mean {d['mean']:.4g}")
