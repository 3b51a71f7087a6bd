"""LoRA: a trainable low-rank update B·A added to frozen weight matrices.

For a frozen weight W (d_out × d_in), LoRA learns A (r × d_in) and
B (d_out × r) and uses W + (alpha / r)·B·A; B starts at zero so training
starts from the base model (Hu et al. 2021, arXiv:2106.09685). rsLoRA scales
by alpha / sqrt(r) instead; DoRA adds a trainable magnitude per output unit.
The update folds into W after training, so merged inference costs nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from peftlabs.errors import UserError
from peftlabs.methods.base import PeftMethod, head_modules, head_parameter_count, peft_task_type
from peftlabs.models import lora_target_modules


@dataclass
class LoraParams:
    r: int = field(default=8, metadata={"help": "rank of the update matrices A and B"})
    alpha: float = field(default=16.0, metadata={"help": "scaling numerator: the update is multiplied by alpha/r"})
    dropout: float = field(default=0.05, metadata={"help": "dropout on the LoRA input"})
    target_modules: list[str] | None = field(
        default=None,
        metadata={"help": "module names to adapt, or 'all-linear'; default: attention and MLP projections"},
    )
    layers_to_transform: list[int] | None = field(
        default=None,
        metadata={"help": "indices of the transformer layers to adapt; default: all. Adapting only the top "
                          "layers also stops backpropagation there, which makes each step cheaper"},
    )
    bias: str = field(default="none", metadata={"help": "train biases too: none, all or lora_only"})
    use_dora: bool = field(default=False, metadata={"help": "DoRA: learn a magnitude vector per output"})
    use_rslora: bool = field(default=False, metadata={"help": "rsLoRA: scale by alpha/sqrt(r)"})

    def validate(self) -> None:
        if self.r <= 0:
            raise UserError(f"invalid lora.r {self.r}: the rank must be a positive integer")
        if self.alpha <= 0:
            raise UserError(f"invalid lora.alpha {self.alpha}: it must be greater than 0")
        if not 0 <= self.dropout < 1:
            raise UserError(f"invalid lora.dropout {self.dropout}: it must be in [0, 1)")
        if self.layers_to_transform is not None and any(index < 0 for index in self.layers_to_transform):
            raise UserError(f"invalid lora.layers_to_transform {self.layers_to_transform}: indices start at 0")
        if self.bias not in ("none", "all", "lora_only"):
            raise UserError(f"invalid lora.bias '{self.bias}': use none, all or lora_only")


class Lora(PeftMethod):
    name = "lora"
    trains = "low-rank update matrices A, B beside chosen linear layers"
    library_class = "peft.LoraConfig"
    mergeable = True
    default_learning_rate = 2e-4
    Params = LoraParams

    def peft_config(self, model, task, params, head):
        from peft import LoraConfig

        targets = params.target_modules or lora_target_modules(model)
        if targets == ["all-linear"]:
            targets = "all-linear"
        return LoraConfig(
            task_type=peft_task_type(task),
            r=params.r,
            lora_alpha=params.alpha,
            lora_dropout=params.dropout,
            target_modules=targets,
            bias=params.bias,
            layers_to_transform=params.layers_to_transform,
            use_dora=params.use_dora,
            use_rslora=params.use_rslora,
            modules_to_save=head_modules(head),
        )

    def trainable_parameter_formula(self, model, task, params):
        """r·(d_in + d_out) per adapted matrix, plus d_out for DoRA's magnitude, plus the head."""
        from peft.tuners.lora import LoraLayer

        if params.bias != "none":
            return None
        total = 0
        for module in model.modules():
            if isinstance(module, LoraLayer):
                total += params.r * (module.in_features + module.out_features)
                if params.use_dora:
                    total += module.out_features
        return total + head_parameter_count(model)
