#!/bin/bash
# Prepared on 2026-12-07 and not run (too little device time left to start a machine): the next
# call, from the repository root, with the cp312 wheels in .whl and the corpus tokenized into .gpu_lead/_corpus.
# Call 7 of 2026-12-07b: the gated cases of every mode on 2 ranks sharing the GPU, the noise
# reference of the loss curves, the softmax kernels' determinism (SP = 1 and SP = 1 with another loss-chunk order), the gated profile at 8K.
set -u
T0=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site7 .whl/*.whl 2>/dev/null || exit 1
export PYTHONPATH=/tmp/site7:$PWD PYTHONUNBUFFERED=1 PYTHONFAULTHANDLER=1
R=$OUT/res7; mkdir -p $R /tmp/blogs7
(MEGATRON_LASP_GPU_REPORT=$R/gpu_multirank_modes.json timeout 160 python3 -m pytest -m gpu tests/test_gpu_multirank.py -k "every_mode and sp2" -v -p no:cacheprovider > $R/pytest_modes.log 2>&1; echo "rc=$?" >> $R/pytest_modes.log) &
(MEGATRON_LASP_GPU_REPORT=$R/gpu_hybrid_det.json timeout 60 python3 -m pytest -m gpu tests/test_gpu_hybrid.py -k deterministic -v -p no:cacheprovider > $R/pytest_det.log 2>&1; echo "rc=$?" >> $R/pytest_det.log; timeout 150 python3 benchmarks/bench_sp_loss_curves.py --out $R/curves --log-dir $R --data-prefix $PWD/.gpu_lead/_corpus/corpus_text_document --num-layers 2 --seq-length 8192 --steps 50 --sizes 1 > $R/bench_sp.log 2>&1; echo "rc=$?" >> $R/bench_sp.log; timeout 30 python3 benchmarks/profile_gated.py --T 8192 --out $R/profile_gated_8k.json > $R/profile_gated_8k.log 2>&1; echo "rc=$?" >> $R/profile_gated_8k.log) &
wait
cp /tmp/blogs7/*.log $R/ 2>/dev/null

grep -E "PASSED|FAILED|passed|failed|rc=|Error" $R/pytest_modes.log $R/pytest_det.log | tail -8; tail -3 $R/bench_sp.log; tail -20 $R/profile_gated_8k.log | cut -c1-110
echo "total $(( $(date +%s) - T0 )) s"
