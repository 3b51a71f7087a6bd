"""Fold a trained adapter into the base weights and prove the result is unchanged.

    peftlabs merge --run runs/lora-demo --output merged/lora-demo

The merged folder is a plain transformers model (safetensors weights, config,
tokenizer, README.md model card): it loads with
``AutoModelForCausalLM.from_pretrained`` or
``AutoModelForSequenceClassification.from_pretrained`` and needs neither peft,
adapters nor peftlabs. Three checks run before the folder appears:

1. the merged model's logits on sample inputs from the run's evaluation data
   match the unmerged model's within the tolerance (largest absolute difference);
2. the merged model gives the same greedy generations (causal LM) or the
   same predicted labels (classification) as the unmerged one;
3. the saved folder, loaded back with the transformers Auto class, reproduces
   the merged model's logits within the tolerance.

If any check fails, nothing is written and the command exits with status 1.
Methods that add something other than a weight delta (prompts, prefixes,
bottleneck adapters) are rejected before any model is loaded.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from peftlabs import data as data_module
from peftlabs import runs
from peftlabs.errors import UserError
from peftlabs.evaluate import generate
from peftlabs.infer import load_run
from peftlabs.methods import get_method

log = logging.getLogger("peftlabs")

# fp32 merges on CPU differ from the unmerged model by about 1e-5 in the
# logits (summation order changes); 1e-3 leaves room for that and still
# catches a wrong merge, which moves logits by whole units.
DEFAULT_TOLERANCE = 1e-3


class MergeCheckFailed(Exception):
    """The merged model does not reproduce the unmerged one."""


@dataclass
class MergeReport:
    output: Path
    max_abs_logit_difference: float  # merged vs unmerged model
    reload_max_abs_logit_difference: float  # saved folder loaded by transformers vs merged model
    tolerance: float
    generations_identical: bool | None  # causal LM only
    labels_identical: bool | None  # classification only
    samples: int


def merge_run(run_dir: str | Path, output: str | Path, tolerance: float = DEFAULT_TOLERANCE,
              overwrite: bool = False, samples: int = 8) -> MergeReport:
    """Merge a run's adapter into its base model, check it, and save it as a plain transformers model."""
    run_dir, output = Path(run_dir), Path(output)
    if tolerance <= 0:
        raise UserError(f"invalid tolerance {tolerance}: it must be greater than 0")
    if samples <= 0:
        raise UserError(f"invalid samples {samples}: pass a positive number of evaluation examples")
    if output.exists() and any(output.iterdir()) and not overwrite:
        raise UserError(f"output directory {output} already exists: pass --overwrite or choose another --output")
    reject_unmergeable(run_dir)

    loaded = load_run(run_dir)
    task = loaded.info["task"]

    # Sample inputs from the run's own evaluation data.
    task_data = data_module.load_task_data(loaded.config, task)
    sample_split = task_data.eval.select(range(min(samples, len(task_data.eval))))
    batch = _sample_batch(loaded, task_data, sample_split)
    prompts = list(sample_split["prompt"]) if task == "causal_lm" else None
    mask = batch["attention_mask"].bool()

    # Outputs before merging.
    with torch.no_grad():
        before = loaded.model(**batch).logits.float()
    answers_before = _answers(loaded, prompts)

    # Merge, then the same outputs again.
    merged = loaded.method.merge(loaded.model)
    merged.eval()
    with torch.no_grad():
        after = merged(**batch).logits.float()
    loaded.model = merged
    answers_after = _answers(loaded, prompts)

    # Checks 1 and 2: logits, and greedy generations or predicted labels.
    difference = _max_abs_difference(before, after, mask)
    generations_identical = None if prompts is None else answers_before == answers_after
    labels_identical = None
    if task == "classification":
        labels_identical = torch.equal(before.argmax(-1), after.argmax(-1))
    same_outputs = generations_identical if prompts is not None else labels_identical
    outputs_name = "greedy generations" if prompts is not None else "predicted labels"
    log.info("merge check on %d samples: max |logit difference| %.2e (tolerance %.0e), %s identical: %s",
             len(sample_split), difference, tolerance, outputs_name, same_outputs)
    if difference > tolerance or not same_outputs:
        raise MergeCheckFailed(
            f"merge check failed: the merged model differs from the adapter model, max |logit difference| "
            f"{difference:.3e} (tolerance {tolerance:.0e}), {outputs_name} identical: {same_outputs}; "
            f"nothing was written"
        )

    # Save in one atomic step; check 3 runs on the staged folder before it is renamed into place.
    with runs.atomic_dir(output) as staging:
        merged.save_pretrained(staging, safe_serialization=True)
        loaded.tokenizer.save_pretrained(staging)
        reload_difference = _reload_difference(staging, task, batch, after, mask)
        log.info("saved folder reloaded with transformers: max |logit difference| %.2e", reload_difference)
        if reload_difference > tolerance:
            raise MergeCheckFailed(
                f"merge check failed: the saved model, loaded with transformers, differs from the merged model "
                f"by max |logit difference| {reload_difference:.3e} (tolerance {tolerance:.0e}); nothing was written"
            )
        report = MergeReport(output, difference, reload_difference, tolerance, generations_identical,
                             labels_identical, len(sample_split))
        (staging / "README.md").write_text(_model_card(loaded, run_dir, report))
    return report


def reject_unmergeable(run_dir: Path) -> None:
    """Raise UserError explaining why, when the run's method and settings cannot be merged.

    Reads only run.json and config.yaml, so the refusal comes before any model is loaded.
    """
    info = runs.read_run(run_dir)
    method = get_method(info["method"])
    config_values = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
    method_args = config_values.get("method_args") or {}
    params = method.parse_params(method_args.get(method.name))
    if method.is_mergeable(params):
        return
    raise UserError(
        f"method '{method.name}' cannot be merged: {method.merge_refusal}. Deploy it unmerged instead: "
        f"`peftlabs serve --model {info['model']} --adapter NAME={run_dir}` or "
        f"`peftlabs infer --run {run_dir}` loads the base model and attaches the adapter, which gives the "
        f"trained run's outputs. Nothing was written"
    )


def _sample_batch(loaded, task_data, split):
    tokenizer = loaded.tokenizer
    if loaded.info["task"] == "classification":
        return tokenizer(list(split["text"]), truncation=True, max_length=loaded.config.max_length, padding=True,
                         return_tensors="pt")
    encoded = [data_module.encode_causal_example(tokenizer, p, r, task_data.instruction, loaded.config.max_length)
               for p, r in zip(split["prompt"], split["response"])]
    features = [{"input_ids": e["input_ids"], "attention_mask": e["attention_mask"]} for e in encoded]
    return tokenizer.pad(features, return_tensors="pt")


def _answers(loaded, prompts):
    if prompts is None:
        return None
    tokens = 8 if loaded.info["generative_classification"] else loaded.config.max_new_tokens
    return generate(loaded.model, loaded.tokenizer, prompts, loaded.info["instruction"], tokens, progress=False)


def _max_abs_difference(before: torch.Tensor, after: torch.Tensor, mask: torch.Tensor) -> float:
    """Largest absolute logit difference, over real tokens only for per-token logits."""
    if before.dim() == 3:
        return (before - after).abs()[mask].max().item()
    return (before - after).abs().max().item()


def _reload_difference(folder: Path, task: str, batch, merged_logits: torch.Tensor, mask: torch.Tensor) -> float:
    """Load the saved folder with the transformers Auto class alone and compare its logits."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    auto_class = AutoModelForCausalLM if task == "causal_lm" else AutoModelForSequenceClassification
    reloaded = auto_class.from_pretrained(folder, dtype=torch.float32)
    reloaded.eval()
    with torch.no_grad():
        logits = reloaded(**batch).logits.float()
    return _max_abs_difference(merged_logits, logits, mask)


def _model_card(loaded, run_dir: Path, report: MergeReport) -> str:
    info, config = loaded.info, loaded.config
    metrics_file = run_dir / "metrics.json"
    scores = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}
    settings = dataclasses.asdict(loaded.params)
    auto_class = "AutoModelForCausalLM" if info["task"] == "causal_lm" else "AutoModelForSequenceClassification"
    if report.generations_identical is not None:
        outputs_line = f"greedy generations identical: {report.generations_identical}"
    else:
        outputs_line = f"predicted labels identical: {report.labels_identical}"
    data_line = f"`{config.dataset}`"
    if config.eval_dataset:
        data_line += f" (evaluation: `{config.eval_dataset}`)"
    return (
        f"# {info['method']} merged into {info['model']}\n\n"
        f"- base model: `{info['model']}`\n"
        f"- method: `{info['method']}`, adapter folded into the weights by `peftlabs merge`\n"
        f"- method settings: `{json.dumps(settings)}`\n"
        f"- task: {info['task']}\n"
        f"- training data: {data_line}\n\n"
        f"## Merge check ({report.samples} evaluation samples)\n\n"
        f"- max |logit difference| against the unmerged model: {report.max_abs_logit_difference:.2e} "
        f"(tolerance {report.tolerance:.0e})\n"
        f"- {outputs_line}\n"
        f"- max |logit difference| of this folder loaded with transformers against the merged model: "
        f"{report.reload_max_abs_logit_difference:.2e}\n\n"
        f"## Scores of the training run (metrics.json)\n\n```json\n{json.dumps(scores, indent=2)}\n```\n\n"
        f"Load it with `transformers` alone: `{auto_class}.from_pretrained(\"path/to/this/folder\")`.\n"
    )
