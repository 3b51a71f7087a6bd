"""Run records, log.jsonl, experiment trackers, and `peftlabs runs` (list and compare)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import make_sentences, tiny_config, write_jsonl
from peftlabs import records, tracking
from peftlabs.cli import main
from peftlabs.errors import UserError
from peftlabs.train import train

QUICK = {"max_steps": 6, "logging_steps": 2, "save_steps": 3, "eval_steps": 3, "max_new_tokens": 2}


@pytest.fixture(scope="module")
def runs_folder(tiny_llama, tmp_path_factory):
    """Two finished runs that differ in learning rate and training data, and one interrupted run."""
    folder = tmp_path_factory.mktemp("runs")
    data_a = {"train": write_jsonl(folder / "train_a.jsonl", make_sentences(64, seed=1)),
              "eval": write_jsonl(folder / "eval.jsonl", make_sentences(16, seed=2))}
    data_b = {**data_a, "train": write_jsonl(folder / "train_b.jsonl", make_sentences(64, seed=3))}
    runs = folder / "runs"
    train(tiny_config(tiny_llama, data_a, runs / "first", report_to=["tensorboard"], **QUICK))
    train(tiny_config(tiny_llama, data_b, runs / "second", learning_rate=3e-3, **QUICK))

    # An interrupted run: settings and a checkpoint, no adapter and no metrics.
    interrupted = runs / "stopped"
    (interrupted / "checkpoints" / "checkpoint-3").mkdir(parents=True)
    shutil.copy(runs / "first" / "config.yaml", interrupted / "config.yaml")
    return {"runs": runs, "data_a": data_a, "data_b": data_b}


def test_log_jsonl_has_every_logging_step(runs_folder):
    entries = tracking.read_log(runs_folder["runs"] / "first" / tracking.LOG_FILE)
    training = [entry for entry in entries if "loss" in entry]
    evaluations = [entry for entry in entries if "eval_loss" in entry and not entry.get("final")]
    final = [entry for entry in entries if entry.get("final")]

    assert [entry["step"] for entry in training] == [2, 4, 6]
    for entry in training:
        assert entry["loss"] > 0
        assert entry["learning_rate"] > 0
        assert entry["tokens_per_second"] > 0
    assert [entry["step"] for entry in evaluations] == [3, 6, 6]  # every 3 steps, then the final eval loss
    assert len(final) == 1
    assert 0 <= final[0]["eval_accuracy"] <= 1


def test_run_json_records_provenance(runs_folder):
    info = json.loads((runs_folder["runs"] / "first" / "run.json").read_text())

    assert info["seed"] == 42
    assert info["versions"]["torch"] and info["versions"]["transformers"]
    assert info["processes"] == 1
    assert set(info["data_fingerprint"]) == {"train", "eval"}
    assert len(info["data_fingerprint"]["train"]) == 64
    assert info["code"] == records.code_version()


def test_code_version_matches_git(runs_folder):
    info = json.loads((runs_folder["runs"] / "first" / "run.json").read_text())
    package = Path(records.__file__).parent
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=package, capture_output=True, text=True)
    if head.returncode != 0:
        pytest.skip("peftlabs is not imported from a git checkout here")

    assert info["code"]["commit"] == head.stdout.strip()
    assert isinstance(info["code"]["dirty"], bool)


def test_code_version_outside_git(tmp_path, monkeypatch):
    fake_package = tmp_path / "peftlabs"
    fake_package.mkdir()
    (fake_package / "__init__.py").write_text("")
    monkeypatch.setattr(records, "__file__", str(fake_package / "records.py"))

    assert records.code_version() == {"commit": None, "dirty": None, "note": "not a git checkout"}


def test_data_fingerprint_follows_data(runs_folder):
    first = json.loads((runs_folder["runs"] / "first" / "run.json").read_text())["data_fingerprint"]
    second = json.loads((runs_folder["runs"] / "second" / "run.json").read_text())["data_fingerprint"]

    assert first["train"] != second["train"]
    assert first["eval"] == second["eval"]


def test_tensorboard_events_written(runs_folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logdir = runs_folder["runs"] / "first" / tracking.TENSORBOARD_DIR
    events = EventAccumulator(str(logdir))
    events.Reload()

    assert [event.step for event in events.Scalars("train/loss")] == [2, 4, 6]
    assert not (runs_folder["runs"] / "second" / tracking.TENSORBOARD_DIR).exists()


def test_mlflow_store_inside_run(tiny_llama, sentences, tmp_path, monkeypatch):
    pytest.importorskip("mlflow", reason="mlflow is an optional extra: pip install 'peftlabs[mlflow]'")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9/never-contacted")
    run = tmp_path / "run"
    train(tiny_config(tiny_llama, sentences, run, report_to=["mlflow"], **{**QUICK, "eval_steps": None}))

    store = run / tracking.MLFLOW_DIR
    loss_files = list(store.rglob("metrics/loss"))
    assert len(loss_files) == 1  # one MLflow run, also after the final evaluation
    assert len(loss_files[0].read_text().splitlines()) == 3  # steps 2, 4 and 6
    assert list(store.rglob("metrics/eval_loss"))[0].parent == loss_files[0].parent
    assert not (tmp_path / "mlruns").exists()
    assert os.environ["MLFLOW_TRACKING_URI"] == "http://127.0.0.1:9/never-contacted"


def test_missing_tracker_names_extra(tiny_llama, sentences, tmp_path, monkeypatch):
    monkeypatch.setattr(tracking.importlib.util, "find_spec", lambda name: None)

    with pytest.raises(UserError, match=r"pip install 'peftlabs\[tensorboard\]'"):
        tiny_config(tiny_llama, sentences, tmp_path / "run", report_to=["tensorboard"])
    assert not (tmp_path / "run").exists()


def test_unknown_tracker_rejected(tiny_llama, sentences, tmp_path):
    with pytest.raises(UserError, match="invalid report_to 'wandb'"):
        tiny_config(tiny_llama, sentences, tmp_path / "run", report_to=["wandb"])


def test_runs_lists_folder(runs_folder, capsys):
    assert main(["runs", str(runs_folder["runs"])]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = {line.split()[0]: line for line in lines[1:]}

    assert lines[0].split()[:4] == ["NAME", "METHOD", "MODEL", "DATA"]
    assert set(rows) == {"first", "second", "stopped"}
    assert rows["first"].rstrip().endswith("finished")
    assert "accuracy" in rows["first"]
    assert "train_b.jsonl" in rows["second"]
    assert rows["stopped"].rstrip().endswith("interrupted")


def test_runs_missing_folder(tmp_path, capsys):
    assert main(["runs", str(tmp_path / "absent")]) == 2
    assert "runs folder not found" in capsys.readouterr().err


def test_runs_compare_shows_differences(runs_folder, capsys):
    runs = runs_folder["runs"]
    assert main(["runs", "--compare", str(runs / "first"), str(runs / "second")]) == 0
    lines = capsys.readouterr().out.splitlines()
    settings = {line.split()[0] for line in lines[1:]}

    assert settings == {"learning_rate", "dataset", "report_to", "data_fingerprint.train"}


def test_runs_compare_same_run(runs_folder, capsys):
    first = str(runs_folder["runs"] / "first")
    assert main(["runs", "--compare", first, first]) == 0

    assert "have the same settings" in capsys.readouterr().out


def test_runs_compare_rejects_non_run(runs_folder, tmp_path, capsys):
    assert main(["runs", "--compare", str(runs_folder["runs"] / "first"), str(tmp_path)]) == 2
    assert "not a run directory" in capsys.readouterr().err
