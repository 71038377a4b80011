#!/bin/bash
# The shortest prepared call (2026-12-08, under 5 minutes of device time left): only the captured
# step against the eager one (losses, gradient norms and weights bitwise, and a resume), then as much
# of TNL-1B at 8K eager / from a graph as the call's time allows.
. docs/benchmarks/logs/gpu_setup.sh res
MEGATRON_LASP_GPU_REPORT=$R/gpu_graph.json timeout 150 python3 -m pytest -m gpu tests/test_gpu.py -k cuda_graph \
  -v -p no:cacheprovider > $R/pytest_graph.log 2>&1; echo "rc=$?" >> $R/pytest_graph.log; save
G="--cuda-graph-impl local --cuda-graph-scope full_iteration --cuda-graph-warmup-steps 1"
left=$(( ${CALL_S:-220} - ($(date +%s) - T0) ))
[ $left -gt 40 ] && timeout $(( left - 5 )) python3 benchmarks/bench_training.py --out $R/training_8k_graph --preset tnl-1b \
  --seq-length 8192 --steps 10 --warmup 3 --profile-steps 0 --timeout 35 --config "eager=" --config "graph=$G" \
  > $R/training_8k_graph.log 2>&1; echo "rc=$?" >> $R/training_8k_graph.log; save
