"""P-tuning: virtual-token embeddings produced by a small trainable encoder.

Like prompt tuning, P-tuning (Liu et al. 2021, arXiv:2103.10385) adds
virtual tokens at the input, but their embeddings come from a prompt encoder
(an MLP or a bidirectional LSTM) that models dependencies between them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from peftlabs.errors import UserError
from peftlabs.methods.base import PeftMethod, head_modules, head_parameter_count, peft_task_type, prompt_token_dim
from peftlabs.methods.prompt_tuning import PROMPT_REFUSAL


@dataclass
class PTuningParams:
    num_virtual_tokens: int = field(default=20, metadata={"help": "number of virtual tokens"})
    encoder: str = field(default="MLP", metadata={"help": "prompt encoder: MLP or LSTM"})
    encoder_hidden_size: int = field(default=128, metadata={"help": "hidden size of the prompt encoder"})

    def validate(self) -> None:
        if self.num_virtual_tokens <= 0:
            raise UserError(f"invalid p_tuning.num_virtual_tokens {self.num_virtual_tokens}: it must be positive")
        if self.encoder.upper() not in ("MLP", "LSTM"):
            raise UserError(f"invalid p_tuning.encoder '{self.encoder}': use MLP or LSTM")
        if self.encoder_hidden_size <= 0:
            raise UserError(f"invalid p_tuning.encoder_hidden_size {self.encoder_hidden_size}: it must be positive")


class PTuning(PeftMethod):
    name = "p_tuning"
    trains = "a prompt encoder (MLP or LSTM) that produces virtual-token embeddings"
    library_class = "peft.PromptEncoderConfig"
    merge_refusal = PROMPT_REFUSAL
    default_learning_rate = 1e-2
    Params = PTuningParams

    def peft_config(self, model, task, params, head):
        from peft import PromptEncoderConfig

        return PromptEncoderConfig(
            task_type=peft_task_type(task),
            num_virtual_tokens=params.num_virtual_tokens,
            encoder_reparameterization_type=params.encoder.upper(),
            encoder_hidden_size=params.encoder_hidden_size,
            modules_to_save=head_modules(head),
        )

    def trainable_parameter_formula(self, model, task, params):
        """Virtual-token embeddings plus the prompt encoder (peft's MLP or 2-layer bidirectional LSTM + MLP)."""
        tokens, dim, _ = prompt_token_dim(model)
        hidden = params.encoder_hidden_size
        if params.encoder.upper() == "MLP":
            encoder = (dim * hidden + hidden) + (hidden * hidden + hidden) + (hidden * dim + dim)
        else:
            lstm_first = 2 * 4 * (dim * hidden + hidden * hidden + 2 * hidden)
            lstm_second = 2 * 4 * (2 * hidden * hidden + hidden * hidden + 2 * hidden)
            mlp = (2 * hidden * 2 * hidden + 2 * hidden) + (2 * hidden * dim + dim)
            encoder = lstm_first + lstm_second + mlp
        return tokens * dim + encoder + head_parameter_count(model)
