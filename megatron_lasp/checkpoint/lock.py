"""The lock a training run holds on its ``--save`` directory (standard library only)."""

from __future__ import annotations

import fcntl
import logging
import os
import socket
from typing import Optional

from megatron_lasp.checkpoint.layout import CheckpointError

logger = logging.getLogger(__name__)

LOCK_FILENAME = ".megatron_lasp.lock"
"""Held (``flock``) in ``--save`` for the whole run; holds the owner's pid and host."""


class SaveLock:
    """An exclusive lock on ``--save`` held for the whole run (``flock`` on a file in it).

    The kernel drops the lock when its process dies, so a lock file left by a dead run is stale:
    it is reported and taken over. Where ``flock`` is unsupported (some network file systems)
    the owner's pid (same host) decides. One object is one holder: ``SaveLock()`` holds nothing
    until :meth:`acquire`; :meth:`release` may be called any number of times.
    """

    def __init__(self, root: Optional[str] = None) -> None:
        self.root = root
        self._fd: Optional[int] = None
        self._created_root = False

    @property
    def path(self) -> str:
        """The lock file."""
        return os.path.join(self.root, LOCK_FILENAME)

    @property
    def held(self) -> bool:
        """Whether this object holds the lock."""
        return self._fd is not None

    def acquire(self, root: Optional[str] = None) -> "SaveLock":
        """Take the lock on ``root`` (default: the one given at construction), creating it;
        a lock this object already holds is released first.

        Raises:
            CheckpointError: another run holds it, or ``root`` is not writable.
        """
        self.release()
        if root is not None:
            self.root = root
        if not self.root:
            return self
        try:
            if not os.path.isdir(self.root):
                os.makedirs(self.root)
                self._created_root = True
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise CheckpointError(f"--save {self.root} is not writable ({err.strerror}); "
                                  "choose a directory this run can write") from None
        owner = os.read(fd, 256).decode("utf-8", "replace").split()
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            held = False
        except BlockingIOError:
            held = True
        except OSError:  # no flock here: trust the recorded pid on this host
            held = bool(owner) and owner[1:2] == [socket.gethostname()] and _pid_alive(owner[0])
        if held:
            os.close(fd)
            who = f"pid {owner[0]} on {owner[1]}" if len(owner) >= 2 else "another process"
            raise CheckpointError(f"--save {self.root} is in use by another run ({who}, lock {self.path}); "
                                  "wait for it to finish or choose another --save")
        if owner:
            logger.warning("--save %s: stale lock of a run that is gone (pid %s on %s): taking it over",
                           self.root, owner[0], owner[1] if len(owner) > 1 else "?")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
        os.fsync(fd)
        self._fd = fd
        return self

    def release(self) -> None:
        """Drop the lock and its file (and ``root`` if this run created it and left it empty)."""
        if self._fd is None:
            return
        try:
            os.unlink(self.path)
        except OSError:
            pass
        os.close(self._fd)
        self._fd = None
        if self._created_root:
            self._created_root = False
            try:
                os.rmdir(self.root)
            except OSError:
                pass


def _pid_alive(pid: str) -> bool:
    try:
        os.kill(int(pid), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True
