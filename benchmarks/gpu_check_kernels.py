"""GPU correctness check of the lightning-attention Triton kernels at real shapes.

Compares the triton backend (bf16 and fp32) with the torch chunked backend run in fp64 on the same
GPU (itself checked against the token-by-token reference by tests/test_lightning_attn.py), for the
output, the final state and the gradients of q, k, v and the initial state (with a random gradient
on the final state). Every kernel buffer is NaN-poisoned first; each case also runs twice to catch
races (a moving error). Prints a table and writes JSON.

    PYTHONPATH=. python benchmarks/gpu_check_kernels.py --out docs/benchmarks/kernels_check.json

``--gated``: the per-token gate kernels (``g [B, T, H]``) instead, against the same fp64 reference,
with ``dg`` among the gradients, a long span of strong decay (``g = -20`` per token), packed
documents and the sequence-parallel split (``SliceGate`` / ``gate_grad``):

    PYTHONPATH=. python benchmarks/gpu_check_kernels.py --gated --out docs/benchmarks/kernels_check_gated.json
"""

import argparse
import json
import math
import sys
import time

import torch

from megatron_lasp.ops.lightning_attn import (
    SliceGate,
    TritonOptions,
    chunk_lightning_attn,
    decay_powers,
    gate_grad,
    lightning_attn_bwd,
    lightning_attn_fwd,
)

# (B, T, H, Dk, Dv): the target shape, batch > 1, ragged T, D = 256, Dk != Dv, tiny T.
SHAPES = [
    (1, 32768, 16, 128, 128),
    (2, 5000 + 37, 8, 64, 64),
    (3, 1000, 5, 64, 32),
    (1, 4099, 4, 256, 256),
    (2, 8192, 16, 128, 128),
    (2, 1, 3, 128, 128),
]
NAMES = ["o", "final_state", "dq", "dk", "dv", "d_initial_state"]


def alibi_slopes(H: int) -> torch.Tensor:
    """ALiBi-style slopes, with head 0 set to 0 (no decay) to cover that case too."""
    s = torch.tensor([2.0 ** (-8.0 * (h + 1) / H) for h in range(H)])
    s[0] = 0.0
    return s


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    if not torch.isfinite(a).all():
        return float("nan")
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def run_case(shape, dtype, device, options):
    B, T, H, Dk, Dv = shape
    g = torch.Generator(device=device).manual_seed(hash((shape, str(dtype))) % 2**31)
    # q.k ~ N(0, 1): scale q and k by Dk^-1/4 each.
    q = (torch.randn(B, T, H, Dk, device=device, generator=g) * Dk ** -0.25).to(dtype)
    k = (torch.randn(B, T, H, Dk, device=device, generator=g) * Dk ** -0.25).to(dtype)
    v = torch.randn(B, T, H, Dv, device=device, generator=g).to(dtype)
    h0 = torch.randn(B, H, Dk, Dv, device=device, generator=g)
    do = torch.randn(B, T, H, Dv, device=device, generator=g).to(dtype)
    dht = torch.randn(B, H, Dk, Dv, device=device, generator=g)
    slopes = alibi_slopes(H).to(device)

    def grads(backend, cast):
        leaves = [cast(x).requires_grad_(True) for x in (q, k, v, h0)]
        o, ht = chunk_lightning_attn(*leaves[:3], slopes, leaves[3], True, backend=backend, triton_options=options)
        torch.autograd.backward((o, ht), (cast(do), dht.to(ht.dtype)))
        return [o.detach(), ht.detach()] + [x.grad for x in leaves]

    ref = grads("torch", lambda x: x.detach().double())
    got = grads("triton", lambda x: x.detach().clone())
    again = grads("triton", lambda x: x.detach().clone())
    errs = {n: rel(a, b) for n, a, b in zip(NAMES, got, ref)}
    deterministic = all(torch.equal(a, b) for a, b in zip(got, again))

    # The sequence-parallel split: fwd without initial state + the state term added by the caller.
    o_loc, ht_loc, saved = lightning_attn_fwd(q, k, v, slopes, None, True, "triton", triton_options=options)
    a = decay_powers(slopes, T).transpose(0, 1)[None, :, :, None]
    o_split = o_loc.float() + a * torch.einsum("bthk,bhkv->bthv", q.float(), h0)
    dq_l, _, _, _ = lightning_attn_bwd(q, k, v, slopes, do, saved=saved)
    dq_split = dq_l.float() + a * torch.einsum("bthv,bhkv->bthk", do.float(), h0)
    errs["o_split"] = rel(o_split, ref[0])
    errs["dq_split"] = rel(dq_split, ref[2])
    return errs, deterministic


# (B, T, H, Dk, Dv, mean document length or 0): the target shapes, ragged T with documents, D = 64.
GATED_SHAPES = [
    (1, 8192, 16, 128, 128, 0),
    (1, 32768, 16, 128, 128, 0),
    (1, 8192, 16, 128, 128, 700),
    (2, 5037, 8, 64, 64, 0),
]
GATED_NAMES = ["o", "final_state", "dq", "dk", "dv", "dg", "d_initial_state"]


def make_gates(B, T, H, device, gen):
    """Log-decays like a learned gate: -softplus(x) scaled per head from 1e-3 to 1 (Mamba2's dt*A
    range), head 1 with a span of g = -20 per token over T/8 tokens."""
    scale = torch.logspace(-3, 0, H, device=device)
    g = -torch.nn.functional.softplus(torch.randn(B, T, H, device=device, generator=gen)) * scale
    if H > 1:
        g[:, T // 4: T // 4 + T // 8, 1] = -20.0
    return g


def run_gated_case(shape, dtype, device, options):
    B, T, H, Dk, Dv, doc_len = shape
    gen = torch.Generator(device=device).manual_seed(hash((shape, str(dtype))) % 2**31)
    q = (torch.randn(B, T, H, Dk, device=device, generator=gen) * Dk ** -0.25).to(dtype)
    k = (torch.randn(B, T, H, Dk, device=device, generator=gen) * Dk ** -0.25).to(dtype)
    v = torch.randn(B, T, H, Dv, device=device, generator=gen).to(dtype)
    h0 = torch.randn(B, H, Dk, Dv, device=device, generator=gen)
    do = torch.randn(B, T, H, Dv, device=device, generator=gen).to(dtype)
    dht = torch.randn(B, H, Dk, Dv, device=device, generator=gen)
    g = make_gates(B, T, H, device, gen)
    cu = None
    if doc_len:
        cuts = torch.randperm(B * T - 1, generator=torch.Generator().manual_seed(T))[:B * T // doc_len] + 1
        cu = torch.unique(torch.cat([torch.tensor([0, B * T]), cuts])).to(device=device, dtype=torch.int32)

    def grads(backend, cast):
        gl = g.detach().double() if backend == "torch" else g.detach().clone()  # fp32 gates in the kernels
        leaves = [cast(x).requires_grad_(True) for x in (q, k, v)] + [gl.requires_grad_(True),
                                                                     cast(h0).requires_grad_(True)]
        o, ht = chunk_lightning_attn(*leaves[:3], None, leaves[4], True, backend=backend, cu_seqlens=cu, g=leaves[3],
                                     triton_options=options)
        torch.autograd.backward((o, ht), (cast(do), dht.to(ht.dtype)))
        out = [o.detach(), ht.detach()] + [x.grad for x in leaves[:3]] + [leaves[3].grad, leaves[4].grad]
        del leaves, o, ht
        return out

    ref = grads("torch", lambda x: x.detach().double())
    got = grads("triton", lambda x: x.detach().clone())
    again = grads("triton", lambda x: x.detach().clone())
    errs = {n: rel(a, b) for n, a, b in zip(GATED_NAMES, got, ref)}
    deterministic = all(torch.equal(a, b) for a, b in zip(got, again))
    del got, again
    if cu is None:
        # The sequence-parallel split: no initial state in the kernel, the entering state's terms
        # added from SliceGate; dg as lasp / lasp2 form it: the kernel's own from the entering state
        # (cached states shifted by it) plus the leaving state's terms in fp32.
        from megatron_lasp.parallel.slices import (
            SliceDecays,
            slice_gate_grad_from_own,
            state_grad_dots,
            with_entry_state,
        )

        o_loc, s_loc, saved = lightning_attn_fwd(q, k, v, None, None, True, "triton", g=g, triton_options=options)
        sg = SliceGate.of(g)
        a = sg.a.transpose(1, 2)[..., None]
        o_split = o_loc.float() + a * torch.einsum("bthk,bhkv->bthv", q.float(), h0)
        s_out = sg.across[..., None, None] * h0 + s_loc
        dq, dk, dv, _, _ = lightning_attn_bwd(q, k, v, None, do, saved=saved)
        b = sg.b.transpose(1, 2)[..., None]
        dq = dq.float() + a * torch.einsum("bthv,bhkv->bthk", do.float(), h0)
        dk = dk.float() + b * torch.einsum("bthv,bhkv->bthk", v.float(), dht)
        errs["o_split"] = rel(o_split, ref[0])
        errs["dq_split"] = rel(dq, ref[2])
        saved = with_entry_state(saved, h0, None, None, SliceDecays.from_gates(g))
        dg_own = lightning_attn_bwd(q, k, v, None, do, saved=saved)[4]
        dg = slice_gate_grad_from_own(g, dg_own, None, state_grad_dots(k, v, dht, sg.b), (s_out * dht).sum((-1, -2)))
        errs["dg_split"] = rel(dg, ref[5])
        # for comparison (not checked): the whole-slice sum from the totals
        errs_extra = {"dg_split_from_totals": rel(gate_grad(q, dq, k, dk, None, s_out, dht), ref[5])}
    else:
        errs_extra = {}
    return errs, deterministic, errs_extra


def main_gated(args, options, meta):
    device = torch.device("cuda")
    results = []
    for dtype in (torch.bfloat16, torch.float32):
        for shape in GATED_SHAPES:
            t0 = time.time()
            errs, det, extra = run_gated_case(shape, dtype, device, options)
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            tol = 1e-2 if dtype == torch.bfloat16 else 1e-4
            ok = det and all(math.isfinite(e) and e < tol for e in errs.values())
            results.append(dict(shape=dict(zip("B T H Dk Dv doc_len".split(), shape)), dtype=str(dtype).split(".")[-1],
                                errors=errs, unchecked=extra, deterministic=det, tolerance=tol, ok=ok,
                                seconds=round(time.time() - t0, 2)))
            print(f"gated {str(dtype):15s} {shape} " + " ".join(f"{n}={e:.1e}" for n, e in {**errs, **extra}.items())
                  + f" det={det} {'OK' if ok else 'FAIL'} {time.time() - t0:.0f}s", flush=True)
            if args.out:
                with open(args.out, "w") as f:
                    json.dump(dict(meta=meta, results=results), f, indent=1)
    print("ALL OK" if all(r["ok"] for r in results) else "SOME FAILED")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=None, help="JSON output path")
    parser.add_argument("--quick", action="store_true", help="only the first two shapes")
    parser.add_argument("--config-json", default=None, help="a bench_kernels.py --sweep output: use its best overrides")
    parser.add_argument("--bf16-shapes", type=int, default=len(SHAPES), help="bf16 only for the first N shapes")
    parser.add_argument("--fp32-shapes", type=int, default=len(SHAPES), help="fp32 only for the first N shapes")
    parser.add_argument("--gated", action="store_true", help="the per-token gate kernels (GATED_SHAPES), dg included")
    args = parser.parse_args()
    assert torch.cuda.is_available(), "needs a CUDA GPU"
    device = torch.device("cuda")
    tuning = {}
    if args.config_json:
        with open(args.config_json) as f:
            tuning = json.load(f)["best_tuning"]
    options = TritonOptions(**tuning, poison_outputs=True)
    meta = dict(command=" ".join(["python"] + sys.argv), device=torch.cuda.get_device_name(),
                torch=torch.__version__, triton=__import__("triton").__version__,
                reference="torch chunked backend in fp64 on the GPU", tuning=options.overrides())
    if args.gated:
        meta["gates"] = "-softplus(randn) * logspace(-3, 0, H) per head; head 1: g = -20 over tokens [T/4, 3T/8)"
        return main_gated(args, options, meta)
    results = []
    shapes = SHAPES[:2] if args.quick else SHAPES
    for dtype in (torch.bfloat16, torch.float32):
        for shape in shapes[:args.bf16_shapes if dtype == torch.bfloat16 else args.fp32_shapes]:
            t0 = time.time()
            errs, det = run_case(shape, dtype, device, options)
            torch.cuda.synchronize()
            tol = 1e-2 if dtype == torch.bfloat16 else 1e-4
            ok = det and all(math.isfinite(e) and e < tol for e in errs.values())
            results.append(dict(shape=dict(zip("B T H Dk Dv".split(), shape)), dtype=str(dtype).split(".")[-1],
                                errors=errs, deterministic=det, tolerance=tol, ok=ok,
                                seconds=round(time.time() - t0, 2)))
            print(f"{str(dtype):15s} B{shape[0]}-T{shape[1]}-H{shape[2]}-Dk{shape[3]}-Dv{shape[4]:<4d} "
                  + " ".join(f"{n}={e:.1e}" for n, e in errs.items())
                  + f" det={det} {'OK' if ok else 'FAIL'} {time.time() - t0:.0f}s", flush=True)
            if args.out:  # after every case, so that a run cut short keeps what it checked
                with open(args.out, "w") as f:
                    json.dump(dict(meta=meta, results=results), f, indent=1)
    print("ALL OK" if all(r["ok"] for r in results) else "SOME FAILED")


if __name__ == "__main__":
    main()
