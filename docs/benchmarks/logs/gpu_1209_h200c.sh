#!/bin/bash
# 2026-12-07, eighth session: one H200 call in the device time left (~500 s), most wanted first:
#  1. TNL-1B at 128K, selective recompute (the 55% target; Triton loss and in-place refill since the
#     last H200 run);
#  2. 2M tokens with the first 8 layers' inputs in pinned host memory (the 2048K target; 1M the same
#     way ran on an H100 in 70.8 GiB at 65.6K tokens/s);
#  3. 8K from a CUDA graph, 2 and 4 sequences a micro-batch (the 50% target; 50.3 / 51.6% on an H100).
. docs/benchmarks/logs/gpu_setup.sh h200c
grep -q H200 $R/host.txt || echo "not an H200: items 1 and 2 do not fit an H100 (80 GB)" >> $R/host.txt
SEL="--recompute-granularity selective --recompute-modules core_attn elementwise"
G="--cuda-graph-impl local --cuda-graph-scope full_iteration --cuda-graph-warmup-steps 1"
item training_128k 140 python3 benchmarks/bench_training.py --out $R/training_128k --preset tnl-1b \
  --seq-length 131072 --steps 3 --warmup 2 --profile-steps 1 --timeout 130 --config "fixed-selective=$SEL"
item memory_2m 240 python3 benchmarks/bench_memory.py --preset tnl-1b --settings offload --offload-layers 8 \
  --lengths 2097152 --budget-s 235 --candidate-timeout 230 --out $R/memory_2m
item training_8k 100 python3 benchmarks/bench_training.py --out $R/training_8k_graph --preset tnl-1b \
  --seq-length 8192 --steps 12 --warmup 3 --profile-steps 1 --timeout 40 \
  --config "graph-2x2=$G --micro-batch-size 2 --global-batch-size 4" \
  --config "graph-1x4=$G --micro-batch-size 4 --global-batch-size 4"
