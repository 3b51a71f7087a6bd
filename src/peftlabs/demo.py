"""The demo job: train LoRA on the bundled tickets, score base vs tuned, merge.

    peftlabs demo                     # what `make demo` runs
    peftlabs demo --method lora --output-dir runs/demo-lora

The base model is scored by switching the adapter off inside the same model
(peft's ``disable_adapter``), so both scores come from identical weights.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from peftlabs import runs
from peftlabs.config import RunConfig, build_config, read_yaml
from peftlabs.data import load_task_data
from peftlabs.evaluate import evaluate_split
from peftlabs.infer import load_run
from peftlabs.merge import merge_run
from peftlabs.train import train

log = logging.getLogger("peftlabs")

DEMO_CONFIG = Path(__file__).parent / "presets" / "demo.yaml"


def demo_config(overrides: dict[str, Any]) -> RunConfig:
    return build_config(read_yaml(DEMO_CONFIG), overrides)


def run_demo(config: RunConfig, examples: int = 5) -> dict[str, Any]:
    """Train, evaluate base and tuned on the test split, merge, and print a before/after table."""
    metrics = train(config).metrics
    run_dir = Path(config.output_dir)

    # Score base and tuned on the held-out test split.
    loaded = load_run(run_dir)
    data = load_task_data(loaded.config, loaded.info["task"])
    test = data.test if data.test is not None else data.eval
    with _adapter_disabled(loaded) as base_model:
        base_scores, base_rows = evaluate_split(base_model, loaded.tokenizer, data, test, config.eval_batch_size,
                                                config.max_length, config.max_new_tokens)
    tuned_scores, tuned_rows = evaluate_split(loaded.model, loaded.tokenizer, data, test, config.eval_batch_size,
                                              config.max_length, config.max_new_tokens)

    # Merge into a standalone model (methods that cannot merge are skipped with their reason).
    merge_note = ""
    if loaded.method.is_mergeable(loaded.params):
        report = merge_run(run_dir, run_dir / "merged", overwrite=True)
        merge_note = (f"merged model in {report.output} (max |logit difference| "
                      f"{report.max_abs_logit_difference:.1e})")
    else:
        merge_note = f"not merged: {loaded.method.merge_refusal}"

    result = {"train": metrics, "base_test": base_scores, "tuned_test": tuned_scores, "test_examples": len(test)}
    runs.write_json_atomic(run_dir / "demo.json", result)
    print(_table(config, base_scores, tuned_scores, len(test), metrics))
    print(_examples(base_rows, tuned_rows, examples))
    print(merge_note)
    return result


@contextmanager
def _adapter_disabled(loaded):
    """Yield the base model: the same weights with the adapter switched off where the library allows it."""
    if hasattr(loaded.model, "disable_adapter"):
        with loaded.model.disable_adapter():
            yield loaded.model
        return
    # BitFit overwrote the biases and AdapterHub adapters live inside the layers: load a fresh base.
    yield loaded.method.load_base(loaded.info["model_location"], loaded.info["task"],
                                  loaded.info["labels"], loaded.tokenizer, loaded.params)


def _table(config, base, tuned, count, metrics) -> str:
    lines = [
        "",
        f"{config.method} on {config.model}, test split ({count} examples)",
        f"{'metric':<12}{'base':>10}{'tuned':>10}",
    ]
    for name in base:
        if isinstance(base[name], float):
            lines.append(f"{name:<12}{base[name]:>10.3f}{tuned[name]:>10.3f}")
    lines.append(f"training: {metrics['steps']} steps in {metrics['train_seconds']:.0f} s, "
                 f"{metrics['train_tokens_per_second']:,.0f} tok/s, "
                 f"{metrics['trainable_parameters']:,} trainable parameters")
    return "\n".join(lines)


def _examples(base_rows, tuned_rows, count) -> str:
    lines = ["", "examples (expected | base | tuned):"]
    for base, tuned in list(zip(base_rows, tuned_rows))[:count]:
        text = base["input"].replace("\n", " ")
        text = text if len(text) <= 70 else text[:67] + "..."
        lines.append(f"- {text}")
        lines.append(f"    {base['expected']} | {_short(base['output'])} | {_short(tuned['output'])}")
    return "\n".join(lines)


def _short(text: str) -> str:
    text = text.replace("\n", " ").strip()
    return text if len(text) <= 40 else text[:37] + "..."
