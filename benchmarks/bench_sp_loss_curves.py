"""LASP at SP = 1, 2 and 4 on one GPU: the same training run, do the loss curves agree?

Trains the same model from the same seed on the same batches (the bundled corpus, tokenized with
the bundled tokenizer unless ``--data-prefix`` is given) once per sequence-parallel size, each run
a ``torchrun --nproc-per-node W pretrain_linear_lm.py --distributed-backend gloo
--sequence-parallel-size W --sequence-parallel-mode lasp`` on the one GPU (ranks share it; a
correctness tool, not a fast path), plus ``sp1-reordered``: SP = 1 with another loss-chunk order,
the same function summed in another order, whose distance to ``sp1`` is the bf16 rounding noise
that training amplifies. The SP runs must stay within that noise of ``sp1``.

Output (``--out``): ``sp_loss_curves.json`` (the command, every run's losses and grad norms, the
per-step differences to ``sp1`` with their maxima and means) and ``sp_loss_curves.png``; the
training logs go to ``--log-dir`` (default ``<out>/logs``).

Example (one H100 / H200; TNL-1B width, 2 layers, 8K tokens a step, 50 steps; a few minutes)::

    python benchmarks/bench_sp_loss_curves.py --out docs/benchmarks/sp_loss_curves --num-layers 2 --seq-length 8192 --steps 50
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_loss_parity import TOKENIZER, _tokenize, from_logs  # noqa: E402

from megatron_lasp.atomic import save_figure_atomic, write_text_atomic  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train(name: str, world: int, flags: list, log_path: str) -> dict:
    """One torchrun of ``world`` ranks; its stdout (rank 0's log) goes to ``log_path``."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(world),
           "--master-port", str(_free_port()), os.path.join(REPO, "pretrain_linear_lm.py"), *flags]
    t0 = time.perf_counter()
    with open(log_path, "w", encoding="utf-8") as log:
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONWARNINGS="ignore"))
    seconds = time.perf_counter() - t0
    run = from_logs([log_path], [name]).get(name, {"steps": [], "loss": [], "grad_norm": []})
    run.update(world=world, seconds=seconds, returncode=proc.returncode,
               command="torchrun --nproc-per-node %d pretrain_linear_lm.py %s" % (world, " ".join(flags)))
    print(f"[sp-curves] {name}: {len(run['loss'])} steps, rc {proc.returncode}, {seconds:.0f} s"
          + (f", last loss {run['loss'][-1]:.4f}" if run["loss"] else ""), flush=True)
    return run


def summarize(runs: dict, argv, **meta) -> dict:
    """The JSON document: the runs and, for each, |loss - sp1 loss| per step, its max and mean."""
    doc = {"command": "python benchmarks/bench_sp_loss_curves.py " + " ".join(argv), **meta, "runs": runs}
    base = runs.get("sp1")
    for name, run in runs.items():
        if name == "sp1" or base is None:
            continue
        want = dict(zip(base["steps"], base["loss"]))
        steps = [t for t in run["steps"] if t in want]
        diff = [abs(dict(zip(run["steps"], run["loss"]))[t] - want[t]) for t in steps]
        doc[f"{name}_vs_sp1"] = {"steps": steps, "diff": diff,
                                 "max": max(diff) if diff else None, "mean": sum(diff) / len(diff) if diff else None}
    try:
        import torch

        doc["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
        doc["torch"] = torch.__version__
    except Exception:  # noqa: BLE001 - informative only
        pass
    return doc


def _plot(doc: dict, path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for name, run in doc["runs"].items():
        a.plot(run["steps"], run["loss"], "-", label=f"{name} ({run['world']} rank{'s' * (run['world'] > 1)})")
    a.set_xlabel("step")
    a.set_ylabel("training loss")
    a.set_title(f"LASP on one GPU: {doc['model']}, {doc['seq_length']} tokens/step")
    a.legend()
    for name in doc["runs"]:
        d = doc.get(f"{name}_vs_sp1")
        if d and d["diff"]:
            b.semilogy(d["steps"], [max(x, 1e-7) for x in d["diff"]], "o-", markersize=3, label=f"|{name} - sp1|")
    b.set_xlabel("step")
    b.set_ylabel("absolute loss difference")
    noise = "sp1-reordered" in doc["runs"]
    b.set_title("against SP = 1" + (" (sp1-reordered: bf16 noise)" if noise else " (no noise run)"))
    b.legend()
    save_figure_atomic(fig, path)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="directory for sp_loss_curves.json / .png")
    p.add_argument("--log-dir", help="directory for the training logs (default <out>/logs)")
    p.add_argument("--sizes", default="1,2,4", help="sequence-parallel sizes (ranks on the one GPU)")
    p.add_argument("--no-noise-run", action="store_true", help="skip sp1-reordered")
    p.add_argument("--preset", default="tnl-1b")
    p.add_argument("--num-layers", type=int, default=2)
    p.add_argument("--seq-length", type=int, default=8192)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--data-prefix", help="an indexed dataset prefix (default: tokenize the bundled corpus)")
    p.add_argument("--extra", default="", help="more training flags for every run")
    args = p.parse_args(argv)
    import torch

    gpu = torch.cuda.is_available()
    precision = ["--bf16", "--ddp-impl", "megatron", "--use-distributed-optimizer"] if gpu else ["--ddp-impl", "torch"]
    log_dir = args.log_dir or os.path.join(args.out, "logs")
    os.makedirs(log_dir, exist_ok=True)
    with tempfile.TemporaryDirectory() as work:
        data = args.data_prefix or _tokenize(work)
        common = ["--distributed-backend", "gloo", "--model-preset", args.preset, "--num-layers", str(args.num_layers),
                  "--data-path", data, "--split", "100,0,0", "--data-cache-path", os.path.join(work, "cache"),
                  *TOKENIZER, "--seq-length", str(args.seq_length), "--micro-batch-size", "1",
                  "--global-batch-size", "1", "--train-iters", str(args.steps), "--lr", "3e-4", "--min-lr", "3e-5",
                  "--lr-decay-style", "cosine", "--lr-warmup-iters", str(min(5, args.steps - 1)), "--clip-grad", "1.0",
                  "--seed", "1234", "--log-interval", "1", "--eval-interval", "0", *precision, *args.extra.split()]
        plan = [(f"sp{w}", w, ["--sequence-parallel-size", str(w), "--sequence-parallel-mode", "lasp"])
                for w in map(int, args.sizes.split(","))]
        if not args.no_noise_run:
            plan.insert(1, ("sp1-reordered", 1, ["--cross-entropy-chunk-size", "1000"]))
        runs = {}
        meta = dict(model=f"{args.preset} width, {args.num_layers} layers", seq_length=args.seq_length, steps=args.steps,
                    data=args.data_prefix or "bundled corpus (examples/data/corpus.jsonl)")
        for name, world, flags in plan:
            runs[name] = _train(name, world, common + flags, os.path.join(log_dir, f"sp_loss_curves_{name}.log"))
            _write(summarize(runs, argv, **meta), args.out)  # what is done survives a time limit
    doc = summarize(runs, argv, **meta)
    _write(doc, args.out)
    for name in runs:
        d = doc.get(f"{name}_vs_sp1")
        if d and d["diff"]:
            print(f"[sp-curves] |{name} - sp1|: max {d['max']:.4g}, mean {d['mean']:.4g}")
    return 0 if all(r["returncode"] == 0 for r in runs.values()) else 1


def _write(doc: dict, out: str) -> None:
    os.makedirs(out, exist_ok=True)
    write_text_atomic(os.path.join(out, "sp_loss_curves.json"), json.dumps(doc, indent=1))
    _plot(doc, os.path.join(out, "sp_loss_curves.png"))


if __name__ == "__main__":
    sys.exit(main())
