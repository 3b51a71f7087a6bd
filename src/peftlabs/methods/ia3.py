"""(IA)³: learned vectors that rescale keys, values and feed-forward activations.

For each targeted layer, (IA)³ multiplies an activation elementwise by a
trained vector initialised to ones: the key and value projections' outputs,
and the input of the feed-forward output projection (Liu et al. 2022,
arXiv:2205.05638). The vectors fold into the weight matrices after training.
Targets default to peft's per-architecture choice: k_proj, v_proj and
down_proj for the Llama family, key, value and output.dense for BERT.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from peftlabs.methods.base import PeftMethod, head_modules, head_parameter_count, peft_task_type


@dataclass
class Ia3Params:
    target_modules: list[str] | None = field(
        default=None, metadata={"help": "modules whose activations are rescaled; default: peft's per-architecture map"}
    )
    feedforward_modules: list[str] | None = field(
        default=None,
        metadata={"help": "targets whose input (not output) is rescaled; must be a subset of target_modules"},
    )


class Ia3(PeftMethod):
    name = "ia3"
    trains = "scaling vectors on keys, values and feed-forward inputs"
    library_class = "peft.IA3Config"
    mergeable = True
    default_learning_rate = 3e-3
    Params = Ia3Params

    def peft_config(self, model, task, params, head):
        from peft import IA3Config

        return IA3Config(
            task_type=peft_task_type(task),
            target_modules=params.target_modules,
            feedforward_modules=params.feedforward_modules,
            modules_to_save=head_modules(head),
        )

    def trainable_parameter_formula(self, model, task, params):
        """Count one value per input feature of feed-forward targets and per output feature of the others."""
        from peft.tuners.ia3 import IA3Layer

        total = 0
        for module in model.modules():
            if isinstance(module, IA3Layer):
                total += module.in_features if module.is_feedforward else module.out_features
        return total + head_parameter_count(model)
