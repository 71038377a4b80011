#!/usr/bin/env bash
# Tiny CPU run: 2 ranks, LASP over a sequence-parallel group of 2, on the bundled corpus.
# Tokenizes examples/data/corpus.jsonl once (runs/data/), then trains 100 steps and saves to
# runs/tiny (re-running resumes from the latest checkpoint). About a minute on 2 cores.
#   bash examples/run_tiny_cpu.sh [extra pretrain_linear_lm.py flags]
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
DATA=runs/data/corpus_text_document
if [ ! -f "$DATA.bin" ]; then
  "$PYTHON" tools/preprocess_data.py --input examples/data/corpus.jsonl --output-prefix runs/data/corpus \
    --tokenizer-type HuggingFaceTokenizer --tokenizer-model examples/data/tokenizer --append-eod --workers 2
fi
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
exec "$PYTHON" -m torch.distributed.run --nproc-per-node 2 pretrain_linear_lm.py \
  --model-preset tiny \
  --sequence-parallel-size 2 --sequence-parallel-mode lasp \
  --data-path "$DATA" --split 98,2,0 \
  --tokenizer-type HuggingFaceTokenizer --tokenizer-model examples/data/tokenizer \
  --seq-length 256 --micro-batch-size 4 --global-batch-size 8 --train-iters 100 \
  --lr 3e-3 --min-lr 3e-4 --lr-warmup-iters 10 --lr-decay-style cosine \
  --log-interval 10 --eval-interval 50 --eval-iters 2 \
  --save runs/tiny --save-interval 50 --load runs/tiny \
  "$@"
