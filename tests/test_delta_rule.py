"""Gated delta rule: the chunked torch backend and the fla backend against the token-by-token reference.

The CPU tests compare ``backend="torch"`` with ``naive_recurrent_gated_delta_rule`` in fp64 (outputs,
final state, every gradient), check fp32 against the fp64 reference, strong decay, packed documents
against documents run one by one, the linearity in the entering state that sequence parallelism
uses (README.md, "Sequence parallelism"), the fla adapter's bookkeeping (with a CPU stand-in for
fla) and the input checks. The GPU tests (``-m gpu``) run the fla backend.
"""

import zlib

import pytest
import torch
import torch.nn.functional as F

from megatron_lasp.ops.delta_rule import (
    FlaDocuments,
    chunk_gated_delta_rule,
    naive_recurrent_gated_delta_rule,
    resolve_backend,
)
from megatron_lasp.ops.delta_rule import chunk as chunk_module

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# fp64 chunked vs fp64 token loop: the same arithmetic reordered (a triangular solve with unit keys
# and beta in [0, 1] is well conditioned), so only rounding differences of ~1e-15 remain.
TOL_FP64 = 1e-10
# fp32 chunked vs fp64 reference: fp32 rounding (6e-8) of sums over a chunk and a few hundred steps
# (measured 2e-7 to 1e-6).
TOL_FP32 = 1e-5
# fp32 under strong decay: a factor exp(G_i - G_j) after a stretch of g ~ -35 inside the same chunk is
# the difference of two cumulative sums near -2000, each rounded to fp32 (ulp 1.2e-4 to 2.4e-4), so
# it carries ~1e-4 relative error (measured 1.5e-5 overall; the token loop has 1e-7). A wrong decay
# or correction is off by O(1).
TOL_FP32_STRONG = 1e-4

GRAD_NAMES = ["dq", "dk", "dv", "dg", "dbeta", "d_initial_state"]


def _seed(*key) -> None:
    torch.manual_seed(zlib.crc32(repr(key).encode()))  # str hashes vary per process


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    assert torch.isfinite(a).all(), "non-finite values"
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _inputs(B, T, H, Dk, Dv, dtype=torch.float64, device="cpu", strong=False):
    """Gated DeltaNet's regime: unit keys (the layer L2-normalises them), beta in (0, 1), gates of
    logsigmoid; ``strong``: stretches of g between -50 and -20 (the state is wiped there)."""
    q = torch.randn(B, T, H, Dk, dtype=torch.float64)
    k = F.normalize(torch.randn(B, T, H, Dk, dtype=torch.float64), dim=-1)
    v = torch.randn(B, T, H, Dv, dtype=torch.float64)
    g = F.logsigmoid(2 * torch.randn(B, T, H, dtype=torch.float64) + 3)
    if strong:
        for start in range(T // 5, T, max(T // 2, 1)):
            n = min(max(T // 8, 1), T - start)
            g[:, start:start + n] = -20 - 30 * torch.rand(B, n, H, dtype=torch.float64)
    beta = torch.rand(B, T, H, dtype=torch.float64)
    h0 = torch.randn(B, H, Dk, Dv, dtype=torch.float64)
    do = torch.randn(B, T, H, Dv, dtype=torch.float64)
    dht = torch.randn(B, H, Dk, Dv, dtype=torch.float64)
    cast = lambda x: x.to(device=device, dtype=dtype)  # noqa: E731
    return [cast(x) for x in (q, k, v)] + [g.to(device), beta.to(device), h0.to(device), do.to(device),
                                             dht.to(device)]


def _run(fn, q, k, v, g, beta, h0, do, dht, dtype=None, **kw):
    """``(o, final_state, dq, dk, dv, dg, dbeta, d_initial_state)`` of ``fn`` on leaves cast to ``dtype``."""
    leaves = [x.detach().to(dtype or x.dtype).requires_grad_(True) for x in (q, k, v, g, beta, h0)]
    o, ht = fn(*leaves[:5], initial_state=leaves[5], output_final_state=True, **kw)
    loss = (o.double() * do.double()).sum() + (ht.double() * dht.double()).sum()
    return (o, ht) + torch.autograd.grad(loss, leaves)


def _reference(q, k, v, g, beta, h0, do, dht, **kw):
    return _run(naive_recurrent_gated_delta_rule, q, k, v, g, beta, h0, do, dht, dtype=torch.float64, **kw)


def _assert_close(got, ref, tol, names=("o", "final_state") + tuple(GRAD_NAMES)):
    for name, a, b in zip(names, got, ref):
        err = _rel(a, b)
        assert err < tol, f"{name}: relative error {err:.2e} >= {tol:.0e}"


def _case_id(shape):
    B, T, H, Dk, Dv = shape
    return f"B{B}-T{T}-H{H}-Dk{Dk}-Dv{Dv}"


# T = 1, one short of a chunk, one past it, several chunks with a ragged end; Dv != Dk both ways.
SHAPES = [(1, 1, 2, 8, 8), (2, 63, 3, 16, 16), (1, 65, 2, 16, 40), (2, 200, 2, 32, 12)]


@pytest.mark.parametrize("shape", SHAPES, ids=_case_id)
def test_torch_matches_naive_fp64(shape):
    _seed("fp64", shape)
    args = _inputs(*shape)
    ref = _reference(*args)
    got = _run(chunk_gated_delta_rule, *args, backend="torch")
    assert got[0].dtype == torch.float64 and got[1].dtype == torch.float64
    _assert_close(got, ref, TOL_FP64)


@pytest.mark.parametrize("shape", SHAPES[1:], ids=_case_id)
def test_torch_fp32_matches_naive_fp64(shape):
    _seed("fp32", shape)
    args = _inputs(*shape, dtype=torch.float32)
    ref = _reference(*args)
    got = _run(chunk_gated_delta_rule, *args, dtype=torch.float32, backend="torch")
    assert got[0].dtype == torch.float32 and got[1].dtype == torch.float32
    _assert_close(got, ref, TOL_FP32)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_strong_decay_stays_finite_and_exact(dtype):
    """Stretches of g in [-50, -20] (sums of -3000 inside one chunk): every exponent stays <= 0."""
    _seed("strong", dtype)
    args = _inputs(2, 300, 2, 16, 16, dtype=dtype, strong=True)
    assert args[3].min() < -40
    ref = _reference(*args)
    got = _run(chunk_gated_delta_rule, *args, dtype=dtype, backend="torch")
    _assert_close(got, ref, TOL_FP64 if dtype == torch.float64 else TOL_FP32_STRONG)


def test_scale_and_defaults():
    """``scale`` multiplies q (default Dk ** -0.5); no final state unless asked; bf16 in, bf16 out."""
    _seed("defaults")
    q, k, v, g, beta, h0, _, _ = _inputs(1, 70, 2, 16, 8)
    o, ht = chunk_gated_delta_rule(q, k, v, g, beta)
    assert ht is None
    o2, _ = chunk_gated_delta_rule(q * 16 ** -0.5, k, v, g, beta, scale=1.0)
    o3, _ = naive_recurrent_gated_delta_rule(q, k, v, g, beta, scale=0.25)
    o4, _ = chunk_gated_delta_rule(q, k, v, g, beta, scale=0.25)
    assert _rel(o2, o) < TOL_FP64 and _rel(o4, o3) < TOL_FP64
    ob, htb = chunk_gated_delta_rule(q.bfloat16(), k.bfloat16(), v.bfloat16(), g, beta, output_final_state=True)
    assert ob.dtype == torch.bfloat16 and htb.dtype == torch.float32


# Packed documents: (B, T, cu_seqlens). Documents crossing chunk edges, one-token and empty
# documents, a row start not listed (the row start still cuts the document), documents ending
# exactly on a row end, and one document per row.
DOC_CASES = {
    "B2-T150-docs": (2, 150, [0, 10, 11, 11, 80, 150, 151, 230, 300]),
    "B3-T70-unlisted-row-starts": (3, 70, [0, 5, 100, 130, 131, 210]),
    "B2-T64-rows-only": (2, 64, [0, 64, 128]),
    "B1-T130-empty-ends": (1, 130, [0, 0, 64, 65, 129, 130, 130]),
}


def _per_document(fn, q, k, v, g, beta, h0, B, T, cu):
    """The documents run one by one: zero state but each row's first, whose state is ``h0[b]``."""
    starts = sorted(set(cu) | {b * T for b in range(B + 1)})
    outs, finals = [], []
    for b in range(B):
        row = [s - b * T for s in starts if b * T <= s <= (b + 1) * T]
        state = h0[b:b + 1]
        for lo, hi in zip(row[:-1], row[1:]):
            if hi == lo:
                continue
            sl = slice(lo, hi)
            o, final = fn(q[b:b + 1, sl], k[b:b + 1, sl], v[b:b + 1, sl], g[b:b + 1, sl], beta[b:b + 1, sl],
                          initial_state=state if lo == 0 else torch.zeros_like(state), output_final_state=True)
            outs.append(o)
            state = final
        finals.append(state)
    return torch.cat(outs, dim=1).view_as(v), torch.cat(finals)


@pytest.mark.parametrize("case", list(DOC_CASES), ids=list(DOC_CASES))
def test_packed_documents(case):
    B, T, cu = DOC_CASES[case]
    _seed("docs", case)
    q, k, v, g, beta, h0, do, dht = _inputs(B, T, 2, 8, 12)
    cu_seqlens = torch.tensor(cu, dtype=torch.int32)

    def by_hand(*leaves, initial_state, output_final_state):
        return _per_document(naive_recurrent_gated_delta_rule, *leaves, initial_state, B, T, cu)

    ref = _run(by_hand, q, k, v, g, beta, h0, do, dht)
    naive = _run(naive_recurrent_gated_delta_rule, q, k, v, g, beta, h0, do, dht, cu_seqlens=cu_seqlens)
    _assert_close(naive, ref, TOL_FP64)
    got = _run(chunk_gated_delta_rule, q, k, v, g, beta, h0, do, dht, cu_seqlens=cu_seqlens.long(),
               backend="torch")
    _assert_close(got, ref, TOL_FP64)


def _augmented(q, k, v, g, beta, **kw):
    """The op on ``[v | 0]`` from ``[0 | I]``: ``(o_local, q~, S_local, P)`` (README.md, "Sequence parallelism")."""
    B, T, H, Dk = q.shape
    Dv = v.shape[-1]
    v_aug = torch.cat([v, v.new_zeros(B, T, H, Dk)], dim=-1)
    eye = torch.eye(Dk, dtype=q.dtype).expand(B, H, Dk, Dk)
    h_aug = torch.cat([q.new_zeros(B, H, Dk, Dv), eye], dim=-1)
    o, ht = chunk_gated_delta_rule(q, k, v_aug, g, beta, initial_state=h_aug, output_final_state=True, **kw)
    return o[..., :Dv], o[..., Dv:], ht[..., :Dv], ht[..., Dv:]


@pytest.mark.parametrize("docs", [False, True], ids=["one-doc", "docs"])
def test_linear_in_entering_state(docs):
    """o = o_local + q~ S_in and S_out = P S_in + S_local equal the run from S_in (fp64)."""
    _seed("linear", docs)
    B, T, H, Dk, Dv = 2, 150, 2, 16, 24
    q, k, v, g, beta, s_in, _, _ = _inputs(B, T, H, Dk, Dv)
    kw = {"cu_seqlens": torch.tensor([0, 40, 100, 150, 220, 300])} if docs else {}
    o_loc, q_tilde, s_loc, P = _augmented(q, k, v, g, beta, **kw)
    o_direct, s_direct = chunk_gated_delta_rule(q, k, v, g, beta, initial_state=s_in, output_final_state=True, **kw)
    o = o_loc + torch.einsum("bthk,bhkv->bthv", q_tilde, s_in)
    s_out = P @ s_in + s_loc
    assert _rel(o, o_direct) < TOL_FP64
    assert _rel(s_out, s_direct) < TOL_FP64
    # q~_t = P_t^T (scale q_t) with P_t the product of the transitions up to t: at the last token of a
    # single-document row that is P itself.
    if not docs:
        last = torch.einsum("bhjk,bhj->bhk", P, q[:, -1] * Dk ** -0.5)
        assert _rel(q_tilde[:, -1], last) < TOL_FP64
    # and the naive reference agrees on the augmented run
    ref_o, ref_s = naive_recurrent_gated_delta_rule(q, k, v, g, beta, initial_state=s_in, output_final_state=True,
                                                    **kw)
    assert _rel(o, ref_o) < TOL_FP64 and _rel(s_out, ref_s) < TOL_FP64


# --- the fla adapter, on the CPU ----------------------------------------------------------------

def test_fla_documents_bookkeeping():
    # rows of 10 tokens at 0, 10, 20, 30; an empty document at 4, a document over the row start 10
    docs = FlaDocuments.from_cu_seqlens(torch.tensor([0, 4, 4, 13, 20, 25, 30], dtype=torch.int32), B=3, T=10)
    assert docs.offsets.tolist() == [0, 4, 10, 13, 20, 25, 30]
    assert docs.offsets.dtype == torch.int64
    assert docs.first.tolist() == [0, 2, 4] and docs.last.tolist() == [1, 3, 5]
    # empty documents at row starts and ends, one document per row
    docs = FlaDocuments.from_cu_seqlens(torch.tensor([0, 0, 10, 10, 20, 30, 30]), B=3, T=10)
    assert docs.offsets.tolist() == [0, 10, 20, 30]
    assert docs.first.tolist() == [0, 1, 2] and docs.last.tolist() == [0, 1, 2]
    # states: row b's initial state to its first sequence, zeros elsewhere; final from its last
    docs = FlaDocuments.from_cu_seqlens(torch.tensor([0, 3, 10, 12, 15, 20]), B=2, T=10)
    assert docs.first.tolist() == [0, 2] and docs.last.tolist() == [1, 4]
    h0 = torch.randn(2, 3, 4, 5)
    spread = docs.initial_states(h0)
    assert spread.shape == (5, 3, 4, 5)
    assert torch.equal(spread[0], h0[0]) and torch.equal(spread[2], h0[1])
    assert not spread[[1, 3, 4]].any()
    ht = torch.randn(5, 3, 4, 5)
    assert torch.equal(docs.final_states(ht), ht[[1, 4]])


def _fake_fla(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None):
    """fla's documented convention on the CPU (with cu_seqlens: B = 1, one state per sequence)."""
    assert g.dtype == torch.float32 and beta.dtype == torch.float32
    if cu_seqlens is None:
        return naive_recurrent_gated_delta_rule(q, k, v, g, beta, scale, initial_state, output_final_state)
    assert q.shape[0] == 1 and cu_seqlens.dtype == torch.int64
    bounds = cu_seqlens.tolist()
    assert all(hi > lo for lo, hi in zip(bounds[:-1], bounds[1:])), "the adapter must drop empty documents"
    outs, finals = [], []
    for i, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
        h = None if initial_state is None else initial_state[i:i + 1]
        o, ht = naive_recurrent_gated_delta_rule(*(x[:, lo:hi] for x in (q, k, v, g, beta)), scale, h, True)
        outs.append(o)
        finals.append(ht)
    return torch.cat(outs, dim=1), (torch.cat(finals) if output_final_state else None)


@pytest.mark.parametrize("case", ["B2-T150-docs", "B3-T70-unlisted-row-starts"])
def test_fla_adapter_with_stand_in(monkeypatch, case):
    """The fla path's adapter end to end, with fla replaced by its convention run on the CPU."""
    monkeypatch.setattr(chunk_module, "_fla_op", lambda: _fake_fla)
    B, T, cu = DOC_CASES[case]
    _seed("fla-adapter", case)
    q, k, v, g, beta, h0, do, dht = _inputs(B, T, 2, 8, 12, dtype=torch.float32)
    cu_seqlens = torch.tensor(cu)
    ref = _reference(q, k, v, g, beta, h0, do, dht, cu_seqlens=cu_seqlens)

    def fla_path(q, k, v, g, beta, initial_state, output_final_state, cu_seqlens):
        return chunk_module._fla_forward(q, k, v, g, beta, 8 ** -0.5, initial_state, output_final_state, cu_seqlens)

    got = _run(fla_path, q, k, v, g, beta, h0, do, dht, cu_seqlens=cu_seqlens)
    _assert_close(got, ref, TOL_FP32)


def test_backend_choice(monkeypatch):
    assert resolve_backend(None, torch.device("cpu")) == "torch"
    monkeypatch.setattr(chunk_module, "_fla_op", lambda: None)
    chunk_module._warn_no_fla.cache_clear()
    with pytest.warns(UserWarning, match="not installed"):
        assert resolve_backend(None, torch.device("cuda")) == "torch"
    monkeypatch.setattr(chunk_module, "_fla_op", lambda: _fake_fla)
    assert resolve_backend(None, torch.device("cuda")) == "fla"


# --- input checks -------------------------------------------------------------------------------

def _bad(name):
    B, T, H, Dk, Dv = 2, 5, 2, 4, 6
    q, k, v = torch.randn(B, T, H, Dk), torch.randn(B, T, H, Dk), torch.randn(B, T, H, Dv)
    g, beta = -torch.rand(B, T, H), torch.rand(B, T, H)
    kw = {}
    if name == "q-3d":
        q = q[0]
    elif name == "k-shape":
        k = torch.randn(B, T, H, Dk + 1)
    elif name == "v-rows":
        v = torch.randn(B, T + 1, H, Dv)
    elif name == "dtype-mix":
        v = v.double()
    elif name == "int-inputs":
        q, k, v = q.long(), k.long(), v.long()
    elif name == "g-shape":
        g = g[..., None]
    elif name == "beta-shape":
        beta = beta.transpose(1, 2)
    elif name == "g-int":
        g = torch.zeros(B, T, H, dtype=torch.long)
    elif name == "g-positive":
        g = g.abs() + 0.1
    elif name == "beta-nan":
        beta[0, 0, 0] = float("nan")
    elif name == "h0-shape":
        kw["initial_state"] = torch.zeros(B, H, Dv, Dk)
    elif name == "cu-last":
        kw["cu_seqlens"] = torch.tensor([0, 3, 9])
    elif name == "cu-decreasing":
        kw["cu_seqlens"] = torch.tensor([0, 6, 3, 10])
    elif name == "cu-float":
        kw["cu_seqlens"] = torch.tensor([0.0, 10.0])
    elif name == "scale-nan":
        kw["scale"] = float("nan")
    elif name == "backend-unknown":
        kw["backend"] = "triton"
    elif name == "fla-on-cpu":
        kw["backend"] = "fla"
    return (q, k, v, g, beta), kw


BAD = {
    "q-3d": "q must be a 4-d tensor",
    "k-shape": "k must have q's shape",
    "v-rows": "v must be .B, T, H, Dv.",
    "dtype-mix": "must share one dtype",
    "int-inputs": "is not supported",
    "g-shape": "g must be a float tensor .B, T, H.",
    "beta-shape": "beta must be a float tensor .B, T, H.",
    "g-int": "g must be a float tensor",
    "g-positive": "log-decays <= 0",
    "beta-nan": "beta has inf or NaN",
    "h0-shape": "initial_state must be .B, H, Dk, Dv.",
    "cu-last": "cu_seqlens must start at 0 and end at",
    "cu-decreasing": "non-decreasing",
    "cu-float": "int32 or int64",
    "scale-nan": "scale must be a finite number",
    "backend-unknown": "unknown backend 'triton'",
    "fla-on-cpu": "needs CUDA tensors",
}


@pytest.mark.parametrize("name", list(BAD), ids=list(BAD))
def test_bad_inputs_raise(name):
    args, kw = _bad(name)
    with pytest.raises(ValueError, match=BAD[name]) as err:
        chunk_gated_delta_rule(*args, **kw)
    assert "\n" not in str(err.value) and str(err.value).startswith("gated delta rule")


# --- GPU: the fla backend -----------------------------------------------------------------------

# Bounds against the fp64 reference run on the same (rounded) inputs, so only the kernels' own
# arithmetic counts. bf16: fla feeds the tensor cores bf16 operands (unit roundoff 2^-9 = 2e-3) and
# rounds the intermediate w, u, states' bf16 copies and the outputs once more; a handful of such
# roundings of independent terms gives a few 1e-3 in relative norm (lightning attention's README
# measures 2.5e-3 for fla's gated kernels at 8K tokens); the bounds leave 4x-10x room and still
# sit two orders below what a wrong gate or a dropped correction gives (relative errors of O(1)).
# fp32: Triton's dots on fp32 run as TF32 (roundoff 2^-11 = 5e-4), hence 5x tighter bounds.
FLA_TOL = {torch.bfloat16: (2e-2, 5e-2), torch.float32: (5e-3, 1e-2)}  # (o and final state, gradients)

FLA_CASES = {
    "B1-T1000-H4-D64": dict(shape=(1, 1000, 4, 64, 64), h0=False, cu=None),
    "B1-T1000-H4-D64-h0": dict(shape=(1, 1000, 4, 64, 64), h0=True, cu=None),
    "B2-T500-H4-Dk64-Dv128-h0": dict(shape=(2, 500, 4, 64, 128), h0=True, cu=None),
    "B2-T600-H2-D64-docs-h0": dict(shape=(2, 600, 2, 64, 64), h0=True, cu=[0, 100, 100, 450, 700, 701, 1200]),
}


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("case", list(FLA_CASES), ids=list(FLA_CASES))
def test_fla_matches_naive(case, dtype):
    pytest.importorskip("fla")
    spec = FLA_CASES[case]
    _seed("fla", case)
    q, k, v, g, beta, h0, do, dht = _inputs(*spec["shape"], dtype=dtype, device="cuda")
    g, beta = g.float(), beta.float()
    h0 = h0.float() if spec["h0"] else torch.zeros_like(h0, dtype=torch.float32)
    kw = {} if spec["cu"] is None else {"cu_seqlens": torch.tensor(spec["cu"], dtype=torch.int32, device="cuda")}
    ref = _reference(q, k, v, g, beta, h0, do, dht, **kw)
    try:
        got = _run(chunk_gated_delta_rule, q, k, v, g, beta, h0, do, dht, backend="fla", **kw)
    except AssertionError as e:  # some fla versions refuse fp32 inputs
        pytest.skip(f"this fla version refuses {dtype}: {e}")
    assert got[0].dtype == dtype and got[1].dtype == torch.float32
    fwd_tol, grad_tol = FLA_TOL[dtype]
    _assert_close(got[:2], ref[:2], fwd_tol)
    _assert_close(got[2:], ref[2:], grad_tol, names=GRAD_NAMES)
