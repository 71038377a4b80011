"""The checkpoint directory layout and its integrity check, without torch at import time.

Training and both Hugging Face converters read and write this layout; the converters import it
before torch so that argument errors come fast::

    ROOT/latest_checkpointed_iteration.txt   # the newest complete iteration; written last
    ROOT/iter_0000010/                       # one megatron-core dist_checkpointing directory
        .metadata, metadata.json, *.distcp   # its files (common state: in .metadata's shards
        common.pt                            #   since megatron-core 0.17; common.pt before)
        config.json, args.json               # this project's: the model and the run's flags

Every reader takes the error class it raises (``error=``, default :class:`CheckpointError`):
training reports :class:`CheckpointError`, the converters their own.
"""

from __future__ import annotations

import json
import os
import re
import zipfile
from typing import Any, Dict, List, Optional, Tuple, Type

TRACKER_FILENAME = "latest_checkpointed_iteration.txt"
CONFIG_FILENAME = "config.json"
ARGS_FILENAME = "args.json"
COMMON_STATE_FILENAME = "common.pt"
"""megatron-core < 0.17 keeps the common (non-sharded) state here; later versions in the shards."""
MODEL_TYPE = "megatron-lasp-linear-lm"
"""``config.json``'s ``model_type``: what tells a checkpoint from other directories."""
FORMAT_VERSION = 1
"""``config.json``'s ``format_version`` and the saved ``checkpoint_version``."""
_ITER_DIR = re.compile(r"iter_(\d{7})$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the problem (and the file)."""


def checkpoint_name(root: str, iteration: int) -> str:
    """``root/iter_0000010``."""
    return os.path.join(root, f"iter_{iteration:07d}")


def iteration_of_directory(path: str) -> Optional[int]:
    """The iteration an ``iter_XXXXXXX`` directory name stands for, or None for another name."""
    m = _ITER_DIR.match(os.path.basename(os.path.normpath(path)))
    return int(m.group(1)) if m else None


def list_iterations(root: str) -> List[int]:
    """The iterations under ``root`` with a complete checkpoint directory (renamed, with config.json)."""
    if not os.path.isdir(root):
        return []
    out = []
    for name in os.listdir(root):
        m = _ITER_DIR.match(name)
        if m and os.path.isfile(os.path.join(root, name, CONFIG_FILENAME)):
            out.append(int(m.group(1)))
    return sorted(out)


def other_iterations(root: str, but: Optional[int] = None) -> str:
    """The end of an error message: which other iterations ``root`` holds, and the flag to pick one."""
    others = [i for i in list_iterations(root) if i != but]
    if not others:
        return f"no other iteration in {root}"
    return f"other iterations in {root}: {', '.join(map(str, others))} (choose one with --ckpt-step)"


def read_tracker(root: str, error: Type[Exception] = CheckpointError) -> Optional[int]:
    """The iteration ``root``'s tracker file names, or None when there is no tracker file.

    Raises:
        error: a tracker that does not hold an iteration number (the other iterations listed).
    """
    path = os.path.join(root, TRACKER_FILENAME)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8", errors="replace") as f:
        text = f.read().strip()
    if not text.isdigit():
        raise error(f"{path}: expected an iteration number, found {text!r}; {other_iterations(root, -1)}")
    return int(text)


def read_config(root: str, iteration: Optional[int] = None,
                error: Type[Exception] = CheckpointError) -> Tuple[int, Dict[str, Any]]:
    """(iteration, ``config.json``) of the given (default: the tracker's) checkpoint under ``root``.

    Raises:
        error: no tracker, a missing or unreadable ``config.json`` (named, with the other iterations).
    """
    if iteration is None:
        iteration = read_tracker(root, error)
        if iteration is None:
            raise error(f"no checkpoint in {root} ({TRACKER_FILENAME} missing)")
    path = os.path.join(checkpoint_name(root, iteration), CONFIG_FILENAME)
    if not os.path.isfile(path):
        raise error(f"{path} is missing: not a megatron-lasp checkpoint, or an incomplete one; "
                    f"{other_iterations(root, iteration)}")
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
        if not isinstance(config, dict):
            raise ValueError("not a JSON object")
    except (ValueError, UnicodeDecodeError) as err:
        raise error(f"{path} is not a valid config ({err}); {other_iterations(root, iteration)}") from None
    return iteration, config


def check_checkpoint_files(root: str, iteration: int, error: Type[Exception] = CheckpointError) -> None:
    """Raise ``error`` naming the first missing, empty, truncated or unreadable file.

    Checks ``config.json``, ``args.json``, dist_checkpointing's metadata and common state, and
    every shard file that ``.metadata`` names, to the last byte it names; reads no tensor data.
    """
    path = checkpoint_name(root, iteration)

    def damaged(what: str) -> Exception:
        return error(f"checkpoint {path} is damaged: {what}; {other_iterations(root, iteration)}")

    for name in (CONFIG_FILENAME, ARGS_FILENAME, "metadata.json", ".metadata"):
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            raise damaged(f"{file} is missing")
        if os.path.getsize(file) == 0:
            raise damaged(f"{file} is empty")
    for name in (CONFIG_FILENAME, ARGS_FILENAME, "metadata.json"):
        file = os.path.join(path, name)
        try:
            with open(file, encoding="utf-8") as f:
                json.load(f)
        except (ValueError, UnicodeDecodeError) as err:
            raise damaged(f"{file} is not valid JSON ({err})") from None
    # torch only here: the converters call the readers above before torch is imported
    from torch.distributed.checkpoint import FileSystemReader

    try:
        metadata = FileSystemReader(path).read_metadata()
    except Exception as err:  # a pickle of torch classes: any failure means an unusable file
        raise damaged(f"{os.path.join(path, '.metadata')} is unreadable ({type(err).__name__})") from None
    common = os.path.join(path, COMMON_STATE_FILENAME)
    if os.path.exists(common):
        if not zipfile.is_zipfile(common):
            raise damaged(f"{common} is truncated or not a torch file")
    elif not any("common_state" in key for key in (metadata.state_dict_metadata or {})):
        raise damaged(f"{common} is missing (and .metadata holds no common state)")
    needed: Dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), int(info.offset) + int(info.length))
    if not needed:
        raise damaged(f"{os.path.join(path, '.metadata')} names no shard files")
    for name, end in sorted(needed.items()):
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            raise damaged(f"{file} is missing")
        size = os.path.getsize(file)
        if size < end:
            raise damaged(f"{file} is truncated ({size} of {end} bytes)")
