"""Benchmark of the lightning-attention Triton kernels against flash-linear-attention and the HBM floor.

For bf16 B1 H16 D128 at T = 8K, 32K, 128K and one batch > 1 shape, times (median of
triton.testing.do_bench, CUDA events) the forward and forward+backward of ``chunk_lightning_attn``
(initial state in, final state out, gradients on both) and of fla's ``chunk_simple_gla`` with
``g_gamma = -slopes`` and ``scale = 1.0``. The HBM floor is the bytes of q, k, v, o (forward) plus
do, dq, dk, dv (backward) moved once, over the device-to-device copy bandwidth measured here.

    # on the GPU (the run that made docs/benchmarks/kernels_bench*.json):
    PYTHONPATH=. python benchmarks/bench_kernels.py --sweep --out $OUT/kernels
    PYTHONPATH=. python benchmarks/bench_kernels.py --impl ours --config-json $OUT/kernels_sweep.json --out $OUT/kernels_bench
    PYTHONPATH=. python benchmarks/bench_kernels.py --impl fla --fla-autotune pruned --out $OUT/kernels_bench_fla
    # packed documents: bf16 errors with boundaries and the time overhead of boundaries vs none
    PYTHONPATH=. python benchmarks/bench_kernels.py --packed --out $OUT/kernels
    # per-token gates: ours gated, ours fixed-decay, fla g_gamma and fla per-token g, one run
    PYTHONPATH=. python benchmarks/bench_kernels.py --gated --out $OUT/kernels   # kernels_gated.json + .png
    # anywhere, the plot from the JSON files:
    python benchmarks/bench_kernels.py --plot docs/benchmarks/kernels_bench.json docs/benchmarks/kernels_bench_fla.json

fla autotunes about 48 launch configs per kernel; ``--fla-autotune pruned`` keeps those with 4 or 8
warps and 2 or 3 stages (a quarter), to fit the device-time budget; the fla 0.6.0 numbers with its
full autotuning measured on an H200 in an earlier run (``FLA_REFERENCE``) are drawn as reference.
"""

import argparse
import json
import os
import sys

SHAPES = [(1, 8192, 16, 128), (1, 32768, 16, 128), (1, 131072, 16, 128), (4, 8192, 16, 128)]
# fla 0.6.0 chunk_simple_gla, bf16 B1 H16 D128, one H200, full autotuning: T -> (fwd ms, fwd+bwd ms).
FLA_REFERENCE = {8192: (0.41, 1.83), 32768: (0.46, 2.21), 131072: (1.79, 8.69)}
# Sweep candidates: overrides of the launch heuristic (fields of TritonOptions).
SWEEP_LOCAL = [
    {},
    {"state_tile": 128, "state_warps": 8},
    {"state_tile": 128, "state_warps": 4},
]
SWEEP = [
    {},  # the default: 512 programs (1024 until 2026-12-07: 1.361 vs 1.259 ms at 32K on an H100)
    {"num_stages": 3},
    {"num_warps": 8},
    {"programs": 1024},
    {"programs": 256},
    {"programs": 128},
    {"tile": 128, "num_warps": 8},
]
# --sweep-set gated: the same kind of overrides for the per-token-gate kernels (their extra loads and
# row sums may want other launches than the fixed decay's), timed at T32K and T128K.
SWEEP_GATED = [
    {},
    {"programs": 1024},  # the fixed decay's default (the gated one aims at 512 programs)
    {"programs": 256},
    {"segment": 8192},  # past the heuristic's 4096-token cap
    {"num_stages": 3},
    {"state_tile": 64, "state_warps": 4},
]
GATED_SWEEP_LENGTHS = (8192, 32768, 131072)


def copy_bandwidth() -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read plus bytes written."""
    import torch
    from triton.testing import do_bench

    x = torch.empty(1024**3, dtype=torch.bfloat16, device="cuda").normal_()
    y = torch.empty_like(x)
    ms = do_bench(lambda: y.copy_(x), warmup=50, rep=300, return_mode="median")
    return 2 * x.numel() * x.element_size() / (ms * 1e-3)


def make_inputs(B, T, H, D):
    import torch

    q = (torch.randn(B, T, H, D, device="cuda") * D ** -0.25).to(torch.bfloat16)
    k = (torch.randn(B, T, H, D, device="cuda") * D ** -0.25).to(torch.bfloat16)
    v = torch.randn(B, T, H, D, device="cuda").to(torch.bfloat16)
    h0 = torch.randn(B, H, D, D, device="cuda")
    slopes = torch.tensor([2.0 ** (-8.0 * (h + 1) / H) for h in range(H)], device="cuda")
    return q, k, v, h0, slopes, torch.randn_like(v), torch.randn_like(h0)


def ours_fn(options=None):
    from megatron_lasp.ops.lightning_attn import chunk_lightning_attn

    def run(q, k, v, h0, slopes):
        return chunk_lightning_attn(q, k, v, slopes, h0, True, backend="triton", triton_options=options)

    return run


def fla_fn(autotune: str):
    import triton

    if autotune == "pruned":
        real = triton.autotune

        def pruned(configs, *args, **kwargs):
            keep = [c for c in configs if c.num_warps in (4, 8) and c.num_stages in (2, 3)]
            return real(keep or configs, *args, **kwargs)

        triton.autotune = pruned
    from fla.ops.simple_gla import chunk_simple_gla

    def run(q, k, v, h0, slopes):
        return chunk_simple_gla(q, k, v, g_gamma=-slopes, scale=1.0, initial_state=h0, output_final_state=True)

    return run


def _fwd_bwd_step(fn, inputs):
    """``(step, leaves)``: one fwd+bwd of ``fn`` on fresh leaves of q, k, v, h0 (their gradients accumulate)."""
    import torch

    q, k, v, h0, slopes, do, dht = inputs
    leaves = [x.detach().clone().requires_grad_(True) for x in (q, k, v, h0)]

    def fwd_bwd():
        o, ht = fn(*leaves[:3], leaves[3], slopes)
        torch.autograd.backward((o, ht), (do, dht))

    return fwd_bwd, leaves


def time_fn(fn, inputs, warmup=25, rep=100):
    """Median ms of the forward (no grad) and of fwd+bwd, each launched from Python."""
    import torch
    from triton.testing import do_bench

    q, k, v, h0, slopes, do, dht = inputs

    def fwd():
        with torch.no_grad():
            fn(q, k, v, h0, slopes)

    fwd_bwd, leaves = _fwd_bwd_step(fn, inputs)
    fwd_ms = do_bench(fwd, warmup=warmup, rep=rep, return_mode="median")
    fb_ms = do_bench(fwd_bwd, warmup=warmup, rep=rep, return_mode="median", grad_to_none=leaves)
    return fwd_ms, fb_ms


def graph_time_fn(fn, inputs, rep=100):
    """Median ms of fwd+bwd replayed from a CUDA graph: the GPU's time without the host's launch
    overhead (what a step captured in a graph, or one whose launches run ahead of the GPU, pays).
    ``fn`` must have run before (autotuning is not captured); a refused capture returns its error."""
    from triton.testing import do_bench_cudagraph

    fwd_bwd, leaves = _fwd_bwd_step(fn, inputs)
    try:
        return do_bench_cudagraph(fwd_bwd, rep=rep, grad_to_none=leaves, return_mode="median")
    except Exception as e:  # a host sync inside the op: recorded, the run goes on
        return f"{type(e).__name__}: {str(e)[:200]}"


def options_from_json(path):
    """The TritonOptions of a --sweep output's best overrides (none without a path)."""
    from megatron_lasp.ops.lightning_attn import TritonOptions

    if not path:
        return TritonOptions()
    with open(path) as f:
        return TritonOptions(**json.load(f)["best_tuning"])


def sweep_gated(args):
    """Launch overrides of the gated kernels at B1 H16 D128 bf16, T32K and T128K: fwd+bwd from a CUDA
    graph (GPU time) against the fixed-decay kernel's default launch in the same run."""
    import torch
    from megatron_lasp.ops.lightning_attn import TritonOptions, chunk_lightning_attn
    from megatron_lasp.ops.lightning_attn.triton_chunk import triton_config

    torch.manual_seed(0)
    rows, baseline = [], {}
    for T in GATED_SWEEP_LENGTHS:
        B, H, D = 1, 16, 128
        inputs = make_inputs(B, T, H, D)
        g_leaf = make_gates(B, T, H).requires_grad_(True)
        fixed = ours_fn()
        time_fn(fixed, inputs, warmup=10, rep=20)  # compiled before the capture
        baseline[T] = graph_time_fn(fixed, inputs)
        print(f"T={T} fixed (default launch): {baseline[T]}", flush=True)
        for tuning in SWEEP_GATED:
            options = TritonOptions(**tuning)

            def fn(q_, k_, v_, h_, s_, options=options, g=g_leaf):
                return chunk_lightning_attn(q_, k_, v_, None, h_, True, backend="triton", g=g,
                                            triton_options=options)

            cfg = triton_config(B, T, H, D, D, inputs[0].device, inputs[0].dtype, options, gated=True)
            try:
                time_fn(fn, inputs, warmup=10, rep=20)
                ms = graph_time_fn(fn, inputs)
            except Exception as e:  # out of resources and the like
                ms = f"{type(e).__name__}: {str(e)[:100]}"
            row = dict(T=T, tuning=tuning, config=cfg.__dict__, fwd_bwd_graph_ms=ms)
            if isinstance(ms, float) and isinstance(baseline[T], float):
                row["gated_vs_fixed_graph"] = ms / baseline[T]
            rows.append(row)
            print(f"T={T} {tuning}: {ms} ({row.get('gated_vs_fixed_graph', float('nan')):.3f}x fixed)", flush=True)
        del inputs, g_leaf
        torch.cuda.empty_cache()
    timed = [r for r in rows if "gated_vs_fixed_graph" in r]
    # the override with the lowest worst ratio over the lengths
    worst = {}
    for r in timed:
        key = json.dumps(r["tuning"], sort_keys=True)
        worst[key] = max(worst.get(key, 0.0), r["gated_vs_fixed_graph"])
    best = json.loads(min(worst, key=worst.get)) if worst else {}
    print("best:", best, worst.get(json.dumps(best, sort_keys=True)), flush=True)
    with open(args.out + "_sweep_gated.json", "w") as f:
        json.dump(dict(command=" ".join(["python"] + sys.argv), device=torch.cuda.get_device_name(),
                       fixed_graph_ms=baseline, rows=rows, worst_ratio=worst, best_tuning=best), f, indent=1)


def sweep(args):
    import torch
    from megatron_lasp.ops.lightning_attn import TritonOptions
    from megatron_lasp.ops.lightning_attn.triton_chunk import triton_config

    B, T, H, D = 1, args.sweep_seq_length, 16, 128
    inputs = make_inputs(B, T, H, D)
    rows = []
    for tuning in (SWEEP_LOCAL if args.sweep_set == "local" else SWEEP):
        options = TritonOptions(**tuning)
        fn = ours_fn(options)
        cfg = triton_config(B, T, H, D, D, inputs[0].device, inputs[0].dtype, options)
        try:
            fwd_ms, fb_ms = time_fn(fn, inputs, warmup=10, rep=50)
        except Exception as e:  # out of resources and the like
            print(f"{tuning}: failed {type(e).__name__}: {str(e)[:100]}", flush=True)
            continue
        rows.append(dict(tuning=tuning, config=cfg.__dict__, fwd_ms=fwd_ms, fwd_bwd_ms=fb_ms))
        print(f"{tuning} {cfg}: fwd {fwd_ms:.3f} ms fwd+bwd {fb_ms:.3f} ms", flush=True)
        torch.cuda.synchronize()
    best = min(rows, key=lambda r: r["fwd_bwd_ms"])
    print("best:", best, flush=True)
    suffix = "" if T == 32768 else f"_{T // 1024}k"
    with open(args.out + ("_sweep_local" if args.sweep_set == "local" else "_sweep") + suffix + ".json", "w") as f:
        json.dump(dict(command=" ".join(["python"] + sys.argv), shape=[B, T, H, D], rows=rows,
                       best_tuning=best["tuning"]), f, indent=1)


def bench(args):
    import torch
    import triton

    torch.manual_seed(0)
    meta = dict(command=" ".join(["python"] + sys.argv), device=torch.cuda.get_device_name(),
                torch=torch.__version__, triton=triton.__version__, impl=args.impl)
    if args.impl == "ours":
        options = options_from_json(args.config_json)
        meta["tuning"] = options.overrides()
        fn = ours_fn(options)
    else:
        fn = fla_fn(args.fla_autotune)
        meta["fla_autotune"] = args.fla_autotune
        meta["fla"] = getattr(sys.modules.get("fla"), "__version__", "?")
    bw = copy_bandwidth()
    meta["copy_bandwidth_TBps"] = bw / 1e12
    print(f"copy bandwidth {bw / 1e12:.2f} TB/s", flush=True)
    rows = []
    for B, T, H, D in SHAPES:
        inputs = make_inputs(B, T, H, D)
        nbytes = B * T * H * D * 2
        row = dict(B=B, T=T, H=H, D=D, dtype="bf16", floor_fwd_ms=4 * nbytes / bw * 1e3,
                   floor_fwd_bwd_ms=11 * nbytes / bw * 1e3)
        row["fwd_ms"], row["fwd_bwd_ms"] = time_fn(fn, inputs)
        rows.append(row)
        print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)
        # written after every shape, so that a run cut short keeps what it measured
        with open(args.out + ".json", "w") as f:
            json.dump(dict(meta=meta, rows=rows), f, indent=1)
        del inputs
        torch.cuda.empty_cache()


# Document layouts of --packed: (name, mean document length in tokens); the starts are random
# (uniform cuts), so boundaries land inside blocks, on block and segment edges, with some length-1
# documents when the mean is short.
PACKED_LAYOUTS = [("docs~2048", 2048), ("docs~256", 256), ("docs~16", 16)]
PACKED_OVERHEAD_TARGET = 0.05


def _random_cu_seqlens(total: int, mean_len: int, seed: int):
    import torch

    g = torch.Generator().manual_seed(seed)
    n_cuts = max(1, total // mean_len - 1)
    cuts = torch.randperm(total - 1, generator=g)[:n_cuts] + 1
    cuts = torch.cat([torch.tensor([0, total // 2, total // 2 + 1]), cuts.sort().values, torch.tensor([total])])
    return torch.unique(cuts).to(torch.int32)


def packed(args):
    """bf16/fp32 errors with documents vs the fp64 torch backend, and the time of boundaries vs none."""
    import torch
    import triton

    from megatron_lasp.ops.lightning_attn import chunk_lightning_attn

    options = options_from_json(args.config_json)
    meta = dict(command=" ".join(["python"] + sys.argv), device=torch.cuda.get_device_name(),
                torch=torch.__version__, triton=triton.__version__, tuning=options.overrides(),
                overhead_target=PACKED_OVERHEAD_TARGET,
                reference="torch chunked backend in fp64 on the GPU with the same cu_seqlens")
    rows = []
    fn = ours_fn(options)
    for B, T, H, D in [(1, 32768, 16, 128), (1, 8192, 16, 128)]:
        inputs = make_inputs(B, T, H, D)
        q, k, v, h0, slopes, do, dht = inputs
        base_fwd, base_fb = time_fn(fn, inputs)
        rows.append(dict(B=B, T=T, H=H, D=D, layout="none", n_docs=B, fwd_ms=base_fwd, fwd_bwd_ms=base_fb))
        print(f"T={T} none: fwd {base_fwd:.3f} ms fwd+bwd {base_fb:.3f} ms", flush=True)
        for name, mean_len in PACKED_LAYOUTS:
            cu = _random_cu_seqlens(B * T, mean_len, seed=T + mean_len).cuda()

            def run(q_, k_, v_, h0_, slopes_, cu=cu):
                return chunk_lightning_attn(q_, k_, v_, slopes_, h0_, True, backend="triton", cu_seqlens=cu,
                                            triton_options=options)

            fwd_ms, fb_ms = time_fn(run, inputs)
            row = dict(B=B, T=T, H=H, D=D, layout=name, n_docs=int(cu.numel() - 1), fwd_ms=fwd_ms, fwd_bwd_ms=fb_ms,
                       fwd_overhead=fwd_ms / base_fwd - 1, fwd_bwd_overhead=fb_ms / base_fb - 1)
            row["overhead_ok"] = max(row["fwd_overhead"], row["fwd_bwd_overhead"]) <= PACKED_OVERHEAD_TARGET
            row["errors"] = _packed_errors(q, k, v, h0, slopes, do, dht, cu)
            rows.append(row)
            print(" ".join(f"{k_}={v_:.4g}" if isinstance(v_, float) else f"{k_}={v_}" for k_, v_ in row.items()),
                  flush=True)
            with open(args.out + "_packed.json", "w") as f:
                json.dump(dict(meta=meta, rows=rows), f, indent=1)
        del inputs, q, k, v, h0, do, dht
        torch.cuda.empty_cache()
    ok = all(r.get("overhead_ok", True) for r in rows if r["T"] == 32768)
    print(f"overhead at T=32K {'within' if ok else 'ABOVE'} {PACKED_OVERHEAD_TARGET:.0%}", flush=True)


def _packed_errors(q, k, v, h0, slopes, do, dht, cu):
    """Relative errors (o, final state, dq, dk, dv, dh0) of triton bf16 and fp32 vs fp64 torch."""
    import torch

    from megatron_lasp.ops.lightning_attn import chunk_lightning_attn

    def grads(backend, cast):
        leaves = [cast(x).requires_grad_(True) for x in (q, k, v, h0)]
        o, ht = chunk_lightning_attn(*leaves[:3], slopes, leaves[3], True, backend=backend, cu_seqlens=cu)
        torch.autograd.backward((o, ht), (cast(do).to(o.dtype), dht.to(ht.dtype)))
        out = [o.detach(), ht.detach()] + [x.grad for x in leaves]
        del leaves, o, ht
        return out

    def rel(a, b):
        if not torch.isfinite(a).all():
            return float("nan")
        return ((a.double() - b).norm() / b.norm().clamp_min(1e-300)).item()

    names = ["o", "final_state", "dq", "dk", "dv", "d_initial_state"]
    ref = grads("torch", lambda x: x.detach().double())
    errors = {}
    for label, cast in (("bf16", lambda x: x.detach().clone()), ("fp32", lambda x: x.detach().float())):
        got = grads("triton", cast)
        errors[label] = {n: rel(a, b) for n, a, b in zip(names, got, ref)}
        del got
    del ref
    torch.cuda.empty_cache()
    return errors


def graph_and_profile(args):
    """CPU-overhead-free timing (CUDA graph replay) and a per-kernel GPU-time breakdown."""
    import torch
    from triton.testing import do_bench_cudagraph

    fn = ours_fn()
    rows = []
    for B, T, H, D in [(1, 8192, 16, 128), (1, 32768, 16, 128)]:
        q, k, v, h0, slopes, do, dht = make_inputs(B, T, H, D)
        leaves = [x.detach().clone().requires_grad_(True) for x in (q, k, v, h0)]

        def fwd_bwd():
            o, ht = fn(*leaves[:3], leaves[3], slopes)
            torch.autograd.backward((o, ht), (do, dht))

        def fwd():
            with torch.no_grad():
                fn(q, k, v, h0, slopes)

        for _ in range(3):
            fwd_bwd()
        torch.cuda.synchronize()
        row = dict(B=B, T=T, H=H, D=D)
        for name, f in (("fwd", fwd), ("fwd_bwd", fwd_bwd)):
            try:
                row[f"{name}_graph_ms"] = do_bench_cudagraph(f, rep=50, return_mode="median")
            except Exception as e:  # capture refused
                row[f"{name}_graph_error"] = repr(e)[:200]
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                fwd_bwd()
            torch.cuda.synchronize()
        kernels = {}
        for evt in prof.key_averages():
            if evt.device_time_total > 0:
                kernels[evt.key[:60]] = evt.device_time_total / 5 / 1e3
        row["kernel_ms_per_fwd_bwd"] = kernels
        row["kernel_ms_sum"] = sum(kernels.values())
        rows.append(row)
        print(json.dumps(row, indent=1), flush=True)
        with open(args.out + "_graph.json", "w") as f:
            json.dump(dict(command=" ".join(["python"] + sys.argv), rows=rows), f, indent=1)


def plot(paths, out_png):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = {}
    for path in paths:
        with open(path) as f:
            data = json.load(f)
        runs[data["meta"]["impl"]] = data
    ours = runs["ours"]["rows"]
    keys = [(r["B"], r["T"]) for r in ours]
    labels = [f"B{b} T{t // 1024}K" for b, t in keys]
    series = [("ours (triton)", {(r["B"], r["T"]): r for r in ours}, "")]
    if "fla" in runs:
        name = f"fla chunk_simple_gla ({runs['fla']['meta'].get('fla_autotune')} autotune)"
        series.append((name, {(r["B"], r["T"]): r for r in runs["fla"]["rows"]}, ""))
    series.append(("fla 0.6.0, earlier run (full autotune)",
                   {(1, t): dict(fwd_ms=a, fwd_bwd_ms=b) for t, (a, b) in FLA_REFERENCE.items()}, ""))
    series.append(("HBM floor", {(r["B"], r["T"]): dict(fwd_ms=r["floor_fwd_ms"], fwd_bwd_ms=r["floor_fwd_bwd_ms"])
                                 for r in ours}, ""))
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    width = 0.8 / len(series)
    for ax, key, title in ((axes[0], "fwd_ms", "forward"), (axes[1], "fwd_bwd_ms", "forward + backward")):
        for i, (name, table, _) in enumerate(series):
            vals = [table.get(kk, {}).get(key, float("nan")) for kk in keys]
            ax.bar([x + i * width for x in range(len(keys))], vals, width, label=name)
        ax.set_xticks([x + width * (len(series) - 1) / 2 for x in range(len(keys))], labels)
        ax.set_ylabel("ms (median)")
        ax.set_yscale("log")
        ax.set_title(f"lightning attention {title}, bf16, H16 D128, H200")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_png, dpi=120)


GATED_SHAPES = [(1, 8192, 16, 128), (1, 32768, 16, 128), (1, 131072, 16, 128), (4, 8192, 16, 128)]
GATED_TARGET_VS_FIXED = 1.25


def _fla_config_rank(c):
    """Which fla autotune configs to keep first: tiles of 64 or 128 (then 32, then smaller; what
    Hopper favours at D = 128), 4 or 8 warps, 2 or 3 stages; fla's order otherwise (sort is stable)."""
    tiles = [v for k, v in c.kwargs.items() if k.startswith("B") and isinstance(v, int) and k in ("BK", "BV", "BT")]
    far = sum(0 if v >= 64 else 1 if v == 32 else 2 for v in tiles)
    return far, c.num_warps not in (4, 8), c.num_stages not in (2, 3)


def bound_fla_autotune(max_configs: int) -> int:
    """Keep at most ``max_configs`` launch configs in every autotuned fla kernel (ranked by
    :func:`_fla_config_rank`), so that its autotuning takes seconds, not minutes. Call after
    importing fla's ops, before their first call. Returns the number of kernels bounded."""
    from triton.runtime.autotuner import Autotuner

    n = 0
    seen = set()
    for name, mod in list(sys.modules.items()):
        if not name.startswith("fla.") or mod is None:
            continue
        for obj in list(vars(mod).values()):
            # a kernel is an Autotuner, possibly under @triton.heuristics: follow the .fn chain
            for _ in range(4):
                if isinstance(obj, Autotuner):
                    if len(obj.configs) > max_configs and id(obj) not in seen:
                        ranked = sorted(obj.configs, key=_fla_config_rank)
                        obj.configs = ranked[:max_configs]
                        n += 1
                    seen.add(id(obj))
                    break
                obj = getattr(obj, "fn", None)
                if obj is None:
                    break
    return n


def make_gates(B, T, H):
    """Learned-gate-like log-decays: -softplus(x) scaled per head from 1e-3 to 1."""
    import torch

    scale = torch.logspace(-3, 0, H, device="cuda")
    return -torch.nn.functional.softplus(torch.randn(B, T, H, device="cuda")) * scale


def gated(args):
    """Per-token gates, one run: ours gated, ours fixed-decay, fla's chunk_simple_gla with g_gamma
    and (forced past its Hopper guard) with per-token g; fla's g checked against fp64."""
    import torch
    import triton

    from megatron_lasp.ops.lightning_attn import chunk_lightning_attn

    import fla
    import fla.ops.common.chunk_o as fla_chunk_o
    from fla.ops.simple_gla import chunk_simple_gla

    bounded = bound_fla_autotune(args.fla_configs)
    forced = False
    if not getattr(fla_chunk_o, "TRITON_ABOVE_3_7_1", True):
        # fla 0.6.0 refuses its gated backward on Hopper with Triton 3.4-3.7 (its issue #640);
        # forced here, and its numbers checked against fp64 below.
        fla_chunk_o.TRITON_ABOVE_3_7_1 = True
        forced = True
    meta = dict(command=" ".join(["python"] + sys.argv), device=torch.cuda.get_device_name(),
                torch=torch.__version__, triton=triton.__version__, fla=getattr(fla, "__version__", "?"),
                fla_autotune=f"at most {args.fla_configs} configs per kernel ({bounded} kernels bounded)",
                fla_g_forced=forced, target_vs_fixed=GATED_TARGET_VS_FIXED,
                gates="-softplus(randn) * logspace(-3, 0, H) per head, fp32")
    torch.manual_seed(0)
    rows = []
    for B, T, H, D in GATED_SHAPES:
        inputs = make_inputs(B, T, H, D)
        q, k, v, h0, slopes, do, dht = inputs
        g_leaf = make_gates(B, T, H).requires_grad_(True)
        impls = {
            "ours_gated": lambda q_, k_, v_, h_, s_: chunk_lightning_attn(q_, k_, v_, None, h_, True, backend="triton",
                                                                         g=g_leaf),
            "ours_fixed": lambda q_, k_, v_, h_, s_: chunk_lightning_attn(q_, k_, v_, s_, h_, True, backend="triton"),
            "fla_g_gamma": lambda q_, k_, v_, h_, s_: chunk_simple_gla(q_, k_, v_, g_gamma=-s_, scale=1.0,
                                                                      initial_state=h_, output_final_state=True),
            "fla_g": lambda q_, k_, v_, h_, s_: chunk_simple_gla(q_, k_, v_, g=g_leaf, scale=1.0, initial_state=h_,
                                                                output_final_state=True),
        }
        row = dict(B=B, T=T, H=H, D=D, dtype="bf16")
        for name, fn in impls.items():
            try:
                row[f"{name}_fwd_ms"], row[f"{name}_fwd_bwd_ms"] = time_fn(fn, inputs)
            except Exception as e:  # fla refusing or failing: recorded, the run goes on
                row[f"{name}_error"] = f"{type(e).__name__}: {str(e)[:300]}"
            print(f"T={T} {name}: " + " ".join(f"{k_}={v_:.4g}" if isinstance(v_, float) else f"{k_}={v_}"
                                                for k_, v_ in row.items() if k_.startswith(name)), flush=True)
        # CUDA-graph replays after all eager timings (a refused capture cannot spoil those)
        for name, fn in impls.items():
            if f"{name}_fwd_bwd_ms" in row:
                row[f"{name}_fwd_bwd_graph_ms"] = graph_time_fn(fn, inputs)
        print(f"T={T} CUDA graph fwd_bwd: " + " ".join(f"{k_[:-len('_fwd_bwd_graph_ms')]}={v_}" for k_, v_ in row.items()
                                                       if k_.endswith("_graph_ms")), flush=True)
        if "ours_gated_fwd_bwd_ms" in row:
            fb = row["ours_gated_fwd_bwd_ms"]
            row["gated_vs_fixed"] = fb / row.get("ours_fixed_fwd_bwd_ms", float("nan"))
            fla_best = min([row[f"{n}_fwd_bwd_ms"] for n in ("fla_g_gamma", "fla_g") if f"{n}_fwd_bwd_ms" in row],
                           default=float("nan"))
            row["gated_vs_fla_fastest"] = fb / fla_best
            # the same two ratios without the host's launch overhead (CUDA-graph replay)
            graph = {n: row.get(f"{n}_fwd_bwd_graph_ms") for n in ("ours_gated", "ours_fixed", "fla_g_gamma", "fla_g")}
            graph = {n: t for n, t in graph.items() if isinstance(t, float)}
            if "ours_gated" in graph:
                row["gated_vs_fixed_graph"] = graph["ours_gated"] / graph.get("ours_fixed", float("nan"))
                row["gated_vs_fla_fastest_graph"] = graph["ours_gated"] / min(
                    [t for n, t in graph.items() if n.startswith("fla")], default=float("nan"))
        if (B, T) == GATED_SHAPES[0][:2]:
            row["fla_g_errors_vs_fp64"], row["ours_gated_errors_vs_fp64"] = _gated_errors(
                q, k, v, h0, g_leaf.detach(), do, dht)
            print(f"T={T} errors vs fp64: fla g {row['fla_g_errors_vs_fp64']} ours {row['ours_gated_errors_vs_fp64']}",
                  flush=True)
        rows.append(row)
        with open(args.out + "_gated.json", "w") as f:
            json.dump(dict(meta=meta, rows=rows), f, indent=1)
        del inputs, q, k, v, h0, do, dht, impls
        torch.cuda.empty_cache()


def _gated_errors(q, k, v, h0, g, do, dht):
    """Relative errors (o, final state, dq, dk, dv, dg, dh0) of fla's per-token g path and of ours
    (bf16) against our torch backend in fp64 (itself checked against the token-by-token recurrence)."""
    import torch

    from megatron_lasp.ops.lightning_attn import chunk_lightning_attn

    names = ["o", "final_state", "dq", "dk", "dv", "dg", "d_initial_state"]

    def grads(fn, cast):
        leaves = [cast(x).detach().clone().requires_grad_(True) for x in (q, k, v, g, h0)]
        o, ht = fn(*leaves)
        torch.autograd.backward((o, ht), (do.to(o.dtype), dht.to(ht.dtype)))
        return [o.detach(), ht.detach()] + [x.grad for x in leaves]

    def rel(a, b):
        if a is None or not torch.isfinite(a).all():
            return float("nan")
        return ((a.double() - b).norm() / b.norm().clamp_min(1e-300)).item()

    from fla.ops.simple_gla import chunk_simple_gla

    ref = grads(lambda q_, k_, v_, g_, h_: chunk_lightning_attn(q_, k_, v_, None, h_, True, backend="torch", g=g_),
                lambda x: x.double())
    out = []
    for fn in (lambda q_, k_, v_, g_, h_: chunk_simple_gla(q_, k_, v_, g=g_, scale=1.0, initial_state=h_,
                                                           output_final_state=True),
               lambda q_, k_, v_, g_, h_: chunk_lightning_attn(q_, k_, v_, None, h_, True, backend="triton", g=g_)):
        try:
            got = grads(fn, lambda x: x)
            out.append({n: rel(a, b) for n, a, b in zip(names, got, ref)})
            if len(out) == 2:
                # ours: also dg by the whole-sequence formula from the returned bf16 dq, dk (what the
                # sequence-parallel modes do with a slice's totals), for comparison with the op's own
                from megatron_lasp.ops.lightning_attn import gate_grad

                out[1]["dg_global_formula"] = rel(gate_grad(q, got[2], k, got[3], None, got[1], dht), ref[5])
            del got
        except Exception as e:
            out.append({"error": f"{type(e).__name__}: {str(e)[:300]}"})
    del ref
    torch.cuda.empty_cache()
    return out[0], out[1]


def plot_gated(path, out_png):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(path) as f:
        data = json.load(f)
    rows = data["rows"]
    labels = [f"B{r['B']} T{r['T'] // 1024}K" for r in rows]
    names = [("ours_gated", "ours, per-token g"), ("ours_fixed", "ours, fixed decay"),
             ("fla_g_gamma", "fla chunk_simple_gla g_gamma"), ("fla_g", "fla chunk_simple_gla g (forced)")]
    panels = [("fwd_ms", "forward"), ("fwd_bwd_ms", "forward + backward")]
    if any(k.endswith("_fwd_bwd_graph_ms") for r in rows for k in r):
        panels.append(("fwd_bwd_graph_ms", "fwd + bwd, CUDA graph"))
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.2))
    width = 0.8 / len(names)
    for ax, (key, title) in zip(axes, panels):
        for i, (n, label) in enumerate(names):
            vals = [r.get(f"{n}_{key}") for r in rows]
            vals = [v if isinstance(v, float) else float("nan") for v in vals]
            ax.bar([x + i * width for x in range(len(rows))], vals, width, label=label)
        ax.set_xticks([x + width * (len(names) - 1) / 2 for x in range(len(rows))], labels)
        ax.set_ylabel("ms (median)")
        ax.set_yscale("log")
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle(f"gated linear attention, bf16 H16 D128, {data['meta']['device']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(out_png, dpi=120)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="kernels_bench", help="output path prefix (PREFIX.json)")
    parser.add_argument("--impl", choices=["ours", "fla"], default="ours")
    parser.add_argument("--sweep", action="store_true", help="sweep launch overrides at B1 H16 D128")
    parser.add_argument("--sweep-seq-length", type=int, default=32768,
                        help="--sweep: sequence length (PREFIX_sweep_<T/1024>k.json unless 32768)")
    parser.add_argument("--sweep-set", choices=["launch", "local", "gated"], default="launch",
                        help="launch: chunk-kernel overrides; local: local-state kernel tiles; gated: the "
                        "per-token-gate kernels' overrides at T32K and T128K against fixed decay (PREFIX_sweep_gated.json)")
    parser.add_argument("--config-json", default=None, help="a --sweep output: use its best overrides")
    parser.add_argument("--fla-autotune", choices=["full", "pruned"], default="pruned")
    parser.add_argument("--graph", action="store_true", help="CUDA-graph timing and per-kernel GPU times")
    parser.add_argument("--packed", action="store_true",
                        help="packed documents (cu_seqlens) at T=32K and 8K: bf16/fp32 errors vs fp64 and the time "
                        "overhead of boundaries vs none (PREFIX_packed.json)")
    parser.add_argument("--gated", action="store_true",
                        help="per-token gates: ours gated and fixed-decay, fla g_gamma and per-token g (PREFIX_gated.json)")
    parser.add_argument("--fla-configs", type=int, default=3, help="--gated: autotune configs kept per fla kernel")
    parser.add_argument("--plot", nargs="+", default=None, help="JSON files to plot (writes the first's .png)")
    args = parser.parse_args()
    if args.plot:
        if "_gated" in os.path.basename(args.plot[0]):
            return plot_gated(args.plot[0], args.plot[0].rsplit(".", 1)[0] + ".png")
        return plot(args.plot, args.plot[0].rsplit(".", 1)[0] + ".png")
    if args.gated:
        return gated(args)
    if args.sweep:
        return sweep_gated(args) if args.sweep_set == "gated" else sweep(args)
    if args.graph:
        return graph_and_profile(args)
    if args.packed:
        return packed(args)
    return bench(args)


if __name__ == "__main__":
    main()
