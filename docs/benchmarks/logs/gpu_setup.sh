# Sourced by the prepared GPU calls (from the repository root): installs the cp312 wheels carried in
# .whl, sets the environment and R (results of the call named by the first argument, default res).
# R lies outside $OUT: `save` packs it into $OUT/<name>.tgz (a call returns at most 8 files); the
# scripts call it after each item and it runs again on exit, so a call stopped at its time limit
# still brings back what its finished items wrote.
set -u
T0=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 PYTHONFAULTHANDLER=1
NAME=${1:-res}; R=/tmp/gpu_results/$NAME; mkdir -p $R
nvidia-smi --query-gpu=name,memory.total --format=csv > $R/host.txt
save() { tar czf $OUT/$NAME.tgz.part -C /tmp/gpu_results $NAME && mv $OUT/$NAME.tgz.part $OUT/$NAME.tgz; }
trap 'save; echo "total $(( $(date +%s) - T0 )) s"' EXIT
# left: seconds the call has left (CALL_S, default 560); item NAME SECONDS COMMAND...: runs COMMAND
# (log $R/NAME.log) only where the time left holds SECONDS, bounded by them, then saves.
left() { echo $(( ${CALL_S:-560} - ($(date +%s) - T0) )); }
item() {
  local name=$1 need=$2; shift 2
  if [ $(left) -lt $need ]; then echo "skipped: $(left) s left" > $R/$name.log; return; fi
  timeout $(( $(left) - 5 < need ? $(left) - 5 : need )) "$@" > $R/$name.log 2>&1; echo "rc=$?" >> $R/$name.log; save
}
