#!/usr/bin/env bash
# One node's part of a multi-node run: one torchrun per node, joined by torchrun's c10d
# rendezvous. Under SLURM, examples/multinode.sbatch starts it on every node; by hand, run the same
# command on every node (only the rendezvous endpoint is shared, no rank is given):
#   NNODES=2 MASTER=node0.example:29500 bash examples/run_multinode.sh   # on node 0 and on node 1
# Single node with 8 GPUs: NNODES=1 bash examples/run_multinode.sh.
#
# The job: TNL-1B, TP=2 inside a node x SP (LASP) = 4, data parallel over the nodes (DP = NNODES),
# checkpoints in SAVE (default runs/multinode): a directory every node sees (docs/LAUNCH.md).
# DATA/TOKENIZER as in run_tnl1b_4gpu.sh (mock data otherwise). JOB_FLAGS replaces the job's flags
# (the test suite runs a tiny CPU job this way); extra arguments are appended to them.
# Knobs: NNODES, MASTER (host:port of the rendezvous), GPUS_PER_NODE, RDZV_ID (the same on every
# node, unique per run), RDZV_TIMEOUT (seconds to wait for all nodes), PYTHON.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python}"
NNODES="${NNODES:-${SLURM_NNODES:-1}}"
GPUS_PER_NODE="${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}"
RDZV_ID="${RDZV_ID:-${SLURM_JOB_ID:-megatron-lasp}}"
if [ "$NNODES" -gt 1 ] && [ -z "${MASTER:-}" ]; then
  echo "run_multinode.sh: set MASTER=host:port (a node every node can reach, the same on all $NNODES nodes)" >&2
  exit 2
fi
MASTER="${MASTER:-localhost:29500}"
SAVE="${SAVE:-runs/multinode}"
if [ -n "${JOB_FLAGS:-}" ]; then
  if [ -n "${DATA:-}${TOKENIZER:-}" ]; then
    echo "run_multinode.sh: DATA and TOKENIZER belong to the default job; with JOB_FLAGS put --data-path and the" \
      "tokenizer flags in JOB_FLAGS" >&2
    exit 2
  fi
  read -r -a JOB <<< "$JOB_FLAGS"
else
  if [ -n "${DATA:-}" ]; then
    if [ -z "${TOKENIZER:-}" ]; then
      echo "run_multinode.sh: DATA needs TOKENIZER (the tokenizer directory it was preprocessed with)" >&2
      exit 2
    fi
    DATA_ARGS=(--data-path "$DATA" --split 990,9,1 --tokenizer-type HuggingFaceTokenizer --tokenizer-model "$TOKENIZER")
  elif [ -n "${TOKENIZER:-}" ]; then
    echo "run_multinode.sh: TOKENIZER without DATA would be ignored (mock data); set DATA too" >&2
    exit 2
  else
    DATA_ARGS=(--mock-data)
  fi
  JOB=(
    --model-preset tnl-1b
    --tensor-model-parallel-size 2 --sequence-parallel
    --sequence-parallel-size 4 --sequence-parallel-mode lasp
    --ddp-impl megatron --use-distributed-optimizer --bf16
    "${DATA_ARGS[@]}"
    --seq-length 131072 --micro-batch-size 1 --global-batch-size "$((8 * NNODES))" --train-iters 1000
    --lr 3e-4 --min-lr 3e-5 --lr-warmup-iters 100 --lr-decay-style cosine
    --weight-decay 0.1 --clip-grad 1.0
    --log-interval 10 --eval-interval 500 --eval-iters 10
    --save-interval 500 --load "$SAVE"
  )
fi
# --node-rank is left out on purpose: the c10d rendezvous ignores it and numbers the nodes itself,
# so global rank 0 (logging, the checkpoint tracker) may be on any node.
exec "$PYTHON" -m torch.distributed.run \
  --nnodes "$NNODES" --nproc-per-node "$GPUS_PER_NODE" \
  --rdzv-backend c10d --rdzv-endpoint "$MASTER" --rdzv-id "$RDZV_ID" \
  --rdzv-conf "join_timeout=${RDZV_TIMEOUT:-900}" --max-restarts 0 \
  pretrain_linear_lm.py "${JOB[@]}" --save "$SAVE" "$@"
