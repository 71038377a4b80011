#!/usr/bin/env bash
# TNL-1B with LASP on 4 GPUs of one node: TP=2 x SP=2 (LASP over the SP pair), bf16,
# megatron-core DDP with the distributed optimizer (ZeRO-1), 32K-token sequences.
#   DATA=/path/to/prefix_text_document TOKENIZER=/path/to/tokenizer_dir bash examples/run_tnl1b_4gpu.sh
# Without DATA, trains on mock data (throughput runs). Extra flags are passed through.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python}"
if [ -n "${DATA:-}" ]; then
  DATA_ARGS=(--data-path "$DATA" --split 990,9,1 --tokenizer-type HuggingFaceTokenizer --tokenizer-model "$TOKENIZER")
else
  DATA_ARGS=(--mock-data)
fi
exec "$PYTHON" -m torch.distributed.run --nproc-per-node 4 pretrain_linear_lm.py \
  --model-preset tnl-1b \
  --tensor-model-parallel-size 2 --sequence-parallel \
  --sequence-parallel-size 2 --sequence-parallel-mode lasp \
  --ddp-impl megatron --use-distributed-optimizer --bf16 \
  "${DATA_ARGS[@]}" \
  --seq-length 32768 --micro-batch-size 1 --global-batch-size 8 --train-iters 1000 \
  --lr 3e-4 --min-lr 3e-5 --lr-warmup-iters 100 --lr-decay-style cosine \
  --weight-decay 0.1 --adam-beta1 0.9 --adam-beta2 0.95 --clip-grad 1.0 \
  --recompute-granularity selective \
  --log-interval 10 --eval-interval 500 --eval-iters 10 \
  --save "${SAVE:-runs/tnl1b}" --save-interval 500 --load "${SAVE:-runs/tnl1b}" \
  "$@"
