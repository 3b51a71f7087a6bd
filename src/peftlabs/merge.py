"""Fold a trained adapter into the base weights and prove the result is unchanged.

    peftlabs merge --run runs/lora-demo --output merged/lora-demo

The merged folder is a plain transformers model: it loads with
``AutoModelForCausalLM.from_pretrained`` (or the classification class) and
needs neither peft nor peftlabs. Before anything is written, the merged model's
logits on sample inputs are compared with the unmerged model's; the merge is
rejected when the largest absolute difference exceeds the tolerance or, for a
causal LM, when greedy answers differ.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from peftlabs import data as data_module
from peftlabs import runs
from peftlabs.errors import UserError
from peftlabs.evaluate import generate
from peftlabs.infer import load_run

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
    max_abs_logit_difference: float
    tolerance: float
    generations_identical: bool | None
    samples: int


def merge_run(run_dir: str | Path, output: str | Path, tolerance: float = DEFAULT_TOLERANCE,
              overwrite: bool = False, samples: int = 8) -> MergeReport:
    output = Path(output)
    if tolerance <= 0:
        raise UserError(f"invalid tolerance {tolerance}: it must be greater than 0")
    if output.exists() and any(output.iterdir()) and not overwrite:
        raise UserError(f"output directory {output} already exists: pass --overwrite or choose another --output")

    loaded = load_run(run_dir)
    if not loaded.method.mergeable:
        raise UserError(f"method '{loaded.method.name}' cannot be merged: {loaded.method.merge_refusal}")

    # Sample inputs from the run's own evaluation data.
    task_data = data_module.load_task_data(loaded.config, loaded.info["task"])
    sample_split = task_data.eval.select(range(min(samples, len(task_data.eval))))
    batch = _sample_batch(loaded, task_data, sample_split)
    prompts = list(sample_split["prompt"]) if loaded.info["task"] == "causal_lm" else None

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

    mask = batch["attention_mask"].bool()
    if before.dim() == 3:
        difference = (before - after).abs()[mask].max().item()
    else:
        difference = (before - after).abs().max().item()
    identical = None if prompts is None else answers_before == answers_after
    log.info("merge check on %d samples: max |logit difference| %.2e (tolerance %.0e)%s", len(sample_split),
             difference, tolerance, "" if identical is None else f", greedy answers identical: {identical}")
    if difference > tolerance or identical is False:
        raise MergeCheckFailed(
            f"merged model differs from the adapter model: max |logit difference| {difference:.3e} "
            f"(tolerance {tolerance:.0e}), identical answers: {identical}; nothing was written"
        )

    # Write the standalone model in one atomic step.
    with runs.atomic_dir(output) as staging:
        merged.save_pretrained(staging, safe_serialization=True)
        loaded.tokenizer.save_pretrained(staging)
        (staging / "README.md").write_text(_model_card(loaded, difference, tolerance))
    return MergeReport(output, difference, tolerance, identical, len(sample_split))


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


def _model_card(loaded, difference: float, tolerance: float) -> str:
    info, config = loaded.info, loaded.config
    metrics_file = Path(config.output_dir) / "metrics.json"
    scores = metrics_file.read_text() if metrics_file.is_file() else "{}"
    return (
        f"# {info['method']} merged into {info['model']}\n\n"
        f"- base model: `{info['model']}`\n"
        f"- method: `{info['method']}` (adapter folded into the weights by peftlabs merge)\n"
        f"- task: {info['task']}\n"
        f"- data: `{config.dataset}`\n"
        f"- merge check: max |logit difference| {difference:.2e} against the unmerged model "
        f"(tolerance {tolerance:.0e})\n\n"
        f"Evaluation metrics of the training run:\n\n```json\n{scores}\n```\n\n"
        f"Load it with `transformers` alone, for example "
        f"`AutoModelForCausalLM.from_pretrained(\"path/to/this/folder\")`.\n"
    )
