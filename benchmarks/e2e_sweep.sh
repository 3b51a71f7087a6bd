#!/usr/bin/env bash
# Retries on E2E with SmolLM2 for the prefix methods, with the exact budget of
# benchmarks/compare/e2e-smollm2.yaml (20 steps of 8). Each try is a
# one-method compare in its own folder, run from a copy of that task config
# with the method's section replaced (the loop is in sweep_tries.sh):
#   DATA=../shared/data bash benchmarks/e2e_sweep.sh
# ONLY=NAME runs one try. SEED=N and EPOCHS=N replace the task's seed and
# number of epochs.
# Results: runs/compare/e2e-sweep/NAME/results.md, summarised in docs/results.md.
set -euo pipefail
DATA=${DATA:-../shared/data}
OUT=${OUT:-runs/compare/e2e-sweep}

# name, method, then the method's section as a YAML flow mapping
tries=(
  "prefix_tuning-lr1e-3|prefix_tuning|{learning_rate: 1.0e-3}"
  "p_tuning_v2-lr1e-3|p_tuning_v2|{learning_rate: 1.0e-3}"
  "p_tuning_v2-vocabulary-lr1e-2|p_tuning_v2|{learning_rate: 1.0e-2, init: vocabulary}"
)

source "$(dirname "$0")/sweep_tries.sh"
run_tries benchmarks/compare/e2e-smollm2.yaml --dataset "$DATA/e2e/devset.csv"
