"""Experiment tracking: the plain ``log.jsonl`` of every run, and optional trackers.

    peftlabs train --report-to tensorboard        # event files in RUN/tensorboard
    peftlabs train --report-to tensorboard,mlflow # and an MLflow file store in RUN/mlruns
    tensorboard --logdir runs/NAME/tensorboard
    mlflow ui --backend-store-uri file:runs/NAME/mlruns

Trackers are transformers' own integrations (``TrainingArguments.report_to``);
this module only checks that they are installed and points them at folders
inside the run directory, so nothing is sent to a server.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from transformers import TrainerCallback

from peftlabs.errors import UserError

LOG_FILE = "log.jsonl"
TENSORBOARD_DIR = "tensorboard"
MLFLOW_DIR = "mlruns"

# Tracker name -> (module that must be importable, pip extra that installs it).
TRACKERS = {
    "tensorboard": ("tensorboard", "tensorboard"),
    "mlflow": ("mlflow", "mlflow"),
}


def check_trackers(names: list[str] | None) -> None:
    """Reject unknown tracker names and trackers whose package is not installed."""
    for name in names or []:
        if name not in TRACKERS:
            raise UserError(f"invalid report_to '{name}': use tensorboard, mlflow, or both separated by a comma")
        module, extra = TRACKERS[name]
        if importlib.util.find_spec(module) is None:
            raise UserError(
                f"--report-to {name} needs the {module} package, which is not installed: "
                f"pip install 'peftlabs[{extra}]'"
            )


@contextmanager
def mlflow_store(run_dir: Path, names: list[str] | None, is_main: bool) -> Iterator[None]:
    """Open one MLflow run in a file store inside the run directory while the block runs.

    A ``MLFLOW_TRACKING_URI`` set by the user is replaced for the duration of
    the run and restored afterwards, so the tracker never writes to a server.
    The MLflow run is started here rather than by transformers' callback,
    because the callback ends its run when training ends and the final
    evaluation would then open a second one.
    """
    if "mlflow" not in (names or []) or not is_main:
        yield
        return
    import mlflow

    settings = {
        "MLFLOW_TRACKING_URI": (run_dir / MLFLOW_DIR).resolve().as_uri(),
        "MLFLOW_EXPERIMENT_NAME": "peftlabs",
        # MLflow 3 raises on file stores unless this is set (it recommends a database).
        "MLFLOW_ALLOW_FILE_STORE": "true",
    }
    previous = {key: os.environ.get(key) for key in settings}
    os.environ.update(settings)
    try:
        mlflow.set_tracking_uri(settings["MLFLOW_TRACKING_URI"])
        mlflow.set_experiment(settings["MLFLOW_EXPERIMENT_NAME"])
        with mlflow.start_run(run_name=run_dir.name):
            yield
    finally:
        mlflow.set_tracking_uri(None)  # back to the default, which reads the environment
        for key, value in previous.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


class JsonlLogCallback(TrainerCallback):
    """Append one JSON object per logging step and per evaluation to ``log.jsonl``.

    Training records carry step, epoch, loss, learning rate, gradient norm and
    tokens/s since the previous record; evaluation records carry the eval
    metrics. Only the main process writes.
    """

    def __init__(self, path: Path, counter):
        self.path = path
        self.counter = counter
        self.last_tokens = 0
        self.last_seconds = 0.0

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        record: dict[str, Any] = {"step": state.global_step, "epoch": state.epoch}
        if "loss" in logs:
            tokens = self.counter.tokens - self.last_tokens
            seconds = self.counter.seconds - self.last_seconds
            self.last_tokens, self.last_seconds = self.counter.tokens, self.counter.seconds
            record.update({
                "loss": logs["loss"],
                "learning_rate": logs.get("learning_rate"),
                "grad_norm": logs.get("grad_norm"),
                # NOTE: tokens of this process only; under data parallelism the total is
                # about this times the number of processes.
                "tokens_per_second": round(tokens / seconds, 1) if seconds > 0 else None,
            })
        elif any(key.startswith("eval_") for key in logs):
            record.update({key: value for key, value in logs.items() if key.startswith("eval_")})
        else:
            return  # the Trainer's end-of-training summary, which metrics.json covers
        append_record(self.path, record)


def append_record(path: Path, record: dict[str, Any]) -> None:
    clean = {key: (None if isinstance(value, float) and not math.isfinite(value) else value)
             for key, value in record.items()}
    with path.open("a") as file:
        file.write(json.dumps(clean, default=str) + "\n")


def truncate_log(path: Path, last_step: int) -> None:
    """Drop records after ``last_step``: a resumed run logs those steps again."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= last_step]
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text("".join(line + "\n" for line in kept))
    os.replace(temporary, path)


def read_log(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
