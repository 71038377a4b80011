"""GPU: the Triton kernel with packed documents (bf16 and fp32) against the fp64 reference on CUDA.

Skipped without CUDA. The reference is the torch backend in fp64 with the same ``cu_seqlens``
(itself equal to running each document separately, tests/test_packed_kernels.py); the boundaries
fall inside blocks, on block and segment edges, and include documents of length 1.
"""

import pytest
import torch

from megatron_lasp.ops.lightning_attn import TritonOptions, chunk_lightning_attn

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

TOL = {torch.bfloat16: 2e-2, torch.float32: 1e-4}
NAMES = ["o", "final_state", "dq", "dk", "dv", "d_initial_state"]


def _cu(total, gen):
    cuts = torch.randint(1, total, (max(1, total // 300),), generator=gen)
    fixed = torch.tensor([1, 2, 63, 64, 65, 128, 4096, total // 2, total // 2 + 1])
    cu = torch.cat([torch.tensor([0, total]), fixed[fixed < total], cuts])
    return torch.unique(cu).to(torch.int32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("shape", [(1, 8192, 8, 128, 128), (2, 3000, 4, 64, 64), (1, 777, 3, 256, 256)],
                         ids=lambda s: "B{}-T{}-H{}-Dk{}-Dv{}".format(*s))
def test_triton_packed_matches_reference_on_cuda(shape, dtype):
    B, T, H, Dk, Dv = shape
    gen = torch.Generator().manual_seed(T)
    dev = torch.device("cuda")
    q = torch.randn(B, T, H, Dk, generator=gen) * Dk ** -0.25
    k = torch.randn(B, T, H, Dk, generator=gen) * Dk ** -0.25
    v, do = torch.randn(B, T, H, Dv, generator=gen), torch.randn(B, T, H, Dv, generator=gen)
    h0, dht = torch.randn(B, H, Dk, Dv, generator=gen), torch.randn(B, H, Dk, Dv, generator=gen)
    slopes = torch.tensor([2.0 ** (-8.0 * (h + 1) / H) for h in range(H)])
    slopes[0] = 0.0
    cu = _cu(B * T, gen).to(dev)
    slopes = slopes.to(dev)

    def run(backend, cast):
        leaves = [cast(x.to(dev)).requires_grad_(True) for x in (q, k, v)] + [h0.to(dev).clone().requires_grad_(True)]
        o, ht = chunk_lightning_attn(*leaves[:3], slopes, leaves[3], True, backend=backend, cu_seqlens=cu,
                                     triton_options=TritonOptions(poison_outputs=True))
        torch.autograd.backward((o, ht), (cast(do.to(dev)), dht.to(dev)))
        return [o, ht] + [x.grad for x in leaves]

    ref = run("torch", lambda x: x.double())
    got = run("triton", lambda x: x.to(dtype))
    for name, a, b in zip(NAMES, got, ref):
        assert torch.isfinite(a).all(), f"{name}: non-finite (an unwritten buffer?)"
        err = ((a.double() - b.double()).norm() / b.double().norm()).item()
        assert err < TOL[dtype], f"{name}: relative error {err:.2e} >= {TOL[dtype]}"
