"""Atomic writes of directories and small files (standard library only).

A directory is written complete under a temporary name beside its target and renamed into place
at the end, so a reader (or a crash) sees the old directory or the new one, never a partial one.
Training checkpoints (``megatron_lasp.checkpoint.io``, one ``iter_XXXXXXX`` at a time,
every rank writing into the same temporary directory) and the Hugging Face converters (the whole
output directory) both use it. A directory that the ranks of several nodes share must be on a
file system they all see: :func:`ranks_not_seeing` checks it (collective; torch.distributed is
imported only there).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import tempfile
from contextlib import contextmanager
from typing import Any, Iterator, List, Tuple

__all__ = ["atomic_directory", "atomic_file", "check_directory_path", "fresh_directory", "ranks_not_seeing", "replace_directory",
           "save_figure_atomic", "write_json", "write_results", "write_text_atomic"]


def check_directory_path(path: str, label: str) -> None:
    """Raise ``ValueError`` if the directory ``path`` (existing or still to be created) cannot be one.

    Its nearest existing ancestor must be a directory: below a file, ``makedirs`` fails late with
    a bare ``NotADirectoryError`` or ``FileExistsError``.

    Args:
        path: the directory that will hold outputs.
        label: what named it, to begin the message with (``--output-prefix out/my``).
    """
    current = os.path.abspath(path)
    while not os.path.exists(current):
        current = os.path.dirname(current)
    if not os.path.isdir(current):
        raise ValueError(f"{label}: {current} is a file, not a directory; choose a path in a directory")


def _sees(path: str) -> bool:
    return os.path.isfile(path)


def ranks_not_seeing(directory: str) -> Tuple[List[Tuple[int, str]], str]:
    """The ranks that do not see ``directory`` as global rank 0 does. Collective (default group).

    Rank 0 creates ``directory`` if missing and a file of a name unique to this call in it; every
    rank looks for that file; rank 0 removes it. Ranks whose nodes mount another file system there
    (node-local disks) do not find it.

    Returns:
        ``([(rank, host), ...] of the ranks that do not see it, rank 0's host)``; the same on every rank.
    """
    import torch.distributed as dist

    head = [None]
    if dist.get_rank() == 0:
        os.makedirs(directory, exist_ok=True)
        name = f".visible-{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(6)}"
        with open(os.path.join(directory, name), "w"):
            pass
        head = [(name, socket.gethostname())]
    dist.broadcast_object_list(head, src=0)
    name, host0 = head[0]
    views = [None] * dist.get_world_size()
    dist.all_gather_object(views, (_sees(os.path.join(directory, name)), socket.gethostname()))
    if dist.get_rank() == 0:
        os.remove(os.path.join(directory, name))
    return [(rank, host) for rank, (seen, host) in enumerate(views) if not seen], host0


def describe_ranks(ranks: List[Tuple[int, str]]) -> str:
    """``rank(s) 1, 3 on node7`` for a message (at most 8 ranks named)."""
    numbers = ", ".join(str(r) for r, _ in ranks[:8]) + (" ..." if len(ranks) > 8 else "")
    return f"rank(s) {numbers} on {', '.join(sorted({host for _, host in ranks}))}"


def fsync_directory(path: str) -> None:
    """Flush ``path``'s entries (the renames into it) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fresh_directory(path: str) -> str:
    """Create the empty directory ``path`` (removing what a crashed writer left there); returns it.

    For a temporary directory of a fixed name that several processes must agree on without
    communicating, e.g. ``iter_0000010.tmp``.
    """
    if os.path.islink(path):
        os.unlink(path)
    elif os.path.exists(path):
        shutil.rmtree(path)
    os.makedirs(path)
    return path


def replace_directory(tmp: str, target: str) -> None:
    """Move the complete directory ``tmp`` to ``target`` (same file system).

    An existing ``target`` directory is moved aside until ``tmp`` is in place and only then
    removed; a symlink ``target`` is replaced itself (what it points to is left alone).
    """
    target = os.path.abspath(target)
    parent = os.path.dirname(target)
    if os.path.islink(target):
        os.unlink(target)
        os.replace(tmp, target)
    elif os.path.isdir(target):
        old = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.old-", dir=parent)
        os.rmdir(old)
        os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old)
    else:
        os.replace(tmp, target)
    fsync_directory(parent)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def set_default_permissions(directory: str) -> None:
    """Give every file and directory under ``directory`` the modes a plain ``open``/``mkdir``
    gives (``mkdtemp`` and some writers create them private)."""
    mask = _umask()
    os.chmod(directory, 0o777 & ~mask)
    for root, dirs, files in os.walk(directory):
        for name in dirs:
            os.chmod(os.path.join(root, name), 0o777 & ~mask)
        for name in files:
            os.chmod(os.path.join(root, name), 0o666 & ~mask)


@contextmanager
def atomic_directory(target: str) -> Iterator[str]:
    """Yield a new empty directory beside ``target``; on success it replaces ``target``
    (:func:`replace_directory`, with the default permissions); on an exception it is removed
    and ``target`` is left untouched. One process; the caller decides whether replacing an
    existing ``target`` is allowed."""
    target = os.path.abspath(target)
    parent = os.path.dirname(target)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.tmp-", dir=parent)
    try:
        yield tmp
        set_default_permissions(tmp)
        replace_directory(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_json(path: str, obj: Any) -> None:
    """``obj`` as indented JSON with sorted keys and a final newline, flushed to disk."""
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


@contextmanager
def atomic_file(path: str, suffix: str = ".tmp") -> Iterator[str]:
    """Yield the temporary path ``path + suffix`` for the caller to write the whole file to; on
    success it replaces the file ``path``, on an exception it is removed and ``path`` is left
    untouched. ``suffix`` keeps an extension where the writer reads the format from it."""
    tmp = path + suffix
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_text_atomic(path: str, text: str) -> None:
    """Replace the file ``path`` by one holding ``text`` (written beside it, then renamed)."""
    with atomic_file(path) as tmp:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
    fsync_directory(os.path.dirname(os.path.abspath(path)))


def save_figure_atomic(fig: Any, path: str, dpi: int = 110) -> None:
    """Lay out a matplotlib figure and replace the PNG ``path`` by it (written beside it, then renamed)."""
    fig.tight_layout()
    with atomic_file(path, ".tmp.png") as tmp:
        fig.savefig(tmp, dpi=dpi)


def write_results(out_dir: str, stem: str, doc: Any, plot: Any = None) -> str:
    """Write a benchmark's ``doc`` to ``out_dir/stem.json`` and, where matplotlib imports,
    ``plot(doc, out_dir/stem.png)``; returns the JSON path."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, stem + ".json")
    write_text_atomic(path, json.dumps(doc, indent=1))
    if plot is not None:
        try:
            plot(doc, os.path.join(out_dir, stem + ".png"))
        except ImportError:
            pass
    return path
