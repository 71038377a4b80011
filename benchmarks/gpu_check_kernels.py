"""GPU correctness check of the lightning-attention Triton kernels at real shapes.

Compares the triton backend (bf16 and fp32) with the torch chunked backend run in fp64 on the same
GPU (itself checked against the token-by-token reference by tests/test_lightning_attn.py), for the
output, the final state and the gradients of q, k, v and the initial state (with a random gradient
on the final state). Every kernel buffer is NaN-poisoned first; each case also runs twice to catch
races (a moving error). Prints a table and writes JSON.

    PYTHONPATH=. python benchmarks/gpu_check_kernels.py --out docs/benchmarks/kernels_check.json
"""

import argparse
import json
import math
import sys
import time

import torch

from megatron_lasp.ops.lightning_attn import (
    TritonOptions,
    chunk_lightning_attn,
    decay_powers,
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


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=None, help="JSON output path")
    parser.add_argument("--quick", action="store_true", help="only the first two shapes")
    parser.add_argument("--config-json", default=None, help="a bench_kernels.py --sweep output: use its best overrides")
    parser.add_argument("--bf16-shapes", type=int, default=len(SHAPES), help="bf16 only for the first N shapes")
    parser.add_argument("--fp32-shapes", type=int, default=len(SHAPES), help="fp32 only for the first N shapes")
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
