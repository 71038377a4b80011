#!/bin/bash
# 2026-12-08: the GPU suite of 2026-12-08 00:53 (H100) ran out of memory in the resume matrix: the
# trainings run one after another in one process kept ~6 GiB each. First who holds a finished run
# (benchmarks/gpu_check_leak.py: memory left and the referrer chains), then tests/test_gpu.py (the
# new test that a finished run frees its memory, the resume matrix a process per case, the
# memory-history test with its flags fixed, the CUDA-graph tests).
. docs/benchmarks/logs/gpu_setup.sh leak
item leak 100 python3 benchmarks/gpu_check_leak.py --runs 3 --out $R/leak.json
MEGATRON_LASP_GPU_REPORT=$R/gpu_tests.json item pytest_gpu 480 \
  python3 -m pytest -m gpu tests/test_gpu.py -v -p no:cacheprovider --timeout 400 -rs
