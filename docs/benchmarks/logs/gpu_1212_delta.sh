#!/bin/bash
# Prepared on 2026-12-08 (tenth session; no machine was lent that session), any card, first in the
# next session: the gated delta rule (Gated DeltaNet) has never run on a GPU. Most wanted first:
#  1. its GPU tests: the op's fla backend against the fp64 reference (bf16, fp32, packed documents,
#     state in and out), every sequence-parallel mode at SP = 2 on the one GPU over gloo;
#  2. bench_delta.py: fla's kernels at 8K / 32K / 128K, the price of the sequence-parallel transform
#     (the same call with Dv + Dk value columns), our lightning kernel for scale;
#  3. the Gated DeltaNet model's GPU tests and a training benchmark beside TNL-1B.
. docs/benchmarks/logs/gpu_setup.sh delta
MEGATRON_LASP_GPU_REPORT=$R/gpu_tests_delta.json item pytest_delta 150 \
  python3 -m pytest -m gpu tests/test_delta_rule.py tests/test_delta_sp.py -v -p no:cacheprovider --timeout 140 -rs
item bench_delta 150 python3 benchmarks/bench_delta.py --out $R/delta
MEGATRON_LASP_GPU_REPORT=$R/gpu_tests_delta.json item pytest_delta_model 150 \
  python3 -m pytest -m gpu tests/test_delta_net_model.py tests/test_delta_net_hf.py tests/test_delta_net_chunked.py -v -p no:cacheprovider --timeout 140 -rs
SEL="--recompute-granularity selective --recompute-modules core_attn elementwise"
CHUNK="--recompute-granularity full --recompute-chunk-size 16384"
item training_gdn_32k 150 python3 benchmarks/bench_training.py --out $R/training_gdn_32k --preset tnl-1b \
  --seq-length 32768 --steps 3 --warmup 2 --profile-steps 1 --timeout 70 --common "$SEL" \
  --config "lightning=" --config "gdn=--linear-attention-type gated_delta_net"
item training_gdn_128k 200 python3 benchmarks/bench_training.py --out $R/training_gdn_128k --preset tnl-1b \
  --seq-length 131072 --steps 3 --warmup 2 --profile-steps 0 --timeout 95 --common "$CHUNK" \
  --config "lightning=" --config "gdn=--linear-attention-type gated_delta_net"
