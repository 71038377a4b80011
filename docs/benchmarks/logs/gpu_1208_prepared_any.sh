#!/bin/bash
# Prepared on 2026-12-07 (fifth session, reordered in the sixth) and not run yet: the first call of the
# next session, any card, about 9 minutes (CALL_S bounds it), from the repository root with the cp312
# wheels in .whl. Each item runs only where the call's time left holds it, most wanted first:
#  1. the step replayed from a CUDA graph against the eager step (bits, a resume; and a hybrid whose
#     softmax layer runs in query chunks under the chunked recompute);
#  2. on an H200 only: TNL-1B at 128K, selective recompute (the 55% target; the Triton loss is the
#     default since the last H200 figure);
#  3. TNL-1B at 8K: eager, from a CUDA graph, from a graph with 4 micro-batches of 1 and 2 of 2
#     (the optimizer's 16 ms shared by 32K tokens);
#  4. the gated kernels' GPU tests with the gated launch (a quarter of the programs, segments up to
#     8192 tokens; test_gpu_long_segments_match_fp64 runs 8192-token segments);
#  5. bench_kernels --gated with the final gated launch (gated / fixed / fla in one run);
#  6. the fixed decay's launch sweep at 32K with fewer programs (fixed vs fla at 32K: 1.89x, target 2x).
. docs/benchmarks/logs/gpu_setup.sh res
MEGATRON_LASP_GPU_REPORT=$R/gpu_graph.json timeout 150 python3 -m pytest -m gpu tests/test_gpu.py -k cuda_graph \
  -v -p no:cacheprovider > $R/pytest_graph.log 2>&1; echo "rc=$?" >> $R/pytest_graph.log; save
if grep -q H200 $R/host.txt && [ $(left) -gt 150 ]; then
  timeout 140 python3 benchmarks/bench_training.py --out $R/training_128k --preset tnl-1b \
    --seq-length 131072 --steps 3 --warmup 2 --profile-steps 1 --timeout 130 \
    --config "fixed-selective=--recompute-granularity selective --recompute-modules core_attn elementwise" \
    > $R/training_128k.log 2>&1; echo "rc=$?" >> $R/training_128k.log; save
fi
G="--cuda-graph-impl local --cuda-graph-scope full_iteration --cuda-graph-warmup-steps 1"
if [ $(left) -gt 100 ]; then
  timeout $(( $(left) > 175 ? 170 : $(left) - 5 )) python3 benchmarks/bench_training.py --out $R/training_8k_graph \
    --preset tnl-1b --seq-length 8192 --steps 12 --warmup 3 --profile-steps 1 --timeout 40 \
    --config "eager=" --config "graph=$G" --config "graph-4x1=$G --global-batch-size 4" \
    --config "graph-2x2=$G --micro-batch-size 2 --global-batch-size 4" \
    > $R/training_8k_graph.log 2>&1; echo "rc=$?" >> $R/training_8k_graph.log; save
fi
if [ $(left) -gt 115 ]; then
  MEGATRON_LASP_GPU_REPORT=$R/gpu_gated.json timeout 110 python3 -m pytest -m gpu tests/test_gated_attn.py -v \
    -p no:cacheprovider > $R/pytest_gated.log 2>&1; echo "rc=$?" >> $R/pytest_gated.log; save
fi
if [ $(left) -gt 60 ]; then timeout $(( $(left) - 45 )) python3 benchmarks/bench_kernels.py --gated --out $R/kernels \
  > $R/bench_gated.log 2>&1; echo "rc=$?" >> $R/bench_gated.log; save; fi
if [ $(left) -gt 25 ]; then timeout $(( $(left) - 10 )) python3 benchmarks/bench_kernels.py --sweep --out $R/kernels \
  > $R/sweep_fixed.log 2>&1; echo "rc=$?" >> $R/sweep_fixed.log; save; fi
