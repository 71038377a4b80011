#!/bin/bash
# Prepared on 2026-12-07 (seventh session) and not run: the second call that needs an H200 (it
# replaces gpu_1207e_prepared_h200b.sh), same setup: TNL-1B at 1M and 2M tokens with the first 8
# layers' inputs offloaded and without offload (the 2048K target, the memory model), then the loss
# at 1M tokens against liger-kernel and cut-cross-entropy where gpu_1208b.sh has not timed it.
. docs/benchmarks/logs/gpu_setup.sh h200b
item memory_2m 440 python3 benchmarks/bench_memory.py --preset tnl-1b --settings offload,chunked --offload-layers 8 \
  --lengths 1048576,2097152 --budget-s 420 --candidate-timeout 300 --out $R/memory_2m
item loss_1m 100 python3 benchmarks/bench_loss.py --out $R/loss_1m --tokens 1048576 --impls ours ours_triton liger cce
