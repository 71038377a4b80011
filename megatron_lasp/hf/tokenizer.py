"""The tokenizer side of a conversion: building the one a checkpoint recorded (or the flags
name), the checks that it is the model's (:func:`check_recorded_tokenizer`,
:func:`check_vocabulary`: both directions), the files it reads (never to be overwritten), and the
exported tokenizer's settings for batched generation."""

from __future__ import annotations

import json
import os
from dataclasses import asdict
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


def describe_tokenizer(settings: Optional[Dict[str, Any]]) -> str:
    """A tokenizer's settings as the flags that give them (``--tokenizer-type X --tokenizer-model P``)."""
    values = asdict(TokenizerSettings.from_mapping(settings or {}))
    return " ".join(f"--{key.replace('_', '-')} {value}" for key, value in values.items() if value is not None)


def _same_settings(a: Dict[str, Any], b: Dict[str, Any]) -> bool:
    def norm(settings):
        values = asdict(TokenizerSettings.from_mapping(settings))
        return {k: os.path.realpath(v) if k in TOKENIZER_PATH_KEYS and v else v for k, v in values.items()}

    return norm(a) == norm(b)


def check_recorded_tokenizer(given: Dict[str, Any], recorded: Optional[Dict[str, Any]], tokenizer) -> None:
    """Refuse exporting with another tokenizer than the checkpoint recorded: the export would read
    other token ids than the model was trained on, and generate garbage without a word.

    The same settings (paths resolved), or a recorded tokenizer that builds here with the same
    identity (type, size, EOD, file contents: a copy elsewhere), pass.

    Args:
        given: the settings the tokenizer flags give.
        recorded: the checkpoint's (:func:`saved_tokenizer_settings`; None: unrecorded, nothing to check).
        tokenizer: the tokenizer ``given`` built.

    Raises:
        ConversionError: another tokenizer (both named, and the flag that allows it).
    """
    if recorded is None or _same_settings(given, recorded):
        return
    try:
        if tokenizer_from_settings(recorded).unique_identifiers == tokenizer.unique_identifiers:
            return
        where = ""
    except ConversionError as err:
        where = f", not readable here ({err})"
    raise ConversionError(
        f"the tokenizer flags ({describe_tokenizer(given)}) name another tokenizer than the one the checkpoint "
        f"recorded ({describe_tokenizer(recorded)}{where}): the export would read other token ids than the model "
        "was trained on; drop the tokenizer flags to use the recorded one, or add --allow-other-tokenizer if both "
        "give the same ids"
    )


def check_vocabulary(tokenizer, rows: int) -> None:
    """Refuse a tokenizer with more ids than the model's embedding has rows (``rows``)."""
    if tokenizer is not None and tokenizer.vocab_size > rows:
        raise ConversionError(
            f"tokenizer has {tokenizer.vocab_size} ids but the model's vocabulary has {rows} rows: "
            "wrong tokenizer; pass the model's own tokenizer flags"
        )
