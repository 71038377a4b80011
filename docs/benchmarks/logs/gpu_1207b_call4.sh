#!/bin/bash
set -u
T0=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site4 .whl/*.whl 2>/dev/null || exit 1
export PYTHONPATH=/tmp/site4:$PWD PYTHONUNBUFFERED=1 PYTHONFAULTHANDLER=1
R=/tmp/res4; mkdir -p $R
timeout 150 python3 benchmarks/bench_training.py --out $R/training_8k_profile --preset tnl-1b --seq-length 8192 --steps 3 --warmup 3 --profile-steps 1 \
  --common "--recompute-granularity selective --recompute-modules core_attn elementwise" --config "fixed=" --config "mamba2=--linear-attention-gate mamba2" --timeout 70 > $R/training_8k_profile.log 2>&1; echo "rc=$?" >> $R/training_8k_profile.log
tar czf $OUT/results4.tgz -C $R .
tail -40 $R/training_8k_profile.log
echo "total $(( $(date +%s) - T0 )) s"
