#!/bin/bash
# 2026-12-07, fifth session, third call (any card, about 3 minutes: what was left of the session's
# device time), gpu_1207f_b.sh cut down after a failed start took its time:
#  1. the step replayed from a CUDA graph against the eager step (bits, and a resume);
#  2. the gated kernels' GPU tests with the new gated launch (a quarter of the programs, segments
#     up to 8192 tokens);
#  3. TNL-1B at 8K tokens, eager and from a CUDA graph.
. docs/benchmarks/logs/gpu_setup.sh res
MEGATRON_LASP_GPU_REPORT=$R/gpu_graph.json timeout 75 python3 -m pytest -m gpu tests/test_gpu.py -k cuda_graph \
  -v -p no:cacheprovider > $R/pytest_graph.log 2>&1; echo "rc=$?" >> $R/pytest_graph.log
MEGATRON_LASP_GPU_REPORT=$R/gpu_gated.json timeout 80 python3 -m pytest -m gpu tests/test_gated_attn.py -x \
  -p no:cacheprovider > $R/pytest_gated.log 2>&1; echo "rc=$?" >> $R/pytest_gated.log
G="--cuda-graph-impl local --cuda-graph-scope full_iteration --cuda-graph-warmup-steps 1"
timeout 75 python3 benchmarks/bench_training.py --out $R/training_8k_graph --preset tnl-1b --seq-length 8192 \
  --steps 10 --warmup 3 --profile-steps 1 --timeout 35 --config "eager=" --config "graph=$G" \
  > $R/training_8k_graph.log 2>&1; echo "rc=$?" >> $R/training_8k_graph.log
