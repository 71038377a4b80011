#!/bin/bash
# 2026-12-07, eighth session, any card: the kernels against fla in one run again, now with B4 T8K
# (the fourth shape, missing from gpu_1208b.sh's run); --record-memory-history on the GPU
# (its test, then 1M tokens with 8 layers offloaded: where the 70.8 GiB peak, 5 GiB above the
# memory model, goes, by allocation site).
. docs/benchmarks/logs/gpu_setup.sh res3
item bench_gated 150 python3 benchmarks/bench_kernels.py --gated --out $R/kernels
MEGATRON_LASP_GPU_REPORT=$R/gpu_memory_history.json item pytest_memory_history 90 \
  python3 -m pytest -m gpu tests/test_gpu.py -k record_memory_history -v -p no:cacheprovider
item snapshot_1m 220 bash -c "python3 pretrain_linear_lm.py --model-preset tnl-1b --mock-data --bf16 \
  --ddp-impl megatron --use-distributed-optimizer --micro-batch-size 1 --global-batch-size 1 --train-iters 2 \
  --seq-length 1048576 --recompute-granularity full --recompute-method uniform --recompute-num-layers 1 \
  --recompute-chunk-size 16384 --cpu-offloading --cpu-offloading-num-layers 8 --log-interval 1 --eval-interval 0 \
  --lr 1e-4 --record-memory-history --memory-snapshot-path /tmp/snap_1m.pickle \
  && python3 benchmarks/memory_peak.py /tmp/snap_1m.pickle --top 25 --json $R/peak_1m.json"
