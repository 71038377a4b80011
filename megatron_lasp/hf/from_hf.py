"""HF -> checkpoint (:func:`convert_hf_to_checkpoint`): the inverse of :mod:`megatron_lasp.hf.to_hf`.
The HF weights are mapped back (:mod:`megatron_lasp.hf.mapping`), loaded into a TP=1 megatron-lasp
model and saved through megatron-core ``dist_checkpointing`` in the training layout
(``iter_XXXXXXX/`` + ``config.json`` + ``args.json`` + the tracker file), weights only: continue
training with ``pretrain_linear_lm.py --load DIR --finetune`` (or ``--no-load-optim
--no-load-rng``) at any TP/PP/SP sizes.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Dict, Optional

import torch
import torch.distributed as dist

from megatron_lasp.checkpoint.io import save_weights_only
from megatron_lasp.checkpoint.record import RunRecord, architecture_fields
from megatron_lasp.data.tokenizer import TokenizerSettings
from megatron_lasp.hf.files import ConversionError, atomic_directory, check_no_overlap, check_target, read_hf_config
from megatron_lasp.hf.mapping import check_hf_tensors, hf_to_megatron_state_dict, megatron_config_kwargs
from megatron_lasp.hf.safetensors_io import load_safetensors
from megatron_lasp.hf.tokenizer import check_vocabulary, tokenizer_from_settings, tokenizer_paths
from megatron_lasp.models import LinearLMConfig, build_linear_lm
from megatron_lasp.parallel.state import initialize_parallel

logger = logging.getLogger(__name__)


def _run_record(
    config: Any,
    vocab_rows: int,
    tokenizer_settings: Optional[Dict[str, Any]],
    tokenizer_vocab: Optional[int],
    seq_length: Optional[int],
    save_dir: str,
) -> RunRecord:
    """What a converted checkpoint records of the run (``config.json``, ``args.json``): one
    process (TP=PP=SP=DP=1), the vocabulary, the tokenizer and, in ``args.json``, the architecture."""
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
    check_vocabulary(tokenizer, hf_config["vocab_size"])  # before reading the weights
    hf_tensors, files = load_safetensors(load_dir, with_files=True)
    check_hf_tensors(hf_tensors, files, hf_config, load_dir)

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
