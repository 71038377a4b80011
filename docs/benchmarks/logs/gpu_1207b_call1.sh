#!/bin/bash
# Prepared on 2026-12-07 and not run (no device time left): the next call, from the repository root, with
# the cp312 wheels in .whl and the bundled corpus tokenized into .gpu_lead/_corpus; OUT is the results directory.
# The second GPU call of 2026-12-07 (one GPU): correctness concurrently (shared-GPU training DP/SP/PP + resume,
# the modes with the initial state, hybrid checks, gated kernels vs fp64, LASP loss curves), then alone:
# gated kernel timings, training MFU (fixed vs mamba2 at 128K, linear vs hybrid 1:7 at 32K).
set -u
T0=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 PYTHONFAULTHANDLER=1
export MEGATRON_LASP_CORPUS_PREFIX=$PWD/.gpu_lead/_corpus/corpus_text_document
R=/tmp/res; mkdir -p $R /tmp/blogs
BUDGET=${BUDGET:-470}
CT=${CT:-200}
left() { echo $(( BUDGET - ($(date +%s) - T0) )); }
(nvidia-smi --query-gpu=name,memory.total --format=csv; python3 -c "import torch,triton,megatron.core as m;print(torch.__version__,triton.__version__,m.__version__)") > $R/host.txt 2>&1
job() { local name=$1; shift; (timeout $CT "$@" > $R/$name.log 2>&1; echo "rc=$?" >> $R/$name.log) & }
MEGATRON_LASP_GPU_REPORT=$R/gpu_multirank.json job pytest_multirank python3 -m pytest -m gpu tests/test_gpu_multirank.py -k "(training or resume) and not torchrun" -v -p no:cacheprovider
MEGATRON_LASP_GPU_REPORT=$R/gpu_multirank_modes.json job pytest_modes python3 -m pytest -m gpu tests/test_gpu_multirank.py -k "every_mode or strided" -v -p no:cacheprovider
MEGATRON_LASP_GPU_REPORT=$R/gpu_hybrid.json job pytest_hybrid python3 -m pytest -m gpu tests/test_gpu_hybrid.py -k "sp2 or chunked" -v -p no:cacheprovider
MEGATRON_LASP_GPU_REPORT=$R/gpu_gated.json job pytest_gated python3 -m pytest -m gpu tests/test_gated_attn.py tests/test_loss_kernels.py -v -p no:cacheprovider
job check_gated python3 benchmarks/gpu_check_kernels.py --gated --out $R/kernels_check_gated.json
MEGATRON_LASP_GPU_REPORT=$R/gpu_torchrun.json job pytest_torchrun python3 -m pytest -m gpu tests/test_gpu_multirank.py -k torchrun -v -p no:cacheprovider
job bench_sp python3 benchmarks/bench_sp_loss_curves.py --out $R --log-dir /tmp/blogs --data-prefix $MEGATRON_LASP_CORPUS_PREFIX --num-layers 2 --seq-length 8192 --steps 50 --no-noise-run
wait
cat /tmp/blogs/*.log > $R/bench_sp_runs.log 2>/dev/null
echo "correctness done at $(( $(date +%s) - T0 )) s"
if [ $(left) -gt 60 ]; then timeout 110 python3 benchmarks/bench_kernels.py --gated --out $R/kernels > $R/bench_gated.log 2>&1; echo "rc=$?" >> $R/bench_gated.log; fi
SEL="--recompute-granularity selective --recompute-modules core_attn elementwise"
if [ $(left) -gt 80 ]; then timeout $(( $(left) - 10 )) python3 benchmarks/bench_training.py --out $R/training_128k --preset tnl-1b --seq-length 131072 --steps 3 --warmup 2 --profile-steps 0 \
  --common "$SEL" --config "fixed=" --config "mamba2=--linear-attention-gate mamba2" --timeout 70 > $R/training_128k.log 2>&1; echo "rc=$?" >> $R/training_128k.log; fi
if [ $(left) -gt 60 ]; then timeout $(( $(left) - 8 )) python3 benchmarks/bench_training.py --out $R/training_32k --preset tnl-1b --seq-length 32768 --steps 3 --warmup 2 --profile-steps 0 \
  --common "$SEL" --config "linear=" --config "hybrid-1to7=--hybrid-layer-pattern LLLLLLL*LLLLLLL* --num-query-groups 4" --timeout 45 > $R/training_32k.log 2>&1; echo "rc=$?" >> $R/training_32k.log; fi
tar czf $OUT/results.tgz -C $R .
for f in $R/pytest_*.log; do echo "== $f"; grep -E "PASSED|FAILED|ERROR|passed|failed|rc=" $f | tail -12; done
tail -3 $R/bench_sp.log $R/check_gated.log $R/bench_gated.log 2>/dev/null
grep -hE "MFU|rc=|rror" $R/training_128k.log $R/training_32k.log 2>/dev/null | tail -12
echo "total $(( $(date +%s) - T0 )) s"
