"""Safetensors I/O of an HF model directory: one ``model.safetensors``, or shards with a
``model.safetensors.index.json`` (transformers' layout); damaged files are reported as one
:class:`~megatron_lasp.hf.files.ConversionError` line naming the file."""

from __future__ import annotations

import json
import os
from typing import Any, Dict, List

from safetensors.torch import load_file, save_file

from megatron_lasp import atomic
from megatron_lasp.hf.files import SAFETENSORS_INDEX, SAFETENSORS_SINGLE, ConversionError


def save_safetensors(tensors: Dict[str, Any], directory: str, max_shard_size: int) -> List[str]:
    """Write ``tensors`` as ``model.safetensors``, or as shards + ``model.safetensors.index.json``
    when their total size exceeds ``max_shard_size`` bytes (a tensor larger than the limit gets
    a shard of its own). Returns the written file names."""
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
