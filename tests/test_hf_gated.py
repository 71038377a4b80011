"""The Hugging Face model with a per-token gate (``linear_attention_gate`` mamba2 / gla).

- the chunked and the recurrent forms against the op's fp64 token-by-token reference, with per-token
  gates, an initial state, packed documents and long spans of strong decay;
- the gate's math and Mamba2's init in the HF model;
- generation: the recurrent step (the new token's gate applied to the state) gives the tokens and
  logits of the full forward, O(1) state per token, left padding.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from test_hf_conversion import assert_left_padding_generates_like_single_prompts

GATES = ("mamba2", "gla")
TOL = 1e-5


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("T,chunk,docs,strong", [(1, 4, False, False), (37, 8, False, False), (64, 16, True, False),
                                                 (50, 64, True, False), (96, 16, False, True)],
                         ids=["T1", "T37-c8", "T64-c16-docs", "T50-c64-docs", "T96-c16-strong"])
def test_gated_forms_equal_the_fp64_recurrence(T, chunk, docs, strong):
    from megatron_lasp.hf.modeling_linear_lm import chunk_linear_attention, recurrent_linear_attention
    from megatron_lasp.ops.lightning_attn import doc_ids_from_cu_seqlens, naive_recurrent_lightning_attn

    torch.manual_seed(T + chunk)
    B, H, Dk, Dv = 2, 3, 8, 12
    q, k, v = torch.randn(B, H, T, Dk), torch.randn(B, H, T, Dk), torch.randn(B, H, T, Dv)
    g = -F.softplus(torch.randn(B, H, T)) * (30.0 if strong else 1.0)  # strong: exp(g) ~ 1e-13 per token
    s0 = torch.randn(B, H, Dk, Dv)
    cu = torch.tensor([0, T // 3 + 1, T + 5, 2 * T]) if docs and T > 8 else None
    doc_ids = doc_ids_from_cu_seqlens(cu, B, T, q.device) if cu is not None else None
    bthd = lambda t: t.transpose(1, 2).double()  # noqa: E731 - the op's [B, T, H, D] layout
    o_ref, s_ref = naive_recurrent_lightning_attn(bthd(q), bthd(k), bthd(v), None, s0.double(), True, cu,
                                                  g=g.transpose(1, 2).double())
    o_ref = o_ref.transpose(1, 2)
    o_chk, s_chk = chunk_linear_attention(q, k, v, None, s0, chunk_size=chunk, doc_ids=doc_ids, g=g)
    assert torch.isfinite(o_chk).all() and torch.isfinite(s_chk).all()
    assert _rel_err(o_chk, o_ref) < TOL and _rel_err(s_chk, s_ref) < TOL
    if doc_ids is None:  # the recurrent step (generation) knows no documents
        o_rec, s_rec = recurrent_linear_attention(q, k, v, None, s0, g=g)
        assert _rel_err(o_rec, o_ref) < TOL and _rel_err(s_rec, s_ref) < TOL


def _model(gate: str, **overrides):
    from megatron_lasp.hf.configuration_linear_lm import LaspLinearLMConfig
    from megatron_lasp.hf.modeling_linear_lm import LaspLinearLMForCausalLM

    config = LaspLinearLMConfig(chunk_size=8, initializer_range=0.2, linear_attention_gate=gate, **overrides)
    model = LaspLinearLMForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "decay_proj.bias" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("gate", GATES)
def test_gate_parameters_math_and_init(gate):
    torch.manual_seed(0)
    config_kw = dict(num_attention_heads=4, num_hidden_layers=1)
    model = _model(gate, **config_kw, **({"gate_logit_normalizer": 8.0} if gate == "gla" else {}))
    attn = model.model.layers[0].attn
    names = {n for n, _ in model.named_parameters() if "decay_proj" in n or "A_log" in n or "dt_bias" in n}
    want = {"model.layers.0.attn.decay_proj.weight"}
    want |= {"model.layers.0.attn.A_log", "model.layers.0.attn.dt_bias"} if gate == "mamba2" else {
        "model.layers.0.attn.decay_proj.bias"}
    assert names == want
    x = torch.randn(2, 5, model.config.hidden_size)
    raw = x @ attn.decay_proj.weight.t()
    if gate == "mamba2":
        expected = -attn.A_log.exp() * F.softplus(raw + attn.dt_bias)
        # Mamba2's init: A in [1, 16], softplus(dt_bias) in [1e-3, 1e-1]
        big = _model("mamba2", num_attention_heads=64, hidden_size=256, num_hidden_layers=1).model.layers[0].attn
        a, dt = big.A_log.exp(), F.softplus(big.dt_bias)
        assert 1.0 <= a.min() and a.max() <= 16.0 and a.max() - a.min() > 10
        assert 1e-3 * 0.999 <= dt.min() and dt.max() <= 0.1 * 1.001 and dt.max() / dt.min() > 10
    else:
        expected = F.logsigmoid(raw + attn.decay_proj.bias) / 8.0
    assert _rel_err(attn.log_decay(x), expected) < 1e-6


@pytest.mark.parametrize("gate", GATES)
def test_gated_generation_steps_the_state(gate):
    model = _model(gate, eos_token_id=None)
    ids = torch.randint(0, 128, (3, 29))
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        first = model(ids[:, :13], use_cache=True)
        cache = first.cache
        second = model(ids[:, 13:20], cache=cache, use_cache=True)
        steps = [model(ids[:, t : t + 1], cache=cache, use_cache=True).logits for t in range(20, 29)]
        pieces = torch.cat([first.logits, second.logits] + steps, dim=1)
        assert _rel_err(pieces, full) < TOL
        for layer in range(model.config.num_hidden_layers):  # O(1): one [B, H, D, D] fp32 state per layer
            state = cache.get_state(layer)
            assert state.dtype == torch.float32 and state.shape == (3, 4, 16, 16)
        prompt = ids[:2, :17]
        cached = model.generate(prompt, max_new_tokens=8, do_sample=False, min_new_tokens=8)
        uncached = model.generate(prompt, max_new_tokens=8, do_sample=False, min_new_tokens=8, use_cache=False)
    assert torch.equal(cached, uncached)


@pytest.mark.parametrize("gate", GATES)
def test_gated_left_padding_generates_like_single_prompts(gate):
    assert_left_padding_generates_like_single_prompts(_model(gate, pad_token_id=0, eos_token_id=None))


def test_gate_config_is_checked():
    from megatron_lasp.hf.configuration_linear_lm import LaspLinearLMConfig

    with pytest.raises(ValueError, match="linear_attention_gate must be one of none, mamba2, gla"):
        LaspLinearLMConfig(linear_attention_gate="retnet")
    with pytest.raises(ValueError, match="gate_logit_normalizer"):
        LaspLinearLMConfig(linear_attention_gate="gla", gate_logit_normalizer=-1.0)
    assert math.isclose(LaspLinearLMConfig().gate_logit_normalizer, 16.0)
