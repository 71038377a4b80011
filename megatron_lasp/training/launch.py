"""torchrun, with one line instead of its failure report when the workers stopped cleanly.

Use it exactly as torchrun (same flags)::

    python -m megatron_lasp.training.launch --nproc-per-node 2 pretrain_linear_lm.py --model-preset tiny ...

When the workers end with an error they have already printed as one line (a bad flag, bad data, a
checkpoint that does not fit, a non-finite loss, Ctrl-C: ``interrupts.record_clean_error`` marks
it in torchrun's error file), the launcher exits with the worker's status and prints nothing more,
where torchrun prints a ~30-line ``ChildFailedError`` report. A crash (an uncaught exception, a
signal, a worker killed) keeps torchrun's full report. Stopped itself by SIGINT / SIGTERM, it
says so in one line and exits 128 + the signal number.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import List, Optional

from megatron_lasp.training.interrupts import CLEAN_ERROR_KEY, LAUNCHER_ENV


def main(argv: Optional[List[str]] = None) -> int:
    """Run torchrun's ``run`` on ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    args = parse_args(argv)
    os.environ[LAUNCHER_ENV] = "1"  # the workers mark the errors they printed as one line
    try:
        run(args)
    except ChildFailedError as err:
        _, first = err.get_first_failure()
        clean = first.error_file_data.get(CLEAN_ERROR_KEY) if isinstance(first.error_file_data, dict) else None
        if clean is None:
            raise
        return int(clean.get("exitcode", first.exitcode)) or 1
    except SignalException as err:
        name = signal.Signals(err.sigval).name
        print(f"launch: stopped by {name}; the workers were sent {name} (with --exit-signal-handler they save "
              "first)", file=sys.stderr, flush=True)
        return 128 + int(err.sigval)
    return 0


if __name__ == "__main__":
    sys.exit(main())
