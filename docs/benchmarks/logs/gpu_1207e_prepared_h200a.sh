#!/bin/bash
# Prepared on 2026-12-07 (fourth session) and not run: the first of two calls that need an H200
# (141 GB), from the repository root with the cp312 wheels in .whl, OUT the results directory; about
# 9 minutes each. This one (about 6 minutes): TNL-1B at 128K with selective recompute (fixed decay,
# Mamba2 gates, the 1:7 hybrid). The hybrid at 512K is in gpu_1207e_prepared_any.sh (an H100 holds it).
. docs/benchmarks/logs/gpu_setup.sh h200
SEL="--recompute-granularity selective --recompute-modules core_attn elementwise"
# TNL-1B at 128K, selective recompute: fixed decay vs Mamba2 gates vs the 1:7 hybrid (issues 25, 26, 28)
timeout 330 python3 benchmarks/bench_training.py --out $R/training_128k --preset tnl-1b --seq-length 131072 --steps 3 --warmup 2 \
  --common "$SEL" --config "fixed=" --config "mamba2=--linear-attention-gate mamba2" \
  --config "hybrid-1to7=--hybrid-layer-pattern LLLLLLL*LLLLLLL* --num-query-groups 4" --timeout 100 > $R/training_128k.log 2>&1
echo "rc=$?" >> $R/training_128k.log; save
# Added in the fifth session: TNL-1B at 8K on the H200 (the 50% target), eager and from a CUDA graph,
# with one and with four sequences a step
# (SKIP_8K=1 leaves it out where gpu_1208_prepared_any.sh already ran on the same H200, and times the
# loss at 1M tokens instead, the item of _h200b.sh that SKIP_LOSS=1 then leaves out there)
if [ -n "${SKIP_8K:-}" ]; then
  timeout 150 python3 benchmarks/bench_loss.py --out $R/loss_1m --tokens 1048576 --impls ours ours_triton liger cce \
    > $R/loss_1m.log 2>&1; echo "rc=$?" >> $R/loss_1m.log; save
  exit 0
fi
G="--cuda-graph-impl local --cuda-graph-scope full_iteration --cuda-graph-warmup-steps 1"
timeout 200 python3 benchmarks/bench_training.py --out $R/training_8k_graph --preset tnl-1b --seq-length 8192 \
  --steps 12 --warmup 3 --profile-steps 1 --timeout 45 \
  --config "eager=" --config "graph=$G" --config "graph-4x1=$G --global-batch-size 4" \
  > $R/training_8k_graph.log 2>&1; echo "rc=$?" >> $R/training_8k_graph.log; save
