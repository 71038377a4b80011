#!/bin/bash
# 2026-12-08: the GPU suite of 2026-12-08 00:53 (H100) ran out of memory in the resume matrix: the
# trainings run one after another in one process kept ~6 GiB each. First who holds a finished run
# (benchmarks/gpu_check_leak.py: memory left and the referrer chains); then 1M tokens with 8 layers
# offloaded again, now that GPTModel.forward no longer holds the first layer's input (the 4 GiB
# block of models/model.py:65 in the 00:52 snapshot); then tests/test_gpu.py's training tests.
. docs/benchmarks/logs/gpu_setup.sh leak
item leak 100 python3 benchmarks/gpu_check_leak.py --runs 3 --out $R/leak.json
item snapshot_1m 150 bash -c "python3 pretrain_linear_lm.py --model-preset tnl-1b --mock-data --bf16 \
  --ddp-impl megatron --use-distributed-optimizer --micro-batch-size 1 --global-batch-size 1 --train-iters 2 \
  --seq-length 1048576 --recompute-granularity full --recompute-method uniform --recompute-num-layers 1 \
  --recompute-chunk-size 16384 --cpu-offloading --cpu-offloading-num-layers 8 --log-interval 1 --eval-interval 0 \
  --lr 1e-4 --lr-warmup-iters 1 --record-memory-history --memory-snapshot-path /tmp/snap_1m.pickle \
  && python3 benchmarks/memory_peak.py /tmp/snap_1m.pickle --top 25 --json $R/peak_1m.json"
MEGATRON_LASP_GPU_REPORT=$R/gpu_tests.json item pytest_gpu 150 \
  python3 -m pytest -m gpu tests/test_gpu.py -v -p no:cacheprovider --timeout 400 -rs \
  -k "finished_run or record_memory or resume_equals"
