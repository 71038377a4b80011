"""Conversion between megatron-lasp checkpoints and Hugging Face model directories.

Checkpoint -> HF (:func:`convert_checkpoint_to_hf`): the checkpoint (any saved TP/PP/SP sizes) is
loaded on one process at TP=1 by ``megatron_lasp.training.load_model_for_inference``; its state
dict is renamed (and the fused projections split, see below) into the HF model's names and
written as safetensors (sharded with an index above ``max_shard_size``), next to ``config.json``
(with ``auto_map``), ``generation_config.json``, the tokenizer files (with a pad token and left
padding), the modeling code (``configuration_linear_lm.py``, ``modeling_linear_lm.py``, copied
from this package) and a model card (``README.md``).

HF -> checkpoint (:func:`convert_hf_to_checkpoint`): the inverse mapping, loaded into a TP=1
megatron-lasp model and saved through megatron-core ``dist_checkpointing`` in the training
layout (``iter_XXXXXXX/`` + ``config.json`` + ``args.json`` + the tracker file), weights only:
continue training with ``pretrain_linear_lm.py --load DIR --finetune`` (or ``--no-load-optim
--no-load-rng``) at any TP/PP/SP sizes.

Parameter mapping: :data:`PARAMETER_MAP`, one table read by both directions and by the shape
check of HF inputs. ``linear_qkv`` rows are head-major ``[head 0: q, k, v, (g) | head 1: ...]``
(``D`` rows per part; ``megatron_lasp/models/attention.py``); ``linear_fc1`` rows are ``[W1
(activation side); W2]`` (megatron-core's GLU ``chunk(2)``). Both splits are pure slicing, so
conversions are exact.

Only the standard library is imported at module level: the command-line tools
(``tools/convert_*.py``, through :mod:`megatron_lasp.hf.cli`) validate their arguments (and fail
with one-line messages) before torch or megatron-core are imported.

Safety: neither direction writes into, over or around its sources (a ``--save`` that is, contains
or lies inside the source or the tokenizer files is refused, symlinks resolved); damaged inputs
(missing or truncated shard files, missing metadata, unreadable safetensors) are reported as one
:class:`ConversionError` line naming the file before anything is written.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from contextlib import contextmanager
from typing import Any, Dict, Iterator, List, Optional, Tuple

from megatron_lasp import atomic, checkpoint_files
from megatron_lasp.checkpoint_files import (
    CONFIG_FILENAME,
    TRACKER_FILENAME,
    checkpoint_name,
    list_iterations,
    other_iterations,
)

logger = logging.getLogger(__name__)

__all__ = [
    "ConversionError",
    "MODEL_CODE_FILES",
    "convert_checkpoint_to_hf",
    "convert_hf_to_checkpoint",
    "hf_config_kwargs",
    "hf_to_megatron_state_dict",
    "megatron_config_kwargs",
    "megatron_to_hf_state_dict",
    "PARAMETER_MAP",
    "parse_size",
    "resolve_checkpoint",
    "save_safetensors",
]

MODEL_CODE_FILES = ("configuration_linear_lm.py", "modeling_linear_lm.py")
"""The files copied into every exported directory (the remote code)."""

AUTO_MAP = {
    "AutoConfig": "configuration_linear_lm.LaspLinearLMConfig",
    "AutoModel": "modeling_linear_lm.LaspLinearLMModel",
    "AutoModelForCausalLM": "modeling_linear_lm.LaspLinearLMForCausalLM",
}
ARCHITECTURE = "LaspLinearLMForCausalLM"

SAFETENSORS_SINGLE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"

DTYPES = ("auto", "float32", "bfloat16", "float16")
MODEL_CARD = "README.md"
NO_LENGTH_LIMIT = int(1e30)
"""``model_max_length`` of the exported tokenizer: transformers' value for "no limit" (the recurrent
state has a fixed size; nothing in the model depends on the position)."""
MODEL_TYPE = "lasp_linear_lm"
"""``LaspLinearLMConfig.model_type`` (a test pins that they agree)."""


class ConversionError(RuntimeError):
    """A user error (bad path, missing iteration, unusable input); the message says which."""


# ---------------------------------------------------------------------------------------------
# paths and directories (standard library only)
# ---------------------------------------------------------------------------------------------


def resolve_checkpoint(load_dir: str, iteration: Optional[int] = None) -> Tuple[str, int, str]:
    """The checkpoint root, the iteration to convert and its directory.

    Args:
        load_dir: a training ``--save`` directory (or one of its ``iter_XXXXXXX`` directories).
        iteration: a specific iteration, or None for the latest (the tracker file).

    Raises:
        ConversionError: missing directory, no tracker / checkpoint, missing iteration.
    """
    if not os.path.isdir(load_dir):
        raise ConversionError(f"checkpoint directory {load_dir} does not exist")
    m = re.fullmatch(r"iter_(\d{7})", os.path.basename(os.path.normpath(load_dir)))
    if m and not os.path.isfile(os.path.join(load_dir, TRACKER_FILENAME)):
        given = int(m.group(1))  # the iteration directory itself was given
        if iteration is not None and iteration != given:
            raise ConversionError(f"--ckpt-step {iteration} contradicts the directory {load_dir}")
        load_dir, iteration = os.path.dirname(os.path.normpath(load_dir)), given
    if iteration is None:
        tracker = os.path.join(load_dir, TRACKER_FILENAME)
        if not os.path.isfile(tracker):
            raise ConversionError(f"no checkpoint found in {load_dir} ({TRACKER_FILENAME} missing)")
        with open(tracker) as f:
            text = f.read().strip()
        if not text.isdigit():
            raise ConversionError(
                f"{tracker}: expected an iteration number, found {text!r}; {other_iterations(load_dir, -1)}"
            )
        iteration = int(text)
    if iteration < 0:
        raise ConversionError(f"--ckpt-step must be >= 0, got {iteration}")
    path = checkpoint_name(load_dir, iteration)
    if not os.path.isdir(path):
        shown = ", ".join(map(str, list_iterations(load_dir))) or "none"
        raise ConversionError(
            f"iteration {iteration} not found in {load_dir} (available: {shown}; choose one with --ckpt-step)"
        )
    return load_dir, iteration, path


def check_checkpoint_files(root: str, iteration: int) -> None:
    """:func:`megatron_lasp.checkpoint_files.check_checkpoint_files`, as a :class:`ConversionError`."""
    try:
        checkpoint_files.check_checkpoint_files(root, iteration)
    except checkpoint_files.CheckpointError as err:
        raise ConversionError(str(err)) from None


def _inside(path: str, parent: str) -> bool:
    return path != parent and os.path.commonpath([path, parent]) == parent


def check_no_overlap(save_dir: str, sources: Dict[str, Optional[str]]) -> None:
    """Raise unless ``save_dir`` is apart from every source (realpaths: symlinks resolved).

    Args:
        save_dir: the directory to create or replace.
        sources: ``{what: path}`` of everything read (None entries are skipped).
    """
    target = os.path.realpath(save_dir)
    for what, source in sources.items():
        if not source:
            continue
        src = os.path.realpath(source)
        if target == src:
            raise ConversionError(f"--save {save_dir} is the {what} ({src}): choose a new directory")
        if _inside(target, src):
            raise ConversionError(f"--save {save_dir} lies inside the {what} ({src}): choose a directory outside it")
        if _inside(src, target):
            raise ConversionError(
                f"--save {save_dir} contains the {what} ({src}); replacing it would delete it: choose another directory"
            )


def check_target(save_dir: str, force: bool, sources: Optional[Dict[str, Optional[str]]] = None) -> None:
    """Raise unless ``save_dir`` is apart from ``sources`` (:func:`check_no_overlap`) and absent,
    empty, or ``force`` allows replacing it."""
    check_no_overlap(save_dir, sources or {})
    if os.path.exists(save_dir):
        if not os.path.isdir(save_dir):
            raise ConversionError(f"target {save_dir} exists and is not a directory")
        if os.listdir(save_dir) and not force:
            raise ConversionError(f"target {save_dir} exists and is not empty (use --force to replace it)")


@contextmanager
def atomic_directory(save_dir: str, force: bool, sources: Optional[Dict[str, Optional[str]]] = None) -> Iterator[str]:
    """:func:`megatron_lasp.atomic.atomic_directory` for ``save_dir``, after :func:`check_target`
    (``sources`` checked again before anything is created)."""
    check_target(save_dir, force, sources)
    with atomic.atomic_directory(save_dir) as tmp:
        yield tmp


def parse_size(text: str) -> int:
    """``"5GB"`` / ``"200MB"`` / ``"10KB"`` / ``"1GiB"`` / ``"12345"`` -> bytes.

    Raises:
        ConversionError: an unreadable size.
    """
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)?\s*", str(text), flags=re.IGNORECASE)
    if not m:
        raise ConversionError(f"--max-shard-size: cannot read {text!r} (examples: 5GB, 500MB, 1048576)")
    unit = (m.group(2) or "").upper()
    powers = {"": 0, "K": 1, "M": 2, "G": 3, "T": 4}
    base = 1024 if "I" in unit else 1000
    size = int(float(m.group(1)) * base ** powers[unit.rstrip("IB").rstrip("I")])
    if size < 1:
        raise ConversionError(f"--max-shard-size must be positive, got {text!r}")
    return size


# ---------------------------------------------------------------------------------------------
# configs
# ---------------------------------------------------------------------------------------------

# megatron-lasp LinearLMConfig field -> HF LaspLinearLMConfig field (same meaning and value).
_CONFIG_FIELDS = (
    ("num_layers", "num_hidden_layers"),
    ("hidden_size", "hidden_size"),
    ("num_attention_heads", "num_attention_heads"),
    ("kv_channels", "head_dim"),
    ("ffn_hidden_size", "intermediate_size"),
    ("layernorm_epsilon", "rms_norm_eps"),
    ("decay_type", "decay_type"),
    ("decay_layer_eps", "decay_layer_eps"),
    ("qk_feature_map", "qk_feature_map"),
    ("v_feature_map", "v_feature_map"),
    ("output_gate", "output_gate"),
    ("attention_norm_group_size", "attention_norm_group_size"),
    ("glu_type", "glu_type"),
    ("add_bias_linear", "add_bias_linear"),
    ("share_embeddings_and_output_weights", "tie_word_embeddings"),
    ("init_method_std", "initializer_range"),
)


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
    out = {hf: getattr(config, mg) for mg, hf in _CONFIG_FIELDS}
    out["vocab_size"] = int(vocab_size)
    if hybrid:  # transformers' hybrid convention: one layer type per layer
        out["layer_types"] = [LAYER_TYPES[symbol] for symbol in pattern]
        out["num_key_value_heads"] = groups or config.num_attention_heads
        out["rope_theta"] = float(config.rotary_base)
    return out


def megatron_config_kwargs(hf_config: Dict[str, Any]) -> Dict[str, Any]:
    """``LinearLMConfig`` keyword arguments (architecture only) from an HF ``config.json`` dict."""
    out = {mg: hf_config[hf] for mg, hf in _CONFIG_FIELDS if hf in hf_config}
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
        import torch

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
        import torch

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
        import torch

        heads, groups, head_dim = hf_config["num_attention_heads"], _kv_heads(hf_config), hf_config["head_dim"]
        q, k, v = tensors
        rest = q.shape[1:]
        parts = [q.reshape(groups, heads // groups, head_dim, *rest), k.reshape(groups, 1, head_dim, *rest),
                 v.reshape(groups, 1, head_dim, *rest)]
        return torch.cat(parts, dim=1).reshape((heads + 2 * groups) * head_dim, *rest)


RENAME, SPLIT_HEADS, SPLIT_HALVES, SPLIT_GROUPS = _Rename(), _SplitHeads(), _SplitHalves(), _SplitGroups()

PARAMETER_MAP = (
    # (megatron-lasp TP=1 name, HF name, transform, HF shape, present when); {L}: the layer,
    # {part}: the pieces of a split; shapes in V vocabulary rows, h hidden, W heads x head_dim,
    # F intermediate size.
    ("embedding.word_embeddings.weight", "model.embed_tokens.weight", RENAME, ("V", "h"), "always"),
    ("decoder.layers.{L}.input_layernorm.weight", "model.layers.{L}.input_norm.weight", RENAME, ("h",), "always"),
    ("decoder.layers.{L}.self_attention.linear_qkv.weight", "model.layers.{L}.attn.{part}_proj.weight", SPLIT_HEADS,
     ("W", "h"), "linear"),
    ("decoder.layers.{L}.self_attention.linear_qkv.weight", "model.layers.{L}.attn.{part}_proj.weight", SPLIT_GROUPS,
     (("W", "h"), ("K", "h"), ("K", "h")), "softmax"),
    ("decoder.layers.{L}.self_attention.linear_proj.weight", "model.layers.{L}.attn.o_proj.weight", RENAME,
     ("h", "W"), "always"),
    ("decoder.layers.{L}.mlp.linear_fc1.weight", "model.layers.{L}.mlp.{part}_proj.weight", SPLIT_HALVES,
     ("F", "h"), "always"),
    ("decoder.layers.{L}.mlp.linear_fc2.weight", "model.layers.{L}.mlp.down_proj.weight", RENAME, ("h", "F"), "always"),
    ("decoder.layers.{L}.self_attention.linear_qkv.bias", "model.layers.{L}.attn.{part}_proj.bias", SPLIT_HEADS,
     ("W",), "linear-bias"),
    ("decoder.layers.{L}.self_attention.linear_qkv.bias", "model.layers.{L}.attn.{part}_proj.bias", SPLIT_GROUPS,
     (("W",), ("K",), ("K",)), "softmax-bias"),
    ("decoder.layers.{L}.self_attention.linear_proj.bias", "model.layers.{L}.attn.o_proj.bias", RENAME, ("h",), "bias"),
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
dropped when present); "linear" / "softmax" rows only in the layers of that kind (a hybrid's
``layer_types``), "-bias" ones with ``add_bias_linear`` too. A row's shape is one per piece where
the pieces differ (a softmax layer's q and its k, v under GQA)."""


def _mapped(hf_config: Dict[str, Any], with_optional: bool = False) -> Iterator[Tuple[str, List[str], Any, tuple]]:
    """(megatron name, HF names, transform, HF shape of each piece) of every parameter of the
    model ``hf_config`` describes, in :data:`PARAMETER_MAP` order (per layer for layer rows);
    ``with_optional`` adds the rows a tied model may store."""
    sizes = {
        "V": hf_config["vocab_size"], "h": hf_config["hidden_size"], "F": hf_config["intermediate_size"],
        "W": hf_config["num_attention_heads"] * hf_config["head_dim"], "K": _kv_heads(hf_config) * hf_config["head_dim"],
    }
    bias = hf_config["add_bias_linear"]
    kinds = _layer_kinds(hf_config)

    def present(when: str, layer) -> bool:
        kind = None if layer is None else ("softmax" if kinds[layer] == SOFTMAX_SYMBOL else "linear")
        return {"always": True, "bias": bias, "untied": with_optional or not hf_config["tie_word_embeddings"],
                "linear": kind == "linear", "softmax": kind == "softmax", "linear-bias": bias and kind == "linear",
                "softmax-bias": bias and kind == "softmax"}[when]

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


HF_CONFIG_KEYS = (
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "head_dim", "intermediate_size",
    "output_gate", "add_bias_linear", "tie_word_embeddings",
)
"""The ``config.json`` entries the weight layout depends on."""


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


# ---------------------------------------------------------------------------------------------
# safetensors
# ---------------------------------------------------------------------------------------------


def save_safetensors(tensors: Dict[str, Any], directory: str, max_shard_size: int) -> List[str]:
    """Write ``tensors`` as ``model.safetensors``, or as shards + ``model.safetensors.index.json``
    when their total size exceeds ``max_shard_size`` bytes (a tensor larger than the limit gets
    a shard of its own). Returns the written file names."""
    from safetensors.torch import save_file

    shards: List[Dict[str, Any]] = [{}]
    sizes = [0]
    total = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        total += nbytes
        if shards[-1] and sizes[-1] + nbytes > max_shard_size:
            shards.append({})
            sizes.append(0)
        shards[-1][name] = t
        sizes[-1] += nbytes
    metadata = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], os.path.join(directory, SAFETENSORS_SINGLE), metadata=metadata)
        return [SAFETENSORS_SINGLE]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for shard, fname in zip(shards, names):
        save_file(shard, os.path.join(directory, fname), metadata=metadata)
        weight_map.update({k: fname for k in shard})
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    atomic.write_json(os.path.join(directory, SAFETENSORS_INDEX), index)
    return names + [SAFETENSORS_INDEX]


def _load_safetensors_file(path: str) -> Dict[str, Any]:
    from safetensors.torch import load_file

    if not os.path.isfile(path):
        raise ConversionError(f"{path} is missing")
    try:
        return load_file(path)
    except Exception as err:  # SafetensorError, OSError, a bad header: the file is unusable
        text = str(err).strip().splitlines()
        raise ConversionError(
            f"{path} is truncated or not a safetensors file ({text[0] if text else type(err).__name__})"
        ) from None


def load_safetensors(directory: str, with_files: bool = False):
    """All tensors of an HF directory (single file or sharded with an index).

    Returns:
        ``{name: tensor}``, or with ``with_files`` ``({name: tensor}, {name: file name})``.

    Raises:
        ConversionError: a missing, truncated or unreadable file, or an index that does not
            match its shards (the message names the file).
    """
    single = os.path.join(directory, SAFETENSORS_SINGLE)
    index_path = os.path.join(directory, SAFETENSORS_INDEX)
    if os.path.isfile(single):
        out = _load_safetensors_file(single)
        files = {name: SAFETENSORS_SINGLE for name in out}
    elif os.path.isfile(index_path):
        try:
            with open(index_path, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError
        except (ValueError, KeyError, TypeError, UnicodeDecodeError):
            raise ConversionError(f"{index_path} is not a safetensors index (JSON with a weight_map)") from None
        out, files = {}, {}
        for fname in sorted(set(weight_map.values())):
            shard = _load_safetensors_file(os.path.join(directory, fname))
            for name in shard:
                if weight_map.get(name) != fname:
                    raise ConversionError(
                        f"{os.path.join(directory, fname)} holds {name}, which {index_path} does not map to it"
                    )
            out.update(shard)
            files.update({name: fname for name in shard})
        missing = sorted(set(weight_map) - set(out))
        if missing:
            raise ConversionError(
                f"{os.path.join(directory, weight_map[missing[0]])} lacks {missing[0]}, which {index_path} maps to it"
            )
    else:
        raise ConversionError(f"{directory} has neither {SAFETENSORS_SINGLE} nor {SAFETENSORS_INDEX}")
    return (out, files) if with_files else out


# ---------------------------------------------------------------------------------------------
# tokenizer
# ---------------------------------------------------------------------------------------------


def tokenizer_from_settings(settings: Dict[str, Any]):
    """Build a megatron-lasp tokenizer from :func:`~megatron_lasp.data.tokenizer.build_tokenizer`
    keyword arguments; any failure becomes a one-line :class:`ConversionError`."""
    from megatron_lasp.data.tokenizer import build_tokenizer

    try:
        tokenizer = build_tokenizer(**settings)
        tokenizer.vocab_size  # noqa: B018 - reads and validates the files now
    except (ValueError, FileNotFoundError, OSError, KeyError) as err:
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ConversionError(f"tokenizer: {message}") from None
    return tokenizer


def tokenizer_paths(settings: Optional[Dict[str, Any]]) -> Dict[str, Optional[str]]:
    """The files a tokenizer is read from, as :func:`check_no_overlap` sources."""
    from megatron_lasp.data.tokenizer import TOKENIZER_PATH_KEYS

    settings = settings or {}
    return {f"tokenizer file ({key})": settings.get(key) for key in TOKENIZER_PATH_KEYS}


def complete_tokenizer_config(directory: str, pad_token_id: Optional[int]) -> None:
    """Make the exported tokenizer ready for batched generation: ``pad_token`` (the token of
    ``pad_token_id`` when the files name none), ``padding_side = "left"`` (the side generation
    wants) and ``model_max_length`` (:data:`NO_LENGTH_LIMIT` unless the files set one).
    Nothing is done for a tokenizer without ``tokenizer_config.json`` (no HF equivalent)."""
    path = os.path.join(directory, "tokenizer_config.json")
    if not os.path.isfile(path):
        return
    from transformers import AutoTokenizer

    with open(path, encoding="utf-8") as f:
        config = json.load(f)
    hf_tokenizer = AutoTokenizer.from_pretrained(directory)
    if hf_tokenizer.pad_token is None and pad_token_id is not None:
        config["pad_token"] = hf_tokenizer.convert_ids_to_tokens(pad_token_id)
    config["padding_side"] = "left"
    config.setdefault("model_max_length", NO_LENGTH_LIMIT)
    atomic.write_json(path, config)
    check = AutoTokenizer.from_pretrained(directory)
    assert pad_token_id is None or check.pad_token_id == pad_token_id, (check.pad_token_id, pad_token_id)


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
    rows = [
        ("layers", c["num_hidden_layers"]),
        ("hidden size", c["hidden_size"]),
        ("token mixer", f"causal linear attention, {heads} heads x {head_dim} channels, fixed decay per head "
                        f"(decay_type `{c['decay_type']}`), feature maps {maps}, {gate}, RMSNorm over groups of "
                        f"{c['attention_norm_group_size']} head(s)"),
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
        example = """tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=True)
model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, dtype=torch.float32)
inputs = tokenizer(["Once upon a time", "The model"], return_tensors="pt", padding=True)
out = model.generate(**inputs, max_new_tokens=20, do_sample=False)
print(tokenizer.batch_decode(out, skip_special_tokens=True))"""
        imports = "from transformers import AutoModelForCausalLM, AutoTokenizer"
    else:
        example = """model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, dtype=torch.float32)
out = model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=20, do_sample=False)
print(out.tolist())"""
        imports = "from transformers import AutoModelForCausalLM"
    return f"""---
library_name: transformers
pipeline_tag: text-generation
tags:
- megatron-lasp
- linear-attention
- custom_code
---

# {name}

A linear-attention causal language model (TransNormerLLM style) from megatron-lasp (Linear
Attention Sequence Parallelism on megatron-core), exported for `transformers`.

## Architecture

| | |
|---|---|
{table}

Each block is pre-norm: `x + o_proj(gate * GroupRMSNorm(LinAttn(q, k, v)))`, then `h + MLP(RMSNorm(h))`.
The attention has no softmax: per head `S_t = lambda S_(t-1) + k_t^T v_t`, `o_t = q_t S_t`, so
each layer keeps one `[{heads}, {head_dim}, {head_dim}]` fp32 state per sequence, whatever its length. The
model has no position embedding and no length limit (the tokenizer's `model_max_length` says so).

## Training

{training}

## Usage

Needs `torch` and `transformers>=5.17,<6`; `device_map=...` and `transformers.Trainer` also need
`accelerate` (`pip install accelerate`; in a megatron-lasp checkout, `pip install -e ".[hf]"`).
The model's code ships in this directory (`modeling_linear_lm.py`, `configuration_linear_lm.py`),
so loading it needs `trust_remote_code=True` (for `AutoTokenizer` and `pipeline` as well, which
read `config.json` too):

```python
import torch
{imports}

path = "{name}"  # this directory
{example}
```

- `generate()` keeps the recurrent state in its own cache (prompt once, then one step per token):
  greedy, sampling, beam search and streaming work; assisted generation does not (a state cannot
  be rolled back). Batches are padded on the left; padded positions add nothing to the state.
- `AutoModel.from_pretrained(path, trust_remote_code=True)` gives the model without its output layer.
- Fine-tuning: `labels` give the causal-LM loss (`num_items_in_batch` is honoured, so `Trainer`
  with gradient accumulation matches the full batch); `model.gradient_checkpointing_enable()`
  recomputes each block in the backward pass.
- Back to a megatron-lasp training checkpoint (any TP/PP/SP sizes):
  `python tools/convert_hf_to_checkpoint.py --load {name} --save DIR`, then train with `--load DIR --finetune`.
"""


def saved_tokenizer_settings(root: str, iteration: int) -> Optional[Dict[str, Any]]:
    """The tokenizer settings recorded in a checkpoint's ``config.json`` (None if absent).

    Raises:
        ConversionError: a missing or unreadable ``config.json`` (named, with the other iterations).
    """
    path = os.path.join(checkpoint_name(root, iteration), CONFIG_FILENAME)
    try:
        with open(path, encoding="utf-8") as f:
            saved = json.load(f)
        saved = saved.get("tokenizer") or {}
    except FileNotFoundError:
        raise ConversionError(
            f"damaged checkpoint: {path} is missing (not a megatron-lasp checkpoint, or an incomplete one); "
            f"{other_iterations(root, iteration)}"
        ) from None
    except (ValueError, UnicodeDecodeError, AttributeError) as err:
        raise ConversionError(
            f"damaged checkpoint: {path} is not a valid config ({err}); {other_iterations(root, iteration)}"
        ) from None
    if not saved.get("tokenizer_type"):
        return None
    from megatron_lasp.data.tokenizer import TokenizerSettings

    return TokenizerSettings.from_mapping(saved).as_dict()


# ---------------------------------------------------------------------------------------------
# checkpoint -> HF
# ---------------------------------------------------------------------------------------------


def _torch_dtype(name: str):
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def write_hf_directory(
    directory: str,
    hf_state_dict: Dict[str, Any],
    hf_kwargs: Dict[str, Any],
    tokenizer=None,
    max_shard_size: int = 5 * 10**9,
    extra_config: Optional[Dict[str, Any]] = None,
    name: Optional[str] = None,
) -> None:
    """Write an HF model directory's files into an existing (empty) ``directory``.

    Args:
        directory: where to write.
        hf_state_dict: HF names -> tensors (their dtype is kept).
        hf_kwargs: ``LaspLinearLMConfig`` keyword arguments.
        tokenizer: a megatron-lasp tokenizer whose files are saved, or None.
        max_shard_size: bytes per safetensors shard.
        extra_config: more ``config.json`` entries (``megatron_lasp``: the provenance, portable:
            no local paths).
        name: the model's name in the model card (default: ``directory``'s name).
    """
    from transformers import GenerationConfig

    from megatron_lasp.hf.configuration_linear_lm import LaspLinearLMConfig

    eod = tokenizer.eod if tokenizer is not None else None
    if tokenizer is not None:  # before config.json: AutoTokenizer would ask to trust its auto_map
        tokenizer.save_pretrained(directory)
        complete_tokenizer_config(directory, eod)
    dtypes = {str(t.dtype).replace("torch.", "") for t in hf_state_dict.values()}
    dtype = dtypes.pop() if len(dtypes) == 1 else None
    config = LaspLinearLMConfig(
        **hf_kwargs,
        bos_token_id=eod,
        eos_token_id=eod,
        pad_token_id=eod,
        architectures=[ARCHITECTURE],
        auto_map=dict(AUTO_MAP),
        dtype=dtype,
        **(extra_config or {}),
    )
    config.save_pretrained(directory)
    GenerationConfig(bos_token_id=eod, eos_token_id=eod, pad_token_id=eod).save_pretrained(directory)
    save_safetensors(hf_state_dict, directory, max_shard_size)
    here = os.path.dirname(os.path.abspath(__file__))
    for code_file in MODEL_CODE_FILES:
        shutil.copyfile(os.path.join(here, code_file), os.path.join(directory, code_file))
    num_parameters = sum(t.numel() for t in hf_state_dict.values())
    card = model_card(
        name or os.path.basename(os.path.abspath(directory)), hf_kwargs, num_parameters, dtype,
        (extra_config or {}).get("megatron_lasp"), tokenizer,
    )
    with open(os.path.join(directory, MODEL_CARD), "w", encoding="utf-8") as f:
        f.write(card)


def convert_checkpoint_to_hf(
    load_dir: str,
    save_dir: str,
    iteration: Optional[int] = None,
    tokenizer_settings: Optional[Dict[str, Any]] = None,
    max_shard_size: Any = "5GB",
    dtype: str = "auto",
    force: bool = False,
) -> str:
    """Convert a megatron-lasp checkpoint into a Hugging Face model directory.

    Args:
        load_dir: the training ``--save`` directory (or one of its ``iter_XXXXXXX``).
        save_dir: the HF directory to create (replaced atomically at the end).
        iteration: which iteration (default: the latest).
        tokenizer_settings: :func:`~megatron_lasp.data.tokenizer.build_tokenizer` keyword
            arguments; default: the settings recorded in the checkpoint (if any).
        max_shard_size: bytes or a size string ("5GB") per safetensors file.
        dtype: 'auto' (as saved) or a dtype name to cast the weights to.
        force: replace a non-empty ``save_dir``.

    Returns:
        ``save_dir``.

    Raises:
        ConversionError: bad inputs (the message names the problem).
    """
    if dtype not in DTYPES:
        raise ConversionError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    shard_bytes = parse_size(max_shard_size) if isinstance(max_shard_size, str) else int(max_shard_size)
    load_dir, iteration, path = resolve_checkpoint(load_dir, iteration)
    sources = {"checkpoint directory": load_dir}
    check_no_overlap(save_dir, sources)
    if tokenizer_settings is None:
        tokenizer_settings = saved_tokenizer_settings(load_dir, iteration)
    sources.update(tokenizer_paths(tokenizer_settings))
    check_target(save_dir, force, sources)
    tokenizer = tokenizer_from_settings(tokenizer_settings) if tokenizer_settings else None
    check_checkpoint_files(load_dir, iteration)

    import pickle
    import zipfile

    from megatron.core.dist_checkpointing.core import CheckpointingException

    from megatron_lasp.training.checkpointing import CheckpointError, load_model_for_inference

    try:
        model, config, saved = load_model_for_inference(load_dir, iteration, device="cpu")
    except (CheckpointError, CheckpointingException, ValueError, KeyError, TypeError, OSError, RuntimeError,
            EOFError, pickle.UnpicklingError, zipfile.BadZipFile) as err:
        text = str(err).strip()
        first = text.splitlines()[0] if text else type(err).__name__
        if isinstance(err, (KeyError, TypeError)):
            first = f"{CONFIG_FILENAME} does not describe a model ({type(err).__name__}: {first})"
        raise ConversionError(f"cannot load {path}: {first}; {other_iterations(load_dir, iteration)}") from None
    vocab_rows = model.embedding.word_embeddings.weight.shape[0]
    if tokenizer is not None and tokenizer.vocab_size > vocab_rows:
        raise ConversionError(
            f"tokenizer has {tokenizer.vocab_size} ids but the model's vocabulary has {vocab_rows} rows: "
            "wrong tokenizer"
        )
    hf_kwargs = hf_config_kwargs(config, vocab_rows)
    tensors = megatron_to_hf_state_dict(model.state_dict(), hf_kwargs)
    if dtype != "auto":
        tensors = {k: v.to(_torch_dtype(dtype)) for k, v in tensors.items()}
    provenance = {  # portable: sizes and settings, no paths of this machine
        "megatron_lasp": {
            "iteration": iteration,
            "parallel": saved.get("parallel"),
            "model": saved.get("model"),
            "seq_length": saved.get("seq_length"),
            "tokenizer_type": (tokenizer_settings or {}).get("tokenizer_type"),
        }
    }
    name = os.path.basename(os.path.abspath(save_dir))
    with atomic_directory(save_dir, force, sources) as tmp:
        write_hf_directory(tmp, tensors, hf_kwargs, tokenizer, shard_bytes, provenance, name=name)
    logger.info("converted %s (iteration %d) to %s", path, iteration, save_dir)
    return save_dir


# ---------------------------------------------------------------------------------------------
# HF -> checkpoint
# ---------------------------------------------------------------------------------------------


def read_hf_config(load_dir: str) -> Dict[str, Any]:
    """An exported directory's ``config.json`` (checked to be this model type)."""
    if not os.path.isdir(load_dir):
        raise ConversionError(f"HF model directory {load_dir} does not exist")
    path = os.path.join(load_dir, "config.json")
    if not os.path.isfile(path):
        raise ConversionError(f"{load_dir} has no config.json: not a Hugging Face model directory")
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (ValueError, UnicodeDecodeError) as err:
        raise ConversionError(f"{path} is not valid JSON ({err})") from None
    if not isinstance(config, dict) or config.get("model_type") != MODEL_TYPE:
        found = config.get("model_type") if isinstance(config, dict) else None
        raise ConversionError(f"{path}: model_type {found!r} is not {MODEL_TYPE!r}")
    missing = [key for key in HF_CONFIG_KEYS if key not in config]
    if missing:
        raise ConversionError(f"{path} lacks {', '.join(missing)}")
    return config


def _run_record(
    config: Any,
    vocab_rows: int,
    tokenizer_settings: Optional[Dict[str, Any]],
    tokenizer_vocab: Optional[int],
    seq_length: Optional[int],
    save_dir: str,
):
    """What a converted checkpoint records of the run (``config.json``, ``args.json``): one
    process (TP=PP=SP=DP=1), the vocabulary, the tokenizer and, in ``args.json``, the architecture."""
    import dataclasses

    from megatron_lasp.data.tokenizer import TokenizerSettings
    from megatron_lasp.training.checkpointing import RunRecord

    run = RunRecord(vocab_size_tokenizer=tokenizer_vocab, padded_vocab_size=vocab_rows, seq_length=seq_length,
                    tokenizer=TokenizerSettings.from_mapping(tokenizer_settings or {}))
    flags = {f.name: getattr(run, f.name) for f in dataclasses.fields(run) if f.name not in ("tokenizer", "flags")}
    flags.update(run.tokenizer.as_dict(), save=os.path.abspath(save_dir), num_layers=config.num_layers,
                 hidden_size=config.hidden_size, num_attention_heads=config.num_attention_heads,
                 ffn_hidden_size=config.ffn_hidden_size, init_method_std=config.init_method_std)
    if getattr(config, "is_hybrid", False):
        flags.update(hybrid_layer_pattern=config.hybrid_layer_pattern, num_query_groups=config.num_query_groups,
                     rotary_base=config.rotary_base)
    return dataclasses.replace(run, flags=dict(sorted(flags.items())))


def convert_hf_to_checkpoint(
    load_dir: str,
    save_dir: str,
    iteration: Optional[int] = None,
    tokenizer_settings: Optional[Dict[str, Any]] = None,
    force: bool = False,
) -> str:
    """Convert an exported HF directory back into a megatron-lasp training checkpoint.

    Single process: builds the TP=1 model (a one-rank gloo group is created when there is no
    process group), loads the converted weights, saves them with megatron-core
    ``dist_checkpointing`` (loadable at any TP/PP/SP sizes) as ``save_dir/iter_XXXXXXX`` with
    ``config.json`` / ``args.json`` and the tracker file. Weights only: no optimizer state, so
    load with ``--finetune`` (or ``--no-load-optim --no-load-rng``).

    Args:
        load_dir: the HF directory (``config.json`` + safetensors).
        save_dir: the checkpoint directory to create (replaced atomically at the end).
        iteration: the iteration number to record (default: the source checkpoint's, recorded
            in ``config.json``; 0 when there is none).
        tokenizer_settings: recorded in ``config.json``; default: ``HuggingFaceTokenizer`` on
            ``load_dir`` when it holds a ``tokenizer.json``.
        force: replace a non-empty ``save_dir``.

    Returns:
        ``save_dir``.
    """
    hf_config = read_hf_config(load_dir)
    provenance = hf_config.get("megatron_lasp") or {}
    if iteration is None:
        iteration = int(provenance.get("iteration") or 0)
    if iteration < 0:
        raise ConversionError(f"--iteration must be >= 0, got {iteration}")
    sources = {"HF model directory": load_dir}
    check_no_overlap(save_dir, sources)
    if tokenizer_settings is None and os.path.isfile(os.path.join(load_dir, "tokenizer.json")):
        tokenizer_settings = {"tokenizer_type": "HuggingFaceTokenizer", "tokenizer_model": os.path.abspath(load_dir)}
    sources.update(tokenizer_paths(tokenizer_settings))
    check_target(save_dir, force, sources)
    tokenizer = tokenizer_from_settings(tokenizer_settings) if tokenizer_settings else None
    hf_tensors, files = load_safetensors(load_dir, with_files=True)
    check_hf_tensors(hf_tensors, files, hf_config, load_dir)

    import torch
    import torch.distributed as dist

    from megatron_lasp.models import LinearLMConfig, build_linear_lm
    from megatron_lasp.parallel.state import initialize_parallel
    from megatron_lasp.training.checkpointing import architecture_fields, save_weights_only

    mg_tensors = hf_to_megatron_state_dict(hf_tensors, hf_config)
    vocab_rows = hf_config["vocab_size"]
    if dist.is_initialized() and dist.get_world_size() != 1:
        raise ConversionError("convert_hf_to_checkpoint runs on a single process (world size 1)")
    initialize_parallel(1, 1, 1, backend="gloo" if not torch.cuda.is_available() else None)
    dtypes = {t.dtype for t in mg_tensors.values()}
    params_dtype = dtypes.pop() if len(dtypes) == 1 else torch.float32
    fields = architecture_fields(provenance.get("model") or {})  # the original run's (dropout, init std ...)
    fields.update(megatron_config_kwargs(hf_config))
    config = LinearLMConfig(
        **fields, use_cpu_initialization=True, perform_initialization=False, params_dtype=params_dtype
    )
    model = build_linear_lm(config, vocab_rows)
    missing, unexpected = model.load_state_dict(mg_tensors, strict=False)
    missing = [k for k in missing if not k.endswith("._extra_state")]
    if missing or unexpected:
        raise ConversionError(f"weights do not fit the model: missing {missing}, unexpected {unexpected}")
    tokenizer_vocab = tokenizer.vocab_size if tokenizer else None
    run = _run_record(config, vocab_rows, tokenizer_settings, tokenizer_vocab, provenance.get("seq_length"), save_dir)
    with atomic_directory(save_dir, force, sources) as tmp:
        save_weights_only(model, config, run, tmp, iteration, extra_config={"converted_from": os.path.abspath(load_dir)})
    logger.info("converted %s to the checkpoint %s (iteration %d)", load_dir, save_dir, iteration)
    return save_dir
