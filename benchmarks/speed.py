"""Training speed of `peftlabs train` (LoRA) against the plain peft + Trainer recipe, in one run.

    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/speed.py \\
        --data ../shared/data/e2e/devset.csv --steps 8 --output runs/speed

Both recipes train the same LoRA (r=8, alpha=16, dropout 0.05 on q_proj and
v_proj) on SmolLM2-135M-Instruct in fp32, on the same E2E rows, with the same
batch size, number of steps, learning rate, seed and torch threads. They are
then scored the same way: greedy answers to held-out meaning representations,
corpus BLEU against all their references.

The baseline is what a user would otherwise write: each example is rendered
with the chat template (system instruction, meaning representation, reference
sentence), tokenized with ``padding="max_length"`` and truncation,
``DataCollatorForLanguageModeling(mlm=False)`` makes the labels (the loss
covers every non-padding token: prompt and response), and ``Trainer`` runs
with default ``TrainingArguments`` apart from batch size, steps, learning
rate, seed and CPU. `peftlabs train` pads each batch to its own longest
example, groups examples of similar length, computes the loss on response
tokens only, requests the logits of the response positions only,
and computes the system prompt that begins every row once per batch.

The script also measures this CPU's fp32 and bf16 ``torch.matmul`` peak, the
achieved training FLOP/s of both recipes as a fraction of it, and profiles
one training step of each recipe with torch.profiler. Everything is written
to OUTPUT/speed.json and OUTPUT/profile_*.txt.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from peftlabs import data as data_module  # noqa: E402
from peftlabs.config import build_config  # noqa: E402
from peftlabs.evaluate import generate, generation_scores  # noqa: E402
from peftlabs.models import load_tokenizer, resolve_model  # noqa: E402

MODEL = "smollm2-135m-instruct"
INSTRUCTION = "Write one sentence describing the restaurant, using every attribute given."
LORA = {"r": 8, "alpha": 16.0, "dropout": 0.05, "target_modules": ["q_proj", "v_proj"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", required=True, help="E2E devset.csv")
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps for each recipe")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=160, help="tokens; the baseline pads every row to this")
    parser.add_argument("--learning-rate", type=float, default=2e-3)
    parser.add_argument("--eval-prompts", type=int, default=8, help="held-out meaning representations to score")
    parser.add_argument("--matmul-size", type=int, default=1024)
    parser.add_argument("--output", default="runs/speed", help="folder for speed.json and the profiles")
    args = parser.parse_args()
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    report = {"threads": torch.get_num_threads(), "settings": vars(args), "lora": LORA}

    # The CPU's matrix-multiply peak, measured first so the rest can be compared to it.
    report["matmul_peak_flops"] = {dtype: matmul_peak(args.matmul_size, getattr(torch, dtype))
                                   for dtype in ("float32", "bfloat16")}
    print("matmul peak", report["matmul_peak_flops"], flush=True)

    # The same rows for both recipes: the E2E rows of MRs not held out, and held-out MRs to score.
    config = e2e_config(args, output / "peftlabs")
    task_data = data_module.load_task_data(config, "causal_lm")
    tokenizer = load_tokenizer(resolve_model(MODEL))
    eval_prompts, eval_references = held_out(task_data.eval, args.eval_prompts)
    report["train_rows"] = len(task_data.train)

    report["baseline"] = run_baseline(args, task_data, eval_prompts, eval_references, output)
    print("baseline", report["baseline"], flush=True)
    report["peftlabs"] = run_peftlabs(config, tokenizer, task_data, eval_prompts, eval_references, output)
    print("peftlabs", report["peftlabs"], flush=True)

    base, ours = report["baseline"], report["peftlabs"]
    report["speedup_tokens_per_second"] = round(ours["real_tokens_per_second"] / base["real_tokens_per_second"], 2)
    report["speedup_wall"] = round(base["train_seconds"] / ours["train_seconds"], 2)
    for name in ("baseline", "peftlabs"):
        recipe = report[name]
        recipe["fraction_of_fp32_peak"] = round(recipe["useful_flops_per_second"]
                                                / report["matmul_peak_flops"]["float32"]["best"], 4)
        recipe["fraction_of_bf16_peak"] = round(recipe["useful_flops_per_second"]
                                                / report["matmul_peak_flops"]["bfloat16"]["best"], 4)
    (output / "speed.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: report[k] for k in ("speedup_tokens_per_second", "speedup_wall")}), flush=True)


def matmul_peak(size: int, dtype: torch.dtype, repeats: int = 10) -> dict[str, float]:
    """FLOP/s of a square torch.matmul (2·n³ per product): best and median of ``repeats``."""
    a = torch.randn(size, size).to(dtype)
    b = torch.randn(size, size).to(dtype)
    torch.matmul(a, b)  # warm-up
    rates = []
    for _ in range(repeats):
        started = time.perf_counter()
        torch.matmul(a, b)
        rates.append(2 * size ** 3 / (time.perf_counter() - started))
    return {"best": round(max(rates)), "median": round(statistics.median(rates))}


def e2e_config(args, run_dir: Path):
    values = {
        "model": MODEL, "dataset": args.data, "eval_fraction": 0.05, "instruction": INSTRUCTION,
        "max_train_samples": args.steps * args.batch_size, "max_steps": args.steps, "batch_size": args.batch_size,
        "learning_rate": args.learning_rate, "max_length": args.max_length, "output_dir": str(run_dir),
        "overwrite": True, "save_steps": 100000, "logging_steps": 1, "final_eval": False, "device": "cpu",
        "precision": "fp32", "seed": 42, "lr_scheduler": "linear",
    }
    return build_config({"lora": dict(LORA)}, values)


def held_out(split, count: int) -> tuple[list[str], list[str]]:
    """Rows of the first ``count`` held-out meaning representations, every reference kept."""
    chosen = list(dict.fromkeys(split["prompt"]))[:count]
    rows = [(p, r) for p, r in zip(split["prompt"], split["response"]) if p in set(chosen)]
    return [p for p, _ in rows], [r for _, r in rows]


def score(model, tokenizer, prompts, references) -> dict[str, float]:
    unique = list(dict.fromkeys(prompts))
    answers = generate(model, tokenizer, unique, INSTRUCTION, max_new_tokens=48, batch_size=8, progress=False)
    answer_of = dict(zip(unique, answers))
    return generation_scores(prompts, [answer_of[p] for p in prompts], references)


def model_sizes(model) -> dict[str, int]:
    """Matrix-multiply parameters of the transformer body, of the output layer, and of LoRA."""
    body = lora = 0
    output_layer = 0
    for name, parameter in model.named_parameters():
        if "lora_" in name:
            lora += parameter.numel()
        elif "embed_tokens" in name:
            output_layer = parameter.numel()  # tied to the output layer (lm_head)
        elif parameter.dim() == 2:
            body += parameter.numel()
    return {"body": body, "output_layer": output_layer, "lora": lora}


def training_flops(sizes: dict[str, int], body_tokens: int, logit_tokens: int) -> int:
    """Multiply-add FLOPs of LoRA training with a frozen base (attention score products not counted).

    Frozen weights cost 2·N per token forward and 2·N backward (the input
    gradient only; no weight gradient): 4·N. LoRA weights cost 6·N
    (forward, input gradient, weight gradient). The output layer counts
    only at the positions whose logits are computed.
    """
    return (4 * sizes["body"] + 6 * sizes["lora"]) * body_tokens + 4 * sizes["output_layer"] * logit_tokens


def run_baseline(args, task_data, eval_prompts, eval_references, output: Path) -> dict:
    """The plain recipe: get_peft_model + Trainer, padding to max_length, loss on the whole sequence."""
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import (AutoModelForCausalLM, AutoTokenizer, DataCollatorForLanguageModeling, Trainer,
                              TrainingArguments)

    location = resolve_model(MODEL)
    tokenizer = AutoTokenizer.from_pretrained(location)
    model = AutoModelForCausalLM.from_pretrained(location, dtype=torch.float32)
    torch.manual_seed(42)
    model = get_peft_model(model, LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                                             target_modules=LORA["target_modules"], task_type="CAUSAL_LM"))

    # Render each example with the chat template, pad every row to max_length.
    def render(row):
        messages = data_module.chat_messages(row["prompt"], INSTRUCTION)
        messages.append({"role": "assistant", "content": row["response"]})
        text = tokenizer.apply_chat_template(messages, tokenize=False)
        return tokenizer(text, padding="max_length", truncation=True, max_length=args.max_length)

    train_set = Dataset.from_dict({"prompt": list(task_data.train["prompt"]),
                                   "response": list(task_data.train["response"])})
    train_set = train_set.map(render, remove_columns=train_set.column_names)
    real_tokens = sum(sum(mask) for mask in train_set["attention_mask"])

    training_args = TrainingArguments(output_dir=str(output / "baseline"), per_device_train_batch_size=args.batch_size,
                                      max_steps=args.steps, learning_rate=args.learning_rate, seed=42,
                                      use_cpu=True, report_to=[], save_strategy="no", logging_steps=1)
    trainer = Trainer(model=model, args=training_args, train_dataset=train_set,
                      data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False))
    profile_baseline_step(model, next(iter(trainer.get_train_dataloader())), output / "profile_baseline.txt")

    started = time.perf_counter()
    result = trainer.train()
    seconds = time.perf_counter() - started

    padded_tokens = args.steps * args.batch_size * args.max_length
    sizes = model_sizes(model)
    useful = training_flops(sizes, real_tokens, real_tokens)
    executed = training_flops(sizes, padded_tokens, padded_tokens)
    return {
        "train_seconds": round(seconds, 2),
        "train_loss": round(result.training_loss, 4),
        "real_tokens": real_tokens,
        "padded_tokens": padded_tokens,
        "real_tokens_per_second": round(real_tokens / seconds, 1),
        "useful_flops_per_second": round(useful / seconds),
        "executed_flops_per_second": round(executed / seconds),
        "sizes": sizes,
        "eval": score(model, tokenizer, eval_prompts, eval_references),
    }


def run_peftlabs(config, tokenizer, task_data, eval_prompts, eval_references, output: Path) -> dict:
    """`peftlabs train` on the same rows, through peftlabs.train.train."""
    from peftlabs.train import train

    result = train(config)
    encoded = data_module.tokenize_split(task_data.train, tokenizer, task_data, config.max_length)
    response_tokens = sum(sum(1 for label in labels if label != -100) for labels in encoded["labels"])
    metrics = result.metrics
    seconds = metrics["train_seconds"]
    sizes = model_sizes(result.model)
    # The shared prompt prefix is computed once per batch: those tokens cost no FLOPs for the other rows.
    computed_tokens = metrics["train_tokens"] - metrics["train_tokens_shared"]
    useful = training_flops(sizes, computed_tokens, response_tokens)
    profile_peftlabs_step(result.model, encoded, config.batch_size, tokenizer.pad_token_id,
                          output / "profile_peftlabs.txt")
    return {
        "train_seconds": seconds,
        "train_loss": round(metrics["train_loss"], 4),
        "real_tokens": metrics["train_tokens"],
        "shared_prefix_tokens": metrics["train_tokens_shared"],
        "computed_tokens": computed_tokens,
        "response_tokens": response_tokens,
        "real_tokens_per_second": round(metrics["train_tokens"] / seconds, 1),
        "useful_flops_per_second": round(useful / seconds),
        "sizes": sizes,
        "eval": score(result.model, result.tokenizer, eval_prompts, eval_references),
    }


def profile_step(model, compute_loss, path: Path, shape: str) -> None:
    """Profile one forward and backward pass and write the operators by self CPU time."""
    from torch.profiler import ProfilerActivity, profile

    model.train()
    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        compute_loss().backward()
    model.zero_grad(set_to_none=True)
    table = profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=15)
    path.write_text(f"batch {shape}\n{table}\n")


def profile_baseline_step(model, batch, path: Path) -> None:
    shape = "x".join(str(size) for size in batch["input_ids"].shape)
    profile_step(model, lambda: model(**batch).loss, path, shape)


def profile_peftlabs_step(model, encoded, batch_size: int, pad_id: int, path: Path) -> None:
    """Profile a peftlabs step: one batch padded on the left to its longest row, the trainer's response loss."""
    from peftlabs.train import RowSelection, response_loss_sum

    rows = [encoded[i] for i in range(batch_size)]
    length = max(len(row["input_ids"]) for row in rows)
    batch = {"input_ids": [], "attention_mask": [], "labels": []}
    for row in rows:
        pad = length - len(row["input_ids"])
        batch["input_ids"].append([pad_id] * pad + row["input_ids"])
        batch["attention_mask"].append([0] * pad + row["attention_mask"])
        batch["labels"].append([-100] * pad + row["labels"])
    batch = {key: torch.tensor(value) for key, value in batch.items()}
    response_rows = int((batch["labels"][:, 1:] != -100).sum())

    selection = RowSelection()
    hook = model.get_output_embeddings().register_forward_pre_hook(selection)
    try:
        profile_step(model, lambda: response_loss_sum(model, batch, selection, shared_prefix=True)[0] / response_rows,
                     path,
                     f"{batch_size}x{length} (logits for the {response_rows} response positions)")
    finally:
        hook.remove()

if __name__ == "__main__":
    main()
