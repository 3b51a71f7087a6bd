"""Integration runs on the two bundled real models (installed by `make test`).

The first run converts SmolLM2's GGUF file into the peftlabs cache (about a
minute on 2 cores); later runs reuse it.
"""

from __future__ import annotations

import pytest
import torch

from peftlabs.config import build_config
from peftlabs.infer import load_run, predict
from peftlabs.merge import merge_run
from peftlabs.models import load_tokenizer, resolve_model
from peftlabs.train import train

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def smollm2_dir():
    return resolve_model("smollm2-135m-instruct")


def test_smollm2_tokenizer_repaired(smollm2_dir):
    from transformers import GenerationConfig

    tokenizer = load_tokenizer(smollm2_dir)
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
    start_of_turn = tokenizer.convert_tokens_to_ids("<|im_start|>")

    assert end_of_turn == 2
    assert tokenizer.eos_token_id == end_of_turn
    assert tokenizer.pad_token_id is not None
    assert tokenizer("hello world")["input_ids"][0] != start_of_turn
    assert GenerationConfig.from_pretrained(smollm2_dir).eos_token_id == end_of_turn
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                           tokenize=False)
    assert prompt.endswith("<|im_start|>assistant\n")


def test_smollm2_lora_train_infer_merge(tmp_path):
    config = build_config({}, {
        "output_dir": str(tmp_path / "run"), "max_steps": 3, "batch_size": 4, "max_train_samples": 12,
        "max_eval_samples": 4, "learning_rate": 1e-3, "logging_steps": 1, "save_steps": 100,
        "device": "cpu", "precision": "fp32",
    })
    result = train(config)

    assert result.metrics["steps"] == 3
    assert result.metrics["base_memory_bytes"] > 400e6  # fp32 SmolLM2-135M is about 540 MB
    loaded = load_run(tmp_path / "run")
    answer = predict(loaded, ["My card was charged twice for one order."])
    assert len(answer) == 1 and isinstance(answer[0], str)

    report = merge_run(tmp_path / "run", tmp_path / "merged", samples=2)
    assert report.max_abs_logit_difference <= report.tolerance
    assert report.generations_identical is True


def test_minilm_classification_learns_and_reloads(tmp_path):
    config = build_config({}, {
        "model": "minilm-l6", "output_dir": str(tmp_path / "run"), "max_steps": 30, "batch_size": 16,
        "learning_rate": 2e-3, "logging_steps": 10, "save_steps": 100, "device": "cpu", "precision": "fp32",
    })
    result = train(config)

    # Five balanced labels: chance is 0.2.
    assert result.metrics["eval_accuracy"] > 0.4
    loaded = load_run(tmp_path / "run")
    batch = loaded.tokenizer(["Where is my package?", "I forgot my password"], padding=True, return_tensors="pt")
    with torch.no_grad():
        assert torch.allclose(result.model(**batch).logits, loaded.model(**batch).logits, atol=1e-6)

    report = merge_run(tmp_path / "run", tmp_path / "merged", samples=8)
    assert report.max_abs_logit_difference <= report.tolerance
