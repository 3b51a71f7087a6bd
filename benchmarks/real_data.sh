#!/usr/bin/env bash
# Real-data runs recorded in docs/real-data.md: LoRA on GLUE SST-2 with
# MiniLM-L6 (classification) and on E2E NLG with SmolLM2-135M-Instruct
# (data-to-text). Needs the reference data beside the repository:
#   DATA=../shared/data bash benchmarks/real_data.sh
set -euo pipefail
DATA=${DATA:-../shared/data}
OUT=${OUT:-runs/real-data}
PEFTLABS=${PEFTLABS:-.venv/bin/peftlabs}

# SST-2: train on the first 4,000 shuffled training sentences, evaluate on the
# full 872-sentence dev set (its text column is 'content', train's 'sentence').
$PEFTLABS train --model minilm-l6 --method lora \
  --dataset "$DATA/sst2/train.tsv" --eval-dataset "$DATA/sst2/dev.tsv" \
  --max-train-samples 4000 --epochs 1 --batch-size 32 --eval-batch-size 64 \
  --learning-rate 1e-3 --max-length 64 --lora.r 8 --save-steps 1000 \
  --output-dir "$OUT/sst2-minilm-lora" --overwrite

# E2E: hold out 5% of the meaning representations (every reference of a held-out
# MR goes to evaluation), train on 160 rows of the rest (20 steps), and score
# BLEU against all references of each held-out MR. A short run, sized to fit
# a 2-core CPU next to other work; raise --max-train-samples for real quality.
$PEFTLABS train --model smollm2-135m-instruct --method lora \
  --dataset "$DATA/e2e/devset.csv" --eval-fraction 0.05 \
  --instruction "Write one sentence describing the restaurant, using every attribute given." \
  --max-train-samples 160 --epochs 1 --batch-size 8 --eval-batch-size 16 \
  --learning-rate 2e-3 --max-length 160 --max-new-tokens 48 --save-steps 1000 \
  --lora.layers-to-transform 15,16,17,18,19,20,21,22,23,24,25,26,27,28,29 \
  --output-dir "$OUT/e2e-smollm2-lora" --overwrite
