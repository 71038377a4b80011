#!/usr/bin/env bash
# Set up a CPU environment for megatron-lasp: a virtualenv (default .venv, override with VENV=...)
# holding the CPU build of torch and megatron-lasp (editable) with its test extras.
#
# Why pin torch here: an unpinned `torch` requirement pulls a multi-GB CUDA build. Installing
# torch==2.13.0 (the CPU wheel) in the same pip call satisfies setup.py's `torch>=2.6`.
# GPU users skip this script: `pip install -e .` next to their CUDA torch.
# Re-running is cheap: nothing is installed again unless setup.py changed.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
PYTHON="${PYTHON:-python3}"
TORCH_CPU="${TORCH_CPU:-torch==2.13.0}"
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
stamp="$VENV/.megatron-lasp-installed"
want="$(sha256sum setup.py | cut -d' ' -f1) $TORCH_CPU"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "installing megatron-lasp and $TORCH_CPU (CPU) into $VENV ..." >&2
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q "$TORCH_CPU" -e ".[test,hf]"
  "$VENV/bin/python" -c "import torch, megatron.core, megatron_lasp" # fail here, not later, if the install broke
  echo "$want" > "$stamp"
fi
