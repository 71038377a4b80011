"""Training's side of checkpoints (:mod:`megatron_lasp.checkpoint` does the work): a refused
architecture is reported with this run's flags, and the loop's calls are gathered here.
"""

from __future__ import annotations

from typing import Optional

from megatron_lasp.checkpoint.io import CheckpointSettings, load_checkpoint, save_checkpoint
from megatron_lasp.checkpoint.io import prepare_run as _prepare_run
from megatron_lasp.checkpoint.layout import CheckpointError, list_iterations
from megatron_lasp.checkpoint.lock import SaveLock
from megatron_lasp.checkpoint.record import FieldNames, RunRecord
from megatron_lasp.training.arguments import ARCHITECTURE_FIELDS, flag_of_field

__all__ = ["CheckpointError", "CheckpointSettings", "FIELD_NAMES", "RunRecord", "SaveLock", "list_iterations",
           "load_checkpoint", "prepare_run", "save_checkpoint"]

VOCABULARY_FLAGS = "vocabulary size (tokenizer / --vocab-size / --make-vocab-size-divisible-by)"
"""What sets ``padded_vocab_size`` (named when a checkpoint's differs)."""


def _setter(name: str) -> Optional[str]:
    return VOCABULARY_FLAGS if name == "padded_vocab_size" else flag_of_field(name)


FIELD_NAMES = FieldNames(sizes=ARCHITECTURE_FIELDS + ("kv_channels",), setter=_setter)
"""The architecture check's names: the size flags first, each field by its flag."""


def prepare_run(settings: CheckpointSettings, config, lock: Optional[SaveLock] = None) -> CheckpointSettings:
    """:func:`megatron_lasp.checkpoint.io.prepare_run` with the fields named by their flags."""
    return _prepare_run(settings, config, FIELD_NAMES, lock)
