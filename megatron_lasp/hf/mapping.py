"""The one map between megatron-lasp models and the Hugging Face model: config fields
(:data:`CONFIG_FIELDS`) and parameters (:data:`PARAMETER_MAP`), read by both directions and by the
shape check of HF inputs.

``linear_qkv`` rows are head-major ``[head 0: q, k, v, (g) | head 1: ...]`` (``D`` rows per part;
``megatron_lasp/models/attention.py``); ``linear_fc1`` rows are ``[W1 (activation side); W2]``
(megatron-core's GLU ``chunk(2)``). A Gated DeltaNet layer's ``in_proj`` rows and ``conv1d``
channels are grouped per key head (``megatron_lasp/models/delta_net.py``) and split into the HF
model's ``{q,k,v,g,b,a}_proj`` and ``{q,k,v}_conv1d``. Every split is pure slicing, so conversions
are exact.
"""

from __future__ import annotations

import os
from typing import Any, Dict, Iterator, List, Tuple

import torch

from megatron_lasp.hf.files import ConversionError

CONFIG_FIELDS = (
    ("num_layers", "num_hidden_layers"),
    ("hidden_size", "hidden_size"),
    ("num_attention_heads", "num_attention_heads"),
    ("kv_channels", "head_dim"),
    ("ffn_hidden_size", "intermediate_size"),
    ("layernorm_epsilon", "rms_norm_eps"),
    ("decay_type", "decay_type"),
    ("decay_layer_eps", "decay_layer_eps"),
    ("linear_attention_gate", "linear_attention_gate"),
    ("gate_logit_normalizer", "gate_logit_normalizer"),
    ("qk_feature_map", "qk_feature_map"),
    ("v_feature_map", "v_feature_map"),
    ("output_gate", "output_gate"),
    ("attention_norm_group_size", "attention_norm_group_size"),
    ("glu_type", "glu_type"),
    ("add_bias_linear", "add_bias_linear"),
    ("share_embeddings_and_output_weights", "tie_word_embeddings"),
    ("init_method_std", "initializer_range"),
    ("linear_attention_type", "linear_attention_type"),
    ("linear_conv_kernel_dim", "linear_conv_kernel_dim"),
    ("linear_key_head_dim", "linear_key_head_dim"),
    ("linear_value_head_dim", "linear_value_head_dim"),
    ("linear_num_key_heads", "linear_num_key_heads"),
    ("linear_num_value_heads", "linear_num_value_heads"),
)
"""megatron-lasp ``LinearLMConfig`` field -> HF ``LaspLinearLMConfig`` field (same meaning and value)."""


def hf_config_kwargs(config: Any, vocab_size: int) -> Dict[str, Any]:
    """``LaspLinearLMConfig`` keyword arguments from a megatron-lasp ``LinearLMConfig``.

    Args:
        config: the model's ``LinearLMConfig`` (any object with its attributes).
        vocab_size: rows of the embedding (the padded vocabulary).

    Raises:
        ConversionError: a setting the HF model does not implement.
    """
    unsupported = [
        ("normalization", "RMSNorm"),
        ("glu_linear_offset", 0.0),
        ("activation_func_clamp_value", None),
        ("apply_residual_connection_post_layernorm", False),
        ("layernorm_zero_centered_gamma", False),
    ]
    for name, expected in unsupported:
        value = getattr(config, name, expected)
        if value != expected:
            raise ConversionError(f"the HF model supports {name}={expected!r} only, the checkpoint has {value!r}")
    groups = getattr(config, "num_query_groups", None)
    pattern = getattr(config, "hybrid_layer_pattern", None)
    hybrid = SOFTMAX_SYMBOL in (pattern or "")
    if groups not in (None, config.num_attention_heads) and not hybrid:
        raise ConversionError(f"num_query_groups={groups} differs from num_attention_heads")
    out = {hf: getattr(config, mg) for mg, hf in CONFIG_FIELDS}
    out["vocab_size"] = int(vocab_size)
    if hybrid:  # transformers' hybrid convention: one layer type per layer
        out["layer_types"] = [LAYER_TYPES[symbol] for symbol in pattern]
        out["num_key_value_heads"] = groups or config.num_attention_heads
        out["rope_theta"] = float(config.rotary_base)
    return out


def megatron_config_kwargs(hf_config: Dict[str, Any]) -> Dict[str, Any]:
    """``LinearLMConfig`` keyword arguments (architecture only) from an HF ``config.json`` dict."""
    out = {mg: hf_config[hf] for mg, hf in CONFIG_FIELDS if hf in hf_config}
    kinds = _layer_kinds(hf_config)
    if SOFTMAX_SYMBOL in kinds:
        out.update(hybrid_layer_pattern=kinds, num_query_groups=_kv_heads(hf_config),
                   rotary_base=float(hf_config.get("rope_theta", 10000.0)))
    return out


LAYER_TYPES = {"L": "linear_attention", "*": "full_attention"}
"""``hybrid_layer_pattern`` symbols -> transformers' ``layer_types`` values."""
SOFTMAX_SYMBOL = "*"


def _layer_kinds(hf_config: Dict[str, Any]) -> str:
    """The layers as ``hybrid_layer_pattern`` symbols (all ``L`` without ``layer_types``)."""
    types = hf_config.get("layer_types") or [LAYER_TYPES["L"]] * hf_config["num_hidden_layers"]
    symbols = {value: key for key, value in LAYER_TYPES.items()}
    if len(types) != hf_config["num_hidden_layers"] or any(t not in symbols for t in types):
        raise ConversionError(f"config.json: layer_types must name each of the {hf_config['num_hidden_layers']} "
                              f"layers one of {', '.join(symbols)}, got {types}")
    return "".join(symbols[t] for t in types)


def _kv_heads(hf_config: Dict[str, Any]) -> int:
    return hf_config.get("num_key_value_heads") or hf_config["num_attention_heads"]


# ---------------------------------------------------------------------------------------------
# state dicts
# ---------------------------------------------------------------------------------------------


class _Rename:
    """One megatron tensor is one HF tensor."""

    def hf_names(self, hf_name: str, hf_config: Dict[str, Any]) -> List[str]:
        return [hf_name]

    def split(self, tensor, name: str, hf_config: Dict[str, Any]) -> list:
        return [tensor]

    def join(self, tensors: list, hf_config: Dict[str, Any]):
        return tensors[0]


class _SplitHeads(_Rename):
    """The fused ``linear_qkv``: rows head-major ``[H, P, D]`` (``P`` parts: q, k, v and, with the
    output gate, g) <-> one ``[H * D]``-row tensor per part."""

    def _parts(self, hf_config: Dict[str, Any]) -> List[str]:
        return ["q", "k", "v", "g"] if hf_config["output_gate"] else ["q", "k", "v"]

    def hf_names(self, hf_name: str, hf_config: Dict[str, Any]) -> List[str]:
        return [hf_name.format(part=part) for part in self._parts(hf_config)]

    def split(self, tensor, name: str, hf_config: Dict[str, Any]) -> list:
        heads, head_dim, parts = hf_config["num_attention_heads"], hf_config["head_dim"], len(self._parts(hf_config))
        if tensor.shape[0] != heads * parts * head_dim:
            raise ConversionError(
                f"{name}: {tuple(tensor.shape)} does not match {heads} heads x {parts} parts x {head_dim}"
            )
        rest = tensor.shape[1:]
        view = tensor.reshape(heads, parts, head_dim, *rest)
        return [view[:, i].reshape(heads * head_dim, *rest) for i in range(parts)]

    def join(self, tensors: list, hf_config: Dict[str, Any]):
        heads, head_dim = hf_config["num_attention_heads"], hf_config["head_dim"]
        rest = tensors[0].shape[1:]
        stacked = torch.stack([t.reshape(heads, head_dim, *rest) for t in tensors], dim=1)
        return stacked.reshape(heads * len(tensors) * head_dim, *rest)


class _SplitHalves(_Rename):
    """The fused GLU ``linear_fc1``: rows ``[W1 (activation side); W2]`` <-> gate, up."""

    def hf_names(self, hf_name: str, hf_config: Dict[str, Any]) -> List[str]:
        return [hf_name.format(part=part) for part in ("gate", "up")]

    def split(self, tensor, name: str, hf_config: Dict[str, Any]) -> list:
        ffn = hf_config["intermediate_size"]
        if tensor.shape[0] != 2 * ffn:
            raise ConversionError(f"{name}: {tuple(tensor.shape)} is not 2 x {ffn} rows")
        return [tensor[:ffn], tensor[ffn:]]

    def join(self, tensors: list, hf_config: Dict[str, Any]):
        return torch.cat(tensors, dim=0)


class _SplitGroups(_Rename):
    """A softmax layer's ``linear_qkv`` (megatron-core's grouped layout): rows ``[G, H / G + 2, D]``
    (per key/value head ``g``: its group's query heads, then ``k_g``, then ``v_g``) <-> q
    ``[H D]``, k ``[G D]``, v ``[G D]`` rows."""

    def hf_names(self, hf_name: str, hf_config: Dict[str, Any]) -> List[str]:
        return [hf_name.format(part=part) for part in ("q", "k", "v")]

    def split(self, tensor, name: str, hf_config: Dict[str, Any]) -> list:
        heads, groups, head_dim = hf_config["num_attention_heads"], _kv_heads(hf_config), hf_config["head_dim"]
        if tensor.shape[0] != (heads + 2 * groups) * head_dim:
            raise ConversionError(f"{name}: {tuple(tensor.shape)} does not match ({heads} query + 2 x {groups} "
                                  f"key/value heads) x {head_dim}")
        rest, per = tensor.shape[1:], heads // groups
        view = tensor.reshape(groups, per + 2, head_dim, *rest)
        return [view[:, :per].reshape(heads * head_dim, *rest), view[:, per].reshape(groups * head_dim, *rest),
                view[:, per + 1].reshape(groups * head_dim, *rest)]

    def join(self, tensors: list, hf_config: Dict[str, Any]):
        heads, groups, head_dim = hf_config["num_attention_heads"], _kv_heads(hf_config), hf_config["head_dim"]
        q, k, v = tensors
        rest = q.shape[1:]
        parts = [q.reshape(groups, heads // groups, head_dim, *rest), k.reshape(groups, 1, head_dim, *rest),
                 v.reshape(groups, 1, head_dim, *rest)]
        return torch.cat(parts, dim=1).reshape((heads + 2 * groups) * head_dim, *rest)


class _SplitKeyGroups(_Rename):
    """A Gated DeltaNet layer's ``in_proj`` (rows per key head: q ``Dk``, k ``Dk``, v ``r Dv``, z
    ``r Dv``, b ``r``, a ``r``) or ``conv1d`` (channels per key head: q, k, v) <-> one tensor per part,
    heads contiguous (``r`` value heads per key head)."""

    def __init__(self, parts: Tuple[str, ...]):
        self.parts = parts

    def _sizes(self, hf_config: Dict[str, Any]) -> List[int]:
        r = hf_config["linear_num_value_heads"] // hf_config["linear_num_key_heads"]
        dk, dv = hf_config["linear_key_head_dim"], hf_config["linear_value_head_dim"]
        per = {"q": dk, "k": dk, "v": r * dv, "g": r * dv, "b": r, "a": r}
        return [per[part] for part in self.parts]

    def hf_names(self, hf_name: str, hf_config: Dict[str, Any]) -> List[str]:
        return [hf_name.format(part=part) for part in self.parts]

    def split(self, tensor, name: str, hf_config: Dict[str, Any]) -> list:
        heads, sizes = hf_config["linear_num_key_heads"], self._sizes(hf_config)
        if tensor.shape[0] != heads * sum(sizes):
            raise ConversionError(f"{name}: {tuple(tensor.shape)} does not match {heads} key heads x "
                                  f"{sum(sizes)} rows ({', '.join(self.parts)})")
        rest = tensor.shape[1:]
        pieces = tensor.reshape(heads, sum(sizes), *rest).split(sizes, dim=1)
        return [piece.reshape(heads * size, *rest) for piece, size in zip(pieces, sizes)]

    def join(self, tensors: list, hf_config: Dict[str, Any]):
        heads, sizes = hf_config["linear_num_key_heads"], self._sizes(hf_config)
        rest = tensors[0].shape[1:]
        grouped = [t.reshape(heads, size, *rest) for t, size in zip(tensors, sizes)]
        return torch.cat(grouped, dim=1).reshape(heads * sum(sizes), *rest)


RENAME, SPLIT_HEADS, SPLIT_HALVES, SPLIT_GROUPS = _Rename(), _SplitHeads(), _SplitHalves(), _SplitGroups()
SPLIT_DELTA_PROJ, SPLIT_DELTA_CONV = _SplitKeyGroups(("q", "k", "v", "g", "b", "a")), _SplitKeyGroups(("q", "k", "v"))
_DELTA_PROJ_SHAPES = (("QK", "h"), ("QK", "h"), ("VV", "h"), ("VV", "h"), ("HV", "h"), ("HV", "h"))

PARAMETER_MAP = (
    # (megatron-lasp TP=1 name, HF name, transform, HF shape, present when); {L}: the layer,
    # {part}: the pieces of a split; shapes in V vocabulary rows, h hidden, W heads x head_dim,
    # F intermediate size, H heads.
    ("embedding.word_embeddings.weight", "model.embed_tokens.weight", RENAME, ("V", "h"), "always"),
    ("decoder.layers.{L}.input_layernorm.weight", "model.layers.{L}.input_norm.weight", RENAME, ("h",), "always"),
    ("decoder.layers.{L}.self_attention.linear_qkv.weight", "model.layers.{L}.attn.{part}_proj.weight", SPLIT_HEADS,
     ("W", "h"), "linear"),
    ("decoder.layers.{L}.self_attention.linear_qkv.weight", "model.layers.{L}.attn.{part}_proj.weight", SPLIT_GROUPS,
     (("W", "h"), ("K", "h"), ("K", "h")), "softmax"),
    ("decoder.layers.{L}.self_attention.linear_proj.weight", "model.layers.{L}.attn.o_proj.weight", RENAME,
     ("h", "W"), "attention"),
    ("decoder.layers.{L}.self_attention.in_proj.weight", "model.layers.{L}.attn.{part}_proj.weight",
     SPLIT_DELTA_PROJ, _DELTA_PROJ_SHAPES, "delta"),
    ("decoder.layers.{L}.self_attention.conv1d.weight", "model.layers.{L}.attn.{part}_conv1d.weight",
     SPLIT_DELTA_CONV, (("QK", "1", "C"), ("QK", "1", "C"), ("VV", "1", "C")), "delta"),
    ("decoder.layers.{L}.self_attention.A_log", "model.layers.{L}.attn.A_log", RENAME, ("HV",), "delta"),
    ("decoder.layers.{L}.self_attention.dt_bias", "model.layers.{L}.attn.dt_bias", RENAME, ("HV",), "delta"),
    ("decoder.layers.{L}.self_attention.out_norm.weight", "model.layers.{L}.attn.o_norm.weight", RENAME, ("DV",),
     "delta"),
    ("decoder.layers.{L}.self_attention.out_proj.weight", "model.layers.{L}.attn.o_proj.weight", RENAME,
     ("h", "VV"), "delta"),
    ("decoder.layers.{L}.self_attention.gate.linear.weight", "model.layers.{L}.attn.decay_proj.weight", RENAME,
     ("H", "h"), "gated"),
    ("decoder.layers.{L}.self_attention.gate.linear.bias", "model.layers.{L}.attn.decay_proj.bias", RENAME,
     ("H",), "gla"),
    ("decoder.layers.{L}.self_attention.gate.A_log", "model.layers.{L}.attn.A_log", RENAME, ("H",), "mamba2"),
    ("decoder.layers.{L}.self_attention.gate.dt_bias", "model.layers.{L}.attn.dt_bias", RENAME, ("H",), "mamba2"),
    ("decoder.layers.{L}.mlp.linear_fc1.weight", "model.layers.{L}.mlp.{part}_proj.weight", SPLIT_HALVES,
     ("F", "h"), "always"),
    ("decoder.layers.{L}.mlp.linear_fc2.weight", "model.layers.{L}.mlp.down_proj.weight", RENAME, ("h", "F"), "always"),
    ("decoder.layers.{L}.self_attention.linear_qkv.bias", "model.layers.{L}.attn.{part}_proj.bias", SPLIT_HEADS,
     ("W",), "linear-bias"),
    ("decoder.layers.{L}.self_attention.linear_qkv.bias", "model.layers.{L}.attn.{part}_proj.bias", SPLIT_GROUPS,
     (("W",), ("K",), ("K",)), "softmax-bias"),
    ("decoder.layers.{L}.self_attention.linear_proj.bias", "model.layers.{L}.attn.o_proj.bias", RENAME, ("h",),
     "attention-bias"),
    ("decoder.layers.{L}.self_attention.in_proj.bias", "model.layers.{L}.attn.{part}_proj.bias", SPLIT_DELTA_PROJ,
     tuple(shape[:1] for shape in _DELTA_PROJ_SHAPES), "delta-bias"),
    ("decoder.layers.{L}.self_attention.out_proj.bias", "model.layers.{L}.attn.o_proj.bias", RENAME, ("h",),
     "delta-bias"),
    ("decoder.layers.{L}.mlp.linear_fc1.bias", "model.layers.{L}.mlp.{part}_proj.bias", SPLIT_HALVES, ("F",), "bias"),
    ("decoder.layers.{L}.mlp.linear_fc2.bias", "model.layers.{L}.mlp.down_proj.bias", RENAME, ("h",), "bias"),
    ("decoder.layers.{L}.self_attention.out_norm.weight", "model.layers.{L}.attn.o_norm.weight", RENAME, ("W",),
     "linear"),
    ("decoder.layers.{L}.pre_mlp_layernorm.weight", "model.layers.{L}.mlp_norm.weight", RENAME, ("h",), "always"),
    ("decoder.final_layernorm.weight", "model.norm.weight", RENAME, ("h",), "always"),
    ("output_layer.weight", "lm_head.weight", RENAME, ("V", "h"), "untied"),
)
"""The parameter mapping, in the HF files' order; "bias" rows exist with ``add_bias_linear``,
"untied" ones without ``tie_word_embeddings`` (a tied model may or may not store them: they are
dropped when present); "gated" rows with a per-token gate (``linear_attention_gate`` not 'none'),
"mamba2" / "gla" rows with that gate (its ``A_log`` / ``dt_bias``, its projection's bias); "linear" /
"softmax" / "delta" rows only in the layers of that kind (a hybrid's ``layer_types``: "linear" is a
lightning layer, "delta" a Gated DeltaNet one (``linear_attention_type``); the gate rows are
lightning-layer rows too), "attention" rows in lightning and softmax layers, "-bias" ones with
``add_bias_linear`` too. A row's shape is one per piece where the pieces differ (a softmax layer's q
and its k, v under GQA; a Gated DeltaNet layer's parts)."""


def _mapped(hf_config: Dict[str, Any], with_optional: bool = False) -> Iterator[Tuple[str, List[str], Any, tuple]]:
    """(megatron name, HF names, transform, HF shape of each piece) of every parameter of the
    model ``hf_config`` describes, in :data:`PARAMETER_MAP` order (per layer for layer rows);
    ``with_optional`` adds the rows a tied model may store."""
    sizes = {
        "V": hf_config["vocab_size"], "h": hf_config["hidden_size"], "F": hf_config["intermediate_size"],
        "W": hf_config["num_attention_heads"] * hf_config["head_dim"], "H": hf_config["num_attention_heads"],
        "K": _kv_heads(hf_config) * hf_config["head_dim"], "1": 1,
    }
    delta = hf_config.get("linear_attention_type", "lightning") == "gated_delta_net"  # older exports: lightning
    if delta:
        sizes.update(QK=hf_config["linear_num_key_heads"] * hf_config["linear_key_head_dim"],
                     VV=hf_config["linear_num_value_heads"] * hf_config["linear_value_head_dim"],
                     HV=hf_config["linear_num_value_heads"], DV=hf_config["linear_value_head_dim"],
                     C=hf_config["linear_conv_kernel_dim"])
    bias = hf_config["add_bias_linear"]
    gate = hf_config.get("linear_attention_gate", "none")  # exports before the gate have none
    kinds = _layer_kinds(hf_config)

    def present(when: str, layer) -> bool:
        kind = None
        if layer is not None:
            kind = "softmax" if kinds[layer] == SOFTMAX_SYMBOL else "delta" if delta else "linear"
        linear = kind == "linear"
        attention = kind in ("linear", "softmax")
        return {"always": True, "bias": bias, "untied": with_optional or not hf_config["tie_word_embeddings"],
                "linear": linear, "softmax": kind == "softmax", "linear-bias": bias and linear,
                "softmax-bias": bias and kind == "softmax", "gated": gate != "none" and linear,
                "mamba2": gate == "mamba2" and linear, "gla": gate == "gla" and linear,
                "attention": attention, "attention-bias": bias and attention, "delta": kind == "delta",
                "delta-bias": bias and kind == "delta"}[when]

    layer_rows = [row for row in PARAMETER_MAP if "{L}" in row[0]]
    first = PARAMETER_MAP.index(layer_rows[0])
    rows = [(row, None) for row in PARAMETER_MAP[:first]]
    rows += [(row, layer) for layer in range(hf_config["num_hidden_layers"]) for row in layer_rows]
    rows += [(row, None) for row in PARAMETER_MAP[first + len(layer_rows):]]
    for (mg, hf, transform, shape, when), layer in rows:
        if present(when, layer):
            names = transform.hf_names(hf.replace("{L}", str(layer)), hf_config)
            pieces = shape if isinstance(shape[0], tuple) else (shape,) * len(names)
            yield mg.replace("{L}", str(layer)), names, transform, [tuple(sizes[d] for d in p) for p in pieces]


def _optional_names(hf_config: Dict[str, Any], megatron: bool) -> set:
    """Names of the parameters a tied model may hold in addition (dropped by the conversions)."""
    if not hf_config["tie_word_embeddings"]:
        return set()
    return {mg if megatron else hf for mg, hf, _, _, when in PARAMETER_MAP if when == "untied"}




def hf_parameter_shapes(hf_config: Dict[str, Any]) -> Dict[str, Tuple[int, ...]]:
    """``{HF parameter name: shape}`` of the model ``hf_config`` describes (``lm_head.weight``
    included even when tied: a tied export may or may not store it)."""
    return {name: shape for _, names, _, shapes in _mapped(hf_config, with_optional=True)
            for name, shape in zip(names, shapes)}


def check_hf_tensors(tensors: Dict[str, Any], files: Dict[str, str], hf_config: Dict[str, Any], directory: str):
    """Raise a one-line :class:`ConversionError` unless ``tensors`` are exactly the parameters
    ``config.json`` describes, with their shapes (``files``: tensor name -> file name)."""
    expected = hf_parameter_shapes(hf_config)
    optional = {"lm_head.weight"} if hf_config["tie_word_embeddings"] else set()
    missing = sorted(set(expected) - set(tensors) - optional)
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ConversionError(
            f"{directory}: tensor {missing[0]}{more} missing from the safetensors files, which config.json requires"
        )
    unexpected = sorted(set(tensors) - set(expected))
    if unexpected:
        name = unexpected[0]
        raise ConversionError(
            f"{os.path.join(directory, files[name])}: unexpected tensor {name} for the model config.json describes"
        )
    for name, tensor in tensors.items():
        if tuple(tensor.shape) != expected[name]:
            raise ConversionError(
                f"{os.path.join(directory, files[name])}: tensor {name} has shape {tuple(tensor.shape)}, "
                f"config.json implies {expected[name]}"
            )


def _convert(state_dict: Dict[str, Any], hf_config: Dict[str, Any], to_hf: bool) -> Dict[str, Any]:
    """:data:`PARAMETER_MAP` applied one way: split (``to_hf``) or join (the other way)."""
    source = "checkpoint" if to_hf else "HF model"
    sd = {k: v for k, v in state_dict.items() if not (to_hf and k.endswith("._extra_state"))}
    out: Dict[str, Any] = {}

    def take(name: str):
        if name not in sd:
            raise ConversionError(f"parameter {name} missing from the {source}")
        return sd.pop(name)

    for mg, hf_names, transform, _ in _mapped(hf_config):
        if to_hf:
            out.update(zip(hf_names, transform.split(take(mg), mg, hf_config)))
        else:
            out[mg] = transform.join([take(name) for name in hf_names], hf_config)
    for name in _optional_names(hf_config, megatron=to_hf):
        sd.pop(name, None)
    if sd:
        raise ConversionError(f"unexpected parameters in the {source}: {', '.join(sorted(sd))}")
    return {k: v.contiguous() for k, v in out.items()}


def megatron_to_hf_state_dict(state_dict: Dict[str, Any], hf_config: Dict[str, Any]) -> Dict[str, Any]:
    """Rename / split a TP=1 megatron-lasp state dict into the HF model's names (:data:`PARAMETER_MAP`).

    Args:
        state_dict: ``LinearLM.state_dict()`` at TP=1 (``_extra_state`` entries are ignored).
        hf_config: :func:`hf_config_kwargs` output (or the HF ``config.json`` dict).

    Returns:
        ``{hf name: tensor}`` (contiguous tensors, values unchanged).

    Raises:
        ConversionError: a missing or unexpected parameter, or a shape that does not fit.
    """
    return _convert(state_dict, hf_config, to_hf=True)


def hf_to_megatron_state_dict(state_dict: Dict[str, Any], hf_config: Dict[str, Any]) -> Dict[str, Any]:
    """The inverse of :func:`megatron_to_hf_state_dict` (exact: concatenation only).

    Returns:
        ``{megatron-lasp TP=1 name: tensor}`` without ``_extra_state`` entries and without
        ``output_layer.weight`` when the embeddings are tied.

    Raises:
        ConversionError: a missing or unexpected parameter.
    """
    return _convert(state_dict, hf_config, to_hf=False)
