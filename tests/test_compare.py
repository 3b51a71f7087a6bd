"""`peftlabs compare` on the tiny models: files, columns, plots, resuming and bad input."""

from __future__ import annotations

import csv
import json

import pytest

from peftlabs.cli import main
from peftlabs.compare import PLOTS, plan_comparison, run_comparison
from peftlabs.errors import UserError
from peftlabs.methods import get_method, method_names

METHODS = ["full", "lora", "bitfit"]


def shared_settings(model, data, output) -> dict:
    return {
        "model": str(model),
        "dataset": str(data["train"]),
        "eval_dataset": str(data["eval"]),
        "output_dir": str(output),
        "max_steps": 6,
        "batch_size": 16,
        "max_length": 32,
        "save_steps": 1000,
        "device": "cpu",
        "precision": "fp32",
    }


@pytest.fixture(scope="module")
def sentence_files(tmp_path_factory):
    from conftest import make_sentences, write_jsonl

    folder = tmp_path_factory.mktemp("compare-data")
    return {
        "train": write_jsonl(folder / "train.jsonl", make_sentences(96, seed=1)),
        "eval": write_jsonl(folder / "eval.jsonl", make_sentences(24, seed=2)),
    }


@pytest.fixture(scope="module")
def compared(tiny_bert, sentence_files, tmp_path_factory):
    """One comparison of full fine-tuning, LoRA and BitFit on the tiny BERT."""
    output = tmp_path_factory.mktemp("compare") / "out"
    task_config = {"lora": {"learning_rate": 1e-2, "r": 4}, "full": {"learning_rate": 1e-3}}
    comparison = run_comparison(task_config, shared_settings(tiny_bert, sentence_files, output), METHODS)
    return comparison, output


def test_compare_writes_every_file(compared):
    _, output = compared
    for name in ("results.json", "results.csv", "results.md", *PLOTS):
        assert (output / name).is_file(), name
        assert (output / name).stat().st_size > 0, name
    for name in PLOTS:
        assert (output / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name


def test_compare_rows_and_columns(compared):
    _, output = compared
    results = json.loads((output / "results.json").read_text())
    assert [row["method"] for row in results["rows"]] == METHODS
    assert results["quality_metric"] == "eval_accuracy"
    assert results["shared_settings"]["max_steps"] == 6

    with open(output / "results.csv") as file:
        rows = list(csv.DictReader(file))
    expected = {"method", "trainable_parameters", "trainable_percent", "adapter_bytes", "peak_rss_bytes",
                "train_tokens_per_second", "train_seconds", "wall_seconds", "eval_accuracy", "eval_macro_f1",
                "mergeable"}
    assert expected <= set(rows[0])
    by_method = {row["method"]: row for row in rows}
    for row in rows:
        assert row["status"] == "done"
        assert int(row["peak_rss_bytes"]) > 50_000_000  # torch alone is larger than this
        assert int(row["adapter_bytes"]) > 0
        assert 0 <= float(row["eval_accuracy"]) <= 1
        assert float(row["train_tokens_per_second"]) > 0
    assert float(by_method["full"]["trainable_percent"]) == 100.0
    assert float(by_method["lora"]["trainable_percent"]) < 100.0
    assert int(by_method["full"]["adapter_bytes"]) > int(by_method["lora"]["adapter_bytes"])
    assert by_method["full"]["mergeable"] == "n/a (baseline)"
    assert by_method["bitfit"]["mergeable"] == "yes"
    assert float(by_method["lora"]["learning_rate"]) == 1e-2

    table = (output / "results.md").read_text()
    assert "| method | trainable params | % of total |" in table
    assert "accuracy" in table
    assert "macro_f1" in table


def test_compare_resume_skips_finished(compared, tiny_bert, sentence_files, caplog):
    comparison, output = compared
    runs_dir = output / "runs"
    finished = {name: (runs_dir / name / "metrics.json").stat().st_mtime_ns for name in METHODS}
    logs = {name: (runs_dir / name / "train.log").stat().st_mtime_ns for name in METHODS}

    # An interrupted method: its run directory lost metrics.json, so it must be trained again.
    (runs_dir / "bitfit" / "metrics.json").unlink()
    task_config = {"lora": {"learning_rate": 1e-2, "r": 4}, "full": {"learning_rate": 1e-3}}
    with caplog.at_level("INFO", logger="peftlabs"):
        again = run_comparison(task_config, shared_settings(tiny_bert, sentence_files, output), METHODS)

    for name in ("full", "lora"):
        assert (runs_dir / name / "metrics.json").stat().st_mtime_ns == finished[name], name
        assert (runs_dir / name / "train.log").stat().st_mtime_ns == logs[name], name
    assert (runs_dir / "bitfit" / "metrics.json").is_file()
    assert (runs_dir / "bitfit" / "train.log").stat().st_mtime_ns != logs["bitfit"]
    assert caplog.text.count("not trained again") == 2
    assert [row["method"] for row in again.rows] == METHODS
    assert again.rows[0]["eval_accuracy"] == comparison.rows[0]["eval_accuracy"]


def test_default_methods_skip_inapplicable(tiny_llama, sentence_files, tmp_path):
    settings = shared_settings(tiny_llama, sentence_files, tmp_path / "out")
    _, task, plans = plan_comparison({}, settings)
    assert task == "causal_lm"
    assert [plan.name for plan in plans] == ["full"] + method_names()
    skipped = {plan.name: plan.skip_reason for plan in plans if plan.skip_reason}
    assert list(skipped) == ["bitfit"]
    assert "bias" in skipped["bitfit"]
    assert not (tmp_path / "out").exists()


def test_full_baseline_is_not_a_peft_method():
    assert "full" not in method_names()
    assert get_method("full").name == "full"


@pytest.mark.parametrize("arguments, message", [
    (["--methods", "lora,dora"], "unknown method 'dora'"),
    (["--methods", "full,full"], "listed twice"),
    (["--method", "lora"], "does not take 'method'"),
    (["--methods", ","], "no methods to compare"),
])
def test_compare_bad_flags(arguments, message, tiny_bert, sentence_files, tmp_path, capsys):
    output = tmp_path / "out"
    status = main(["compare", "--model", str(tiny_bert), "--dataset", str(sentence_files["train"]),
                   "--output-dir", str(output), *arguments])
    error = capsys.readouterr().err
    assert status == 2
    assert message in error
    assert error.count("\n") == 1
    assert not output.exists()


def test_compare_rejects_inapplicable_method(tiny_llama, sentence_files, tmp_path):
    settings = shared_settings(tiny_llama, sentence_files, tmp_path / "out")
    with pytest.raises(UserError, match="method 'bitfit' does not apply here: .*no.*bias"):
        plan_comparison({}, settings, ["full", "bitfit"])
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("task_config, message", [
    ({"lora": {"max_steps": 50}}, "'max_steps' in the 'lora' section must be the same for every method"),
    ({"lora": 3}, "section 'lora' must be a mapping"),
    ({"batchsize": 8}, "unknown task config key 'batchsize'"),
    ({"methods": "lora,unknown"}, "unknown method 'unknown'"),
    ({"lora": {"rank": 4}}, "unknown lora setting 'rank'"),
])
def test_compare_bad_task_config(task_config, message, tiny_bert, sentence_files, tmp_path):
    settings = shared_settings(tiny_bert, sentence_files, tmp_path / "out")
    with pytest.raises(UserError, match=message):
        plan_comparison(task_config, settings)
    assert not (tmp_path / "out").exists()


def test_full_run_loads_for_inference(compared):
    from peftlabs.evaluate import classify
    from peftlabs.infer import load_run

    _, output = compared
    loaded = load_run(output / "runs" / "full")
    texts = ["the cat is here", "a plum near one", "my old horse is very big", "one red apple"]
    accuracy = json.loads((output / "runs" / "full" / "metrics.json").read_text())["eval_accuracy"]

    predictions = classify(loaded.model, loaded.tokenizer, texts, progress=False)
    assert len(predictions) == len(texts)
    assert all(index in (0, 1) for index in predictions)
    # The saved weights are the trained ones: the reloaded model scores the eval split as training did.
    from peftlabs.evaluate import evaluate_split
    from peftlabs.train import prepare

    prepared = prepare(loaded.config)
    scores, _ = evaluate_split(loaded.model, loaded.tokenizer, prepared.data, prepared.data.eval, progress=False)
    assert scores["accuracy"] == pytest.approx(accuracy)
