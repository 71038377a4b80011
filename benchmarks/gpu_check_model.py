"""GPU check of the linear LM on one device (needs CUDA and megatron-core; not used by tests).

    PYTHONPATH=. python benchmarks/gpu_check_model.py precision   # bf16 (triton, torch kernels) vs fp32
    PYTHONPATH=. python benchmarks/gpu_check_model.py speed       # tnl-1b x 4 layers: time, memory, recompute

Prints one line per case. ``precision``: TNL-1B with 2 layers, random init, one sequence; the
fp32 run with the Triton kernels is the reference (the fp32 torch-kernel run is compared too).
``speed``: forward + backward of TNL-1B with 4 layers (embedding, output layer and loss included),
micro-batch 1, bf16, Triton kernels, for no / selective / full activation recompute.
"""

from __future__ import annotations

import argparse
import time

import torch

from megatron_lasp.models import build_linear_lm, linear_lm_config
from megatron_lasp.parallel import initialize_parallel

VOCAB = 64000


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def _step(model, ids, labels):
    model.zero_grad(set_to_none=True)
    loss = model(ids, labels=labels).float().mean()
    loss.backward()
    return loss.detach(), {n: p.grad.detach().float().clone() for n, p in model.named_parameters()}


def precision() -> None:
    """bf16 model (both kernel backends) against the fp32 model with the same weights."""
    for decay in ("tnl", "alibi"):
        for T in (2048, 8192):
            fields = dict(num_layers=2, decay_type=decay)
            ids = torch.randint(0, VOCAB, (1, T), device="cuda")
            labels = torch.randint(0, VOCAB, (1, T), device="cuda")
            m32 = build_linear_lm(linear_lm_config("tnl-1b", kernel_backend="triton", **fields), VOCAB)
            weights = {n: p.detach().clone() for n, p in m32.named_parameters()}
            loss32, g32 = _step(m32, ids, labels)
            m32.config.kernel_backend = "torch"
            loss32t, g32t = _step(m32, ids, labels)
            del m32
            cfg = linear_lm_config("tnl-1b", params_dtype=torch.bfloat16, bf16=True, **fields)
            m16 = build_linear_lm(cfg, VOCAB)
            with torch.no_grad():
                for n, p in m16.named_parameters():
                    p.copy_(weights[n])
            print(f"decay={decay} T={T}: fp32 triton vs torch kernels: loss {_rel(loss32t, loss32):.1e}, "
                  f"worst grad {max(_rel(g32t[n], g32[n]) for n in g32):.1e}")
            for backend in ("triton", "torch"):
                cfg.kernel_backend = backend
                loss, g = _step(m16, ids, labels)
                worst = max(g, key=lambda n: _rel(g[n], g32[n]))
                print(f"  bf16 {backend} vs fp32: loss {_rel(loss, loss32):.1e}, worst grad {worst} "
                      f"{_rel(g[worst], g32[worst]):.1e}")
            del m16
            torch.cuda.empty_cache()


def speed() -> None:
    """Forward + backward time and peak memory for recompute none / selective / full."""
    recompute = {
        "none": {},
        "selective": dict(recompute_granularity="selective"),
        "full": dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1),
    }
    for name, fields in recompute.items():
        cfg = linear_lm_config("tnl-1b", num_layers=4, params_dtype=torch.bfloat16, bf16=True, **fields)
        model = build_linear_lm(cfg, VOCAB)
        for T in (8192, 32768, 131072):
            ids = torch.randint(0, VOCAB, (1, T), device="cuda")
            labels = torch.randint(0, VOCAB, (1, T), device="cuda")
            try:
                _step(model, ids, labels)
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                start, n = time.perf_counter(), 3
                for _ in range(n):
                    _step(model, ids, labels)
                torch.cuda.synchronize()
                dt = (time.perf_counter() - start) / n
                peak = torch.cuda.max_memory_allocated() / 2**30
                print(f"tnl-1b x4 layers, recompute {name}, T={T}: {dt * 1e3:.1f} ms fwd+bwd, "
                      f"{T / dt:.3g} tokens/s, peak {peak:.1f} GiB")
            except torch.OutOfMemoryError:
                print(f"tnl-1b x4 layers, recompute {name}, T={T}: out of memory")
            torch.cuda.empty_cache()
        del model
        torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["precision", "speed"])
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gpu_check_model.py needs a CUDA device")
    initialize_parallel(1, 1, 1, seed=1234)
    {"precision": precision, "speed": speed}[args.what]()


if __name__ == "__main__":
    main()
