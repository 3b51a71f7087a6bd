"""Gradient checkpointing over every method x task, probed on the tiny models.

For each case the battery runs one forward and backward pass with and without
checkpointing, switched on the way the Trainer does it, and requires the same
gradient on every trainable parameter. Methods that the probe showed to break
(the prefix methods: transformers' checkpointed layers drop past_key_values)
must be rejected with a one-line error before anything is written, and the
probe still checks that the library behaviour behind the rejection holds.
"""

from __future__ import annotations

import json

import pytest
import torch

from conftest import tiny_config
from peftlabs import data as data_module
from peftlabs.errors import UserError
from peftlabs.methods import get_method
from peftlabs.train import prepare, train
from test_methods import CASE_METHODS, CASES, METHOD_ARGS, MODELS

# Gradients are recomputed with the same weights and inputs, so they agree up to the
# float rounding of a different kernel order; the tiny models' gradients are of order 1.
GRADIENT_TOLERANCE = 1e-5


def _config(name: str, model_fixture: str, request, sentences, tmp_path, **overrides):
    """The battery's settings for a case: a method, or a method variant such as ``adapters-lora``."""
    model_dir = request.getfixturevalue(model_fixture)
    method_args = METHOD_ARGS.get((name, MODELS[model_fixture]), METHOD_ARGS[name])
    return tiny_config(model_dir, sentences, tmp_path / "run", method=CASE_METHODS[name], method_args=method_args,
                       **overrides)


def _gradients(prepared, checkpointing: bool) -> dict[str, torch.Tensor | None]:
    """Gradients of one batch's loss, with checkpointing switched on as Trainer.train does it."""
    model = prepared.model
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    model.zero_grad()

    rows = data_module.tokenize_split(prepared.data.train.select(range(8)), prepared.tokenizer, prepared.data, 32)
    batch = data_module.collator(prepared.tokenizer, prepared.data.task)([rows[i] for i in range(len(rows))])
    torch.manual_seed(0)  # same dropout masks in both passes
    loss = model(**batch).loss
    if loss.requires_grad:  # False when no trainable parameter took part in the forward pass
        loss.backward()

    gradients = {name: None if p.grad is None else p.grad.detach().clone()
                 for name, p in model.named_parameters() if p.requires_grad}
    if checkpointing:
        model.gradient_checkpointing_disable()
    return gradients


def _adapter_gradients(gradients: dict, head: str | None) -> dict:
    """The method's own parameters, without the classification head that every method trains."""
    return {name: grad for name, grad in gradients.items() if not (head and f".{head}." in f".{name}")}


@pytest.mark.parametrize("method,model_fixture", CASES, ids=[f"{m}-{t}" for m, t in CASES])
def test_checkpointing_keeps_gradients(method, model_fixture, request, sentences, tmp_path):
    from peftlabs.models import classification_head_name

    config = _config(method, model_fixture, request, sentences, tmp_path)
    prepared = prepare(config)
    base = prepared.model.get_base_model() if hasattr(prepared.model, "get_base_model") else prepared.model
    head = classification_head_name(base) if prepared.data.task == "classification" else None

    plain = _adapter_gradients(_gradients(prepared, checkpointing=False), head)
    checkpointed = _adapter_gradients(_gradients(prepared, checkpointing=True), head)

    assert plain, "the method has no trainable parameters of its own"
    if get_method(CASE_METHODS[method]).gradient_checkpointing_refusal:
        # The reason for the rejection: the prefix gets no gradient under checkpointing.
        assert all(grad is None or not grad.any() for grad in checkpointed.values())
        return
    # LoRA's A matrices start with zero gradients (B is 0), so only the total must be non-zero.
    assert sum(grad.abs().sum() for grad in plain.values() if grad is not None) > 0
    for name, grad in plain.items():
        assert grad is not None, f"{name} gets no gradient even without checkpointing"
        assert checkpointed[name] is not None, f"{name} gets no gradient with checkpointing"
        difference = (checkpointed[name] - grad).abs().max().item()
        assert difference <= GRADIENT_TOLERANCE, f"{name}: max |difference| {difference:.2e}"


@pytest.mark.parametrize("method", [name for name in ("prefix_tuning", "p_tuning_v2")])
def test_checkpointing_rejected_for_prefix(method, request, sentences, tmp_path):
    with pytest.raises(UserError, match=f"method '{method}' cannot train with gradient checkpointing.*"
                                        f"--no-gradient-checkpointing"):
        _config(method, "tiny_llama", request, sentences, tmp_path, gradient_checkpointing=True)
    assert not (tmp_path / "run").exists()


def test_checkpointing_trains_end_to_end(tiny_llama, sentences, tmp_path):
    """The Trainer path: a checkpointed LoRA run lowers the loss like an ordinary one."""
    config = tiny_config(tiny_llama, sentences, tmp_path / "run", gradient_checkpointing=True, max_steps=10,
                         logging_steps=5, final_eval=False)
    train(config)
    losses = [entry["loss"] for entry in map(json.loads, (tmp_path / "run" / "log.jsonl").read_text().splitlines())
              if "loss" in entry]

    assert len(losses) == 2
    assert losses[1] < losses[0]


def test_atomic_saves_get_umask_permissions(tmp_path):
    import os
    import tempfile

    from peftlabs.runs import atomic_dir, write_json_atomic

    previous = os.umask(0o022)
    try:
        write_json_atomic(tmp_path / "metrics.json", {"accuracy": 1.0})
        with atomic_dir(tmp_path / "adapter") as staging:
            handle, _ = tempfile.mkstemp(dir=staging)  # private (0600), like a library's own atomic write
            os.close(handle)
    finally:
        os.umask(previous)

    assert (tmp_path / "metrics.json").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "adapter").stat().st_mode & 0o777 == 0o755
    assert [path.stat().st_mode & 0o777 for path in (tmp_path / "adapter").iterdir()] == [0o644]
