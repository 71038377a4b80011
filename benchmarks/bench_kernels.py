"""Benchmark of the lightning-attention Triton kernels against flash-linear-attention and the HBM floor.

For bf16 B1 H16 D128 at T = 8K, 32K, 128K and one batch > 1 shape, times (median, CUDA events via
triton.testing.do_bench) the forward and forward+backward of ``chunk_lightning_attn`` (initial
state in, final state out, gradient on both) and of fla's ``chunk_simple_gla`` with
``g_gamma = -slopes`` and ``scale = 1.0`` (if importable). The HBM floor is the bytes of q, k, v, o
(forward) plus do, dq, dk, dv (backward) moved once, over the device-to-device copy bandwidth this
script measures. Writes JSON and a PNG plot.

    PYTHONPATH=. python benchmarks/bench_kernels.py --out docs/benchmarks/kernels_bench
    PYTHONPATH=. python benchmarks/bench_kernels.py --sweep   # launch-config sweep at T=32K
"""

import argparse
import dataclasses
import json
import sys

import torch
import triton
from triton.testing import do_bench

from megatron_lasp.ops.lightning_attn import chunk as la_chunk
from megatron_lasp.ops.lightning_attn import chunk_lightning_attn

SHAPES = [(1, 8192, 16, 128), (1, 32768, 16, 128), (1, 131072, 16, 128), (4, 8192, 16, 128)]


def copy_bandwidth() -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read plus bytes written."""
    x = torch.empty(2 * 1024**3 // 2, dtype=torch.bfloat16, device="cuda").normal_()
    y = torch.empty_like(x)
    ms = do_bench(lambda: y.copy_(x), warmup=50, rep=300, return_mode="median")
    return 2 * x.numel() * x.element_size() / (ms * 1e-3)


def make_inputs(B, T, H, D, dtype=torch.bfloat16):
    q = (torch.randn(B, T, H, D, device="cuda") * D ** -0.25).to(dtype)
    k = (torch.randn(B, T, H, D, device="cuda") * D ** -0.25).to(dtype)
    v = torch.randn(B, T, H, D, device="cuda").to(dtype)
    h0 = torch.randn(B, H, D, D, device="cuda")
    slopes = torch.tensor([2.0 ** (-8.0 * (h + 1) / H) for h in range(H)], device="cuda")
    do = torch.randn_like(v)
    dht = torch.randn_like(h0)
    return q, k, v, h0, slopes, do, dht


def ours(q, k, v, h0, slopes):
    return chunk_lightning_attn(q, k, v, slopes, h0, True, backend="triton")


def fla_fn():
    try:
        from fla.ops.simple_gla import chunk_simple_gla
    except Exception as e:  # optional baseline
        print(f"fla not available: {e!r}", flush=True)
        return None

    def run(q, k, v, h0, slopes):
        return chunk_simple_gla(q, k, v, g_gamma=-slopes, scale=1.0, initial_state=h0, output_final_state=True)

    return run


def time_fn(fn, inputs, warmup=25, rep=100):
    q, k, v, h0, slopes, do, dht = inputs

    def fwd():
        with torch.no_grad():
            fn(q, k, v, h0, slopes)

    leaves = [x.detach().clone().requires_grad_(True) for x in (q, k, v, h0)]

    def fwd_bwd():
        o, ht = fn(*leaves[:3], leaves[3], slopes)
        torch.autograd.backward((o, ht), (do, dht))

    fwd_ms = do_bench(fwd, warmup=warmup, rep=rep, return_mode="median")
    fb_ms = do_bench(fwd_bwd, warmup=warmup, rep=rep, return_mode="median", grad_to_none=leaves)
    return fwd_ms, fb_ms


def errors_vs(fn_a, fn_b, inputs):
    """Relative difference of o and dq between two implementations (sanity for the baseline)."""
    q, k, v, h0, slopes, do, dht = inputs
    outs = []
    for fn in (fn_a, fn_b):
        leaves = [x.detach().clone().requires_grad_(True) for x in (q, k, v, h0)]
        o, ht = fn(*leaves[:3], leaves[3], slopes)
        torch.autograd.backward((o, ht), (do, dht))
        outs.append((o.float(), leaves[0].grad.float()))
    return [((a - b).norm() / b.norm()).item() for a, b in zip(outs[0], outs[1])]


def sweep(args):
    B, T, H, D = 1, 32768, 16, 128
    inputs = make_inputs(B, T, H, D)
    rows = []
    # (block, segment, tile, warps, stages, state_tile, state_warps)
    grid = [
        (64, 1024, 64, 4, 2, 64, 4),
        (64, 1024, 64, 8, 2, 64, 4),
        (64, 1024, 128, 8, 2, 64, 4),
        (64, 512, 64, 8, 2, 64, 4),
        (64, 2048, 64, 8, 2, 64, 4),
        (32, 1024, 64, 4, 2, 64, 4),
        (128, 1024, 64, 8, 2, 64, 4),
        (64, 1024, 64, 8, 3, 64, 4),
        (64, 1024, 64, 8, 2, 128, 8),
        (64, 1024, 32, 4, 2, 64, 4),
    ]
    for block, segment, tile, warps, stages, state_tile, state_warps in grid:
        cfg = la_chunk.TritonConfig(block=block, segment=segment, tile=tile, num_warps=warps, num_stages=stages,
                                    state_tile=state_tile, state_warps=state_warps)
        la_chunk.CONFIG_OVERRIDE = cfg
        try:
            fwd_ms, fb_ms = time_fn(ours, inputs, warmup=10, rep=40)
        except Exception as e:  # out of resources and the like
            print(f"{cfg}: failed {type(e).__name__}: {str(e)[:100]}", flush=True)
            continue
        rows.append(dict(config=dataclasses.asdict(cfg), fwd_ms=fwd_ms, fwd_bwd_ms=fb_ms))
        print(f"{cfg}: fwd {fwd_ms:.3f} ms fwd+bwd {fb_ms:.3f} ms", flush=True)
    la_chunk.CONFIG_OVERRIDE = None
    rows.sort(key=lambda r: r["fwd_bwd_ms"])
    print("best:", rows[:3])
    if args.out:
        with open(args.out + "_sweep.json", "w") as f:
            json.dump(dict(command=" ".join(["python"] + sys.argv), shape=[B, T, H, D], rows=rows), f, indent=1)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=None, help="output path prefix (writes PREFIX.json and PREFIX.png)")
    parser.add_argument("--sweep", action="store_true", help="sweep launch configs at B1 T32K H16 D128")
    parser.add_argument("--no-fla", action="store_true")
    args = parser.parse_args()
    torch.manual_seed(0)
    if args.sweep:
        return sweep(args)
    bw = copy_bandwidth()
    print(f"copy bandwidth {bw / 1e12:.2f} TB/s", flush=True)
    fla = None if args.no_fla else fla_fn()
    rows = []
    for B, T, H, D in SHAPES:
        inputs = make_inputs(B, T, H, D)
        tensor_bytes = B * T * H * D * 2
        floor_fwd = 4 * tensor_bytes / bw * 1e3
        floor_fb = 11 * tensor_bytes / bw * 1e3
        row = dict(B=B, T=T, H=H, D=D, dtype="bf16", floor_fwd_ms=floor_fwd, floor_fwd_bwd_ms=floor_fb)
        row["ours_fwd_ms"], row["ours_fwd_bwd_ms"] = time_fn(ours, inputs)
        if fla is not None:
            row["fla_fwd_ms"], row["fla_fwd_bwd_ms"] = time_fn(fla, inputs)
            row["rel_diff_vs_fla_o"], row["rel_diff_vs_fla_dq"] = errors_vs(ours, fla, inputs)
        rows.append(row)
        print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)
        del inputs
        torch.cuda.empty_cache()
    meta = dict(command=" ".join(["python"] + sys.argv), device=torch.cuda.get_device_name(),
                torch=torch.__version__, triton=triton.__version__, copy_bandwidth_TBps=bw / 1e12,
                fla=getattr(__import__("fla"), "__version__", "?") if fla is not None else None,
                config_rule="megatron_lasp.ops.lightning_attn.chunk._triton_config")
    if args.out:
        with open(args.out + ".json", "w") as f:
            json.dump(dict(meta=meta, rows=rows), f, indent=1)
        plot(rows, args.out + ".png")


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"B{r['B']} T{r['T'] // 1024}K" for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, title in ((axes[0], "fwd", "forward"), (axes[1], "fwd_bwd", "forward + backward")):
        series = [("ours", f"ours_{key}_ms"), ("fla chunk_simple_gla", f"fla_{key}_ms"),
                  ("HBM floor", f"floor_{key}_ms")]
        width = 0.8 / len(series)
        for i, (name, col) in enumerate(series):
            vals = [r.get(col, float("nan")) for r in rows]
            ax.bar([x + i * width for x in range(len(rows))], vals, width, label=name)
        ax.set_xticks([x + width for x in range(len(rows))], labels)
        ax.set_ylabel("ms (median)")
        ax.set_yscale("log")
        ax.set_title(f"lightning attention {title}, bf16 H16 D128")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
