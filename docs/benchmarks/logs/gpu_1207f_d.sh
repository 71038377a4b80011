#!/bin/bash
# 2026-12-07, fifth session, last call (any card, about 2.5 minutes: what was left of the session's
# device time after failed starts): the gated kernels' GPU tests with the new gated launch (a
# quarter of the programs, segments up to 8192 tokens), then the step replayed from a CUDA graph
# against the eager step (bits, and a resume).
. docs/benchmarks/logs/gpu_setup.sh res
MEGATRON_LASP_GPU_REPORT=$R/gpu_gated.json timeout 85 python3 -m pytest -m gpu tests/test_gated_attn.py -v \
  -p no:cacheprovider > $R/pytest_gated.log 2>&1; echo "rc=$?" >> $R/pytest_gated.log
MEGATRON_LASP_GPU_REPORT=$R/gpu_graph.json timeout 60 python3 -m pytest -m gpu tests/test_gpu.py -k cuda_graph \
  -v -p no:cacheprovider > $R/pytest_graph.log 2>&1; echo "rc=$?" >> $R/pytest_graph.log
