# Sourced by the prepared GPU calls (from the repository root): installs the cp312 wheels carried in
# .whl, sets the environment and R=$OUT/<name> (the first argument, default res) for the results,
# which are packed into $OUT/<name>.tgz when the call's script exits (a call returns at most 8 files).
set -u
T0=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 PYTHONFAULTHANDLER=1
R=$OUT/${1:-res}; mkdir -p $R
nvidia-smi --query-gpu=name,memory.total --format=csv > $R/host.txt
trap 'tar czf $OUT/$(basename $R).tgz -C $OUT $(basename $R) && rm -rf $R; echo "total $(( $(date +%s) - T0 )) s"' EXIT
