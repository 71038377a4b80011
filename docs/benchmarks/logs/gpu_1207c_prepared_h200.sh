#!/bin/bash
# Prepared on 2026-12-07 and not run: the measurements that need an H200 (141 GB), one after another
# (each alone on the GPU), from the repository root with the cp312 wheels in .whl; OUT the results
# directory. About 9 minutes: split at the marked line into two calls where the call limit is 10 minutes.
set -u
T0=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 PYTHONFAULTHANDLER=1
R=$OUT/h200; mkdir -p $R
nvidia-smi --query-gpu=name,memory.total --format=csv > $R/host.txt
SEL="--recompute-granularity selective --recompute-modules core_attn elementwise"
# TNL-1B at 128K, selective recompute: fixed decay vs Mamba2 gates vs the 1:7 hybrid (issues 25, 26, 28)
timeout 330 python3 benchmarks/bench_training.py --out $R/training_128k --preset tnl-1b --seq-length 131072 --steps 3 --warmup 2 \
  --common "$SEL" --config "fixed=" --config "mamba2=--linear-attention-gate mamba2" \
  --config "hybrid-1to7=--hybrid-layer-pattern LLLLLLL*LLLLLLL* --num-query-groups 4" --timeout 100 > $R/training_128k.log 2>&1
echo "rc=$?" >> $R/training_128k.log
# the 1:7 hybrid at 512K with the chunked recompute (issue 26's target)
python3 benchmarks/bench_memory.py --preset tnl-1b-hybrid-1to7 --settings chunked --lengths 524288 \
  --budget-s 200 --candidate-timeout 190 --out $R/memory_hybrid > $R/memory_hybrid.log 2>&1; echo "rc=$?" >> $R/memory_hybrid.log
# ---- second call ----
# 1M and 2M tokens with the first 8 layers' inputs offloaded, then without offload (issue 28)
python3 benchmarks/bench_memory.py --preset tnl-1b --settings offload,chunked --offload-layers 8 \
  --lengths 1048576,2097152 --budget-s 420 --candidate-timeout 300 --out $R/memory_2m > $R/memory_2m.log 2>&1; echo "rc=$?" >> $R/memory_2m.log
# the loss at 1M tokens against the libraries (issue 28)
timeout 150 python3 benchmarks/bench_loss.py --out $R/loss_1m --tokens 1048576 --impls ours ours_triton liger cce > $R/loss_1m.log 2>&1
echo "rc=$?" >> $R/loss_1m.log
echo "total $(( $(date +%s) - T0 )) s"
