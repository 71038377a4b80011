"""Checkpoint -> HF (:func:`convert_checkpoint_to_hf`): the checkpoint (any saved TP/PP/SP sizes)
is loaded on one process at TP=1 (:func:`megatron_lasp.checkpoint.io.load_model_for_inference`);
its state dict is renamed and split (:mod:`megatron_lasp.hf.mapping`) into the HF model's names and
written as safetensors (sharded with an index above ``max_shard_size``), next to ``config.json``
(with ``auto_map``), ``generation_config.json``, the tokenizer files (with a pad token and left
padding), the modeling code (``configuration_linear_lm.py``, ``modeling_linear_lm.py``, copied
from this package) and a model card (``README.md``).

Nothing is written into, over or around the sources, and damaged inputs are reported as one
:class:`~megatron_lasp.hf.files.ConversionError` line naming the file before anything is written.
"""

from __future__ import annotations

import logging
import os
import pickle
import shutil
import zipfile
from typing import Any, Dict, Optional

import torch
from megatron.core.dist_checkpointing.core import CheckpointingException
from transformers import GenerationConfig

from megatron_lasp.checkpoint.io import load_model_for_inference
from megatron_lasp.checkpoint.layout import CONFIG_FILENAME, CheckpointError, check_checkpoint_files, other_iterations
from megatron_lasp.hf.configuration_linear_lm import LaspLinearLMConfig
from megatron_lasp.hf.files import (
    ARCHITECTURE,
    AUTO_MAP,
    DTYPES,
    MODEL_CARD,
    MODEL_CODE_FILES,
    ConversionError,
    atomic_directory,
    check_no_overlap,
    check_target,
    parse_size,
    resolve_checkpoint,
)
from megatron_lasp.hf.mapping import hf_config_kwargs, megatron_to_hf_state_dict
from megatron_lasp.hf.model_card import model_card
from megatron_lasp.hf.safetensors_io import save_safetensors
from megatron_lasp.hf.tokenizer import (
    check_recorded_tokenizer,
    check_vocabulary,
    complete_tokenizer_config,
    saved_tokenizer_settings,
    tokenizer_from_settings,
    tokenizer_paths,
)

logger = logging.getLogger(__name__)

_TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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
    allow_other_tokenizer: bool = False,
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
        allow_other_tokenizer: export with ``tokenizer_settings`` that are not the recorded
            tokenizer's (refused otherwise: :func:`~megatron_lasp.hf.tokenizer.check_recorded_tokenizer`).

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
    recorded = saved_tokenizer_settings(load_dir, iteration)
    given = tokenizer_settings
    if tokenizer_settings is None:
        tokenizer_settings = recorded
    sources.update(tokenizer_paths(tokenizer_settings))
    check_target(save_dir, force, sources)
    tokenizer = tokenizer_from_settings(tokenizer_settings) if tokenizer_settings else None
    if given is not None and not allow_other_tokenizer:
        check_recorded_tokenizer(given, recorded, tokenizer)
    check_checkpoint_files(load_dir, iteration, error=ConversionError)

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
    check_vocabulary(tokenizer, vocab_rows)
    hf_kwargs = hf_config_kwargs(config, vocab_rows)
    tensors = megatron_to_hf_state_dict(model.state_dict(), hf_kwargs)
    if dtype != "auto":
        tensors = {k: v.to(_TORCH_DTYPES[dtype]) for k, v in tensors.items()}
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
