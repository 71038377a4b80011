#!/bin/bash
set -u
T0=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site6 .whl/*.whl 2>/dev/null || exit 1
export PYTHONPATH=/tmp/site6:$PWD PYTHONUNBUFFERED=1 PYTHONFAULTHANDLER=1
R=/tmp/res6; mkdir -p $R
timeout 170 python3 benchmarks/bench_training.py --out $R/training_32k_ce --preset tnl-1b --seq-length 32768 --steps 10 --warmup 3 --profile-steps 0 \
  --common "--recompute-granularity selective --recompute-modules core_attn elementwise" --config "torch-ce=" --config "triton-ce=--cross-entropy-kernel triton" --timeout 75 > $R/training_32k_ce.log 2>&1; echo "rc=$?" >> $R/training_32k_ce.log
for k in torch triton; do
  timeout 80 python3 pretrain_linear_lm.py --model-preset tnl-1b --num-layers 2 --seq-length 8192 --micro-batch-size 1 --global-batch-size 1 --mock-data --seed 1234 --lr 3e-4 --lr-warmup-iters 1 --bf16 --ddp-impl megatron --use-distributed-optimizer --train-iters 6 --log-interval 1 --cross-entropy-kernel $k > $R/ce_$k.log 2>&1; echo "rc=$?" >> $R/ce_$k.log
done
tar czf $OUT/results6.tgz -C $R .
grep -hE "MFU|rc=|rror" $R/training_32k_ce.log | tail -6
for k in torch triton; do echo "== $k"; grep -E "iteration|rc=|rror" $R/ce_$k.log | sed -E 's/.*(iteration +[0-9]+).*(lm loss: [^|]*).*(grad norm: [^|]*).*/\1 \2 \3/' | tail -8; done
echo "total $(( $(date +%s) - T0 )) s"
