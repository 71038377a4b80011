"""The fused elementwise ops three ways: plain PyTorch, ``torch.compile`` of it, our Triton kernels.

For each op of ``megatron_lasp.ops.fused`` at the shapes of one TNL-1B layer (RMSNorm of the
hidden state, the q/k/v feature maps + sigmoid gate, the group norm x gate, the SGLU product),
forward + backward in bf16 is timed with CUDA events (median of ``--iters`` after warm-up) for:

- ``eager``: the plain PyTorch reference (``reference.py``, what ``--no-fusion`` runs);
- ``compile``: ``torch.compile`` of that same function (inductor, default mode, ``dynamic=False``);
  its compile time is reported separately;
- ``triton``: our fused kernels (the GPU default).

Each variant's outputs and input gradients are checked against the eager ones (max relative
difference, reported). For the ops that selective recompute frees and refills (all but the
feature maps), the refill is timed two ways: the forward into a new tensor plus a copy into the
freed storage (what a refill costs without an in-place kernel) and the forward written into the
storage directly (what ``megatron_lasp.ops.fused`` does), with the two checked bit for bit.
Output: ``OUT/fused_ops_bench.json`` and, with matplotlib, ``.png``.

Example (one H200, 32K tokens)::

    python benchmarks/bench_fused_ops.py --out docs/benchmarks/fused_ops --tokens 32768
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from megatron_lasp.atomic import save_figure_atomic, write_results  # noqa: E402


def _cases(tokens: int, hidden: int, heads: int, ffn: int, device):
    """``name -> (make_inputs, eager_fn, fused_fn)``; each fn maps the inputs to a tuple of outputs."""
    import torch

    from megatron_lasp.ops import fused as ops
    from megatron_lasp.ops.fused.reference import glu_ref, norm_gate_ref, qkv_features_ref, rms_norm_ref

    d = hidden // heads
    bf = torch.bfloat16

    def randn(*shape, dtype=bf):
        return torch.randn(*shape, device=device, dtype=dtype)

    def without_none(t):
        return tuple(x for x in t if x is not None)

    return {
        "rms_norm": (
            lambda: [randn(tokens, 1, hidden), 1 + 0.1 * randn(hidden)],
            lambda x, w: (rms_norm_ref(x, w, 1e-5),),
            lambda x, w: (ops.rms_norm(x, w, 1e-5),),
        ),
        "qkv_features": (
            lambda: [randn(tokens, 1, 4 * hidden)],
            lambda m: without_none(qkv_features_ref(m, heads, 4, d, True, True)),
            lambda m: without_none(ops.qkv_features(m, heads, 4, d, True, True)),
        ),
        "norm_gate": (
            lambda: [randn(tokens, 1, heads, d), torch.sigmoid(randn(tokens, 1, heads, d)),
                     1 + 0.1 * randn(hidden)],
            lambda o, sg, w: (norm_gate_ref(o, sg, w, 1, 1e-5),),
            lambda o, sg, w: (ops.norm_gate(o, sg, w, 1, 1e-5),),
        ),
        "glu": (
            lambda: [randn(tokens, 1, 2 * ffn)],
            lambda x: (glu_ref(x, False),),
            lambda x: (ops.glu(x, False),),
        ),
    }


def _fwd_bwd(fn, inputs, grads):
    import torch

    leaves = [x.detach().requires_grad_(True) for x in inputs]
    outs = fn(*leaves)
    torch.autograd.backward(outs, grads)
    return outs, [x.grad for x in leaves]


def _time(fn, inputs, grads, iters: int, warmup: int) -> float:
    import torch

    for _ in range(warmup):
        _fwd_bwd(fn, inputs, grads)
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        _fwd_bwd(fn, inputs, grads)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def _refills():
    """``name -> into(inputs, target)``: the fused forward written into ``target``."""
    from megatron_lasp.ops.fused import functions as f

    return {
        "rms_norm": lambda inputs, target: f.rms_norm_into(*inputs, 1e-5, target),
        "norm_gate": lambda inputs, target: f.norm_gate_into(*inputs, 1, 1e-5, target),
        "glu": lambda inputs, target: f.glu_into(*inputs, False, target),
    }


def _time_refill(fused, into, inputs) -> dict:
    """The refill of a freed output: new values + storage copy, against written in place (median ms,
    triton.testing.do_bench)."""
    import torch
    from triton.testing import do_bench

    from megatron_lasp.ops.fused.recompute import _copy_into

    with torch.no_grad():
        values = fused(*inputs)[0]
        copied, in_place = torch.empty_like(values), torch.empty_like(values)

        def by_copy():  # the refill of a recipe without an in-place kernel, as the recompute does it
            _copy_into(copied.untyped_storage(), fused(*inputs)[0])

        row = {"refill_copy_ms": do_bench(by_copy, return_mode="median"),
               "refill_in_place_ms": do_bench(lambda: into(inputs, in_place), return_mode="median"),
               "refill_bitwise_equal": bool(torch.equal(copied, in_place))}
    return row


def _rel(a, b) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def run(opts) -> dict:
    import torch

    device = torch.device("cuda")
    torch.manual_seed(0)
    results, refills = [], _refills()
    for name, (make, eager, fused) in _cases(opts.tokens, opts.hidden, opts.heads, opts.ffn, device).items():
        inputs = make()
        outs = eager(*inputs)
        grads = [torch.randn_like(o) for o in outs]
        ref_outs, ref_grads = _fwd_bwd(eager, inputs, grads)
        row = {"op": name, "tokens": opts.tokens}
        t0 = time.perf_counter()
        compiled = torch.compile(eager, dynamic=False)
        c_outs, c_grads = _fwd_bwd(compiled, inputs, grads)
        torch.cuda.synchronize()
        row["compile_s"] = time.perf_counter() - t0
        f_outs, f_grads = _fwd_bwd(fused, inputs, grads)
        for label, (o, g) in (("compile", (c_outs, c_grads)), ("triton", (f_outs, f_grads))):
            pairs = list(zip(o, ref_outs)) + [(a, b) for a, b in zip(g, ref_grads) if b is not None]
            row[f"{label}_max_rel_diff"] = max(_rel(a, b) for a, b in pairs)
        for label, fn in (("eager", eager), ("compile", compiled), ("triton", fused)):
            row[f"{label}_ms"] = _time(fn, inputs, grads, opts.iters, opts.warmup)
        if name in refills:
            row.update(_time_refill(fused, refills[name], inputs))
            print(f"[fused-ops] {name} refill: forward + copy {row['refill_copy_ms']:.3f} ms, in place "
                  f"{row['refill_in_place_ms']:.3f} ms, same bits: {row['refill_bitwise_equal']}", flush=True)
        print(f"[fused-ops] {name}: eager {row['eager_ms']:.3f} ms, compile {row['compile_ms']:.3f} ms "
              f"(compiled in {row['compile_s']:.0f} s), triton {row['triton_ms']:.3f} ms; rel. diff vs eager: "
              f"compile {row['compile_max_rel_diff']:.1e}, triton {row['triton_max_rel_diff']:.1e}", flush=True)
        results.append(row)
    return {
        "command": "python benchmarks/bench_fused_ops.py " + " ".join(sys.argv[1:]),
        "device": torch.cuda.get_device_name(0), "torch": torch.__version__,
        "shapes": {"tokens": opts.tokens, "hidden": opts.hidden, "heads": opts.heads, "ffn": opts.ffn},
        "what": "forward + backward, bf16, median ms", "ops": results,
        "total_ms": {v: sum(r[f"{v}_ms"] for r in results) for v in ("eager", "compile", "triton")},
    }


def plot(doc: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ops = [r["op"] for r in doc["ops"]]
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.27
    for i, v in enumerate(("eager", "compile", "triton")):
        ax.bar([j + (i - 1) * width for j in range(len(ops))], [r[f"{v}_ms"] for r in doc["ops"]], width,
               label=f"{v} ({doc['total_ms'][v]:.2f} ms in all)")
    ax.set_xticks(range(len(ops)))
    ax.set_xticklabels(ops)
    ax.set_ylabel("ms, forward + backward")
    ax.set_title(f"fused elementwise ops, {doc['shapes']['tokens'] // 1024}K tokens, bf16, {doc['device']}")
    ax.legend()
    save_figure_atomic(fig, path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="directory for fused_ops_bench.json / .png")
    p.add_argument("--tokens", type=int, default=32768)
    p.add_argument("--hidden", type=int, default=2048, help="TNL-1B's hidden size")
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--ffn", type=int, default=5632)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    opts = p.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        p.error("needs a CUDA GPU (the Triton kernels and CUDA-event timing)")
    doc = run(opts)
    path = write_results(opts.out, "fused_ops_bench", doc, plot)
    print(f"[fused-ops] wrote {path}; totals (ms): {doc['total_ms']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
