"""Where the per-token gates cost time: per-kernel GPU time of one fwd+bwd, gated against fixed decay.

Runs ``chunk_lightning_attn`` (triton, bf16, B1 H16 D128, initial state and final-state gradient,
as ``bench_kernels.py --gated``) with per-token gates and with the fixed decay, profiles a few
fwd+bwd steps of each with ``torch.profiler`` and prints the GPU time per kernel name (ms per
step), the two side by side, and their totals; then the host time to enqueue a step against the
time until it is done, and the Python functions a gated step spends its host time in. Timing proper stays with ``bench_kernels.py``;
this says which kernels make up the difference.

    PYTHONPATH=. python benchmarks/profile_gated.py --T 131072 --out $OUT/profile_gated.json
"""

import argparse
import json

import torch


def _kernel_ms(step, reps):
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            step()
        torch.cuda.synchronize()
    out = {}
    for evt in prof.key_averages():
        if evt.device_time_total > 0:
            out[evt.key[:80]] = out.get(evt.key[:80], 0.0) + evt.device_time_total / reps / 1e3
    return out


def _host_and_wall_ms(step, reps):
    """``(host, wall)`` ms per step: the time to enqueue one step (the GPU idle before it) and the
    time until its GPU work is done. ``host`` close to ``wall`` means the step is bound by the host."""
    import time
    host = wall = 0.0
    for _ in range(reps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        t2 = time.perf_counter()
        host, wall = host + (t1 - t0), wall + (t2 - t0)
    return host / reps * 1e3, wall / reps * 1e3


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--T", type=int, default=131072)
    parser.add_argument("--H", type=int, default=16)
    parser.add_argument("--D", type=int, default=128)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--out", default=None, help="JSON output path")
    args = parser.parse_args()
    assert torch.cuda.is_available(), "needs a CUDA GPU"
    from megatron_lasp.ops.lightning_attn import chunk_lightning_attn

    torch.manual_seed(0)
    B, T, H, D = 1, args.T, args.H, args.D
    dev = "cuda"
    q, k, v, do = (torch.randn(B, T, H, D, device=dev, dtype=torch.bfloat16) * s for s in (D ** -0.25, D ** -0.25, 1, 1))
    h0, dht = (torch.randn(B, H, D, D, device=dev) for _ in range(2))
    scale = torch.logspace(-3, 0, H, device=dev)
    g = (-torch.nn.functional.softplus(torch.randn(B, T, H, device=dev)) * scale).requires_grad_(True)
    slopes = -g.detach().mean((0, 1))  # any positive decay: the fixed path's speed does not depend on it
    leaves = [x.clone().requires_grad_(True) for x in (q, k, v, h0)]

    def step(gated):
        def run():
            for x in leaves + [g]:  # no accumulation into .grad (an add of each gradient, not the op's work)
                x.grad = None
            decay = dict(slopes=None, g=g) if gated else dict(slopes=slopes)
            o, ht = chunk_lightning_attn(*leaves[:3], initial_state=leaves[3], output_final_state=True,
                                         backend="triton", **decay)
            torch.autograd.backward((o, ht), (do, dht))
        return run

    gated, fixed = _kernel_ms(step(True), args.reps), _kernel_ms(step(False), args.reps)
    timing = {name: dict(zip(("host_ms", "wall_ms"), _host_and_wall_ms(step(flag), args.reps)))
              for name, flag in (("gated", True), ("fixed", False))}
    names = sorted(set(gated) | set(fixed), key=lambda n: -max(gated.get(n, 0.0), fixed.get(n, 0.0)))
    print(f"B{B} T{T} H{H} D{D} bf16, GPU ms per fwd+bwd ({torch.cuda.get_device_name()})")
    print(f"{'kernel':80s} {'gated':>8s} {'fixed':>8s}")
    for n in names:
        print(f"{n:80s} {gated.get(n, 0.0):8.3f} {fixed.get(n, 0.0):8.3f}")
    print(f"{'total':80s} {sum(gated.values()):8.3f} {sum(fixed.values()):8.3f}")
    for name, t in timing.items():
        print(f"{name}: host {t['host_ms']:.3f} ms to enqueue a step, {t['wall_ms']:.3f} ms until done")
    # Where the host time of a gated step goes (Python functions, by own time).
    import cProfile
    import io
    import pstats
    prof = cProfile.Profile()
    run = step(True)
    prof.enable()
    for _ in range(args.reps):
        run()
    torch.cuda.synchronize()
    prof.disable()
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(25)
    print(buf.getvalue())
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(shape=[B, T, H, D], device=torch.cuda.get_device_name(), gated_ms=gated, fixed_ms=fixed,
                           gated_total_ms=sum(gated.values()), fixed_total_ms=sum(fixed.values()), timing=timing), f, indent=1)


if __name__ == "__main__":
    main()
