"""Prefix tuning: trainable key/value vectors prepended in every attention layer.

Each layer attends to ``num_virtual_tokens`` extra key/value pairs that are
trained while the model stays frozen (Li and Liang 2021, arXiv:2101.00190).
With ``prefix_projection`` the prefixes are produced by a two-layer MLP from
a smaller embedding during training, which the paper found more stable; the
MLP's output is what matters at inference.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from peftlabs.errors import UserError
from peftlabs.methods.base import PeftMethod, head_modules, head_parameter_count, peft_task_type, prompt_token_dim

PREFIX_REFUSAL = (
    "prefix tuning and P-tuning v2 add trained key and value vectors to the attention of every layer, "
    "so each query also attends to those extra positions; the attention softmax then runs over a longer "
    "sequence, which no change of the existing projection weights can reproduce"
)

# transformers 4.57's GradientCheckpointingLayer sets past_key_values to None in
# every checkpointed layer during training, and the prefix methods pass their
# prefix as past_key_values, so the prefix would be dropped without an error.
PREFIX_CHECKPOINTING_REFUSAL = (
    "transformers' checkpointed layers drop past_key_values, which carry the prefix, "
    "so the prefix would get no gradient"
)


@dataclass
class PrefixTuningParams:
    num_virtual_tokens: int = field(default=20, metadata={"help": "prefix length: key/value pairs per layer"})
    prefix_projection: bool = field(default=True, metadata={"help": "produce the prefix with a two-layer MLP"})
    encoder_hidden_size: int = field(default=512, metadata={"help": "hidden size of that MLP"})

    def validate(self) -> None:
        if self.num_virtual_tokens <= 0:
            raise UserError(f"invalid num_virtual_tokens {self.num_virtual_tokens}: it must be positive")
        if self.encoder_hidden_size <= 0:
            raise UserError(f"invalid encoder_hidden_size {self.encoder_hidden_size}: it must be positive")


class PrefixTuning(PeftMethod):
    name = "prefix_tuning"
    trains = "key/value prefixes in every attention layer (optionally through an MLP)"
    library_class = "peft.PrefixTuningConfig"
    merge_refusal = PREFIX_REFUSAL
    gradient_checkpointing_refusal = PREFIX_CHECKPOINTING_REFUSAL
    # 1e-2 made the MLP-produced prefixes swamp attention on MiniLM: every input got the same
    # representation and the loss stayed at ln(5) for 40 steps; 1e-3 learned (0.62 accuracy).
    default_learning_rate = 1e-3
    Params = PrefixTuningParams

    def peft_config(self, model, task, params, head):
        from peft import PrefixTuningConfig

        return PrefixTuningConfig(
            task_type=peft_task_type(task),
            num_virtual_tokens=params.num_virtual_tokens,
            prefix_projection=params.prefix_projection,
            encoder_hidden_size=params.encoder_hidden_size,
            modules_to_save=head_modules(head),
        )

    def trainable_parameter_formula(self, model, task, params):
        """Without projection: tokens × layers × 2 (key and value) × dim. With it: an embedding and a 2-layer MLP."""
        tokens, dim, layers = prompt_token_dim(model)
        outputs = layers * 2 * dim
        if not params.prefix_projection:
            return tokens * outputs + head_parameter_count(model)
        hidden = params.encoder_hidden_size
        mlp = dim * hidden + hidden + hidden * outputs + outputs
        return tokens * dim + mlp + head_parameter_count(model)


KEY_NAMES = ("k_proj", "key")      # Llama-family and BERT-family attention
VALUE_NAMES = ("v_proj", "value")


def init_prefix_from_vocabulary(model, tokens=None) -> None:
    """Set a prefix without projection to the frozen model's keys and values for vocabulary tokens.

    ``tokens`` ([1, num_virtual_tokens] ids) defaults to random ones, drawn
    with torch's global generator, which the run's seed sets. The keys are
    taken at the key projection's output, before any rotary position encoding.
    """
    import torch

    config = model.active_peft_config
    base = model.get_base_model()
    weight = model.prompt_encoder[model.active_adapter].embedding.weight
    projections = [(name, module) for name, module in base.named_modules()
                   if name.rsplit(".", 1)[-1] in KEY_NAMES + VALUE_NAMES]
    kinds = [name.rsplit(".", 1)[-1] in KEY_NAMES for name, _ in projections]
    if len(projections) != 2 * config.num_layers or kinds != [True, False] * config.num_layers:
        raise UserError(
            f"init 'vocabulary' failed: this model does not have key and value projections named {KEY_NAMES} "
            f"and {VALUE_NAMES} in each of its {config.num_layers} layers; use init 'random'"
        )

    # One forward pass of the frozen model over random tokens, keeping every projection's output.
    if tokens is None:
        tokens = torch.randint(base.config.vocab_size, (1, config.num_virtual_tokens), device=weight.device)
    outputs = {}
    hooks = [module.register_forward_hook(lambda module, args, output, name=name: outputs.__setitem__(name, output))
             for name, module in projections]
    try:
        with torch.no_grad():
            base(input_ids=tokens, attention_mask=torch.ones_like(tokens))  # the base alone: no prefix yet
    finally:
        for hook in hooks:
            hook.remove()

    # peft reads each prefix row as [layer 0 key, layer 0 value, layer 1 key, ...].
    per_layer = [outputs[name][0] for name, _ in projections]
    with torch.no_grad():
        weight.copy_(torch.cat(per_layer, dim=-1).to(weight.dtype))
