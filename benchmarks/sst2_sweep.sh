#!/usr/bin/env bash
# Learning-rate and prompt-length tries for the methods that missed the
# SST-2 target, with the exact budget of benchmarks/compare/sst2-minilm.yaml
# (80 steps of 32). Each try is a one-method compare in its own folder, run
# from a copy of that task config with the method's section changed (the
# loop is in sweep_tries.sh):
#   DATA=../shared/data bash benchmarks/sst2_sweep.sh
# ONLY=NAME runs one try. TASK= picks another budget:
#   TASK=benchmarks/compare/sst2-minilm-400.yaml (with OUT=runs/compare/sst2-sweep-400) for 400 steps,
#   TASK=benchmarks/compare/sst2-minilm-epoch.yaml for one epoch.
# SEED=N replaces the task's seed (42), EPOCHS=N its number of epochs, and
# EVAL_STEPS=N adds a dev-set evaluation every N steps (2105: every epoch of
# the whole training set).
# Results: runs/compare/sst2-sweep/NAME/results.md, summarised in docs/results.md.
set -euo pipefail
DATA=${DATA:-../shared/data}
OUT=${OUT:-runs/compare/sst2-sweep}

# name, method, then the method's section as YAML flow mapping
tries=(
  "full-lr1e-4|full|{learning_rate: 1.0e-4}"
  "bitfit-lr5e-3|bitfit|{learning_rate: 5.0e-3}"
  "bitfit-lr2e-3|bitfit|{learning_rate: 2.0e-3}"
  "bitfit-lr1e-3|bitfit|{learning_rate: 1.0e-3}"
  "p_tuning_v2-lr3e-2|p_tuning_v2|{learning_rate: 3.0e-2}"
  "p_tuning_v2-lr5e-2|p_tuning_v2|{learning_rate: 5.0e-2}"
  "p_tuning_v2-lr1e-2|p_tuning_v2|{learning_rate: 1.0e-2}"
  "p_tuning_v2-lr3e-2-tokens64|p_tuning_v2|{learning_rate: 3.0e-2, num_virtual_tokens: 64}"
  "p_tuning_v2-vocabulary-lr3e-2|p_tuning_v2|{learning_rate: 3.0e-2, init: vocabulary}"
)

source "$(dirname "$0")/sweep_tries.sh"
run_tries "${TASK:-benchmarks/compare/sst2-minilm.yaml}" \
  --dataset "$DATA/sst2/train.tsv" --eval-dataset "$DATA/sst2/dev.tsv"
