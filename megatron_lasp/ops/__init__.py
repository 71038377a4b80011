"""Kernel families; one folder per op.

:func:`interpreting`: whether Triton kernels run in its CPU interpreter, which every family's
Triton path checks before taking CPU tensors.
"""

import os

__all__ = ["interpreting"]


def interpreting() -> bool:
    """Whether Triton runs in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")
