"""GPU check of the sequence-parallel modes: exactness at real shapes, and LASP's overlap.

1. Exactness: for every mode and for fp32 and bf16 (triton backend, NaN-poisoned kernel buffers),
   with the fixed decay and with per-token gates (``g``, dg compared too), without and with packed
   documents (global ``cu_seqlens``: starts on and next to slice edges, a
   document over every rank, length-1 documents, random starts),
   one sequence of ``W x C`` tokens (B1 H16 D128, plus a ragged batch-2 shape) is split over the
   ``W`` ranks; the output and dq, dk, dv are compared (relative Frobenius error, max over ranks)
   with the torch backend in fp64 on the whole sequence and with the same kernel and dtype on the
   whole sequence on one GPU.
2. Overlap: at a long local slice (bf16, H16 D128), the forward and forward+backward times of
   - ``local``: the kernel on the local slice alone (no communication: the floor),
   - ``lasp``: ``lightning_attn_sp(mode="lasp")`` (receive posted first, state-only pass, wait and
     send on a side stream, output pass meanwhile),
   - ``lasp_serial``: LASP without overlap (``lasp_attention(..., overlap=False)``): wait for the
     state, run the kernel, then send (each rank waits for all the kernels before it),
   - ``chain``: the state hops alone (``parallel.hop.StateHop``, W-1 sequential hops per pass, no
     compute),
   and a torch.profiler trace of one ``lasp`` step on the last rank (Chrome trace next to the
   JSON) with the time its communication kernels run concurrently with compute kernels.
   Overlap shows as ``lasp ~ local + chain`` while ``lasp_serial ~ W x local``.

    torchrun --nproc-per-node 4 benchmarks/gpu_check_sp.py --out docs/benchmarks/sp_check_h200x4.json
    python benchmarks/gpu_check_sp.py --out docs/benchmarks/sp_check_h200x1.json          # world size 1
    # CPU smoke test (gloo, torch backend, tiny shapes):
    torchrun --nproc-per-node 2 benchmarks/gpu_check_sp.py --device cpu --out /tmp/sp_check_cpu.json
"""

import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_lasp.ops.lightning_attn import TritonOptions, chunk_lightning_attn  # noqa: E402
from megatron_lasp.parallel import SEQUENCE_PARALLEL_MODES, lightning_attn_sp  # noqa: E402
from megatron_lasp.parallel.comm import group_info  # noqa: E402
from megatron_lasp.parallel.hop import StateHop  # noqa: E402
from megatron_lasp.parallel.lasp import lasp_attention  # noqa: E402
from megatron_lasp.parallel.state import init_distributed  # noqa: E402
from megatron_lasp.testing import (  # noqa: E402
    attention_inputs,
    check_gates,
    check_slopes,
    edge_cu_seqlens,
    rel_err,
)

TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2}
POISON = TritonOptions(poison_outputs=True)  # NaN-filled kernel buffers in the exactness check


def max_over_ranks(x: float, device) -> float:
    t = torch.tensor([float(x)], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def _leaves(q, k, v, g, dtype, sl=slice(None)):
    """q, k, v in ``dtype`` and g (fp32; fp64 for fp64) as fresh leaves, sliced along the tokens."""
    leaves = [x[:, sl].detach().to(dtype).clone().requires_grad_(True) for x in (q, k, v)]
    if g is not None:
        gdt = torch.float64 if dtype == torch.float64 else torch.float32
        leaves.append(g[:, sl].detach().to(gdt).clone().requires_grad_(True))
    return leaves


def run_full(q, k, v, do, slopes, g, dtype, backend, cu_seqlens=None):
    """The one-GPU run of the whole sequence: ``[o, dq, dk, dv(, dg)]``."""
    leaves = _leaves(q, k, v, g, dtype)
    decay = dict(slopes=slopes) if g is None else dict(slopes=None, g=leaves[3])
    o, _ = chunk_lightning_attn(*leaves[:3], **decay, backend=backend, cu_seqlens=cu_seqlens, triton_options=POISON)
    o.backward(do.to(dtype))
    return [o.detach()] + [x.grad for x in leaves]


def check_exactness(args, device, backend):
    rank, W = dist.get_rank(), dist.get_world_size()
    rows = []
    for B, C, H, D in args.check_shapes:
        T = W * C
        slopes = check_slopes(H, zero_head=True).to(device)
        q, k, v, do = (x.float().to(device) for x in attention_inputs(B * 1000 + C, B, T, H, D, D))
        gates = check_gates(B * 1000 + C + 1, B, T, H).to(device)
        sl = slice(rank * C, (rank + 1) * C)
        cases = [(p_, d_, g_) for g_ in (False, True) for p_ in (False, True) for d_ in (torch.float32, torch.bfloat16)]
        for packed, dtype, gated in cases:
            cu = edge_cu_seqlens(B, W, C, seed=C).to(device) if packed else None
            g = gates if gated else None
            if dtype == torch.float32:
                ref64 = run_full(q, k, v, do, slopes, g, torch.float64, "torch", cu)
            single = run_full(q, k, v, do, slopes, g, dtype, backend, cu)
            for mode in SEQUENCE_PARALLEL_MODES:
                if mode == "ulysses" and H % W:
                    continue
                local = _leaves(q, k, v, g, dtype, sl)
                decay = dict(slopes=slopes) if g is None else dict(slopes=None, g=local[3])
                o = lightning_attn_sp(*local[:3], group=dist.group.WORLD, mode=mode, backend=backend, **decay,
                                      cu_seqlens=cu, triton_options=POISON)
                o.backward(do[:, sl].to(dtype))
                got = [o.detach()] + [x.grad for x in local]
                names = ("o", "dq", "dk", "dv", "dg")
                err64 = {n: max_over_ranks(rel_err(g, r[:, sl]), device) for n, g, r in zip(names, got, ref64)}
                err1 = {n: max_over_ranks(rel_err(g, r[:, sl]), device) for n, g, r in zip(names, got, single)}
                worst = max(err64.values())
                ok = worst < TOL[dtype]
                rows.append(dict(shape=[B, T, H, D], local_len=C, dtype=str(dtype), mode=mode, ok=ok, gated=gated,
                                 packed_documents=None if cu is None else int(cu.numel() - 1),
                                 err_vs_fp64=err64, err_vs_single_gpu_same_dtype=err1))
                if rank == 0:
                    print(f"{'ok ' if ok else 'BAD'} {mode:>9} {str(dtype):>14} B{B} T{T} H{H} D{D}"
                          f"{' packed' if packed else ''}{' gated' if gated else ''}: "
                          f"vs fp64 max {worst:.2e}, vs 1 GPU max {max(err1.values()):.2e}", flush=True)
    return rows


def _chain(shape, info, device):
    """W-1 sequential hops forward then backward, no compute (the package's hop)."""
    for forward in (True, False):
        hop = StateHop(shape, torch.float32, device, info, forward=forward)
        hop.pass_on(torch.zeros(shape, device=device), lambda s: s)
        hop.finish()


def _time(fn, device, warmup, iters):
    """Median ms of fn() -> (fwd_ms, total_ms) per call, slowest rank."""
    cuda = device.type == "cuda"
    for _ in range(warmup):
        fn(lambda: None)
    fwd, total = [], []
    for _ in range(iters):
        marks = []

        def mark():
            if cuda:
                ev = torch.cuda.Event(enable_timing=True)
                ev.record()
                marks.append(ev)
            else:
                marks.append(time.perf_counter())

        dist.barrier()
        if cuda:
            torch.cuda.synchronize()
        mark()
        fn(mark)  # calls mark() between forward and backward
        mark()
        if cuda:
            torch.cuda.synchronize()
            fwd.append(marks[0].elapsed_time(marks[1]))
            total.append(marks[0].elapsed_time(marks[2]))
        else:
            fwd.append((marks[1] - marks[0]) * 1e3)
            total.append((marks[2] - marks[0]) * 1e3)
    return max_over_ranks(statistics.median(fwd), device), max_over_ranks(statistics.median(total), device)


def _trace_overlap(path):
    """Sum of communication-kernel time, compute-kernel time and their overlap in a Chrome trace."""
    with open(path) as f:
        events = json.load(f).get("traceEvents", [])
    kernels = [e for e in events if e.get("cat") == "kernel" and "dur" in e]
    comm = [(e["ts"], e["ts"] + e["dur"]) for e in kernels if "nccl" in e["name"].lower()]
    comp = [(e["ts"], e["ts"] + e["dur"]) for e in kernels if "nccl" not in e["name"].lower()]
    comp.sort()
    merged = []
    for a, b in comp:
        if merged and a <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], b)
        else:
            merged.append([a, b])
    overlap = sum(max(0.0, min(b, mb) - max(a, ma)) for a, b in comm for ma, mb in merged)
    return dict(comm_kernel_us=sum(b - a for a, b in comm), compute_kernel_us=sum(b - a for a, b in merged),
                comm_overlapped_with_compute_us=overlap, comm_kernels=len(comm))


def check_overlap(args, device, backend, out_dir):
    rank, W = dist.get_rank(), dist.get_world_size()
    group = dist.group.WORLD
    info = group_info(group)
    B, C, H, D = 1, args.overlap_len, 16 if device.type == "cuda" else 4, 128 if device.type == "cuda" else 16
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    slopes = check_slopes(H, zero_head=True).to(device)
    torch.manual_seed(rank)
    q, k, v, do = (torch.randn(B, C, H, D, device=device, dtype=dtype) * 0.1 for _ in range(4))
    leaves = [x.requires_grad_(True) for x in (q, k, v)]

    def step(attn):
        def fn(mark):
            o = attn(*leaves)
            mark()
            o.backward(do)
        return fn

    results = dict(B=B, local_len=C, H=H, D=D, dtype=str(dtype), world=W)
    variants = {
        "local": lambda a, b, c: chunk_lightning_attn(a, b, c, slopes, backend=backend)[0],
        "lasp": lambda a, b, c: lightning_attn_sp(a, b, c, slopes, group, "lasp", backend, validate=False),
        "lasp_serial": lambda a, b, c: lasp_attention(a, b, c, slopes, group, backend, overlap=False),
    }
    for name, attn in variants.items():
        fwd_ms, total_ms = _time(step(attn), device, args.warmup, args.iters)
        results[name] = dict(fwd_ms=fwd_ms, fwd_bwd_ms=total_ms)
    chain_ms = _time(lambda mark: (_chain((B, H, D, D), info, device), mark()), device, args.warmup, args.iters)[1]
    results["chain"] = dict(fwd_bwd_ms=chain_ms)
    results["lasp_exposed_ms"] = results["lasp"]["fwd_bwd_ms"] - results["local"]["fwd_bwd_ms"]
    results["serial_exposed_ms"] = results["lasp_serial"]["fwd_bwd_ms"] - results["local"]["fwd_bwd_ms"]
    if device.type == "cuda" and out_dir:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            step(variants["lasp"])(lambda: None)
            torch.cuda.synchronize()
        dist.barrier()
        if rank == W - 1:
            path = os.path.join(out_dir, f"sp_lasp_trace_w{W}_rank{rank}.json")
            prof.export_chrome_trace(path)
            results["trace_last_rank"] = dict(path=path, **_trace_overlap(path))
        # the last rank's numbers reach rank 0 through a gather of JSON strings
        gathered = [None] * W
        dist.all_gather_object(gathered, results.get("trace_last_rank"))
        results["trace_last_rank"] = gathered[W - 1]
    if rank == 0:
        print(f"overlap, local slice {C} tokens x {W} ranks, {dtype}: "
              + ", ".join(f"{n} {results[n]['fwd_bwd_ms']:.2f} ms" for n in ("local", "lasp", "lasp_serial", "chain")),
              flush=True)
        if results.get("trace_last_rank"):
            print(f"trace of the last rank: {results['trace_last_rank']}", flush=True)
    return results


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=["cuda", "cpu"], default=None)
    p.add_argument("--backend", choices=["triton", "torch"], default=None)
    p.add_argument("--check-shapes", type=lambda s: tuple(int(x) for x in s.split(",")), nargs="+", default=None,
                   help="B,C,H,D per check (C = tokens per rank)")
    p.add_argument("--overlap-len", type=int, default=None, help="tokens per rank for the overlap timing")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--out", default=None, help="JSON path (the trace goes next to it)")
    p.add_argument("--no-overlap", action="store_true",
                   help="exactness only (e.g. ranks sharing one GPU over gloo, where timings mean nothing)")
    args = p.parse_args()
    device_type = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    # MEGATRON_LASP_DIST_BACKEND=gloo lets several ranks share one GPU (a correctness check)
    init_distributed(None if device_type == "cuda" else "gloo")
    device = torch.device("cuda", torch.cuda.current_device()) if device_type == "cuda" else torch.device("cpu")
    backend = args.backend or ("triton" if device_type == "cuda" else "torch")
    if args.check_shapes is None:
        args.check_shapes = [(1, 8192, 16, 128), (2, 1000 + 37, 8, 64)] if device_type == "cuda" else [(2, 45, 4, 16)]
    if args.overlap_len is None:
        args.overlap_len = 131072 if device_type == "cuda" else 512
    if device_type == "cpu":
        args.warmup, args.iters = min(args.warmup, 1), min(args.iters, 3)
    out_dir = os.path.dirname(os.path.abspath(args.out)) if args.out else None
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
    exact = check_exactness(args, device, backend)
    overlap = None if args.no_overlap else check_overlap(args, device, backend, out_dir)
    if dist.get_rank() == 0:
        meta = dict(world=dist.get_world_size(), backend=backend, torch=torch.__version__,
                    device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu")
        ok = all(r["ok"] for r in exact)
        print("exactness:", "all ok" if ok else "FAILURES", flush=True)
        if args.out:
            with open(args.out, "w") as f:
                json.dump(dict(meta=meta, all_ok=ok, exactness=exact, overlap=overlap), f, indent=1)
            print(f"wrote {args.out}", flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
