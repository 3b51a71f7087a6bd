"""Measure how far a QLoRA merge moves the logits: into the 4-bit base (peft) vs a de-quantized copy (peftlabs).

    peftlabs train --method qlora --output-dir runs/qlora-short --max-steps 10 ...
    python benchmarks/qlora_merge.py --run runs/qlora-short --samples 8

The reference is the trained model as it ran: the NF4 base with the LoRA
matrices attached, unmerged. Each merge is compared with it on the same
evaluation samples by the largest absolute logit difference over real
tokens, and by how many greedy answers change.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from peftlabs import data as data_module
from peftlabs.evaluate import generate
from peftlabs.infer import load_run
from peftlabs.merge import _max_abs_difference, _sample_batch


def measure(run_dir: str, samples: int, max_new_tokens: int) -> dict:
    loaded = load_run(run_dir)
    task_data = data_module.load_task_data(loaded.config, loaded.info["task"])
    split = task_data.eval.select(range(min(samples, len(task_data.eval))))
    batch = _sample_batch(loaded, task_data, split)
    mask = batch["attention_mask"].bool()
    prompts = list(split["prompt"])
    instruction = loaded.info["instruction"]

    def outputs(model):
        with torch.no_grad():
            logits = model(**batch).logits.float()
        answers = generate(model, loaded.tokenizer, prompts, instruction, max_new_tokens, progress=False)
        return logits, answers

    # The trained model, unmerged.
    reference_logits, reference_answers = outputs(loaded.model)

    # peft's merge on the 4-bit base: W_nf4 + (alpha/r)·B·A, quantized back to NF4.
    started = time.perf_counter()
    into_4bit = loaded.model.merge_and_unload()
    naive_seconds = time.perf_counter() - started
    naive_logits, naive_answers = outputs(into_4bit)

    # peftlabs' merge: de-quantize the NF4 base to fp32, then add (alpha/r)·B·A.
    fresh = load_run(run_dir)
    started = time.perf_counter()
    into_fp32 = fresh.method.merge(fresh.model)
    dequantized_seconds = time.perf_counter() - started
    dequantized_logits, dequantized_answers = outputs(into_fp32)

    def changed(answers):
        return sum(a != b for a, b in zip(answers, reference_answers))

    return {
        "run": str(run_dir),
        "samples": len(prompts),
        "max_new_tokens": max_new_tokens,
        "reference_logit_range": [reference_logits[mask].min().item(), reference_logits[mask].max().item()],
        "merge_into_4bit_base": {
            "max_abs_logit_difference": _max_abs_difference(reference_logits, naive_logits, mask),
            "greedy_answers_changed": changed(naive_answers),
            "merge_seconds": round(naive_seconds, 2),
        },
        "merge_into_dequantized_fp32_copy": {
            "max_abs_logit_difference": _max_abs_difference(reference_logits, dequantized_logits, mask),
            "greedy_answers_changed": changed(dequantized_answers),
            "merge_seconds": round(dequantized_seconds, 2),
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, help="run directory of a causal-LM qlora run")
    parser.add_argument("--samples", type=int, default=8, help="evaluation examples compared")
    parser.add_argument("--max-new-tokens", type=int, default=16, help="tokens generated per greedy answer")
    args = parser.parse_args()
    print(json.dumps(measure(args.run, args.samples, args.max_new_tokens), indent=2))


if __name__ == "__main__":
    main()
