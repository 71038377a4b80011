"""Benchmark of the gated delta rule (Gated DeltaNet's token mixer) and of what its sequence
parallelism adds, on one GPU.

For bf16 B1 H16 D128 at T = 8K, 32K, 128K, the median ms (``triton.testing.do_bench``) of the
forward and forward+backward (state in and out, gradients on all inputs) of:

- ``gdn``: ``chunk_gated_delta_rule`` with its GPU backend (fla's kernels), ``Dv = 128``: the op
  of a rank without sequence parallelism, or the first rank of a ``lasp`` / ``lasp2`` group;
- ``gdn-transform``: the same with ``Dv = 256`` (values ``[v | 0]``, state ``[S_in | I]``): the
  augmented call that every later rank makes to get its slice's transform
  (``megatron_lasp/parallel/delta_sp.py``); the ratio to ``gdn`` is the price of the transform;
- ``lightning``: our lightning-attention kernel (fixed decay) at the same shape, for scale;
- ``gdn-torch`` (8K only): the chunked PyTorch backend on the GPU, the fallback without fla.

    PYTHONPATH=. python benchmarks/bench_delta.py --out $OUT/delta     # delta.json + delta.png
    python benchmarks/bench_delta.py --plot docs/benchmarks/delta.json  # the plot again
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

LENGTHS = (8192, 32768, 131072)
B, H, D = 1, 16, 128


def _inputs(T, Dv, seed=0):
    import torch

    gen = torch.Generator(device="cuda").manual_seed(seed)
    bf = dict(device="cuda", dtype=torch.bfloat16)
    q = torch.randn(B, T, H, D, generator=gen, **bf)
    k = torch.nn.functional.normalize(torch.randn(B, T, H, D, generator=gen, device="cuda"), dim=-1).to(torch.bfloat16)
    v = torch.randn(B, T, H, Dv, generator=gen, **bf)
    g = -torch.nn.functional.softplus(torch.randn(B, T, H, generator=gen, device="cuda")) * 0.1
    beta = torch.sigmoid(torch.randn(B, T, H, generator=gen, device="cuda")).to(torch.bfloat16)
    h0 = torch.randn(B, H, D, Dv, generator=gen, device="cuda") * 0.1
    do = torch.randn(B, T, H, Dv, generator=gen, **bf)
    dht = torch.randn(B, H, D, Dv, generator=gen, device="cuda") * 0.1
    return q, k, v, g, beta, h0, do, dht


def _time(run, leaves_in, do, dht, rep=100):
    """Median ms of the forward (no grad) and of fwd+bwd of ``run(*leaves) -> (o, ht)``."""
    import torch
    from triton.testing import do_bench

    def fwd():
        with torch.no_grad():
            run(*leaves_in)

    leaves = [x.detach().clone().requires_grad_(x.is_floating_point()) for x in leaves_in]

    def fwd_bwd():
        o, ht = run(*leaves)
        torch.autograd.backward((o, ht), (do, dht))

    fwd()  # compile / autotune outside the timing
    fwd_bwd()
    return (do_bench(fwd, warmup=10, rep=rep, return_mode="median"),
            do_bench(fwd_bwd, warmup=10, rep=rep, return_mode="median", grad_to_none=leaves))


def bench(args):
    import torch

    from bench_kernels import bound_fla_autotune
    from megatron_lasp.ops.delta_rule import chunk_gated_delta_rule
    from megatron_lasp.ops.lightning_attn import chunk_lightning_attn

    import fla.ops.gated_delta_rule  # noqa: F401  (its kernels must be loaded to bound their autotuning)

    bounded = bound_fla_autotune(args.fla_configs)

    def gdn(backend):
        def run(q, k, v, g, beta, h0):
            return chunk_gated_delta_rule(q, k, v, g, beta, initial_state=h0, output_final_state=True,
                                          backend=backend)
        return run

    def lightning(q, k, v, g, beta, h0):
        slopes = torch.full((H,), 0.1, device="cuda")
        return chunk_lightning_attn(q, k, v, slopes, h0, True)

    rows = []
    for T in args.lengths:
        for name, Dv, run in (("gdn", D, gdn(None)), ("gdn-transform", 2 * D, gdn(None)), ("lightning", D, lightning),
                              ("gdn-torch", D, gdn("torch"))):
            if name == "gdn-torch" and T > 8192:
                continue
            q, k, v, g, beta, h0, do, dht = _inputs(T, Dv)
            try:
                fwd, fb = _time(run, (q, k, v, g, beta, h0), do, dht)
                rows.append({"impl": name, "T": T, "Dv": Dv, "fwd_ms": fwd, "fwd_bwd_ms": fb})
            except Exception as e:  # recorded, the run goes on
                rows.append({"impl": name, "T": T, "Dv": Dv, "error": f"{type(e).__name__}: {str(e)[:300]}"})
            print(json.dumps(rows[-1]), flush=True)
            torch.cuda.empty_cache()
    import fla

    record = {
        "command": " ".join(["python"] + sys.argv),
        "device": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "fla": getattr(fla, "__version__", "?"),
        "fla_kernels_bounded": bounded,
        "shape": {"B": B, "H": H, "Dk": D, "dtype": "bf16"},
        "rows": rows,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)) or ".", exist_ok=True)
    with open(args.out + ".json", "w", encoding="utf-8") as f:
        json.dump(record, f, indent=1)
    plot(args.out + ".json", args.out + ".png")


def plot(path, out_png):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(path, encoding="utf-8") as f:
        record = json.load(f)
    fig, ax = plt.subplots(figsize=(6, 4))
    for impl in ("gdn", "gdn-transform", "lightning", "gdn-torch"):
        pts = [(r["T"], r["fwd_bwd_ms"]) for r in record["rows"] if r["impl"] == impl and "fwd_bwd_ms" in r]
        if pts:
            ax.plot(*zip(*pts), marker="o", label=impl)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("tokens")
    ax.set_ylabel("fwd+bwd ms (median)")
    ax.set_title(f"gated delta rule, bf16 B1 H16 D128, {record['device']}")
    ax.legend()
    fig.tight_layout()
    from megatron_lasp.atomic import save_figure_atomic

    save_figure_atomic(fig, out_png)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", help="output prefix: writes OUT.json and OUT.png")
    p.add_argument("--lengths", type=int, nargs="+", default=list(LENGTHS))
    p.add_argument("--fla-configs", type=int, default=3, help="launch configs kept per autotuned fla kernel")
    p.add_argument("--plot", metavar="JSON", help="only redraw the PNG of a JSON written before")
    args = p.parse_args()
    if args.plot:
        plot(args.plot, os.path.splitext(args.plot)[0] + ".png")
    elif not args.out:
        p.error("--out is required (or --plot JSON)")
    else:
        bench(args)


if __name__ == "__main__":
    main()
