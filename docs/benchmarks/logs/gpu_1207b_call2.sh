#!/bin/bash
# Second call of 2026-12-07b (one GPU), each alone on the GPU: hybrid vs linear at 32K, the gated
# profile, the loss kernels at 8K/128K, the softmax-kernel choice, the fused ops; on an H200 the
# 1:7 hybrid at 512K (chunked recompute) instead of the last two.
set -u
T0=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 PYTHONFAULTHANDLER=1
R=/tmp/res2; mkdir -p $R
BUDGET=${BUDGET:-540}
left() { echo $(( BUDGET - ($(date +%s) - T0) )); }
(nvidia-smi --query-gpu=name,memory.total --format=csv; python3 -c "import torch,triton,megatron.core as m;print(torch.__version__,triton.__version__,m.__version__)") > $R/host.txt 2>&1
MEM=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | head -1)
SEL="--recompute-granularity selective --recompute-modules core_attn elementwise"
timeout 200 python3 benchmarks/bench_training.py --out $R/training_128k --preset tnl-1b --seq-length 131072 --steps 3 --warmup 2 --profile-steps 0 \
  --common "--recompute-chunk-size 16384" --config "fixed=" --config "mamba2=--linear-attention-gate mamba2" --timeout 90 > $R/training_128k.log 2>&1; echo "rc=$?" >> $R/training_128k.log
timeout 50 python3 benchmarks/profile_gated.py --T 131072 --out $R/profile_gated.json > $R/profile_gated.log 2>&1; echo "rc=$?" >> $R/profile_gated.log
timeout 110 python3 benchmarks/bench_loss.py --out $R/loss --tokens 8192 131072 --impls ours ours_triton liger cce --triton-configs 4096x8 8192x16 > $R/bench_loss.log 2>&1; echo "rc=$?" >> $R/bench_loss.log
if [ "$MEM" -gt 100000 ] && [ $(left) -gt 120 ]; then
  python3 benchmarks/bench_memory.py --preset tnl-1b-hybrid-1to7 --settings chunked --lengths 524288 --budget-s $(( $(left) - 15 )) --candidate-timeout $(( $(left) - 20 )) --out $R/memory_hybrid > $R/memory_hybrid.log 2>&1; echo "rc=$?" >> $R/memory_hybrid.log
else
  timeout $(( $(left) / 2 )) python3 benchmarks/bench_softmax_attn.py kernels --out $R/softmax_kernels > $R/softmax_kernels.log 2>&1; echo "rc=$?" >> $R/softmax_kernels.log
  timeout $(( $(left) - 12 )) python3 benchmarks/bench_fused_ops.py --out $R/fused_ops --tokens 32768 > $R/fused_ops.log 2>&1; echo "rc=$?" >> $R/fused_ops.log
fi
tar czf $OUT/results2.tgz -C $R .
grep -hE "MFU|rc=|rror" $R/training_128k.log | tail -8
tail -4 $R/profile_gated.log; grep -E "status|rc=" $R/bench_loss.log | tail -14; tail -5 $R/memory_hybrid.log $R/softmax_kernels.log $R/fused_ops.log 2>/dev/null
echo "total $(( $(date +%s) - T0 )) s"
