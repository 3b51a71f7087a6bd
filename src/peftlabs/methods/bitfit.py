"""BitFit: train only the bias terms (and the classification head).

Every weight matrix stays frozen; only the additive bias vectors change
(Ben Zaken et al. 2022, arXiv:2106.10199). The adapter file contains just those
tensors and is applied by copying them into a fresh base model, so a
"merged" BitFit model is simply the base with its biases replaced.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch
from safetensors.torch import load_file, save_file

from peftlabs.errors import UserError
from peftlabs.methods.base import Method

WEIGHTS_FILE = "bitfit_model.safetensors"
CONFIG_FILE = "bitfit_config.json"


@dataclass
class BitFitParams:
    pass


class BitFit(Method):
    name = "bitfit"
    trains = "bias terms only (plus the classification head)"
    library_class = "torch (bias parameters; no peft class)"
    mergeable = True
    default_learning_rate = 1e-3
    Params = BitFitParams

    def check(self, model, task, params):
        super().check(model, task, params)
        if model is None:
            return
        if not _bias_names(model):
            raise UserError(
                f"method 'bitfit' trains bias terms, but this {model.config.model_type} model has none "
                f"(Llama-family models such as SmolLM2 are built without biases): use a model with biases, "
                f"such as BERT/MiniLM (minilm-l6), RoBERTa or GPT-2"
            )

    def apply(self, model, task, params, head):
        self.check(model, task, params)
        trainable = set(_bias_names(model))
        for name, parameter in model.named_parameters():
            is_head = head is not None and name.startswith(f"{head}.")
            parameter.requires_grad = name in trainable or is_head
        model._peftlabs_head = head
        return model

    def save(self, model, directory):
        tensors = {name: p.detach().contiguous().cpu() for name, p in model.named_parameters() if p.requires_grad}
        save_file(tensors, str(directory / WEIGHTS_FILE))
        (directory / CONFIG_FILE).write_text(json.dumps({"method": self.name, "tensors": sorted(tensors)}, indent=2))

    def load(self, base, directory, task):
        path = directory / WEIGHTS_FILE
        if not path.is_file():
            raise UserError(f"{directory} has no {WEIGHTS_FILE}: it is not a BitFit adapter")
        tensors = load_file(str(path))
        parameters = dict(base.named_parameters())
        for name, value in tensors.items():
            if name not in parameters or parameters[name].shape != value.shape:
                raise UserError(f"BitFit tensor '{name}' does not fit this base model: pass the run's base model")
            with torch.no_grad():
                parameters[name].copy_(value)
        return base

    def merge(self, model):
        # The trained biases already live in the model's own parameters.
        return model

    def trainable_parameter_formula(self, model, task, params):
        head = getattr(model, "_peftlabs_head", None)
        biases = sum(p.numel() for n, p in model.named_parameters() if n.endswith("bias")
                     and not (head and n.startswith(f"{head}.")))
        head_size = sum(p.numel() for p in getattr(model, head).parameters()) if head else 0
        return biases + head_size


def _bias_names(model) -> list[str]:
    return [name for name, _ in model.named_parameters() if name.endswith("bias")]
