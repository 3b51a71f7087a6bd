"""Full fine-tuning: every weight of the base model is trained.

This is the baseline that PEFT methods are measured against, not a PEFT
method: it is reachable as ``--method full`` but is not listed by
``peftlabs methods``. The "adapter" it saves is the whole model's state
(safetensors), so its size on disk is the size of the model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from safetensors.torch import load_model, save_model

from peftlabs.errors import UserError
from peftlabs.methods.base import Method

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "full_config.json"


@dataclass
class FullParams:
    pass


class FullFineTuning(Method):
    name = "full"
    trains = "every weight of the base model (baseline, not a PEFT method)"
    library_class = "torch (all parameters; no peft class)"
    mergeable = True
    # A common full fine-tuning rate for BERT-sized models (Devlin et al. 2019 searched 2e-5 to 5e-5).
    default_learning_rate = 5e-5
    Params = FullParams

    def apply(self, model, task, params, head):
        self.check(model, task, params)
        for parameter in model.parameters():
            parameter.requires_grad = True
        return model

    def save(self, model, directory):
        # save_model stores tied weights (SmolLM2's embeddings and output layer) once.
        save_model(model, str(directory / WEIGHTS_FILE))
        (directory / CONFIG_FILE).write_text(json.dumps({"method": self.name}, indent=2))

    def load(self, base, directory, task):
        path = directory / WEIGHTS_FILE
        if not path.is_file():
            raise UserError(f"{directory} has no {WEIGHTS_FILE}: it is not a full fine-tuning run")
        load_model(base, str(path))
        return base

    def merge(self, model):
        # The trained weights are the model's own weights.
        return model

    def trainable_parameter_formula(self, model, task, params):
        return sum(parameter.numel() for parameter in model.parameters())
