#!/bin/bash
# Prepared on 2026-12-07 (fourth session) and not run: the second of two calls that need an H200
# (after gpu_1207e_prepared_h200a.sh), same setup: TNL-1B at 1M / 2M tokens with and without
# offload, the loss at 1M against the libraries, the fused ops against torch.compile.
. docs/benchmarks/logs/gpu_setup.sh h200
# 1M and 2M tokens with the first 8 layers' inputs offloaded, then without offload (issue 28)
python3 benchmarks/bench_memory.py --preset tnl-1b --settings offload,chunked --offload-layers 8 \
  --lengths 1048576,2097152 --budget-s 420 --candidate-timeout 300 --out $R/memory_2m > $R/memory_2m.log 2>&1; echo "rc=$?" >> $R/memory_2m.log; save
# the loss at 1M tokens against the libraries (issue 28)
[ -z "${SKIP_LOSS:-}" ] && timeout 150 python3 benchmarks/bench_loss.py --out $R/loss_1m --tokens 1048576 --impls ours ours_triton liger cce > $R/loss_1m.log 2>&1
echo "rc=$?" >> $R/loss_1m.log; save
# the fused ops against torch.compile on the H200 (issue 28)
timeout 150 python3 benchmarks/bench_fused_ops.py --out $R/fused_ops --tokens 32768 > $R/fused_ops.log 2>&1; echo "rc=$?" >> $R/fused_ops.log; save
