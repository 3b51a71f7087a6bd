"""Load a finished run (base model + adapter) and answer or classify inputs.

    peftlabs infer --run runs/lora-demo --text "My card was charged twice for one order"
    peftlabs infer --run runs/lora-demo --input tickets.txt --output answers.jsonl
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from peftlabs import runs
from peftlabs.config import RunConfig
from peftlabs.data import TaskData
from peftlabs.errors import UserError
from peftlabs.evaluate import classify, generate
from peftlabs.methods import get_method
from peftlabs.models import base_fingerprint, load_tokenizer, read_model_config, resolve_model

log = logging.getLogger("peftlabs")


@dataclass
class LoadedRun:
    info: dict[str, Any]
    config: RunConfig
    method: Any
    params: Any
    tokenizer: Any
    base: torch.nn.Module
    model: torch.nn.Module  # base with the adapter attached, in eval mode

    @property
    def task_data(self) -> TaskData:
        """A TaskData without splits, carrying what evaluation needs to know."""
        return TaskData(self.info["task"], None, None, None, self.info["labels"], self.info["instruction"],
                        self.info["generative_classification"])


def load_run(run_dir: str | Path, model: str | None = None) -> LoadedRun:
    """Rebuild the base model of a run and attach its adapter.

    ``model`` overrides the recorded base model (for example the same model at
    another path); the adapter is rejected unless the new base has the same
    architecture and embeddings as the one it was trained on.
    """
    run_dir = Path(run_dir)
    info, config, method, params = read_run_config(run_dir)

    location = resolve_model(model or config.model)
    read_model_config(location, config.trust_remote_code)
    tokenizer = load_tokenizer(location, config.trust_remote_code)
    base = method.load_base(location, info["task"], info["labels"], tokenizer, params, config.trust_remote_code)

    fingerprint = base_fingerprint(base)
    if fingerprint != info["base_fingerprint"]:
        raise UserError(
            f"adapter in {run_dir} was trained on base model '{info['model']}', which differs from "
            f"'{model or config.model}' (architecture or weights): pass --model {info['model']}"
        )
    attached = method.load(base, run_dir / runs.ADAPTER_DIR, info["task"])
    attached.eval()
    return LoadedRun(info, config, method, params, tokenizer, base, attached)


def read_run_config(run_dir: Path) -> tuple[dict[str, Any], RunConfig, Any, Any]:
    """Read a finished run's run.json and config.yaml: (info, config, method, method params)."""
    import yaml

    info = runs.read_run(run_dir)
    config_values = yaml.safe_load((run_dir / "config.yaml").read_text())
    method_args = config_values.pop("method_args", {}) or {}
    config = RunConfig(**config_values, method_args=method_args)
    method = get_method(info["method"])
    params = method.parse_params(method_args.get(method.name))
    return info, config, method, params


def read_inputs(path: Path) -> list[str]:
    """Read one input per line of a .txt file, or the 'text' or 'prompt' field of each JSONL line."""
    if not path.is_file():
        raise UserError(f"input file not found: {path}: check the path")
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    if not lines:
        raise UserError(f"input file {path} is empty: put one input per line")
    if path.suffix.lower() != ".jsonl":
        return lines
    inputs = []
    for number, line in enumerate(lines, start=1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise UserError(f"line {number} of {path} is not valid JSON: fix it or use a .txt file") from None
        value = row.get("text", row.get("prompt")) if isinstance(row, dict) else None
        if not isinstance(value, str):
            raise UserError(f"line {number} of {path} has no 'text' or 'prompt' string field")
        inputs.append(value)
    return inputs


def predict(loaded: LoadedRun, inputs: list[str], batch_size: int = 16, max_new_tokens: int | None = None,
            progress: bool = False) -> list[str]:
    """Return one generated response (causal LM) or label (classification) per input."""
    info = loaded.info
    if info["task"] == "classification":
        ids = classify(loaded.model, loaded.tokenizer, inputs, None, batch_size, loaded.config.max_length, progress)
        return [info["labels"][i] for i in ids]
    tokens = max_new_tokens or (8 if info["generative_classification"] else loaded.config.max_new_tokens)
    return generate(loaded.model, loaded.tokenizer, inputs, info["instruction"], tokens, batch_size, progress)
