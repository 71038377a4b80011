"""Hybrid models and Hugging Face: checkpoint -> HF -> checkpoint, and the HF model's generation.

A 2-rank spawn trains one step of a tiny hybrid (``--hybrid-layer-pattern L*L``, GQA with 2
key/value heads) at TP 2 and saves it; a 1-rank spawn loads it at TP 1, converts it to an HF
directory and back, and returns the logits of both megatron models. Here the HF model (loaded with
``AutoModelForCausalLM``, ``trust_remote_code``) must give the same logits, name its layers in
``layer_types``, and generate with its cache (a key/value ``DynamicLayer`` for the softmax layer,
the O(1) state for the linear ones) what it generates without one, padded or not.
"""

import json
import os

import pytest
import torch

from megatron_lasp.testing import spawn

os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENIZER = os.path.join(REPO, "examples", "data", "tokenizer")
TOL = 1e-5
SEQ = 24
FLAGS = [
    "--model-preset", "tiny", "--num-layers", "3", "--hybrid-layer-pattern", "L*L", "--num-query-groups", "2",
    "--seq-length", "32", "--micro-batch-size", "1", "--train-iters", "1", "--mock-data",
    "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", TOKENIZER, "--make-vocab-size-divisible-by", "8",
    "--eval-interval", "0", "--lr", "1e-2",
]


def _train(rank, world_size, root):
    from megatron_lasp.training import main

    main(FLAGS + ["--tensor-model-parallel-size", "2", "--sequence-parallel", "--save", root], destroy=False)


def _convert(rank, world_size, root, hf_dir, back_dir):
    from megatron_lasp.checkpoint.io import load_model_for_inference
    from megatron_lasp.hf.from_hf import convert_hf_to_checkpoint
    from megatron_lasp.hf.to_hf import convert_checkpoint_to_hf

    # one thread: the two models' forwards then split their sums the same way (with several, the
    # BLAS may pick another split under load, and the "same bits" below saw 1e-5 on a CI machine)
    torch.set_num_threads(1)
    ids = torch.randint(0, 100, (2, SEQ), generator=torch.Generator().manual_seed(0))
    original, config, _ = load_model_for_inference(root, device="cpu")
    convert_checkpoint_to_hf(root, hf_dir)
    convert_hf_to_checkpoint(hf_dir, back_dir)
    back, back_config, _ = load_model_for_inference(back_dir, device="cpu")
    with torch.no_grad():
        return dict(ids=ids, logits=original(ids), back=back(ids), pattern=back_config.hybrid_layer_pattern,
                    groups=back_config.num_query_groups)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    base = tmp_path_factory.mktemp("hybrid_hf")
    root, hf_dir, back = str(base / "ckpt"), str(base / "hf"), str(base / "back")
    spawn(_train, 2, (root,), timeout=600)
    (out,) = spawn(_convert, 1, (root, hf_dir, back), timeout=600)
    return out, hf_dir


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _hf(directory):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=True, dtype=torch.float32).eval()


def test_round_trip_and_hf_logits(converted):
    out, hf_dir = converted
    assert out["pattern"] == "L*L" and out["groups"] == 2
    assert _rel(out["back"], out["logits"]) == 0.0
    with open(os.path.join(hf_dir, "config.json")) as f:
        cfg = json.load(f)
    assert cfg["layer_types"] == ["linear_attention", "full_attention", "linear_attention"]
    assert cfg["num_key_value_heads"] == 2
    model = _hf(hf_dir)
    with torch.no_grad():
        logits = model(out["ids"]).logits
    vocab = out["logits"].shape[-1]
    assert _rel(logits[..., :vocab], out["logits"]) < TOL


def test_hf_generation_with_cache(converted):
    out, hf_dir = converted
    model = _hf(hf_dir)
    prompt = out["ids"][:, :7]
    with torch.no_grad():
        cached = model.generate(prompt, max_new_tokens=6, do_sample=False)
        plain = prompt
        for _ in range(6):
            nxt = model(plain, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            plain = torch.cat([plain, nxt], dim=1)
        assert torch.equal(cached, plain)
        # a left-padded row generates what it generates alone
        pad = torch.zeros(1, 3, dtype=torch.long)
        padded = model.generate(torch.cat([pad, prompt[1:]], 1), attention_mask=torch.cat([pad, torch.ones(1, 7,
                                dtype=torch.long)], 1), max_new_tokens=6, do_sample=False)
        assert torch.equal(padded[0, -6:], cached[1, -6:])
        # the cache holds keys/values for the softmax layer and a state for the linear ones
        step = model(prompt, use_cache=True)
        cache = step.cache if getattr(step, "cache", None) is not None else step.past_key_values
        assert cache.is_linear == [True, False, True]
        assert tuple(cache.layers[1].keys.shape) == (2, 2, 7, 16)
