"""Settings, data loading and bad input: every mistake ends in one clear line."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import make_sentences, tiny_config, write_jsonl
from peftlabs.cli import main
from peftlabs.config import build_config
from peftlabs.data import load_task_data
from peftlabs.errors import UserError


# ---------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------


def test_flags_override_yaml(tmp_path):
    config = build_config({"learning_rate": 0.1, "lora": {"r": 4, "alpha": 8}},
                          {"learning_rate": 0.2, "lora.r": 16})

    assert config.learning_rate == 0.2
    assert config.method_args["lora"] == {"r": 16, "alpha": 8}


def test_resolved_config_round_trips(tmp_path):
    import yaml

    from peftlabs.config import write_yaml

    config = build_config({"lora": {"r": 4}}, {"max_steps": 7})
    write_yaml(config, tmp_path / "config.yaml")
    again = build_config(yaml.safe_load((tmp_path / "config.yaml").read_text()), {})

    assert again == config


@pytest.mark.parametrize("values, message", [
    ({"lora.r": 0}, "lora.r 0"),
    ({"lora.r": -2}, "lora.r -2"),
    ({"learning_rate": 0.0}, "learning_rate"),
    ({"learning_rate": -1e-4}, "learning_rate"),
    ({"batch_size": 0}, "batch_size"),
    ({"method": "magic"}, "unknown method 'magic'"),
    ({"lora.dropout": 1.5}, "lora.dropout"),
    ({"task": "translation"}, "invalid task"),
    ({"lora.use_dora": "maybe"}, "lora.use_dora"),
])
def test_invalid_settings_rejected(values, message):
    with pytest.raises(UserError, match=message):
        build_config({}, values)


def test_unknown_yaml_key_rejected():
    with pytest.raises(UserError, match="unknown config key 'learnin_rate'"):
        build_config({"learnin_rate": 1e-3}, {})


def test_other_method_settings_rejected():
    with pytest.raises(UserError, match="settings for method 'lora' were given but the method is 'qlora'"):
        build_config({"method": "qlora", "lora": {"r": 4}}, {})


def test_unknown_method_setting_rejected():
    with pytest.raises(UserError, match="unknown lora setting 'rank'"):
        build_config({"lora": {"rank": 8}}, {})


# ---------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------


def _config(dataset, **values):
    return build_config({}, {"dataset": str(dataset), **values})


def test_text_column_differs_between_files(tmp_path):
    # The GLUE SST-2 copy names the text 'sentence' in train and 'content' in dev.
    (tmp_path / "train.tsv").write_text('label\tsentence\n1\ta "great" film\n0\tdull and slow\n1\tfun\n')
    (tmp_path / "dev.tsv").write_text("label\tcontent\n0\tboring\n1\tlovely\n")
    data = load_task_data(_config(tmp_path / "train.tsv", eval_dataset=str(tmp_path / "dev.tsv")),
                          "classification")

    assert set(data.train.column_names) == {"text", "label", "text_pair"}
    assert sorted(data.eval["text"]) == ["boring", "lovely"]
    assert data.labels == ["0", "1"]
    assert 'a "great" film' in data.train["text"]


def test_demo_dataset_has_fixed_splits():
    data = load_task_data(build_config({}, {}), "classification")

    assert (len(data.train), len(data.eval), len(data.test)) == (480, 120, 150)
    assert len(data.labels) == 5


@pytest.mark.parametrize("split, rows", [("validation", 120), ("test", 150)])
def test_demo_eval_split_is_honoured(split, rows):
    data = load_task_data(build_config({}, {"model": "minilm-l6", "eval_split": split}), "classification")

    assert len(data.eval) == rows


def test_demo_unknown_eval_split_rejected():
    with pytest.raises(UserError, match="demo dataset has no split 'dev'"):
        load_task_data(build_config({}, {"eval_split": "dev"}), "classification")


def test_demo_as_generation_uses_labels_in_instruction():
    data = load_task_data(build_config({}, {}), "causal_lm")

    assert data.generative_classification
    assert "technical_issue" in data.instruction
    assert set(data.train["response"]) == set(data.labels)


def test_prompt_response_held_out_by_prompt(tmp_path):
    rows = [{"mr": f"name[{i % 10}]", "ref": f"text {i}"} for i in range(60)]
    data = load_task_data(_config(write_jsonl(tmp_path / "e2e.jsonl", rows), eval_fraction=0.3), "causal_lm")

    assert not set(data.train["prompt"]) & set(data.eval["prompt"])
    assert len(data.train) + len(data.eval) == 60


@pytest.mark.parametrize("rows, values, message", [
    ([{"words": "x", "label": 1}], {}, "no text column; found \\['words', 'label'\\]: pass --text-column"),
    ([{"text": "x", "sentence": "y", "label": 1}], {}, "several possible text columns"),
    ([{"text": "x", "label": 1}], {"label_column": "score"}, "no column 'score'"),
])
def test_bad_columns_rejected(tmp_path, rows, values, message):
    path = write_jsonl(tmp_path / "bad.jsonl", rows * 4)

    with pytest.raises(UserError, match=message):
        load_task_data(_config(path, **values), "classification")


def test_eval_labels_outside_set_rejected(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", make_sentences(20, seed=1))
    evaluation = write_jsonl(tmp_path / "eval.jsonl", [{"text": "a cat", "label": "vegetable"}])

    with pytest.raises(UserError, match="labels \\['vegetable'\\] outside the label set"):
        load_task_data(_config(train, eval_dataset=str(evaluation)), "classification")


def test_empty_split_rejected(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", make_sentences(20, seed=1))
    (tmp_path / "eval.csv").write_text("text,label\n")

    with pytest.raises(UserError, match="empty"):
        load_task_data(_config(train, eval_dataset=str(tmp_path / "eval.csv")), "classification")


def test_missing_dataset_file_rejected(tmp_path):
    with pytest.raises(UserError, match="dataset file not found"):
        load_task_data(_config(tmp_path / "nope.csv"), "classification")


# ---------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("spec, message", [
    ("smollm9", "unknown model 'smollm9'"),
    ("./missing-folder", "model path not found"),
    ("missing.gguf", "GGUF file not found"),
])
def test_bad_model_rejected(spec, message):
    from peftlabs.models import resolve_model

    with pytest.raises(UserError, match=message):
        resolve_model(spec)


def test_folder_without_config_rejected(tmp_path):
    from peftlabs.models import resolve_model

    with pytest.raises(UserError, match="no config.json"):
        resolve_model(str(tmp_path))


def test_causal_lm_on_encoder_rejected(tmp_path, tiny_bert, sentences):
    from peftlabs.train import train

    config = tiny_config(tiny_bert, sentences, tmp_path / "run", task="causal_lm")

    with pytest.raises(UserError, match="is an encoder .* cannot be trained as a causal LM: use --task classification"):
        train(config)
    assert not (tmp_path / "run").exists()


def test_chatml_tokenizer_fixed(tmp_path, tiny_llama):
    """A tokenizer shaped like the one transformers builds from SmolLM2's GGUF gets its tokens repaired."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from peftlabs.models import fix_chatml_tokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    tokenizer.eos_token = "<|im_start|>"
    tokenizer.pad_token = None
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)

    fix_chatml_tokenizer(tokenizer, model)

    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.pad_token_id == end
    assert model.generation_config.eos_token_id == end


# ---------------------------------------------------------------------------
# Command line: one line on stderr, exit status 2, nothing written
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("argv, message", [
    (["train", "--model", "nope-model"], "unknown model 'nope-model'"),
    (["train", "--method", "magic"], "unknown method 'magic'"),
    (["train", "--lora.r", "0"], "lora.r 0"),
    (["train", "--learning-rate", "-1"], "learning_rate"),
    (["train", "--config", "missing.yaml"], "config file not found"),
    (["train", "--dataset", "missing.csv"], "dataset file not found"),
    (["infer", "--run", "no-such-run", "--text", "hi"], "run directory not found"),
])
def test_cli_errors_are_one_line(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)

    code = main(argv + (["--output-dir", "run"] if argv[0] == "train" else []))

    error = capsys.readouterr().err.strip()
    assert code == 2
    assert len(error.splitlines()) == 1, error
    assert message in error
    assert "Traceback" not in error
    assert not (tmp_path / "run").exists()


def test_cli_existing_output_dir(capsys, tmp_path, tiny_llama, sentences):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "x").write_text("x")

    code = main(["train", "--model", str(tiny_llama), "--dataset", str(sentences["train"]),
                 "--output-dir", str(tmp_path / "run")])

    assert code == 2
    assert "already exists" in capsys.readouterr().err


def test_ctrl_c_keeps_checkpoint_and_resumes(tmp_path, tiny_llama, sentences):
    """First Ctrl-C saves a checkpoint and exits 130; --resume finishes the run from it."""
    run = tmp_path / "run"
    command = [sys.executable, "-m", "peftlabs.cli", "train", "--model", str(tiny_llama),
               "--dataset", str(sentences["train"]), "--eval-dataset", str(sentences["eval"]),
               "--instruction", "classify as {labels}", "--max-length", "32", "--output-dir", str(run),
               "--max-steps", "100000", "--logging-steps", "1", "--save-steps", "100000",
               "--device", "cpu", "--precision", "fp32"]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)

    # Wait for the first logged step, then press Ctrl-C once.
    deadline = time.time() + 120
    for line in process.stderr:
        if line.startswith("step ") or time.time() > deadline:
            break
    process.send_signal(signal.SIGINT)
    _, rest = process.communicate(timeout=120)

    assert process.returncode == 130, rest
    assert "--resume" in rest
    checkpoints = list((run / "checkpoints").glob("checkpoint-*"))
    assert len(checkpoints) == 1
    assert (checkpoints[0] / "adapter_model.safetensors").is_file()
    assert not (run / "adapter").exists()

    # Resume and finish a few steps later.
    step = int(checkpoints[0].name.split("-")[1])
    resumed = subprocess.run([sys.executable, "-m", "peftlabs.cli", "train", "--output-dir", str(run), "--resume",
                              "--max-steps", str(step + 3)], capture_output=True, text=True, timeout=300)

    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert json.loads((run / "metrics.json").read_text())["steps"] == step + 3
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
