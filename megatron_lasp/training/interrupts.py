"""How a training run stops early, and what it leaves behind.

- :class:`StopRequests`: ``--exit-signal-handler`` (SIGTERM / SIGINT: finish the step, save, exit 0)
  and ``--exit-duration-in-mins`` (save and stop once the run has been up that long), Megatron-LM's
  flags and meaning. Every rank checks after each step and the ranks agree (one small all-reduce),
  so all of them save the same iteration and stop together.
- :class:`LauncherWatchdog`: a worker whose launcher (torchrun) died exits instead of training on.
- :func:`record_clean_error`: under ``python -m megatron_lasp.training.launch`` (torchrun with one
  line for clean errors), a one-line error that a worker has already printed is also written to
  torchrun's error file (``TORCHELASTIC_ERROR_FILE``), marked as such, so that the launcher adds
  nothing to it. Plain torchrun is left as it is (the line, then its own report).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
import time
from typing import Callable, Dict, Optional

import torch
import torch.distributed as dist

from megatron_lasp import platform

logger = logging.getLogger(__name__)

PROG = "pretrain_linear_lm.py"

CLEAN_ERROR_KEY = "megatron_lasp_clean_error"
"""Key of torchrun's error file marking an error already printed as one line (not a crash)."""

LAUNCHER_ENV = "MEGATRON_LASP_LAUNCHER"
"""Set by ``megatron_lasp.training.launch`` for its workers: they mark their clean errors."""

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
"""What ``--exit-signal-handler`` catches (SLURM and torchrun send SIGTERM; Ctrl-C is SIGINT)."""


class StopRequests:
    """Whether the run should save and stop after this step: a signal came, or time is up.

    Args:
        handle_signals: catch :data:`STOP_SIGNALS` (``--exit-signal-handler``); a second signal of
            the same kind acts at once (the previous handler is back after the first).
        exit_duration_mins: stop once this many minutes have passed since ``start`` (None: no limit).
        start: ``time.monotonic()`` when the run started.
    """

    def __init__(self, handle_signals: bool, exit_duration_mins: Optional[float], start: float) -> None:
        self.handle_signals = handle_signals
        self.exit_duration_mins = exit_duration_mins
        self.start = start
        self._received: Optional[int] = None
        self._previous: Dict[int, object] = {}

    @property
    def enabled(self) -> bool:
        return self.handle_signals or self.exit_duration_mins is not None

    def install(self) -> "StopRequests":
        """Install the signal handlers (main thread only: Python delivers signals there)."""
        if self.handle_signals and threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._on_signal)
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _on_signal(self, signum, frame) -> None:  # noqa: ARG002 - the signal module's signature
        # only a flag here: the step in progress finishes, then check() sees it
        if self._received is None:
            self._received = signum
            signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))

    def check(self) -> Optional[str]:
        """Why to stop now (None: go on), the same on every rank. Collective when enabled."""
        if not self.enabled:
            return None
        minutes = (time.monotonic() - self.start) / 60.0
        out_of_time = self.exit_duration_mins is not None and minutes >= self.exit_duration_mins
        flags = torch.tensor([self._received or 0, int(out_of_time)], dtype=torch.int64,
                             device=platform.default_device())
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        signum, out_of_time = int(flags[0].item()), bool(flags[1].item())
        if signum:
            return f"received {signal.Signals(signum).name} (--exit-signal-handler)"
        if out_of_time:
            return f"--exit-duration-in-mins {self.exit_duration_mins:g} reached after {minutes:.1f} minutes"
        return None


def is_launched() -> bool:
    """Whether torchrun started this process."""
    return "TORCHELASTIC_RUN_ID" in os.environ


def record_clean_error(message: str, code: int) -> None:
    """Write ``message`` (one line, already printed) to torchrun's error file, marked clean."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path or not os.environ.get(LAUNCHER_ENV):
        return
    data = {
        "message": {"message": message, "extraInfo": {"py_callstack": message, "timestamp": str(int(time.time()))}},
        CLEAN_ERROR_KEY: {"exitcode": code},
    }
    try:
        with open(path, "w") as f:
            json.dump(data, f)
    except OSError:
        pass  # the launcher then shows its own report; the line was printed anyway


class LauncherWatchdog:
    """Exit this worker when its launcher (torchrun, the parent process) dies.

    Killing torchrun alone would leave the workers training and saving unsupervised. A daemon
    thread polls the parent pid; when the parent is gone it waits for a save in progress to
    finish (saves are atomic anyway: an interrupted one leaves only an ``iter_*.tmp``), then
    ends the process with exit status 1.
    """

    POLL_S = 1.0
    SAVE_GRACE_S = 300.0

    def __init__(self, on_exit: Callable[[], None]) -> None:
        self._parent = os.getppid()
        self._on_exit = on_exit
        self._saving = threading.Lock()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="launcher-watchdog", daemon=True)

    @classmethod
    def start_if_launched(cls, on_exit: Callable[[], None]) -> Optional["LauncherWatchdog"]:
        """Start the watchdog under torchrun (``TORCHELASTIC_RUN_ID`` set); None otherwise.

        Args:
            on_exit: called before the worker exits (releases the save lock).
        """
        if not is_launched():
            return None
        dog = cls(on_exit)
        dog._thread.start()
        return dog

    def guard(self, save_fn: Callable):
        """``save_fn`` that the watchdog does not interrupt."""
        def guarded(*args, **kwargs):
            with self._saving:
                return save_fn(*args, **kwargs)

        return guarded

    def stop(self) -> None:
        self._done.set()

    def _watch(self) -> None:
        while not self._done.wait(self.POLL_S):
            if os.getppid() != self._parent:
                print(f"{PROG}: error: the launcher (parent pid {self._parent}) is gone: this worker exits "
                      "(the last complete checkpoint is kept)", file=sys.stderr, flush=True)
                self._saving.acquire(timeout=self.SAVE_GRACE_S)
                self._on_exit()
                os._exit(1)
