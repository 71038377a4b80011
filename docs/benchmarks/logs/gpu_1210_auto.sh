#!/bin/bash
# Dispatches by the card that came: on an H200 its targets (gpu_1209_h200a.sh: 128K selective, 2M
# offloaded, 8K from graphs), else the leak and the training tests (gpu_1210a.sh).
if nvidia-smi --query-gpu=name --format=csv,noheader | grep -q H200; then
  exec bash docs/benchmarks/logs/gpu_1209_h200a.sh
else
  exec bash docs/benchmarks/logs/gpu_1210a.sh
fi
