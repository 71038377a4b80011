"""Which iteration of a checkpoint directory to load: the one reader that training's ``--load`` and
the checkpoint -> HF converter share (standard library only).

The rule: an iteration asked for (``--ckpt-step``) must have its directory; otherwise the tracker
file names it; a directory whose tracker is lost (a crash between a save's rename and the tracker
write leaves exactly that) may fall back to its newest complete ``iter_*`` (training does, with a
warning; the converter asks for ``--ckpt-step``). The chosen iteration's files are checked by
:func:`~megatron_lasp.checkpoint.layout.check_checkpoint_files`, which the callers run when their
other checks are done.
"""

from __future__ import annotations

import logging
import os
from typing import Optional, Tuple, Type

from megatron_lasp.checkpoint.layout import (
    TRACKER_FILENAME,
    CheckpointError,
    checkpoint_name,
    iteration_of_directory,
    list_iterations,
    other_iterations,
    read_tracker,
)

logger = logging.getLogger(__name__)


def split_iteration_directory(path: str, step: Optional[int],
                              error: Type[Exception] = CheckpointError) -> Tuple[str, Optional[int]]:
    """``(root, step)`` for a path that may be one ``iter_XXXXXXX`` directory of a checkpoint root
    (then its iteration is the step; a different ``step`` is refused); other paths are returned as given."""
    given = iteration_of_directory(path)
    if given is None or os.path.isfile(os.path.join(path, TRACKER_FILENAME)):
        return path, step
    if step is not None and step != given:
        raise error(f"--ckpt-step {step} contradicts the directory {path}")
    return os.path.dirname(os.path.normpath(path)), given


def resolve_iteration(root: str, step: Optional[int] = None, *, newest_without_tracker: bool = False,
                      error: Type[Exception] = CheckpointError) -> Optional[int]:
    """The iteration to load from the checkpoint directory ``root``; None when it holds none.

    Args:
        root: a training run's ``--save`` directory.
        step: the iteration asked for (``--ckpt-step``), or None for the latest.
        newest_without_tracker: without a tracker file, take the newest complete ``iter_*``
            (with a warning) instead of returning None.
        error: the exception class raised.

    Raises:
        error: a negative or missing ``step`` (the saved iterations listed), a tracker that holds
            no number or names a missing directory.
    """
    if step is not None:
        if step < 0:
            raise error(f"--ckpt-step must be >= 0, got {step}")
        if not os.path.isdir(checkpoint_name(root, step)):
            saved = ", ".join(map(str, list_iterations(root))) or "none"
            raise error(f"--ckpt-step {step}: iteration {step} not found in {root} "
                        f"(saved iterations: {saved}; choose one with --ckpt-step)")
        return step
    iteration = read_tracker(root, error)
    if iteration is None:
        found = list_iterations(root)
        if found and newest_without_tracker:
            logger.warning("%s has no %s but holds iterations %s: loading the newest complete one, %d",
                           root, TRACKER_FILENAME, ", ".join(map(str, found)), found[-1])
            return found[-1]
        return None
    if not os.path.isdir(checkpoint_name(root, iteration)):
        raise error(f"{os.path.join(root, TRACKER_FILENAME)} names iteration {iteration}, but "
                    f"{checkpoint_name(root, iteration)} is missing; {other_iterations(root, iteration)}")
    return iteration
