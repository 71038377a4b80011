#!/bin/bash
set -u
T0=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site3 .whl/*.whl 2>/dev/null || exit 1
export PYTHONPATH=/tmp/site3:$PWD PYTHONUNBUFFERED=1 PYTHONFAULTHANDLER=1
R=/tmp/res3; mkdir -p $R
timeout 250 python3 benchmarks/bench_training.py --out $R/training_128k --preset tnl-1b --seq-length 131072 --steps 3 --warmup 2 --profile-steps 0 \
  --common "--recompute-granularity full --recompute-chunk-size 16384" --config "fixed=" --config "mamba2=--linear-attention-gate mamba2" --timeout 110 > $R/training_128k.log 2>&1; echo "rc=$?" >> $R/training_128k.log
timeout $(( 430 - ($(date +%s) - T0) )) python3 benchmarks/bench_training.py --out $R/training_8k --preset tnl-1b --seq-length 8192 --steps 5 --warmup 3 --profile-steps 0 \
  --common "--recompute-granularity selective --recompute-modules core_attn elementwise" --config "fixed=" --config "mamba2=--linear-attention-gate mamba2" --timeout 60 > $R/training_8k.log 2>&1; echo "rc=$?" >> $R/training_8k.log
tar czf $OUT/results3.tgz -C $R .
grep -hE "MFU|rc=|rror" $R/training_128k.log | tail -8; grep -hE "MFU|rc=|rror" $R/training_8k.log | tail -6
echo "total $(( $(date +%s) - T0 )) s"
