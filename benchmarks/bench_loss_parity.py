"""Fused vs unfused training on real data: do the losses agree within bf16 noise?

Tokenizes the bundled corpus (``examples/data/corpus.jsonl``, the bundled tokenizer) unless
``--data-prefix`` is given, then trains the same model from the same seed on the same batches
three times through ``megatron_lasp.training.main`` (one process, one run after the other):

- ``fused``: the GPU default (fused elementwise kernels, fused linear cross-entropy), bf16;
- ``unfused``: ``--no-fusion --no-fused-linear-cross-entropy`` (plain PyTorch around the
  matmuls, megatron-core's output layer and loss), bf16;
- ``fused-reordered``: the fused path with another loss chunk size (1000 tokens): the same
  function, only the order of the sums changes, so its distance to ``fused`` is bf16 rounding
  noise as the training amplifies it;
- ``fused-multi-tensor-adam``: the fused path with torch's multi-tensor AdamW instead of the fused
  one: the same update rounded differently, a second measure of that noise;
- ``fused-fp32``, ``unfused-fp32``: both paths in fp32.

"Within bf16 noise" means: ``|fused - unfused|`` (bf16) is of the order of ``|unfused bf16 -
unfused fp32|``, what bf16 rounding alone does to the run, while in fp32 the two paths agree
closely (``|fused-fp32 - unfused-fp32|``: the fused kernels compute the same function). The JSON
holds the three differences per step and their maxima and means; the PNG plots the loss curves and
the differences. Output (``--out``): ``loss_parity.json`` and ``loss_parity.png``.

Example (one H200, TNL-1B at 8K tokens, 50 steps each, about 3 minutes)::

    python benchmarks/bench_loss_parity.py --out docs/benchmarks --preset tnl-1b --seq-length 8192 --steps 50
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from megatron_lasp.atomic import save_figure_atomic, write_text_atomic  # noqa: E402

RUNS = {
    "fused": ["--bf16"],
    "fused-reordered": ["--bf16", "--cross-entropy-chunk-size", "1000"],
    "fused-multi-tensor-adam": ["--bf16", "--no-fused-adam"],
    "unfused": ["--bf16", "--no-fusion", "--no-fused-linear-cross-entropy"],
    "fused-fp32": [],
    "unfused-fp32": ["--no-fusion", "--no-fused-linear-cross-entropy"],
}
# the differences the JSON holds and the plot draws: key -> (run, run, label)
PAIRS = {
    "fused_vs_unfused": ("fused", "unfused", "|fused - unfused| (bf16)"),
    "unfused_vs_fp32": ("unfused", "unfused-fp32", "|unfused bf16 - fp32|"),
    "fp32_fused_vs_unfused": ("fused-fp32", "unfused-fp32", "|fused - unfused| (fp32)"),
    "rounding_noise": ("fused", "fused-reordered", "|fused - fused reordered| (bf16 noise)"),
    "adam_rounding_noise": ("fused", "fused-multi-tensor-adam", "|fused - fused, multi-tensor Adam| (bf16 noise)"),
    "fused_vs_fused_fp32": ("fused", "fused-fp32", "|fused bf16 - fused fp32|"),  # bf16 rounding, fused path
}
TOKENIZER = ["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model",
             os.path.join(REPO, "examples", "data", "tokenizer")]


def _tokenize(workdir: str) -> str:
    prefix = os.path.join(workdir, "corpus")
    subprocess.run([sys.executable, os.path.join(REPO, "tools", "preprocess_data.py"), "--input",
                    os.path.join(REPO, "examples", "data", "corpus.jsonl"), "--output-prefix", prefix,
                    *TOKENIZER, "--append-eod", "--workers", "4"], check=True)
    return prefix + "_text_document"


def _plot(doc: dict, path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for name, run in doc["runs"].items():
        a.plot(run.get("steps") or range(1, len(run["loss"]) + 1), run["loss"], "o-" if run.get("steps") else "-",
               markersize=3, label=name)
    a.set_xlabel("step")
    a.set_ylabel("training loss")
    a.set_title(f"{doc['preset']}, {doc['seq_length']} tokens/step, real data")
    a.legend()
    for key, (_, _, label) in PAIRS.items():
        if doc.get(key, {}).get("diff"):
            b.semilogy(doc[key]["steps"], [max(x, 1e-7) for x in doc[key]["diff"]], "o-", markersize=3, label=label)
    b.set_xlabel("step")
    b.set_ylabel("absolute loss difference")
    b.set_title("fused vs unfused, against bf16 rounding")
    b.legend()
    save_figure_atomic(fig, path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="directory for loss_parity.json / .png")
    p.add_argument("--preset", default="tnl-1b")
    p.add_argument("--seq-length", type=int, default=8192)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--data-prefix", help="an indexed dataset prefix (default: tokenize the bundled corpus)")
    p.add_argument("--extra", default="", help="more training flags for every run")
    p.add_argument("--runs", default=",".join(RUNS), help=f"comma-separated subset of {', '.join(RUNS)}")
    p.add_argument("--from-log", nargs="+", metavar="LOG", help="no training: read the runs from these logs of earlier runs")
    p.add_argument("--log-runs", default="fused,unfused,fused-fp32", help="with --from-log: the runs' names in log order")
    args = p.parse_args(argv)
    if args.from_log:
        runs = from_logs(args.from_log, args.log_runs.split(","))
        return _write(summarize(runs, argv, preset=args.preset, seq_length=args.seq_length, steps=args.steps,
                                data="bundled corpus (examples/data/corpus.jsonl)", source="training logs"), args.out)
    for k, v in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                 "MASTER_PORT": "29533"}.items():
        os.environ.setdefault(k, v)
    import torch

    from megatron_lasp.training import main as train_main

    # the GPU default; the CPU (a smoke run of this script) has only torch DDP, and no bf16 there
    DDP = ["--ddp-impl", "megatron", "--use-distributed-optimizer"] if torch.cuda.is_available() else ["--ddp-impl", "torch"]
    wanted = args.runs.split(",")
    if not set(wanted) <= set(RUNS):
        p.error(f"--runs: choose from {', '.join(RUNS)}")
    runs_flags = {k: RUNS[k] for k in wanted}
    if not torch.cuda.is_available():
        runs_flags = {k: [f for f in v if f != "--bf16"] for k, v in runs_flags.items()}

    os.makedirs(args.out, exist_ok=True)
    with tempfile.TemporaryDirectory() as work:
        data = args.data_prefix or _tokenize(work)
        common = ["--model-preset", args.preset, "--data-path", data, "--split", "100,0,0", *TOKENIZER,
                  "--seq-length", str(args.seq_length), "--micro-batch-size", "1", "--global-batch-size", "1",
                  "--train-iters", str(args.steps), "--lr", "3e-4", "--min-lr", "3e-5", "--lr-decay-style", "cosine",
                  "--lr-warmup-iters", str(min(5, args.steps - 1)), "--clip-grad", "1.0", "--seed", "1234", "--log-interval", "1",
                  "--eval-interval", "0", *DDP,
                  *args.extra.split()]
        runs = {}
        for name, flags in runs_flags.items():
            t0 = time.perf_counter()
            state = train_main(common + flags)
            runs[name] = {"flags": flags, "loss": list(state.losses), "grad_norm": list(state.grad_norms),
                          "seconds": time.perf_counter() - t0}
            print(f"[parity] {name}: first {runs[name]['loss'][0]:.5f} last {runs[name]['loss'][-1]:.5f} "
                  f"({runs[name]['seconds']:.0f} s)", flush=True)
            _write(summarize(runs, argv, preset=args.preset, seq_length=args.seq_length, steps=args.steps), args.out,
                   quiet=True)  # what is done so far survives a time limit
    doc = summarize(runs, argv, preset=args.preset, seq_length=args.seq_length, steps=args.steps,
                    data="bundled corpus (examples/data/corpus.jsonl)" if not args.data_prefix else args.data_prefix)
    return _write(doc, args.out)


def summarize(runs: dict, argv, **meta) -> dict:
    """The JSON document: the runs, the per-step differences (at the steps every run has) and their maxima and means."""
    for run in runs.values():
        run.setdefault("steps", list(range(1, len(run["loss"]) + 1)))

    def diff(a, b):
        """``{"steps", "diff"}``: |loss a - loss b| at the steps both runs have."""
        if a not in runs or b not in runs:
            return {"steps": [], "diff": []}
        la, lb = (dict(zip(runs[n]["steps"], runs[n]["loss"])) for n in (a, b))
        steps = sorted(set(la) & set(lb))
        return {"steps": steps, "diff": [abs(la[t] - lb[t]) for t in steps]}

    doc = {
        "command": "python benchmarks/bench_loss_parity.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        **meta,
        "runs": runs,
    }
    for key, (a, b, _) in PAIRS.items():
        doc[key] = d = diff(a, b)
        if d["diff"]:
            doc[f"max_{key}"] = max(d["diff"])
            doc[f"mean_{key}"] = sum(d["diff"]) / len(d["diff"])
        # the second half of the run, past the early loss spikes that amplify every difference alike
        late = [x for t, x in zip(d["steps"], d["diff"]) if t > meta.get("steps", 0) // 2]
        if late:
            doc[f"late_mean_{key}"] = sum(late) / len(late)
    try:
        import torch

        doc["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
        doc["torch"] = torch.__version__
    except Exception:  # noqa: BLE001 - informative only
        pass
    return doc


def from_logs(paths, names) -> dict:
    """Runs from training logs (``iteration N/M | ... | lm loss: X |`` lines, every ``--log-interval``):
    each startup line ``training: N iterations, ...`` starts the next run of ``names``; a cut-short run keeps
    what it logged."""
    import re

    runs, current = {}, None
    order = iter(names)
    for path in paths:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                if re.search(r"\] INFO megatron_lasp\.training\.\w+: training: \d+ iterations", line):
                    current = next(order)
                    runs[current] = {"steps": [], "loss": [], "grad_norm": [], "log": os.path.basename(path)}
                m = re.search(r"iteration\s+(\d+)/\s*\d+ .*?lm loss: ([0-9.Ee+-]+) .*?grad norm: ([0-9.]+)", line)
                if m and current is not None:
                    runs[current]["steps"].append(int(m.group(1)))
                    runs[current]["loss"].append(float(m.group(2)))
                    runs[current]["grad_norm"].append(float(m.group(3)))
    return runs


def _write(doc: dict, out: str, quiet: bool = False) -> int:
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "loss_parity.json")
    write_text_atomic(path, json.dumps(doc, indent=1))
    _plot(doc, os.path.join(out, "loss_parity.png"))
    for key in () if quiet else PAIRS:
        if doc.get(key, {}).get("diff"):
            late = doc.get("late_mean_" + key)
            print(f"[parity] {key}: max {doc['max_' + key]:.4g}, mean {doc['mean_' + key]:.4g}"
                  + (f", mean over the second half {late:.4g}" if late is not None else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
