# Loop shared by sst2_sweep.sh and e2e_sweep.sh, which source this file.
# run_tries TASK [COMPARE FLAGS...] runs each entry of the caller's `tries`
# array ("name|method|section", the section a YAML flow mapping) as a
# one-method compare in $OUT/NAME, from a copy of the task config TASK with
# that method's section replaced. The flags after TASK go to
# `peftlabs compare` (the data to train and evaluate on).
# ONLY=NAME runs one try. SEED=N and EPOCHS=N replace the task's seed and
# number of epochs. EVAL_STEPS=N adds an evaluation on the dev set every N
# steps (2105: once per epoch on the whole SST-2 training set at batch size
# 32). Each evaluation starts a data loader, which draws one number from
# torch's global random generator, so every later random draw shifts: in a
# 30-step check the logged losses drifted in the third decimal after the
# first evaluation, like another random draw.
# PEFTLABS and PYTHON name the commands to run (default: the project's
# .venv), and each job gets one thread unless OMP_NUM_THREADS sets another
# number.
PEFTLABS=${PEFTLABS:-.venv/bin/peftlabs}
PYTHON=${PYTHON:-.venv/bin/python}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

run_tries() {
  local task=$1 entry name method section
  shift

  for entry in "${tries[@]}"; do
    IFS='|' read -r name method section <<< "$entry"
    if [[ -n "${ONLY:-}" && "$name" != "$ONLY" ]]; then
      continue
    fi

    mkdir -p "$OUT/$name"
    "$PYTHON" - "$task" "$OUT/$name/task.yaml" "$method" "$section" <<'PY'
import os
import sys

import yaml

source, path, method, section = sys.argv[1:]
task = yaml.safe_load(open(source))
task[method] = yaml.safe_load(section)
for variable, key in (("SEED", "seed"), ("EPOCHS", "epochs"), ("EVAL_STEPS", "eval_steps")):
    if os.environ.get(variable):
        task[key] = int(os.environ[variable])
with open(path, "w") as file:
    yaml.safe_dump(task, file, sort_keys=False)
PY

    nice -n 10 $PEFTLABS compare --task-config "$OUT/$name/task.yaml" "$@" \
      --methods "$method" --output-dir "$OUT/$name"
  done
}
