"""The method interface, and the shared code of the peft-backed methods."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Any, ClassVar

import torch

from peftlabs.errors import UserError


class Method:
    """One PEFT method: how to attach it to a base model, save, load and merge it.

    A method is a subclass with the class attributes below and a ``Params``
    dataclass of its hyperparameters; each field's ``help`` metadata becomes
    the help text of its command-line flag.
    """

    name: ClassVar[str]
    trains: ClassVar[str]  # what the method trains, in a few words
    library_class: ClassVar[str]
    tasks: ClassVar[tuple[str, ...]] = ("causal_lm", "classification")
    mergeable: ClassVar[bool] = False
    merge_summary: ClassVar[str | None] = None  # shown by `peftlabs methods` when mergeability depends on settings
    merge_refusal: ClassVar[str] = ""  # why merging does not apply, in terms of what the method adds to the network
    default_learning_rate: ClassVar[float] = 2e-4
    gradient_checkpointing_refusal: ClassVar[str] = ""  # why checkpointing is rejected, when it is
    Params: ClassVar[type]

    @classmethod
    def parse_params(cls, values: dict[str, Any] | None) -> Any:
        """Build ``Params`` from a dict, rejecting unknown keys and bad types."""
        values = dict(values or {})
        fields = {f.name: f for f in dataclasses.fields(cls.Params)}
        hints = typing.get_type_hints(cls.Params)
        for key in values:
            if key not in fields:
                known = ", ".join(fields)
                raise UserError(f"unknown {cls.name} setting '{key}': known settings are {known}")
        for key, value in values.items():
            values[key] = _coerce(f"{cls.name}.{key}", value, hints[key])
        params = cls.Params(**values)
        if hasattr(params, "validate"):
            params.validate()
        return params

    def load_base(self, location: str, task: str, labels, tokenizer, params: Any, trust_remote_code: bool = False):
        """Load the frozen base model for this method (fp32 unless the method overrides this)."""
        from peftlabs.models import load_base_model

        return load_base_model(location, task, labels, tokenizer, trust_remote_code=trust_remote_code)

    def check(self, model: torch.nn.Module, task: str, params: Any) -> None:
        """Raise UserError when this method cannot run on this model and task."""
        if task not in self.tasks:
            supported = " and ".join(self.tasks)
            raise UserError(f"method '{self.name}' supports {supported}, not {task}: choose another --method")

    def apply(self, model: torch.nn.Module, task: str, params: Any, head: str | None) -> torch.nn.Module:
        raise NotImplementedError

    def save(self, model: torch.nn.Module, directory: Path) -> None:
        raise NotImplementedError

    def load(self, base: torch.nn.Module, directory: Path, task: str) -> torch.nn.Module:
        raise NotImplementedError

    def is_mergeable(self, params: Any) -> bool:
        """Whether a run with these settings can be folded into the base weights."""
        return self.mergeable

    def merge(self, model: torch.nn.Module) -> torch.nn.Module:
        raise UserError(f"method '{self.name}' cannot be merged: {self.merge_refusal}")

    def trainable_parameter_formula(self, model: torch.nn.Module, task: str, params: Any) -> int | None:
        """Count the trainable parameters from the architecture alone, or None if unknown."""
        return None


def _coerce(name: str, value: Any, hint: Any) -> Any:
    """Convert a YAML or command-line value to the field's declared type."""
    origin = typing.get_origin(hint)
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if value is None:
        return None
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)) and args:
        errors = []
        for candidate in args:
            try:
                return _coerce(name, value, candidate)
            except UserError as error:
                errors.append(str(error))
        raise UserError(errors[0])
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise UserError(f"invalid {name} {value!r}: use true or false")
    if hint is int:
        if isinstance(value, bool):
            raise UserError(f"invalid {name} {value!r}: it must be an integer")
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise UserError(f"invalid {name} {value!r}: it must be an integer") from None
        if number != int(number):
            raise UserError(f"invalid {name} {value!r}: it must be an integer")
        return int(number)
    if hint is float:
        try:
            return float(value)
        except (TypeError, ValueError):
            raise UserError(f"invalid {name} {value!r}: it must be a number") from None
    if hint is str:
        return str(value)
    if origin is list:
        if isinstance(value, str):
            value = [part.strip() for part in value.split(",") if part.strip()]
        if not isinstance(value, list):
            raise UserError(f"invalid {name} {value!r}: it must be a list")
        item_type = (typing.get_args(hint) or (str,))[0]
        return [_coerce(name, item, item_type) for item in value]
    return value


class PeftMethod(Method):
    """A method implemented by a peft config: save, load and merge go through peft."""

    def peft_config(self, model: torch.nn.Module, task: str, params: Any, head: str | None):
        raise NotImplementedError

    def apply(self, model, task, params, head):
        from peft import get_peft_model

        self.check(model, task, params)
        return get_peft_model(model, self.peft_config(model, task, params, head))

    def save(self, model, directory):
        model.save_pretrained(str(directory), safe_serialization=True)

    def load(self, base, directory, task):
        from peft import PeftModel

        return PeftModel.from_pretrained(base, str(directory), is_trainable=False)

    def merge(self, model):
        if not self.mergeable:
            return super().merge(model)
        return model.merge_and_unload()


def peft_task_type(task: str):
    from peft import TaskType

    return TaskType.CAUSAL_LM if task == "causal_lm" else TaskType.SEQ_CLS


def head_parameter_count(model: torch.nn.Module) -> int:
    """Parameters of the classification head, which every method trains in full."""
    from peftlabs.models import HEAD_NAMES

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    for name in HEAD_NAMES:
        module = getattr(base, name, None)
        if isinstance(module, torch.nn.Module):
            module = getattr(module, "original_module", module)  # peft's modules_to_save wrapper
            return sum(p.numel() for p in module.parameters())
    return 0


def prompt_token_dim(model: torch.nn.Module) -> tuple[int, int, int]:
    """(virtual tokens, token dimension, layers) as peft resolved them for a prompt-learning model."""
    config = model.active_peft_config
    return config.num_virtual_tokens, config.token_dim, config.num_layers


def head_modules(head: str | None) -> list[str] | None:
    """Modules trained and saved in full beside the adapter: the classification head."""
    return [head] if head else None
