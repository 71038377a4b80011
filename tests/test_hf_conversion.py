"""Hugging Face conversion: checkpoint -> HF -> checkpoint, the HF model's math and generation.

One 2-rank spawn trains one step with the training entry point and saves a checkpoint three times,
at TP=2, SP=2 and PP=2 (``--save``, megatron-core dist_checkpointing), returning each layout's
logits on fixed tokens. One 1-rank spawn converts the checkpoints to HF directories (one through the CLI's
``main``, one with a tiny ``--max-shard-size`` so that the weights are sharded with an index),
converts one back to a checkpoint, reloads it through the training package (``load_model_for_
inference`` and ``--load --finetune``) and writes HF directories of directly built model variants.
The assertions then run here, on the HF models loaded with ``AutoModelForCausalLM`` (pure
PyTorch, ``trust_remote_code``). Pure-HF tests (recurrent vs chunked form, cached vs uncached
generation, padding) need no spawn. CLI error paths run as subprocesses (no torch import).
"""

from __future__ import annotations

import ast
import json
import os
import random
import subprocess
import sys

import pytest
import torch

from megatron_lasp.testing import spawn

os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENIZER = os.path.join(REPO, "examples", "data", "tokenizer")
TOL = 1e-5  # relative (norm-wise) logits error: fp32 round-off is ~1e-7, a wrong weight is >> 1e-3
SEQ = 48
VARIANTS = {
    "tied-options": dict(
        share_embeddings_and_output_weights=True,
        output_gate=False,
        qk_feature_map="identity",
        glu_type="swiglu",
        attention_norm_group_size=2,
        decay_type="alibi",
        add_bias_linear=True,
    ),
    "nodecay-identity-v": dict(decay_type="none", v_feature_map="identity", num_layers=3),
    "gate-mamba2": dict(linear_attention_gate="mamba2"),
    "gate-gla-bias": dict(linear_attention_gate="gla", gate_logit_normalizer=8.0, add_bias_linear=True),
}
GATE = ["--linear-attention-gate", "mamba2"]  # the TP=2 run (and its round trip) is a gated model


@pytest.fixture(autouse=True)
def fresh_seed():
    """A new seed per test (torch's default seed is fixed); printed, so a failure can be replayed."""
    seed = random.SystemRandom().randrange(2**31)
    print(f"torch seed {seed}")
    torch.manual_seed(seed)


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


# ----------------------------------------------------------------------------------------------
# spawned work


def _train_and_save(rank, world_size, roots, seed):
    """Train 1 step and save at TP=2, then at SP=2; return each layout's logits on fixed ids."""
    from megatron_lasp.training import main
    from megatron_lasp.training.optim import unwrap_model

    common = [
        "--model-preset", "tiny", "--seq-length", "32", "--micro-batch-size", "1", "--train-iters", "1",
        "--mock-data", "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", TOKENIZER,
        "--make-vocab-size-divisible-by", "8", "--eval-interval", "0", "--seed", str(seed),
    ]
    import torch.distributed as dist

    layouts = {
        "tp2": ["--tensor-model-parallel-size", "2"] + GATE,
        "sp2": ["--sequence-parallel-size", "2"],
        "pp2": ["--pipeline-model-parallel-size", "2"],
    }
    out = {}
    for name, flags in layouts.items():
        state = main(common + flags + ["--save", roots[name]], destroy=False)
        model = unwrap_model(state.model).eval()
        gen = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, state.tokenizer.vocab_size, (2, SEQ), generator=gen)
        groups = state.groups
        chunk = SEQ // groups.cp.size()
        with torch.no_grad():
            if groups.pp.size() == 1:
                logits = model(ids[:, groups.cp.rank() * chunk : (groups.cp.rank() + 1) * chunk])  # [b, s/sp, V/tp]
            elif groups.pp.rank() == 0:  # world 2 = two stages: send the hidden states [s, b, h] on
                dist.send(model(ids).contiguous(), dst=1 - rank)
                logits = None
            else:
                hidden = torch.empty(SEQ, 2, state.model_config.hidden_size)
                dist.recv(hidden, src=1 - rank)
                model.set_input_tensor(hidden)
                logits = model(None)
        out[name] = dict(ids=ids, logits=logits, tp_rank=groups.tp.rank(), sp_rank=groups.cp.rank())
    return out


def _convert_all(rank, world_size, paths, seed):
    """Single process: every conversion, the reloads, and the directly built variants."""
    import importlib.util

    from megatron_lasp.checkpoint.io import load_model_for_inference
    from megatron_lasp.hf import mapping
    from megatron_lasp.hf.from_hf import convert_hf_to_checkpoint
    from megatron_lasp.hf.to_hf import convert_checkpoint_to_hf, write_hf_directory

    result = {}
    # checkpoint -> HF through the CLI's main (tokenizer from the checkpoint), and through the API
    script = os.path.join(REPO, "tools", "convert_checkpoint_to_hf.py")
    spec = importlib.util.spec_from_file_location("cli_to_hf", script)
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    result["cli_rc"] = cli.main(["--load", paths["tp2"], "--save", paths["hf_tp2"], "--max-shard-size", "40KB"])
    convert_checkpoint_to_hf(  # an iteration directory given directly
        os.path.join(paths["sp2"], "iter_0000001"), paths["hf_sp2"],
        tokenizer_settings={"tokenizer_type": "HuggingFaceTokenizer", "tokenizer_model": TOKENIZER},
    )
    convert_checkpoint_to_hf(paths["pp2"], paths["hf_pp2"])
    convert_checkpoint_to_hf(paths["pp2"], paths["hf_pp2_bf16"], dtype="bfloat16")
    # HF -> checkpoint, and both checkpoints back at TP=1 through the training package
    convert_hf_to_checkpoint(paths["hf_tp2"], paths["back"])
    original, _, _ = load_model_for_inference(paths["tp2"], device="cpu")
    back, _, saved_back = load_model_for_inference(paths["back"], device="cpu")
    result["original"] = {k: v.clone() for k, v in original.state_dict().items() if not k.endswith("_extra_state")}
    result["back"] = {k: v.clone() for k, v in back.state_dict().items() if not k.endswith("_extra_state")}
    result["back_config"] = {k: saved_back[k] for k in ("model", "padded_vocab_size", "tokenizer", "parallel")}

    # continue training from the converted checkpoint: the entry point's --load (weights only)
    from megatron_lasp.training.loop import setup
    from megatron_lasp.training.optim import unwrap_model

    state = setup([
        *GATE, "--model-preset", "tiny", "--seq-length", "32", "--train-iters", "1", "--mock-data",
        "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", paths["hf_tp2"],
        "--make-vocab-size-divisible-by", "8", "--load", paths["back"], "--finetune",
    ])
    resumed = unwrap_model(state.model).state_dict()
    result["resumed"] = {k: v.detach().clone() for k, v in resumed.items() if not k.endswith("_extra_state")}

    # model variants built directly (TP=1): logits of the megatron model + an HF directory
    from megatron_lasp.models import build_linear_lm, linear_lm_config

    result["variants"] = {}
    for name, fields in VARIANTS.items():
        torch.manual_seed(seed)
        config = linear_lm_config("tiny", use_cpu_initialization=True, **fields)
        model = build_linear_lm(config, 128).eval()
        with torch.no_grad():  # move norm weights and biases off their init values
            for p in model.parameters():
                p.add_(0.1 * torch.randn_like(p))
        ids = torch.randint(0, 128, (2, SEQ))
        with torch.no_grad():
            logits = model(ids)
        hf_kwargs = mapping.hf_config_kwargs(config, 128)
        tensors = mapping.megatron_to_hf_state_dict(model.state_dict(), hf_kwargs)
        directory = os.path.join(paths["variants"], name)
        os.makedirs(directory)
        write_hf_directory(directory, tensors, hf_kwargs)
        inverse = mapping.hf_to_megatron_state_dict(tensors, hf_kwargs)
        expected = {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
        if config.share_embeddings_and_output_weights:
            expected.pop("output_layer.weight", None)
        exact = set(inverse) == set(expected) and all(torch.equal(inverse[k], expected[k]) for k in expected)
        result["variants"][name] = dict(ids=ids, logits=logits, dir=directory, inverse_exact=exact)
    return result


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf_conversion")
    seed = random.SystemRandom().randrange(2**30)  # fresh weights and tokens every run
    print(f"spawned runs' seed {seed}")
    names = ("tp2", "sp2", "pp2", "hf_tp2", "hf_sp2", "hf_pp2", "hf_pp2_bf16", "back", "variants")
    paths = {name: str(root / name) for name in names}
    os.makedirs(paths["variants"])
    saved = spawn(_train_and_save, 2, args=({k: paths[k] for k in ("tp2", "sp2", "pp2")}, seed), timeout=400)
    logits = {}
    for name in ("tp2", "sp2", "pp2"):
        ranks = [r[name] for r in saved if r[name]["logits"] is not None]  # pp2: the last stage only
        ranks.sort(key=lambda r: (r["sp_rank"], r["tp_rank"]))
        dim = -1 if name == "tp2" else 1  # vocab-parallel TP shards / contiguous SP slices
        logits[name] = (ranks[0]["ids"], torch.cat([r["logits"] for r in ranks], dim=dim))
    result = spawn(_convert_all, 1, args=(paths, seed), init_process_group=False, timeout=400)[0]
    return dict(paths=paths, logits=logits, result=result)


def _load_hf(directory):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=True, dtype=torch.float32).eval()


# ----------------------------------------------------------------------------------------------
# checkpoint -> HF


@pytest.mark.parametrize("layout", ["tp2", "sp2", "pp2"])
def test_hf_logits_equal_megatron_logits(converted, layout):
    ids, reference = converted["logits"][layout]
    model = _load_hf(converted["paths"][f"hf_{layout}"])
    assert type(model).__name__ == "LaspLinearLMForCausalLM"
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == reference.shape
    assert _rel_err(logits, reference) < TOL
    with torch.no_grad():  # a wrong weight is far outside the tolerance
        model.model.layers[1].attn.o_norm.weight.mul_(1.01)
        assert _rel_err(model(ids).logits, reference) > 100 * TOL


def test_bf16_export(converted):
    from transformers import AutoModelForCausalLM

    directory = converted["paths"]["hf_pp2_bf16"]
    with open(os.path.join(directory, "config.json")) as f:
        assert json.load(f)["dtype"] == "bfloat16"
    model = AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=True).eval()
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    ids, reference = converted["logits"]["pp2"]
    with torch.no_grad():
        out = model(ids, use_cache=True)
    assert out.logits.dtype == torch.bfloat16 and out.cache.get_state(0).dtype == torch.float32
    assert _rel_err(out.logits.float(), reference) < 5e-2  # bf16 weights and activations


@pytest.mark.parametrize("name", list(VARIANTS))
def test_hf_logits_equal_megatron_logits_variants(converted, name):
    variant = converted["result"]["variants"][name]
    assert variant["inverse_exact"]
    model = _load_hf(variant["dir"])
    with torch.no_grad():
        logits = model(variant["ids"]).logits
    assert _rel_err(logits, variant["logits"]) < TOL
    if VARIANTS[name].get("share_embeddings_and_output_weights"):
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_cli_wrote_sharded_directory(converted):
    assert converted["result"]["cli_rc"] == 0
    directory = converted["paths"]["hf_tp2"]
    files = set(os.listdir(directory))
    with open(os.path.join(directory, "model.safetensors.index.json")) as f:
        index = json.load(f)
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and set(shards) <= files and "model.safetensors" not in files
    from safetensors import safe_open

    total, names = 0, set()
    for shard in shards:
        with safe_open(os.path.join(directory, shard), "pt") as f:
            for key in f.keys():
                t = f.get_tensor(key)
                total += t.numel() * t.element_size()
                names.add(key)
                assert index["weight_map"][key] == shard
    assert names == set(index["weight_map"]) and total == index["metadata"]["total_size"]
    model = _load_hf(directory)
    assert names == set(model.state_dict())
    assert not any(n.startswith(".") for n in os.listdir(os.path.dirname(directory)))  # no temp dirs left


def test_directory_contents(converted):
    directory = converted["paths"]["hf_sp2"]
    files = set(os.listdir(directory))
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "README.md",
            "configuration_linear_lm.py", "modeling_linear_lm.py"} <= files
    with open(os.path.join(directory, "config.json")) as f:
        config = json.load(f)
    assert config["auto_map"] == {
        "AutoConfig": "configuration_linear_lm.LaspLinearLMConfig",
        "AutoModel": "modeling_linear_lm.LaspLinearLMModel",
        "AutoModelForCausalLM": "modeling_linear_lm.LaspLinearLMForCausalLM",
    }
    assert config["vocab_size"] % 8 == 0 and config["megatron_lasp"]["parallel"]["context_parallel_size"] == 2
    from megatron_lasp.data.tokenizer import build_tokenizer

    ours = build_tokenizer("HuggingFaceTokenizer", tokenizer_model=TOKENIZER)
    with open(os.path.join(directory, "generation_config.json")) as f:
        generation = json.load(f)
    assert generation["eos_token_id"] == generation["bos_token_id"] == generation["pad_token_id"] == ours.eod
    from transformers import AutoTokenizer

    hf_tokenizer = AutoTokenizer.from_pretrained(directory, trust_remote_code=True)
    text = "Linear attention keeps a state of fixed size."
    assert hf_tokenizer(text)["input_ids"] == ours.tokenize(text)
    # the modeling code needs only torch and transformers
    for name in ("configuration_linear_lm.py", "modeling_linear_lm.py"):
        with open(os.path.join(directory, name)) as f:
            tree = ast.parse(f.read())
        roots = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                roots.update(a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                roots.add(node.module.split(".")[0])
        allowed = {"__future__", "math", "re", "typing", "torch", "transformers", "configuration_linear_lm"}
        assert roots <= allowed, roots


def _strings(obj):
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, dict):
        for key, value in obj.items():
            yield key
            yield from _strings(value)
    elif isinstance(obj, list):
        for value in obj:
            yield from _strings(value)


def test_export_is_portable_with_default_permissions(converted):
    root = os.path.dirname(converted["paths"]["tp2"])
    mask = os.umask(0o022)
    os.umask(mask)
    for layout in ("tp2", "sp2"):
        directory = converted["paths"][f"hf_{layout}"]
        with open(os.path.join(directory, "config.json")) as f:
            config = json.load(f)
        assert config["megatron_lasp"]["iteration"] == 1
        assert "source" not in config["megatron_lasp"]
        # no path of the converting machine: not the run directory, nothing absolute
        for text in _strings(config):
            assert root not in text and not text.startswith(os.sep), text
        assert os.stat(directory).st_mode & 0o777 == 0o777 & ~mask
        for name in os.listdir(directory):
            assert os.stat(os.path.join(directory, name)).st_mode & 0o777 == 0o666 & ~mask, name


def test_tokenizer_pads_left_and_pipeline_batches(converted):
    from transformers import AutoTokenizer, pipeline

    directory = converted["paths"]["hf_sp2"]
    tok = AutoTokenizer.from_pretrained(directory, trust_remote_code=True)
    model = _load_hf(directory)
    assert tok.pad_token_id == model.config.pad_token_id == model.generation_config.pad_token_id is not None
    assert tok.padding_side == "left" and tok.model_max_length >= 10**12
    prompts = ["Once upon a time", "The state of a linear attention layer has a fixed size"]
    batch = tok(prompts, padding=True, return_tensors="pt")
    lengths = batch["attention_mask"].sum(1)
    assert lengths[0] < lengths[1] and batch["attention_mask"][0, 0] == 0  # padded on the left
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=8, do_sample=False, min_new_tokens=8)
        for i, text in enumerate(prompts):
            single = model.generate(**tok([text], return_tensors="pt"), max_new_tokens=8, do_sample=False,
                                    min_new_tokens=8)
            assert torch.equal(out[i, -8:], single[0, -8:])
    gen = pipeline("text-generation", model=directory, trust_remote_code=True, dtype=torch.float32)
    kwargs = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, return_full_text=False)
    batched = gen(prompts, batch_size=2, **kwargs)
    one_by_one = [gen(text, **kwargs) for text in prompts]
    assert batched == one_by_one and all(r[0]["generated_text"] for r in batched)


def test_model_card_example_runs(converted, capsys):
    import re

    directory = converted["paths"]["hf_sp2"]
    with open(os.path.join(directory, "README.md")) as f:
        card = f.read()
    assert card.startswith("---\nlibrary_name: transformers\npipeline_tag: text-generation\n")
    name = os.path.basename(directory)
    assert f"# {name}\n" in card
    for needed in ("trust_remote_code=True", "accelerate", "transformers>=5.17", "## Architecture", "| layers | 2 |",
                   "Converted from iteration 1", "SP=2", "trained on sequences of 32 tokens", "HuggingFaceTokenizer"):
        assert needed in card, needed
    code = re.search(r"```python\n(.*?)```", card, flags=re.S).group(1)
    assert f'path = "{name}"' in code
    namespace = {}
    exec(compile(code.replace(f'path = "{name}"', f"path = {directory!r}"), "README.md", "exec"), namespace)
    texts = namespace["tokenizer"].batch_decode(namespace["out"], skip_special_tokens=True)
    assert texts[0].startswith("Once upon a time") and texts[1].startswith("The model"), texts
    prompt_width = namespace["inputs"]["input_ids"].shape[1]
    assert prompt_width < namespace["out"].shape[1] <= prompt_width + 20  # eos may stop it early
    assert repr(texts) in capsys.readouterr().out


def test_automodel_and_device_map(converted):
    from transformers import AutoModel

    directory = converted["paths"]["hf_sp2"]
    base, info = AutoModel.from_pretrained(directory, trust_remote_code=True, dtype=torch.float32,
                                           output_loading_info=True)
    base.eval()
    assert type(base).__name__ == "LaspLinearLMModel"
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    full = _load_hf_with_device_map(directory)
    ids = torch.randint(0, 2000, (2, 19))
    with torch.no_grad():
        hidden = base(ids).last_hidden_state
        reference = full.model(ids).last_hidden_state
        assert torch.equal(hidden, reference)
        assert _rel_err(full.lm_head(hidden), full(ids).logits) < 1e-7


def _load_hf_with_device_map(directory):
    from transformers import AutoModelForCausalLM

    pytest.importorskip("accelerate", reason="device_map needs accelerate: pip install -e '.[hf]'")
    model = AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=True, dtype=torch.float32,
                                                 device_map="cpu").eval()
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    return model


# ----------------------------------------------------------------------------------------------
# HF -> checkpoint


def test_round_trip_preserves_every_tensor(converted):
    original, back = converted["result"]["original"], converted["result"]["back"]
    assert set(original) == set(back) and len(original) > 10
    for name, tensor in original.items():
        assert back[name].dtype == tensor.dtype and torch.equal(back[name], tensor), name
    saved = converted["result"]["back_config"]
    assert saved["parallel"]["tensor_model_parallel_size"] == 1
    assert saved["tokenizer"]["tokenizer_type"] == "HuggingFaceTokenizer"
    back = converted["paths"]["back"]  # the source's iteration is kept
    with open(os.path.join(back, "latest_checkpointed_iteration.txt")) as f:
        assert f.read().strip() == "1"
    assert os.listdir(back) == ["latest_checkpointed_iteration.txt", "iter_0000001"] or sorted(os.listdir(back)) == [
        "iter_0000001", "latest_checkpointed_iteration.txt"]


def test_converted_checkpoint_loads_in_training(converted):
    original, resumed = converted["result"]["original"], converted["result"]["resumed"]
    assert set(original) == set(resumed)
    for name, tensor in original.items():
        assert torch.equal(resumed[name], tensor), name


# ----------------------------------------------------------------------------------------------
# generation


def test_generate_cached_equals_uncached(converted):
    model = _load_hf(converted["paths"]["hf_sp2"])
    prompt = torch.randint(0, 2000, (2, 37))
    lengths = []
    hook = model.model.register_forward_pre_hook(
        lambda module, args, kwargs: lengths.append(kwargs["input_ids"].shape[1]), with_kwargs=True
    )
    with torch.no_grad():
        cached = model.generate(prompt, max_new_tokens=12, do_sample=False, min_new_tokens=12)
        steps_cached = list(lengths)
        uncached = model.generate(prompt, max_new_tokens=12, do_sample=False, min_new_tokens=12, use_cache=False)
    hook.remove()
    assert cached.shape == (2, 37 + 12)
    assert torch.equal(cached, uncached)
    assert steps_cached == [37] + [1] * 11  # prefill once, then one token per step from the state
    assert lengths[len(steps_cached):] == list(range(37, 37 + 12))


def _random_hf_model(**overrides):
    from megatron_lasp.hf.configuration_linear_lm import LaspLinearLMConfig
    from megatron_lasp.hf.modeling_linear_lm import LaspLinearLMForCausalLM

    config = LaspLinearLMConfig(chunk_size=8, initializer_range=0.2, **overrides)
    model = LaspLinearLMForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def test_cache_holds_fp32_states_and_continues_prefill():
    model = _random_hf_model()
    ids = torch.randint(0, 128, (3, 29))
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        first = model(ids[:, :13], use_cache=True)
        cache = first.cache
        second = model(ids[:, 13:20], cache=cache, use_cache=True)  # a multi-token chunk after a cache
        steps = [model(ids[:, t : t + 1], cache=cache, use_cache=True).logits for t in range(20, 29)]
    pieces = torch.cat([first.logits, second.logits] + steps, dim=1)
    assert _rel_err(pieces, full) < TOL
    assert cache.get_seq_length() == 29
    config = model.config
    for layer in range(config.num_hidden_layers):
        state = cache.get_state(layer)
        assert state.dtype == torch.float32
        assert state.shape == (3, config.num_attention_heads, config.head_dim, config.head_dim)


def assert_left_padding_generates_like_single_prompts(model) -> None:
    """Two prompts of different lengths, left-padded into one batch, generate (greedy) what each
    generates alone."""
    prompts = [torch.randint(1, 128, (n,)) for n in (9, 14)]
    width = max(len(p) for p in prompts)
    ids = torch.zeros(2, width, dtype=torch.long)
    mask = torch.zeros(2, width, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = p
        mask[i, width - len(p):] = 1
    with torch.no_grad():
        batch = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
        for i, p in enumerate(prompts):
            single = model.generate(p[None], max_new_tokens=6, do_sample=False)
            assert torch.equal(batch[i, width:], single[0, len(p):])


def test_left_padded_batch_generates_like_single_prompts():
    assert_left_padding_generates_like_single_prompts(_random_hf_model(pad_token_id=0, eos_token_id=None))


def test_generate_resumes_from_returned_cache():
    model = _random_hf_model(eos_token_id=None)
    ids = torch.randint(0, 128, (2, 10))
    with torch.no_grad():
        first = model.generate(ids, max_new_tokens=5, do_sample=False, return_dict_in_generate=True)
        assert first.cache.get_seq_length() == 14  # the last token is not fed yet
        full = torch.cat([first.sequences, torch.randint(0, 128, (2, 3))], dim=1)
        resumed = model.generate(full, cache=first.cache, max_new_tokens=6, do_sample=False)
        fresh = model.generate(full, max_new_tokens=6, do_sample=False, use_cache=False)
    assert torch.equal(resumed, fresh)


def test_beam_search_and_sampled_sequences_run():
    model = _random_hf_model(eos_token_id=None)
    ids = torch.randint(0, 128, (2, 11))
    with torch.no_grad():
        beams = model.generate(ids, max_new_tokens=5, num_beams=3, do_sample=False)
        beams_uncached = model.generate(ids, max_new_tokens=5, num_beams=3, do_sample=False, use_cache=False)
        sampled = model.generate(ids, max_new_tokens=5, do_sample=True, num_return_sequences=2)
    assert torch.equal(beams, beams_uncached)
    assert sampled.shape == (4, 16)


# ----------------------------------------------------------------------------------------------
# the linear attention forms


@pytest.mark.parametrize("T,chunk", [(1, 4), (37, 8), (64, 16), (50, 64)], ids=lambda v: str(v))
def test_chunked_equals_recurrent_equals_quadratic(T, chunk):
    from megatron_lasp.hf.modeling_linear_lm import chunk_linear_attention, recurrent_linear_attention

    B, H, Dk, Dv = 2, 4, 8, 12
    q, k = torch.randn(B, H, T, Dk), torch.randn(B, H, T, Dk)
    v = torch.randn(B, H, T, Dv)
    slopes = torch.tensor([0.0, 0.05, 0.5, 2.0])
    s0 = torch.randn(B, H, Dk, Dv)
    o_rec, s_rec = recurrent_linear_attention(q, k, v, slopes, s0)
    o_chk, s_chk = chunk_linear_attention(q, k, v, slopes, s0, chunk_size=chunk)
    # quadratic form in fp64: o_t = sum_{s<=t} lam^(t-s) (q_t.k_s) v_s + lam^(t+1) q_t S0
    lam = torch.exp(-slopes.double()).view(1, H, 1, 1)
    t = torch.arange(T, dtype=torch.float64)
    diff = t[:, None] - t[None, :]
    decay = torch.where(diff >= 0, lam ** diff.clamp(min=0), torch.zeros((), dtype=torch.float64))
    o_ref = ((q.double() @ k.double().transpose(-1, -2)) * decay) @ v.double()
    o_ref += lam ** (t + 1).view(1, 1, T, 1) * (q.double() @ s0.double())
    w = lam ** (T - 1 - t).view(1, 1, T, 1)
    s_ref = lam ** T * s0.double() + (k.double() * w).transpose(-1, -2) @ v.double()
    for o in (o_rec, o_chk):
        assert _rel_err(o, o_ref) < 1e-5
    for s in (s_rec, s_chk):
        assert s.dtype == torch.float32 and _rel_err(s, s_ref) < 1e-5


def test_slopes_match_megatron_definition():
    from megatron_lasp.hf.configuration_linear_lm import LaspLinearLMConfig
    from megatron_lasp.hf.modeling_linear_lm import layer_slopes
    from megatron_lasp.models import layer_slopes as megatron_layer_slopes
    from megatron_lasp.models import linear_lm_config

    for heads, layers, decay in ((8, 5, "tnl"), (6, 1, "tnl"), (12, 3, "alibi"), (4, 2, "none")):
        hf = LaspLinearLMConfig(
            num_attention_heads=heads, hidden_size=16 * heads, num_hidden_layers=layers, decay_type=decay
        )
        mg = linear_lm_config("tiny", num_attention_heads=heads, hidden_size=16 * heads, num_layers=layers,
                              decay_type=decay, use_cpu_initialization=True)
        for layer in range(layers):
            assert torch.equal(layer_slopes(hf, layer), megatron_layer_slopes(mg, layer + 1))


def test_converter_model_type_is_the_configs():
    from megatron_lasp.hf import files
    from megatron_lasp.hf.configuration_linear_lm import LaspLinearLMConfig

    assert files.MODEL_TYPE == LaspLinearLMConfig.model_type  # the converter avoids importing transformers


def test_parse_size():
    from megatron_lasp.hf.files import ConversionError, parse_size

    assert parse_size("5GB") == 5 * 10**9 and parse_size("2GiB") == 2 * 2**30
    assert parse_size("40KB") == 40000 and parse_size("123") == 123 and parse_size("1.5MB") == 1500000
    for bad in ("", "five", "0", "5XB"):
        with pytest.raises(ConversionError):
            parse_size(bad)


# ----------------------------------------------------------------------------------------------
# command-line errors: one line, non-zero exit, before torch is imported


def _cli(script, *args):
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "tools", script), *args],
        capture_output=True, text=True, timeout=120, cwd=REPO,
    )
    return proc.returncode, proc.stderr.strip().splitlines()


def test_cli_errors(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    ckpt = tmp_path / "ckpt"
    (ckpt / "iter_0000003").mkdir(parents=True)
    (ckpt / "iter_0000003" / "config.json").write_text("{}")
    (ckpt / "latest_checkpointed_iteration.txt").write_text("3\n")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("x")
    out = str(tmp_path / "out")
    cases = [
        (["--load", str(tmp_path / "missing"), "--save", out], "does not exist"),
        (["--load", str(empty), "--save", out], "no checkpoint found"),
        (["--load", str(ckpt), "--iteration", "7", "--save", out], "iteration 7 not found in"),
        (["--load", str(ckpt), "--save", str(busy)], "not empty (use --force"),
        (["--load", str(ckpt), "--save", out, "--tokenizer-type", "HuggingFaceTokenizer"],
         "--tokenizer-model is required"),
        (["--load", str(ckpt), "--save", out, "--tokenizer-type", "HuggingFaceTokenizer",
          "--tokenizer-model", str(tmp_path / "nope")], "tokenizer:"),
        (["--load", str(ckpt), "--save", out, "--max-shard-size", "lots"], "--max-shard-size"),
        (["--load", str(ckpt / "iter_0000003"), "--iteration", "5", "--save", out], "contradicts"),
        (["--load", str(ckpt), "--save", out], "is damaged:"),  # the layout is right, the content is not
    ]
    for args, expected in cases:
        rc, lines = _cli("convert_checkpoint_to_hf.py", *args)
        assert rc == 1 and len(lines) == 1 and expected in lines[0], (args, lines)
        assert lines[0].startswith("convert_checkpoint_to_hf.py: error:")
    assert sorted(os.listdir(busy)) == ["keep.txt"] and not os.path.exists(out)
    for args, expected in [
        (["--load", str(tmp_path / "missing"), "--save", out], "does not exist"),
        (["--load", str(empty), "--save", out], "no config.json"),
    ]:
        rc, lines = _cli("convert_hf_to_checkpoint.py", *args)
        assert rc == 1 and len(lines) == 1 and expected in lines[0], (args, lines)


def test_cli_parses_before_importing_torch():
    """The tools parse and check their flags with the standard library only (megatron_lasp.hf.cli):
    a bad flag fails at once, not after torch and megatron-core are imported."""
    code = (
        "import importlib.util, json, os, sys\n"
        "heavy = []\n"
        "for script, argv in [('convert_checkpoint_to_hf.py', ['--load', 'a', '--save', 'b', '--dtype', 'float16']),\n"
        "                     ('convert_hf_to_checkpoint.py', ['--load', 'a', '--save', 'b', '--iteration', '3'])]:\n"
        "    spec = importlib.util.spec_from_file_location(script[:-3], os.path.join('tools', script))\n"
        "    tool = importlib.util.module_from_spec(spec)\n"
        "    spec.loader.exec_module(tool)\n"
        "    args = tool.get_args(argv)\n"
        "    heavy.append([args.load, args.save] + sorted(m for m in ('torch', 'megatron', 'transformers') if m in sys.modules))\n"
        "print(json.dumps(heavy))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO,
                          env=dict(os.environ, PYTHONPATH=REPO))
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == [["a", "b"], ["a", "b"]], proc.stdout
