"""Training, saving, reloading and merging LoRA on tiny models of both task shapes."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import tiny_config
from peftlabs.errors import UserError
from peftlabs.infer import load_run, predict
from peftlabs.merge import merge_run
from peftlabs.train import prepare, train


@pytest.fixture(params=["tiny_llama", "tiny_bert"])
def trained(request, sentences, tmp_path):
    """A finished LoRA run on one tiny model, with the in-memory model kept for comparison."""
    model_dir = request.getfixturevalue(request.param)
    config = tiny_config(model_dir, sentences, tmp_path / "run")
    result = train(config)
    return {"config": config, "metrics": result.metrics, "result": result, "run": tmp_path / "run",
            "model": request.param}


def test_run_directory_contents(trained):
    run = trained["run"]

    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    assert (run / "config.yaml").is_file()
    assert (run / "train.log").read_text().count("step ") >= 3
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["steps"] == 80
    assert metrics["train_tokens_per_second"] > 0
    assert metrics["peak_memory_bytes"] > 0
    assert not list(run.glob(".adapter.tmp-*"))


def test_training_learns_task(trained):
    metrics = trained["metrics"]

    # Two balanced classes: chance is 0.5.
    assert metrics["eval_accuracy"] >= 0.75


def test_training_lowers_loss(trained):
    log = (trained["run"] / "train.log").read_text()
    losses = [float(line.split("loss ")[1].split()[0]) for line in log.splitlines() if " loss " in line
              and "step " in line and "/" in line.split("step ")[1].split()[0]]

    assert len(losses) >= 3
    assert losses[-1] < losses[0]


def test_reload_reproduces_logits(trained):
    result = trained["result"]
    loaded = load_run(trained["run"])
    batch = loaded.tokenizer(["the cat is here", "my red apple near"], padding=True, return_tensors="pt")

    with torch.no_grad():
        in_memory = result.model(**batch).logits
        reloaded = loaded.model(**batch).logits
    assert torch.allclose(in_memory, reloaded, atol=1e-6)


def test_reload_reproduces_generation(trained):
    if trained["model"] != "tiny_llama":
        pytest.skip("generation applies to the causal LM only")
    from peftlabs.evaluate import generate

    result = trained["result"]
    loaded = load_run(trained["run"])
    prompts = ["the cat is here", "a plum near one", "my old horse"]
    instruction = result.data.instruction

    before = generate(result.model, result.tokenizer, prompts, instruction, max_new_tokens=4, progress=False)
    after = generate(loaded.model, loaded.tokenizer, prompts, instruction, max_new_tokens=4, progress=False)
    assert before == after
    assert predict(loaded, prompts, max_new_tokens=4) == after


def test_merge_matches_adapter(trained, tmp_path):
    report = merge_run(trained["run"], tmp_path / "merged")

    assert report.max_abs_logit_difference <= report.tolerance
    assert (tmp_path / "merged" / "model.safetensors").is_file()
    assert (tmp_path / "merged" / "README.md").is_file()
    if trained["model"] == "tiny_llama":
        assert report.generations_identical is True


def test_merged_folder_loads_without_peft(trained, tmp_path):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    merge_run(trained["run"], tmp_path / "merged")
    loaded = load_run(trained["run"])
    cls = AutoModelForCausalLM if trained["model"] == "tiny_llama" else AutoModelForSequenceClassification
    merged = cls.from_pretrained(tmp_path / "merged").eval()
    batch = loaded.tokenizer(["the cat is here", "a plum"], padding=True, return_tensors="pt")

    with torch.no_grad():
        expected = loaded.model(**batch).logits
        actual = merged(**batch).logits
    mask = batch["attention_mask"].bool()
    if expected.dim() == 3:
        expected, actual = expected[mask], actual[mask]
    assert (expected - actual).abs().max().item() < 1e-4


def test_adapter_rejected_on_other_base(sentences, tmp_path, tiny_llama, tiny_llama_other):
    config = tiny_config(tiny_llama, sentences, tmp_path / "run", max_steps=2)
    train(config)

    with pytest.raises(UserError, match="was trained on base model"):
        load_run(tmp_path / "run", model=str(tiny_llama_other))


def test_existing_output_dir_rejected(sentences, tmp_path, tiny_llama):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "keep.txt").write_text("user data")
    config = tiny_config(tiny_llama, sentences, tmp_path / "run", max_steps=2)

    with pytest.raises(UserError, match="already exists.*--overwrite"):
        train(config)
    assert (tmp_path / "run" / "keep.txt").read_text() == "user data"


def test_overwrite_replaces_run(sentences, tmp_path, tiny_llama):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "old.txt").write_text("old run")
    config = tiny_config(tiny_llama, sentences, tmp_path / "run", max_steps=2, overwrite=True)

    train(config)

    assert not (tmp_path / "run" / "old.txt").exists()
    assert (tmp_path / "run" / "adapter").is_dir()


def test_bad_input_leaves_nothing(sentences, tmp_path, tiny_llama):
    config = tiny_config(tiny_llama, sentences, tmp_path / "run", label_column="missing")

    with pytest.raises(UserError, match="no column 'missing'"):
        train(config)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("method", ["lora", "prompt_tuning", "prefix_tuning"])
def test_response_only_loss_matches_transformers(method, tiny_llama, sentences, tmp_path):
    """The trainer's response-rows loss equals the model's own full-logits loss on left-padded batches."""
    from peftlabs import data as data_module
    from peftlabs.train import PeftLabsTrainer, _build_trainer

    method_args = {"lora": {"target_modules": ["all-linear"]}} if method == "lora" else {}
    config = tiny_config(tiny_llama, sentences, tmp_path / "run", method=method, method_args=method_args)
    prepared = prepare(config)
    train_set = data_module.tokenize_split(prepared.data.train, prepared.tokenizer, prepared.data, 48)
    trainer = _build_trainer(prepared, tmp_path / "run", train_set, train_set)
    assert isinstance(trainer, PeftLabsTrainer)
    assert trainer.response_only_logits

    # Responses of different lengths, so the kept window contains padding rows for the shorter ones.
    batch = _three_row_batch(trainer, prepared, 48)
    assert (batch["attention_mask"][:, 0] == 0).any(), "batch should contain left padding"

    with torch.no_grad():
        ours = trainer.compute_loss(prepared.model, dict(batch))
        mask = batch["attention_mask"]
        position_ids = None if method != "lora" else (mask.cumsum(-1) - 1).clamp(min=0)
        reference = prepared.model(input_ids=batch["input_ids"], attention_mask=mask,
                                   position_ids=position_ids, labels=batch["labels"]).loss
        plain_logits = prepared.model(input_ids=batch["input_ids"], attention_mask=mask).logits

    assert abs(ours.item() - reference.item()) < 1e-5
    # Outside compute_loss the output layer is unchanged: [batch, positions, vocabulary] logits.
    assert plain_logits.dim() == 3
    assert plain_logits.shape[0] == batch["input_ids"].shape[0]
    assert plain_logits.shape[1] >= batch["input_ids"].shape[1]


def _three_row_batch(trainer, prepared, max_length):
    """Collate three examples with responses of different lengths, so the batch has left padding."""
    from peftlabs import data as data_module

    prompts = ["the cat", "a very big old red mango is here near one", "my plum"]
    responses = ["animal", "fruit fruit fruit fruit fruit", "fruit"]
    examples = [data_module.encode_causal_example(prepared.tokenizer, p, r, prepared.data.instruction, max_length)
                for p, r in zip(prompts, responses)]
    return trainer.data_collator(examples)


def test_same_seed_same_initial_model(tmp_path, tiny_bert, sentences):
    """The new classification head and the method's weights depend on the seed, not on earlier random draws."""
    config = tiny_config(tiny_bert, sentences, tmp_path / "run")

    first = prepare(config).model.state_dict()
    torch.rand(1000)  # what an earlier test or notebook cell would do to the global generator
    second = prepare(config).model.state_dict()

    assert first.keys() == second.keys()
    assert all(torch.equal(first[name], second[name]) for name in first)


def test_config_records_default_learning_rate(tmp_path, tiny_llama, sentences):
    import yaml

    from peftlabs.methods import get_method

    config = tiny_config(tiny_llama, sentences, tmp_path / "run", learning_rate=None, max_steps=2, final_eval=False)
    train(config)

    recorded = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert recorded["learning_rate"] == get_method("lora").default_learning_rate


@pytest.mark.parametrize("method", ["lora", "ia3", "full"])
def test_shared_prefix_same_loss_and_gradients(method, tiny_llama, sentences, tmp_path):
    """Computing the rows' common prompt once changes neither the loss nor the gradients."""
    from peftlabs import data as data_module
    from peftlabs.train import _build_trainer, response_loss_sum, shared_prefix_length

    instruction = "read the sentence below and answer with one word from this list: {labels}"
    config = tiny_config(tiny_llama, sentences, tmp_path / "run", method=method, instruction=instruction,
                         method_args={})
    prepared = prepare(config)
    train_set = data_module.tokenize_split(prepared.data.train, prepared.tokenizer, prepared.data, 64)
    trainer = _build_trainer(prepared, tmp_path / "run", train_set, train_set)
    assert trainer.shared_prefix

    batch = _three_row_batch(trainer, prepared, 64)
    assert (batch["attention_mask"][:, 0] == 0).any(), "batch should contain left padding"
    prefix = shared_prefix_length(batch["input_ids"], batch["attention_mask"], batch["labels"])
    assert prefix >= 8

    # Dropout off (eval mode), so both computations see the same function; gradients still flow.
    model = prepared.model
    model.eval()
    trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]
    results = {}
    for shared in (False, True):
        model.zero_grad(set_to_none=True)
        loss_sum, _, targets, saved = response_loss_sum(model, dict(batch), trainer.loss_rows, shared)
        (loss_sum / targets.numel()).backward()
        results[shared] = (loss_sum.item(), [parameter.grad.clone() for parameter in trainable], saved)

    assert results[False][2] == 0
    assert results[True][2] == 2 * prefix  # three rows, two of them reuse the prefix
    assert abs(results[True][0] - results[False][0]) < 1e-4 * max(1.0, abs(results[False][0]))
    for plain, shared in zip(results[False][1], results[True][1]):
        assert torch.allclose(plain, shared, rtol=1e-4, atol=1e-6)
    assert any(grad.abs().sum() > 0 for grad in results[True][1])


def test_shared_prefix_length_cases(tiny_llama):
    """No sharing for rows that begin differently, for one row, or for right-padded batches."""
    from peftlabs.train import MIN_SHARED_PREFIX, shared_prefix_length

    common = list(range(10, 10 + MIN_SHARED_PREFIX + 2))
    # Row 0 is left-padded by one; after the common prompt each row has prompt tokens of its own.
    ids = torch.tensor([[0] + common + [40, 50, 51], common + [60, 61, 62, 63]])
    mask = torch.tensor([[0] + [1] * (len(common) + 3), [1] * (len(common) + 4)])
    labels = torch.tensor([[-100] * (len(common) + 2) + [50, 51], [-100] * (len(common) + 2) + [62, 63]])

    assert shared_prefix_length(ids, mask, labels) == len(common)
    # The prefix stops before the position that predicts the first response token.
    early = labels.clone()
    early[1, len(common) - 1:] = ids[1, len(common) - 1:]
    assert shared_prefix_length(ids, mask, early) == len(common) - 2
    # A prefix shorter than MIN_SHARED_PREFIX is not shared.
    early[1, len(common) - 3:] = ids[1, len(common) - 3:]
    assert shared_prefix_length(ids, mask, early) == 0
    different = ids.clone()
    different[1, 0] = 99
    assert shared_prefix_length(different, mask, labels) == 0
    assert shared_prefix_length(ids[:1], mask[:1], labels[:1]) == 0
    right_padded = torch.tensor([[1] * (len(common) + 3) + [0], [1] * (len(common) + 4)])
    assert shared_prefix_length(ids, right_padded, labels) == 0


@pytest.mark.parametrize("method", ["adapters", "prefix_tuning"])
def test_shared_prefix_off_for_adapters_and_prompts(method, tiny_llama, sentences, tmp_path):
    """Bottleneck adapters (a wrong loss from a cache in adapters 1.3.0) and prompt learning do not share."""
    from peftlabs import data as data_module
    from peftlabs.train import _build_trainer

    config = tiny_config(tiny_llama, sentences, tmp_path / "run", method=method, method_args={})
    prepared = prepare(config)
    train_set = data_module.tokenize_split(prepared.data.train, prepared.tokenizer, prepared.data, 64)

    trainer = _build_trainer(prepared, tmp_path / "run", train_set, train_set)

    assert trainer.response_only_logits
    assert not trainer.shared_prefix


def test_shared_prefix_turned_off(tiny_llama, sentences, tmp_path):
    """--no-shared-prefix keeps the per-row computation."""
    from peftlabs import data as data_module
    from peftlabs.train import _build_trainer

    config = tiny_config(tiny_llama, sentences, tmp_path / "run", shared_prefix=False)
    prepared = prepare(config)
    train_set = data_module.tokenize_split(prepared.data.train, prepared.tokenizer, prepared.data, 64)

    trainer = _build_trainer(prepared, tmp_path / "run", train_set, train_set)

    assert trainer.response_only_logits
    assert not trainer.shared_prefix
