"""The linear LM on megatron-core: sharded runs equal the single-process run.

One 4-rank spawn runs every layout (TP, TP sequence parallelism, LASP modes over the SP group,
PP, recompute, tied embeddings, config variants) against a TP=1 / SP=1 reference of the same
weights, on the same full batch (replicated over DP). Each layout is then one parametrized test
over the spawn's results. Plus in-process tests for the config, the slopes, the presets' parameter
counts and the Transformer Engine path.
"""

from __future__ import annotations

import math
import traceback
from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

import pytest
import torch
import torch.distributed as dist

from megatron_lasp.testing import spawn

VOCAB = 128
BATCH = 2
SEQ = 32
SEED = 1234
TOL = 2e-5  # relative (norm-wise) error of fp32 round-off; a wrong decay or shard is >> 1e-3

# model variants: the defaults (TNL: gate, SiLU, SGLU, per-head norm, tnl decay) and the options
VARIANTS: Dict[str, Dict] = {
    "tnl": {},
    "tied": dict(share_embeddings_and_output_weights=True),
    "options": dict(
        output_gate=False,
        qk_feature_map="identity",
        v_feature_map="identity",
        glu_type="swiglu",
        attention_norm_group_size=2,
        decay_type="alibi",
        num_layers=3,
    ),
    "nodecay": dict(decay_type="none"),
}


@dataclass(frozen=True)
class Layout:
    tp: int = 1
    sp: int = 1
    pp: int = 1
    mode: str = "lasp"
    tpsp: bool = False
    recompute: Optional[str] = None  # "full", "selective", "selective-all"
    variant: str = "tnl"
    twin: Optional[str] = None  # id of the same layout without recompute (must match closely)

    @property
    def id(self) -> str:
        parts = [f"tp{self.tp}"]
        if self.tpsp:
            parts.append("tpsp")
        if self.sp > 1:
            parts.append(f"sp{self.sp}-{self.mode}")
        if self.pp > 1:
            parts.append(f"pp{self.pp}")
        if self.recompute:
            parts.append(f"recompute-{self.recompute}")
        if self.variant != "tnl":
            parts.append(self.variant)
        return "-".join(parts)


MODES = ("lasp", "lasp2", "ulysses", "allgather")


def _layouts():
    out = [
        Layout(tp=2),
        Layout(tp=2, tpsp=True),
        Layout(tp=4, tpsp=True),
        Layout(tp=2, tpsp=True, recompute="full", twin="tp2-tpsp"),
        Layout(tp=2, tpsp=True, recompute="selective", twin="tp2-tpsp"),
        Layout(tp=2, tpsp=True, recompute="selective-all", twin="tp2-tpsp"),
        Layout(pp=2),
        Layout(tp=2, tpsp=True, pp=2),
        Layout(tp=2, tpsp=True, variant="tied"),
        Layout(tp=2, tpsp=True, variant="options"),
        Layout(tp=4, variant="nodecay"),
    ]
    out += [Layout(sp=2, mode=m) for m in MODES]
    out += [Layout(sp=4, mode=m) for m in MODES]
    out += [Layout(tp=2, tpsp=True, sp=2, mode=m) for m in MODES]
    out += [
        Layout(tp=2, tpsp=True, sp=2, recompute="full", twin="tp2-tpsp-sp2-lasp"),
        Layout(tp=2, tpsp=True, sp=2, recompute="selective", twin="tp2-tpsp-sp2-lasp"),
        Layout(sp=2, pp=2),
        Layout(sp=2, variant="tied"),
        Layout(tp=2, sp=2, mode="lasp2", variant="options"),
    ]
    return out


LAYOUTS = _layouts()

_RECOMPUTE = {
    None: {},
    "full": dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1),
    "selective": dict(recompute_granularity="selective"),
    "selective-all": dict(recompute_granularity="selective", recompute_modules=["core_attn", "mlp"]),
}


def _config(layout: Layout):
    from megatron_lasp.models import linear_lm_config

    return linear_lm_config(
        "tiny",
        tensor_model_parallel_size=layout.tp,
        context_parallel_size=layout.sp,
        pipeline_model_parallel_size=layout.pp,
        sequence_parallel=layout.tpsp,
        sequence_parallel_mode=layout.mode,
        use_cpu_initialization=True,
        **VARIANTS[layout.variant],
        **_RECOMPUTE[layout.recompute],
    )


def _batch():
    gen = torch.Generator().manual_seed(SEED + 1)
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=gen)
    labels = torch.randint(0, VOCAB, (BATCH, SEQ), generator=gen)
    return ids, labels


def _global_name(name: str, offset: int) -> str:
    """Stage-local ``decoder.layers.i.`` -> global ``decoder.layers.(i + offset).``."""
    prefix = "decoder.layers."
    if not name.startswith(prefix):
        return name
    idx, rest = name[len(prefix) :].split(".", 1)
    return f"{prefix}{int(idx) + offset}.{rest}"


def _reference(variant: str):
    """TP=1 / SP=1 / PP=1 run of the full batch: (loss, full params, grads, slopes per layer)."""
    from megatron_lasp.models import build_linear_lm
    from megatron_lasp.parallel import initialize_parallel

    initialize_parallel(1, 1, 1, seed=SEED)
    torch.manual_seed(SEED)
    model = build_linear_lm(_config(Layout(variant=variant)), VOCAB)
    ids, labels = _batch()
    loss = model(ids, labels=labels).float().mean()
    loss.backward()
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    slopes = [layer.self_attention.slopes.clone() for layer in model.decoder.layers]
    return loss.detach(), params, grads, slopes


def _slice_tp(full: torch.Tensor, param, tp_rank: int, tp_size: int) -> torch.Tensor:
    if not getattr(param, "tensor_model_parallel", False) or tp_size == 1:
        return full
    dim, stride = param.partition_dim, getattr(param, "partition_stride", 1)
    pieces = full.chunk(tp_size * stride, dim=dim)
    return torch.cat([pieces[j * tp_size + tp_rank] for j in range(stride)], dim=dim)


def _pp_loss(model, groups, ids, labels):
    """Two-stage pipeline by hand: stage 0 sends its output, stage 1 returns the input grad."""
    from megatron_lasp.parallel import split_sequence

    ids = split_sequence(ids, groups.sp, dim=1)
    lab = split_sequence(labels, groups.sp, dim=1)
    pp_rank = groups.pp_rank
    peer = dist.get_global_rank(groups.pp, 1 - pp_rank)
    scale = labels.numel() * groups.dp_size * 1.0
    if pp_rank == 0:
        hidden = model(ids)
        dist.send(hidden.detach().contiguous(), peer)
        grad = torch.empty_like(hidden)
        dist.recv(grad, peer)
        hidden.backward(grad)
        local = torch.zeros(())
    else:
        shape = (ids.shape[1] // (groups.tp_size if model.config.sequence_parallel else 1), ids.shape[0],
                 model.config.hidden_size)
        hidden = torch.empty(shape)
        dist.recv(hidden, peer)
        hidden.requires_grad_(True)
        model.set_input_tensor(hidden)
        local = model(None, labels=lab).float().sum() / scale
        local.backward()
        dist.send(hidden.grad.contiguous(), peer)
        local = local.detach()
    total = local.clone()
    dist.all_reduce(total)  # world = pp x dp_sp x tp; only stage 1 contributes, tp ranks repeat
    return total / groups.tp_size


def _run_layout(layout: Layout, ref, saved_grads) -> Dict:
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    from megatron_lasp.models import build_linear_lm
    from megatron_lasp.parallel import initialize_parallel
    from model_utils import compare_grads, full_grads, full_params, rel_err, sharded_loss

    ref_loss, ref_params, ref_grads, ref_slopes = ref
    groups = initialize_parallel(layout.tp, layout.sp, layout.pp, seed=SEED)
    config = _config(layout)
    pre, post = groups.pp_rank == 0, groups.pp_rank == groups.pp_size - 1
    torch.manual_seed(SEED)
    model = build_linear_lm(config, VOCAB, pre_process=pre, post_process=post)
    offset = get_transformer_layer_offset(config) if layout.pp > 1 else 0
    result = {}
    # the CPU init of one seed is TP-invariant (same master weights) when no stage is skipped
    if layout.pp == 1:
        got = full_params(model, groups)
        result["init_err"] = max(rel_err(got[n], ref_params[n]) for n in got)
    # load the reference weights (PP stages draw their init in a different order)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(_slice_tp(ref_params[_global_name(name, offset)], p, groups.tp_rank, groups.tp_size))
    # slopes: this TP rank's heads of the GLOBAL layer
    for i, layer in enumerate(model.decoder.layers):
        heads = layer.self_attention.local_heads
        want = ref_slopes[i + offset][groups.tp_rank * heads : (groups.tp_rank + 1) * heads]
        assert torch.equal(layer.self_attention.slopes, want), f"slopes of layer {i + offset}"
    ids, labels = _batch()
    if layout.pp > 1:
        loss = _pp_loss(model, groups, ids, labels)
    else:
        loss = sharded_loss(model, ids, labels, groups)
    grads = full_grads(model, groups)
    errs = compare_grads(grads, ref_grads, lambda n: _global_name(n, offset))
    worst = max(errs, key=errs.get)
    result.update(loss_err=rel_err(loss, ref_loss), grad_err=errs[worst], worst=worst, n_grads=len(errs))
    if layout.pp > 1:  # every stage checked its own parameters: the max over all ranks
        t = torch.tensor([result["grad_err"], result["loss_err"]], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        result["grad_err"], result["loss_err"] = t.tolist()
        result["n_grads"] = None
    else:
        saved_grads[layout.id] = grads
        if layout.twin is not None:
            twin = saved_grads[layout.twin]
            result["twin_err"] = max(rel_err(grads[n], twin[n]) for n in grads)
    return result


def _run_all(rank, world_size, layouts):
    import logging

    logging.disable(logging.WARNING)
    torch.set_num_threads(1)  # 4 ranks on a 2-core machine
    refs, saved, results = {}, {}, {}
    for layout in layouts:
        try:
            if layout.variant not in refs:
                refs[layout.variant] = _reference(layout.variant)
            results[layout.id] = _run_layout(layout, refs[layout.variant], saved)
        except Exception:
            results[layout.id] = {"error": traceback.format_exc()}
        dist.barrier()
    return results


@pytest.fixture(scope="module")
def layout_results():
    per_rank = spawn(_run_all, world_size=4, args=(LAYOUTS,), timeout=280)
    return per_rank[0], per_rank


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda l: l.id)
def test_sharded_equals_single_process(layout_results, layout):
    results, per_rank = layout_results
    r = results[layout.id]
    assert "error" not in r, r.get("error")
    for rank_results in per_rank[1:]:  # every rank reached the same verdict
        assert "error" not in rank_results[layout.id], rank_results[layout.id]["error"]
    assert r["loss_err"] < TOL, f"loss relative error {r['loss_err']:.2e}"
    assert r["grad_err"] < TOL, f"gradient of {r['worst']}: relative error {r['grad_err']:.2e}"
    if r.get("n_grads") is not None:
        assert r["n_grads"] >= 10
    if "init_err" in r:
        assert r["init_err"] == 0.0, f"TP shards are not slices of the TP=1 init ({r['init_err']:.2e})"
    if "twin_err" in r:
        assert r["twin_err"] < 1e-6, f"recompute changed the gradients ({r['twin_err']:.2e})"
