"""The fused output layer + cross entropy: ours against liger-kernel's and cut-cross-entropy's.

Each implementation computes the mean cross entropy of ``hidden @ weight.T`` over all tokens and
its gradients with respect to ``hidden`` and ``weight`` (bf16 inputs, TP = 1), at TNL-1B's hidden
size (2048) and vocabulary (64000), for several token counts:

- ``ours``: ``megatron_lasp.models.loss.linear_cross_entropy`` with the loss mask given (gradients
  in the forward pass, what the training loop runs);
- ``ours_triton``: the same with ``kernel="triton"`` (the softmax part of each chunk as two Triton
  kernels, ``megatron_lasp/ops/cross_entropy``; what training on a GPU runs); with several
  ``--triton-configs`` one variant per launch configuration, ``ours_triton_<block>x<warps>``;
- ``liger``: liger-kernel's ``LigerFusedLinearCrossEntropyFunction`` (``pip install liger-kernel``);
- ``cce``: cut-cross-entropy's ``linear_cross_entropy`` (``pip install cut-cross-entropy``), with
  its default gradient filter and, as ``cce_nofilter``, without it (``filter_eps=None``);
- ``torch``: the unfused ``F.cross_entropy(hidden @ weight.T)`` where its fp32 logits fit.

Per case: forward + backward median ms (CUDA events), peak memory above the inputs, and the
relative error of the loss and both gradients against an fp32 reference (chunked over tokens, so
that it never holds the whole logits) at the lengths up to ``--ref-max-tokens``; above it, against
ours. A library that is not installed, or that fails at a size, is recorded as such, not skipped
silently. Output: ``OUT/loss_bench.json`` and, with matplotlib, ``.png``.

Example (one H200)::

    python benchmarks/bench_loss.py --out docs/benchmarks/loss --tokens 8192 131072 1048576
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from megatron_lasp.atomic import save_figure_atomic, write_results  # noqa: E402


def _impls(triton_configs=("4096x8",)):
    """``name -> fn(x [N, H], w [V, H], target [N]) -> scalar mean loss`` (None where not installed)."""
    import torch
    import torch.nn.functional as F

    from megatron_lasp.models.loss import linear_cross_entropy

    def ours(x, w, t, kernel="torch"):
        n = x.shape[0]
        loss = linear_cross_entropy(x.view(n, 1, -1), w, t.view(1, n), loss_weights=torch.ones(1, n, device=x.device),
                                    kernel=kernel)
        return loss.sum() / n

    def plain(x, w, t):
        return F.cross_entropy((x @ w.t()).float(), t)

    def ours_triton(block_v, warps):
        def fn(x, w, t):
            from megatron_lasp.ops.cross_entropy.kernels import set_launch_config

            set_launch_config(block_v, warps)
            return ours(x, w, t, "triton")

        return fn

    impls = {"ours": ours}
    for cfg in triton_configs:
        block_v, warps = (int(p) for p in cfg.split("x"))
        impls["ours_triton" if len(triton_configs) == 1 else f"ours_triton_{cfg}"] = ours_triton(block_v, warps)
    impls.update({"liger": None, "cce": None, "cce_nofilter": None, "torch": plain})
    try:
        from liger_kernel.ops.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyFunction

        impls["liger"] = lambda x, w, t: LigerFusedLinearCrossEntropyFunction.apply(x, w, t)[0]
    except ImportError:
        pass
    try:
        from cut_cross_entropy import linear_cross_entropy as cce

        impls["cce"] = lambda x, w, t: cce(x, w, t, reduction="mean")
        # its default skips gradient entries below a bf16-level threshold; this one does not
        impls["cce_nofilter"] = lambda x, w, t: cce(x, w, t, reduction="mean", filter_eps=None)
    except ImportError:
        pass
    return impls


def _reference(x, w, t, chunk: int = 8192):
    """fp32 mean loss and gradients, chunked over tokens (exact softmax per row)."""
    import torch

    n = x.shape[0]
    wf = w.float()
    total = torch.zeros((), dtype=torch.float64, device=x.device)
    gx = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    gw = torch.zeros(w.shape, dtype=torch.float32, device=x.device)
    for s in range(0, n, chunk):
        xc = x[s:s + chunk].float()
        logits = xc @ wf.t()
        lse = torch.logsumexp(logits, dim=-1)
        tc = t[s:s + chunk]
        total += (lse - logits.gather(1, tc[:, None])[:, 0]).double().sum()
        p = torch.softmax(logits, dim=-1)
        p[torch.arange(p.shape[0], device=x.device), tc] -= 1
        p /= n
        gx[s:s + chunk] = p @ wf
        gw += p.t() @ xc
        del logits, p
    return (total / n).float(), gx, gw


def _rel(a, b) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _run_one(fn, x, w, t):
    import torch

    xl, wl = x.detach().requires_grad_(True), w.detach().requires_grad_(True)
    loss = fn(xl, wl, t)
    loss.backward()
    return loss.detach().float(), xl.grad, wl.grad


def run(opts) -> dict:
    import torch

    device = torch.device("cuda")
    impls = {k: v for k, v in _impls(opts.triton_configs).items()
             if not opts.impls or k in opts.impls or (k.startswith("ours_triton") and "ours_triton" in opts.impls)}
    rows = []
    for n in opts.tokens:
        torch.manual_seed(0)
        x = (torch.randn(n, opts.hidden, device=device) * opts.hidden ** -0.5 * 4).to(torch.bfloat16)
        w = (torch.randn(opts.vocab, opts.hidden, device=device) * 0.02).to(torch.bfloat16)
        t = torch.randint(0, opts.vocab, (n,), device=device)
        ref = _reference(x, w, t) if n <= opts.ref_max_tokens else None
        base = None
        for name, fn in impls.items():
            row = {"impl": name, "tokens": n}
            rows.append(row)
            if fn is None:
                row["status"] = "not installed"
                continue
            if name == "torch" and n * opts.vocab * 4 * 3 > opts.torch_max_bytes:
                row["status"] = f"skipped: fp32 logits of {n * opts.vocab * 4 / 2**30:.0f} GiB"
                continue
            try:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                before = torch.cuda.memory_allocated()
                out = _run_one(fn, x, w, t)
                torch.cuda.synchronize()
                row["peak_extra_gib"] = (torch.cuda.max_memory_allocated() - before) / 2**30
                against = ref if ref is not None else base
                if against is not None:
                    row["vs"] = "fp32 reference" if ref is not None else "ours"
                    row["rel_err_loss"], row["rel_err_dx"], row["rel_err_dw"] = (
                        _rel(a, b) for a, b in zip(out, against))
                if name == "ours":
                    base = out
                del out
                for _ in range(opts.warmup):
                    _run_one(fn, x, w, t)
                times = []
                for _ in range(opts.iters):
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                    _run_one(fn, x, w, t)
                    end.record()
                    torch.cuda.synchronize()
                    times.append(start.elapsed_time(end))
                row["fwd_bwd_ms"] = statistics.median(times)
                row["status"] = "ok"
            except Exception as e:  # a library failing at a size is a result
                row["status"] = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
                torch.cuda.empty_cache()
            print(f"[loss] {n} tokens {name}: " + ", ".join(
                f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()
                if k not in ("impl", "tokens")), flush=True)
        del x, w, t, ref, base
        torch.cuda.empty_cache()
    versions = {}
    for mod in ("liger_kernel", "cut_cross_entropy"):
        try:
            from importlib.metadata import version

            versions[mod] = version(mod.replace("_", "-"))
        except Exception:
            versions[mod] = None
    return {
        "command": "python benchmarks/bench_loss.py " + " ".join(sys.argv[1:]),
        "device": torch.cuda.get_device_name(0), "torch": torch.__version__, "versions": versions,
        "shapes": {"hidden": opts.hidden, "vocab": opts.vocab, "dtype": "bf16", "tp": 1},
        "triton_configs": opts.triton_configs,
        "what": "mean cross entropy of hidden @ weight.T, forward + backward (dx, dw), median ms; "
                "peak GiB above the inputs", "rows": rows,
    }


def plot(doc: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    names = sorted({r["impl"] for r in doc["rows"]}, key=lambda n: (not n.startswith("ours"), n))
    for impl in names:
        pts = [(r["tokens"], r["fwd_bwd_ms"], r["peak_extra_gib"]) for r in doc["rows"]
               if r["impl"] == impl and r.get("status") == "ok"]
        if pts:
            a1.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=impl)
            a2.plot([p[0] for p in pts], [p[2] for p in pts], "o-", label=impl)
    for ax, label in ((a1, "ms, forward + backward"), (a2, "peak GiB above the inputs")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("tokens")
        ax.set_ylabel(label)
        ax.legend()
    fig.suptitle(f"output layer + cross entropy, V={doc['shapes']['vocab']} H={doc['shapes']['hidden']} bf16, {doc['device']}")
    save_figure_atomic(fig, path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="directory for loss_bench.json / .png")
    p.add_argument("--tokens", type=int, nargs="+", default=[8192, 131072, 1048576])
    p.add_argument("--hidden", type=int, default=2048, help="TNL-1B's hidden size")
    p.add_argument("--vocab", type=int, default=64000, help="TNL-1B's vocabulary")
    p.add_argument("--ref-max-tokens", type=int, default=131072,
                   help="compare against the fp32 reference up to this many tokens (above: against ours)")
    p.add_argument("--torch-max-bytes", type=float, default=60 * 2**30,
                   help="skip the unfused torch loss where its logits (x3) would exceed this")
    p.add_argument("--impls", nargs="+", default=None,
                   choices=("ours", "ours_triton", "liger", "cce", "cce_nofilter", "torch"),
                   help="run only these (default: all; above --ref-max-tokens the errors are against ours: keep it)")
    p.add_argument("--triton-configs", nargs="+", default=["4096x8"], metavar="BLOCKxWARPS",
                   help="launch configurations of ours_triton (columns per block x warps), e.g. 2048x4 4096x8 8192x16")
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    opts = p.parse_args(argv)
    for cfg in opts.triton_configs:
        parts = cfg.split("x")
        if len(parts) != 2 or not all(q.isdigit() for q in parts):
            p.error(f"--triton-configs {cfg}: write BLOCKxWARPS, e.g. 4096x8")
    import torch

    if not torch.cuda.is_available():
        p.error("needs a CUDA GPU")
    path = write_results(opts.out, "loss_bench", run(opts), plot)
    print(f"[loss] wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
