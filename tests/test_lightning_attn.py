"""Lightning attention: every backend against the token-by-token fp64 reference.

Triton kernels run in Triton's CPU interpreter: each triton test sets ``TRITON_INTERPRET=1``
through ``monkeypatch`` (the kernels are built for the interpreter at launch time, so the order in
which test files import modules does not matter and the variable does not leak to other tests).
"""

import zlib

import pytest
import torch

from megatron_lasp.ops.lightning_attn import (
    TritonOptions,
    chunk_lightning_attn,
    decay_powers,
    lightning_attn_bwd,
    lightning_attn_fwd,
    naive_chunk_lightning_attn,
    naive_recurrent_lightning_attn,
    state_decay,
)

# Every buffer a triton kernel writes is filled with NaN first, so that an unwritten element fails
# (ignored by the torch backend).
POISON = TritonOptions(poison_outputs=True)

TOL = {"torch": 1e-5, "triton": 1e-4}

# (B, T, H, Dk, Dv): T=1, ragged T (not a multiple of any block), exact multiples, Dk != Dv, B > 1.
SHAPES = [
    (1, 1, 2, 8, 8),
    (2, 37, 3, 8, 12),
    (1, 64, 2, 16, 16),
    (2, 75, 4, 16, 8),
]
DECAYS = ["nodecay", "hetero"]


def _slopes(kind: str, H: int) -> torch.Tensor:
    if kind == "nodecay":
        return torch.zeros(H)
    # Heterogeneous: no decay, weak, medium and strong decay across heads.
    return torch.tensor([0.0, 0.03, 0.3, 1.5] * H)[:H] + 0.01 * torch.rand(H)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    assert torch.isfinite(a).all(), "non-finite values (unwritten or broken output)"
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _inputs(B, T, H, Dk, Dv, decay, with_h0):
    q = torch.randn(B, T, H, Dk)
    k = torch.randn(B, T, H, Dk)
    v = torch.randn(B, T, H, Dv)
    h0 = torch.randn(B, H, Dk, Dv) if with_h0 else None
    do = torch.randn(B, T, H, Dv)
    dht = torch.randn(B, H, Dk, Dv)
    return q, k, v, _slopes(decay, H), h0, do, dht


def _reference(q, k, v, slopes, h0, do, dht):
    leaves = [x.double().requires_grad_(True) if x is not None else None for x in (q, k, v, h0)]
    o, ht = naive_recurrent_lightning_attn(leaves[0], leaves[1], leaves[2], slopes.double(), leaves[3], True)
    loss = (o * do.double()).sum() + (ht * dht.double()).sum()
    wrt = [x for x in leaves if x is not None]
    grads = torch.autograd.grad(loss, wrt)
    return (o, ht) + tuple(grads)


def _case_id(shape):
    B, T, H, Dk, Dv = shape
    return f"B{B}-T{T}-H{H}-Dk{Dk}-Dv{Dv}"


@pytest.fixture(params=["torch", "triton"])
def backend(request, monkeypatch):
    if request.param == "triton":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    return request.param


@pytest.mark.parametrize("with_h0", [False, True], ids=["noh0", "h0"])
@pytest.mark.parametrize("decay", DECAYS)
@pytest.mark.parametrize("shape", SHAPES, ids=_case_id)
def test_matches_recurrent_reference(backend, shape, decay, with_h0):
    torch.manual_seed(zlib.crc32(repr((shape, decay, with_h0)).encode()))  # str hashes vary per process
    q, k, v, slopes, h0, do, dht = _inputs(*shape, decay, with_h0)
    ref = _reference(q, k, v, slopes, h0, do, dht)

    leaves = [x.clone().requires_grad_(True) if x is not None else None for x in (q, k, v, h0)]
    o, ht = chunk_lightning_attn(leaves[0], leaves[1], leaves[2], slopes, leaves[3], True, backend=backend,
                                 triton_options=POISON)
    assert o.dtype == q.dtype and o.shape == v.shape
    assert ht.dtype == torch.float32 and ht.shape == (shape[0], shape[2], shape[3], shape[4])
    ((o * do).sum() + (ht * dht).sum()).backward()
    got = (o, ht) + tuple(x.grad for x in leaves if x is not None)
    names = ["o", "final_state", "dq", "dk", "dv", "d_initial_state"]
    for name, a, b in zip(names, got, ref):
        err = _rel(a, b)
        assert err < TOL[backend], f"{name}: relative error {err:.2e} >= {TOL[backend]:.0e}"


@pytest.mark.parametrize("shape", [(2, 37, 3, 8, 12)], ids=_case_id)
def test_functional_split_by_linearity(backend, shape):
    """fwd without initial state + the state term added outside == fwd with it; same for bwd."""
    torch.manual_seed(1)
    q, k, v, slopes, h0, do, dht = _inputs(*shape, "hetero", True)
    B, T, H, Dk, Dv = shape
    o_full, ht_full, saved_full = lightning_attn_fwd(q, k, v, slopes, h0, True, backend, triton_options=POISON)
    o_loc, ht_loc, saved_loc = lightning_attn_fwd(q, k, v, slopes, None, True, backend, triton_options=POISON)
    a = decay_powers(slopes, T).transpose(0, 1)[None, :, :, None]  # [1, T, H, 1]
    o_split = o_loc + a * torch.einsum("bthk,bhkv->bthv", q, h0)
    ht_split = ht_loc + state_decay(slopes, T)[None, :, None, None] * h0
    assert _rel(o_split, o_full) < TOL[backend]
    assert _rel(ht_split, ht_full) < TOL[backend]

    dq, dk, dv, dh0 = lightning_attn_bwd(q, k, v, slopes, do, saved=saved_full, d_final_state=dht)
    dq_l, dk_l, dv_l, dh0_l = lightning_attn_bwd(q, k, v, slopes, do, saved=saved_loc)
    b = decay_powers(slopes, T, reverse=True).transpose(0, 1)[None, :, :, None]
    lam_t = state_decay(slopes, T)[None, :, None, None]
    assert _rel(dq_l + a * torch.einsum("bthv,bhkv->bthk", do, h0), dq) < TOL[backend]
    assert _rel(dk_l + b * torch.einsum("bthv,bhkv->bthk", v, dht), dk) < TOL[backend]
    assert _rel(dv_l + b * torch.einsum("bthk,bhkv->bthv", k, dht), dv) < TOL[backend]
    assert _rel(dh0_l + lam_t * dht, dh0) < TOL[backend]


def test_naive_chunk_matches_recurrent():
    torch.manual_seed(2)
    q, k, v, slopes, h0, _, _ = _inputs(2, 45, 4, 8, 6, "hetero", True)
    o_r, ht_r = naive_recurrent_lightning_attn(q, k, v, slopes, h0, True)
    o_c, ht_c = naive_chunk_lightning_attn(q, k, v, slopes, h0, True, chunk_size=16)
    assert _rel(o_c, o_r) < 1e-5 and _rel(ht_c, ht_r) < 1e-5


def test_wrong_decay_exponent_is_caught():
    """The tolerance is far below the error of an off-by-one decay exponent."""
    torch.manual_seed(3)
    q, k, v, slopes, h0, _, _ = _inputs(1, 20, 4, 8, 8, "hetero", True)
    o_r, _ = naive_recurrent_lightning_attn(q, k, v, slopes, h0, True)
    o_shift, _ = naive_recurrent_lightning_attn(q, k, v, slopes, h0 * torch.exp(-slopes)[None, :, None, None], True)
    assert _rel(o_shift, o_r) > 100 * TOL["triton"]


def test_default_and_unknown_backend():
    q, k, v, slopes, _, _, _ = _inputs(1, 5, 2, 4, 4, "hetero", False)
    assert lightning_attn_fwd(q, k, v, slopes)[2].backend == "torch"
    with pytest.raises(ValueError, match="unknown backend"):
        chunk_lightning_attn(q, k, v, slopes, backend="bogus")


BAD_INPUTS = {
    "D>256": (dict(q=(1, 4, 2, 257), k=(1, 4, 2, 257)), "head dims"),
    "k-shape": (dict(k=(1, 4, 2, 6)), "k must have q's shape"),
    "v-shape": (dict(v=(1, 5, 2, 8)), "v must be"),
    "3d-q": (dict(q=(4, 2, 8)), "4-d tensor"),
    "slopes-shape": (dict(slopes=(3,)), "slopes must be"),
    "h0-shape": (dict(h0=(1, 2, 8, 7)), "initial_state must be"),
    "int-dtype": (dict(dtype=torch.int32), "dtype"),
    "mixed-dtype": (dict(vdtype=torch.float16), "share one dtype"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS), ids=list(BAD_INPUTS))
def test_bad_input_errors(case):
    spec, msg = BAD_INPUTS[case]
    dtype = spec.get("dtype", torch.float32)
    q = torch.ones(spec.get("q", (1, 4, 2, 8))).to(dtype)
    k = torch.ones(spec.get("k", (1, 4, 2, 8))).to(dtype)
    v = torch.ones(spec.get("v", (1, 4, 2, 8))).to(spec.get("vdtype", dtype))
    slopes = torch.zeros(spec.get("slopes", (2,)))
    h0 = torch.zeros(spec["h0"]) if "h0" in spec else None
    with pytest.raises(ValueError, match=msg):
        chunk_lightning_attn(q, k, v, slopes, h0, backend="torch")


def test_triton_on_cpu_without_interpreter_errors(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q = torch.ones(1, 4, 2, 8)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        chunk_lightning_attn(q, q, q, torch.zeros(2), backend="triton")


def test_broadcast_output_gradient(backend):
    """``o.sum()`` hands the backward an expanded (stride-0) gradient; only the final state may be unused."""
    torch.manual_seed(4)
    q, k, v, slopes, h0, _, _ = _inputs(1, 21, 2, 16, 16, "hetero", True)
    grads = []
    for impl in ("naive", backend):
        leaves = [x.clone().double().requires_grad_(True) if impl == "naive" else x.clone().requires_grad_(True)
                  for x in (q, k, v, h0)]
        if impl == "naive":
            o, _ = naive_recurrent_lightning_attn(*leaves[:3], slopes.double(), leaves[3], False)
        else:
            o, _ = chunk_lightning_attn(*leaves[:3], slopes, leaves[3], False, backend=impl, triton_options=POISON)
        o.sum().backward()
        grads.append([x.grad for x in leaves])
    for name, a, b in zip(["dq", "dk", "dv", "d_initial_state"], grads[1], grads[0]):
        assert _rel(a, b) < TOL[backend], name
