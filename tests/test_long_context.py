"""Long-context memory features: the fused chunked loss, layer-input offloading, chunked recompute.

- The fused linear cross-entropy (``models/loss.py``) equals megatron-core's output layer +
  vocab-parallel cross entropy (fp32, CPU): per-token loss and every gradient (output weight or
  tied embedding, all other parameters, the hidden states entering the loss) within 1e-6, at TP 1
  and 2 (with and without TP sequence parallelism), on the last stage of PP 2, tied and untied,
  with a loss mask (gradients-in-forward mode) and without (recompute-in-backward mode).
- Offloading the layer inputs (``--cpu-offloading``; on CPU a host copy through the same hooks),
  of all layers or of the first N (``--cpu-offloading-num-layers``), and the chunked per-layer
  recompute (``--recompute-chunk-size``) give the gradients of megatron-core's full recompute (the
  offload bit for bit); the offloader moves exactly the first N layers' inputs and frees each copy
  back after its layer's backward; the memory model of ``benchmarks/bench_memory.py`` reads the flag.
- The training loop trains the same with the fused loss on or off, with ``--eod-mask-loss`` and
  validation, and with offloading + chunked recompute.
"""

from __future__ import annotations

import logging
import math
import traceback
import weakref

import pytest
import torch

from megatron_lasp.testing import spawn

VOCAB = 128
SEED = 1234
TOL = 1e-6


def _max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """``||a - b|| / ||b||`` in fp64 (0 when both are 0): fp32 round-off is ~1e-7."""
    a, b = a.double(), b.double()
    den = b.norm().item()
    num = (a - b).norm().item()
    return num / den if den > 0 else num


# ----------------------------------------------------------------------------------------------
# the op alone


def _reference_ce(hidden, weight, labels):
    logits = (hidden @ weight.t()).transpose(0, 1)  # [b, s, V]
    return torch.nn.functional.cross_entropy(logits.reshape(-1, weight.shape[0]), labels.reshape(-1),
                                             reduction="none").view(labels.shape)


@pytest.mark.parametrize("chunk", [0, 7, 64])
@pytest.mark.parametrize("with_mask", [False, True])
def test_fused_op_matches_reference(chunk, with_mask):
    from megatron_lasp.models.loss import linear_cross_entropy

    gen = torch.Generator().manual_seed(3)
    s, b, h, v = 29, 2, 16, 50
    hidden = (torch.randn(s, b, h, generator=gen) * 0.5).requires_grad_()
    weight = (torch.randn(v, h, generator=gen) * 0.5).requires_grad_()
    labels = torch.randint(0, v, (b, s), generator=gen)
    mask = (torch.rand(b, s, generator=gen) > 0.3).float()
    ref = _reference_ce(hidden, weight, labels)
    (ref * mask).sum().mul(0.37).backward()
    ref_grads = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    got = linear_cross_entropy(hidden, weight, labels, loss_weights=mask if with_mask else None, chunk_size=chunk)
    assert got.shape == (b, s) and got.dtype == torch.float32
    (got * mask).sum().mul(0.37).backward()
    assert (got - ref).abs().max().item() <= TOL * ref.abs().max().item()
    assert _max_rel(hidden.grad, ref_grads[0]) <= TOL
    assert _max_rel(weight.grad, ref_grads[1]) <= TOL


def test_fused_op_refuses_other_reductions_and_skips_grads_without_autograd():
    from megatron_lasp.models.loss import LinearCrossEntropyError, default_chunk_size, linear_cross_entropy

    hidden = torch.randn(8, 1, 4, requires_grad=True)
    weight = torch.randn(10, 4, requires_grad=True)
    labels = torch.randint(0, 10, (1, 8))
    mask = torch.ones(1, 8)
    mask[0, 3] = 0.0
    loss = linear_cross_entropy(hidden, weight, labels, loss_weights=mask)
    with pytest.raises(LinearCrossEntropyError, match="not proportional to the loss_mask"):
        loss.sum().backward()  # weights token 3 although its mask is 0
    with torch.no_grad():
        assert not linear_cross_entropy(hidden, weight, labels, loss_weights=mask).requires_grad
    assert default_chunk_size(64000) == 4096 and default_chunk_size(10) >= 256


# ----------------------------------------------------------------------------------------------
# the offloader alone: which layers move, the order of the copies back, bitwise gradients


class _CheckpointedLayer(torch.autograd.Function):
    """A layer under full recompute: saves only its input; its backward reports, through
    ``probe``, how many saved layer inputs then have a device copy."""

    @staticmethod
    def forward(ctx, x, w, index, probe):
        ctx.save_for_backward(x, w)
        ctx.index, ctx.probe = index, probe
        return torch.tanh(x @ w) + x

    @staticmethod
    def backward(ctx, grad):
        x, w = ctx.saved_tensors
        ctx.probe(ctx.index)
        with torch.enable_grad():
            x = x.detach().requires_grad_()
            w = w.detach().requires_grad_()
            y = torch.tanh(x @ w) + x
        gx, gw = torch.autograd.grad(y, (x, w), grad)
        return gx, gw, None, None


def _offloaded_chain(num_layers, offload):
    """L checkpointed layers under the offloader moving the first ``offload`` (None: no offloader):
    (gradients, stats, {layer: saved inputs with a device copy during its backward})."""
    from megatron_lasp.models.offload import LayerInputOffloader, _Kept, _Packed

    gen = torch.Generator().manual_seed(SEED)
    x = torch.randn(64, 2, 16, generator=gen, requires_grad=True)  # 8 KiB: moved
    ws = [torch.nn.Parameter(torch.randn(16, 16, generator=gen) * 0.3) for _ in range(num_layers)]
    off = LayerInputOffloader(min_bytes=4096, num_layers=offload) if offload != 0 else None
    group, on_device = [], {}

    def probe(index):
        live = [ref() for ref in group]
        on_device[index] = sum(isinstance(e, _Kept) or (isinstance(e, _Packed) and e.gpu is not None)
                               for e in live if e is not None)

    def forward():
        h = x
        for i, w in enumerate(ws):
            if off is not None:
                off.enter_layer(i)
            h = _CheckpointedLayer.apply(h, w, i, probe)
        return h

    if off is None:
        y = forward()
    else:
        with off.hooks():
            with off.active():
                y = forward()
                group.extend(off._group)
            off.finish_forward()
    (y * y).sum().backward()
    return [x.grad] + [w.grad for w in ws], (dict(off.stats) if off else None), on_device


@pytest.mark.parametrize("offload", [1, 3, 4, None], ids=lambda n: f"first-{n}-of-4")
def test_offloader_moves_the_first_layers_and_frees_each_after_its_backward(offload):
    layers = 4
    want, _, _ = _offloaded_chain(layers, 0)
    got, stats, on_device = _offloaded_chain(layers, offload)
    moved = layers if offload is None else offload
    assert all(torch.equal(g, w) for g, w in zip(got, want))  # a host copy changes no bit
    assert stats["offloaded"] == stats["reloaded"] == moved and stats["kept"] == layers - moved, stats
    assert stats["bytes"] == moved * 64 * 2 * 16 * 4
    # during layer j's backward: the kept inputs of layers moved..j (the layers after j are done
    # and freed), the copy back of j and of j - 1 (started by j's backward) for the moved layers
    for j in range(layers):
        if j >= moved:
            want_on_device = j - moved + 1 + (j == moved and moved > 0)
        else:
            want_on_device = 1 + (j > 0)
        assert on_device[j] == want_on_device, (j, on_device)
    assert max(on_device.values()) == max(layers - moved, min(2, moved))


def test_memory_model_partial_offload_reads_the_bench_flags():
    """benchmarks/bench_memory.py: --extra's --cpu-offloading-num-layers reaches the model; each layer
    moved takes one layer input from the GPU to the host until two are left on the GPU."""
    import importlib.util
    import os

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "bench_memory.py")
    spec = importlib.util.spec_from_file_location("bench_memory", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    options = bench.model_options("--recompute-chunk-size 8192 --cpu-offloading-num-layers=3 --cpu-offloading-num-layers 8")
    assert options == {"chunk_size": 8192, "offload_layers": 8}
    with pytest.raises(ValueError, match="--cpu-offloading-num-layers needs an integer"):
        bench.model_options("--cpu-offloading-num-layers x")
    seq, layer_input = 2**21, 2**21 * 2048 * 2  # TNL-1B: hidden 2048, bf16
    model = {n: bench.memory_model("tnl-1b", seq, "offload", offload_layers=n) for n in range(1, 17)}
    assert bench.memory_model("tnl-1b", seq, "offload") == model[16]
    chunked = bench.memory_model("tnl-1b", seq, "chunked")
    assert chunked["host pinned"] == 0 and chunked["saved layer inputs"] == 16 * layer_input
    for n in range(1, 15):
        assert model[n]["total"] == chunked["total"] - n * layer_input, n
        assert model[n]["host pinned"] == n * layer_input, n
    assert model[15]["total"] == model[16]["total"] == chunked["total"] - 14 * layer_input
    assert model[16]["host pinned"] == 17 * layer_input  # the final norm's input too
    for bad in (0, 17):
        with pytest.raises(ValueError, match="--cpu-offloading-num-layers must be between 1 and 16"):
            bench.memory_model("tnl-1b", seq, "offload", offload_layers=bad)

    # a candidate's flags (--offload-layers for the offload setting only) as the training script
    # reads them, less the GPU-only ones, and what the model reads of them
    from megatron_lasp.training.arguments import parse_config
    from megatron_lasp.training.loop import model_config_from_run

    gpu_only = {"--bf16": 0, "--use-distributed-optimizer": 0, "--ddp-impl": 1}
    for setting in ("chunked", "offload"):
        flags = bench.common_flags("tiny", 64, 3) + bench.setting_flags(setting, "--recompute-chunk-size 16", 1)
        argv = [f for i, f in enumerate(flags) if f not in gpu_only and flags[i - 1] != "--ddp-impl"]
        model_config = model_config_from_run(parse_config(argv))
        assert model_config.recompute_chunk_size == 16
        assert model_config.offload_num_layers == (1 if setting == "offload" else None), setting
        assert bench.model_options(" ".join(flags)) == dict(chunk_size=16, **({"offload_layers": 1}
                                                                              if setting == "offload" else {}))


# ----------------------------------------------------------------------------------------------
# the model, sharded, fused vs plain; offload and chunked recompute


def _batch(seq=32, batch=2):
    gen = torch.Generator().manual_seed(SEED + 1)
    ids = torch.randint(0, VOCAB, (batch, seq), generator=gen)
    labels = torch.randint(0, VOCAB, (batch, seq), generator=gen)
    mask = (torch.rand(batch, seq, generator=gen) > 0.25).float()
    return ids, labels, mask


def _run_model(model, groups, ids, labels, mask, *, fused: bool, pass_mask: bool, pp_input=None, **extra):
    """Forward + backward of the masked token mean; returns (per-token loss, grads, hidden grad)."""
    model.config.fused_linear_cross_entropy = fused
    model.zero_grad(set_to_none=True)
    captured = {}
    if pp_input is not None:
        hidden_in = pp_input.detach().clone().requires_grad_(True)
        model.set_input_tensor(hidden_in)
        ids_in = None
    else:
        ids_in = ids

    def keep(module, args, output):
        output.retain_grad()
        captured["h"] = output

    handle = model.decoder.register_forward_hook(keep)
    try:
        kwargs = {"loss_mask": mask} if pass_mask else {}
        loss = model(ids_in, labels=labels, **kwargs, **extra)
    finally:
        handle.remove()
    ((loss * mask).sum() / mask.sum()).backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    hidden_grad = captured["h"].grad.detach().clone()
    if pp_input is not None:
        grads["<stage input>"] = hidden_in.grad.detach().clone()
    return loss.detach(), grads, hidden_grad


def _fused_vs_plain(groups, tp, tpsp, pp, tied):
    from megatron_lasp.models import build_linear_lm, linear_lm_config

    config = linear_lm_config("tiny", tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                              sequence_parallel=tpsp, use_cpu_initialization=True,
                              share_embeddings_and_output_weights=tied, cross_entropy_chunk_size=24)
    pre, post = groups.pp.rank() == 0, groups.pp.rank() == groups.pp.size() - 1
    torch.manual_seed(SEED)
    model = build_linear_lm(config, VOCAB, pre_process=pre, post_process=post)
    ids, labels, mask = _batch()
    if not post:
        return {}
    pp_input = None
    if pp > 1:
        gen = torch.Generator().manual_seed(SEED + 2)
        pp_input = torch.randn(ids.shape[1] // (tp if tpsp else 1), ids.shape[0], config.hidden_size, generator=gen)
    ref = _run_model(model, groups, ids, labels, mask, fused=False, pass_mask=False, pp_input=pp_input)
    out = {}
    for pass_mask in (True, False):
        got = _run_model(model, groups, ids, labels, mask, fused=True, pass_mask=pass_mask, pp_input=pp_input)
        tag = "mask" if pass_mask else "nomask"
        out[f"{tag} loss"] = (got[0] - ref[0]).abs().max().item() / ref[0].abs().max().item()
        assert set(got[1]) == set(ref[1]), (sorted(got[1]), sorted(ref[1]))
        out[f"{tag} grads"] = max(_max_rel(got[1][n], ref[1][n]) for n in ref[1])
        out[f"{tag} hidden grad"] = _max_rel(got[2], ref[2])
        out[f"{tag} output weight grad"] = _max_rel(*(g[1]["output_layer.weight" if not tied or pp > 1
                                                          else "embedding.word_embeddings.weight"]
                                                     for g in (got, ref)))
    return out


def _packed(seq=32, batch=2):
    """Documents over the rows laid end to end: starts at a chunk boundary (10, 40 for chunks of 5),
    inside chunks, one spanning a row end (fine: a row start always starts a document)."""
    from megatron.core.packed_seq_params import PackedSeqParams

    cu = torch.tensor([0, 3, 10, 17, 40, 51, batch * seq], dtype=torch.int32)
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                           max_seqlen_q=seq, max_seqlen_kv=seq)


def _memory_variants(groups, tp, tpsp):
    """megatron full recompute vs offload vs chunked recompute (+ offload), without and with packed
    documents: (max gradient error against the variant's megatron recompute, offload stats,
    whether the whole layer ran in chunks)."""
    from megatron_lasp.models import build_linear_lm, linear_lm_config

    full = dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    first = dict(offload_layer_inputs=True, offload_num_layers=1)  # layer 0 of 2 moves
    variants = {
        "megatron recompute": (dict(full), False),
        "megatron recompute + offload": (dict(full, offload_layer_inputs=True), False),
        "megatron recompute + offload 1 of 2": (dict(full, **first), False),
        "chunked recompute": (dict(recompute_chunk_size=5), False),
        "chunked recompute + offload": (dict(recompute_chunk_size=8, offload_layer_inputs=True), False),
        "chunked recompute + offload 1 of 2": (dict(recompute_chunk_size=8, **first), False),
        "megatron recompute, documents": (dict(full), True),
        "chunked recompute, documents": (dict(recompute_chunk_size=5), True),
        "chunked recompute + offload, documents": (dict(recompute_chunk_size=8, offload_layer_inputs=True), True),
    }
    same_bits = {"megatron recompute + offload": "megatron recompute",  # a host copy changes no bit
                 "megatron recompute + offload 1 of 2": "megatron recompute",
                 "chunked recompute + offload 1 of 2": "chunked recompute + offload"}
    ids, labels, mask = _batch()
    results, base, every = {}, {}, {}
    for name, (extra, docs) in variants.items():
        config = linear_lm_config("tiny", tensor_model_parallel_size=tp, sequence_parallel=tpsp,
                                  use_cpu_initialization=True, **extra)
        torch.manual_seed(SEED)
        model = build_linear_lm(config, VOCAB)
        model.offload_min_bytes = 1024  # the tiny layer inputs are 16 KiB
        model.train()
        # whether the embedding's output (the first layer's input) is still alive at the final norm
        embedded, alive = [], []
        hooks = [model.embedding.register_forward_hook(lambda m, a, out: embedded.append(weakref.ref(out))),
                 model.decoder.final_layernorm.register_forward_pre_hook(
                     lambda m, a: alive.append(embedded[-1]() is not None))]
        kwargs = {"packed_seq_params": _packed()} if docs else {}
        loss, grads, hidden_grad = _run_model(model, groups, ids, labels, mask, fused=True, pass_mask=True, **kwargs)
        for h in hooks:
            h.remove()
        stats = dict(model._offloader.stats) if extra.get("offload_layer_inputs") else None
        if stats is not None:
            stats["first input alive at the loss"] = alive == [True]
        elif name == "megatron recompute":  # the control: its first layer's checkpoint holds it
            results["first input alive without offload"] = alive == [True]
        whole = all(layer.chunks_whole_layer() for layer in model.decoder.layers)
        every[name] = grads
        if name in same_bits:
            stats["same bits"] = all(torch.equal(grads[n], every[same_bits[name]][n]) for n in grads)
        if docs not in base:
            base[docs] = grads
            results[name] = (0.0, stats, whole)
        else:
            results[name] = (max(_max_rel(grads[n], base[docs][n]) for n in base[docs]), stats, whole)
    # a negative control: the documents change the gradients (so the comparison above can fail)
    results["documents matter"] = _max_rel(base[True]["decoder.layers.0.self_attention.linear_qkv.weight"],
                                           base[False]["decoder.layers.0.self_attention.linear_qkv.weight"])
    return results


def _run_all(rank, world_size):
    logging.disable(logging.WARNING)
    torch.set_num_threads(1)
    from megatron_lasp.parallel import initialize_parallel

    results = {}
    cases = [
        ((1, 1), dict(tp=1, tpsp=False, pp=1, tied=False)),
        ((1, 1), dict(tp=1, tpsp=False, pp=1, tied=True)),
        ((2, 1), dict(tp=2, tpsp=False, pp=1, tied=False)),
        ((2, 1), dict(tp=2, tpsp=True, pp=1, tied=True)),
        ((1, 2), dict(tp=1, tpsp=False, pp=2, tied=False)),
        ((1, 2), dict(tp=1, tpsp=False, pp=2, tied=True)),
    ]
    current = None
    groups = None
    for (tp, pp), case in cases:
        if current != (tp, pp):
            groups = initialize_parallel(tp, 1, pp, seed=SEED)
            current = (tp, pp)
            if (tp, pp) == (2, 1):
                try:
                    results["memory tp2-tpsp"] = _memory_variants(groups, 2, True)
                except Exception:
                    results["memory tp2-tpsp"] = {"error": traceback.format_exc()}
            if (tp, pp) == (1, 1):
                try:
                    results["memory tp1"] = _memory_variants(groups, 1, False)
                except Exception:
                    results["memory tp1"] = {"error": traceback.format_exc()}
        key = "tp{tp}{sp}-pp{pp}-{t}".format(tp=case["tp"], sp="-tpsp" if case["tpsp"] else "", pp=case["pp"],
                                             t="tied" if case["tied"] else "untied")
        try:
            results[key] = _fused_vs_plain(groups, **case)
        except Exception:
            results[key] = {"error": traceback.format_exc()}
    return results


@pytest.fixture(scope="module")
def model_results():
    return spawn(_run_all, world_size=2, timeout=400)


def test_fused_loss_equals_plain_loss_sharded(model_results):
    seen = 0
    for rank, results in enumerate(model_results):
        for key, r in results.items():
            if key.startswith("memory"):
                continue
            assert "error" not in r, f"rank {rank} {key}: {r.get('error')}"
            for what, err in r.items():
                assert err <= TOL, f"rank {rank} {key}: {what} error {err:.2e} > {TOL}"
                seen += 1
    assert seen >= 6 * 8  # every case ran on its last stage


def test_offload_and_chunked_recompute_same_grads(model_results):
    for rank, results in enumerate(model_results):
        for key in ("memory tp1", "memory tp2-tpsp"):
            r = dict(results[key])
            assert "error" not in r, f"rank {rank} {key}: {r.get('error')}"
            assert r.pop("documents matter") > 1e-3, f"rank {rank} {key}: documents do not change the gradients"
            # offloaded, the first layer's input lives on the host only (not held by GPTModel.forward
            # until the loss); kept on the device by its checkpoint without offloading (the control)
            assert r.pop("first input alive without offload") is True, (rank, key)
            assert len(r) == 9, sorted(r)
            for name, (err, stats, whole) in r.items():
                assert err <= TOL, f"rank {rank} {key} {name}: gradient error {err:.2e}"
                if stats is not None:
                    assert stats.pop("same bits", True), (name, "gradients differ from the run without offloading")
                    assert stats.pop("first input alive at the loss") is False, (rank, key, name)
                    assert stats["reloaded"] == stats["offloaded"], (name, stats)
                    if name.endswith("1 of 2"):
                        # layer 0's input alone went to the host; layer 1's and the final norm's stayed
                        assert stats["offloaded"] == 1 and stats["kept"] >= 1, (name, stats)
                    else:
                        # the inputs of both layers (and the final norm's) went to the host
                        assert stats["offloaded"] >= 2 and stats["kept"] == 0, (name, stats)
                # the whole layer runs in chunks (state carried) unless TP sequence parallelism splits it
                assert whole == (key == "memory tp1"), (key, name, whole)


def _sp_chunked(rank, world_size, fusion=False, modes=("lasp", "ulysses"), gated=False):
    sp = world_size
    """SP=1, 2, 4: the chunked recompute (whole layer under lasp, MLP half under ulysses) against
    megatron-core's full recompute of the same layout: (gradient error, loss error, whole layer?).
    ``fusion``: the fused elementwise kernels (the GPU default; Triton's interpreter on CPU)."""
    logging.disable(logging.WARNING)
    torch.set_num_threads(1)
    from model_utils import full_grads, sharded_loss

    from megatron_lasp.models import build_linear_lm, linear_lm_config
    from megatron_lasp.parallel import initialize_parallel

    groups = initialize_parallel(1, sp, 1, seed=SEED)
    gate = dict(linear_attention_gate="mamba2") if gated else {}  # per-token gates through every path
    full = dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    from megatron.core.packed_seq_params import PackedSeqParams

    ids, labels, _ = _batch(seq=40)
    if sp == 2:
        # rows of 40 tokens, slices of 20: row 0 has starts inside rank 0's chunks, on a chunk
        # boundary (12, chunks of 6) and on the slice boundary (20); row 1's state crosses rank
        # 0's slice and restarts inside rank 1's (65 = row 1, token 25)
        cu = torch.tensor([0, 3, 12, 20, 26, 40, 65, 80], dtype=torch.int32)
    else:
        # slices of 10: row 0 restarts at rank 1's first token (10) and inside it (14), and its
        # document from 14 runs into rank 2 (start at 26); row 1's state crosses ranks 0 and 1
        cu = torch.tensor([0, 3, 10, 14, 26, 40, 65, 72, 80], dtype=torch.int32)
    docs = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=40, max_seqlen_kv=40)
    out = {}
    for mode, packed in [(m, p) for m in modes for p in (False, True)]:
        results = {}
        for name, extra in {"megatron recompute": full, "chunked 6": dict(recompute_chunk_size=6),
                            "chunked 20": dict(recompute_chunk_size=20),
                            "chunked 7 + offload": dict(recompute_chunk_size=7, offload_layer_inputs=True)}.items():
            config = linear_lm_config("tiny", context_parallel_size=sp, sequence_parallel_mode=mode,
                                      use_cpu_initialization=True, fusion=fusion, **gate, **extra)
            torch.manual_seed(SEED)
            model = build_linear_lm(config, VOCAB, pg_collection=groups)
            model.offload_min_bytes = 1024
            model.train()
            loss = sharded_loss(model, ids, labels, groups, **({"packed_seq_params": docs} if packed else {}))
            whole = all(layer.chunks_whole_layer() for layer in model.decoder.layers)
            assert all(layer.self_attention.fused == fusion for layer in model.decoder.layers)
            results[name] = (full_grads(model, groups), loss.item(), whole)
        base_grads, base_loss, _ = results.pop("megatron recompute")
        out[mode + (" documents" if packed else "")] = {
            name: (max(_max_rel(g[n], base_grads[n]) for n in base_grads), abs(l - base_loss), whole)
            for name, (g, l, whole) in results.items()}
        if gated and not packed and mode == modes[0]:
            gated_grads = base_grads
        if packed:  # a negative control: the documents change the gradients
            w = "decoder.layers.0.self_attention.linear_qkv.weight"
            out[mode + " documents matter"] = _max_rel(base_grads[w], plain_grads[w])
        else:
            plain_grads = base_grads
    if gated:  # a negative control: the gates change the gradients
        config = linear_lm_config("tiny", context_parallel_size=sp, sequence_parallel_mode=modes[0],
                                  use_cpu_initialization=True, fusion=fusion, **full)
        torch.manual_seed(SEED)
        model = build_linear_lm(config, VOCAB, pg_collection=groups)
        model.train()
        sharded_loss(model, ids, labels, groups)
        w = "decoder.layers.0.self_attention.linear_qkv.weight"
        out["gates matter"] = _max_rel(full_grads(model, groups)[w], gated_grads[w])
    return out


@pytest.mark.parametrize("fusion, sp, gated", [(False, 2, False), (True, 2, False), (False, 4, False),
                                               (False, 1, True), (False, 2, True), (False, 4, True)],
                         ids=["torch-path-sp2", "fused-interpreter-sp2", "torch-path-sp4",
                              "gated-sp1", "gated-sp2", "gated-sp4"])
def test_chunked_recompute_under_sequence_parallelism(fusion, sp, gated):
    env = {"TRITON_INTERPRET": "1"} if fusion else None
    modes = ("lasp", "ulysses") if sp == 2 and not fusion else ("lasp",)
    for rank, result in enumerate(spawn(_sp_chunked, sp, (fusion, modes, gated), timeout=300, env=env)):
        assert len(result) == 3 * len(modes) + gated, sorted(result)
        for mode, variants in result.items():
            if mode.endswith("matter"):
                assert variants > 1e-3, (rank, mode, variants)
                continue
            assert len(variants) == 3
            for name, (grad_err, loss_err, whole) in variants.items():
                tol = 2e-5 if gated else TOL  # the gates' gradients: fp32 round-off of the dg sums
                assert grad_err <= tol and loss_err <= tol, f"rank {rank} {mode} {name}: {grad_err:.2e} {loss_err:.2e}"
                assert whole == mode.startswith("lasp"), (rank, mode, name, whole)


# ----------------------------------------------------------------------------------------------
# the training loop

BASE = [
    "--model-preset", "tiny", "--mock-data", "--seq-length", "64", "--micro-batch-size", "2",
    "--global-batch-size", "4", "--train-iters", "3", "--lr", "3e-3", "--lr-warmup-iters", "1",
    "--log-interval", "3", "--eval-interval", "2", "--eval-iters", "1", "--seed", "7",
    "--make-vocab-size-divisible-by", "64", "--eod-mask-loss",
]


def _train(rank, world_size, configs):
    from megatron_lasp.training import main

    return [list(main(BASE + extra, destroy=False).losses) for extra in configs]


def test_training_loop_fused_and_memory_flags_match_plain():
    configs = {
        "plain": ["--no-fused-linear-cross-entropy"],
        "fused": ["--cross-entropy-chunk-size", "48"],
        "offload + chunked recompute": ["--recompute-granularity", "full", "--cpu-offloading",
                                        "--recompute-chunk-size", "16"],
        "offload 1 of 2 layers + chunked recompute": ["--recompute-granularity", "full", "--cpu-offloading",
                                                      "--cpu-offloading-num-layers", "1", "--recompute-chunk-size", "16"],
    }
    (runs,) = [spawn(_train, 1, (list(configs.values()),), timeout=300)[0]]
    plain = runs[0]
    assert len(plain) == 3 and all(math.isfinite(x) for x in plain)
    for name, losses in zip(configs, runs):
        for i, (g, w) in enumerate(zip(losses, plain)):
            assert abs(g - w) <= 2e-5 * abs(w), f"{name}: iteration {i + 1}: {g} vs plain {w}"


@pytest.mark.parametrize("layout", [["--sequence-parallel-size", "2"], []], ids=["sp2-lasp", "dp2"])
def test_training_loop_chunked_recompute_on_two_ranks(layout):
    """Data and sequence parallel wrappers (torch DDP here) see one gradient per parameter and
    step from the chunked recompute (it once failed with "mark a variable ready only once")."""
    full = layout + ["--recompute-granularity", "full"]
    configs = [full, full + ["--recompute-chunk-size", "16"]]
    want, got = spawn(_train, 2, (configs,), timeout=300)[0]
    assert len(got) == len(want) == 3 and all(math.isfinite(x) for x in got), got
    for g, w in zip(got, want):
        assert abs(g - w) <= 2e-5 * abs(w), (got, want)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--cpu-offloading"], "--cpu-offloading moves the layer inputs saved for recompute"),
        (["--cpu-offloading-num-layers", "1"], "--cpu-offloading-num-layers says how many layers --cpu-offloading "
                                               "moves: add --cpu-offloading"),
        (["--recompute-granularity", "full", "--cpu-offloading", "--cpu-offloading-num-layers", "0"],
         "--cpu-offloading-num-layers must be positive, got 0"),
        (["--recompute-granularity", "full", "--cpu-offloading", "--cpu-offloading-num-layers", "3"],
         r"^--cpu-offloading-num-layers \(3\) must be between 1 and the layers per pipeline stage \(2\)$"),
        (["--recompute-chunk-size", "64"], "--recompute-chunk-size needs --recompute-granularity full"),
        (["--cross-entropy-chunk-size", "-1"], "must be >= 0"),
    ],
)
def test_flag_errors(extra, message):
    """The flags' rules (parse_config) and the model config's (built from the flags, its errors
    naming the flags)."""
    from megatron_lasp.training.arguments import ArgumentError, parse_config
    from megatron_lasp.training.loop import model_config_from_run

    with pytest.raises(ArgumentError, match=message):
        model_config_from_run(parse_config(["--mock-data", "--seq-length", "64", "--train-iters", "1",
                                            "--model-preset", "tiny"] + extra))


# ----------------------------------------------------------------------------------------------
# GPU (skipped without CUDA): bf16 precision, the side-stream offload path


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_fused_loss_bf16_and_cuda_offload():
    from megatron_lasp.models.loss import linear_cross_entropy
    from megatron_lasp.models.offload import LayerInputOffloader

    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(5)
    s, h, v = 8192, 1024, 32000
    hidden = (torch.randn(s, 1, h, device=dev, generator=gen)).to(torch.bfloat16).requires_grad_()
    weight = (torch.randn(v, h, device=dev, generator=gen) * 0.02).to(torch.bfloat16).requires_grad_()
    labels = torch.randint(0, v, (1, s), device=dev, generator=gen)
    mask = (torch.rand(1, s, device=dev, generator=gen) > 0.1).float()
    ref = _reference_ce(hidden.float(), weight.float(), labels)
    (ref * mask).sum().div(mask.sum()).backward()
    ref_grads = hidden.grad.float().clone(), weight.grad.float().clone()
    hidden.grad = weight.grad = None
    got = linear_cross_entropy(hidden, weight, labels, loss_weights=mask, chunk_size=3000)
    (got * mask).sum().div(mask.sum()).backward()
    assert (got - ref).abs().max().item() < 2e-2
    assert _max_rel(hidden.grad.float(), ref_grads[0]) < 1e-2
    assert _max_rel(weight.grad.float(), ref_grads[1]) < 1e-2

    # offload hooks on CUDA: async copies out and back give the same tensors, with every "layer"
    # (one op here) moved and with the first one only
    xs = [torch.randn(4096, 1024, device=dev, requires_grad=True) for _ in range(3)]
    y = xs[0]
    for x in xs[1:]:
        y = (y * x).sin()
    y.sum().backward()
    want = [x.grad.clone() for x in xs]
    for num_layers in (None, 1):
        for x in xs:
            x.grad = None
        off = LayerInputOffloader(min_bytes=0, num_layers=num_layers)
        with off.hooks():
            with off.active():
                y = xs[0]
                for i, x in enumerate(xs[1:]):
                    off.enter_layer(i)
                    y = (y * x).sin()
            off.finish_forward()
        y.sum().backward()
        assert all(torch.equal(w, x.grad) for w, x in zip(want, xs)), num_layers
        assert off.stats["offloaded"] > 0 and off.stats["reloaded"] == off.stats["offloaded"], off.stats
        assert (off.stats["kept"] > 0) == (num_layers is not None), off.stats
