# The one GPU call of 2026-12-06 (one H100 80GB, torch 2.11, Triton 3.6, megatron-core 0.19.2), run from the repository root
# with the cp312 wheels of megatron-core, fla-core, einops, psutil, liger-kernel, cut-cross-entropy in .whl and the
# bundled corpus tokenized beforehand; OUT is the results directory.
#!/bin/bash
# One call on the GPU host, from the repository root: correctness concurrently, then timings.
set -u
T0=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
export MEGATRON_LASP_CORPUS_PREFIX=$PWD/.gpu_lead/_corpus/corpus_text_document
R=/tmp/res; mkdir -p $R /tmp/blogs
BUDGET=${BUDGET:-540}
CT=${CT:-430}
(nvidia-smi --query-gpu=name,memory.total --format=csv; python3 -c "import torch,triton,megatron.core as m;print(torch.__version__,triton.__version__,m.__version__)") > $R/host.txt 2>&1
(MEGATRON_LASP_GPU_REPORT=$R/gpu_multirank.json timeout $CT python3 -m pytest -m gpu tests/test_gpu_multirank.py -v -p no:cacheprovider > $R/pytest_multirank.log 2>&1; echo "rc=$?" >> $R/pytest_multirank.log) &
(MEGATRON_LASP_GPU_REPORT=$R/gpu_tests.json timeout $CT python3 -m pytest -m gpu tests --ignore=tests/test_gpu_multirank.py -v -p no:cacheprovider > $R/pytest_gpu.log 2>&1; echo "rc=$?" >> $R/pytest_gpu.log) &
(timeout $CT python3 benchmarks/bench_sp_loss_curves.py --out $R --log-dir /tmp/blogs --data-prefix $MEGATRON_LASP_CORPUS_PREFIX --num-layers 2 --seq-length 8192 --steps 50 > $R/bench_sp.log 2>&1; echo "rc=$?" >> $R/bench_sp.log; cat /tmp/blogs/*.log > $R/bench_sp_runs.log 2>/dev/null) &
(timeout $CT python3 benchmarks/gpu_check_kernels.py --gated --out $R/kernels_check_gated.json > $R/check_gated.log 2>&1; echo "rc=$?" >> $R/check_gated.log) &
(MEGATRON_LASP_DIST_BACKEND=gloo timeout $CT python3 -m torch.distributed.run --nproc-per-node 2 --master-port 29611 benchmarks/gpu_check_sp.py --no-overlap --out $R/sp_check_gloo2.json > $R/check_sp.log 2>&1; echo "rc=$?" >> $R/check_sp.log) &
wait
echo "correctness done at $(( $(date +%s) - T0 )) s"
left() { echo $(( BUDGET - ($(date +%s) - T0) )); }
if [ $(left) -gt 60 ]; then timeout $(( $(left) - 25 )) python3 benchmarks/bench_kernels.py --gated --out $R/kernels > $R/bench_gated.log 2>&1; echo "rc=$?" >> $R/bench_gated.log; fi
if [ $(left) -gt 60 ]; then timeout $(( ($(left) - 20) * 2 / 3 )) python3 benchmarks/bench_softmax_attn.py kernels --out $R/softmax_kernels > $R/bench_softmax.log 2>&1; echo "rc=$?" >> $R/bench_softmax.log; fi
if [ $(left) -gt 40 ]; then timeout $(( $(left) - 20 )) python3 benchmarks/bench_loss.py --out $R --tokens 8192 131072 > $R/bench_loss.log 2>&1; echo "rc=$?" >> $R/bench_loss.log; fi
tar czf $OUT/results.tgz -C $R .
for f in $R/pytest_multirank.log $R/pytest_gpu.log; do grep -E "PASSED|FAILED|ERROR|SKIPPED|passed|failed" $f | tail -60; done
tail -3 $R/check_sp.log $R/check_gated.log $R/bench_sp.log $R/bench_gated.log $R/bench_softmax.log $R/bench_loss.log 2>/dev/null
echo "total $(( $(date +%s) - T0 )) s"
