#!/bin/bash
# Prepared on 2026-12-07 (seventh session) and not run: the first of two calls that need an H200 (it
# replaces gpu_1207e_prepared_h200a.sh), from the repository root with the cp312 wheels in .whl; each
# item only where the time left (CALL_S, default 560 s) holds it, most wanted first:
#  1. TNL-1B at 128K, selective recompute, fixed decay (the 55% target; the fused ops' outputs now
#     refilled in place: the 34 ms of device-to-device copies of the 2026-12-01 profile should be gone);
#  1b. (added 2026-12-07, eighth session) 2M tokens with the first 8 layers' inputs in pinned host
#     memory (the 2048K target; 1M the same way ran on an H100 in 70.8 GiB at 65.6K tokens/s);
#  2. TNL-1B at 8K: eager, and from a CUDA graph with 2 micro-batches of 2 (49.9% on an H100; the
#     50% target is the H200's) and with one micro-batch of 4;
#  3. item 1 replayed from a CUDA graph (the 27 ms of idle in the 2026-12-01 profile; whether the
#     graph's pool fits beside 132 GiB of selective-recompute activations is part of the question);
#     the fused ops against torch.compile on the H200;
#  4. 128K selective with Mamba2 gates and the 1:7 hybrid (item 1's fixed decay, in the same call,
#     is their baseline).
. docs/benchmarks/logs/gpu_setup.sh h200a
grep -q H200 $R/host.txt || echo "not an H200: items 1, 1b and 4 do not fit an H100 (80 GB)" >> $R/host.txt
SEL="--recompute-granularity selective --recompute-modules core_attn elementwise"
G="--cuda-graph-impl local --cuda-graph-scope full_iteration --cuda-graph-warmup-steps 1"
item training_128k 140 python3 benchmarks/bench_training.py --out $R/training_128k --preset tnl-1b \
  --seq-length 131072 --steps 3 --warmup 2 --profile-steps 1 --timeout 130 --config "fixed-selective=$SEL"
item memory_2m 240 python3 benchmarks/bench_memory.py --preset tnl-1b --settings offload --offload-layers 8 \
  --lengths 2097152 --budget-s 235 --candidate-timeout 230 --out $R/memory_2m
item training_8k 130 python3 benchmarks/bench_training.py --out $R/training_8k_graph --preset tnl-1b \
  --seq-length 8192 --steps 12 --warmup 3 --profile-steps 1 --timeout 40 --config "eager=" \
  --config "graph-2x2=$G --micro-batch-size 2 --global-batch-size 4" \
  --config "graph-1x4=$G --micro-batch-size 4 --global-batch-size 4"
item training_128k_graph 140 python3 benchmarks/bench_training.py --out $R/training_128k_graph --preset tnl-1b \
  --seq-length 131072 --steps 3 --warmup 2 --profile-steps 1 --timeout 130 --config "fixed-selective-graph=$SEL $G"
item fused_ops 90 python3 benchmarks/bench_fused_ops.py --out $R/fused_ops --tokens 32768
item training_128k_gated_hybrid 200 python3 benchmarks/bench_training.py --out $R/training_128k_more \
  --preset tnl-1b --seq-length 131072 --steps 3 --warmup 2 --timeout 95 --common "$SEL" \
  --config "mamba2=--linear-attention-gate mamba2" \
  --config "hybrid-1to7=--hybrid-layer-pattern LLLLLLL*LLLLLLL* --num-query-groups 4"
