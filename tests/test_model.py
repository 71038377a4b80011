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
        add_bias_linear=True,
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
        Layout(pp=2, variant="tied"),
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


def _global_name(name: str, offset: int, tied: bool = False) -> str:
    """Stage-local ``decoder.layers.i.`` -> global ``decoder.layers.(i + offset).``; a tied output
    layer (the last stage's copy of the embedding) -> the embedding."""
    if tied and name == "output_layer.weight":
        return "embedding.word_embeddings.weight"
    prefix = "decoder.layers."
    if not name.startswith(prefix):
        return name
    idx, rest = name[len(prefix) :].split(".", 1)
    return f"{prefix}{int(idx) + offset}.{rest}"


def _assert_spec_classes(model) -> None:
    """The built layers and MLPs are the classes the specs name (nothing swapped after the build)."""
    from megatron_lasp.models.chunked import LinearTransformerLayer
    from megatron_lasp.models.mlp import LinearLMMLP

    assert model.decoder.layers and all(type(layer) is LinearTransformerLayer for layer in model.decoder.layers)
    assert all(type(layer.mlp) is LinearLMMLP for layer in model.decoder.layers)


def test_specs_name_the_classes_that_run(monkeypatch):
    """The layer spec names LinearTransformerLayer and the MLP spec LinearLMMLP, in both forms of
    megatron-core's MLP spec (a ModuleSpec in 0.16, a partial of ``MLP.as_mlp_submodule`` in 0.19)."""
    import functools

    from megatron.core.transformer.mlp import MLP, MLPSubmodules

    from megatron_lasp.models import specs
    from megatron_lasp.models.chunked import LinearTransformerLayer
    from megatron_lasp.models.mlp import LinearLMMLP

    spec = specs.get_linear_lm_layer_spec(_config(Layout()))
    assert spec.module is LinearTransformerLayer
    assert spec.submodules.mlp.module is LinearLMMLP
    assert spec.submodules.mlp.submodules.linear_fc1 is not None

    def as_mlp_submodule(cls, submodules, **kwargs):  # the 0.19 builder's shape
        return cls, submodules, kwargs

    monkeypatch.setattr(MLP, "as_mlp_submodule", classmethod(as_mlp_submodule), raising=False)
    subs = MLPSubmodules(linear_fc1="fc1", linear_fc2="fc2")
    monkeypatch.setattr(specs, "get_mlp_module_spec_for_backend",
                        lambda backend: functools.partial(MLP.as_mlp_submodule, submodules=subs))
    built = specs.glu_mlp_spec(None)
    assert built(config="c") == (LinearLMMLP, subs, {"config": "c"})
    monkeypatch.setattr(specs, "get_mlp_module_spec_for_backend", lambda backend: "something else")
    with pytest.raises(TypeError, match="unexpected MLP spec"):
        specs.glu_mlp_spec(None)


def _reference(variant: str):
    """TP=1 / SP=1 / PP=1 run of the full batch: (loss, full params, grads, slopes per layer).

    Call with megatron-core's parallel state at TP = SP = PP = 1.
    """
    from megatron_lasp.models import build_linear_lm

    torch.manual_seed(SEED)
    model = build_linear_lm(_config(Layout(variant=variant)), VOCAB)
    _assert_spec_classes(model)
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

    ids = split_sequence(ids, groups.cp, dim=1)
    lab = split_sequence(labels, groups.cp, dim=1)
    pp_rank = groups.pp.rank()
    peer = dist.get_global_rank(groups.pp, 1 - pp_rank)
    scale = labels.numel() * groups.dp.size() * 1.0
    if pp_rank == 0:
        hidden = model(ids)
        dist.send(hidden.detach().contiguous(), peer)
        grad = torch.empty_like(hidden)
        dist.recv(grad, peer)
        hidden.backward(grad)
        local = torch.zeros(())
    else:
        shape = (ids.shape[1] // (groups.tp.size() if model.config.sequence_parallel else 1), ids.shape[0],
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
    dist.all_reduce(total)  # world = pp x dp_cp x tp; only stage 1 contributes, tp ranks repeat
    return total / groups.tp.size()


def _run_layout(layout: Layout, groups, ref, saved_grads) -> Dict:
    """Build ``layout`` (parallel state already initialised to its sizes), load the reference
    weights, run the full batch and compare loss and gradients with the reference."""
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    from megatron_lasp.models import build_linear_lm
    from model_utils import compare_grads, full_grads, full_params, rel_err, sharded_loss

    ref_loss, ref_params, ref_grads, ref_slopes = ref
    config = _config(layout)
    pre, post = groups.pp.rank() == 0, groups.pp.rank() == groups.pp.size() - 1
    torch.manual_seed(SEED)
    model = build_linear_lm(config, VOCAB, pre_process=pre, post_process=post)
    offset = get_transformer_layer_offset(config) if layout.pp > 1 else 0
    tied = config.share_embeddings_and_output_weights
    result = {}
    if tied and layout.pp > 1:
        # megatron-core copies the first stage's embedding into the last stage at build time
        from megatron.core import parallel_state as mpu

        (shared,) = [p for p in model.parameters() if getattr(p, "shared_embedding", False)]
        diff = shared.detach().clone() * (1.0 if groups.pp.rank() == 0 else -1.0)
        dist.all_reduce(diff, group=mpu.get_embedding_group())
        result["tied_sync_err"] = diff.abs().max().item()
    # the CPU init of one seed is TP-invariant (same master weights) when no stage is skipped
    if layout.pp == 1:
        got = full_params(model, groups)
        result["init_err"] = max(rel_err(got[n], ref_params[n]) for n in got)
    # load the reference weights (PP stages draw their init in a different order)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(_slice_tp(ref_params[_global_name(name, offset, tied)], p, groups.tp.rank(), groups.tp.size()))
    # slopes: this TP rank's heads of the GLOBAL layer
    for i, layer in enumerate(model.decoder.layers):
        heads = layer.self_attention.local_heads
        want = ref_slopes[i + offset][groups.tp.rank() * heads : (groups.tp.rank() + 1) * heads]
        assert torch.equal(layer.self_attention.slopes, want), f"slopes of layer {i + offset}"
    # checkpoint metadata: out_norm is sharded with the heads, layers stacked at global indices
    sharded = model.sharded_state_dict()
    local = layer.self_attention.local_heads * config.kv_channels
    for i in range(len(model.decoder.layers)):
        sh = sharded[f"decoder.layers.{i}.self_attention.out_norm.weight"]
        assert tuple(sh.global_shape) == (config.num_layers, local * groups.tp.size()), sh
        assert tuple(sh.global_offset) == (i + offset, groups.tp.rank() * local), sh
    ids, labels = _batch()
    if layout.pp > 1:
        loss = _pp_loss(model, groups, ids, labels)
        if tied:  # what megatron-core's finalize_model_grads does for the two embedding copies
            from megatron.core import parallel_state as mpu

            dist.all_reduce(shared.grad, group=mpu.get_embedding_group())
    else:
        loss = sharded_loss(model, ids, labels, groups)
    grads = full_grads(model, groups)
    errs = compare_grads(grads, ref_grads, lambda n: _global_name(n, offset, tied))
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


def _extras() -> Dict:
    """Single-rank checks that need megatron-core's parallel state (run inside the spawn)."""
    from megatron_lasp.models import PRESETS, build_linear_lm, linear_lm_config, preset_vocab_size

    out: Dict = {"param_counts": {}}
    # parameter counts of every preset, built on the meta device (nothing is materialised)
    for name in PRESETS:
        for tied in (False, True):
            config = linear_lm_config(
                name, use_cpu_initialization=True, perform_initialization=False,
                share_embeddings_and_output_weights=tied,
            )
            with torch.device("meta"):
                model = build_linear_lm(config, preset_vocab_size(name))
            out["param_counts"][(name, tied)] = sum(p.numel() for p in model.parameters())
    # logits without labels: [b, s, V] whose cross entropy is the per-token loss
    torch.manual_seed(SEED)
    model = build_linear_lm(_config(Layout()), VOCAB)
    ids, labels = _batch()
    with torch.no_grad():
        logits = model(ids)
        loss = model(ids, labels=labels)
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB).float(), labels.reshape(-1), reduction="none")
    out["logits_shape"] = tuple(logits.shape)
    out["logits_ce_err"] = (ce.view_as(loss) - loss).abs().max().item()
    # incremental decoding and packed sequences without document starts are refused, not silently wrong
    attention = model.decoder.layers[0].self_attention
    x = torch.randn(SEQ, BATCH, model.config.hidden_size)
    refused = []
    for kwargs, error in ((dict(inference_context=object()), NotImplementedError),
                          (dict(packed_seq_params=object()), ValueError)):
        try:
            attention(x, **kwargs)
        except error:
            refused.append(True)
    out["refused"] = refused
    # casting to bf16 keeps the decay slopes fp32 and exact; the bf16 model runs
    slopes = [layer.self_attention.slopes.clone() for layer in model.decoder.layers]
    model = model.to(torch.bfloat16)
    out["bf16_slopes_fp32"] = all(
        layer.self_attention.slopes.dtype == torch.float32 and torch.equal(layer.self_attention.slopes, s)
        for layer, s in zip(model.decoder.layers, slopes)
    )
    # a meta-device build materialised with to_empty() gets real slopes
    with torch.device("meta"):
        meta = build_linear_lm(linear_lm_config("tiny", use_cpu_initialization=True, perform_initialization=False), VOCAB)
    meta = meta.to_empty(device="cpu")
    out["to_empty_slopes"] = all(
        torch.equal(layer.self_attention.slopes, s) for layer, s in zip(meta.decoder.layers, slopes)
    )
    with torch.no_grad():
        bf16_loss = model(ids, labels=labels).float().mean()
    out["bf16_loss_err"] = abs(bf16_loss.item() - loss.mean().item()) / loss.mean().item()
    return out


def _run_all(rank, world_size, layouts):
    import logging

    logging.disable(logging.WARNING)
    torch.set_num_threads(1)  # 4 ranks on a 2-core machine
    from megatron_lasp.parallel import initialize_parallel

    saved, results = {}, {}
    initialize_parallel(1, 1, 1, seed=SEED)
    try:
        results["extras"] = _extras()
    except Exception:
        results["extras"] = {"error": traceback.format_exc()}
    refs = {}
    for variant in dict.fromkeys(layout.variant for layout in layouts):
        try:
            refs[variant] = _reference(variant)
        except Exception:
            refs[variant] = traceback.format_exc()
    # one parallel-state initialisation per (TP, SP, PP): megatron-core creates many groups
    by_sizes: Dict[Tuple[int, int, int], list] = {}
    for layout in layouts:
        by_sizes.setdefault((layout.tp, layout.sp, layout.pp), []).append(layout)
    for (tp, sp, pp), members in by_sizes.items():
        groups = initialize_parallel(tp, sp, pp, seed=SEED)
        for layout in members:
            ref = refs[layout.variant]
            try:
                if isinstance(ref, str):
                    raise RuntimeError(f"the reference run failed:\n{ref}")
                results[layout.id] = _run_layout(layout, groups, ref, saved)
            except Exception:
                results[layout.id] = {"error": traceback.format_exc()}
            dist.barrier()
    return results


@pytest.fixture(scope="module")
def layout_results():
    per_rank = spawn(_run_all, world_size=4, args=(LAYOUTS,), timeout=600)
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
    if "tied_sync_err" in r:
        assert r["tied_sync_err"] == 0.0, "the last stage's tied output weight is not the embedding"
    if "twin_err" in r:
        assert r["twin_err"] < 1e-6, f"recompute changed the gradients ({r['twin_err']:.2e})"


def _param_count(name: str, tied: bool) -> int:
    """Closed form: embeddings + L x (2 norms + qkvu + out norm + proj + GLU (+ gate)) + final norm; a
    hybrid's softmax layers: 2 norms + q and G key/value heads + proj + GLU."""
    from megatron_lasp.models import PRESETS

    preset = PRESETS[name]
    f = preset.fields
    V, h, L, H, F = preset.vocab_size, f["hidden_size"], f["num_layers"], f["num_attention_heads"], f["ffn_hidden_size"]
    D = h // H
    G = f.get("num_query_groups") or H
    softmax_layers = (f.get("hybrid_layer_pattern") or "").count("*")
    per_layer = 2 * h + 4 * H * D * h + H * D + H * D * h + 3 * h * F
    gate = f.get("linear_attention_gate", "none")
    per_layer += {"none": 0, "mamba2": H * h + 2 * H, "gla": H * h + H}[gate]  # W, then A_log + dt_bias / b_g
    if f.get("linear_attention_type") == "gated_delta_net":  # defaults: H key and value heads of D, 4 taps
        # in_proj (q, k, v, z, b, a), conv1d, A_log + dt_bias, out_norm [D], out_proj
        per_layer = 2 * h + (4 * H * D + 2 * H) * h + 3 * H * D * 4 + 2 * H + D + H * D * h + 3 * h * F
    per_softmax_layer = 2 * h + (H + 2 * G) * D * h + H * D * h + 3 * h * F
    return V * h * (1 if tied else 2) + (L - softmax_layers) * per_layer + softmax_layers * per_softmax_layer + h


def test_extras(layout_results):
    results, _ = layout_results
    extras = results["extras"]
    assert "error" not in extras, extras.get("error")
    for (name, tied), count in extras["param_counts"].items():
        assert count == _param_count(name, tied), f"{name} tied={tied}: {count} != {_param_count(name, tied)}"
    assert extras["param_counts"][("tnl-1b", False)] == 1_151_436_800
    assert extras["logits_shape"] == (BATCH, SEQ, VOCAB)
    assert extras["logits_ce_err"] < 1e-5
    assert extras["refused"] == [True, True], "inference_context / packed_seq_params must raise"
    assert extras["to_empty_slopes"], "to_empty() after a meta build left the slopes uninitialised"
    assert extras["bf16_slopes_fp32"], "casting the model to bf16 changed the decay slopes"
    assert extras["bf16_loss_err"] < 5e-2


# ---------------------------------------------------------------------------------------------
# in-process: config, presets, slopes, Transformer Engine path

_BAD_CONFIGS = [  # overrides, the field named by the config's error, the flag named by the CLI's
    (dict(sequence_parallel_mode="ring"), "sequence_parallel_mode", "--sequence-parallel-mode"),
    (dict(kernel_backend="cuda"), "kernel_backend", "--kernel-backend"),
    (dict(decay_type="learned"), "decay_type", "--decay-type"),
    (dict(qk_feature_map="relu"), "qk_feature_map", "--qk-feature-map"),
    (dict(v_feature_map="elu"), "v_feature_map", "--v-feature-map"),
    (dict(glu_type="geglu"), "glu_type", "--glu-type"),
    (dict(normalization="LayerNorm"), "normalization", "--normalization"),
    (dict(transformer_impl="inference_optimized"), "transformer_impl", "--transformer-impl"),
    (dict(num_attention_heads=6, tensor_model_parallel_size=4), "num_attention_heads", "--num-attention-heads"),
    (dict(tensor_model_parallel_size=2, context_parallel_size=4, sequence_parallel_mode="ulysses"),
     "sequence_parallel_mode ulysses", "--sequence-parallel-mode ulysses"),
    (dict(attention_norm_group_size=3), "attention_norm_group_size", "--attention-norm-group-size"),
    (dict(attention_norm_group_size=4, tensor_model_parallel_size=2), "attention_norm_group_size",
     "--attention-norm-group-size"),
    (dict(num_query_groups=2), "num_query_groups", "--num-query-groups"),
    (dict(num_attention_heads=1, hidden_size=512), "kv_channels", "--kv-channels"),
    (dict(decay_layer_eps=-1.0), "decay_layer_eps", "--decay-layer-eps"),
    (dict(recompute_granularity="selective", recompute_modules=["core_attn", "layernorm"]), "recompute_modules",
     "--recompute-modules"),
]


@pytest.mark.parametrize("overrides,field,flag", _BAD_CONFIGS, ids=[f for _, _, f in _BAD_CONFIGS])
def test_config_errors_name_the_field_and_the_cli_the_flag(overrides, field, flag):
    from megatron_lasp.models import linear_lm_config
    from megatron_lasp.training.arguments import config_error

    with pytest.raises(ValueError, match=field.replace(" ", ".")) as err:
        linear_lm_config("tiny", **overrides)
    assert "--" not in str(err.value), "library errors name config fields, not flags"
    message = str(config_error(err.value))
    assert flag in message and "\n" not in message, message


def test_config_defaults_and_presets():
    from megatron_lasp.models import PRESETS, linear_lm_config, preset_vocab_size
    from megatron_lasp.models.config import sglu_identity

    c = linear_lm_config("tiny")
    assert (c.normalization, c.gated_linear_unit, c.add_bias_linear, c.transformer_impl) == ("RMSNorm", True, False, "local")
    assert c.activation_func is sglu_identity and c.hidden_dropout == 0.0
    assert c.qkv_parts == 4 and linear_lm_config("tiny", output_gate=False).qkv_parts == 3
    assert linear_lm_config("tiny", glu_type="swiglu").activation_func is torch.nn.functional.silu
    table = {  # megatron_lasp/models/README.md, Presets: d_model, layers, heads, head dim, GLU dim, vocab
        "tnl-385m": (1024, 24, 8, 128, 2816, 64000),
        "tnl-1b": (2048, 16, 16, 128, 5632, 64000),
        "tnl-7b": (4096, 30, 32, 128, 11008, 64000),
        "tnl-1b-hybrid-1to7": (2048, 16, 16, 128, 5632, 64000),
        "tnl-1b-hybrid-1to3": (2048, 16, 16, 128, 5632, 64000),
        "tnl-1b-mamba2": (2048, 16, 16, 128, 5632, 64000),
        "tnl-1b-gla": (2048, 16, 16, 128, 5632, 64000),
        "gdn-1b": (2048, 16, 16, 128, 5632, 64000),
        "gdn-1b-hybrid-1to3": (2048, 16, 16, 128, 5632, 64000),
    }
    for name, row in table.items():
        c = linear_lm_config(name)
        assert (c.hidden_size, c.num_layers, c.num_attention_heads, c.kv_channels, c.ffn_hidden_size,
                preset_vocab_size(name)) == row
    assert set(PRESETS) == {"tiny", *table}
    from megatron_lasp.training.arguments import config_error

    with pytest.raises(ValueError, match="preset must be one of") as err:
        linear_lm_config("tnl-13b")
    assert "--model-preset must be one of" in str(config_error(err.value))
    c = linear_lm_config("tiny", pipeline_model_parallel_size=2)
    assert c.pipeline_dtype == c.params_dtype


def test_alibi_and_layer_slopes():
    from megatron_lasp.models import alibi_slopes, layer_slopes, linear_lm_config

    assert alibi_slopes(8) == [2.0 ** -(i + 1) for i in range(8)]
    assert alibi_slopes(4) == [2.0 ** -(2 * (i + 1)) for i in range(4)]
    twelve = alibi_slopes(12)  # 8 of the 8-head set, then the odd-position ones of 16 heads
    assert twelve[:8] == alibi_slopes(8)
    assert twelve[8:] == pytest.approx([2.0 ** -(0.5 * (2 * i + 1)) for i in range(4)], rel=1e-12)
    base = torch.tensor(alibi_slopes(4), dtype=torch.float64)
    c = linear_lm_config("tiny", num_layers=5)
    for layer in range(1, 6):
        factor = 1 - (layer - 1) / 4 + 1e-5
        got = layer_slopes(c, layer)
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.double(), base * factor, rtol=1e-7, atol=0)
    last = layer_slopes(c, 5)
    assert torch.all(last > 0) and torch.all(last < 1e-5)
    one = linear_lm_config("tiny", num_layers=1)
    torch.testing.assert_close(layer_slopes(one, 1).double(), base * (1 + 1e-5), rtol=1e-7, atol=0)
    alibi = linear_lm_config("tiny", num_layers=5, decay_type="alibi")
    assert torch.equal(layer_slopes(alibi, 1), layer_slopes(alibi, 5))
    none = linear_lm_config("tiny", decay_type="none")
    assert torch.equal(layer_slopes(none, 1), torch.zeros(4))


def test_transformer_engine_missing_is_a_clear_error():
    from megatron_lasp.models import linear_lm_config
    from megatron_lasp.models.config import TE_MISSING_MESSAGE, te_available

    if te_available():
        pytest.skip("Transformer Engine is installed here")
    with pytest.raises(ValueError) as err:
        linear_lm_config("tiny", transformer_impl="transformer_engine")
    assert str(err.value) == TE_MISSING_MESSAGE
    from megatron_lasp.training.arguments import config_error

    message = str(config_error(err.value))  # what the CLI prints
    assert "pip install -e .[te]" in message and "--transformer-impl local" in message, message

