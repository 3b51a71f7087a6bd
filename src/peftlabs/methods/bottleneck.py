"""AdapterHub `adapters` library methods: Houlsby and Pfeiffer bottleneck adapters, and LoRA.

A bottleneck adapter is a small residual MLP, down-projection to
hidden/reduction_factor, nonlinearity, up-projection, inserted into every
layer while the model stays frozen. Houlsby et al. 2019 (arXiv:1902.00751)
put one after the attention block and one after the feed-forward block
(`DoubleSeqBnConfig`); Pfeiffer et al. 2021 (arXiv:2005.00247) keep only the
one after the feed-forward block (`SeqBnConfig`).

The `lora` variant uses the library's `LoRAConfig` instead: a low-rank update
(alpha / r)·B·A beside the chosen attention projections, as in peftlabs' peft-based
`lora` method. Unlike a bottleneck adapter it is linear, so it folds into the
weights with the library's own `merge_adapter`.

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


ATTENTION_MATRICES = ("q", "k", "v")


@dataclass
class BottleneckParams:
    variant: str = field(
        default="pfeiffer",
        metadata={"help": "pfeiffer (one bottleneck adapter per layer), houlsby (two) or lora (low-rank update)"},
    )
    reduction_factor: int = field(default=16, metadata={"help": "hidden size / bottleneck size (bottleneck variants)"})
    rank: int = field(default=8, metadata={"help": "rank r of the LoRA matrices A and B (lora variant)"})
    alpha: float = field(default=16.0, metadata={"help": "LoRA scaling numerator: the update is multiplied by "
                                                         "alpha/rank (lora variant)"})
    attn_matrices: list[str] = field(
        default_factory=lambda: ["q", "v"],
        metadata={"help": "attention projections that get LoRA, any of q, k, v (lora variant)"},
    )

    def validate(self) -> None:
        if self.variant not in ("pfeiffer", "houlsby", "lora"):
            raise UserError(f"invalid adapters.variant '{self.variant}': use pfeiffer, houlsby or lora")
        if self.reduction_factor <= 0:
            raise UserError(f"invalid adapters.reduction_factor {self.reduction_factor}: it must be positive")
        if self.rank <= 0:
            raise UserError(f"invalid adapters.rank {self.rank}: the rank must be a positive integer")
        if self.alpha <= 0:
            raise UserError(f"invalid adapters.alpha {self.alpha}: it must be greater than 0")
        unknown = [name for name in self.attn_matrices if name not in ATTENTION_MATRICES]
        if unknown or not self.attn_matrices:
            raise UserError(f"invalid adapters.attn_matrices {self.attn_matrices}: use one or more of q, k, v")


class BottleneckAdapters(Method):
    name = "adapters"
    trains = "bottleneck MLPs inserted in every layer (Houlsby: two, Pfeiffer: one), or LoRA matrices (lora)"
    library_class = "adapters.SeqBnConfig / adapters.DoubleSeqBnConfig / adapters.LoRAConfig"
    merge_summary = "lora variant only"
    merge_refusal = (
        "a bottleneck adapter adds a new block to every layer, a down-projection, a nonlinear activation "
        "and an up-projection on a residual branch; because of the activation between the two projections "
        "the block is not a linear map, so no change of the existing weight matrices can reproduce it "
        "(only the lora variant, --adapters.variant lora, can be merged)"
    )
    default_learning_rate = 1e-3
    Params = BottleneckParams

    def apply(self, model, task, params, head):
        import adapters

        self.check(model, task, params)
        adapters.init(model)
        model.add_adapter(ADAPTER_NAME, config=_adapter_config(params))
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

    def is_mergeable(self, params) -> bool:
        return params.variant == "lora"

    def merge(self, model):
        """Fold the LoRA update into the weights with `merge_adapter`, then return a plain transformers model.

        After `merge_adapter` the model still contains the library's wrapper
        layers and the (now unused) A and B matrices, so the merged weights are
        copied into a fresh instance of the original transformers class.
        """
        from adapters import LoRAConfig

        if not isinstance(model.adapters_config.get(ADAPTER_NAME), LoRAConfig):
            return super().merge(model)

        model.merge_adapter(ADAPTER_NAME)
        return _plain_copy(model)

    def trainable_parameter_formula(self, model, task, params):
        """Count bottleneck MLPs (weights and biases), or r·(d_in + d_out) per LoRA matrix, plus the head."""
        config = model.config
        hidden = config.hidden_size
        if params.variant == "lora":
            heads = config.num_attention_heads
            head_dim = getattr(config, "head_dim", None) or hidden // heads
            kv_heads = getattr(config, "num_key_value_heads", None) or heads
            out_features = {"q": heads * head_dim, "k": kv_heads * head_dim, "v": kv_heads * head_dim}
            per_layer = sum(params.rank * (hidden + out_features[name]) for name in params.attn_matrices)
        else:
            bottleneck = hidden // params.reduction_factor
            per_adapter = hidden * bottleneck + bottleneck + bottleneck * hidden + hidden
            per_layer = (2 if params.variant == "houlsby" else 1) * per_adapter
        head = getattr(model, "_peftlabs_head", None)
        head_size = sum(p.numel() for p in getattr(model, head).parameters()) if head else 0
        return config.num_hidden_layers * per_layer + head_size


def _adapter_config(params):
    from adapters import DoubleSeqBnConfig, LoRAConfig, SeqBnConfig

    if params.variant == "lora":
        return LoRAConfig(r=params.rank, alpha=params.alpha, attn_matrices=list(params.attn_matrices),
                          selfattn_lora=True, intermediate_lora=False, output_lora=False)
    config_class = DoubleSeqBnConfig if params.variant == "houlsby" else SeqBnConfig
    return config_class(reduction_factor=params.reduction_factor)


def _plain_copy(model):
    """Copy the weights of a model prepared by `adapters.init` into its original transformers class.

    `adapters.init` swaps the model's class for a subclass and wraps layers,
    so the nearest transformers class in the class hierarchy is the plain
    model. Keys that only the adapter added (A, B, gates) are left out, and
    every key of the plain model must be present.
    """
    import copy

    plain_class = next(c for c in type(model).__mro__ if c.__module__.startswith("transformers.models."))
    config = copy.deepcopy(model.config)
    for attribute in ("adapters", "adapters_config"):
        if hasattr(config, attribute):
            delattr(config, attribute)
    # NOTE: this initialises random weights that load_state_dict then replaces, which costs
    # seconds on SmolLM2-size models and more on larger ones.
    plain = plain_class(config)

    merged_state = model.state_dict()
    plain_keys = set(plain.state_dict())
    missing = sorted(plain_keys - set(merged_state))
    if missing:
        raise RuntimeError(f"merged adapters model lacks weights of {plain_class.__name__}: {missing[:5]}")
    plain.load_state_dict({key: merged_state[key] for key in plain_keys}, strict=True)
    plain.tie_weights()
    if getattr(model, "generation_config", None) is not None:
        # The cache is off only to work around the bottleneck-adapter bug (see below); the plain model needs it on.
        plain.generation_config = copy.deepcopy(model.generation_config)
        plain.generation_config.use_cache = True
    plain.eval()
    return plain


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
