#!/bin/bash
set -u
T0=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site5 .whl/*.whl 2>/dev/null || exit 1
export PYTHONPATH=/tmp/site5:$PWD PYTHONUNBUFFERED=1 PYTHONFAULTHANDLER=1
R=/tmp/res5; mkdir -p $R
timeout 170 python3 benchmarks/bench_training.py --out $R/training_8k_long --preset tnl-1b --seq-length 8192 --steps 30 --warmup 5 --profile-steps 0 \
  --common "--recompute-granularity selective --recompute-modules core_attn elementwise" --config "fixed=" --config "mamba2=--linear-attention-gate mamba2" --config "fixed-again=" --config "mamba2-again=--linear-attention-gate mamba2" --timeout 70 > $R/training_8k_long.log 2>&1; echo "rc=$?" >> $R/training_8k_long.log
tar czf $OUT/results5.tgz -C $R .
tail -40 $R/training_8k_long.log
echo "total $(( $(date +%s) - T0 )) s"
