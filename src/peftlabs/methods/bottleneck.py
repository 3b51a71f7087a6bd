"""Bottleneck adapters (AdapterHub `adapters` library): Houlsby and Pfeiffer.

A bottleneck adapter is a small residual MLP, down-projection to
hidden/reduction_factor, nonlinearity, up-projection, inserted into every
layer while the model stays frozen. Houlsby et al. 2019 (arXiv:1902.00751)
put one after the attention block and one after the feed-forward block
(`DoubleSeqBnConfig`); Pfeiffer et al. 2021 (arXiv:2005.00247) keep only the
one after the feed-forward block (`SeqBnConfig`).

The adapter is saved and reloaded with the library's own `save_adapter` /
`load_adapter` (safetensors). The classification head is the transformers
model's own head, saved beside it as `head.safetensors`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from safetensors.torch import load_file, save_file

from peftlabs.errors import UserError
from peftlabs.methods.base import Method

ADAPTER_NAME = "peftlabs"
HEAD_FILE = "head.safetensors"


@dataclass
class BottleneckParams:
    variant: str = field(default="pfeiffer", metadata={"help": "pfeiffer (one adapter per layer) or houlsby (two)"})
    reduction_factor: int = field(default=16, metadata={"help": "hidden size / bottleneck size"})

    def validate(self) -> None:
        if self.variant not in ("pfeiffer", "houlsby"):
            raise UserError(f"invalid adapters.variant '{self.variant}': use pfeiffer or houlsby")
        if self.reduction_factor <= 0:
            raise UserError(f"invalid adapters.reduction_factor {self.reduction_factor}: it must be positive")


class BottleneckAdapters(Method):
    name = "adapters"
    trains = "bottleneck MLPs inserted in every layer (Houlsby: two, Pfeiffer: one)"
    library_class = "adapters.SeqBnConfig / adapters.DoubleSeqBnConfig"
    merge_refusal = (
        "a bottleneck adapter is a new nonlinear block (down-projection, activation, up-projection) "
        "inside each layer, which no change of the existing weights can express; deploy the base model "
        "with the adapter attached (`peftlabs infer --run ...` loads both)"
    )
    default_learning_rate = 1e-3
    Params = BottleneckParams

    def apply(self, model, task, params, head):
        import adapters
        from adapters import DoubleSeqBnConfig, SeqBnConfig

        self.check(model, task, params)
        config_class = DoubleSeqBnConfig if params.variant == "houlsby" else SeqBnConfig
        adapters.init(model)
        model.add_adapter(ADAPTER_NAME, config=config_class(reduction_factor=params.reduction_factor))
        model.train_adapter(ADAPTER_NAME)
        if head:
            # train_adapter freezes everything else, including the new head.
            for parameter in getattr(model, head).parameters():
                parameter.requires_grad = True
        model._peftlabs_head = head
        _disable_generation_cache(model)
        return model

    def save(self, model, directory):
        model.save_adapter(str(directory), ADAPTER_NAME, use_safetensors=True)
        head = getattr(model, "_peftlabs_head", None)
        if head:
            tensors = {name: p.detach().contiguous().cpu() for name, p in getattr(model, head).state_dict().items()}
            save_file(tensors, str(directory / HEAD_FILE))

    def load(self, base, directory, task):
        import adapters

        adapters.init(base)
        base.load_adapter(str(directory), load_as=ADAPTER_NAME, set_active=True, use_safetensors=True)
        head_file = directory / HEAD_FILE
        if head_file.is_file():
            from peftlabs.models import classification_head_name

            head = classification_head_name(base)
            getattr(base, head).load_state_dict(load_file(str(head_file)))
        _disable_generation_cache(base)
        base.eval()
        return base

    def trainable_parameter_formula(self, model, task, params):
        hidden = model.config.hidden_size
        bottleneck = hidden // params.reduction_factor
        per_adapter = hidden * bottleneck + bottleneck + bottleneck * hidden + hidden
        per_layer = 2 if params.variant == "houlsby" else 1
        head = getattr(model, "_peftlabs_head", None)
        head_size = sum(p.numel() for p in getattr(model, head).parameters()) if head else 0
        return model.config.num_hidden_layers * per_layer * per_adapter + head_size


def _disable_generation_cache(model) -> None:
    """Generate without the key/value cache for causal LMs with bottleneck adapters.

    NOTE: with adapters 1.3.0 and transformers 4.57.6, cached decoding of a
    Llama model with bottleneck adapters repeats the first generated token
    ("animal animal animal"), while the same model without the cache
    answers correctly. Without the cache every new token recomputes the whole
    sequence, so generation is slower for long answers.
    """
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None:
        generation_config.use_cache = False
