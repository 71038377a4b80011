#!/usr/bin/env bash
# Set up a CPU environment for megatron-lasp: a virtualenv (default .venv, override with VENV=...)
# holding the CPU build of torch and megatron-lasp (editable) with its test extras.
#
# Why pin torch here: an unpinned `torch` requirement pulls a multi-GB CUDA build. Installing
# torch==2.13.0 (the CPU wheel) in the same pip call satisfies setup.py's `torch>=2.6`.
# GPU users skip this script: `pip install -e .` next to their CUDA torch.
# Re-running is cheap: nothing is installed again unless setup.py changed.
#
# Progress: pip's full output goes to $VENV/install.log; the terminal gets what is being installed,
# then one line every PROGRESS_SECONDS (default 10) with pip's latest step; on a failure, the end
# of the log.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
PYTHON="${PYTHON:-python3}"
TORCH_CPU="${TORCH_CPU:-torch==2.13.0}"
PROGRESS_SECONDS="${PROGRESS_SECONDS:-10}"
stamp="$VENV/.megatron-lasp-installed"
want="$(sha256sum setup.py | cut -d' ' -f1) $TORCH_CPU"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -x "$VENV/bin/python" ]; then
  exit 0
fi

say() { echo "install_cpu.sh: $*" >&2; }
start=$SECONDS
log="$VENV/install.log"

# Run "$@" with its output in $log, printing pip's latest step every PROGRESS_SECONDS.
run_logged() {
  "$@" >> "$log" 2>&1 &
  local pid=$! last="" line i
  # a background job ignores Ctrl-C in a script: stop it ourselves
  trap 'kill "$pid" 2> /dev/null; say "interrupted"; exit 130' INT TERM
  while kill -0 "$pid" 2> /dev/null; do
    for ((i = 0; i < PROGRESS_SECONDS * 10; i++)); do
      kill -0 "$pid" 2> /dev/null || break
      sleep 0.1
    done
    kill -0 "$pid" 2> /dev/null || break
    line="$(grep -E '^ *(Collecting|Downloading|Installing|Building|Preparing|Obtaining)' "$log" \
            | tail -n 1 | sed -e 's/^ *//' | cut -c1-110 || true)"
    line="${line:-working}"
    if [ "$line" = "$last" ]; then
      say "  [$((SECONDS - start))s] $line (still)"
    else
      say "  [$((SECONDS - start))s] $line"
    fi
    last="$line"
  done
  trap - INT TERM
  if ! wait "$pid"; then
    say "failed after $((SECONDS - start))s; the end of $log:"
    tail -n 25 "$log" >&2
    exit 1
  fi
}

if [ ! -x "$VENV/bin/python" ]; then
  say "creating the virtualenv $VENV"
  "$PYTHON" -m venv "$VENV"
fi
: > "$log"
say "installing into $VENV: $TORCH_CPU (CPU build, ~200 MB) and megatron-lasp with its test and hf"
say "  extras (megatron-core, transformers, tokenizers, pytest, ...); about 1-2 minutes on a fresh"
say "  machine with a fast network. pip's full output: $log"
run_logged "$VENV/bin/python" -m pip install --upgrade pip
run_logged "$VENV/bin/python" -m pip install "$TORCH_CPU" -e ".[test,hf]"
say "  [$((SECONDS - start))s] checking that torch, megatron.core and megatron_lasp import"
# fail here, not later, if the install broke
if ! "$VENV/bin/python" -c "import torch, megatron.core, megatron_lasp" >> "$log" 2>&1; then
  say "the installed packages do not import; the end of $log:"
  tail -n 25 "$log" >&2
  exit 1
fi
echo "$want" > "$stamp"
say "done in $((SECONDS - start))s (re-runs skip this until setup.py or TORCH_CPU changes)"
