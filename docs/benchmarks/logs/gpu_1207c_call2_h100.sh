#!/bin/bash
# H100 alternative of run_h200a: TNL-1B at 128K with the whole-layer chunked recompute, pure linear vs the 1:7 hybrid (issue 26)
set -u
T0=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 PYTHONFAULTHANDLER=1
R=$OUT/h100; mkdir -p $R
nvidia-smi --query-gpu=name,memory.total --format=csv > $R/host.txt
CH="--recompute-granularity full --recompute-chunk-size 16384"
timeout 400 python3 benchmarks/bench_training.py --out $R/training_hybrid_128k --preset tnl-1b --seq-length 131072 --steps 3 --warmup 2 \
  --common "$CH" --config "linear=" --config "hybrid-1to7=--hybrid-layer-pattern LLLLLLL*LLLLLLL* --num-query-groups 4" --timeout 180 > $R/training_hybrid_128k.log 2>&1
echo "rc=$?" >> $R/training_hybrid_128k.log
tail -5 $R/training_hybrid_128k.log
echo "total $(( $(date +%s) - T0 )) s"
