"""What a conversion reads and writes, checked before anything heavy is imported (standard library
only: the command-line tools, through :mod:`megatron_lasp.hf.cli`, fail on bad flags and paths in
one line before torch or megatron-core load).

- the HF directory's file names and ``config.json`` (:func:`read_hf_config`);
- the checkpoint to convert (:func:`resolve_checkpoint`, through
  :mod:`megatron_lasp.checkpoint.resolve`, the reader training uses too);
- the target (:func:`check_target`, :func:`atomic_directory`): never the source, inside it or
  around it; replaced only with ``--force``, atomically;
- a source of the wrong kind (:func:`directory_kind`): each converter names the other one.
"""

from __future__ import annotations

import json
import os
import re
from contextlib import contextmanager
from typing import Any, Dict, Iterator, Optional, Tuple

from megatron_lasp import atomic
from megatron_lasp.checkpoint.layout import TRACKER_FILENAME, checkpoint_name, iteration_of_directory
from megatron_lasp.checkpoint.resolve import resolve_iteration, split_iteration_directory

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
MODEL_CARD = "README.md"
HF_CONFIG = "config.json"
DTYPES = ("auto", "float32", "bfloat16", "float16")
MODEL_TYPE = "lasp_linear_lm"
"""``LaspLinearLMConfig.model_type`` (a test pins that they agree)."""
HF_CONFIG_KEYS = (
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "head_dim", "intermediate_size",
    "output_gate", "add_bias_linear", "tie_word_embeddings",
)
"""The ``config.json`` entries the weight layout depends on."""
TO_HF_TOOL = "tools/convert_checkpoint_to_hf.py"
TO_CHECKPOINT_TOOL = "tools/convert_hf_to_checkpoint.py"


class ConversionError(RuntimeError):
    """A user error (bad path, missing iteration, unusable input); the message says which."""


def directory_kind(path: str) -> Optional[str]:
    """What ``path`` holds: ``"checkpoint"`` (a tracker file or ``iter_*`` directories, or one
    ``iter_*`` directory itself), ``"hf"`` (``config.json`` beside safetensors files) or None."""
    if not os.path.isdir(path):
        return None
    names = set(os.listdir(path))
    if TRACKER_FILENAME in names or any(iteration_of_directory(name) is not None for name in names):
        return "checkpoint"
    if iteration_of_directory(path) is not None and names & {"metadata.json", ".metadata"}:
        return "checkpoint"
    if HF_CONFIG in names and names & {SAFETENSORS_SINGLE, SAFETENSORS_INDEX}:
        return "hf"
    return None


def resolve_checkpoint(load_dir: str, iteration: Optional[int] = None) -> Tuple[str, int, str]:
    """The checkpoint root, the iteration to convert and its directory.

    Args:
        load_dir: a training ``--save`` directory (or one of its ``iter_XXXXXXX`` directories).
        iteration: a specific iteration, or None for the latest (the tracker file).

    Raises:
        ConversionError: missing directory, no tracker, missing iteration.
    """
    if not os.path.isdir(load_dir):
        raise ConversionError(f"checkpoint directory {load_dir} does not exist")
    if directory_kind(load_dir) == "hf":
        raise ConversionError(f"{load_dir} is a Hugging Face model directory, not a megatron-lasp checkpoint: "
                              f"convert it with {TO_CHECKPOINT_TOOL}")
    load_dir, iteration = split_iteration_directory(load_dir, iteration, error=ConversionError)
    iteration = resolve_iteration(load_dir, iteration, error=ConversionError)
    if iteration is None:
        raise ConversionError(f"no checkpoint found in {load_dir} ({TRACKER_FILENAME} missing)")
    return load_dir, iteration, checkpoint_name(load_dir, iteration)


def read_hf_config(load_dir: str) -> Dict[str, Any]:
    """An exported directory's ``config.json`` (checked to be this model type, with :data:`HF_CONFIG_KEYS`)."""
    if not os.path.isdir(load_dir):
        raise ConversionError(f"HF model directory {load_dir} does not exist")
    if directory_kind(load_dir) == "checkpoint":
        raise ConversionError(f"{load_dir} is a megatron-lasp checkpoint, not a Hugging Face model directory: "
                              f"convert it with {TO_HF_TOOL}")
    path = os.path.join(load_dir, HF_CONFIG)
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
