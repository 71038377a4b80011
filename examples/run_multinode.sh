#!/usr/bin/env bash
# 8 GPUs per node, any number of nodes, torchrun's c10d rendezvous. Run the same command on every
# node; only NODE_RANK differs:
#   NNODES=2 NODE_RANK=0 MASTER=node0.example:29500 bash examples/run_multinode.sh   # on node 0
#   NNODES=2 NODE_RANK=1 MASTER=node0.example:29500 bash examples/run_multinode.sh   # on node 1
# Layout: TP=2 inside a node, SP (LASP) = 4, data parallel over the nodes (DP = NNODES).
# Single node with 8 GPUs: NNODES=1 NODE_RANK=0 MASTER=localhost:29500.
# Set DATA/TOKENIZER as in run_tnl1b_4gpu.sh (mock data otherwise). Extra flags pass through.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python}"
: "${NNODES:=1}" "${NODE_RANK:=0}" "${MASTER:=localhost:29500}" "${GPUS_PER_NODE:=8}"
if [ -n "${DATA:-}" ]; then
  DATA_ARGS=(--data-path "$DATA" --split 990,9,1 --tokenizer-type HuggingFaceTokenizer --tokenizer-model "$TOKENIZER")
else
  DATA_ARGS=(--mock-data)
fi
exec "$PYTHON" -m torch.distributed.run \
  --nnodes "$NNODES" --node-rank "$NODE_RANK" --nproc-per-node "$GPUS_PER_NODE" \
  --rdzv-backend c10d --rdzv-endpoint "$MASTER" --rdzv-id "${RDZV_ID:-megatron-lasp}" \
  pretrain_linear_lm.py \
  --model-preset tnl-1b \
  --tensor-model-parallel-size 2 --sequence-parallel \
  --sequence-parallel-size 4 --sequence-parallel-mode lasp \
  --ddp-impl megatron --use-distributed-optimizer --bf16 \
  "${DATA_ARGS[@]}" \
  --seq-length 131072 --micro-batch-size 1 --global-batch-size "$((8 * NNODES))" --train-iters 1000 \
  --lr 3e-4 --min-lr 3e-5 --lr-warmup-iters 100 --lr-decay-style cosine \
  --weight-decay 0.1 --clip-grad 1.0 \
  --log-interval 10 --eval-interval 500 --eval-iters 10 \
  --save "${SAVE:-runs/multinode}" --save-interval 500 --load "${SAVE:-runs/multinode}" \
  "$@"
