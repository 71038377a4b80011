#!/bin/bash
# Call 1 of 2026-12-07c: the dg kernel on the GPU (gated kernel tests, every mode with gates on 2 ranks),
# the softmax kernels' determinism, the loss-curve noise run, then alone on the GPU: the gated profile
# at 8K / 32K (host vs GPU time) and bench_kernels --gated.
set -u
T0=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site7 .whl/*.whl 2>/dev/null || exit 1
export PYTHONPATH=/tmp/site7:$PWD PYTHONUNBUFFERED=1 PYTHONFAULTHANDLER=1
R=$OUT/res7; mkdir -p $R
nvidia-smi --query-gpu=name,memory.total --format=csv > $R/host.txt
(timeout 120 python3 -m pytest -m gpu tests/test_gated_attn.py -v -p no:cacheprovider > $R/pytest_gated.log 2>&1; echo "rc=$?" >> $R/pytest_gated.log;
 MEGATRON_LASP_GPU_REPORT=$R/gpu_multirank_modes.json timeout 160 python3 -m pytest -m gpu tests/test_gpu_multirank.py -k "every_mode and sp2" -v -p no:cacheprovider > $R/pytest_modes.log 2>&1; echo "rc=$?" >> $R/pytest_modes.log) &
(MEGATRON_LASP_GPU_REPORT=$R/gpu_hybrid_det.json timeout 60 python3 -m pytest -m gpu tests/test_gpu_hybrid.py -k deterministic -v -p no:cacheprovider > $R/pytest_det.log 2>&1; echo "rc=$?" >> $R/pytest_det.log; timeout 150 python3 benchmarks/bench_sp_loss_curves.py --out $R/curves --log-dir $R --data-prefix $PWD/.gpu_lead/_corpus/corpus_text_document --num-layers 2 --seq-length 8192 --steps 50 --sizes 1 > $R/bench_sp.log 2>&1; echo "rc=$?" >> $R/bench_sp.log) &
wait
grep -E "PASSED|FAILED|passed|failed|rc=|Error" $R/pytest_gated.log $R/pytest_modes.log $R/pytest_det.log | tail -14; tail -3 $R/bench_sp.log
echo "t $(( $(date +%s) - T0 )) s"
for T in 8192 32768; do timeout 45 python3 benchmarks/profile_gated.py --T $T --out $R/profile_gated_$T.json > $R/profile_gated_$T.log 2>&1; echo "rc=$?" >> $R/profile_gated_$T.log; grep -E "host|total|rc=" $R/profile_gated_$T.log; done
echo "t $(( $(date +%s) - T0 )) s"
timeout 200 python3 benchmarks/bench_kernels.py --gated --out $R/kernels > $R/kernels_gated.log 2>&1; echo "rc=$?" >> $R/kernels_gated.log
grep -E "fwd_bwd|rc=" $R/kernels_gated.log | cut -c1-200 | tail -14
echo "total $(( $(date +%s) - T0 )) s"
