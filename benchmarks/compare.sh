#!/usr/bin/env bash
# Every method against full fine-tuning on the two reference tasks, recorded
# in docs/results.md. Needs the reference data beside the repository:
#   DATA=../shared/data bash benchmarks/compare.sh [sst2|sst2-400|sst2-epoch|e2e]
# A finished method is not trained again, so rerunning the same command after
# an interruption continues with the methods still missing.
set -euo pipefail
DATA=${DATA:-../shared/data}
OUT=${OUT:-runs/compare}
PEFTLABS=${PEFTLABS:-.venv/bin/peftlabs}
# One thread per process: on a CPU shared with other jobs, two torch threads
# per process ran a MiniLM training step 3x slower than one (see docs/results.md).
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
TASKS=${1:-sst2 e2e}
if [[ "$TASKS" == "-h" || "$TASKS" == "--help" ]]; then
  echo "usage: DATA=../shared/data bash benchmarks/compare.sh [sst2|sst2-400|sst2-epoch|e2e] (default: sst2 e2e)"
  exit 0
fi

for task in $TASKS; do
  case $task in
    sst2)
      # Train on a slice of the training set, evaluate on the full 872-sentence dev set.
      nice -n 10 $PEFTLABS compare --task-config benchmarks/compare/sst2-minilm.yaml \
        --dataset "$DATA/sst2/train.tsv" --eval-dataset "$DATA/sst2/dev.tsv" \
        --output-dir "$OUT/sst2-minilm" ${SST2_METHODS:+--methods "$SST2_METHODS"}
      ;;
    sst2-400|sst2-epoch)
      # Five times the budget (400 steps), or the whole training set (2,105 steps), for the
      # methods with an SST-2 target and full fine-tuning.
      nice -n 10 $PEFTLABS compare --task-config "benchmarks/compare/sst2-minilm-${task#sst2-}.yaml" \
        --dataset "$DATA/sst2/train.tsv" --eval-dataset "$DATA/sst2/dev.tsv" \
        --methods full,lora,adapters,bitfit,p_tuning_v2 --output-dir "$OUT/sst2-minilm-${task#sst2-}"
      ;;
    e2e)
      # Hold out meaning representations (all references of a held-out MR go to evaluation).
      nice -n 10 $PEFTLABS compare --task-config benchmarks/compare/e2e-smollm2.yaml \
        --dataset "$DATA/e2e/devset.csv" \
        --output-dir "$OUT/e2e-smollm2" ${E2E_METHODS:+--methods "$E2E_METHODS"}
      ;;
    *) echo "unknown task '$task': use sst2, sst2-400, sst2-epoch or e2e" >&2; exit 2 ;;
  esac
done
