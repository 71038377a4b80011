#!/bin/bash
# The short form of gpu_1208_prepared_any.sh for a call with under 6 minutes of device time left
# (2026-12-08): the captured step against the eager one, then TNL-1B at 8K eager / graph / graph with
# 4 sequences a step.
. docs/benchmarks/logs/gpu_setup.sh res
MEGATRON_LASP_GPU_REPORT=$R/gpu_graph.json timeout 150 python3 -m pytest -m gpu tests/test_gpu.py -k cuda_graph \
  -v -p no:cacheprovider > $R/pytest_graph.log 2>&1; echo "rc=$?" >> $R/pytest_graph.log; save
G="--cuda-graph-impl local --cuda-graph-scope full_iteration --cuda-graph-warmup-steps 1"
timeout 150 python3 benchmarks/bench_training.py --out $R/training_8k_graph --preset tnl-1b --seq-length 8192 \
  --steps 12 --warmup 3 --profile-steps 1 --timeout 40 \
  --config "eager=" --config "graph=$G" --config "graph-4x1=$G --global-batch-size 4" \
  > $R/training_8k_graph.log 2>&1; echo "rc=$?" >> $R/training_8k_graph.log; save
