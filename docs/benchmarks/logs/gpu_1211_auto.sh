#!/bin/bash
# Prepared on 2026-12-08 (ninth session): call it asking for `nvidia-h200`. On an H200 its targets
# (gpu_1209_h200a.sh: 128K selective, 2M offloaded, 8K from graphs, ...); on an H100 the whole GPU
# suite (gpu_1211b.sh).
if nvidia-smi --query-gpu=name --format=csv,noheader | grep -q H200; then
  exec bash docs/benchmarks/logs/gpu_1209_h200a.sh
else
  exec bash docs/benchmarks/logs/gpu_1211b.sh
fi
