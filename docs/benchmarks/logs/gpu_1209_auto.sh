#!/bin/bash
# Dispatches by the card that came (a call for `nvidia-h200` may get an H100 or an H200): on an
# H200 the H200 items, most wanted first (gpu_1209_h200a.sh), else the any-card items
# (gpu_1209b.sh; gpu_1208b.sh before it ran).
if nvidia-smi --query-gpu=name --format=csv,noheader | grep -q H200; then
  exec bash docs/benchmarks/logs/gpu_1209_h200a.sh
else
  exec bash docs/benchmarks/logs/gpu_1209b.sh
fi
