"""`peftlabs merge`: the checks catch a wrong merge, refusals write nothing, real runs load in transformers.

Every method × task merge (or refusal) is in the battery, test_methods.py;
this file breaks merges on purpose and checks the command's output and exit status.
"""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import tiny_config
from peftlabs.cli import main
from peftlabs.infer import load_run
from peftlabs.merge import MergeCheckFailed, merge_run
from peftlabs.methods.lora import Lora
from peftlabs.train import train

LORA_ARGS = {"lora": {"target_modules": ["all-linear"]}}


@pytest.fixture(scope="module")
def module_sentences(tmp_path_factory):
    from conftest import make_sentences, write_jsonl

    folder = tmp_path_factory.mktemp("sentences")
    return {
        "train": write_jsonl(folder / "train.jsonl", make_sentences(160, seed=1)),
        "eval": write_jsonl(folder / "eval.jsonl", make_sentences(40, seed=2)),
    }


@pytest.fixture(scope="module")
def bert_run(tiny_bert, module_sentences, tmp_path_factory):
    """A LoRA classification run of 20 steps on the tiny BERT."""
    run = tmp_path_factory.mktemp("bert-lora") / "run"
    train(tiny_config(tiny_bert, module_sentences, run, max_steps=20, method_args=LORA_ARGS))
    return run


@pytest.fixture(scope="module")
def llama_run(tiny_llama, module_sentences, tmp_path_factory):
    """A LoRA causal-LM run of 20 steps on the tiny Llama."""
    run = tmp_path_factory.mktemp("llama-lora") / "run"
    train(tiny_config(tiny_llama, module_sentences, run, max_steps=20, method_args=LORA_ARGS))
    return run


def _patch_lora_merge(monkeypatch, damage):
    """Make Lora.merge call ``damage(merged_model)`` after the real merge."""
    real_merge = Lora.merge

    def broken_merge(self, model):
        merged = real_merge(self, model)
        damage(merged)
        return merged

    monkeypatch.setattr(Lora, "merge", broken_merge)


def _assert_nothing_written(output):
    assert not output.exists()
    assert not list(output.parent.glob(f".{output.name}.tmp-*"))


def test_perturbed_weight_fails_logit_check(bert_run, tmp_path, monkeypatch):
    def shift_one_weight(model):
        with torch.no_grad():
            model.bert.encoder.layer[0].attention.self.query.weight[0, 0] += 0.5

    _patch_lora_merge(monkeypatch, shift_one_weight)
    output = tmp_path / "merged"

    with pytest.raises(MergeCheckFailed, match="max \\|logit difference\\|.*nothing was written"):
        merge_run(bert_run, output)
    _assert_nothing_written(output)


def test_flipped_labels_fail_label_check(bert_run, tmp_path, monkeypatch):
    def negate_head(model):
        with torch.no_grad():
            model.classifier.weight.neg_()
            model.classifier.bias.neg_()

    _patch_lora_merge(monkeypatch, negate_head)
    output = tmp_path / "merged"

    # The tolerance is too large to fail, so only the predicted labels can.
    with pytest.raises(MergeCheckFailed, match="predicted labels identical: False"):
        merge_run(bert_run, output, tolerance=1e9)
    _assert_nothing_written(output)


def test_changed_generations_fail_generation_check(llama_run, tmp_path, monkeypatch):
    def scramble_embeddings(model):
        embeddings = model.get_input_embeddings().weight
        with torch.no_grad():
            embeddings.copy_(embeddings[torch.randperm(embeddings.shape[0], generator=torch.Generator().manual_seed(0))])

    _patch_lora_merge(monkeypatch, scramble_embeddings)
    output = tmp_path / "merged"

    with pytest.raises(MergeCheckFailed, match="greedy generations identical: False"):
        merge_run(llama_run, output, tolerance=1e9)
    _assert_nothing_written(output)


def test_bad_saved_weights_fail_reload_check(bert_run, tmp_path, monkeypatch):
    """A folder whose saved weights differ from the merged model in memory is caught before it appears."""

    def corrupt_saved_file(model):
        real_save = model.save_pretrained

        def save_then_corrupt(directory, **kwargs):
            real_save(directory, **kwargs)
            weights_file = directory / "model.safetensors"
            tensors = load_file(str(weights_file))
            tensors["classifier.bias"] = tensors["classifier.bias"] + 1.0
            save_file(tensors, str(weights_file), metadata={"format": "pt"})

        model.save_pretrained = save_then_corrupt

    _patch_lora_merge(monkeypatch, corrupt_saved_file)
    output = tmp_path / "merged"

    with pytest.raises(MergeCheckFailed, match="loaded with transformers, differs"):
        merge_run(bert_run, output)
    _assert_nothing_written(output)


def test_failed_check_exits_1_without_output(bert_run, tmp_path, monkeypatch, capsys):
    def shift_one_weight(model):
        with torch.no_grad():
            model.classifier.bias += 1.0

    _patch_lora_merge(monkeypatch, shift_one_weight)
    output = tmp_path / "merged"

    status = main(["merge", "--run", str(bert_run), "--output", str(output)])

    error_lines = capsys.readouterr().err.strip().splitlines()
    assert status == 1
    assert error_lines[-1].startswith("peftlabs merge: merge check failed")
    _assert_nothing_written(output)


def test_cli_merge_reports_check(bert_run, tmp_path, capsys):
    output = tmp_path / "merged"

    status = main(["merge", "--run", str(bert_run), "--output", str(output), "--samples", "4"])

    printed = capsys.readouterr().out
    assert status == 0
    assert "predicted labels identical" in printed
    assert "on 4 samples" in printed
    assert "predicted labels identical: True" in (output / "README.md").read_text()


def test_merged_folder_follows_umask(bert_run, tmp_path):
    output = tmp_path / "merged"
    umask = os.umask(0o022)

    try:
        merge_run(bert_run, output, samples=2)
    finally:
        os.umask(umask)

    assert output.stat().st_mode & 0o777 == 0o755
    assert (output / "model.safetensors").stat().st_mode & 0o777 == 0o644


def test_cli_refusal_is_one_line_exit_2(tiny_bert, module_sentences, tmp_path, capsys):
    run = tmp_path / "run"
    train(tiny_config(tiny_bert, module_sentences, run, max_steps=2, method="prompt_tuning",
                      method_args={"prompt_tuning": {"num_virtual_tokens": 4, "init": "random"}}))
    output = tmp_path / "merged"
    capsys.readouterr()  # drop the training log

    status = main(["merge", "--run", str(run), "--output", str(output)])

    error_lines = capsys.readouterr().err.strip().splitlines()
    assert status == 2
    assert len(error_lines) == 1
    assert "cannot be merged: prompt tuning and P-tuning add trained embeddings of virtual tokens" in error_lines[0]
    assert f"--adapter NAME={run}" in error_lines[0]
    _assert_nothing_written(output)


def test_isolated_process_cannot_import_peftlabs(plain_transformers):
    # Without this, the plain-transformers checks could pass by importing peftlabs.
    assert plain_transformers.status == {"peftlabs": False, "torch": True, "transformers": True}


@pytest.mark.integration
def test_minilm_lora_merge_loads_in_transformers(tmp_path, plain_transformers):
    from peftlabs.config import build_config

    run = tmp_path / "run"
    train(build_config({}, {
        "model": "minilm-l6", "output_dir": str(run), "max_steps": 4, "batch_size": 8, "max_train_samples": 32,
        "max_eval_samples": 8, "learning_rate": 2e-3, "logging_steps": 2, "save_steps": 100, "device": "cpu",
        "precision": "fp32",
    }))
    output = tmp_path / "merged"

    report = merge_run(run, output, samples=8)

    assert report.max_abs_logit_difference <= report.tolerance
    assert report.labels_identical is True
    loaded = load_run(run)
    batch = loaded.tokenizer(["Where is my package?", "I forgot my password"], padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = loaded.model(**batch).logits
    reply, logits = plain_transformers.load(output, "AutoModelForSequenceClassification", batch)
    assert reply["ok"], reply.get("error")
    assert reply["class"] == "BertForSequenceClassification"
    assert torch.allclose(logits, expected, atol=1e-3)
