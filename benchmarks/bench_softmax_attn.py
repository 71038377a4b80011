"""The softmax-attention kernels of the hybrid models, side by side, and their sequence-parallel balance.

Two parts, both writing JSON:

- ``kernels`` (one GPU): the library kernels of ``megatron_lasp.ops.softmax_attn`` (``sdpa``,
  ``flex``, ``varlen``, ``math``) at the shapes one sequence-parallel rank sees: ``C = N / W``
  queries against the ``(r + 1) C`` gathered keys (the allgather mode's rank ``r``; ``W = 1`` is
  the whole sequence), unpacked and packed (random document starts, mean ``--doc-len`` tokens),
  MHA and GQA. Per case: forward and forward+backward milliseconds (median of CUDA-event timings),
  TFLOP/s of the causal pairs really computed, peak memory, and the relative error of the output
  against the first kernel of the list that ran. A kernel that fails or runs out of memory is
  recorded with its reason.
- ``sp`` (under torchrun, W GPUs): ``softmax_attn_sp`` per mode (allgather, ulysses), the
  forward+backward time of **every rank** (the causal-work balance of README.md, measured) next
  to the pair counts of ``causal_pairs_per_rank``.

    # one GPU (the lead runs these):
    python benchmarks/bench_softmax_attn.py kernels --out $OUT/softmax_kernels
    # 4 GPUs:
    torchrun --nproc-per-node 4 benchmarks/bench_softmax_attn.py sp --seq-lens 32768 131072 --out $OUT/softmax_sp
    # CPU smoke tests (tiny shapes, fp32; flex forward only):
    python benchmarks/bench_softmax_attn.py kernels --smoke --out /tmp/softmax_smoke
    torchrun --nproc-per-node 2 benchmarks/bench_softmax_attn.py sp --smoke --out /tmp/softmax_sp_smoke
"""

import argparse
import json
import os
import random
import statistics
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_lasp.atomic import write_text_atomic  # noqa: E402
from megatron_lasp.ops.lightning_attn import doc_ids_from_cu_seqlens  # noqa: E402
from megatron_lasp.ops.softmax_attn import softmax_attn  # noqa: E402
from megatron_lasp.parallel.softmax import SOFTMAX_SP_MODES, causal_pairs_per_rank, softmax_attn_sp  # noqa: E402
from megatron_lasp.parallel.state import init_distributed  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
KERNELS = ("sdpa", "flex", "varlen", "math")


def random_cu_seqlens(total: int, mean: int, seed: int) -> torch.Tensor:
    rng = random.Random(seed)
    cuts = sorted(set(rng.randrange(1, total) for _ in range(max(total // mean - 1, 0))))
    return torch.tensor([0] + cuts + [total], dtype=torch.int64)


def timed(fn, iters: int, warmup: int, device):
    """Median milliseconds of ``fn()`` (CUDA events on the GPU, wall clock on the CPU)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            torch.cuda.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def kernel_case(args, kernel, N, W, r, heads_kv, cu, device, dtype, ref):
    """One kernel at rank ``r``'s shapes; returns (result dict, output for the next comparisons)."""
    C = N // W
    Tk = (r + 1) * C
    g = torch.Generator(device=device).manual_seed(r)
    q = torch.randn(args.batch, C, args.heads, args.head_dim, device=device, dtype=dtype, generator=g)
    k = torch.randn(args.batch, Tk, heads_kv, args.head_dim, device=device, dtype=dtype, generator=g)
    v = torch.randn(k.shape, device=device, dtype=dtype, generator=g)
    do = torch.randn(q.shape, device=device, dtype=dtype, generator=g)
    docs = None if cu is None else doc_ids_from_cu_seqlens(cu, args.batch, N, device)[:, :Tk]
    q_docs = None if docs is None else docs[:, Tk - C:]
    leaves = [x.requires_grad_(True) for x in (q, k, v)]
    backward = not (device.type == "cpu" and kernel == "flex")

    def fwd():
        with torch.no_grad():
            return softmax_attn(*leaves, q_docs=q_docs, k_docs=docs, kernel=kernel)

    def fwd_bwd():
        o = softmax_attn(*leaves, q_docs=q_docs, k_docs=docs, kernel=kernel)
        o.backward(do)

    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    out = fwd()
    res = dict(kernel=kernel, seq_len=N, world=W, rank=r, q_len=C, k_len=Tk, heads=args.heads, heads_kv=heads_kv,
               packed=cu is not None, docs=None if cu is None else cu.numel() - 1,
               fwd_ms=timed(fwd, args.iters, args.warmup, device))
    if backward:
        res["fwd_bwd_ms"] = timed(fwd_bwd, args.iters, args.warmup, device)
    pairs = causal_pairs_per_rank(N, W, cu_seqlens=cu, batch=args.batch)[r]
    flops = 4 * pairs * args.heads * args.head_dim  # q k^T and p v, forward
    res["fwd_tflops"] = flops / (res["fwd_ms"] * 1e-3) / 1e12
    if backward:
        res["fwd_bwd_tflops"] = 3.5 * flops / (res["fwd_bwd_ms"] * 1e-3) / 1e12  # bwd ~ 2.5x fwd (recompute p)
    res["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    if ref is not None:
        res["rel_err_vs_" + ref[0]] = ((out.float() - ref[1]).norm() / ref[1].norm()).item()
    return res, out.float()


def run_kernels(args, device, dtype):
    results = []
    for N in args.seq_lens:
        for W in args.worlds:
            if N % W:
                continue
            for r in sorted({0, W - 1}):
                for heads_kv in args.heads_kv:
                    for packed in (False, True):
                        cu = random_cu_seqlens(args.batch * N, args.doc_len, N) if packed else None
                        ref = None
                        for kernel in args.kernels:
                            try:
                                res, out = kernel_case(args, kernel, N, W, r, heads_kv, cu, device, dtype, ref)
                                res["status"] = "ok"
                                ref = ref or (kernel, out)
                            except torch.OutOfMemoryError:
                                res = dict(kernel=kernel, seq_len=N, world=W, rank=r, heads_kv=heads_kv,
                                           packed=packed, status="oom")
                            except Exception as e:  # a kernel torch lacks here, or that refuses the case
                                res = dict(kernel=kernel, seq_len=N, world=W, rank=r, heads_kv=heads_kv,
                                           packed=packed, status=f"failed: {type(e).__name__}: {str(e)[:200]}")
                            results.append(res)
                            print(json.dumps(res), flush=True)
    return results


def run_sp(args, device, dtype):
    W, rank = dist.get_world_size(), dist.get_rank()
    results = []
    for N in args.seq_lens:
        C = N // W
        for mode in SOFTMAX_SP_MODES:
            for heads_kv in args.heads_kv:
                for packed in (False, True):
                    cu = random_cu_seqlens(args.batch * N, args.doc_len, N) if packed else None
                    g = torch.Generator(device=device).manual_seed(rank)
                    q = torch.randn(args.batch, C, args.heads, args.head_dim, device=device, dtype=dtype, generator=g)
                    k = torch.randn(args.batch, C, heads_kv, args.head_dim, device=device, dtype=dtype, generator=g)
                    v = torch.randn_like(k)
                    do = torch.randn_like(q)
                    leaves = [x.requires_grad_(True) for x in (q, k, v)]
                    kernel = "math" if device.type == "cpu" and packed else args.sp_kernel

                    def step():
                        o = softmax_attn_sp(*leaves, dist.group.WORLD, mode, cu_seqlens=cu, kernel=kernel,
                                            validate=False)
                        o.backward(do)

                    try:
                        ms = timed(step, args.iters, args.warmup, device)
                        status = "ok"
                    except ValueError as e:  # ulysses with heads that do not divide
                        ms, status = float("nan"), f"refused: {e}"
                    per_rank = [None] * W
                    dist.all_gather_object(per_rank, ms)
                    res = dict(mode=mode, seq_len=N, world=W, heads_kv=heads_kv, packed=packed, kernel=kernel,
                               status=status, fwd_bwd_ms_per_rank=per_rank,
                               pairs_per_rank=causal_pairs_per_rank(N, W, mode, cu, args.batch))
                    results.append(res)
                    if rank == 0:
                        print(json.dumps(res), flush=True)
    return results


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("part", choices=["kernels", "sp"])
    p.add_argument("--seq-lens", nargs="+", type=int, default=[32768, 131072])
    p.add_argument("--worlds", nargs="+", type=int, default=[1, 4], help="kernels: the group sizes whose ranks to mimic")
    p.add_argument("--kernels", nargs="+", default=["sdpa", "flex", "varlen"], choices=KERNELS)
    p.add_argument("--sp-kernel", default="auto", help="sp: the local kernel")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--heads-kv", nargs="+", type=int, default=[16, 4])
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--doc-len", type=int, default=2048, help="mean document length of the packed cases")
    p.add_argument("--dtype", choices=DTYPES, default="bf16")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--smoke", action="store_true", help="tiny CPU run: fp32, 4 heads x 16, N 64/128")
    p.add_argument("--out", default=None, help="write OUT.json")
    args = p.parse_args()
    if args.smoke:
        args.dtype, args.heads, args.heads_kv, args.head_dim = "fp32", 4, [4, 2], 16
        args.seq_lens, args.worlds, args.doc_len, args.warmup, args.iters = [64, 128], [1, 2], 24, 1, 2
        args.kernels = ["sdpa", "flex", "math"]
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    dtype = DTYPES[args.dtype]
    meta = dict(part=args.part, device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                torch=torch.__version__, dtype=args.dtype, batch=args.batch, heads=args.heads,
                head_dim=args.head_dim, doc_len=args.doc_len, warmup=args.warmup, iters=args.iters)
    if args.part == "kernels":
        results = run_kernels(args, device, dtype)
        rank = 0
    else:
        init_distributed()
        rank = dist.get_rank()
        results = run_sp(args, device, dtype)
        meta["world"] = dist.get_world_size()
    if rank == 0 and args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)) or ".", exist_ok=True)
        write_text_atomic(args.out + ".json", json.dumps(dict(meta=meta, results=results), indent=1))
        print(f"wrote {args.out}.json", flush=True)
    if args.part == "sp":
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
