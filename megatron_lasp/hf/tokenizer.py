"""The tokenizer side of a conversion: building the one a checkpoint recorded (or the flags
name), the files it reads (never to be overwritten), and the exported tokenizer's settings for
batched generation."""

from __future__ import annotations

import json
import os
from typing import Any, Dict, Optional

from transformers import AutoTokenizer

from megatron_lasp import atomic
from megatron_lasp.checkpoint.layout import read_config
from megatron_lasp.data.tokenizer import TOKENIZER_PATH_KEYS, TokenizerSettings, build_tokenizer
from megatron_lasp.hf.files import ConversionError

NO_LENGTH_LIMIT = int(1e30)
"""``model_max_length`` of the exported tokenizer: transformers' value for "no limit" (the recurrent
state has a fixed size; nothing in the model depends on the position)."""


def tokenizer_from_settings(settings: Dict[str, Any]):
    """Build a megatron-lasp tokenizer from :func:`~megatron_lasp.data.tokenizer.build_tokenizer`
    keyword arguments; any failure becomes a one-line :class:`ConversionError`."""
    try:
        tokenizer = build_tokenizer(**settings)
        tokenizer.vocab_size  # noqa: B018 - reads and validates the files now
    except (ValueError, FileNotFoundError, OSError, KeyError) as err:
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ConversionError(f"tokenizer: {message}") from None
    return tokenizer


def tokenizer_paths(settings: Optional[Dict[str, Any]]) -> Dict[str, Optional[str]]:
    """The files a tokenizer is read from, as :func:`~megatron_lasp.hf.files.check_no_overlap` sources."""
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


def saved_tokenizer_settings(root: str, iteration: int) -> Optional[Dict[str, Any]]:
    """The tokenizer settings recorded in a checkpoint's ``config.json`` (None if absent).

    Raises:
        ConversionError: a missing or unreadable ``config.json`` (named, with the other iterations).
    """
    _, config = read_config(root, iteration, error=ConversionError)
    saved = config.get("tokenizer") or {}
    if not isinstance(saved, dict):
        raise ConversionError(f"{root}: config.json of iteration {iteration} records no valid tokenizer ({saved!r})")
    if not saved.get("tokenizer_type"):
        return None
    return TokenizerSettings.from_mapping(saved).as_dict()
