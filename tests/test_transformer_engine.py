"""Transformer Engine layers (GPU with TE only): the TE model equals the local model, same weights.

    PYTHONPATH=. python -m pytest tests/test_transformer_engine.py -q
"""

import pytest
import torch

from megatron_lasp.testing import spawn

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

# Local parameter name -> TE name: TE fuses the pre-norms into the next linear (models/README.md).
_TE_NAMES = {
    "input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
    "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight",
}


def _te_name(name: str) -> str:
    for local, te in _TE_NAMES.items():
        name = name.replace(local, te)
    return name


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def _te_equals_local(rank, world_size):
    from megatron_lasp.models import build_linear_lm, linear_lm_config
    from megatron_lasp.parallel import initialize_parallel

    torch.backends.cuda.matmul.allow_tf32 = False
    initialize_parallel(1, 1, 1, seed=0)
    local = build_linear_lm(linear_lm_config("tiny"), 128).cuda()
    te = build_linear_lm(linear_lm_config("tiny", transformer_impl="transformer_engine"), 128).cuda()
    weights = {_te_name(k): v for k, v in local.state_dict().items() if not k.endswith("_extra_state")}
    missing, unexpected = te.load_state_dict(weights, strict=False)
    assert not unexpected, f"TE model lacks {unexpected}"
    assert all(k.endswith("_extra_state") for k in missing), f"TE parameters not set from the local model: {missing}"
    torch.manual_seed(0)
    ids = torch.randint(0, 128, (2, 128), device="cuda")
    labels = torch.randint(0, 128, (2, 128), device="cuda")
    losses = {}
    for name, model in (("local", local), ("te", te)):
        loss = model(ids, labels=labels)
        loss.mean().backward()
        losses[name] = loss.detach()
    errors = {"loss": _rel(losses["te"], losses["local"])}
    te_params = dict(te.named_parameters())
    for name, p in local.named_parameters():
        errors[name] = _rel(te_params[_te_name(name)].grad, p.grad)
    return errors


def test_te_model_equals_local_model():
    pytest.importorskip("transformer_engine")
    errors = spawn(_te_equals_local, 1)[0]
    bad = {k: e for k, e in errors.items() if not e < 1e-3}
    assert not bad, f"TE model differs from the local model (relative error): {bad}"
