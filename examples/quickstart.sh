#!/usr/bin/env bash
# The main job on a fresh CPU machine, end to end:
#   1. set up .venv (CPU torch + megatron-lasp; tools/install_cpu.sh),
#   2. tokenize the bundled corpus (examples/data) into a megatron-core indexed dataset,
#   3. pretrain a tiny linear-attention LM with LASP over 2 CPU ranks (SP=2, gloo),
#   4. convert the last checkpoint to a Hugging Face model directory and generate from it.
# Everything lands in $RUN_DIR (default runs/quickstart). Knobs: TRAIN_ITERS, SP_MODE (lasp,
# lasp2, ulysses, allgather), NPROC.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/install_cpu.sh
PY="${VENV:-.venv}/bin/python"
RUN_DIR="${RUN_DIR:-runs/quickstart}"
TRAIN_ITERS="${TRAIN_ITERS:-60}"
SP_MODE="${SP_MODE:-lasp}"
NPROC="${NPROC:-2}"
TOKENIZER=(--tokenizer-type HuggingFaceTokenizer --tokenizer-model examples/data/tokenizer)
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
# megatron-core announces at import that TE / apex are absent (expected on CPU): keep the log readable.
export PYTHONWARNINGS="${PYTHONWARNINGS:-ignore::UserWarning,ignore::FutureWarning}"

echo "== 1/3 tokenize the bundled corpus" >&2
# --force: a re-run of the quickstart re-tokenizes into its own run directory (preprocess_data.py
# refuses to replace existing outputs without it).
"$PY" tools/preprocess_data.py --input examples/data/corpus.jsonl --output-prefix "$RUN_DIR/data/corpus" \
  "${TOKENIZER[@]}" --append-eod --workers 2 --force

echo "== 2/3 pretrain a tiny LASP model on $NPROC CPU ranks (SP=$NPROC, mode $SP_MODE)" >&2
rm -rf "$RUN_DIR/ckpt" "$RUN_DIR/hf"
"$PY" -m torch.distributed.run --nproc-per-node "$NPROC" --master-port "${MASTER_PORT:-29517}" \
  pretrain_linear_lm.py --model-preset tiny \
  --sequence-parallel-size "$NPROC" --sequence-parallel-mode "$SP_MODE" \
  --data-path "$RUN_DIR/data/corpus_text_document" --split 98,2,0 "${TOKENIZER[@]}" \
  --seq-length 256 --micro-batch-size 4 --global-batch-size 8 --train-iters "$TRAIN_ITERS" \
  --lr 2e-3 --min-lr 2e-4 --lr-decay-style cosine --lr-warmup-iters "$((TRAIN_ITERS / 10))" --clip-grad 1.0 \
  --log-interval 10 --eval-interval "$TRAIN_ITERS" --eval-iters 2 \
  --save "$RUN_DIR/ckpt" --save-interval "$TRAIN_ITERS"

echo "== 3/3 convert to Hugging Face and generate" >&2
"$PY" tools/convert_checkpoint_to_hf.py --load "$RUN_DIR/ckpt" --save "$RUN_DIR/hf" "${TOKENIZER[@]}"
"$PY" examples/generate_hf.py --model "$RUN_DIR/hf" --prompt "Once upon a time" --max-new-tokens 32
