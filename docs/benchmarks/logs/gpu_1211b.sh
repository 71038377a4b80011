#!/bin/bash
# Prepared on 2026-12-08 (ninth session), any card: the whole GPU suite without stopping at the first
# failure (the 2026-12-08 run stopped at the resume matrix's out-of-memory; fixed since: main()
# collects an earlier run's cyclic garbage, the matrix runs a process per case), test_gpu.py first.
. docs/benchmarks/logs/gpu_setup.sh suite
MEGATRON_LASP_GPU_REPORT=$R/gpu_tests.json item pytest_gpu_training 330 \
  python3 -m pytest -m gpu tests/test_gpu.py -v -p no:cacheprovider --timeout 300 -rs
MEGATRON_LASP_GPU_REPORT=$R/gpu_tests.json item pytest_gpu_rest 240 \
  python3 -m pytest -m gpu tests --ignore=tests/test_gpu.py -v -p no:cacheprovider --timeout 200 -rs
