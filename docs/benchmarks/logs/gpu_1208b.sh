#!/bin/bash
# Second call of 2026-12-07's seventh session (any card), after gpu_1208_prepared_any.sh; not run
# (no machine came). The fixed decay now aims at 512 programs (the 32K sweep's best), and the
# selective recompute refills the fused ops' outputs in place. In order, each item only where the
# time left (CALL_S, default 560 s) holds it: that launch's correctness at real shapes (bf16 and fp32
# against fp64); the fused ops' GPU tests (the in-place refill bit for bit); the launch against fla
# in one run; the fused ops at 128K tokens with the refill timed both ways; the hybrid graph test in
# deterministic mode; the launch sweep at 8K and 128K; 8K from a graph with 4 sequences a step in
# other splits; the loss at 1M tokens against the libraries.
. docs/benchmarks/logs/gpu_setup.sh res2
item check_fixed 70 python3 benchmarks/gpu_check_kernels.py --bf16-shapes 3 --fp32-shapes 1 --out $R/kernels_check.json
item pytest_fused 60 python3 -m pytest -m gpu tests/test_fused.py -v -p no:cacheprovider
item bench_gated 80 python3 benchmarks/bench_kernels.py --gated --out $R/kernels
item fused_ops_128k 120 python3 benchmarks/bench_fused_ops.py --out $R/fused_ops_128k --tokens 131072
MEGATRON_LASP_GPU_REPORT=$R/gpu_graph_hybrid.json item pytest_graph_hybrid 100 \
  python3 -m pytest -m gpu tests/test_gpu.py -k cuda_graph_holds_hybrid -v -p no:cacheprovider
item sweep_fixed_8192 40 python3 benchmarks/bench_kernels.py --sweep --sweep-seq-length 8192 --out $R/kernels
item sweep_fixed_131072 50 python3 benchmarks/bench_kernels.py --sweep --sweep-seq-length 131072 --out $R/kernels
G="--cuda-graph-impl local --cuda-graph-scope full_iteration --cuda-graph-warmup-steps 1"
item training_8k_graph 130 python3 benchmarks/bench_training.py --out $R/training_8k_graph \
  --preset tnl-1b --seq-length 8192 --steps 12 --warmup 3 --profile-steps 1 --timeout 40 \
  --config "graph-2x2=$G --micro-batch-size 2 --global-batch-size 4" \
  --config "graph-1x4=$G --micro-batch-size 4 --global-batch-size 4" \
  --config "graph-4x2=$G --micro-batch-size 2 --global-batch-size 8"
item loss_1m 100 python3 benchmarks/bench_loss.py --out $R/loss_1m --tokens 1048576 --impls ours ours_triton liger cce
