#!/usr/bin/env bash
# Run the test suite on a CPU machine: sets up the environment if needed (tools/install_cpu.sh),
# then runs pytest. Extra arguments go to pytest, e.g. `bash tests/run.sh -k lasp -x`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/install_cpu.sh
exec "${VENV:-.venv}/bin/python" -m pytest tests "$@"
