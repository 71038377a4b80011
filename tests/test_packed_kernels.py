"""Packed documents (``cu_seqlens``) in every lightning-attention backend.

The ground truth is the fp64 recurrent reference run on each document separately (the initial state
given to each row's first document only, the final state taken from its last). Outputs and every
gradient (q, k, v, initial state) are compared; the boundaries are random and include the edge
cases: inside a block, on a block / segment edge, documents of length 1, empty documents.
"""

import pytest
import torch

from megatron_lasp.ops.lightning_attn import (
    TritonOptions,
    chunk_lightning_attn,
    cu_seqlens_from_position_ids,
    lightning_attn_bwd,
    lightning_attn_fwd,
    naive_chunk_lightning_attn,
    naive_recurrent_lightning_attn,
)

# NaN-filled triton kernel buffers: an unwritten element fails (ignored by the torch backend).
POISON = TritonOptions(poison_outputs=True)

TOL = 1e-5


def _rel(a, b):
    assert torch.isfinite(a).all(), "non-finite values (unwritten or broken output)"
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _slopes(H):
    # no decay, weak, medium and a strong decay (whose powers underflow inside a document)
    return torch.tensor([0.0, 0.03, 0.3, 1.5] * H)[:H] + 0.01 * torch.rand(H)


def _random_cu(B, T, gen, n_cuts):
    """Random document starts over the B*T flat tokens; row starts included half of the time."""
    cuts = set(torch.randint(1, B * T, (n_cuts,), generator=gen).tolist())
    if torch.rand((), generator=gen) < 0.5:
        cuts |= {b * T for b in range(1, B)}
    return torch.tensor([0] + sorted(cuts) + [B * T], dtype=torch.int32)


def _per_document_reference(q, k, v, slopes, h0, do, dht, cu):
    """fp64 reference: every document alone (rows split at their starts)."""
    B, T = q.shape[:2]
    leaves = [x.double().clone().requires_grad_(True) if x is not None else None for x in (q, k, v, h0)]
    qf, kf, vf = (x.reshape(B * T, *x.shape[2:]) for x in leaves[:3])
    starts = sorted(set(cu.tolist()) | {b * T for b in range(B)})
    outs, finals, loss = [], {}, 0.0
    for s, e in zip(starts[:-1], starts[1:]):
        if s == e:
            continue
        row = s // T
        first_of_row = s == row * T
        init = leaves[3][row:row + 1] if (first_of_row and leaves[3] is not None) else None
        o, ht = naive_recurrent_lightning_attn(qf[s:e][None], kf[s:e][None], vf[s:e][None], slopes.double(), init, True)
        outs.append(o[0])
        if e == (row + 1) * T:
            finals[row] = ht[0]
    o = torch.cat(outs).view(B, T, *v.shape[2:])
    ht = torch.stack([finals[b] for b in range(B)])
    loss = (o * do.double()).sum() + (ht * dht.double()).sum()
    wrt = [x for x in leaves if x is not None]
    grads = torch.autograd.grad(loss, wrt)
    return (o.detach(), ht.detach()) + tuple(grads)


@pytest.fixture(params=["torch", "triton", "naive", "naive_chunk"])
def impl(request, monkeypatch):
    if request.param == "triton":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    return request.param


def _run(impl, q, k, v, slopes, h0, cu):
    if impl == "naive":
        return naive_recurrent_lightning_attn(q, k, v, slopes, h0, True, cu_seqlens=cu)
    if impl == "naive_chunk":
        return naive_chunk_lightning_attn(q, k, v, slopes, h0, True, chunk_size=16, cu_seqlens=cu)
    return chunk_lightning_attn(q, k, v, slopes, h0, True, backend=impl, cu_seqlens=cu, triton_options=POISON)


# Hand-picked boundaries for the triton interpreter's 16-token blocks / 32-token segments and the torch
# backend's 64-token blocks, plus random ones.
FIXED = {
    "inside-block": (1, 40, [0, 5, 21, 40]),
    "block-edges": (1, 80, [0, 16, 32, 64, 80]),
    "length-1-docs": (1, 40, [0, 1, 2, 31, 32, 33, 39, 40]),
    "empty-doc": (1, 24, [0, 7, 7, 24]),
    "one-doc": (1, 37, [0, 37]),
    "rows-B2": (2, 37, [0, 10, 37, 50, 74]),
    "doc-across-rows-B2": (2, 37, [0, 10, 60, 74]),
    "torch-block-edge": (1, 140, [0, 63, 64, 65, 128, 140]),
}


@pytest.mark.parametrize("with_h0", [False, True], ids=["noh0", "h0"])
@pytest.mark.parametrize("case", list(FIXED) + ["random0", "random1", "random2"])
def test_packed_matches_documents_one_by_one(impl, case, with_h0):
    gen = torch.Generator().manual_seed(hash((case, with_h0)) % 2**31)
    if case in FIXED:
        B, T, cu = FIXED[case]
        cu = torch.tensor(cu, dtype=torch.int64)
    else:
        B = 1 + int(case[-1]) % 2
        T = int(torch.randint(20, 90, (1,), generator=gen))
        cu = _random_cu(B, T, gen, n_cuts=int(torch.randint(1, 8, (1,), generator=gen)))
    H, Dk, Dv = 3, 16, 8
    q, k = (torch.randn(B, T, H, Dk, generator=gen) for _ in range(2))
    v, do = (torch.randn(B, T, H, Dv, generator=gen) for _ in range(2))
    h0 = torch.randn(B, H, Dk, Dv, generator=gen) if with_h0 else None
    dht = torch.randn(B, H, Dk, Dv, generator=gen)
    slopes = _slopes(H)
    ref = _per_document_reference(q, k, v, slopes, h0, do, dht, cu)

    leaves = [x.clone().requires_grad_(True) if x is not None else None for x in (q, k, v, h0)]
    o, ht = _run(impl, *leaves[:3], slopes, leaves[3], cu)
    ((o * do).sum() + (ht * dht).sum()).backward()
    got = (o, ht) + tuple(x.grad for x in leaves if x is not None)
    for name, a, b in zip(["o", "final_state", "dq", "dk", "dv", "d_initial_state"], got, ref):
        err = _rel(a, b)
        assert err < TOL, f"{impl} {case}: {name} relative error {err:.2e} (cu_seqlens {cu.tolist()})"


def test_boundaries_change_the_result():
    """The packed run differs from the unpacked one (the tests above would catch an ignored cu_seqlens)."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 40, 2, 8) for _ in range(3))
    slopes = torch.zeros(2)
    o_plain, _ = chunk_lightning_attn(q, k, v, slopes, backend="torch")
    o_packed, _ = chunk_lightning_attn(q, k, v, slopes, backend="torch", cu_seqlens=torch.tensor([0, 20, 40]))
    assert _rel(o_packed[:, :20], o_plain[:, :20]) < TOL
    assert _rel(o_packed[:, 20:], o_plain[:, 20:]) > 0.1


def test_functional_doc_ids_equal_cu_seqlens_and_backward_recomputes(impl):
    if impl.startswith("naive"):
        pytest.skip("functional API only")
    torch.manual_seed(1)
    B, T, H, D = 2, 30, 2, 16
    q, k, v, do = (torch.randn(B, T, H, D) for _ in range(4))
    slopes = _slopes(H)
    cu = torch.tensor([0, 4, 30, 31, 60])
    from megatron_lasp.ops.lightning_attn import doc_ids_from_cu_seqlens

    docs = doc_ids_from_cu_seqlens(cu, B, T, q.device)
    assert docs.tolist()[0][:5] == [0, 0, 0, 0, 1] and docs.tolist()[1][:2] == [2, 3]
    o1, _, saved1 = lightning_attn_fwd(q, k, v, slopes, None, False, impl, cu_seqlens=cu, triton_options=POISON)
    o2, _, saved2 = lightning_attn_fwd(q, k, v, slopes, None, False, impl, doc_ids=docs, triton_options=POISON)
    assert torch.equal(o1, o2)
    g1 = lightning_attn_bwd(q, k, v, slopes, do, saved=saved1)
    g2 = lightning_attn_bwd(q, k, v, slopes, do, backend=impl, cu_seqlens=cu)
    for a, b in zip(g1, g2):
        assert _rel(a, b) < TOL


def test_position_ids_to_cu_seqlens():
    pos = torch.tensor([[0, 1, 2, 0, 1, 0], [3, 4, 0, 1, 2, 3]])
    assert cu_seqlens_from_position_ids(pos).tolist() == [0, 3, 5, 6, 8, 12]


@pytest.mark.parametrize(
    "cu, needle",
    [
        (torch.tensor([0, 5, 10]), "end at the number of tokens 12"),
        (torch.tensor([1, 5, 12]), "start at 0"),
        (torch.tensor([0, 7, 5, 12]), "non-decreasing"),
        (torch.tensor([[0, 12]]), "1-d tensor"),
        (torch.tensor([0.0, 12.0]), "int32 or int64"),
    ],
    ids=["bad-end", "bad-start", "decreasing", "2d", "float"],
)
def test_bad_cu_seqlens_errors(cu, needle):
    q = torch.zeros(1, 12, 2, 8)
    with pytest.raises(ValueError, match=needle):
        chunk_lightning_attn(q, q, q, torch.zeros(2), backend="torch", cu_seqlens=cu)
    with pytest.raises(ValueError, match=needle):
        naive_recurrent_lightning_attn(q, q, q, torch.zeros(2), cu_seqlens=cu)


@pytest.mark.parametrize("packed", [False, True], ids=["plain", "packed"])
def test_two_phase_api_equals_one_pass(impl, packed):
    """lightning_attn_{fwd,bwd}_phases (state-only pass first, the rest in finish) == fwd/bwd."""
    if impl.startswith("naive"):
        pytest.skip("functional API only")
    from megatron_lasp.ops.lightning_attn import (
        doc_ids_from_cu_seqlens,
        lightning_attn_bwd_phases,
        lightning_attn_fwd_phases,
    )

    torch.manual_seed(2)
    B, T, H, D = 2, 45, 2, 16
    q, k, v, do = (torch.randn(B, T, H, D) for _ in range(4))
    slopes = _slopes(H)
    docs = doc_ids_from_cu_seqlens(torch.tensor([0, 9, 40, 50, 90]), B, T, q.device) if packed else None
    o, final, saved = lightning_attn_fwd(q, k, v, slopes, None, True, impl, doc_ids=docs, triton_options=POISON)
    final2, finish = lightning_attn_fwd_phases(q, k, v, slopes, impl, doc_ids=docs, triton_options=POISON)
    o2, saved2 = finish()
    assert torch.equal(final, final2) and torch.equal(o, o2) and torch.equal(saved.states, saved2.states)
    grads = lightning_attn_bwd(q, k, v, slopes, do, saved=saved)
    dh0, finish = lightning_attn_bwd_phases(q, k, v, slopes, do, saved=saved2)
    for a, b in zip(grads, finish() + (dh0,)):
        assert torch.equal(a, b)
