#!/bin/bash
# 2026-12-07, eighth session, any card: the kernels against fla in one run again, now with B4 T8K
# (the fourth shape, missing from gpu_1208b.sh's run).
. docs/benchmarks/logs/gpu_setup.sh res3
item bench_gated 150 python3 benchmarks/bench_kernels.py --gated --out $R/kernels
