#!/bin/bash
set -u
T0=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site7 .whl/*.whl 2>/dev/null || exit 1
export PYTHONPATH=/tmp/site7:$PWD PYTHONUNBUFFERED=1 PYTHONFAULTHANDLER=1
R=$OUT/res10; mkdir -p $R
nvidia-smi --query-gpu=name,memory.total --format=csv > $R/host.txt
CUBLAS_WORKSPACE_CONFIG=:4096:8 MEGATRON_LASP_GPU_REPORT=$R/gpu_hybrid_det.json timeout 80 python3 -m pytest -m gpu tests/test_gpu_hybrid.py -k deterministic -v -p no:cacheprovider > $R/pytest_det.log 2>&1; echo "rc=$?" >> $R/pytest_det.log; tail -3 $R/pytest_det.log; cat $R/gpu_hybrid_det.json
timeout 100 python3 -m pytest -m gpu tests/test_gated_attn.py -v -p no:cacheprovider > $R/pytest_gated.log 2>&1; echo "rc=$?" >> $R/pytest_gated.log
grep -E "PASSED|FAILED|rc=" $R/pytest_gated.log | tail -5
for T in 8192 131072; do timeout 45 python3 benchmarks/profile_gated.py --T $T --out $R/profile_gated_$T.json > $R/profile_gated_$T.log 2>&1; echo "rc=$?" >> $R/profile_gated_$T.log; head -9 $R/profile_gated_$T.log | tail -6 | cut -c1-50,80-; grep -E "host|rc=" $R/profile_gated_$T.log; done
timeout 150 python3 benchmarks/bench_kernels.py --gated --out $R/kernels > $R/kernels_gated.log 2>&1; echo "rc=$?" >> $R/kernels_gated.log
grep -E "ours.*fwd_bwd|rc=" $R/kernels_gated.log | cut -c1-120
echo "t $(( $(date +%s) - T0 )) s"
python3 benchmarks/bench_memory.py --preset tnl-1b-hybrid-1to7 --settings chunked --lengths 524288 \
  --budget-s 170 --candidate-timeout 160 --out $R/memory_hybrid > $R/memory_hybrid.log 2>&1; echo "rc=$?" >> $R/memory_hybrid.log
tail -4 $R/memory_hybrid.log
echo "total $(( $(date +%s) - T0 )) s"
