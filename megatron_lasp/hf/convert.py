"""Conversion between megatron-lasp checkpoints and Hugging Face model directories.

Checkpoint -> HF (:func:`convert_checkpoint_to_hf`): the checkpoint (any saved TP/PP/SP sizes) is
loaded on one process at TP=1 by ``megatron_lasp.training.load_model_for_inference``; its state
dict is renamed (and the fused projections split, see below) into the HF model's names and
written as safetensors (sharded with an index above ``max_shard_size``), next to ``config.json``
(with ``auto_map``), ``generation_config.json``, the tokenizer files and the modeling code
(``configuration_linear_lm.py``, ``modeling_linear_lm.py``, copied from this package).

HF -> checkpoint (:func:`convert_hf_to_checkpoint`): the inverse mapping, loaded into a TP=1
megatron-lasp model and saved through megatron-core ``dist_checkpointing`` in the training
layout (``iter_XXXXXXX/`` + ``config.json`` + ``args.json`` + the tracker file), weights only:
continue training with ``pretrain_linear_lm.py --load DIR --finetune`` (or ``--no-load-optim
--no-load-rng``) at any TP/PP/SP sizes.

Parameter mapping (megatron-lasp TP=1 names -> HF names; ``L`` = layer)::

    embedding.word_embeddings.weight                 model.embed_tokens.weight
    decoder.layers.L.input_layernorm.weight          model.layers.L.input_norm.weight
    decoder.layers.L.self_attention.linear_qkv.*     model.layers.L.attn.{q,k,v,g}_proj.*
    decoder.layers.L.self_attention.out_norm.weight  model.layers.L.attn.o_norm.weight
    decoder.layers.L.self_attention.linear_proj.*    model.layers.L.attn.o_proj.*
    decoder.layers.L.pre_mlp_layernorm.weight        model.layers.L.mlp_norm.weight
    decoder.layers.L.mlp.linear_fc1.*                model.layers.L.mlp.{gate,up}_proj.*
    decoder.layers.L.mlp.linear_fc2.*                model.layers.L.mlp.down_proj.*
    decoder.final_layernorm.weight                   model.norm.weight
    output_layer.weight                              lm_head.weight (absent when tied)

``linear_qkv`` rows are head-major ``[head 0: q, k, v, (g) | head 1: ...]`` (``D`` rows per part;
``megatron_lasp/models/attention.py``); ``linear_fc1`` rows are ``[W1 (activation side); W2]``
(megatron-core's GLU ``chunk(2)``). Both splits are pure slicing, so conversions are exact.

Only the standard library is imported at module level: the command-line tools validate their
arguments (and fail with one-line messages) before torch or megatron-core are imported.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from typing import Any, Dict, Iterator, List, Optional, Tuple

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
    "parse_size",
    "resolve_checkpoint",
    "save_safetensors",
]

MODEL_CODE_FILES = ("configuration_linear_lm.py", "modeling_linear_lm.py")
"""The files copied into every exported directory (the remote code)."""

AUTO_MAP = {
    "AutoConfig": "configuration_linear_lm.LaspLinearLMConfig",
    "AutoModelForCausalLM": "modeling_linear_lm.LaspLinearLMForCausalLM",
}
ARCHITECTURE = "LaspLinearLMForCausalLM"

# The training package's checkpoint layout (megatron_lasp/training/checkpointing.py; a test pins
# that these agree). Kept here so that argument errors surface before torch is imported.
TRACKER_FILENAME = "latest_checkpointed_iteration.txt"
CHECKPOINT_CONFIG = "config.json"
SAFETENSORS_SINGLE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"

DTYPES = ("auto", "float32", "bfloat16", "float16")
MODEL_TYPE = "lasp_linear_lm"
"""``LaspLinearLMConfig.model_type`` (a test pins that they agree)."""


class ConversionError(RuntimeError):
    """A user error (bad path, missing iteration, unusable input); the message says which."""


# ---------------------------------------------------------------------------------------------
# paths and directories (standard library only)
# ---------------------------------------------------------------------------------------------


def checkpoint_dir(root: str, iteration: int) -> str:
    """``root/iter_0000010``."""
    return os.path.join(root, f"iter_{iteration:07d}")


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
            raise ConversionError(f"--iteration {iteration} contradicts the directory {load_dir}")
        load_dir, iteration = os.path.dirname(os.path.normpath(load_dir)), given
    if iteration is None:
        tracker = os.path.join(load_dir, TRACKER_FILENAME)
        if not os.path.isfile(tracker):
            raise ConversionError(f"no checkpoint found in {load_dir} ({TRACKER_FILENAME} missing)")
        with open(tracker) as f:
            text = f.read().strip()
        if not text.isdigit():
            raise ConversionError(f"{tracker}: expected an iteration number, found {text!r}")
        iteration = int(text)
    path = checkpoint_dir(load_dir, iteration)
    if not os.path.isdir(path):
        matches = (re.fullmatch(r"iter_(\d{7})", n) for n in os.listdir(load_dir))
        found = sorted(int(m.group(1)) for m in matches if m)
        shown = ", ".join(str(i) for i in found) or "none"
        raise ConversionError(f"iteration {iteration} not found in {load_dir} (available: {shown})")
    if not os.path.isfile(os.path.join(path, CHECKPOINT_CONFIG)):
        raise ConversionError(
            f"{path} has no {CHECKPOINT_CONFIG}: not a megatron-lasp checkpoint, or an incomplete one"
        )
    return load_dir, iteration, path


def check_target(save_dir: str, force: bool) -> None:
    """Raise unless ``save_dir`` is absent, empty, or ``force`` allows replacing it."""
    if os.path.exists(save_dir):
        if not os.path.isdir(save_dir):
            raise ConversionError(f"target {save_dir} exists and is not a directory")
        if os.listdir(save_dir) and not force:
            raise ConversionError(f"target {save_dir} exists and is not empty (use --force to replace it)")


@contextmanager
def atomic_directory(save_dir: str, force: bool) -> Iterator[str]:
    """Yield a temporary directory beside ``save_dir``; on success it replaces ``save_dir``.

    On an exception the temporary directory is removed and ``save_dir`` is left untouched.
    """
    check_target(save_dir, force)
    target = os.path.abspath(save_dir)
    parent = os.path.dirname(target)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.tmp-", dir=parent)
    try:
        yield tmp
        os.chmod(tmp, 0o755)
        if os.path.isdir(target):
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.old-", dir=parent)
            os.rmdir(old)
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


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
    if groups not in (None, config.num_attention_heads):
        raise ConversionError(f"num_query_groups={groups} differs from num_attention_heads")
    out = {hf: getattr(config, mg) for mg, hf in _CONFIG_FIELDS}
    out["vocab_size"] = int(vocab_size)
    return out


def megatron_config_kwargs(hf_config: Dict[str, Any]) -> Dict[str, Any]:
    """``LinearLMConfig`` keyword arguments (architecture only) from an HF ``config.json`` dict."""
    return {mg: hf_config[hf] for mg, hf in _CONFIG_FIELDS if hf in hf_config}


# ---------------------------------------------------------------------------------------------
# state dicts
# ---------------------------------------------------------------------------------------------


def _qkv_parts(hf_config: Dict[str, Any]) -> List[str]:
    return ["q", "k", "v", "g"] if hf_config["output_gate"] else ["q", "k", "v"]


def megatron_to_hf_state_dict(state_dict: Dict[str, Any], hf_config: Dict[str, Any]) -> Dict[str, Any]:
    """Rename / split a TP=1 megatron-lasp state dict into the HF model's names.

    Args:
        state_dict: ``LinearLM.state_dict()`` at TP=1 (``_extra_state`` entries are ignored).
        hf_config: :func:`hf_config_kwargs` output (or the HF ``config.json`` dict).

    Returns:
        ``{hf name: tensor}`` (contiguous tensors, values unchanged).

    Raises:
        ConversionError: a missing or unexpected parameter, or a shape that does not fit.
    """
    sd = {k: v for k, v in state_dict.items() if not k.endswith("._extra_state")}
    heads, head_dim = hf_config["num_attention_heads"], hf_config["head_dim"]
    ffn = hf_config["intermediate_size"]
    parts = _qkv_parts(hf_config)
    out: Dict[str, Any] = {}

    def take(name: str):
        if name not in sd:
            raise ConversionError(f"parameter {name} missing from the checkpoint")
        return sd.pop(name)

    def split_rows_by_head(t, prefix: str):
        # [H * P * D, ...] head-major -> one [H * D, ...] tensor per part
        if t.shape[0] != heads * len(parts) * head_dim:
            raise ConversionError(
                f"{prefix}: {tuple(t.shape)} does not match {heads} heads x {len(parts)} parts x {head_dim}"
            )
        view = t.reshape(heads, len(parts), head_dim, *t.shape[1:])
        return [view[:, i].reshape(heads * head_dim, *t.shape[1:]).contiguous() for i in range(len(parts))]

    out["model.embed_tokens.weight"] = take("embedding.word_embeddings.weight")
    bias_names = ["weight", "bias"] if hf_config["add_bias_linear"] else ["weight"]
    for layer in range(hf_config["num_hidden_layers"]):
        mg, hf = f"decoder.layers.{layer}.", f"model.layers.{layer}."
        out[hf + "input_norm.weight"] = take(mg + "input_layernorm.weight")
        for kind in bias_names:
            qkv = split_rows_by_head(take(mg + f"self_attention.linear_qkv.{kind}"), mg + "linear_qkv")
            for part, tensor in zip(parts, qkv):
                out[hf + f"attn.{part}_proj.{kind}"] = tensor
            out[hf + f"attn.o_proj.{kind}"] = take(mg + f"self_attention.linear_proj.{kind}")
            fc1 = take(mg + f"mlp.linear_fc1.{kind}")
            if fc1.shape[0] != 2 * ffn:
                raise ConversionError(f"{mg}mlp.linear_fc1.{kind}: {tuple(fc1.shape)} is not 2 x {ffn} rows")
            out[hf + f"mlp.gate_proj.{kind}"] = fc1[:ffn].contiguous()
            out[hf + f"mlp.up_proj.{kind}"] = fc1[ffn:].contiguous()
            out[hf + f"mlp.down_proj.{kind}"] = take(mg + f"mlp.linear_fc2.{kind}")
        out[hf + "attn.o_norm.weight"] = take(mg + "self_attention.out_norm.weight")
        out[hf + "mlp_norm.weight"] = take(mg + "pre_mlp_layernorm.weight")
    out["model.norm.weight"] = take("decoder.final_layernorm.weight")
    if hf_config["tie_word_embeddings"]:
        sd.pop("output_layer.weight", None)
    else:
        out["lm_head.weight"] = take("output_layer.weight")
    if sd:
        raise ConversionError(f"unexpected parameters in the checkpoint: {', '.join(sorted(sd))}")
    return {k: v.contiguous() for k, v in out.items()}


def hf_to_megatron_state_dict(state_dict: Dict[str, Any], hf_config: Dict[str, Any]) -> Dict[str, Any]:
    """The inverse of :func:`megatron_to_hf_state_dict` (exact: concatenation only).

    Returns:
        ``{megatron-lasp TP=1 name: tensor}`` without ``_extra_state`` entries and without
        ``output_layer.weight`` when the embeddings are tied.

    Raises:
        ConversionError: a missing or unexpected parameter.
    """
    import torch

    sd = dict(state_dict)
    heads, head_dim = hf_config["num_attention_heads"], hf_config["head_dim"]
    parts = _qkv_parts(hf_config)
    out: Dict[str, Any] = {}

    def take(name: str):
        if name not in sd:
            raise ConversionError(f"parameter {name} missing from the HF model")
        return sd.pop(name)

    out["embedding.word_embeddings.weight"] = take("model.embed_tokens.weight")
    bias_names = ["weight", "bias"] if hf_config["add_bias_linear"] else ["weight"]
    for layer in range(hf_config["num_hidden_layers"]):
        mg, hf = f"decoder.layers.{layer}.", f"model.layers.{layer}."
        out[mg + "input_layernorm.weight"] = take(hf + "input_norm.weight")
        for kind in bias_names:
            pieces = [take(hf + f"attn.{p}_proj.{kind}") for p in parts]
            rest = pieces[0].shape[1:]
            stacked = torch.stack([t.reshape(heads, head_dim, *rest) for t in pieces], dim=1)
            out[mg + f"self_attention.linear_qkv.{kind}"] = stacked.reshape(heads * len(parts) * head_dim, *rest)
            out[mg + f"self_attention.linear_proj.{kind}"] = take(hf + f"attn.o_proj.{kind}")
            out[mg + f"mlp.linear_fc1.{kind}"] = torch.cat(
                [take(hf + f"mlp.gate_proj.{kind}"), take(hf + f"mlp.up_proj.{kind}")], dim=0
            )
            out[mg + f"mlp.linear_fc2.{kind}"] = take(hf + f"mlp.down_proj.{kind}")
        out[mg + "self_attention.out_norm.weight"] = take(hf + "attn.o_norm.weight")
        out[mg + "pre_mlp_layernorm.weight"] = take(hf + "mlp_norm.weight")
    out["decoder.final_layernorm.weight"] = take("model.norm.weight")
    if hf_config["tie_word_embeddings"]:
        sd.pop("lm_head.weight", None)
    else:
        out["output_layer.weight"] = take("lm_head.weight")
    if sd:
        raise ConversionError(f"unexpected parameters in the HF model: {', '.join(sorted(sd))}")
    return {k: v.contiguous() for k, v in out.items()}


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
    _write_json(os.path.join(directory, SAFETENSORS_INDEX), index)
    return names + [SAFETENSORS_INDEX]


def load_safetensors(directory: str) -> Dict[str, Any]:
    """All tensors of an HF directory (single file or sharded with an index)."""
    from safetensors.torch import load_file

    single = os.path.join(directory, SAFETENSORS_SINGLE)
    if os.path.isfile(single):
        return load_file(single)
    index_path = os.path.join(directory, SAFETENSORS_INDEX)
    if not os.path.isfile(index_path):
        raise ConversionError(f"{directory} has neither {SAFETENSORS_SINGLE} nor {SAFETENSORS_INDEX}")
    with open(index_path, encoding="utf-8") as f:
        weight_map = json.load(f)["weight_map"]
    out = {}
    for fname in sorted(set(weight_map.values())):
        out.update(load_file(os.path.join(directory, fname)))
    missing = set(weight_map) - set(out)
    if missing:
        raise ConversionError(f"{index_path} names tensors absent from its shards: {', '.join(sorted(missing))}")
    return out


def _write_json(path: str, obj: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")


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


def saved_tokenizer_settings(checkpoint_path: str) -> Optional[Dict[str, Any]]:
    """The tokenizer settings recorded in a checkpoint's ``config.json`` (None if absent)."""
    with open(os.path.join(checkpoint_path, CHECKPOINT_CONFIG), encoding="utf-8") as f:
        saved = json.load(f).get("tokenizer") or {}
    if not saved.get("tokenizer_type"):
        return None
    keys = ("tokenizer_type", "tokenizer_model", "vocab_file", "merge_file", "vocab_size")
    return {k: saved.get(k) for k in keys}


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
) -> None:
    """Write an HF model directory's files into an existing (empty) ``directory``.

    Args:
        directory: where to write.
        hf_state_dict: HF names -> tensors (their dtype is kept).
        hf_kwargs: ``LaspLinearLMConfig`` keyword arguments.
        tokenizer: a megatron-lasp tokenizer whose files are saved, or None.
        max_shard_size: bytes per safetensors shard.
        extra_config: more ``config.json`` entries (provenance).
    """
    from transformers import GenerationConfig

    from megatron_lasp.hf.configuration_linear_lm import LaspLinearLMConfig

    eod = tokenizer.eod if tokenizer is not None else None
    dtypes = {str(t.dtype).replace("torch.", "") for t in hf_state_dict.values()}
    config = LaspLinearLMConfig(
        **hf_kwargs,
        bos_token_id=eod,
        eos_token_id=eod,
        pad_token_id=eod,
        architectures=[ARCHITECTURE],
        auto_map=dict(AUTO_MAP),
        dtype=dtypes.pop() if len(dtypes) == 1 else None,
        **(extra_config or {}),
    )
    config.save_pretrained(directory)
    GenerationConfig(bos_token_id=eod, eos_token_id=eod, pad_token_id=eod).save_pretrained(directory)
    save_safetensors(hf_state_dict, directory, max_shard_size)
    here = os.path.dirname(os.path.abspath(__file__))
    for name in MODEL_CODE_FILES:
        shutil.copyfile(os.path.join(here, name), os.path.join(directory, name))
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)


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
    check_target(save_dir, force)
    if tokenizer_settings is None:
        tokenizer_settings = saved_tokenizer_settings(path)
    tokenizer = tokenizer_from_settings(tokenizer_settings) if tokenizer_settings else None

    from megatron.core.dist_checkpointing.core import CheckpointingException

    from megatron_lasp.training.checkpointing import CheckpointError, load_model_for_inference

    try:
        model, config, saved = load_model_for_inference(load_dir, iteration, device="cpu")
    except (CheckpointError, CheckpointingException, ValueError, KeyError, FileNotFoundError) as err:
        text = str(err).strip()
        first = text.splitlines()[0] if text else type(err).__name__
        if isinstance(err, KeyError):
            first = f"config.json lacks {text}"
        raise ConversionError(f"cannot load {path}: {first}") from None
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
    provenance = {
        "megatron_lasp": {
            "source": os.path.abspath(load_dir),
            "iteration": iteration,
            "parallel": saved.get("parallel"),
            "model": saved.get("model"),
            "seq_length": saved.get("seq_length"),
        }
    }
    with atomic_directory(save_dir, force) as tmp:
        write_hf_directory(tmp, tensors, hf_kwargs, tokenizer, shard_bytes, provenance)
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
    with open(path, encoding="utf-8") as f:
        config = json.load(f)
    if config.get("model_type") != MODEL_TYPE:
        raise ConversionError(f"{path}: model_type {config.get('model_type')!r} is not {MODEL_TYPE!r}")
    return config


def _training_args(
    config: Any,
    vocab_rows: int,
    tokenizer_settings: Optional[Dict[str, Any]],
    tokenizer_vocab: Optional[int],
    seq_length: Optional[int],
) -> argparse.Namespace:
    """The training flags recorded with a converted checkpoint (``args.json``): the parser's
    defaults, the architecture, TP=PP=SP=1 and the tokenizer."""
    from megatron_lasp.training.arguments import build_parser

    args = build_parser().parse_args([])
    args.num_layers, args.hidden_size = config.num_layers, config.hidden_size
    args.num_attention_heads, args.ffn_hidden_size = config.num_attention_heads, config.ffn_hidden_size
    args.init_method_std = config.init_method_std
    args.seq_length = seq_length
    args.padded_vocab_size = vocab_rows
    args.vocab_size_tokenizer = tokenizer_vocab
    args.data_parallel_size = 1
    args.world_size = 1
    args.ddp_impl = args.ddp_impl or "torch"
    for key in ("tokenizer_type", "tokenizer_model", "vocab_file", "merge_file", "vocab_size"):
        setattr(args, key, (tokenizer_settings or {}).get(key))
    return args


def convert_hf_to_checkpoint(
    load_dir: str,
    save_dir: str,
    iteration: int = 0,
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
        iteration: the iteration number to record (default 0).
        tokenizer_settings: recorded in ``config.json``; default: ``HuggingFaceTokenizer`` on
            ``load_dir`` when it holds a ``tokenizer.json``.
        force: replace a non-empty ``save_dir``.

    Returns:
        ``save_dir``.
    """
    hf_config = read_hf_config(load_dir)
    if iteration < 0:
        raise ConversionError(f"--iteration must be >= 0, got {iteration}")
    check_target(save_dir, force)
    if tokenizer_settings is None and os.path.isfile(os.path.join(load_dir, "tokenizer.json")):
        tokenizer_settings = {"tokenizer_type": "HuggingFaceTokenizer", "tokenizer_model": os.path.abspath(load_dir)}
    tokenizer = tokenizer_from_settings(tokenizer_settings) if tokenizer_settings else None

    import torch
    import torch.distributed as dist
    from megatron.core import dist_checkpointing

    from megatron_lasp.models import LinearLMConfig, build_linear_lm
    from megatron_lasp.parallel.state import initialize_parallel
    from megatron_lasp.training import checkpointing as ckpt

    hf_tensors = load_safetensors(load_dir)
    mg_tensors = hf_to_megatron_state_dict(hf_tensors, hf_config)
    vocab_rows = hf_config["vocab_size"]
    if dist.is_initialized() and dist.get_world_size() != 1:
        raise ConversionError("convert_hf_to_checkpoint runs on a single process (world size 1)")
    initialize_parallel(1, 1, 1, backend="gloo" if not torch.cuda.is_available() else None)
    dtypes = {t.dtype for t in mg_tensors.values()}
    params_dtype = dtypes.pop() if len(dtypes) == 1 else torch.float32
    provenance = hf_config.get("megatron_lasp") or {}
    fields = dict(provenance.get("model") or {})  # the original run's fields (dropout, init std ...)
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
    args = _training_args(config, vocab_rows, tokenizer_settings, tokenizer_vocab, provenance.get("seq_length"))
    args.save = os.path.abspath(save_dir)
    with atomic_directory(save_dir, force) as tmp:
        path = checkpoint_dir(tmp, iteration)
        os.makedirs(path)
        state = {
            "model": model.sharded_state_dict(),
            "iteration": iteration,
            "consumed_train_samples": 0,
            "consumed_valid_samples": 0,
            "checkpoint_version": ckpt.FORMAT_VERSION,
        }
        dist_checkpointing.save(state, path)
        saved_config = ckpt.config_dict(config, args)
        saved_config["weights_only"] = True
        saved_config["converted_from"] = os.path.abspath(load_dir)
        ckpt._write_json(os.path.join(path, ckpt.CONFIG_FILENAME), saved_config)
        ckpt._write_json(os.path.join(path, ckpt.ARGS_FILENAME), ckpt._json_args(args))
        with open(os.path.join(tmp, TRACKER_FILENAME), "w") as f:
            f.write(f"{iteration}\n")
    logger.info("converted %s to the checkpoint %s (iteration %d)", load_dir, save_dir, iteration)
    return save_dir
