"""Load a dataset argument into train/eval/test splits of one of two task shapes.

* classification: columns ``text``, optional ``text_pair``, and ``label``;
* causal LM instruction tuning: columns ``prompt`` and ``response``; the loss
  covers response tokens only.

A classification dataset given to a causal LM becomes instruction tuning whose
response is the label name ("generative classification"): the demo task is
used that way by SmolLM2 and as plain classification by MiniLM.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from peftlabs.errors import UserError

log = logging.getLogger(__name__)

DEMO_DIR = Path(__file__).parent / "demo_data"
DEMO_LABELS = ["account_access", "billing", "feature_request", "shipping", "technical_issue"]
DEMO_INSTRUCTION = "Classify the support ticket as one of: {labels}."

LOCAL_FORMATS = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}

# Column names tried, in order, when the user does not name the column.
TEXT_COLUMNS = ("text", "sentence", "content", "review", "document", "sentence1", "premise")
PAIR_COLUMNS = ("text_pair", "sentence2", "hypothesis")
LABEL_COLUMNS = ("label", "labels", "category", "class")
PROMPT_COLUMNS = ("prompt", "instruction", "input", "question", "mr", "source", "query")
RESPONSE_COLUMNS = ("response", "output", "answer", "completion", "ref", "reference", "target")


@dataclass
class TaskData:
    """Normalised splits plus what evaluation needs to know about them."""

    task: str  # "classification" or "causal_lm"
    train: Any  # datasets.Dataset
    eval: Any
    test: Any | None
    labels: list[str] | None  # classification and generative classification
    instruction: str | None  # causal LM system message
    generative_classification: bool = False


def load_task_data(config, task: str) -> TaskData:
    """Load, check and normalise the splits named by a RunConfig."""
    raw = _load_splits(config)
    first = raw["train"]

    # Decide the shape from the columns and the task of the model.
    has_label = _pick(first.column_names, config.label_column, LABEL_COLUMNS, "label", "--label-column",
                      required=False)
    has_prompt = _pick(first.column_names, config.prompt_column, PROMPT_COLUMNS, "prompt", "--prompt-column",
                       required=False)
    if task == "classification" or (has_label and not has_prompt):
        splits = {name: _as_classification(ds, config, name) for name, ds in raw.items() if ds is not None}
        configured = config.labels or (DEMO_LABELS if config.dataset == "demo" else None)
        labels = _label_set(splits, configured)
        if task == "classification":
            return TaskData("classification", splits["train"], splits["eval"], splits.get("test"), labels, None)
        instruction = config.instruction or DEMO_INSTRUCTION
        instruction = instruction.replace("{labels}", ", ".join(labels))
        splits = {name: _classification_as_generation(ds) for name, ds in splits.items()}
        return TaskData("causal_lm", splits["train"], splits["eval"], splits.get("test"), labels, instruction,
                        generative_classification=True)

    splits = {name: _as_instruction(ds, config, name) for name, ds in raw.items() if ds is not None}
    return TaskData("causal_lm", splits["train"], splits["eval"], splits.get("test"), None, config.instruction)


def check_data_paths(config) -> None:
    """Reject a missing local dataset file before any model is loaded or converted."""
    for path in (config.dataset, config.eval_dataset):
        if path and path != "demo" and Path(path).suffix.lower() in LOCAL_FORMATS and not Path(path).is_file():
            raise UserError(f"dataset file not found: {path}: check the path")


def _load_splits(config) -> dict[str, Any]:
    """Return {"train", "eval", "test"} datasets (test may be None) before column checks."""
    spec = config.dataset
    if spec == "demo":
        eval_split = config.eval_split or "validation"
        if eval_split not in ("validation", "test"):
            raise UserError(f"the demo dataset has no split '{eval_split}': use --eval-split validation or test")
        splits = {
            "train": _read_local(DEMO_DIR / "tickets_train.jsonl"),
            "eval": _read_local(DEMO_DIR / f"tickets_{eval_split}.jsonl"),
            "test": _read_local(DEMO_DIR / "tickets_test.jsonl"),
        }
    elif Path(spec).suffix.lower() in LOCAL_FORMATS or Path(spec).exists():
        splits = {"train": _read_local(Path(spec)), "eval": None, "test": None}
        if config.eval_dataset:
            splits["eval"] = _read_local(Path(config.eval_dataset))
    else:
        splits = _read_hub(config)

    if config.eval_dataset and spec == "demo":
        splits["eval"] = _read_local(Path(config.eval_dataset))

    # Shuffle once with the run's seed, then cap sizes.
    splits["train"] = splits["train"].shuffle(seed=config.seed)
    if splits["eval"] is None:
        splits["train"], splits["eval"] = _hold_out(splits["train"], config)
    if config.max_train_samples:
        splits["train"] = splits["train"].select(range(min(config.max_train_samples, len(splits["train"]))))
    if config.max_eval_samples:
        for name in ("eval", "test"):
            if splits.get(name) is not None:
                splits[name] = splits[name].select(range(min(config.max_eval_samples, len(splits[name]))))

    for name, ds in splits.items():
        if ds is not None and len(ds) == 0:
            raise UserError(f"the {name} split of dataset '{spec}' is empty: check the file or split name")
    return splits


def _read_local(path: Path):
    from datasets import load_dataset

    if not path.is_file():
        raise UserError(f"dataset file not found: {path}: check the path")
    suffix = path.suffix.lower()
    if suffix not in LOCAL_FORMATS:
        known = ", ".join(LOCAL_FORMATS)
        raise UserError(f"unsupported dataset file type '{suffix}' for {path}: use one of {known}")
    kwargs: dict[str, Any] = {}
    if suffix == ".tsv":
        # GLUE-style TSV files contain bare quote characters inside sentences.
        kwargs = {"sep": "\t", "quoting": 3}
    try:
        dataset = load_dataset(LOCAL_FORMATS[suffix], data_files=str(path), split="train", **kwargs)
    except Exception as error:  # datasets raises many types for unreadable files
        raise UserError(f"could not read dataset file {path}: {str(error).splitlines()[0]}") from None
    return dataset


def _read_hub(config):
    from datasets import load_dataset

    try:
        splits = load_dataset(config.dataset, config.dataset_config)
    except Exception as error:  # network, missing config, unknown id
        raise UserError(
            f"could not load dataset '{config.dataset}': {str(error).splitlines()[0]}: "
            f"pass 'demo', a local file, or a hub id reachable from this machine"
        ) from None

    def split(name):
        if name is None:
            return None
        if name not in splits:
            return None
        return splits[name]

    if config.train_split not in splits:
        found = ", ".join(splits)
        raise UserError(f"dataset '{config.dataset}' has no split '{config.train_split}'; found {found}: "
                        f"pass --train-split")
    return {"train": splits[config.train_split], "eval": split(config.eval_split), "test": split(config.test_split)}


def _hold_out(train, config):
    """Split off an evaluation set; for prompt/response data, whole prompts go to one side."""
    columns = train.column_names
    group_column = _pick(columns, config.prompt_column, PROMPT_COLUMNS, "prompt", "--prompt-column",
                         required=False)
    if group_column and not _pick(columns, config.label_column, LABEL_COLUMNS, "label", "--label-column",
                                  required=False):
        # Split by prompt so that no prompt (an E2E meaning representation, say)
        # is both trained on and evaluated.
        prompts = sorted(set(train[group_column]))
        import random

        random.Random(config.seed).shuffle(prompts)
        held = set(prompts[: max(1, int(len(prompts) * config.eval_fraction))])
        eval_rows = [i for i, p in enumerate(train[group_column]) if p in held]
        train_rows = [i for i, p in enumerate(train[group_column]) if p not in held]
        return train.select(train_rows), train.select(eval_rows)
    size = max(1, int(len(train) * config.eval_fraction))
    parts = train.train_test_split(test_size=size, seed=config.seed, shuffle=False)
    return parts["train"], parts["test"]


def _pick(columns, chosen, candidates, role, flag, required=True):
    """Find the column that plays a role, or raise an error naming the flag to set."""
    if chosen:
        if chosen not in columns:
            raise UserError(f"dataset has no column '{chosen}'; found {columns}: pass an existing {flag}")
        return chosen
    present = [name for name in candidates if name in columns]
    if len(present) == 1:
        return present[0]
    if len(present) > 1 and required:
        raise UserError(f"dataset has several possible {role} columns {present}: pass {flag}")
    if len(present) > 1:
        return present[0]
    if required:
        raise UserError(f"dataset has no {role} column; found {columns}: pass {flag} NAME")
    return None


def _as_classification(dataset, config, split_name):
    columns = dataset.column_names
    # A named text column applies where it exists; other files of the same
    # dataset may name it differently (GLUE SST-2: 'sentence' vs 'content').
    chosen_text = config.text_column if split_name == "train" or config.text_column in columns else None
    text = _pick(columns, chosen_text, TEXT_COLUMNS, "text", "--text-column")
    label = _pick(columns, config.label_column, LABEL_COLUMNS, "label", "--label-column")
    pair = _pick(columns, config.text_pair_column, PAIR_COLUMNS, "text pair", "--text-pair-column", required=False)

    def normalise(row):
        item = {"text": str(row[text]), "label": _label_text(row[label])}
        item["text_pair"] = str(row[pair]) if pair else None
        return item

    from datasets import Features, Value

    features = Features({"text": Value("string"), "label": Value("string"), "text_pair": Value("string")})
    return dataset.map(normalise, remove_columns=columns, features=features)


def _label_text(value) -> str:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value).strip()


def _label_set(splits, configured):
    found = sorted(set(splits["train"]["label"]))
    labels = [str(label) for label in configured] if configured else found
    if len(labels) < 2:
        raise UserError(f"classification needs at least 2 labels, the training split has {labels}: check --label-column")
    for name, ds in splits.items():
        unknown = sorted(set(ds["label"]) - set(labels))
        if unknown:
            raise UserError(
                f"the {name} split has labels {unknown[:5]} outside the label set {labels}: "
                f"fix the data or pass the full set with --labels"
            )
    return labels


def _classification_as_generation(dataset):
    def convert(row):
        prompt = row["text"] if not row.get("text_pair") else f"{row['text']}\n\n{row['text_pair']}"
        return {"prompt": prompt, "response": row["label"]}

    return dataset.map(convert, remove_columns=dataset.column_names)


def _as_instruction(dataset, config, split_name):
    columns = dataset.column_names
    prompt = _pick(columns, config.prompt_column, PROMPT_COLUMNS, "prompt", "--prompt-column")
    response = _pick(columns, config.response_column, RESPONSE_COLUMNS, "response", "--response-column")

    def normalise(row):
        return {"prompt": str(row[prompt]), "response": str(row[response])}

    return dataset.map(normalise, remove_columns=columns)


# ---------------------------------------------------------------------------
# Tokenisation
# ---------------------------------------------------------------------------


def chat_messages(prompt: str, instruction: str | None) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": instruction}] if instruction else []
    messages.append({"role": "user", "content": prompt})
    return messages


def encode_prompt(tokenizer, prompt: str, instruction: str | None) -> list[int]:
    """Token ids of the prompt, ending where the model's answer starts."""
    if tokenizer.chat_template:
        return list(tokenizer.apply_chat_template(chat_messages(prompt, instruction), add_generation_prompt=True,
                                                  tokenize=True))
    text = f"{instruction}\n\n{prompt}\n" if instruction else f"{prompt}\n"
    return tokenizer(text)["input_ids"]


def encode_causal_example(tokenizer, prompt: str, response: str, instruction: str | None, max_length: int):
    """Input ids and labels for one example: labels are -100 everywhere but the response."""
    prompt_ids = encode_prompt(tokenizer, prompt, instruction)
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    input_ids = (prompt_ids + response_ids)[:max_length]
    labels = ([-100] * len(prompt_ids) + response_ids)[:max_length]
    return {"input_ids": input_ids, "attention_mask": [1] * len(input_ids), "labels": labels}


def tokenize_split(dataset, tokenizer, data: TaskData, max_length: int):
    """Tokenise one normalised split for training; drops examples with no response left."""
    if data.task == "classification":
        def encode(row):
            pair = row["text_pair"] if row.get("text_pair") else None
            encoded = tokenizer(row["text"], pair, truncation=True, max_length=max_length)
            encoded["labels"] = data.labels.index(row["label"])
            return encoded
        return dataset.map(encode, remove_columns=dataset.column_names)

    def encode(row):
        return encode_causal_example(tokenizer, row["prompt"], row["response"], data.instruction, max_length)

    encoded = dataset.map(encode, remove_columns=dataset.column_names)
    kept = encoded.filter(lambda row: any(label != -100 for label in row["labels"]))
    if len(kept) < len(encoded):
        log.warning("dropped %d examples whose prompt fills max_length %d: raise --max-length",
                    len(encoded) - len(kept), max_length)
    if len(kept) == 0:
        raise UserError(f"every example is longer than max_length {max_length}: raise --max-length")
    return kept


def collator(tokenizer, task: str):
    """Pad each batch to its own longest example (dynamic padding)."""
    from transformers import DataCollatorForSeq2Seq, DataCollatorWithPadding

    if task == "classification":
        return DataCollatorWithPadding(tokenizer)
    return DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)
