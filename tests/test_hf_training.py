"""The exported HF model as transformers' own causal LMs behave: Trainer with gradient
accumulation, gradient checkpointing, ``generate(inputs_embeds=...)``, the loss keywords and the
transformers version guard. Pure PyTorch + transformers (no megatron, no spawn), tiny models."""

from __future__ import annotations

import importlib.util
import os
import random
import re

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELING = os.path.join(REPO, "megatron_lasp", "hf", "modeling_linear_lm.py")


@pytest.fixture(autouse=True)
def fresh_seed():
    seed = random.SystemRandom().randrange(2**31)
    print(f"torch seed {seed}")
    torch.manual_seed(seed)


def _model(**overrides):
    from megatron_lasp.hf.configuration_linear_lm import LaspLinearLMConfig
    from megatron_lasp.hf.modeling_linear_lm import LaspLinearLMForCausalLM

    fields = dict(chunk_size=8, initializer_range=0.2, pad_token_id=0, eos_token_id=None)
    fields.update(overrides)
    model = LaspLinearLMForCausalLM(LaspLinearLMConfig(**fields))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def _batch(n=8, width=24, vocab=128):
    """Right-padded rows of different lengths; labels -100 on padding and on a few prompt tokens,
    so that micro-batches hold different numbers of predicted tokens."""
    lengths = torch.randint(5, width + 1, (n,))
    lengths[0], lengths[1] = width, 5
    ids = torch.randint(1, vocab, (n, width))
    mask = (torch.arange(width)[None, :] < lengths[:, None]).long()
    ids = ids * mask
    labels = ids.masked_fill(mask == 0, -100)
    labels[::3, :3] = -100
    return ids, mask, labels


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30)).item()


# ----------------------------------------------------------------------------------------------
# loss


def test_loss_is_token_mean_and_honours_num_items_in_batch():
    model = _model()
    ids, mask, labels = _batch()
    out = model(ids, attention_mask=mask, labels=labels)
    logits = out.logits[:, :-1].float().reshape(-1, out.logits.shape[-1])
    targets = labels[:, 1:].reshape(-1)
    token_sum = torch.nn.functional.cross_entropy(logits, targets, ignore_index=-100, reduction="sum")
    count = (targets != -100).sum()
    torch.testing.assert_close(out.loss, token_sum / count, rtol=1e-6, atol=0)
    scaled = model(ids, attention_mask=mask, labels=labels, num_items_in_batch=count * 3).loss
    torch.testing.assert_close(scaled, token_sum / (count * 3), rtol=1e-6, atol=0)


@pytest.mark.parametrize("accumulation", [1, 2, 4], ids=lambda a: f"ga{a}")
def test_trainer_gradient_accumulation_equals_full_batch(tmp_path, accumulation):
    pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate: pip install -e '.[hf]'")
    from transformers import Trainer, TrainerCallback, TrainingArguments

    model = _model()
    ids, mask, labels = _batch()
    model.train()
    out = model(ids, attention_mask=mask, labels=labels)  # the full batch, one backward
    out.loss.backward()
    reference, reference_loss = _grads(model), out.loss.item()
    model.zero_grad(set_to_none=True)

    captured = {}

    class Capture(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            captured.update(_grads(model))

    rows = [dict(input_ids=ids[i], attention_mask=mask[i], labels=labels[i]) for i in range(len(ids))]
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=len(rows) // accumulation,
        gradient_accumulation_steps=accumulation, max_steps=1, learning_rate=0.0, max_grad_norm=0.0,
        logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True,
        dataloader_num_workers=0, seed=0,
    )
    trainer = Trainer(model=model, args=args, train_dataset=rows, callbacks=[Capture()])
    trainer.train()
    assert set(captured) == set(reference)
    for name, grad in reference.items():
        assert _rel(captured[name], grad) < 1e-5, (name, _rel(captured[name], grad))
    logged = [entry for entry in trainer.state.log_history if "loss" in entry][0]
    assert abs(logged["loss"] - reference_loss) < 1e-4 * abs(reference_loss), (logged["loss"], reference_loss)


def _trainer_rank(rank, world_size, state, config_fields, rows, out_dir):
    """One data-parallel rank of a Trainer step (accelerate sets up gloo from torchrun's env)."""
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from megatron_lasp.hf.configuration_linear_lm import LaspLinearLMConfig
    from megatron_lasp.hf.modeling_linear_lm import LaspLinearLMForCausalLM

    model = LaspLinearLMForCausalLM(LaspLinearLMConfig(**config_fields))
    model.load_state_dict(state)
    captured = {}

    class Capture(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            captured.update(_grads(model))

    args = TrainingArguments(
        output_dir=out_dir, per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=1,
        learning_rate=0.0, max_grad_norm=0.0, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
        disable_tqdm=True, dataloader_num_workers=0, seed=0, ddp_backend="gloo",
    )
    trainer = Trainer(model=model, args=args, train_dataset=rows, callbacks=[Capture()])
    assert trainer.args.world_size == world_size
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    return dict(grads=captured, loss=logged[0]["loss"] if logged else None)


def test_trainer_data_parallel_with_accumulation_equals_full_batch(tmp_path):
    """2 ranks x 2 accumulation steps x 2 rows = the 8 rows of the full batch."""
    pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate: pip install -e '.[hf]'")
    from megatron_lasp.testing import spawn

    model = _model()
    ids, mask, labels = _batch()
    model.train()
    out = model(ids, attention_mask=mask, labels=labels)
    out.loss.backward()
    reference = _grads(model)
    fields = model.config.to_dict()
    fields = {k: fields[k] for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                                     "intermediate_size", "chunk_size", "pad_token_id", "eos_token_id")}
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    rows = [dict(input_ids=ids[i], attention_mask=mask[i], labels=labels[i]) for i in range(len(ids))]
    results = spawn(_trainer_rank, 2, args=(state, fields, rows, str(tmp_path)), init_process_group=False,
                    timeout=300)
    for result in results:
        for name, grad in reference.items():
            assert _rel(result["grads"][name], grad) < 1e-5, (name, _rel(result["grads"][name], grad))
    assert abs(results[0]["loss"] - out.loss.item()) < 1e-4 * out.loss.item()


# ----------------------------------------------------------------------------------------------
# gradient checkpointing


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_gradient_checkpointing_gives_the_same_gradients(reentrant):
    model = _model(num_hidden_layers=3)
    ids, mask, labels = _batch(n=3)
    model.train()
    model(ids, attention_mask=mask, labels=labels).loss.backward()
    reference = _grads(model)
    model.zero_grad(set_to_none=True)

    calls = []
    hook = model.model.layers[1].register_forward_pre_hook(lambda *args: calls.append(1))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    assert model.is_gradient_checkpointing
    out = model(ids, attention_mask=mask, labels=labels, use_cache=True)
    assert out.cache is None or out.cache.get_seq_length() == 0  # training with checkpointing keeps no cache
    assert len(calls) == 1
    out.loss.backward()
    assert len(calls) == 2  # the block ran again in the backward pass
    hook.remove()
    model.eval()
    with torch.no_grad():
        filled = model(ids[:, :4], use_cache=True).cache
    model.train()
    with pytest.raises(ValueError, match="cannot continue from a filled cache"):
        model(ids[:, 4:], cache=filled, labels=labels[:, 4:])
    got = _grads(model)
    assert set(got) == set(reference)
    for name, grad in reference.items():
        assert torch.equal(got[name], grad), name
    model.eval()  # inference with checkpointing enabled: the cache works as usual
    with torch.no_grad():
        cached = model.generate(ids[:1, :6], max_new_tokens=4, do_sample=False)
        uncached = model.generate(ids[:1, :6], max_new_tokens=4, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)
    model.gradient_checkpointing_disable()
    assert not model.is_gradient_checkpointing


# ----------------------------------------------------------------------------------------------
# generate from embeddings


def test_generate_from_inputs_embeds_equals_generate_from_ids():
    model = _model().eval()
    ids = torch.randint(1, 128, (2, 11))
    embeds = model.get_input_embeddings()(ids)
    with torch.no_grad():
        from_ids = model.generate(ids, max_new_tokens=7, min_new_tokens=7, do_sample=False)
        from_embeds = model.generate(inputs_embeds=embeds, max_new_tokens=7, min_new_tokens=7, do_sample=False)
        beams_ids = model.generate(ids, max_new_tokens=4, num_beams=2, do_sample=False)
        beams_embeds = model.generate(inputs_embeds=embeds, max_new_tokens=4, num_beams=2, do_sample=False)
    assert torch.equal(from_embeds, from_ids[:, 11:])  # decoder-only: only the new tokens come back
    assert torch.equal(beams_embeds, beams_ids[:, 11:])
    # embeddings that no token has (soft prompts) are honoured: a different continuation state
    with torch.no_grad():
        soft = model.generate(inputs_embeds=embeds + 0.5 * torch.randn_like(embeds), max_new_tokens=7,
                              min_new_tokens=7, do_sample=False, output_logits=True, return_dict_in_generate=True)
        plain = model.generate(inputs_embeds=embeds, max_new_tokens=1, do_sample=False, output_logits=True,
                               return_dict_in_generate=True)
    assert not torch.allclose(soft.logits[0], plain.logits[0])


# ----------------------------------------------------------------------------------------------
# transformers version guard


@pytest.mark.parametrize("version", ["4.57.1", "4.45.0", "5.16.1", "nonsense"])
def test_modeling_code_refuses_untested_transformers(monkeypatch, version):
    import transformers

    monkeypatch.setattr(transformers, "__version__", version)
    spec = importlib.util.spec_from_file_location("lasp_modeling_under_test", MODELING)
    module = importlib.util.module_from_spec(spec)
    expected = r"this model needs transformers>=5\.17 \(found " + re.escape(version)
    with pytest.raises(ImportError, match=expected):
        spec.loader.exec_module(module)


def test_supported_versions_agree_with_setup():
    import transformers

    from megatron_lasp.hf import modeling_linear_lm

    floor = ".".join(map(str, modeling_linear_lm.MIN_TRANSFORMERS_VERSION))
    with open(os.path.join(REPO, "setup.py")) as f:
        assert f'"transformers>={floor},<6"' in f.read()
    major, minor = (int(x) for x in re.match(r"(\d+)\.(\d+)", transformers.__version__).groups())
    assert (major, minor) >= modeling_linear_lm.MIN_TRANSFORMERS_VERSION and major < 6
