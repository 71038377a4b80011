#!/bin/bash
# Prepared on 2026-12-07 (fourth session) and not run: the softmax layers of a hybrid in query
# chunks under the chunked recompute, on any card (at most about 10 minutes), from the repository root with
# the cp312 wheels in .whl, OUT the results directory:
#  1. the bf16 hybrid's chunked recompute against full recompute on the GPU (query chunks, varlen),
#     unpacked and packed;
#  2. the 1:7 hybrid at 512K with and without offload (the memory model: 34.5 and 62.5 GiB);
#  3. the 1:7 hybrid at 128K with the chunked recompute (39.5% MFU before query chunks).
. docs/benchmarks/logs/gpu_setup.sh res
MEGATRON_LASP_GPU_REPORT=$R/gpu_hybrid_chunked.json timeout 180 python3 -m pytest -m gpu tests/test_gpu_hybrid.py \
  -k chunked -v -p no:cacheprovider > $R/pytest_chunked.log 2>&1; echo "rc=$?" >> $R/pytest_chunked.log
python3 benchmarks/bench_memory.py --preset tnl-1b-hybrid-1to7 --settings offload,chunked --lengths 524288 \
  --budget-s 270 --candidate-timeout 135 --out $R/memory_hybrid > $R/memory_hybrid.log 2>&1; echo "rc=$?" >> $R/memory_hybrid.log
timeout 130 python3 benchmarks/bench_training.py --out $R/training_hybrid_128k --preset tnl-1b-hybrid-1to7 \
  --seq-length 131072 --steps 3 --warmup 2 --common "--recompute-granularity full --recompute-chunk-size 16384" \
  --config "hybrid-1to7-query-chunks=" --timeout 110 > $R/training_hybrid_128k.log 2>&1; echo "rc=$?" >> $R/training_hybrid_128k.log
