#!/usr/bin/env bash
# Retries on E2E with SmolLM2 for the prefix methods, with the exact budget of
# benchmarks/compare/e2e-smollm2.yaml (20 steps of 8). Each try is a
# one-method compare in its own folder, run from a copy of that task config
# with the method's section replaced:
#   DATA=../shared/data bash benchmarks/e2e_sweep.sh
# Results: runs/compare/e2e-sweep/NAME/results.md, summarised in docs/results.md.
set -euo pipefail
DATA=${DATA:-../shared/data}
OUT=${OUT:-runs/compare/e2e-sweep}
PEFTLABS=${PEFTLABS:-.venv/bin/peftlabs}
PYTHON=${PYTHON:-.venv/bin/python}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

# name, method, then the method's section as a YAML flow mapping
tries=(
  "prefix_tuning-lr1e-3|prefix_tuning|{learning_rate: 1.0e-3}"
  "p_tuning_v2-lr1e-3|p_tuning_v2|{learning_rate: 1.0e-3}"
  "p_tuning_v2-vocabulary-lr1e-2|p_tuning_v2|{learning_rate: 1.0e-2, init: vocabulary}"
)
for entry in "${tries[@]}"; do
  IFS='|' read -r name method section <<< "$entry"
  if [[ -n "${ONLY:-}" && "$name" != "$ONLY" ]]; then
    continue
  fi
  mkdir -p "$OUT/$name"
  "$PYTHON" - "$OUT/$name/task.yaml" "$method" "$section" <<'PY'
import sys

import yaml

path, method, section = sys.argv[1:]
task = yaml.safe_load(open("benchmarks/compare/e2e-smollm2.yaml"))
task[method] = yaml.safe_load(section)
with open(path, "w") as file:
    yaml.safe_dump(task, file, sort_keys=False)
PY
  nice -n 10 $PEFTLABS compare --task-config "$OUT/$name/task.yaml" \
    --dataset "$DATA/e2e/devset.csv" --methods "$method" --output-dir "$OUT/$name"
done
