"""Sequence packing against per-batch padding for LoRA training steps on SmolLM2, one thread.

    OMP_NUM_THREADS=1 python benchmarks/packing.py

Four batches of four rows with E2E-like lengths (78 to 110 tokens) go through
one forward and backward pass each (LoRA r=8 on q_proj and v_proj, logits
for the last position only), in three layouts:

- padded: each batch left-padded to its longest row, as `peftlabs train` does;
- packed into one row: the four rows one after another, with positions
  restarting at every row, so transformers builds a block-diagonal mask;
- packed into two rows: the longest row with the shortest, the other two together.

The tokens are random ids: only the time matters here. Two rounds are printed.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from peftlabs.models import resolve_model  # noqa: E402

BATCH_LENGTHS = [[97, 93, 90, 88], [87, 86, 85, 84], [110, 104, 101, 99], [83, 82, 80, 78]]


def padded(lengths):
    longest = max(lengths)
    mask = torch.zeros(len(lengths), longest, dtype=torch.long)
    for row, length in enumerate(lengths):
        mask[row, longest - length:] = 1
    return {"input_ids": torch.randint(0, 49000, mask.shape), "attention_mask": mask,
            "position_ids": (mask.cumsum(-1) - 1).clamp(min=0)}


def packed(lengths, rows):
    # Rows are sorted longest first. One packed row takes all four, or two take [first, last] and [second, third].
    groups = [lengths] if rows == 1 else [[lengths[0], lengths[3]], [lengths[1], lengths[2]]]
    width = max(sum(group) for group in groups)
    positions = torch.zeros(rows, width, dtype=torch.long)
    for row, group in enumerate(groups):
        restarting = torch.cat([torch.arange(length) for length in group])
        positions[row, :len(restarting)] = restarting
        # The end of a shorter packed row is filled as one more sequence of its own.
        positions[row, len(restarting):] = torch.arange(width - len(restarting))
    return {"input_ids": torch.randint(0, 49000, positions.shape), "position_ids": positions}


def main() -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(resolve_model("smollm2-135m-instruct"))
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05,
                                             target_modules=["q_proj", "v_proj"]))
    model.train()

    def step(inputs) -> float:
        started = time.perf_counter()
        model(**inputs, logits_to_keep=1).logits.sum().backward()
        return time.perf_counter() - started

    step(padded([90, 90, 90, 90]))  # warm-up
    layouts = {"padded": padded, "packed, 1 row": lambda l: packed(l, 1), "packed, 2 rows": lambda l: packed(l, 2)}
    for _ in range(2):
        for name, layout in layouts.items():
            seconds = [step(layout(lengths)) for lengths in BATCH_LENGTHS]
            print(f"{name:15s} {sum(seconds):6.2f} s  ({', '.join(f'{s:.2f}' for s in seconds)})", flush=True)


if __name__ == "__main__":
    main()
