"""Gated DeltaNet layers and Hugging Face: checkpoint -> HF -> checkpoint, the HF model's logits and
its generation.

- the HF model's chunked and recurrent delta rule against the op's fp64 token-by-token reference
  (initial state, packed documents, several block sizes);
- a 2-rank spawn trains one step of a tiny hybrid with Gated DeltaNet layers (``L*L``, GVA, Dk !=
  Dv, 3 convolution taps, biases) at TP 2 with TP sequence parallelism and saves it; a 1-rank spawn
  loads it at TP 1, converts it to an HF directory and back: the round trip is bitwise, the HF
  model (``AutoModelForCausalLM``, ``trust_remote_code``) gives the megatron logits, with and
  without packed documents;
- generation: a prompt then single tokens through the cache (the state and the convolution's last
  inputs) gives the logits of the full forward, ``generate`` with the cache gives the tokens of the
  uncached greedy loop, beams and left padding too.
"""

import json
import os

import pytest
import torch
import torch.nn.functional as F

from megatron_lasp.testing import spawn

os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENIZER = os.path.join(REPO, "examples", "data", "tokenizer")
TOL = 1e-5
SEQ = 24
DOCS = torch.tensor([0, 5, 6, 17, 24, 30, 48], dtype=torch.int32)  # over the 2 x SEQ tokens
FLAGS = [
    "--model-preset", "tiny", "--num-layers", "3", "--hybrid-layer-pattern", "L*L", "--num-query-groups", "2",
    "--linear-attention-type", "gated_delta_net", "--linear-num-key-heads", "2", "--linear-num-value-heads", "4",
    "--linear-key-head-dim", "12", "--linear-value-head-dim", "16", "--linear-conv-kernel-dim", "3",
    "--add-bias-linear", "--seq-length", "32", "--micro-batch-size", "1", "--train-iters", "1", "--mock-data",
    "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", TOKENIZER, "--make-vocab-size-divisible-by", "8",
    "--eval-interval", "0", "--lr", "1e-2",
]


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


# ---------------------------------------------------------------------------------------------
# the HF model's delta rule


@pytest.mark.parametrize("T,chunk,docs", [(1, 4, False), (37, 8, False), (64, 16, True), (50, 64, True)],
                         ids=["T1", "T37-c8", "T64-c16-docs", "T50-c64-docs"])
def test_hf_delta_rule_forms_equal_the_fp64_recurrence(T, chunk, docs):
    from megatron_lasp.hf.modeling_linear_lm import chunk_gated_delta_rule, recurrent_gated_delta_rule
    from megatron_lasp.ops.delta_rule import naive_recurrent_gated_delta_rule
    from megatron_lasp.ops.lightning_attn import doc_ids_from_cu_seqlens

    torch.manual_seed(T + chunk)
    B, H, Dk, Dv = 2, 3, 8, 12
    q, v = torch.randn(B, H, T, Dk), torch.randn(B, H, T, Dv)
    k = F.normalize(torch.randn(B, H, T, Dk), dim=-1)
    g, beta = -F.softplus(torch.randn(B, H, T)), torch.sigmoid(torch.randn(B, H, T))
    s0 = torch.randn(B, H, Dk, Dv)
    cu = torch.tensor([0, T // 3 + 1, T + 5, 2 * T]) if docs else None
    doc_ids = doc_ids_from_cu_seqlens(cu, B, T, q.device) if cu is not None else None
    bthd = lambda t: t.transpose(1, 2).double()  # noqa: E731 - the op's [B, T, H, ...] layout
    o_ref, s_ref = naive_recurrent_gated_delta_rule(bthd(q), bthd(k), bthd(v), bthd(g), bthd(beta), scale=1.0,
                                                    initial_state=s0.double(), output_final_state=True, cu_seqlens=cu)
    o_ref = o_ref.transpose(1, 2)
    o, s = chunk_gated_delta_rule(q, k, v, g, beta, s0, chunk_size=chunk, doc_ids=doc_ids)
    assert _rel(o, o_ref) < TOL and _rel(s, s_ref) < TOL
    if doc_ids is None:  # the recurrent step (generation) knows no documents
        o, s = recurrent_gated_delta_rule(q, k, v, g, beta, s0)
        assert _rel(o, o_ref) < TOL and _rel(s, s_ref) < TOL


def test_hf_config_is_checked():
    from megatron_lasp.hf.configuration_linear_lm import LaspLinearLMConfig

    c = LaspLinearLMConfig(linear_attention_type="gated_delta_net", num_attention_heads=4, hidden_size=64)
    assert (c.linear_conv_kernel_dim, c.linear_key_head_dim, c.linear_value_head_dim, c.linear_num_key_heads,
            c.linear_num_value_heads) == (4, 16, 16, 4, 4)
    assert LaspLinearLMConfig().linear_num_key_heads is None
    with pytest.raises(ValueError, match="linear_attention_type must be one of lightning, gated_delta_net"):
        LaspLinearLMConfig(linear_attention_type="mamba")
    with pytest.raises(ValueError, match=r"linear_num_value_heads \(6\) must be a multiple"):
        LaspLinearLMConfig(linear_attention_type="gated_delta_net", linear_num_value_heads=6)


# ---------------------------------------------------------------------------------------------
# conversion


def _train(rank, world_size, root):
    from megatron_lasp.training import main

    main(FLAGS + ["--tensor-model-parallel-size", "2", "--sequence-parallel", "--save", root], destroy=False)


def _convert(rank, world_size, root, hf_dir, back_dir):
    from megatron.core.packed_seq_params import PackedSeqParams

    from megatron_lasp.checkpoint.io import load_model_for_inference
    from megatron_lasp.hf.from_hf import convert_hf_to_checkpoint
    from megatron_lasp.hf.to_hf import convert_checkpoint_to_hf

    torch.set_num_threads(1)  # the two models' forwards split their sums alike (see test_hybrid_hf.py)
    ids = torch.randint(0, 100, (2, SEQ), generator=torch.Generator().manual_seed(0))
    packed = PackedSeqParams(qkv_format="sbhd", cu_seqlens_q=DOCS, cu_seqlens_kv=DOCS)
    original, config, _ = load_model_for_inference(root, device="cpu")
    convert_checkpoint_to_hf(root, hf_dir)
    convert_hf_to_checkpoint(hf_dir, back_dir)
    back, back_config, _ = load_model_for_inference(back_dir, device="cpu")
    with torch.no_grad():
        return dict(ids=ids, logits=original(ids), back=back(ids), docs=original(ids, packed_seq_params=packed),
                    back_docs=back(ids, packed_seq_params=packed), type=back_config.linear_attention_type,
                    sizes=(back_config.linear_num_key_heads, back_config.linear_num_value_heads,
                           back_config.linear_key_head_dim, back_config.linear_value_head_dim,
                           back_config.linear_conv_kernel_dim))


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    base = tmp_path_factory.mktemp("delta_net_hf")
    root, hf_dir, back = str(base / "ckpt"), str(base / "hf"), str(base / "back")
    spawn(_train, 2, (root,), timeout=600)
    (out,) = spawn(_convert, 1, (root, hf_dir, back), timeout=600)
    return out, hf_dir


def _hf(directory):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=True, dtype=torch.float32).eval()


def test_round_trip_and_hf_logits(converted):
    out, hf_dir = converted
    assert out["type"] == "gated_delta_net" and out["sizes"] == (2, 4, 12, 16, 3)
    assert _rel(out["back"], out["logits"]) == 0.0 and _rel(out["back_docs"], out["docs"]) == 0.0
    with open(os.path.join(hf_dir, "config.json")) as f:
        cfg = json.load(f)
    assert cfg["linear_attention_type"] == "gated_delta_net" and cfg["linear_conv_kernel_dim"] == 3
    assert cfg["layer_types"] == ["linear_attention", "full_attention", "linear_attention"]
    with open(os.path.join(hf_dir, "README.md")) as f:
        assert "Gated DeltaNet" in f.read()
    model = _hf(hf_dir)
    names = {n for n, _ in model.named_parameters() if n.startswith("model.layers.0.attn.")}
    parts = {f"{p}_proj.{w}" for p in "qkvgba" for w in ("weight", "bias")} | {f"{p}_conv1d.weight" for p in "qkv"}
    assert names == {f"model.layers.0.attn.{n}" for n in parts | {"A_log", "dt_bias", "o_norm.weight",
                                                                   "o_proj.weight", "o_proj.bias"}}
    vocab = out["logits"].shape[-1]
    with torch.no_grad():
        logits = model(out["ids"]).logits
        packed = model(out["ids"], cu_seqlens=DOCS).logits
    assert _rel(logits[..., :vocab], out["logits"]) < TOL
    assert _rel(packed[..., :vocab], out["docs"]) < TOL
    assert _rel(out["docs"], out["logits"]) > 1e-3  # the documents matter


# ---------------------------------------------------------------------------------------------
# generation


def _random_model(**overrides):
    from megatron_lasp.hf.configuration_linear_lm import LaspLinearLMConfig
    from megatron_lasp.hf.modeling_linear_lm import LaspLinearLMForCausalLM

    torch.manual_seed(0)
    config = LaspLinearLMConfig(chunk_size=8, initializer_range=0.2, linear_attention_type="gated_delta_net",
                                linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=12,
                                linear_value_head_dim=16, **overrides)
    model = LaspLinearLMForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def test_cached_steps_equal_the_full_forward():
    model = _random_model(eos_token_id=None)
    ids = torch.randint(0, 128, (3, 29))
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        first = model(ids[:, :13], use_cache=True)
        cache = first.cache
        second = model(ids[:, 13:20], cache=cache, use_cache=True)
        steps = [model(ids[:, t:t + 1], cache=cache, use_cache=True).logits for t in range(20, 29)]
    assert _rel(torch.cat([first.logits, second.logits] + steps, dim=1), full) < TOL
    for layer in range(model.config.num_hidden_layers):  # O(1) per layer: the state and K - 1 inputs
        assert cache.get_state(layer).shape == (3, 4, 12, 16) and cache.get_state(layer).dtype == torch.float32
        assert cache.get_conv_state(layer).shape == (3, 3, 2 * 2 * 12 + 4 * 16)
    assert cache.is_linear == [True, True]


def test_generate_with_cache_equals_the_uncached_loop():
    from test_hf_conversion import assert_left_padding_generates_like_single_prompts

    model = _random_model(eos_token_id=None)
    prompt = torch.randint(0, 128, (2, 11))
    with torch.no_grad():
        cached = model.generate(prompt, max_new_tokens=8, do_sample=False, min_new_tokens=8)
        plain = prompt
        for _ in range(8):
            plain = torch.cat([plain, model(plain, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        beams = model.generate(prompt, max_new_tokens=5, num_beams=3, do_sample=False)
        beams_uncached = model.generate(prompt, max_new_tokens=5, num_beams=3, do_sample=False, use_cache=False)
    assert torch.equal(cached, plain)
    assert torch.equal(beams, beams_uncached)
    assert_left_padding_generates_like_single_prompts(_random_model(pad_token_id=0, eos_token_id=None))


def test_hf_generation_of_the_converted_hybrid(converted):
    out, hf_dir = converted
    model = _hf(hf_dir)
    prompt = out["ids"][:, :7]
    with torch.no_grad():
        cached = model.generate(prompt, max_new_tokens=6, do_sample=False)
        plain = prompt
        for _ in range(6):
            plain = torch.cat([plain, model(plain, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        step = model(prompt, use_cache=True)
    assert torch.equal(cached, plain)
    cache = step.cache if getattr(step, "cache", None) is not None else step.past_key_values
    assert cache.is_linear == [True, False, True]
    assert cache.get_conv_state(0).shape == (2, 2, 2 * 2 * 12 + 4 * 16)
