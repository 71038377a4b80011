#!/bin/bash
# 2026-12-07, fifth session, second call (any card, at most about 7 minutes): after the first
# (gpu_1207f_a.sh) found the fused loss's host-side check inside the captured backward, and the
# gated launch sweep's winner (a quarter of the programs, segments up to 8192 tokens):
#  1. the step replayed from a CUDA graph against the eager step (bits, and a resume);
#  2. TNL-1B at 8K tokens: eager, from a CUDA graph, and from a graph with 2 x 2 micro-batches;
#  3. the gated kernels' GPU tests with the new gated launch;
#  4. bench_kernels --gated (gated / fixed / fla in one run) with it.
. docs/benchmarks/logs/gpu_setup.sh res
left() { echo $(( 420 - ($(date +%s) - T0) )); }
MEGATRON_LASP_GPU_REPORT=$R/gpu_graph.json timeout 120 python3 -m pytest -m gpu tests/test_gpu.py -k cuda_graph \
  -v -p no:cacheprovider > $R/pytest_graph.log 2>&1; echo "rc=$?" >> $R/pytest_graph.log
G="--cuda-graph-impl local --cuda-graph-scope full_iteration --cuda-graph-warmup-steps 1"
timeout 150 python3 benchmarks/bench_training.py --out $R/training_8k_graph --preset tnl-1b --seq-length 8192 \
  --steps 20 --warmup 3 --profile-steps 2 --timeout 50 \
  --config "eager=" --config "graph=$G" --config "graph-2x2-micro-batches=$G --micro-batch-size 2 --global-batch-size 4" \
  > $R/training_8k_graph.log 2>&1; echo "rc=$?" >> $R/training_8k_graph.log
MEGATRON_LASP_GPU_REPORT=$R/gpu_gated.json timeout 90 python3 -m pytest -m gpu tests/test_gated_attn.py -v \
  -p no:cacheprovider > $R/pytest_gated.log 2>&1; echo "rc=$?" >> $R/pytest_gated.log
if [ $(left) -gt 40 ]; then timeout $(( $(left) - 10 )) python3 benchmarks/bench_kernels.py --gated --out $R/kernels \
  > $R/bench_gated.log 2>&1; echo "rc=$?" >> $R/bench_gated.log; fi
