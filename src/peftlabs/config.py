"""Run settings: one dataclass, read from YAML, overridden by command-line flags.

A run's settings come from four layers, later ones winning: the field
defaults below, the method's own defaults (its learning rate), the YAML file
given with ``--config``, and the flags on the command line. The resolved
result is written to the run directory as ``config.yaml``, so that file alone
reproduces the run.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from peftlabs.errors import UserError

TASKS = ("auto", "causal_lm", "classification")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def _help(text: str, **kwargs) -> Any:
    return field(metadata={"help": text}, **kwargs)


@dataclass
class RunConfig:
    """Every setting of a training run except the method's hyperparameters."""

    # What to train.
    method: str = _help("PEFT method, see `peftlabs methods`", default="lora")
    model: str = _help(
        "base model: built-in alias, hub id, local directory or .gguf file",
        default="smollm2-135m-instruct",
    )
    task: str = _help("causal_lm, classification, or auto (from the model)", default="auto")
    trust_remote_code: bool = _help("run model code shipped with a hub model", default=False)

    # Data.
    dataset: str = _help("'demo', a local CSV/TSV/JSON/JSONL/Parquet file, or a hub id", default="demo")
    dataset_config: str | None = _help("hub dataset configuration name", default=None)
    train_split: str = _help("split to train on", default="train")
    eval_dataset: str | None = _help("separate file for evaluation (same format as --dataset)", default=None)
    eval_split: str | None = _help(
        "split to evaluate on; when missing, a slice of the training data is held out",
        default="validation",
    )
    test_split: str | None = _help("split for the final before/after score", default="test")
    eval_fraction: float = _help("share of training rows held out when there is no eval split", default=0.1)
    text_column: str | None = _help("classification: text column (detected when unambiguous)", default=None)
    text_pair_column: str | None = _help("classification: optional second text column", default=None)
    label_column: str | None = _help("classification: label column", default=None)
    prompt_column: str | None = _help("causal LM: prompt column", default=None)
    response_column: str | None = _help("causal LM: response column", default=None)
    labels: list[str] | None = _help("label set; default: the sorted labels of the training split", default=None)
    instruction: str | None = _help(
        "causal LM: system message put before every prompt; for a classification dataset "
        "on a causal LM, '{labels}' in it is replaced by the label list",
        default=None,
    )
    max_length: int = _help("truncate examples to this many tokens", default=256)
    max_train_samples: int | None = _help("use only the first N training rows (after shuffling)", default=None)
    max_eval_samples: int | None = _help("use only the first N evaluation rows", default=None)
    max_new_tokens: int = _help("causal LM: tokens generated per answer in evaluation", default=48)

    # Optimisation.
    epochs: float = _help("passes over the training data (ignored when max_steps > 0)", default=1.0)
    max_steps: int = _help("optimizer steps; -1 means use epochs", default=-1)
    batch_size: int = _help("examples per device per step", default=8)
    eval_batch_size: int = _help("examples per evaluation batch", default=16)
    gradient_accumulation_steps: int = _help("batches summed before each optimizer step", default=1)
    learning_rate: float | None = _help("peak learning rate; default: the method's", default=None)
    weight_decay: float = _help("AdamW weight decay", default=0.0)
    warmup_ratio: float = _help("share of steps with linear warm-up", default=0.0)
    lr_scheduler: str = _help("transformers scheduler name (linear, cosine, constant, ...)", default="linear")
    seed: int = _help("seed for data order and adapter initialisation", default=42)

    # Speed and hardware.
    device: str = _help("auto, cpu, cuda or mps", default="auto")
    precision: str = _help(
        "auto picks bf16 on GPUs and CPUs with native bf16 matrix units, else fp32", default="auto"
    )
    group_by_length: bool = _help("batch examples of similar length to cut padding", default=True)
    gradient_checkpointing: bool = _help("recompute activations in backward to save memory", default=False)
    shared_prefix: bool = _help(
        "compute the prompt tokens that begin every row of a batch (such as the system instruction) once "
        "per batch. On by default for causal LMs in one process. The loss is the same apart from LoRA "
        "dropout's mask. Not used for bottleneck adapters or prompt-learning methods",
        default=True,
    )
    dataloader_workers: int = _help("background processes that build batches", default=0)

    # Output.
    output_dir: str = _help("run directory to create", default="runs/lora-demo")
    overwrite: bool = _help("replace an existing run directory", default=False)
    resume: bool = _help("continue an interrupted run from its last checkpoint", default=False)
    save_steps: int = _help("save a resumable checkpoint every N steps", default=50)
    logging_steps: int = _help("log loss and throughput every N steps", default=10)
    eval_steps: int | None = _help(
        "also score the eval split every N steps during training: loss, plus accuracy and macro-F1 for classification",
        default=None)
    final_eval: bool = _help("score the eval split after training (by generation for causal LMs)", default=True)
    report_to: list[str] | None = _help(
        "experiment trackers that also log the run: tensorboard, mlflow (files inside the run directory)",
        default=None,
    )

    # Method hyperparameters: {method name: {field: value}}, checked by the method.
    method_args: dict[str, dict[str, Any]] = field(default_factory=dict, metadata={"help": "per-method settings"})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def config_fields() -> list[dataclasses.Field]:
    """Return the fields that can be set from YAML and the command line."""
    return [f for f in dataclasses.fields(RunConfig) if f.name != "method_args"]


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a run config file into a plain dict, with a clear error on bad YAML."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file not found: {path}: pass an existing YAML file to --config")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise UserError(f"config file {path} is not valid YAML: {str(error).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise UserError(f"config file {path} must hold a mapping of settings, found {type(data).__name__}")
    return data


def build_config(file_values: dict[str, Any], cli_values: dict[str, Any]) -> RunConfig:
    """Merge YAML values and command-line values into a RunConfig.

    Method hyperparameters live in a section named after the method
    (``lora: {r: 16}``) in YAML and as ``--lora.r 16`` on the command line.
    """
    from peftlabs.methods import method_names

    known = {f.name for f in config_fields()}
    values: dict[str, Any] = {}
    method_args: dict[str, dict[str, Any]] = {}

    # YAML first: top-level fields, then one section per method.
    for key, value in file_values.items():
        if key in known:
            values[key] = value
        elif key == "method_args" and isinstance(value, dict):
            # A resolved config.yaml written by an earlier run.
            for method, section in value.items():
                method_args.setdefault(method, {}).update(section or {})
        elif key in method_names():
            if not isinstance(value, dict):
                raise UserError(f"config section '{key}' must be a mapping of {key} settings")
            method_args.setdefault(key, {}).update(value)
        else:
            raise UserError(f"unknown config key '{key}': see `peftlabs train --help` for the settings")

    # Then the command line, which wins.
    for key, value in cli_values.items():
        if "." in key:
            method, name = key.split(".", 1)
            method_args.setdefault(method, {})[name] = value
        else:
            values[key] = value

    config = RunConfig(**values, method_args=method_args)
    validate(config)
    return config


def validate(config: RunConfig) -> None:
    """Reject settings that cannot work, before anything is loaded or written."""
    from peftlabs.methods import get_method

    get_method(config.method)
    if config.task not in TASKS:
        raise UserError(f"invalid task '{config.task}': use one of {', '.join(TASKS)}")
    if config.precision not in PRECISIONS:
        raise UserError(f"invalid precision '{config.precision}': use one of {', '.join(PRECISIONS)}")

    positive_ints = ["batch_size", "eval_batch_size", "gradient_accumulation_steps", "max_length",
                     "save_steps", "logging_steps", "max_new_tokens"]
    for name in positive_ints:
        value = getattr(config, name)
        if not isinstance(value, int) or value <= 0:
            raise UserError(f"invalid {name} {value!r}: it must be a positive integer")
    if config.learning_rate is not None and not config.learning_rate > 0:
        raise UserError(f"invalid learning_rate {config.learning_rate}: it must be greater than 0")
    if not config.epochs > 0 and config.max_steps <= 0:
        raise UserError(f"invalid epochs {config.epochs}: it must be greater than 0 (or set max_steps)")
    if config.max_steps == 0 or config.max_steps < -1:
        raise UserError(f"invalid max_steps {config.max_steps}: use a positive number, or -1 for epochs")
    if not 0 < config.eval_fraction < 1:
        raise UserError(f"invalid eval_fraction {config.eval_fraction}: it must be between 0 and 1")
    if not 0 <= config.warmup_ratio < 1:
        raise UserError(f"invalid warmup_ratio {config.warmup_ratio}: it must be in [0, 1)")
    if config.weight_decay < 0:
        raise UserError(f"invalid weight_decay {config.weight_decay}: it must be 0 or more")
    for name in ("max_train_samples", "max_eval_samples", "eval_steps"):
        value = getattr(config, name)
        if value is not None and (not isinstance(value, int) or value <= 0):
            raise UserError(f"invalid {name} {value!r}: it must be a positive integer")

    from peftlabs.tracking import check_trackers

    if isinstance(config.report_to, str):  # YAML may give one name or a comma-separated string
        config.report_to = [name.strip() for name in config.report_to.split(",") if name.strip()]
    check_trackers(config.report_to)
    method = get_method(config.method)
    if config.gradient_checkpointing and method.gradient_checkpointing_refusal:
        raise UserError(
            f"method '{config.method}' cannot train with gradient checkpointing: "
            f"{method.gradient_checkpointing_refusal}; pass --no-gradient-checkpointing"
        )

    # Method hyperparameters are checked by the method that owns them; settings of
    # another method would be ignored silently, so they are an error.
    for method_name, args in config.method_args.items():
        if method_name != config.method:
            raise UserError(
                f"settings for method '{method_name}' were given but the method is '{config.method}': "
                f"use --{config.method}.NAME flags or a '{config.method}:' section"
            )
        get_method(method_name).parse_params(args)


def write_yaml(config: RunConfig, path: Path) -> None:
    path.write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
