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
    (["--seeds", "42,x"], "invalid seeds"),
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


def test_resume_rejects_changed_settings(compared, tiny_bert, sentence_files):
    _, output = compared
    finished = (output / "runs" / "lora" / "metrics.json").stat().st_mtime_ns
    task_config = {"lora": {"learning_rate": 2e-2, "r": 4}, "full": {"learning_rate": 1e-3}}

    with pytest.raises(UserError, match=r"runs/lora was trained with learning_rate=0.01, now learning_rate=0.02"):
        run_comparison(task_config, shared_settings(tiny_bert, sentence_files, output), METHODS)
    assert (output / "runs" / "lora" / "metrics.json").stat().st_mtime_ns == finished


@pytest.fixture(scope="module")
def seeded(tiny_bert, sentence_files, tmp_path_factory):
    """Full fine-tuning and BitFit, each trained with seeds 1 and 2."""
    output = tmp_path_factory.mktemp("compare-seeds") / "out"
    settings = {**shared_settings(tiny_bert, sentence_files, output), "seeds": "1,2"}
    comparison = run_comparison({"full": {"learning_rate": 1e-3}}, settings, ["full", "bitfit"])
    return comparison, output


def test_seeds_train_each_method(seeded):
    from peftlabs.config import read_yaml

    comparison, output = seeded
    names = ["full-seed1", "bitfit-seed1", "full-seed2", "bitfit-seed2"]
    assert [row["run"] for row in comparison.run_rows] == names
    for name in names:
        assert (output / "runs" / name / "metrics.json").is_file(), name
        assert read_yaml(output / "runs" / name / "config.yaml")["seed"] == int(name[-1])
    # Different seeds draw different weights for the new classification head.
    assert comparison.runs[1]["eval_loss"] != comparison.runs[3]["eval_loss"]


def test_seeds_table_mean_spread_gap(seeded):
    import statistics

    _, output = seeded
    results = json.loads((output / "results.json").read_text())
    runs = {row["run"]: row for row in results["runs"]}
    rows = {row["method"]: row for row in results["rows"]}
    assert list(rows) == ["full", "bitfit"]

    for method in rows:
        losses = [runs[f"{method}-seed{seed}"]["eval_loss"] for seed in (1, 2)]
        assert rows[method]["seeds"] == "1,2"
        assert rows[method]["eval_loss"] == pytest.approx(statistics.mean(losses), abs=1e-4)
        assert rows[method]["eval_loss_std"] == pytest.approx(statistics.stdev(losses), abs=1e-4)
    gaps = [runs[f"bitfit-seed{seed}"]["eval_accuracy"] - runs[f"full-seed{seed}"]["eval_accuracy"]
            for seed in (1, 2)]
    assert rows["bitfit"]["eval_accuracy_vs_full"] == pytest.approx(statistics.mean(gaps), abs=1e-4)
    assert "eval_accuracy_vs_full" not in rows["full"]

    assert results["seeds"] == [1, 2]
    assert "seed" not in results["shared_settings"]
    with open(output / "results.csv") as file:
        assert [row["seeds"] for row in csv.DictReader(file)] == ["1,2", "1,2"]
    with open(output / "results_runs.csv") as file:
        assert [row["seed"] for row in csv.DictReader(file)] == ["1", "1", "2", "2"]
    table = (output / "results.md").read_text()
    assert "±" in table
    assert "| vs full |" in table
    assert "over seeds 1, 2" in table
    assert table.count("\n| bitfit | ") == 3  # the mean, then one row per seed
    assert table.count("\n| bitfit | 1 | ") == 1


def test_seeds_rerun_trains_nothing(seeded, tiny_bert, sentence_files, caplog):
    comparison, output = seeded
    settings = {**shared_settings(tiny_bert, sentence_files, output), "seeds": "1,2"}

    # BitFit keeps its default learning rate, which the run records as a number.
    with caplog.at_level("INFO", logger="peftlabs"):
        again = run_comparison({"full": {"learning_rate": 1e-3}}, settings, ["full", "bitfit"])
    assert caplog.text.count("not trained again") == 4
    assert again.rows == comparison.rows


def test_failed_seed_gives_no_mean():
    from peftlabs.compare import aggregate_seeds

    runs = [
        {"method": "lora", "run": "lora-seed1", "seed": 1, "status": "done", "eval_accuracy": 0.8, "note": "",
         "mergeable": "yes"},
        {"method": "lora", "run": "lora-seed2", "seed": 2, "status": "failed", "note": "exit status 1: boom",
         "mergeable": "yes"},
    ]
    [row] = aggregate_seeds(runs)
    assert row["status"] == "failed"
    assert "eval_accuracy" not in row
    assert row["note"] == "seed 2: exit status 1: boom"


@pytest.mark.parametrize("task_config, cli, seeds", [
    ({}, {"seeds": "3,4"}, [3, 4]),
    ({"seed": 1}, {"seeds": "3,4"}, [3, 4]),  # the flag wins over the file
    ({"seeds": [5, 6]}, {}, [5, 6]),
    ({"seeds": [5, 6]}, {"seed": 7}, [7]),
    ({}, {}, [42]),
])
def test_seeds_from_file_and_flags(task_config, cli, seeds, tiny_bert, sentence_files, tmp_path):
    settings = {**shared_settings(tiny_bert, sentence_files, tmp_path / "out"), **cli}
    _, _, plans = plan_comparison(task_config, settings, ["full", "lora"])
    assert [plan.seed for plan in plans] == [seed for seed in seeds for _ in range(2)]
    assert all(plan.config.seed == plan.seed for plan in plans)
    suffixes = [plan.run_name.removeprefix(plan.name) for plan in plans]
    assert suffixes == ([f"-seed{seed}" for seed in seeds for _ in range(2)] if len(seeds) > 1 else ["", ""])


@pytest.mark.parametrize("task_config, cli, message", [
    ({}, {"seeds": "42,x"}, "invalid seeds"),
    ({}, {"seeds": "42,42"}, "seeds listed twice"),
    ({}, {"seeds": ","}, "no seeds given"),
    ({"seeds": [1.5]}, {}, "invalid seeds"),
    ({"seed": 1, "seeds": [1, 2]}, {}, "the task config sets both 'seed' and 'seeds'"),
    ({}, {"seed": 1, "seeds": "1,2"}, "the command line sets both --seed and --seeds"),
])
def test_bad_seeds(task_config, cli, message, tiny_bert, sentence_files, tmp_path):
    settings = {**shared_settings(tiny_bert, sentence_files, tmp_path / "out"), **cli}
    with pytest.raises(UserError, match=message):
        plan_comparison(task_config, settings, ["full", "lora"])
    assert not (tmp_path / "out").exists()


def test_same_setting_resolves_paths(tmp_path, monkeypatch):
    from peftlabs.compare import _same_setting

    (tmp_path / "train.tsv").write_text("sentence\tlabel\n")
    monkeypatch.chdir(tmp_path)
    assert _same_setting(str(tmp_path / "train.tsv"), "train.tsv")
    assert not _same_setting("train.tsv", "dev.tsv")
    assert not _same_setting(1e-3, 2e-3)
