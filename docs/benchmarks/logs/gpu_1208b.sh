#!/bin/bash
# Second call of 2026-12-07's seventh session (any card), after gpu_1208_prepared_any.sh: the fixed
# decay now aims at 512 programs (the 32K sweep's best); this call checks that launch at 8K and 128K
# and against fla in one run, reruns the hybrid graph test in deterministic mode, times 8K from a
# graph with 4 sequences a step in other splits, and the loss at 1M tokens against the libraries.
. docs/benchmarks/logs/gpu_setup.sh res2
left() { echo $(( ${CALL_S:-560} - ($(date +%s) - T0) )); }
MEGATRON_LASP_GPU_REPORT=$R/gpu_graph_hybrid.json timeout 110 python3 -m pytest -m gpu tests/test_gpu.py \
  -k cuda_graph_holds_hybrid -v -p no:cacheprovider > $R/pytest_graph_hybrid.log 2>&1; echo "rc=$?" >> $R/pytest_graph_hybrid.log; save
timeout 90 python3 benchmarks/gpu_check_kernels.py --bf16-shapes 3 --fp32-shapes 1 --out $R/kernels_check.json \
  > $R/check_fixed.log 2>&1; echo "rc=$?" >> $R/check_fixed.log; save
timeout 90 python3 benchmarks/bench_kernels.py --gated --out $R/kernels > $R/bench_gated.log 2>&1; echo "rc=$?" >> $R/bench_gated.log; save
for T in 8192 131072; do
  timeout 50 python3 benchmarks/bench_kernels.py --sweep --sweep-seq-length $T --out $R/kernels \
    > $R/sweep_fixed_$T.log 2>&1; echo "rc=$?" >> $R/sweep_fixed_$T.log; save
done
G="--cuda-graph-impl local --cuda-graph-scope full_iteration --cuda-graph-warmup-steps 1"
if [ $(left) -gt 100 ]; then
  timeout $(( $(left) > 135 ? 130 : $(left) - 5 )) python3 benchmarks/bench_training.py --out $R/training_8k_graph \
    --preset tnl-1b --seq-length 8192 --steps 12 --warmup 3 --profile-steps 1 --timeout 40 \
    --config "graph-2x2=$G --micro-batch-size 2 --global-batch-size 4" \
    --config "graph-1x4=$G --micro-batch-size 4 --global-batch-size 4" \
    --config "graph-4x2=$G --micro-batch-size 2 --global-batch-size 8" \
    > $R/training_8k_graph.log 2>&1; echo "rc=$?" >> $R/training_8k_graph.log; save
fi
if [ $(left) -gt 40 ]; then
  timeout $(( $(left) - 10 )) python3 benchmarks/bench_loss.py --out $R/loss_1m --tokens 1048576 \
    --impls ours ours_triton liger cce > $R/loss_1m.log 2>&1; echo "rc=$?" >> $R/loss_1m.log; save
fi
