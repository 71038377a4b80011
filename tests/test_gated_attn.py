"""Per-token gates (``g [B, T, H]``): every backend against the token-by-token fp64 reference.

o, final state and every gradient (dq, dk, dv, dg, d_initial_state), with packed documents, odd
lengths and long spans of strong decay (``g = -20`` per token) that must stay finite; dg's
segment-local form (``segment_gate_grad``) at any segment length, the triton kernel that forms it, and its
accuracy with bf16 inputs. Triton runs
in its CPU interpreter (``TRITON_INTERPRET=1`` through ``monkeypatch``), on small fp32 shapes.
"""

import pytest
import torch

from megatron_lasp.ops.lightning_attn import (
    SliceGate,
    TritonOptions,
    chunk_lightning_attn,
    gate_grad,
    lightning_attn_bwd,
    lightning_attn_bwd_phases,
    lightning_attn_fwd,
    lightning_attn_fwd_phases,
    naive_recurrent_lightning_attn,
    reverse_cumsum_docs,
    segment_gate_grad,
)
from megatron_lasp.ops.lightning_attn.documents import doc_ids_from_cu_seqlens
from megatron_lasp.ops.lightning_attn.gate import block_cumsum
from megatron_lasp.ops.lightning_attn.torch_chunk import (
    torch_lightning_attn_bwd_phases,
    torch_lightning_attn_fwd_phases,
)

POISON = TritonOptions(poison_outputs=True)
TOL = {"torch": 2e-6, "triton": 5e-6}
# With g = -20 per token a block's cumulative sum reaches ~-1300, whose fp32 rounding (1e-4) enters
# exp(G_i - G_j) of neighbouring tokens: the relative error of a cumulative sum in fp32, not a bug
# (a wrong exponent is off by O(1), see test_wrong_exponent_is_caught).
STRONG_TOL = 1e-4
NAMES = ("q", "k", "v", "g", "h0")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    assert torch.isfinite(a).all(), "non-finite values"
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _gates(B, T, H, kind, gen):
    """Log-decays per head from none to strong; ``strong``: a long span of g = -20 per token."""
    scale = torch.tensor([0.0, 0.02, 0.5, 3.0] * H)[:H]
    g = -torch.rand(B, T, H, generator=gen) * scale
    if kind == "strong":
        g[:, T // 4: 3 * T // 4] = -20.0
    return g


def _inputs(B, T, H, Dk, Dv, kind, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(B, T, H, Dk, generator=gen) for _ in range(2))
    v, do = (torch.randn(B, T, H, Dv, generator=gen) for _ in range(2))
    h0, dht = (torch.randn(B, H, Dk, Dv, generator=gen) for _ in range(2))
    return [q, k, v, _gates(B, T, H, kind, gen), h0], do, dht


def _run(fn, leaves, do, dht, dtype):
    xs = [x.to(dtype).requires_grad_() for x in leaves]
    o, s = fn(*xs)
    (o.to(dtype) * do.to(dtype)).sum().add((s * dht.to(s.dtype)).sum()).backward()
    return [o, s] + [x.grad for x in xs]


def _reference(leaves, do, dht, cu=None):
    return _run(lambda q, k, v, g, h0: naive_recurrent_lightning_attn(q, k, v, None, h0, True, cu_seqlens=cu, g=g),
                leaves, do, dht, torch.float64)


def _use(backend, monkeypatch):
    if backend == "triton":
        monkeypatch.setenv("TRITON_INTERPRET", "1")


BACKENDS = ["torch", "triton"]
# (B, T, H, Dk, Dv, cu_seqlens or None): T = 1, odd lengths across several blocks and segments,
# packed documents with boundaries inside blocks, on block edges and one-token documents.
CASES = {
    "T1": (1, 1, 2, 8, 8, None),
    "odd": (2, 75, 4, 16, 8, None),
    "docs": (2, 70, 3, 8, 12, [0, 5, 16, 17, 48, 70, 71, 96, 140]),
    # documents ending exactly on segment ends (32, 64: the interpreter's segments) and crossing them
    "edges": (1, 96, 2, 8, 8, [0, 32, 33, 64, 90, 96]),
}


@pytest.mark.parametrize("kind", ["mixed", "strong"])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_recurrent_reference(backend, case, kind, monkeypatch):
    _use(backend, monkeypatch)
    B, T, H, Dk, Dv, cu = CASES[case]
    cu = None if cu is None else torch.tensor(cu)
    leaves, do, dht = _inputs(B, T, H, Dk, Dv, kind)
    ref = _reference(leaves, do, dht, cu)
    got = _run(lambda q, k, v, g, h0: chunk_lightning_attn(q, k, v, None, h0, True, backend=backend, cu_seqlens=cu,
                                                           g=g, triton_options=POISON),
               leaves, do, dht, torch.float32)
    tol = STRONG_TOL if kind == "strong" else TOL[backend]
    errs = {name: _rel(a, b) for name, a, b in zip(("o", "final") + NAMES, got, ref)}
    assert max(errs.values()) < tol, errs


@pytest.mark.parametrize("backend", BACKENDS)
def test_fixed_decay_is_the_constant_gate(backend, monkeypatch):
    """``g = -slopes`` gives the fixed-decay kernel's outputs and gradients."""
    _use(backend, monkeypatch)
    B, T, H, D = 1, 40, 2, 8
    leaves, do, dht = _inputs(B, T, H, D, D, "mixed")
    slopes = torch.tensor([0.1, 1.0])
    q, k, v, _, h0 = leaves
    o, s, saved = lightning_attn_fwd(q, k, v, slopes, h0, True, backend)
    fixed = (o, s) + lightning_attn_bwd(q, k, v, slopes, do, saved=saved, d_final_state=dht)
    g = (-slopes).expand(B, T, H).contiguous()
    o, s, saved = lightning_attn_fwd(q, k, v, None, h0, True, backend, g=g)
    gated = (o, s) + lightning_attn_bwd(q, k, v, None, do, saved=saved, d_final_state=dht)
    assert len(gated) == 7 and gated[-1].shape == (B, T, H)
    for a, b in zip(gated, fixed):
        assert _rel(a, b) < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_two_phase_split_and_slice_gate(backend, monkeypatch):
    """The modes' split: run the slice with no initial state in two phases, add the entering
    state's terms through :class:`SliceGate`, and get ``dg`` from the totals by :func:`gate_grad`."""
    _use(backend, monkeypatch)
    B, T, H, Dk, Dv = 2, 45, 2, 8, 8
    cu = torch.tensor([0, 20, 45, 50, 90])
    leaves, do, dht = _inputs(B, T, H, Dk, Dv, "mixed", seed=3)
    ref = _reference(leaves, do, dht, cu)
    q, k, v, g, s_in = leaves
    docs = doc_ids_from_cu_seqlens(cu, B, T, q.device)
    sg = SliceGate.of(g, docs)
    s_loc, finish = lightning_attn_fwd_phases(q, k, v, None, backend, g=g, doc_ids=docs)
    o, saved = finish()
    a = sg.a.transpose(1, 2)[..., None]  # [B, T, H, 1]
    o = o + a * torch.einsum("bthk,bhkv->bthv", q, s_in)
    s_out = sg.across[..., None, None] * s_in + s_loc
    dh0_loc, finish = lightning_attn_bwd_phases(q, k, v, None, do, saved=saved)
    dq, dk, dv, dg_loc = finish()
    b = sg.b.transpose(1, 2)[..., None]
    dq = dq + a * torch.einsum("bthv,bhkv->bthk", do, s_in)
    dk = dk + b * torch.einsum("bthv,bhkv->bthk", v, dht)
    dv = dv + b * torch.einsum("bthk,bhkv->bthv", k, dht)
    dh0 = dh0_loc + sg.across[..., None, None] * dht  # across is 0 where a document starts inside
    dg = gate_grad(q, dq, k, dk, docs, s_out, dht)
    tol = TOL[backend]
    for name, x, r in (("o", o, ref[0]), ("final", s_out, ref[1]), ("dq", dq, ref[2]), ("dk", dk, ref[3]),
                       ("dv", dv, ref[4]), ("dg", dg, ref[5]), ("dh0", dh0, ref[6])):
        assert _rel(x, r) < tol, (name, _rel(x, r))
    # the kernel's own dg is the identity on its own terms (no entering state, no final gradient)
    dq0, dk0 = finish()[:2]
    assert _rel(dg_loc, gate_grad(q, dq0, k, dk0, docs)) < 1e-6


@pytest.mark.parametrize("span", [1, 4, 8, 200])
def test_segment_gate_grad_any_span(span):
    """The segment-local dg (README (14)) with segments of 1 token, a few tokens, and one segment
    longer than the sequence, against the token-by-token fp64 reference: initial state, final-state
    gradient, documents ending on segment ends, inside them and of one token. Negative control: the
    boundary term <D_j, S_j> left out."""
    B, T, H, D = 2, 37, 3, 6
    cu = torch.tensor([0, 8, 9, 13, 30, 40, 44, 74])  # row starts at 0 and 37; ends on multiples of 4 and 8
    leaves, do, dht = _inputs(B, T, H, D, D, "mixed", seed=11)
    ref = _reference(leaves, do, dht, cu)
    q, k, v, g, h0 = (x.double() for x in leaves)
    docs = doc_ids_from_cu_seqlens(cu, B, T, q.device)
    final, finish = torch_lightning_attn_fwd_phases(q, k, v, None, h0, span, docs, block_cumsum(g, span))
    _, states = finish()
    _, finish = torch_lightning_attn_bwd_phases(q, k, v, None, do.double(), dht.double(), states, span, docs,
                                                block_cumsum(g, span), gate_parts=True)
    dq, dk, dv, dots, d_states = finish()
    dg = segment_gate_grad(dots, span, states, final, d_states, docs)
    assert dg.shape == (B, T, H) and dg.dtype == torch.float64
    assert _rel(dg, ref[5]) < 1e-12
    no_boundary = segment_gate_grad(dots, span, states, final, torch.zeros_like(d_states), docs)
    assert _rel(no_boundary, ref[5]) > 1e-3


def _gate_grad_kernel_errors(segment: int, docs: bool, sum_by_dot: bool):
    """``(error, error without the boundary term)`` of the triton dg kernel against ``segment_gate_grad``."""
    import types

    from megatron_lasp.ops.lightning_attn import triton_chunk

    B, H, T, dk, dv, n_tiles = 2, 3, 250, 8, 40, 3
    gen = torch.Generator().manual_seed(5)
    cfg = triton_chunk.TritonConfig(block=16, segment=segment, tile=16, poison=True)
    ns = -(-T // segment)
    parts = torch.randn(2, n_tiles, B * H, T, generator=gen)
    states, d_states = (torch.randn(B, H, ns, dk, dv, generator=gen) for _ in range(2))
    final = torch.randn(B, H, dk, dv, generator=gen)
    doc_ids = None
    if docs:
        starts = torch.tensor([0, 16, 40, 41, segment, segment + 1, 2 * segment - 3, T + 30, T + 31, 2 * T - 5])
        doc_ids = doc_ids_from_cu_seqlens(torch.cat([starts, torch.tensor([2 * T])]), B, T, parts.device).to(torch.int32)
    launch = triton_chunk._kernels(True).gate_grad_kernel

    class _Launch:  # the kernel with the form of its sums chosen here
        def __getitem__(self, grid):
            return lambda *a, **kw: launch[grid](*a, **{**kw, "SUM_BY_DOT": sum_by_dot})

    dg = triton_chunk._gate_grad(types.SimpleNamespace(gate_grad_kernel=_Launch()), parts, states, final, d_states,
                                 doc_ids, cfg)
    dots = parts.sum((0, 1)).view(B, H, T)
    ref = segment_gate_grad(dots, segment, states, final, d_states, doc_ids)
    no_boundary = segment_gate_grad(dots, segment, states, final, torch.zeros_like(d_states), doc_ids)
    assert dg.shape == ref.shape == (B, T, H)
    return _rel(dg, ref), _rel(dg, no_boundary)


@pytest.mark.parametrize("form", ["dots", "compiled"])
@pytest.mark.parametrize("segment", [64, 112])
@pytest.mark.parametrize("docs", [False, True])
def test_gate_grad_kernel_many_blocks(segment, docs, form, monkeypatch):
    """The triton backend's dg kernel against ``segment_gate_grad`` in segments of 4 and 7 blocks
    (the interpreter's own configuration has 2, the GPU's 4 to 64): the carry from block to block,
    documents that end on block edges, inside blocks, after one token, right after a segment's last
    token, and a last segment shorter than the others. Both forms of its sums: the dots the
    interpreter runs and the tl.sum form compiled for the GPU (which the interpreter runs only when
    TRITON_INTERPRET was set before triton's import: in a fresh process). Negative control: the
    state gradients at segment ends left out."""
    if form == "dots":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        err, err_no_boundary = _gate_grad_kernel_errors(segment, docs, True)
    else:
        import json
        import os
        import subprocess
        import sys

        code = ("import json, sys; sys.path.insert(0, 'tests'); import test_gated_attn as t; "
                f"print(json.dumps(t._gate_grad_kernel_errors({segment}, {docs}, False)))")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                             env={**os.environ, "TRITON_INTERPRET": "1"},
                             cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        assert out.returncode == 0, out.stderr[-2000:]
        err, err_no_boundary = json.loads(out.stdout.strip().splitlines()[-1])
    assert err < 1e-6
    assert err_no_boundary > 1e-2


@pytest.mark.parametrize("docs", [False, True])
def test_gate_grad_kernel_compiles_for_hopper(docs):
    """The compiled form of the dg kernel (which the interpreter runs only in part: it does not check
    that a loop-carried value keeps its type) compiles for sm_90 with the GPU's launch constants,
    on the CPU, with no tensor-core dots left in it."""
    from megatron_lasp.ops.lightning_attn import triton_chunk
    from megatron_lasp.testing import hopper_ptx

    consts = dict(BT=64, CW=128, HAS_DOC=docs, F32_DOT="tf32x3", SUM_BY_DOT=False)
    pointers = dict(PARTS="*fp32", STATES="*fp32", FINAL="*fp32", DSTATES="*fp32", DOC="*i32", DG="*fp32")
    ptx = hopper_ptx(triton_chunk._gate_grad_kernel, pointers, consts, warps=4)
    assert ".entry _gate_grad_kernel" in ptx and "mma" not in ptx


@pytest.mark.parametrize("backend", BACKENDS)
def test_dg_from_unrounded_dots(backend, monkeypatch):
    """bf16 inputs: dg comes from q.dq - k.dk formed before dq, dk are rounded to bf16 and summed
    inside segments, so it is as accurate as the fp32 arithmetic; the same formula from the
    returned bf16 dq, dk over the whole sequence (the old way) is far less accurate. D = 48: two
    output tiles of the interpreter's 32 columns, the second one partly masked."""
    _use(backend, monkeypatch)
    B, T, H, D = 1, 160, 2, 48
    leaves, do, dht = _inputs(B, T, H, D, D, "mixed", seed=4)
    leaves[:3] = [x.bfloat16() for x in leaves[:3]]
    do = do.bfloat16()
    ref = _reference([x.double() for x in leaves], do.double(), dht)
    q, k, v, g, h0 = leaves
    o, s, saved = lightning_attn_fwd(q, k, v, None, h0, True, backend, g=g)
    dq, dk, dv, dh0, dg = lightning_attn_bwd(q, k, v, None, do, saved=saved, d_final_state=dht)
    assert dq.dtype == torch.bfloat16 and dg.dtype == torch.float32
    new = _rel(dg, ref[5])
    old = _rel(gate_grad(q, dq, k, dk, None, s, dht), ref[5])
    assert new < 1e-5 and old > 10 * new, (new, old)


def test_gate_without_grad_and_state_only_loss():
    """A gate that needs no gradient gets none; a loss on the final state alone (no output
    gradient) still gives every gradient, dg included; the backward recomputes without ``saved``."""
    leaves, do, dht = _inputs(1, 50, 2, 8, 8, "mixed", seed=9)
    q, k, v, g, h0 = (x.double().requires_grad_() for x in leaves)
    g.requires_grad_(False)
    o, s = chunk_lightning_attn(q, k, v, None, h0, True, backend="torch", g=g)
    s.mul(dht.double()).sum().backward()
    assert g.grad is None and q.grad is not None
    gr = g.detach().clone().requires_grad_()
    xs = [x.detach().clone().requires_grad_() for x in (q, k, v, h0)]
    _, s_ref = naive_recurrent_lightning_attn(xs[0], xs[1], xs[2], None, xs[3], True, g=gr)
    s_ref.mul(dht.double()).sum().backward()
    ys = [x.detach().clone().requires_grad_() for x in (q, k, v, h0)]
    gt = g.detach().clone().requires_grad_()
    _, s2 = chunk_lightning_attn(ys[0], ys[1], ys[2], None, ys[3], True, backend="torch", g=gt)
    s2.mul(dht.double()).sum().backward()
    assert xs[0].grad is None and float(ys[0].grad.abs().max()) == 0.0  # q does not reach the final state
    for a, b in zip(ys[1:] + [gt], xs[1:] + [gr]):
        assert _rel(a.grad, b.grad) < 1e-10
    grads = lightning_attn_bwd(*(x.detach() for x in (q, k, v)), None, do.double(), d_final_state=dht.double(),
                               initial_state=h0.detach(), backend="torch", g=g)
    o, s, saved = lightning_attn_fwd(*(x.detach() for x in (q, k, v)), None, h0.detach(), True, "torch", g=g)
    again = lightning_attn_bwd(*(x.detach() for x in (q, k, v)), None, do.double(), saved=saved,
                               d_final_state=dht.double())
    for a, b in zip(grads, again):
        assert torch.equal(a, b)


def test_slice_gate_matches_products_of_exp():
    """log a / log b / log across against products of exp(g) token by token, documents included."""
    B, C, H = 2, 9, 3
    g = -torch.rand(B, C, H, dtype=torch.float64)
    docs = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2, 2], [5, 5, 5, 5, 5, 5, 5, 5, 5]])
    sg = SliceGate.of(g, docs)
    lam = torch.exp(g)
    for b in range(B):
        first, last = docs[b, 0], docs[b, -1]
        for t in range(C):
            a = lam[b, :t + 1].prod(0) if docs[b, t] == first else torch.zeros(H, dtype=lam.dtype)
            w = lam[b, t + 1:].prod(0) if docs[b, t] == last else torch.zeros(H, dtype=lam.dtype)
            assert torch.allclose(sg.a[b, :, t], a) and torch.allclose(sg.b[b, :, t], w)
        across = lam[b].prod(0) if first == last else torch.zeros(H, dtype=lam.dtype)
        assert torch.allclose(sg.across[b], across)


def test_reverse_cumsum_restarts_at_documents():
    x = torch.arange(1.0, 7.0).view(1, 6, 1)
    docs = torch.tensor([[0, 0, 1, 1, 1, 2]])
    assert reverse_cumsum_docs(x, docs).view(-1).tolist() == [3.0, 2.0, 12.0, 9.0, 5.0, 6.0]
    assert reverse_cumsum_docs(x, None).view(-1).tolist() == [21.0, 20.0, 18.0, 15.0, 11.0, 6.0]


def test_wrong_exponent_is_caught():
    """Negative control: a gate off by one token (exp(G_{t-1}) for exp(G_t)) fails the tolerance."""
    leaves, do, dht = _inputs(1, 30, 2, 8, 8, "mixed")
    ref = _reference(leaves, do, dht)
    g = leaves[3]
    shifted = leaves[:3] + [torch.cat([torch.zeros_like(g[:, :1]), g[:, :-1]], 1), leaves[4]]
    got = _run(lambda q, k, v, g, h0: chunk_lightning_attn(q, k, v, None, h0, True, backend="torch", g=g),
               shifted, do, dht, torch.float32)
    assert _rel(got[0], ref[0]) > 100 * TOL["torch"]
    # and a dg without its reverse cumulative sum
    q, k, v, g, h0 = leaves
    o, s, saved = lightning_attn_fwd(q, k, v, None, h0, True, "torch", g=g)
    dq, dk, dv, dh0, dg = lightning_attn_bwd(q, k, v, None, do, saved=saved, d_final_state=dht)
    dG = (q * dq).sum(-1) - (k * dk).sum(-1)
    assert _rel(dG, ref[5]) > 100 * TOL["torch"] and _rel(dg, ref[5]) < TOL["torch"]


def test_bad_gate_inputs():
    q = torch.randn(1, 4, 2, 8)
    with pytest.raises(ValueError, match="either slopes"):
        chunk_lightning_attn(q, q, q, torch.zeros(2), g=torch.zeros(1, 4, 2), backend="torch")
    with pytest.raises(ValueError, match="either slopes"):
        chunk_lightning_attn(q, q, q, None, backend="torch")
    with pytest.raises(ValueError, match=r"g must be a float tensor \[B, T, H\]"):
        chunk_lightning_attn(q, q, q, None, g=torch.zeros(1, 4), backend="torch")
    with pytest.raises(ValueError, match="positive values"):
        chunk_lightning_attn(q, q, q, None, g=torch.full((1, 4, 2), 0.1), backend="torch")
    o, _, saved = lightning_attn_fwd(q, q, q, None, g=torch.zeros(1, 4, 2), backend="torch")
    with pytest.raises(ValueError, match="slopes=None for per-token gates"):
        lightning_attn_bwd(q, q, q, torch.zeros(2), o, saved=saved)


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _gpu_errors(leaves, do, dht, cu, dtype, options):
    """Relative errors of the Triton kernels (``dtype``, launch ``options``) against the torch
    backend in fp64, every output and gradient."""
    def run(backend, cast):
        xs = [cast(x).detach().clone().requires_grad_() for x in leaves[:3]]
        g = leaves[3].detach().clone().to(torch.float64 if backend == "torch" else torch.float32).requires_grad_()
        h0 = leaves[4].detach().clone().to(torch.float64 if backend == "torch" else torch.float32).requires_grad_()
        o, s = chunk_lightning_attn(*xs, None, h0, True, backend=backend, cu_seqlens=cu, g=g,
                                    triton_options=options if backend == "triton" else None)
        torch.autograd.backward((o, s), (cast(do), dht.to(s.dtype)))
        return [o, s] + [x.grad for x in xs] + [g.grad, h0.grad]

    ref = run("torch", lambda x: x.double())
    got = run("triton", lambda x: x.to(dtype))
    return {name: _rel(a, b) for name, a, b in zip(("o", "final") + NAMES, got, ref)}


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("docs", [False, True], ids=["nodocs", "docs"])
def test_gpu_long_segments_match_fp64(docs):
    """Segments of 8192 tokens (the gated launch's longest, at 128K and beyond) on a short sequence:
    two whole segments and a partial one, bf16, with documents crossing them."""
    B, T, H, D = 1, 20000, 2, 128
    leaves, do, dht = _inputs(B, T, H, D, D, "strong", seed=6)
    leaves = [x.cuda() for x in leaves]
    leaves[0], leaves[1] = leaves[0] * D ** -0.25, leaves[1] * D ** -0.25
    do, dht = do.cuda(), dht.cuda()
    cu = torch.tensor([0, 5000, 8191, 8193, 16400, 20000], device="cuda") if docs else None
    errs = _gpu_errors(leaves, do, dht, cu, torch.bfloat16, TritonOptions(segment=8192, poison_outputs=True))
    assert max(errs.values()) < 1e-2, errs


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("docs", [False, True], ids=["nodocs", "docs"])
def test_gpu_kernels_match_fp64(dtype, docs):
    """The CUDA kernels (bf16, fp32) against the torch backend in fp64, every output and gradient
    incl. dg, with a span of g = -20 and (docs) packed documents crossing blocks and segments."""
    B, T, H, D = 2, 3000, 4, 128
    leaves, do, dht = _inputs(B, T, H, D, D, "strong", seed=5)
    leaves = [x.cuda() for x in leaves]
    leaves[0], leaves[1] = leaves[0] * D ** -0.25, leaves[1] * D ** -0.25
    do, dht = do.cuda(), dht.cuda()
    cu = torch.tensor([0, 1, 700, 2048, 2049, 3100, 4096, 6000], device="cuda") if docs else None

    errs = _gpu_errors(leaves, do, dht, cu, dtype, POISON)
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-4
    assert max(errs.values()) < tol, errs
    if dtype == torch.bfloat16:
        # dg as accurate as the gradients it is made of (it was 6x worse when summed over the whole
        # sequence from the bf16-rounded dq, dk)
        assert errs["g"] < 2.5 * max(errs["q"], errs["k"]), errs


def test_triton_long_segments_match_reference(monkeypatch):
    """Segments of 128 blocks (the GPU's longest gated segments: 8192 tokens of 64-token blocks; the
    interpreter's own configuration has 2 blocks a segment) in the interpreter: two whole segments
    and a partial one, documents ending on and crossing segment ends, fp32 against fp64."""
    from megatron_lasp.ops.lightning_attn import triton_chunk

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    long = triton_chunk.TritonConfig(block=16, segment=2048, tile=16, poison=True)
    used = []
    monkeypatch.setattr(triton_chunk, "triton_config", lambda *a, **kw: used.append(kw.get("gated")) or long)
    B, T, H, D = 1, 4500, 1, 8
    cu = torch.tensor([0, 700, 2048, 2049, 4000, 4500])
    leaves, do, dht = _inputs(B, T, H, D, D, "mixed", seed=3)
    ref = _reference(leaves, do, dht, cu)
    got = _run(lambda q, k, v, g, h0: chunk_lightning_attn(q, k, v, None, h0, True, backend="triton", cu_seqlens=cu,
                                                           g=g, triton_options=POISON),
               leaves, do, dht, torch.float32)
    errs = {name: _rel(a, b) for name, a, b in zip(("o", "final") + NAMES, got, ref)}
    assert used == [True], used  # the gated launch, the long segments
    assert max(errs.values()) < TOL["triton"], errs
