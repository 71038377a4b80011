#!/bin/bash
# Prepared on 2026-12-07 (fourth session) and not run, any card (about 4 minutes): launch overrides of
# the per-token-gate kernels against the fixed decay's default launch, GPU time from CUDA-graph
# replays, B1 H16 D128 bf16 at T32K and T128K (issue 25's 1.25x: 1.27-1.29x with the default launch).
# A winner becomes the gated path's launch in triton_config, then bench_kernels --gated again.
. docs/benchmarks/logs/gpu_setup.sh res
timeout 300 python3 benchmarks/bench_kernels.py --sweep --sweep-set gated --out $R/kernels > $R/sweep_gated.log 2>&1
echo "rc=$?" >> $R/sweep_gated.log
