"""Prompt tuning: trainable embeddings of virtual tokens put before the input.

Only a (virtual tokens × hidden size) matrix is trained; every model weight
stays frozen (Lester et al. 2021, arXiv:2104.08691). Initialising the
virtual tokens from the embeddings of a text such as a task description
trains faster than random initialisation on small models.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from peftlabs.errors import UserError
from peftlabs.methods.base import PeftMethod, head_modules, head_parameter_count, peft_task_type, prompt_token_dim

PROMPT_REFUSAL = (
    "prompt tuning and P-tuning add trained embeddings of virtual tokens in front of the input "
    "sequence, which every layer then attends to; they are extra inputs, not a change to any weight "
    "matrix, so there is no weight they could be folded into"
)


@dataclass
class PromptTuningParams:
    num_virtual_tokens: int = field(default=20, metadata={"help": "number of trainable virtual tokens"})
    init: str = field(default="text", metadata={"help": "initialise the virtual tokens from 'text' or 'random'"})
    init_text: str = field(
        default="Read the text and answer with its category:",
        metadata={"help": "text whose token embeddings initialise the virtual tokens (init: text)"},
    )

    def validate(self) -> None:
        if self.num_virtual_tokens <= 0:
            raise UserError(f"invalid prompt_tuning.num_virtual_tokens {self.num_virtual_tokens}: it must be positive")
        if self.init not in ("text", "random"):
            raise UserError(f"invalid prompt_tuning.init '{self.init}': use text or random")


class PromptTuning(PeftMethod):
    name = "prompt_tuning"
    trains = "embeddings of virtual tokens prepended to the input"
    library_class = "peft.PromptTuningConfig"
    merge_refusal = PROMPT_REFUSAL
    default_learning_rate = 3e-2
    Params = PromptTuningParams

    def peft_config(self, model, task, params, head):
        from peft import PromptTuningConfig, PromptTuningInit

        text_init = params.init == "text"
        return PromptTuningConfig(
            task_type=peft_task_type(task),
            num_virtual_tokens=params.num_virtual_tokens,
            prompt_tuning_init=PromptTuningInit.TEXT if text_init else PromptTuningInit.RANDOM,
            prompt_tuning_init_text=params.init_text if text_init else None,
            tokenizer_name_or_path=model.name_or_path if text_init else None,
            modules_to_save=head_modules(head),
        )

    def trainable_parameter_formula(self, model, task, params):
        """virtual tokens × embedding size, plus the head."""
        tokens, dim, _ = prompt_token_dim(model)
        return tokens * dim + head_parameter_count(model)
