"""Side-by-side benchmark of the sequence-parallel modes on one linear-attention layer.

The layer is TNL-1B's token mixer (hidden 2048, 16 heads x 128): a fused q/k/v projection, SiLU on
q, k, v, ``lightning_attn_sp`` over all ranks (the whole world is the sequence-parallel group) and
the output projection; forward + backward, bf16. For each total sequence length (64K .. 1M tokens,
split contiguously over the ranks) and mode (lasp, lasp2, ulysses, allgather) it reports the time
per forward and forward+backward (median over iterations, slowest rank), tokens/s, peak memory
(max over ranks) and the bytes each rank receives per forward+backward (counted on the
collectives and point-to-point calls the mode makes, max over ranks; the model of megatron_lasp/parallel/README.md next to
it). A case that runs out of memory is recorded as "oom" (and
longer sequences of that mode are skipped). Writes JSON and a PNG.

    # N GPUs, NCCL (the lead runs these):
    torchrun --nproc-per-node 4 benchmarks/bench_sp_modes.py --out docs/benchmarks/sp_modes_h200x4
    python benchmarks/bench_sp_modes.py --out docs/benchmarks/sp_modes_h200x1      # world size 1
    torchrun --nproc-per-node 8 benchmarks/bench_sp_modes.py --seq-lens 65536 262144 1048576 2097152
    # CPU smoke test (gloo, tiny shapes), 1 or several processes:
    python benchmarks/bench_sp_modes.py --smoke --out /tmp/sp_smoke
    torchrun --nproc-per-node 2 benchmarks/bench_sp_modes.py --smoke --out /tmp/sp_smoke2
"""

import argparse
import contextlib
import json
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_lasp.parallel import SEQUENCE_PARALLEL_MODES, lightning_attn_sp  # noqa: E402
from megatron_lasp.parallel.state import init_distributed  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def alibi_slopes(H: int) -> torch.Tensor:
    return torch.tensor([2.0 ** (-8.0 * (h + 1) / H) for h in range(H)])


class TokenMixer(torch.nn.Module):
    """q/k/v projection, SiLU, sequence-parallel lightning attention, output projection."""

    def __init__(self, hidden, heads, head_dim, mode, group, backend):
        super().__init__()
        self.heads, self.head_dim, self.mode, self.group, self.backend = heads, head_dim, mode, group, backend
        self.qkv = torch.nn.Linear(hidden, 3 * heads * head_dim, bias=False)
        self.out = torch.nn.Linear(heads * head_dim, hidden, bias=False)
        self.register_buffer("slopes", alibi_slopes(heads), persistent=False)

    def forward(self, x):  # x: [B, C, hidden], this rank's slice
        B, C, _ = x.shape
        q, k, v = F.silu(self.qkv(x)).view(B, C, 3, self.heads, self.head_dim).unbind(2)
        o = lightning_attn_sp(q, k, v, self.slopes, self.group, self.mode, self.backend, validate=False)
        return self.out(o.reshape(B, C, self.heads * self.head_dim))


class CommCounter:
    """Counts the bytes this rank receives (and sends) through the torch.distributed calls the modes use.

    Collectives are counted as a direct exchange: an all-gather receives the other ranks' inputs,
    a reduce-scatter receives the other ranks' contributions to this rank's output, an all-to-all
    receives (W-1)/W of the output.
    """

    NAMES = ("isend", "irecv", "all_gather_into_tensor", "all_gather_single", "reduce_scatter_tensor",
             "reduce_scatter_single", "all_to_all_single")

    def __init__(self):
        self.recv = 0
        self.sent = 0
        self.calls = 0

    @contextlib.contextmanager
    def counting(self):
        saved = {n: getattr(dist, n) for n in self.NAMES if hasattr(dist, n)}

        def size(t):
            return t.numel() * t.element_size()

        def wrap(name, fn):
            def counted(*args, **kwargs):
                group = kwargs.get("group")
                W = dist.get_world_size(group)
                self.calls += 1
                if name == "isend":
                    self.sent += size(args[0])
                elif name == "irecv":
                    self.recv += size(args[0])
                elif name in ("all_gather_into_tensor", "all_gather_single"):
                    self.recv += size(args[0]) - size(args[1])
                    self.sent += (W - 1) * size(args[1])
                elif name in ("reduce_scatter_tensor", "reduce_scatter_single"):
                    self.recv += size(args[1]) - size(args[0])
                    self.sent += size(args[1]) - size(args[0])
                elif name == "all_to_all_single":
                    self.recv += size(args[0]) * (W - 1) // W
                    self.sent += size(args[1]) * (W - 1) // W
                return fn(*args, **kwargs)

            return counted

        for n, fn in saved.items():
            setattr(dist, n, wrap(n, fn))
        try:
            yield self
        finally:
            for n, fn in saved.items():
                setattr(dist, n, fn)


def modelled_recv_bytes(mode, W, B, C, H, D, elem):
    """Per-rank received bytes per forward+backward of the attention core (megatron_lasp/parallel/README.md, Communication), max over ranks."""
    if W == 1:
        return 0
    state = B * H * D * D * 4
    act = B * C * H * D * elem
    return {
        "lasp": (2 if W > 2 else 1) * state,  # a middle rank: one state in, one state gradient in
        "lasp2": 2 * (W - 1) * state,  # all-gather of states, all-gather of state gradients
        "ulysses": (W - 1) * (2 * 3 * act + 2 * act) // W,  # q,k,v + o forward; do + dq,dk,dv backward
        "allgather": 2 * (W - 1) * 2 * act,  # all-gather of k,v; reduce-scatter of dk,dv
    }[mode]


class Timer:
    def __init__(self, device):
        self.cuda = device.type == "cuda"

    def mark(self):
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def ms(self, a, b):
        if self.cuda:
            return a.elapsed_time(b)
        return (b - a) * 1e3

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()


def max_over_ranks(x: float, device) -> float:
    t = torch.tensor([float(x)], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def run_case(args, mode, T, group, device, dtype):
    W, rank = dist.get_world_size(), dist.get_rank()
    C = T // W
    torch.manual_seed(1234 + rank)
    layer = TokenMixer(args.hidden, args.heads, args.head_dim, mode, group, args.backend).to(device, dtype)
    x = torch.randn(args.batch, C, args.hidden, device=device, dtype=dtype, requires_grad=True)
    dy = torch.randn_like(x)
    timer = Timer(device)

    def step():
        y = layer(x)
        y.backward(dy)

    # warm-up (compiles triton kernels) and one counted step
    for _ in range(args.warmup):
        step()
    counter = CommCounter()
    with counter.counting():
        step()
    timer.sync()
    dist.barrier()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    fwd, total = [], []
    for _ in range(args.iters):
        x.grad = None
        layer.zero_grad(set_to_none=True)
        dist.barrier()
        t0 = timer.mark()
        y = layer(x)
        t1 = timer.mark()
        y.backward(dy)
        t2 = timer.mark()
        timer.sync()
        fwd.append(timer.ms(t0, t1))
        total.append(timer.ms(t0, t2))
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else 0
    fb_ms = max_over_ranks(statistics.median(total), device)
    return dict(
        mode=mode,
        seq_len=T,
        local_len=C,
        world=W,
        fwd_ms=max_over_ranks(statistics.median(fwd), device),
        fwd_bwd_ms=fb_ms,
        tokens_per_s=args.batch * T / (fb_ms * 1e-3),
        peak_mem_gib=max_over_ranks(peak, device) / 2**30,
        recv_bytes_per_rank=int(max_over_ranks(counter.recv, device)),
        sent_bytes_per_rank=int(max_over_ranks(counter.sent, device)),
        comm_calls=counter.calls,
        model_recv_bytes_per_rank=modelled_recv_bytes(mode, W, args.batch, C, args.heads, args.head_dim,
                                                      torch.empty((), dtype=dtype).element_size()),
    )


def plot(results, path, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("fwd_bwd_ms", "fwd+bwd time per layer (ms)"), ("tokens_per_s", "tokens/s"),
              ("peak_mem_gib", "peak memory (GiB)"), ("recv_bytes_per_rank", "bytes received per rank")]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4))
    for ax, (key, label) in zip(axes, panels):
        for mode in SEQUENCE_PARALLEL_MODES:
            pts = [(r["seq_len"], r[key]) for r in results if r["mode"] == mode and r.get(key) is not None]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=mode)
            ooms = [r["seq_len"] for r in results if r["mode"] == mode and r.get("status") == "oom"]
            for t in ooms:
                ax.axvline(t, ls=":", alpha=0.3)
        ax.set_xscale("log", base=2)
        if key in ("fwd_bwd_ms", "recv_bytes_per_rank"):
            ax.set_yscale("log")
        ax.set_xlabel("total sequence length (tokens)")
        ax.set_title(label)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--modes", nargs="+", default=list(SEQUENCE_PARALLEL_MODES), choices=SEQUENCE_PARALLEL_MODES)
    p.add_argument("--seq-lens", nargs="+", type=int, default=[65536, 131072, 262144, 524288, 1048576])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--dtype", choices=DTYPES, default="bf16")
    p.add_argument("--backend", choices=["triton", "torch"], default=None, help="kernel backend (default by device)")
    p.add_argument("--device", choices=["cuda", "cpu"], default=None, help="default: cuda if available")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--timeout-minutes", type=int, default=10, help="collective timeout (a rank that OOMs alone)")
    p.add_argument("--smoke", action="store_true", help="tiny CPU run: gloo, fp32, 4 heads x 16, T 256/512")
    p.add_argument("--out", default=None, help="write OUT.json and OUT.png")
    args = p.parse_args()
    if args.smoke:
        args.device, args.dtype = args.device or "cpu", "fp32"
        args.hidden, args.heads, args.head_dim = 64, 4, 16
        args.seq_lens, args.warmup, args.iters = [256, 512], 1, 2
    device_type = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    init_distributed("nccl" if device_type == "cuda" else "gloo", args.timeout_minutes)
    rank, W = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", torch.cuda.current_device()) if device_type == "cuda" else torch.device("cpu")
    dtype = DTYPES[args.dtype]
    group = dist.group.WORLD
    if rank == 0:
        print(f"world {W}, device {device}, {args.dtype}, B{args.batch} H{args.heads} D{args.head_dim} "
              f"hidden {args.hidden}", flush=True)
        print(f"{'mode':>10} {'T':>9} {'fwd ms':>9} {'fwd+bwd ms':>11} {'tokens/s':>11} {'peak GiB':>9} "
              f"{'recv/rank':>12} {'model':>12}", flush=True)
    results = []
    for mode in args.modes:
        for T in args.seq_lens:
            if T % W:
                continue
            if mode == "ulysses" and args.heads % W:
                results.append(dict(mode=mode, seq_len=T, world=W, status="skipped: heads % world != 0"))
                continue
            try:
                r = run_case(args, mode, T, group, device, dtype)
                r["status"] = "ok"
            except torch.OutOfMemoryError:
                r = dict(mode=mode, seq_len=T, world=W, status="oom")
            if device.type == "cuda":
                torch.cuda.empty_cache()
            # every rank learns whether some rank ran out of memory (if that rank failed between two
            # collectives, the others hang until --timeout-minutes instead)
            if max_over_ranks(r["status"] == "oom", device):
                r = dict(mode=mode, seq_len=T, world=W, status="oom")
            results.append(r)
            if rank == 0:
                if r["status"] == "ok":
                    print(f"{mode:>10} {T:>9} {r['fwd_ms']:>9.2f} {r['fwd_bwd_ms']:>11.2f} {r['tokens_per_s']:>11.3e} "
                          f"{r['peak_mem_gib']:>9.2f} {r['recv_bytes_per_rank']:>12} "
                          f"{r['model_recv_bytes_per_rank']:>12}", flush=True)
                else:
                    print(f"{mode:>10} {T:>9} {r['status']}", flush=True)
            if r["status"] == "oom":
                break  # longer sequences will not fit either
    if rank == 0 and args.out:
        meta = dict(world=W, device=str(torch.cuda.get_device_name() if device.type == "cuda" else "cpu"),
                    torch=torch.__version__, dtype=args.dtype, batch=args.batch, hidden=args.hidden,
                    heads=args.heads, head_dim=args.head_dim, warmup=args.warmup, iters=args.iters,
                    backend=args.backend, nccl_env={k: v for k, v in os.environ.items() if k.startswith("NCCL_")})
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out + ".json", "w") as f:
            json.dump(dict(meta=meta, results=results), f, indent=1)
        plot(results, args.out + ".png", f"one TNL-1B token mixer, {W} x {meta['device']}, {args.dtype}")
        print(f"wrote {args.out}.json and {args.out}.png", flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
