"""Hybrid models (softmax-attention layers among the linear ones): sharded runs equal one process.

One 4-rank spawn builds a tiny hybrid (``L*L``: linear, softmax, linear; 4 heads, GQA with 2
key/value heads, or MHA) under every linear sequence-parallel mode combined with each softmax mode
at SP = 2, the linear modes with the all-gather softmax at SP = 4, and TP2 x SP2 (TP sequence
parallelism on), each unpacked and with packed documents that span ranks, and compares the loss
and every parameter's gradient with the TP = SP = 1 run of the same weights on the whole batch.
Plus in-process checks of the pattern, the presets and the config's errors.
"""

from __future__ import annotations

import traceback
from dataclasses import dataclass
from typing import Dict, Tuple

import pytest
import torch
import torch.distributed as dist

from megatron_lasp.testing import spawn

VOCAB, BATCH, SEQ, SEED = 128, 2, 24, 1234
TOL = 2e-5
LINEAR_MODES = ("lasp", "lasp2", "ulysses", "allgather")
SOFTMAX_MODES = ("allgather", "ulysses", "allgather-balanced")
CU = [0, 5, 13, 14, 30, 41, 48]  # global starts over the 2 x 24 tokens: across slices at SP 2 and 4
VARIANTS = {"gqa": dict(num_query_groups=2), "mha": dict(num_query_groups=4)}


@dataclass(frozen=True)
class Layout:
    tp: int = 1
    sp: int = 1
    mode: str = "lasp"
    softmax_mode: str = "allgather"
    variant: str = "gqa"
    packed: bool = False

    @property
    def id(self) -> str:
        return (f"tp{self.tp}-sp{self.sp}-{self.mode}-{self.softmax_mode}-{self.variant}"
                f"-{'packed' if self.packed else 'unpacked'}")


def _layouts():
    out = []
    for packed in (False, True):
        out += [Layout(sp=2, mode=m, softmax_mode=s, packed=packed) for m in LINEAR_MODES for s in SOFTMAX_MODES]
        out += [Layout(sp=4, mode=m, packed=packed) for m in LINEAR_MODES]
        out += [Layout(sp=4, mode="lasp", softmax_mode="ulysses", variant="mha", packed=packed),
                Layout(sp=4, mode="lasp2", softmax_mode="allgather-balanced", packed=packed)]
        out += [Layout(tp=2, sp=2, mode="lasp", packed=packed),
                Layout(tp=2, sp=2, mode="lasp2", softmax_mode="ulysses", variant="mha", packed=packed)]
    return out


LAYOUTS = _layouts()


def _config(layout: Layout):
    from megatron_lasp.models import linear_lm_config

    return linear_lm_config(
        "tiny", num_layers=3, hybrid_layer_pattern="L*L", tensor_model_parallel_size=layout.tp,
        context_parallel_size=layout.sp, sequence_parallel=layout.tp > 1, sequence_parallel_mode=layout.mode,
        softmax_sequence_parallel_mode=layout.softmax_mode, use_cpu_initialization=True,
        **VARIANTS[layout.variant],
    )


def _batch():
    gen = torch.Generator().manual_seed(SEED + 1)
    return torch.randint(0, VOCAB, (BATCH, SEQ), generator=gen), torch.randint(0, VOCAB, (BATCH, SEQ), generator=gen)


def _packed(packed: bool):
    if not packed:
        return {}
    from megatron.core.packed_seq_params import PackedSeqParams

    cu = torch.tensor(CU, dtype=torch.int32)
    return {"packed_seq_params": PackedSeqParams(qkv_format="sbhd", cu_seqlens_q=cu, cu_seqlens_kv=cu)}


def _reference(variant: str, packed: bool):
    from megatron_lasp.models import build_linear_lm

    torch.manual_seed(SEED)
    model = build_linear_lm(_config(Layout(variant=variant)), VOCAB)
    ids, labels = _batch()
    loss = model(ids, labels=labels, **_packed(packed)).float().mean()
    loss.backward()
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    return loss.detach(), params, grads


def _slice_tp(full, param, tp_rank, tp_size):
    if not getattr(param, "tensor_model_parallel", False) or tp_size == 1:
        return full
    dim, stride = param.partition_dim, getattr(param, "partition_stride", 1)
    pieces = full.chunk(tp_size * stride, dim=dim)
    return torch.cat([pieces[j * tp_size + tp_rank] for j in range(stride)], dim=dim)


def _run_layout(layout: Layout, groups, ref) -> Dict:
    from model_utils import compare_grads, full_grads, rel_err, sharded_loss

    from megatron_lasp.models import build_linear_lm
    from megatron_lasp.models.softmax_attention import SoftmaxSelfAttention

    ref_loss, ref_params, ref_grads = ref
    torch.manual_seed(SEED)
    model = build_linear_lm(_config(layout), VOCAB)
    kinds = ["*" if isinstance(layer.self_attention, SoftmaxSelfAttention) else "L" for layer in model.decoder.layers]
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(_slice_tp(ref_params[name], p, groups.tp.rank(), groups.tp.size()))
    ids, labels = _batch()
    loss = sharded_loss(model, ids, labels, groups, **_packed(layout.packed))
    errs = compare_grads(full_grads(model, groups), ref_grads)
    worst = max(errs, key=errs.get)
    return dict(kinds="".join(kinds), loss_err=rel_err(loss, ref_loss), grad_err=errs[worst], worst=worst,
                n_grads=len(errs))


def _run_all(rank, world_size, layouts):
    import logging

    logging.disable(logging.WARNING)
    torch.set_num_threads(1)
    from megatron_lasp.parallel import initialize_parallel

    initialize_parallel(1, 1, 1, seed=SEED)
    refs = {}
    for key in dict.fromkeys((layout.variant, layout.packed) for layout in layouts):
        try:
            refs[key] = _reference(*key)
        except Exception:
            refs[key] = traceback.format_exc()
    results = {}
    by_sizes: Dict[Tuple[int, int], list] = {}
    for layout in layouts:
        by_sizes.setdefault((layout.tp, layout.sp), []).append(layout)
    for (tp, sp), members in by_sizes.items():
        groups = initialize_parallel(tp, sp, 1, seed=SEED)
        for layout in members:
            ref = refs[(layout.variant, layout.packed)]
            try:
                if isinstance(ref, str):
                    raise RuntimeError(f"the reference run failed:\n{ref}")
                results[layout.id] = _run_layout(layout, groups, ref)
            except Exception:
                results[layout.id] = {"error": traceback.format_exc()}
            dist.barrier()
    return results


@pytest.fixture(scope="module")
def hybrid_results():
    return spawn(_run_all, world_size=4, args=(LAYOUTS,), timeout=900)


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda l: l.id)
def test_hybrid_sharded_equals_single_process(hybrid_results, layout):
    for rank, results in enumerate(hybrid_results):
        r = results[layout.id]
        assert "error" not in r, f"rank {rank}: {r.get('error')}"
        assert r["kinds"] == "L*L"
        assert r["loss_err"] < TOL, f"rank {rank}: loss relative error {r['loss_err']:.2e}"
        assert r["grad_err"] < TOL, f"rank {rank}: gradient of {r['worst']}: relative error {r['grad_err']:.2e}"
        assert r["n_grads"] >= 20


def test_hybrid_pattern_rules_and_presets():
    from megatron_lasp.models import PRESETS, linear_lm_config

    assert linear_lm_config("tiny").layer_kinds == "LL" and not linear_lm_config("tiny").is_hybrid
    cfg = linear_lm_config("tnl-1b-hybrid-1to7", use_cpu_initialization=True)
    assert cfg.layer_kinds == "LLLLLLL*LLLLLLL*" and cfg.is_hybrid and cfg.num_query_groups == 4
    assert PRESETS["tnl-1b-hybrid-1to3"].fields["hybrid_layer_pattern"].count("*") == 4
    with pytest.raises(ValueError, match="one character per layer"):
        linear_lm_config("tiny", hybrid_layer_pattern="L*L")
    with pytest.raises(ValueError, match="one character per layer"):
        linear_lm_config("tiny", hybrid_layer_pattern="LM")
    with pytest.raises(ValueError, match="one key/value head per head"):
        linear_lm_config("tiny", num_query_groups=2)
    with pytest.raises(ValueError, match="softmax_sequence_parallel_mode allgather"):
        linear_lm_config("tiny", hybrid_layer_pattern="L*", num_query_groups=2, context_parallel_size=4,
                         softmax_sequence_parallel_mode="ulysses")
    with pytest.raises(ValueError, match="softmax_sequence_parallel_mode must be one of"):
        linear_lm_config("tiny", hybrid_layer_pattern="L*", softmax_sequence_parallel_mode="ring")


def _hybrid_stack_check(rank, world_size):
    import logging

    logging.disable(logging.WARNING)
    from megatron.core.transformer.spec_utils import build_module
    from megatron.core.transformer.transformer_block import TransformerBlock

    from megatron_lasp.models import linear_lm_config
    from megatron_lasp.models.specs import get_linear_lm_block_spec, hybrid_model_arguments
    from megatron_lasp.parallel import initialize_parallel

    groups = initialize_parallel(1, 1, 1, seed=SEED)
    config = linear_lm_config("tiny", num_layers=3, hybrid_layer_pattern="L*L", num_query_groups=2,
                              use_cpu_initialization=True)
    args = hybrid_model_arguments(config)
    stack = build_module(args["hybrid_stack_spec"], config=config, pre_process=True, post_process=False,
                         layer_type_list=list(args["hybrid_layer_pattern"]), pg_collection=groups)
    block = TransformerBlock(config, get_linear_lm_block_spec(config), post_process=False, pg_collection=groups)
    missing = block.load_state_dict(stack.state_dict(), strict=True)
    x = torch.randn(24, 2, config.hidden_size)
    return args["hybrid_layer_pattern"], str(missing), rel_err_of(stack(x, attention_mask=None), block(x, attention_mask=None))


def rel_err_of(a, b):
    return ((a - b).double().norm() / b.double().norm()).item()


def test_hybrid_model_step_builds_the_same_layers():
    """megatron-core >= 0.19: its HybridStack, fed our specs, is our decoder (same weights, same output)."""
    pytest.importorskip("megatron.core.models.hybrid.hybrid_block")
    ((pattern, load, err),) = spawn(_hybrid_stack_check, 1, timeout=300)
    assert pattern == "G*G"
    assert load == "<All keys matched successfully>", load
    assert err < 1e-6, err


def _hybrid_flops(rank, world_size):
    from torch.utils.flop_counter import FlopCounterMode

    from megatron_lasp.models import build_linear_lm, linear_lm_config
    from megatron_lasp.parallel import initialize_parallel
    from megatron_lasp.training.logging_utils import flops_per_token

    initialize_parallel(1, 1, 1, seed=0)
    config = linear_lm_config("tiny", num_layers=3, hybrid_layer_pattern="L*L", num_query_groups=2,
                              use_cpu_initialization=True, kernel_backend="torch", softmax_kernel="math")
    model = build_linear_lm(config, VOCAB)
    ids = torch.randint(0, VOCAB, (2, 64))
    with FlopCounterMode(display=False) as fwd:
        model(ids, labels=ids)
    counts = fwd.get_flop_counts()["Global"]
    return dict(formula=flops_per_token(config, VOCAB, seq_length=64),
                linear=flops_per_token(linear_lm_config("tiny", num_layers=3), VOCAB),
                mm=counts[torch.ops.aten.mm] / ids.numel())


def test_hybrid_flops_count_the_softmax_layers():
    """The weights of every layer (the matmuls torch counts) and the softmax attention's causal term."""
    from megatron_lasp.models import linear_lm_config
    from megatron_lasp.training.logging_utils import flops_per_token

    ((r,),) = [spawn(_hybrid_flops, 1, timeout=300)]
    h, H, d, f, G, N, B = 64, 4, 16, 96, 2, 64, 64
    linear_attention = 3 * H * (4 * B * d + 4 * d * d)
    softmax_attention = 3 * 2 * H * d * (N + 1)
    # the forward matmuls counted by torch are a third of the formula's 6 * P_matmul
    weights = r["formula"] - 2 * linear_attention - softmax_attention
    assert abs(weights - 3 * r["mm"]) / weights < 1e-9, (weights, r["mm"])
    # one softmax layer replaces a linear one: fewer projection weights (no gate, 2 key/value heads)
    swap = (h * 4 * H * d) - (h * (H + 2 * G) * d)
    assert abs(r["linear"] - r["formula"] - (6 * swap + linear_attention - softmax_attention)) < 1e-6
    with pytest.raises(ValueError, match="need seq_length"):
        flops_per_token(linear_lm_config("tiny", hybrid_layer_pattern="L*"), VOCAB)
