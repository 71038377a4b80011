"""The softmax layers of a hybrid in query chunks (``--recompute-chunk-size``).

A tiny hybrid (``L*L``, GQA) in fp64 on the CPU, the loss and every parameter's gradient, chunk
sizes that do and do not divide the sequence, with packed documents that start inside chunks and
span chunk boundaries; TP = 1 and 2 (heads split, chunks on each rank):

- the chunked recompute with the softmax layer in query chunks against the same run with the
  softmax layer's attention over the whole sequence (its MLP half chunked, as before query chunks
  existed): only the softmax layer's schedule differs, to 1e-10 (the RMSNorm weights to 1e-6: the
  norm computes in fp32 whatever the dtype, and the chunks sum its weight gradient in pieces);
- both against megatron-core's full recompute, to the 1e-6 that the linear layers' chunked
  recompute keeps (some of their kernels and norms sum in fp32).

With the layer inputs offloaded to host memory the gradients are the same bits. A negative
control checks that the documents change the softmax layer's gradients, so the packed comparison
can fail.

Over SP = 2 and 4 ranks (the all-gather softmax mode, lasp linear layers; 4 processes, DP 2 at
SP 2), with and without packed documents that cross ranks and chunks: the loss and every gradient
of the one-process run without recompute, to 1e-6.
"""

from __future__ import annotations

import traceback

import pytest
import torch

from megatron_lasp.testing import spawn

VOCAB, BATCH, SEQ, SEED = 128, 2, 24, 4321
TOL = 1e-10  # fp64, the softmax layer's schedule alone
TOL_FULL = 1e-6  # against megatron-core's recompute
CU = [0, 5, 13, 14, 30, 41, 48]  # global starts over the 2 x 24 tokens


def _packed():
    from megatron.core.packed_seq_params import PackedSeqParams

    cu = torch.tensor(CU, dtype=torch.int32)
    return {"packed_seq_params": PackedSeqParams(qkv_format="sbhd", cu_seqlens_q=cu, cu_seqlens_kv=cu)}


def _grads(tp: int, chunk: int, packed: bool, query_chunks: bool = True, offload: bool = False):
    """(loss, grads by name, whether the softmax layer ran in query chunks) of one forward + backward;
    ``query_chunks=False``: the softmax layer's attention over the whole sequence."""
    from unittest import mock

    from megatron_lasp.models import build_linear_lm, linear_lm_config
    from megatron_lasp.models.chunked import LinearTransformerLayer

    if not query_chunks:
        with mock.patch.object(LinearTransformerLayer, "chunks_query_chunks", lambda self: False):
            return _grads(tp, chunk, packed)

    extra = dict(recompute_chunk_size=chunk, offload_layer_inputs=offload, softmax_query_chunks_from=0) if chunk else dict(
        recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    config = linear_lm_config("tiny", num_layers=3, hybrid_layer_pattern="L*L", num_query_groups=2,
                              tensor_model_parallel_size=tp, use_cpu_initialization=True,
                              params_dtype=torch.float64, **extra)
    torch.manual_seed(SEED)
    model = build_linear_lm(config, VOCAB).double()
    model.offload_min_bytes = 1024  # the tiny layer inputs are a few KiB
    model.train()
    gen = torch.Generator().manual_seed(SEED + 1)
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=gen)
    labels = torch.randint(0, VOCAB, (BATCH, SEQ), generator=gen)
    loss = model(ids, labels=labels, **(_packed() if packed else {})).mean()
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads, model.decoder.layers[1].chunks_query_chunks()


def _rel(a, b) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def _run(rank, world_size):
    torch.set_num_threads(1)
    from megatron_lasp.parallel import initialize_parallel

    out, qkv = {}, {}
    try:
        initialize_parallel(world_size, 1, 1, seed=SEED)
        for packed in (False, True):
            full_loss, full, _ = _grads(world_size, 0, packed)
            for chunk in (5, 8, 24):
                loss, grads, flag = _grads(world_size, chunk, packed)
                whole_loss, whole, whole_flag = _grads(world_size, chunk, packed, query_chunks=False)
                assert set(grads) == set(whole) == set(full), (sorted(grads), sorted(full))
                errs = {}
                for what, (ref_loss, ref) in {"whole": (whole_loss, whole), "full": (full_loss, full)}.items():
                    for kind in ("norm", "other"):
                        names = [n for n in grads if ("norm" in n) == (kind == "norm")]
                        worst = max(names, key=lambda n: _rel(grads[n], ref[n]))
                        errs[what, kind] = (_rel(loss, ref_loss), worst, _rel(grads[worst], ref[worst]))
                out[(chunk, packed)] = (errs, flag, whole_flag)
                if chunk == 8:  # the layer inputs in host memory: the same bits
                    moved = _grads(world_size, chunk, packed, offload=True)[1]
                    out[("offload", packed)] = all(torch.equal(moved[n], grads[n]) for n in grads)
            qkv[packed] = full["decoder.layers.1.self_attention.linear_qkv.weight"]
        out["documents matter"] = _rel(qkv[True], qkv[False])  # floats only cross the process boundary
    except Exception:
        out["error"] = traceback.format_exc()
    return out


@pytest.mark.parametrize("tp", [1, 2])
def test_softmax_layer_query_chunks_equal_full_recompute(tp):
    for rank, out in enumerate(spawn(_run, world_size=tp, timeout=300)):
        assert "error" not in out, f"rank {rank}: {out['error']}"
        for packed in (False, True):
            for chunk in (5, 8, 24):
                errs, flag, whole_flag = out[(chunk, packed)]
                assert flag is True and whole_flag is False, (chunk, packed)  # the two schedules ran
                for what, kind, tol in (("whole", "other", TOL), ("whole", "norm", TOL_FULL),
                                        ("full", "other", TOL_FULL), ("full", "norm", TOL_FULL)):
                    loss_err, worst, grad_err = errs[what, kind]
                    assert loss_err <= tol, (rank, what, chunk, packed, loss_err)
                    assert grad_err <= tol, (rank, what, chunk, packed, worst, grad_err)
            assert out[("offload", packed)] is True, (rank, packed)
        # negative control: the documents change the softmax layer's gradients
        assert out["documents matter"] > 1e-3, out["documents matter"]


SP_CHUNKS = (5, 12)  # 5: chunks cut across slices' documents and do not divide a slice; 12: one chunk at SP 2


def _run_sp(rank, world_size):
    """SP = 2 and 4 (all-gather softmax mode, lasp linear layers) with the chunked recompute against
    the one-process run of the whole batch without recompute (fp64)."""
    torch.set_num_threads(1)
    from model_utils import compare_grads, full_grads, rel_err, sharded_loss

    from megatron_lasp.models import build_linear_lm, linear_lm_config
    from megatron_lasp.parallel import initialize_parallel

    def config(**fields):
        return linear_lm_config("tiny", num_layers=3, hybrid_layer_pattern="L*L", num_query_groups=2,
                                use_cpu_initialization=True, params_dtype=torch.float64, **fields)

    gen = torch.Generator().manual_seed(SEED + 1)
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=gen)
    labels = torch.randint(0, VOCAB, (BATCH, SEQ), generator=gen)
    out = {}
    try:
        initialize_parallel(1, 1, 1, seed=SEED)
        refs = {}
        for packed in (False, True):
            torch.manual_seed(SEED)
            model = build_linear_lm(config(), VOCAB).double()
            loss = model(ids, labels=labels, **(_packed() if packed else {})).float().mean()
            loss.backward()
            refs[packed] = (loss.detach(), {n: p.detach().clone() for n, p in model.named_parameters()},
                            {n: p.grad.detach().clone() for n, p in model.named_parameters()})
        for sp in (2, 4):
            groups = initialize_parallel(1, sp, 1, seed=SEED)
            for packed in (False, True):
                ref_loss, ref_params, ref_grads = refs[packed]
                for chunk in SP_CHUNKS:
                    model = build_linear_lm(config(context_parallel_size=sp, recompute_chunk_size=chunk,
                                                   softmax_query_chunks_from=0,
                                                   softmax_sequence_parallel_mode="allgather"), VOCAB).double()
                    with torch.no_grad():
                        for n, p in model.named_parameters():
                            p.copy_(ref_params[n])
                    model.train()
                    loss = sharded_loss(model, ids, labels, groups, **(_packed() if packed else {}))
                    errs = compare_grads(full_grads(model, groups), ref_grads)
                    worst = max(errs, key=errs.get)
                    out[(sp, packed, chunk)] = (rel_err(loss, ref_loss), worst, errs[worst],
                                                model.decoder.layers[1].chunks_query_chunks())
    except Exception:
        out["error"] = traceback.format_exc()
    return out


def test_softmax_layer_query_chunks_under_sequence_parallelism():
    """Each rank's slice in query chunks against the keys and values gathered from the ranks before
    it, packed documents across ranks and chunks: the loss and every gradient of the one-process run."""
    for rank, out in enumerate(spawn(_run_sp, world_size=4, timeout=600)):
        assert "error" not in out, f"rank {rank}: {out['error']}"
        for sp in (2, 4):
            for packed in (False, True):
                for chunk in SP_CHUNKS:
                    loss_err, worst, grad_err, flag = out[(sp, packed, chunk)]
                    assert flag is True, (sp, packed, chunk)
                    assert loss_err <= TOL_FULL, (rank, sp, packed, chunk, loss_err)
                    assert grad_err <= TOL_FULL, (rank, sp, packed, chunk, worst, grad_err)


def _query_chunk_calls(rank, world_size):
    """How often the softmax layer ran in query chunks, for a threshold above and at the length."""
    from unittest import mock

    from megatron_lasp.models import build_linear_lm, chunked, linear_lm_config
    from megatron_lasp.parallel import initialize_parallel

    initialize_parallel(1, 1, 1, seed=SEED)
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(SEED))
    calls = {}
    for threshold in (SEQ + 1, SEQ):
        config = linear_lm_config("tiny", num_layers=3, hybrid_layer_pattern="L*L", num_query_groups=2,
                                  use_cpu_initialization=True, recompute_chunk_size=8,
                                  softmax_query_chunks_from=threshold)
        model = build_linear_lm(config, VOCAB).train()
        real = chunked._ChunkedSoftmaxLayer.apply
        with mock.patch.object(chunked._ChunkedSoftmaxLayer, "apply", side_effect=real) as spy:
            model(ids, labels=ids).mean().backward()
        calls[threshold] = spy.call_count
    return calls


def test_query_chunks_only_from_the_threshold():
    """Below ``softmax_query_chunks_from`` tokens the softmax layer's attention runs whole (its MLP
    in chunks); from it on, in query chunks. The threshold counts the whole sequence."""
    calls = spawn(_query_chunk_calls, world_size=1, timeout=300)[0]
    assert calls == {SEQ + 1: 0, SEQ: 1}, calls
