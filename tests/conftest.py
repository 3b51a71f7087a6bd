"""Tiny random models and a small learnable task, all built inside the tests.

The tiny models are saved as local folders, so they go through the same
model-resolution path as a user's own checkpoint. Nothing is downloaded.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ANIMALS = ["cat", "dog", "horse", "tiger", "mouse", "eagle", "shark", "wolf", "goat", "panda"]
FRUITS = ["apple", "pear", "mango", "grape", "lemon", "cherry", "peach", "plum", "banana", "melon"]
FILLER = ["the", "a", "my", "big", "small", "red", "old", "new", "is", "here", "there", "near", "very", "one"]
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def make_sentences(count: int, seed: int) -> list[dict[str, str]]:
    """Short sentences naming an animal or a fruit; the label is which kind."""
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        label = rng.choice(["animal", "fruit"])
        word = rng.choice(ANIMALS if label == "animal" else FRUITS)
        words = rng.sample(FILLER, 3) + [word] + rng.sample(FILLER, 2)
        rng.shuffle(words)
        rows.append({"text": " ".join(words), "label": label})
    return rows


def _vocabulary() -> list[str]:
    words = ANIMALS + FRUITS + FILLER + ["animal", "fruit", "classify", "as", "or", ":", ".", "\n", "user",
                                         "assistant", "system", "reply", "with", "category", "only", "of"]
    return SPECIAL + sorted(set(words))


def build_tokenizer(folder: Path):
    """A word-level tokenizer with ChatML special tokens and a chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(_vocabulary())}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                  pre_tokenizers.Punctuation()])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                        unk_token="<unk>", bos_token="<|im_start|>")
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(folder)
    return tokenizer


def build_bert_tokenizer(folder: Path):
    from transformers import BertTokenizerFast

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + sorted(set(ANIMALS + FRUITS + FILLER))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(words) + "\n")
    tokenizer = BertTokenizerFast(vocab_file=str(folder / "vocab.txt"))
    tokenizer.save_pretrained(folder)
    return tokenizer


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    """A 2-layer Llama-family causal LM (no biases, like SmolLM2)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = build_tokenizer(folder)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                         bos_token_id=tokenizer.bos_token_id, tie_word_embeddings=True,
                         # Large enough embeddings for the frozen, tied output layer to give confident logits.
                         initializer_range=0.2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_llama_other(tmp_path_factory, tiny_llama) -> Path:
    """Same architecture as tiny_llama, different random weights."""
    import torch
    from transformers import LlamaForCausalLM

    folder = tmp_path_factory.mktemp("tiny-llama-other")
    build_tokenizer(folder)
    config = LlamaForCausalLM.from_pretrained(tiny_llama).config
    torch.manual_seed(1)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    """A 2-layer BERT encoder (with biases, like MiniLM)."""
    import torch
    from transformers import BertConfig, BertModel

    folder = tmp_path_factory.mktemp("tiny-bert")
    tokenizer = build_bert_tokenizer(folder)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, max_position_embeddings=64, architectures=["BertModel"],
                        initializer_range=0.2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    BertModel(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def plain_transformers(tmp_path_factory):
    """One isolated Python process that loads merged folders with transformers alone (see plain_transformers.py)."""
    from plain_transformers import PlainTransformersProcess

    process = PlainTransformersProcess(tmp_path_factory.mktemp("plain-transformers"))
    yield process
    process.close()


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture()
def sentences(tmp_path) -> dict[str, Path]:
    """Train and eval JSONL files of the animal/fruit task."""
    return {
        "train": write_jsonl(tmp_path / "train.jsonl", make_sentences(160, seed=1)),
        "eval": write_jsonl(tmp_path / "eval.jsonl", make_sentences(40, seed=2)),
    }


def tiny_config(model: Path, data: dict[str, Path], output: Path, **overrides):
    """A RunConfig for a fast run of a tiny model."""
    from peftlabs.config import build_config

    values = {
        "model": str(model),
        "dataset": str(data["train"]),
        "eval_dataset": str(data["eval"]),
        "output_dir": str(output),
        "max_steps": 80,
        "batch_size": 16,
        "learning_rate": 1e-2,
        "logging_steps": 10,
        "save_steps": 10,
        "max_length": 32,
        "instruction": "classify as {labels}",
        "device": "cpu",
        "precision": "fp32",
    }
    method_args = overrides.pop("method_args", {"lora": {"target_modules": ["all-linear"]}})
    values.update(overrides)
    file_values = dict(method_args)
    return build_config(file_values, values)
