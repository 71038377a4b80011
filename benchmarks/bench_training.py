"""Training-step benchmark: real steps through the training loop, several configurations side by side.

Each configuration runs in its own process (``torchrun`` when ``--nproc`` > 1): it builds the
model, optimizer and data exactly as ``pretrain_linear_lm.py`` does (``megatron_lasp.training``'s
``setup``), runs ``--warmup`` steps, times ``--steps`` steps (``train_step``: forward, backward,
gradient reduction, optimizer), then profiles ``--profile-steps`` more with torch.profiler and
sorts every GPU kernel into a category. The results go to ``OUT/training_bench.json`` and, with
matplotlib, ``OUT/training_bench.png``.

Reported per configuration: ms per step, tokens/s, TFLOP/s/GPU and MFU (the training log line's
FLOP count, ``logging_utils.flops_per_token``, against ``--peak-flops``: 989e12, the H100/H200 dense
bf16 peak), the HFU (the same with the forward work a recompute reruns counted,
``logging_utils.recompute_flops_per_token``: full recompute about 8N FLOPs a token for the 6N of
the MFU), peak allocated GiB, the per-step losses, and the GPU time per step by category:
matmul, lightning attention (its Triton kernels), softmax attention (a hybrid's flash / cuDNN / flex
kernels), fused elementwise (our Triton kernels), other
Triton, elementwise (torch's elementwise and reduction kernels), copies (copies, fills, casts,
concatenation), loss (non-matmul kernels of the cross entropy, forward and backward), optimizer
(non-matmul kernels under the optimizer step), communication (NCCL), other; plus "idle", the step
time no kernel covers (launch gaps, host work).

Example (one H200, TNL-1B, 128K tokens per step, fusion on vs off with full recompute, and the
selective elementwise recompute)::

    python benchmarks/bench_training.py --out docs/benchmarks/training --preset tnl-1b \\
        --seq-length 131072 --steps 3 --warmup 2 \\
        --config "fused-full=--recompute-granularity full" \\
        --config "unfused-full=--no-fusion --recompute-granularity full" \\
        --config "fused-selective=--recompute-granularity selective --recompute-modules core_attn elementwise"

    python benchmarks/bench_training.py --plot docs/benchmarks/training/training_bench.json   # PNG only

A hybrid against the pure linear model (one H200, TNL-1B sizes, 32K; the MFU counts the softmax
layers' FLOPs)::

    python benchmarks/bench_training.py --out $OUT/hybrid_32k --preset tnl-1b --seq-length 32768 \
        --common "--recompute-granularity selective --recompute-modules core_attn elementwise" \
        --config "linear=" --config "hybrid-1to7=--hybrid-layer-pattern LLLLLLL*LLLLLLL* --num-query-groups 4"

The gated layers against the fixed decay (the MFU of a TNL-1B-size gated model at 128K, the gate's
projection counted in the FLOPs)::

    python benchmarks/bench_training.py --out docs/benchmarks/training_gated --preset tnl-1b \
        --seq-length 131072 --steps 3 --warmup 2 --common "--recompute-granularity full" \
        --config "fixed=" --config "mamba2=--linear-attention-gate mamba2" \
        --config "gla=--linear-attention-gate gla"

Flags after ``--common`` apply to every configuration (e.g. ``--common "--context-parallel-size 2"``
with ``--nproc 2``). A configuration that fails (out of memory, say) is recorded with its error
and the others still run.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from typing import Dict, List

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from megatron_lasp.atomic import write_text_atomic  # noqa: E402

CATEGORIES = ("matmul", "lightning_attn", "softmax_attn", "fused_triton", "other_triton", "elementwise", "copies",
              "loss", "optimizer", "communication", "other")

_MATMUL = re.compile(r"gemm|cutlass|xmma|nvjet|cublas|gemv|splitk|wgmma|matmul|sm90_|sm80_", re.I)
_COPY = re.compile(r"copy|memcpy|memset|fill|cat_|catarray|to_copy|direct_copy|index|gather|scatter", re.I)
_SOFTMAX_ATTN = re.compile(r"flash|fmha|efficient_attention|sdpa|flex_attention|varlen_attn", re.I)
_ELEMENTWISE = re.compile(r"elementwise|vectorized|unrolled|reduce|softmax|norm|pointwise|launch_", re.I)


def _triton_names():
    """Kernel names of the lightning attention and of the fused elementwise ops."""
    from megatron_lasp.ops.fused import kernels as fused_kernels
    from megatron_lasp.ops.lightning_attn.triton_chunk import KERNEL_NAMES

    attn = set(KERNEL_NAMES)
    fused = {n for n in dir(fused_kernels) if n.startswith("_") and n.endswith("_kernel")}
    return attn, fused


def classify(name: str, scope: str, attn: set, fused: set) -> str:
    """The category of one GPU kernel, from its name and the scope ("loss", "optimizer" or "")."""
    if "nccl" in name.lower():
        return "communication"
    if _SOFTMAX_ATTN.search(name):  # a hybrid's softmax layers (flash / cuDNN / flex kernels)
        return "softmax_attn"
    if _MATMUL.search(name):
        return "matmul"
    if any(n in name for n in attn):
        return "lightning_attn"
    if any(n in name for n in fused):
        return "fused_triton"
    if scope:
        return scope
    if "triton" in name.lower():
        return "other_triton"
    if _COPY.search(name):
        return "copies"
    if _ELEMENTWISE.search(name):
        return "elementwise"
    return "other"


def breakdown_from_trace(trace_path: str, steps: int) -> Dict[str, object]:
    """GPU ms per step by category (and the top kernels) from a torch.profiler Chrome trace.

    A kernel's scope comes from its launch on the host: inside a ``lasp::loss`` or
    ``lasp::optimizer`` annotation (the forward of the loss, the optimizer step), inside the
    fused linear cross-entropy's forward (``_LinearCrossEntropy``), or inside the autograd node of
    the cross entropy (its backward).
    """
    with open(trace_path) as f:
        events = json.load(f)["traceEvents"]
    attn, fused = _triton_names()
    launches = {}  # correlation id -> (tid, ts)
    scopes = []  # (tid or None, start, end, scope)
    for e in events:
        cat, ph = e.get("cat", ""), e.get("ph")
        if ph != "X":
            continue
        if cat in ("cuda_runtime", "cuda_driver"):
            corr = e.get("args", {}).get("correlation")
            if corr is not None:
                launches[corr] = (e.get("tid"), e["ts"])
        elif cat == "user_annotation" and e["name"] in ("lasp::loss", "lasp::optimizer"):
            scopes.append((None, e["ts"], e["ts"] + e["dur"], e["name"].split("::")[1]))
        elif cat == "cpu_op" and (("evaluate_function" in e["name"] and "CrossEntropy" in e["name"])
                                  or e["name"] == "_LinearCrossEntropy"):
            # the loss's backward, and the fused linear cross-entropy's forward (its autograd
            # Function runs outside the loss annotation when the output layer calls it)
            scopes.append((e.get("tid"), e["ts"], e["ts"] + e["dur"], "loss"))
    totals = {c: 0.0 for c in CATEGORIES}
    per_kernel: Dict[str, float] = {}
    for e in events:
        if e.get("ph") != "X" or e.get("cat") not in ("kernel", "gpu_memcpy", "gpu_memset"):
            continue
        name = e["name"]
        scope = ""
        launch = launches.get(e.get("args", {}).get("correlation"))
        if launch is not None:
            tid, ts = launch
            for s_tid, start, end, s in scopes:
                if start <= ts <= end and (s_tid is None or s_tid == tid):
                    scope = s
                    break
        category = "copies" if e["cat"] != "kernel" else classify(name, scope, attn, fused)
        ms = e["dur"] / 1000.0 / steps
        totals[category] += ms
        key = f"{category}: {name[:90]}"
        per_kernel[key] = per_kernel.get(key, 0.0) + ms
    top = sorted(per_kernel.items(), key=lambda kv: -kv[1])[:25]
    return {"gpu_ms_per_step": totals, "top_kernels_ms_per_step": dict(top)}


# ---------------------------------------------------------------------------------------------- worker


def _annotate_loss_and_optimizer(state) -> None:
    """Wrap the loss computation and the optimizer step in profiler annotations (this process only)."""
    import torch
    from megatron.core.models.common.language_module.language_module import LanguageModule

    original_loss = LanguageModule.compute_language_model_loss

    def loss_with_scope(self, *args, **kwargs):
        with torch.profiler.record_function("lasp::loss"):
            return original_loss(self, *args, **kwargs)

    LanguageModule.compute_language_model_loss = loss_with_scope
    original_step = state.optimizer.step

    def step_with_scope(*args, **kwargs):
        with torch.profiler.record_function("lasp::optimizer"):
            return original_step(*args, **kwargs)

    state.optimizer.step = step_with_scope


def worker(argv: List[str], result_path: str, warmup: int, steps: int, profile_steps: int, trace_dir: str) -> None:
    import torch

    cuda = torch.cuda.is_available()

    def sync():
        if cuda:
            torch.cuda.synchronize()
    import torch.distributed as dist

    from megatron_lasp.parallel.state import destroy_parallel
    from megatron_lasp.training import logging_utils
    from megatron_lasp.training.loop import _is_logging_rank, _logging_setup, setup, train_step

    _logging_setup()
    total = warmup + steps + profile_steps
    state = setup(argv + ["--train-iters", str(total), "--log-interval", str(10 ** 6), "--eval-interval", "0"])
    train_cfg, peak_flops = state.config.training, state.config.logging.peak_flops
    _annotate_loss_and_optimizer(state)
    rank0 = _is_logging_rank(state.groups)
    result = {"argv": argv, "world_size": dist.get_world_size(), "tokens_per_step": train_cfg.global_batch_size * train_cfg.seq_length}
    losses = []
    for _ in range(warmup):
        losses.append(train_step(state)[0])
    sync()
    warmup_peak = logging_utils.memory_gib()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        losses.append(train_step(state)[0])
    sync()
    elapsed = time.perf_counter() - start
    peak = logging_utils.memory_gib()
    if state.step_graph is not None:
        # A replay allocates nothing: the graph's memory was allocated, and counted, at its capture
        # in the warm-up, so the timed steps' own peak would leave it out (19.9 against 33.5 GiB
        # eager at 8K on an H100, while 34.2 GiB were reserved).
        peak = max(peak, warmup_peak)
    flops_token = logging_utils.flops_per_token(state.model_config, state.padded_vocab_size,
                                                 seq_length=train_cfg.seq_length)
    hardware_token = flops_token + logging_utils.recompute_flops_per_token(state.model_config,
                                                                            seq_length=train_cfg.seq_length)
    tokens_s = result["tokens_per_step"] * steps / elapsed
    tflops = flops_token * tokens_s / result["world_size"] / 1e12
    result.update(
        ms_per_step=1000.0 * elapsed / steps, tokens_per_s=tokens_s, tflops_per_gpu=tflops,
        mfu=tflops * 1e12 / peak_flops, peak_flops=peak_flops, flops_per_token=flops_token,
        hardware_flops_per_token=hardware_token, hfu=hardware_token * tokens_s / result["world_size"] / peak_flops,
        peak_mem_gib=peak, max_reserved_gib=torch.cuda.max_memory_reserved() / 2 ** 30 if cuda else None,
        fused=bool(state.model_config.fused), recompute_granularity=state.model_config.recompute_granularity,
        recompute_modules=list(state.model_config.recompute_modules or []),
        recompute_elementwise=bool(state.model_config.recompute_elementwise),
    )
    if profile_steps:
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with profile(activities=activities) as prof:
            sync()
            t0 = time.perf_counter()
            for _ in range(profile_steps):
                losses.append(train_step(state)[0])
            sync()
            profiled = time.perf_counter() - t0
        if rank0:
            trace = os.path.join(trace_dir, f"trace_rank{dist.get_rank()}.json")
            prof.export_chrome_trace(trace)
            result.update(breakdown_from_trace(trace, profile_steps))
            result["profiled_ms_per_step"] = 1000.0 * profiled / profile_steps
            busy = sum(result["gpu_ms_per_step"].values())
            result["gpu_ms_per_step"]["idle"] = max(result["ms_per_step"] - busy, 0.0)
            os.remove(trace)
    result["losses"] = losses
    if rank0:
        write_text_atomic(result_path, json.dumps(result, indent=1))
    destroy_parallel()


# ---------------------------------------------------------------------------------------------- driver


def _run_config(name: str, train_flags: List[str], opts, workdir: str) -> dict:
    result_path = os.path.join(workdir, f"{re.sub(r'[^A-Za-z0-9_.-]', '_', name)}.json")
    worker_args = ["--worker", "--result", result_path, "--warmup", str(opts.warmup), "--steps", str(opts.steps),
                   "--profile-steps", str(opts.profile_steps), "--trace-dir", workdir, "--"] + train_flags
    script = os.path.abspath(__file__)
    if opts.nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={opts.nproc}",
               script] + worker_args
    else:
        cmd = [sys.executable, script] + worker_args
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    print(f"[bench] {name}: {' '.join(shlex.quote(c) for c in train_flags)}", flush=True)
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=opts.timeout)
    wall = time.perf_counter() - start
    if proc.returncode != 0 or not os.path.exists(result_path):
        lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
        err = next((ln for ln in reversed(lines) if "Error" in ln or "error" in ln), lines[-1] if lines else "?")
        print(f"[bench] {name}: FAILED ({err.strip()[:300]})", flush=True)
        return {"name": name, "flags": train_flags, "error": err.strip()[:1000], "wall_s": wall,
                "log_tail": lines[-40:]}
    with open(result_path) as f:
        result = json.load(f)
    result.update(name=name, flags=train_flags, wall_s=wall)
    print(f"[bench] {name}: {result['ms_per_step']:.1f} ms/step, {result['tokens_per_s']:.0f} tokens/s, "
          f"{result['tflops_per_gpu']:.1f} TFLOP/s/GPU, MFU {100 * result['mfu']:.1f}%"
          + (f" (HFU {100 * result['hfu']:.1f}%, recompute counted)" if result.get("hfu", 0) > result["mfu"] else "")
          + ", "
          f"peak {result['peak_mem_gib']:.1f} GiB ({wall:.0f} s)", flush=True)
    if "gpu_ms_per_step" in result:
        parts = ", ".join(f"{k} {v:.1f}" for k, v in result["gpu_ms_per_step"].items() if v >= 0.05)
        print(f"[bench] {name}: GPU ms/step: {parts}", flush=True)
    return result


def plot(json_path: str) -> str:
    """Draw ``training_bench.png`` next to the JSON: throughput / MFU and the GPU-time breakdown."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(json_path) as f:
        data = json.load(f)
    runs = [r for r in data["runs"] if "error" not in r]
    names = [r["name"] for r in runs]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.8))
    mfu = [100 * r["mfu"] for r in runs]
    bars = ax1.bar(names, mfu, color="tab:blue")
    for bar, r in zip(bars, runs):
        ax1.text(bar.get_x() + bar.get_width() / 2, bar.get_height(),
                 f"{r['tokens_per_s'] / 1e3:.1f}K tok/s\n{r['peak_mem_gib']:.0f} GiB", ha="center", va="bottom",
                 fontsize=8)
    ax1.set_ylabel("MFU (%)")
    ax1.set_ylim(0, max(mfu + [1]) * 1.3)
    ax1.set_title(data.get("title", "training step"))
    ax1.tick_params(axis="x", rotation=20)
    cats = list(CATEGORIES) + ["idle"]
    bottom = [0.0] * len(runs)
    cmap = plt.get_cmap("tab20")
    for i, c in enumerate(cats):
        vals = [r.get("gpu_ms_per_step", {}).get(c, 0.0) for r in runs]
        if not any(vals):
            continue
        ax2.bar(names, vals, bottom=bottom, label=c, color=cmap(i))
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax2.set_ylabel("ms per step (profiled GPU time)")
    ax2.set_title("GPU time by category")
    ax2.legend(fontsize=7, ncol=2)
    ax2.tick_params(axis="x", rotation=20)
    fig.tight_layout()
    out = os.path.join(os.path.dirname(os.path.abspath(json_path)), "training_bench.png")
    tmp = out + ".tmp.png"
    fig.savefig(tmp, dpi=120)
    os.replace(tmp, out)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--out", help="directory for training_bench.json / .png (created)")
    p.add_argument("--preset", default="tnl-1b", help="--model-preset of the runs")
    p.add_argument("--seq-length", type=int, default=131072, help="tokens per sample (micro-batch 1)")
    p.add_argument("--config", action="append", default=[], metavar="NAME=FLAGS",
                   help="one configuration: a name and its extra training flags (repeatable)")
    p.add_argument("--precision", choices=("bf16", "fp32"), default="bf16",
                   help="GPU runs: bf16 mixed precision (the default path) or fp32")
    p.add_argument("--common", default="", help="training flags added to every configuration")
    p.add_argument("--nproc", type=int, default=1, help="GPUs (processes) per configuration")
    p.add_argument("--steps", type=int, default=3, help="timed steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (compilation, allocator)")
    p.add_argument("--profile-steps", type=int, default=1, help="profiled steps after the timed ones (0: none)")
    p.add_argument("--timeout", type=float, default=600, help="seconds per configuration")
    p.add_argument("--plot", metavar="JSON", help="only draw the PNG from an earlier JSON")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--trace-dir", help=argparse.SUPPRESS)
    p.add_argument("train_flags", nargs="*", help=argparse.SUPPRESS)
    opts = p.parse_args(argv)

    if opts.worker:
        worker(opts.train_flags, opts.result, opts.warmup, opts.steps, opts.profile_steps, opts.trace_dir)
        return 0
    if opts.plot:
        if not os.path.isfile(opts.plot):
            p.error(f"--plot: {opts.plot} not found")
        print(plot(opts.plot))
        return 0
    if not opts.out:
        p.error("--out DIR is required")
    if min(opts.steps, opts.nproc) < 1 or min(opts.warmup, opts.profile_steps) < 0:
        p.error("--steps and --nproc must be positive, --warmup and --profile-steps non-negative")
    configs = []
    for spec in opts.config or ["default="]:
        name, sep, flags = spec.partition("=")
        if not sep or not name:
            p.error(f"--config {spec!r}: write NAME=FLAGS, e.g. 'unfused=--no-fusion'")
        configs.append((name, shlex.split(flags)))
    import torch

    base = ["--model-preset", opts.preset, "--seq-length", str(opts.seq_length), "--micro-batch-size", "1",
            "--mock-data", "--seed", "1234", "--lr", "3e-4", "--lr-warmup-iters", "1"]
    if torch.cuda.is_available():  # the GPU training setup; CPU runs (plumbing checks) train in fp32
        base += (["--bf16"] if opts.precision == "bf16" else []) + ["--ddp-impl", "megatron",
                                                                   "--use-distributed-optimizer"]
    base += shlex.split(opts.common)
    os.makedirs(opts.out, exist_ok=True)
    runs = []
    with tempfile.TemporaryDirectory(prefix="bench_training_") as workdir:
        for name, flags in configs:
            try:
                runs.append(_run_config(name, base + flags, opts, workdir))
            except subprocess.TimeoutExpired:
                print(f"[bench] {name}: timed out after {opts.timeout:.0f} s", flush=True)
                runs.append({"name": name, "flags": base + flags, "error": f"timed out after {opts.timeout} s"})

    data = {
        "title": f"{opts.preset}, {opts.seq_length // 1024}K tokens/step, {opts.nproc} GPU(s)"
                 + ("" if opts.precision == "bf16" else f", {opts.precision}"),
        "command": " ".join(shlex.quote(a) for a in [sys.executable, os.path.relpath(__file__, REPO)]
                            + (sys.argv[1:] if argv is None else list(argv))),
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__, "categories": list(CATEGORIES) + ["idle"], "runs": runs,
    }
    path = os.path.join(opts.out, "training_bench.json")
    write_text_atomic(path, json.dumps(data, indent=1))
    print(f"[bench] wrote {path}")
    try:
        print(f"[bench] wrote {plot(path)}")
    except ImportError:
        print("[bench] matplotlib missing: draw the PNG elsewhere with --plot JSON")
    return 0 if all("error" not in r for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
