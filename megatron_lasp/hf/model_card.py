"""The model card (``README.md``) of an exported directory: the architecture, where the weights
came from and how to load and generate. The text is ``templates/model_card.md`` (``${field}``
placeholders, :class:`string.Template`); this module computes the fields."""

from __future__ import annotations

import os
from string import Template
from typing import Any, Dict, Optional

TEMPLATE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "templates", "model_card.md")
"""The card's text (shipped as package data)."""

_EXAMPLE_WITH_TOKENIZER = """tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=True)
model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, dtype=torch.float32)
inputs = tokenizer(["Once upon a time", "The model"], return_tensors="pt", padding=True)
out = model.generate(**inputs, max_new_tokens=20, do_sample=False)
print(tokenizer.batch_decode(out, skip_special_tokens=True))"""
_EXAMPLE_IDS = """model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, dtype=torch.float32)
out = model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=20, do_sample=False)
print(out.tolist())"""


def _human(n: int) -> str:
    for unit, size in (("B", 10**9), ("M", 10**6), ("K", 10**3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)


def model_card(
    name: str,
    hf_kwargs: Dict[str, Any],
    num_parameters: int,
    dtype: Optional[str],
    provenance: Optional[Dict[str, Any]],
    tokenizer=None,
) -> str:
    """The export's ``README.md``: architecture, where it came from, how to load and generate.

    Args:
        name: the directory's name (used in the code example).
        hf_kwargs: ``LaspLinearLMConfig`` keyword arguments.
        num_parameters: stored parameters (a tied output layer counted once).
        dtype: the weights' dtype name, or None when mixed.
        provenance: the ``megatron_lasp`` entry of ``config.json`` (None for a model not
            converted from a checkpoint).
        tokenizer: the megatron-lasp tokenizer saved with it, or None.
    """
    c = hf_kwargs
    heads, head_dim = c["num_attention_heads"], c["head_dim"]
    maps = f"q, k: {c['qk_feature_map']}; v: {c['v_feature_map']}"
    gate = "sigmoid output gate" if c["output_gate"] else "no output gate"
    kind = c.get("linear_attention_gate", "none")
    if kind == "none":
        decay = f"fixed decay per head (decay_type `{c['decay_type']}`)"
    else:
        decay = {"mamba2": "per-token decay per head, Mamba2 gate (`-exp(A_log) softplus(x W + dt_bias)`)",
                 "gla": f"per-token decay per head, GLA gate (`logsigmoid(x W + b) / {c['gate_logit_normalizer']:g}`)"}[kind]
    blocks = (
        "Each block is pre-norm: `x + o_proj(gate * GroupRMSNorm(LinAttn(q, k, v)))`, then `h + MLP(RMSNorm(h))`.\n"
        "The attention has no softmax: per head `S_t = lambda S_(t-1) + k_t^T v_t`, `o_t = q_t S_t`, so\n"
        f"each layer keeps one `[{heads}, {head_dim}, {head_dim}]` fp32 state per sequence, whatever its length. The\n"
        "model has no position embedding and no length limit (the tokenizer's `model_max_length` says so)."
    )
    mixer = (f"causal linear attention, {heads} heads x {head_dim} channels, {decay}, feature maps {maps}, "
             f"{gate}, RMSNorm over groups of {c['attention_norm_group_size']} head(s)")
    if c.get("linear_attention_type", "lightning") == "gated_delta_net":
        mixer = (f"Gated DeltaNet: {c['linear_num_key_heads']} query/key heads x {c['linear_key_head_dim']} and "
                 f"{c['linear_num_value_heads']} value heads x {c['linear_value_head_dim']} channels, causal "
                 f"convolution of {c['linear_conv_kernel_dim']} taps, gated delta rule (Mamba2-style decay), "
                 "RMSNorm x SiLU output gate")
        hv, dk, dv = c["linear_num_value_heads"], c["linear_key_head_dim"], c["linear_value_head_dim"]
        blocks = (
            "Each block is pre-norm: `x + o_proj(RMSNorm(o) * silu(g_proj x))`, then `h + MLP(RMSNorm(h))`, with `o`\n"
            "Gated DeltaNet's (arXiv 2412.06464): q, k, v through a short causal convolution and SiLU, q and k\n"
            "L2-normed, per head `S_t = exp(g_t) (I - beta_t k_t k_t^T) S_(t-1) + beta_t k_t v_t^T`, `o_t = S_t^T q_t`,\n"
            f"so each layer keeps one `[{hv}, {dk}, {dv}]` fp32 state and the convolution's last inputs per\n"
            "sequence, whatever its length. The model has no position embedding and no length limit (the\n"
            "tokenizer's `model_max_length` says so)."
        )
    rows = [
        ("layers", c["num_hidden_layers"]),
        ("hidden size", c["hidden_size"]),
        ("token mixer", mixer),
        ("MLP", f"{c['glu_type'].upper()}, {c['intermediate_size']} channels"),
        ("vocabulary", f"{c['vocab_size']} rows" + (f" ({tokenizer.vocab_size} tokenizer ids)" if tokenizer else "")),
        ("embeddings", "tied input/output" if c["tie_word_embeddings"] else "separate input and output"),
        ("biases", "yes" if c["add_bias_linear"] else "none"),
        ("parameters", f"{num_parameters:,} ({_human(num_parameters)})"),
        ("weights", dtype or "mixed dtypes"),
    ]
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    if provenance:
        par = provenance.get("parallel") or {}
        layout = ", ".join(
            f"{label}={par[key]}"
            for label, key in (("TP", "tensor_model_parallel_size"), ("PP", "pipeline_model_parallel_size"),
                               ("SP", "context_parallel_size"), ("DP", "data_parallel_size"))
            if par.get(key) is not None
        )
        mode = par.get("sequence_parallel_mode")
        training = (
            f"Converted from iteration {provenance.get('iteration')} of a megatron-lasp training checkpoint, "
            f"saved with {layout or 'an unrecorded layout'}"
            + (f" (sequence-parallel mode `{mode}`)" if mode and par.get("context_parallel_size", 1) > 1 else "")
            + (f", trained on sequences of {provenance['seq_length']} tokens" if provenance.get("seq_length") else "")
            + (f", tokenizer `{provenance['tokenizer_type']}`" if provenance.get("tokenizer_type") else "")
            + ". The full model settings of the run are in `config.json` under `megatron_lasp`."
        )
    else:
        training = "Written from a megatron-lasp model directly (no training checkpoint recorded)."
    if tokenizer is not None:
        example, imports = _EXAMPLE_WITH_TOKENIZER, "from transformers import AutoModelForCausalLM, AutoTokenizer"
    else:
        example, imports = _EXAMPLE_IDS, "from transformers import AutoModelForCausalLM"
    with open(TEMPLATE, encoding="utf-8") as f:
        text = f.read()
    return Template(text).substitute(name=name, table=table, blocks=blocks, training=training,
                                     imports=imports, example=example)
