"""Score a model on a normalised split: classification, generative classification, generation.

Metrics are computed locally with scikit-learn, sacrebleu and rouge-score;
nothing is downloaded.
"""

from __future__ import annotations

from collections import defaultdict

import torch
from tqdm.auto import tqdm

from peftlabs.data import TaskData, encode_prompt


@torch.no_grad()
def classify(model, tokenizer, texts, pairs=None, batch_size=16, max_length=256, progress=True):
    """Return predicted label ids for texts (and optional second texts)."""
    model.eval()
    device = next(model.parameters()).device
    predictions: list[int] = []
    steps = range(0, len(texts), batch_size)
    for start in tqdm(steps, desc="classify", disable=not progress, leave=False):
        batch_texts = texts[start:start + batch_size]
        batch_pairs = pairs[start:start + batch_size] if pairs else None
        encoded = tokenizer(batch_texts, batch_pairs, truncation=True, max_length=max_length,
                            padding=True, return_tensors="pt").to(device)
        logits = model(**encoded).logits
        predictions.extend(logits.argmax(-1).tolist())
    return predictions


@torch.no_grad()
def generate(model, tokenizer, prompts, instruction=None, max_new_tokens=48, batch_size=16, progress=True):
    """Greedy answers to prompts, decoded without special tokens."""
    model.eval()
    device = next(model.parameters()).device
    answers: list[str] = []
    previous_side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # generation appends to the right end of every row
    try:
        steps = range(0, len(prompts), batch_size)
        for start in tqdm(steps, desc="generate", disable=not progress, leave=False):
            encoded = [encode_prompt(tokenizer, p, instruction) for p in prompts[start:start + batch_size]]
            batch = tokenizer.pad({"input_ids": encoded}, return_tensors="pt").to(device)
            output = model.generate(
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
            new_tokens = output[:, batch["input_ids"].shape[1]:]
            answers.extend(text.strip() for text in tokenizer.batch_decode(new_tokens, skip_special_tokens=True))
    finally:
        tokenizer.padding_side = previous_side
    return answers


def classification_scores(gold: list[str], predicted: list[str], labels: list[str] | None = None) -> dict[str, float]:
    """Accuracy and macro-F1 over the label set (answers outside it count as wrong, not as a class)."""
    from sklearn.metrics import accuracy_score, f1_score

    labels = labels if labels is not None else sorted(set(gold))
    return {
        "accuracy": float(accuracy_score(gold, predicted)),
        "macro_f1": float(f1_score(gold, predicted, labels=labels, average="macro", zero_division=0)),
    }


def generation_scores(prompts: list[str], answers: list[str], references: list[str]) -> dict[str, float]:
    """Corpus BLEU against all references of each prompt, and mean best ROUGE-L F1."""
    import sacrebleu
    from rouge_score import rouge_scorer

    # Group references by prompt: E2E has several human references per meaning representation.
    by_prompt: dict[str, list[str]] = defaultdict(list)
    for prompt, reference in zip(prompts, references):
        by_prompt[prompt].append(reference)
    first_answer: dict[str, str] = {}
    for prompt, answer in zip(prompts, answers):
        first_answer.setdefault(prompt, answer)
    unique = list(by_prompt)
    hypotheses = [first_answer[p] for p in unique]
    depth = max(len(refs) for refs in by_prompt.values())
    reference_streams = [[by_prompt[p][i] if i < len(by_prompt[p]) else by_prompt[p][0] for p in unique]
                         for i in range(depth)]
    bleu = sacrebleu.corpus_bleu(hypotheses, reference_streams).score

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    rouge = [max(scorer.score(ref, hyp)["rougeL"].fmeasure for ref in by_prompt[p]) for p, hyp in
             zip(unique, hypotheses)]
    return {"bleu": float(bleu), "rouge_l": float(sum(rouge) / len(rouge)), "prompts": len(unique)}


def normalise_answer(text: str) -> str:
    """First line of an answer, lower-cased, without surrounding punctuation."""
    line = text.strip().splitlines()[0] if text.strip() else ""
    return line.strip().strip(".:;,!\"'`*").strip().lower()


def evaluate_split(model, tokenizer, data: TaskData, split, batch_size=16, max_length=256, max_new_tokens=48,
                   progress=True) -> tuple[dict[str, float], list[dict[str, str]]]:
    """Score ``model`` on one normalised split; return metrics and per-example rows."""
    # datasets returns lazy Column objects; tokenizers and slicing need plain lists.
    split = {name: list(split[name]) for name in split.column_names}
    if data.task == "classification":
        pairs = split["text_pair"] if any(split["text_pair"]) else None
        ids = classify(model, tokenizer, split["text"], pairs, batch_size, max_length, progress)
        predicted = [data.labels[i] for i in ids]
        rows = [{"input": t, "expected": g, "output": p} for t, g, p in zip(split["text"], split["label"], predicted)]
        return classification_scores(split["label"], predicted, data.labels), rows

    # Generative classification needs only the longest label's tokens and the end-of-turn token.
    new_tokens = max_new_tokens
    if data.generative_classification:
        new_tokens = max(len(tokenizer(label, add_special_tokens=False)["input_ids"]) for label in data.labels) + 1
    # Generate once per distinct prompt: E2E repeats each meaning representation for every reference.
    unique_prompts = list(dict.fromkeys(split["prompt"]))
    unique_answers = generate(model, tokenizer, unique_prompts, data.instruction, new_tokens, batch_size, progress)
    answer_of = dict(zip(unique_prompts, unique_answers))
    answers = [answer_of[prompt] for prompt in split["prompt"]]
    rows = [{"input": p, "expected": r, "output": a} for p, r, a in zip(split["prompt"], split["response"], answers)]
    if data.generative_classification:
        predicted = [normalise_answer(answer) for answer in answers]
        gold = [label.lower() for label in split["response"]]
        return classification_scores(gold, predicted, [label.lower() for label in data.labels]), rows
    return generation_scores(split["prompt"], answers, split["response"]), rows
