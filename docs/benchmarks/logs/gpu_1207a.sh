#!/bin/bash
# Call 1 of 2026-12-07: gloo+CUDA crash probe, multi-rank + hybrid GPU tests, gated diagnosis, gated kernel timings.
set -u
T0=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 PYTHONFAULTHANDLER=1
R=/tmp/res; mkdir -p $R
BUDGET=${BUDGET:-560}
(nvidia-smi --query-gpu=name,memory.total --format=csv; python3 -c "import torch,triton,megatron.core as m;print(torch.__version__,triton.__version__,m.__version__)") > $R/host.txt 2>&1
timeout 100 python3 .gpu_lead/coalesce_probe.py > $R/coalesce_probe.log 2>&1
cat $R/coalesce_probe.log
(MEGATRON_LASP_GPU_REPORT=$R/gpu_hybrid.json timeout 300 python3 -m pytest -m gpu tests/test_gpu_hybrid.py -v -p no:cacheprovider > $R/pytest_hybrid.log 2>&1; echo "rc=$?" >> $R/pytest_hybrid.log) &
(timeout 200 python3 .gpu_lead/gated_diag.py $R/gated_diag.json > $R/gated_diag.log 2>&1; echo "rc=$?" >> $R/gated_diag.log) &
MEGATRON_LASP_GPU_REPORT=$R/gpu_multirank.json timeout 420 python3 -m pytest -m gpu tests/test_gpu_multirank.py -v -p no:cacheprovider > $R/pytest_multirank.log 2>&1; echo "rc=$?" >> $R/pytest_multirank.log
wait
echo "correctness done at $(( $(date +%s) - T0 )) s"
left() { echo $(( BUDGET - ($(date +%s) - T0) )); }
if [ $(left) -gt 70 ]; then timeout $(( $(left) - 25 )) python3 benchmarks/bench_kernels.py --gated --out $R/kernels > $R/bench_gated.log 2>&1; echo "rc=$?" >> $R/bench_gated.log; fi
tar czf $OUT/results.tgz -C $R .
for f in $R/pytest_multirank.log $R/pytest_hybrid.log; do grep -E "PASSED|FAILED|ERROR|SKIPPED|passed|failed|rc=" $f | tail -40; done
tail -5 $R/gated_diag.log $R/bench_gated.log 2>/dev/null
echo "total $(( $(date +%s) - T0 )) s"
