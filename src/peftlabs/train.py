"""The one training loop, shared by every method.

    peftlabs train                                   # LoRA, SmolLM2, demo tickets
    peftlabs train --config my.yaml --learning-rate 1e-3 --output-dir runs/try2

The run reads top to bottom: settings, run directory, model and data,
method, Trainer, training, saving. A method only decides how the base model
is wrapped (``Method.apply``) and saved; everything else is the same for all.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import signal
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from accelerate import PartialState
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_callback import ProgressCallback

from peftlabs import data as data_module
from peftlabs import records, runs, tracking
from peftlabs.config import RunConfig, write_yaml
from peftlabs.errors import UserError
from peftlabs.evaluate import classification_scores, evaluate_split
from peftlabs.hardware import format_bytes, peak_memory_bytes, pick_device, pick_precision
from peftlabs.methods import get_method
from peftlabs.methods.base import PeftMethod
from peftlabs.models import (
    base_fingerprint,
    check_task_fits_model,
    classification_head_name,
    count_parameters,
    detect_task,
    load_tokenizer,
    read_model_config,
    resolve_model,
)
from peftlabs.versions import library_versions

log = logging.getLogger("peftlabs")


class Interrupted(Exception):
    """Training stopped by Ctrl-C after saving a resumable checkpoint."""

    def __init__(self, run_dir: Path, step: int):
        super().__init__(
            f"training interrupted at step {step}; the checkpoint is kept in {run_dir / runs.CHECKPOINT_DIR}: "
            f"continue with `peftlabs train --output-dir {run_dir} --resume`"
        )


@dataclass
class Prepared:
    """Everything a run needs once settings are checked and the model is built."""

    config: RunConfig
    method: Any
    params: Any
    task: str
    data: data_module.TaskData
    tokenizer: Any
    model: torch.nn.Module
    model_location: str
    device: str
    precision: str
    base_memory_bytes: int


def prepare(config: RunConfig) -> Prepared:
    """Load the base model, data and method for a config, writing nothing to disk."""
    method = get_method(config.method)
    params = method.parse_params(config.method_args.get(method.name))
    device = pick_device(config.device)
    precision = pick_precision(config.precision, device)

    # Model location and task shape (cheap input checks first: resolving an alias may convert a GGUF file).
    data_module.check_data_paths(config)
    location = resolve_model(config.model)
    model_config = read_model_config(location, config.trust_remote_code)
    task = detect_task(model_config) if config.task == "auto" else config.task
    check_task_fits_model(model_config, task, config.model)
    if task not in method.tasks:
        method.check(None, task, params)

    # Data: checked before the (slower) model load so bad columns fail fast.
    tokenizer = load_tokenizer(location, config.trust_remote_code)
    data = data_module.load_task_data(config, task)

    # Base model, then the method on top of it. Seeding first makes the new classification
    # head's random initialisation depend on the seed alone, not on what ran earlier in the process.
    torch.manual_seed(config.seed)
    base = method.load_base(location, data.task, data.labels, tokenizer, params, config.trust_remote_code)
    base_memory = base.get_memory_footprint()
    head = classification_head_name(base) if data.task == "classification" else None
    method.check(base, data.task, params)
    torch.manual_seed(config.seed)
    model = method.apply(base, data.task, params, head)

    return Prepared(config, method, params, task, data, tokenizer, model, location, device, precision, base_memory)


@dataclass
class TrainResult:
    metrics: dict[str, Any]
    model: torch.nn.Module  # the trained model, still in memory
    tokenizer: Any
    data: data_module.TaskData


def train(config: RunConfig) -> TrainResult:
    """Run a whole training job; return its final metrics and the trained model.

    Under ``accelerate launch`` every process runs this function with the same
    config (data parallelism); only the main process writes the run directory.
    """
    run_dir = Path(config.output_dir)
    state = PartialState(cpu=pick_device(config.device) == "cpu")
    is_main = state.is_main_process
    if not is_main:
        log.setLevel(logging.WARNING)  # the main process logs for all of them

    # Every process checks the folder before the main one may create it.
    check_sharding(config.method)
    runs.check_output_dir(run_dir, config.overwrite, config.resume)
    state.wait_for_everyone()

    # The main process loads and tokenises first, so the others read the datasets cache.
    with state.main_process_first():
        prepared = prepare(config)
        method, data, tokenizer, model = prepared.method, prepared.data, prepared.tokenizer, prepared.model

        # Tokenise; dynamic padding happens per batch in the collator.
        train_set = data_module.tokenize_split(data.train, tokenizer, data, config.max_length)
        eval_set = data_module.tokenize_split(data.eval, tokenizer, data, config.max_length)

    # Only now, with every input checked, touch the run directory.
    trainable, total = count_parameters(model)
    file_handler = None
    if is_main:
        if config.overwrite and not config.resume:
            runs.replace_dir(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        file_handler = _log_to_file(run_dir / "train.log")
        # Record the learning rate actually used, so config.yaml reruns the same run.
        resolved = dataclasses.replace(config, learning_rate=config.learning_rate or method.default_learning_rate)
        write_yaml(resolved, run_dir / "config.yaml")
        runs.write_json_atomic(run_dir / "run.json", _run_record(prepared, trainable, total, state.num_processes))
    state.wait_for_everyone()

    log.info("method %s on %s (%s), %s / %s parameters trainable (%.3f%%)", method.name, config.model, data.task,
             f"{trainable:,}", f"{total:,}", 100 * trainable / total)
    log.info("base model memory %s; device %s, precision %s; %d train / %d eval examples; %d process%s",
             format_bytes(prepared.base_memory_bytes), prepared.device, prepared.precision,
             len(train_set), len(eval_set), state.num_processes, "" if state.num_processes == 1 else "es")

    trainer = _build_trainer(prepared, run_dir, train_set, eval_set)
    accelerator = trainer.accelerator

    # Train; the first Ctrl-C finishes the current step and saves a checkpoint.
    resume_from = None
    if config.resume:
        if is_main:
            runs.remove_incomplete_checkpoints(run_dir)
        accelerator.wait_for_everyone()
        checkpoint = runs.last_complete_checkpoint(run_dir)
        resume_from = str(checkpoint) if checkpoint else None
        if is_main:
            tracking.truncate_log(run_dir / tracking.LOG_FILE, int(checkpoint.name.split("-")[1]) if checkpoint else 0)
        log.info("resuming from %s", checkpoint or "the start (no complete checkpoint)")
    started = time.perf_counter()
    stopper = _GracefulStop()
    trainer.add_callback(stopper)
    with stopper.installed(), tracking.mlflow_store(run_dir, config.report_to, is_main):
        result = trainer.train(resume_from_checkpoint=resume_from)
        if stopper.requested:
            if file_handler:
                file_handler.close()
            raise Interrupted(run_dir, trainer.state.global_step)
        train_seconds = time.perf_counter() - started

        # Save the adapter in one atomic step.
        _save_adapter(trainer, method, model, run_dir, is_main)

        # Throughput over all processes: each one counted only its own batches.
        counter = trainer.token_counter
        tokens = int(accelerator.reduce(torch.tensor(counter.tokens, device=accelerator.device), "sum"))
        metrics: dict[str, Any] = {
            "train_loss": result.training_loss,
            "train_seconds": round(train_seconds, 2),
            "train_tokens": tokens,
            # Of those, prompt tokens computed once per batch instead of once per row (shared_prefix).
            "train_tokens_shared": int(accelerator.reduce(torch.tensor(counter.shared_tokens,
                                                                       device=accelerator.device), "sum")),
            "train_tokens_per_second": round(tokens / max(counter.seconds, 1e-9), 1),
            "peak_memory_bytes": peak_memory_bytes(prepared.device),
            "base_memory_bytes": prepared.base_memory_bytes,
            "trainable_parameters": trainable,
            "total_parameters": total,
            "steps": trainer.state.global_step,
            "processes": state.num_processes,
        }

        # Final evaluation: the eval loss is computed by all processes together,
        # the generation-based scores by the main process alone.
        summary = "eval skipped (final_eval false)"
        if config.final_eval:
            metrics["eval_loss"] = trainer.evaluate().get("eval_loss")
            if is_main:
                scores, _ = evaluate_split(model, tokenizer, data, data.eval, config.eval_batch_size,
                                           config.max_length, config.max_new_tokens)
                metrics.update({f"eval_{name}": value for name, value in scores.items()})
            summary = "  ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k.startswith("eval_")
                                and isinstance(v, float))

    if is_main:
        final = {key: value for key, value in metrics.items() if key.startswith("eval_")}
        tracking.append_record(run_dir / tracking.LOG_FILE, {"step": trainer.state.global_step, "final": True,
                                                             **final})
        runs.write_json_atomic(run_dir / "metrics.json", metrics)
    accelerator.wait_for_everyone()

    log.info("done in %.0f s: %s  %s tok/s  peak %s; adapter in %s", train_seconds, summary,
             f"{metrics['train_tokens_per_second']:,.0f}", format_bytes(metrics["peak_memory_bytes"]),
             run_dir / runs.ADAPTER_DIR)
    if file_handler:
        file_handler.close()
        logging.getLogger().removeHandler(file_handler)
    model.eval()
    return TrainResult(metrics, model, tokenizer, data)


def sharding_backend() -> str | None:
    """'FSDP' or 'DeepSpeed' when `accelerate launch` set up sharded training, else None."""
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        return "FSDP"
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        return "DeepSpeed"
    return None


def check_sharding(method_name: str) -> None:
    """Reject methods that cannot be trained or saved under FSDP or DeepSpeed here."""
    backend = sharding_backend()
    if backend is None:
        return
    method = get_method(method_name)
    if backend == "FSDP" and method.name == "qlora":
        # TODO: FSDP-QLoRA needs bnb_4bit_quant_storage equal to the model's float dtype
        # (bfloat16) and the model loaded in that dtype; the qlora method keeps uint8 storage.
        raise UserError(
            "qlora cannot run under FSDP yet: FSDP shards only float tensors and the qlora method stores "
            "4-bit weights as uint8; train qlora with DDP (configs/accelerate/ddp.yaml)"
        )
    if not isinstance(method, PeftMethod):
        raise UserError(
            f"method '{method.name}' cannot be saved from {backend} shards (only peft-backed methods are "
            f"gathered): train it with DDP (configs/accelerate/ddp.yaml)"
        )


def _save_adapter(trainer, method, model, run_dir: Path, is_main: bool) -> None:
    """Write the adapter on the main process; under FSDP or DeepSpeed gather it from the shards first."""
    accelerator = trainer.accelerator
    state_dict = None
    if sharding_backend():
        # NOTE: not run in this project's tests (they have no GPUs); accelerate gathers the
        # full state dict on the main process (FULL_STATE_DICT, zero3_save_16bit_model).
        state_dict = accelerator.get_state_dict(trainer.model_wrapped)
    if is_main:
        with runs.atomic_dir(run_dir / runs.ADAPTER_DIR) as staging:
            if state_dict is None:
                method.save(model, staging)
            else:
                model.save_pretrained(str(staging), state_dict=state_dict, safe_serialization=True)
    accelerator.wait_for_everyone()


def _run_record(prepared: Prepared, trainable: int, total: int, processes: int) -> dict[str, Any]:
    """Contents of run.json: what the run was, and what it needs to be reproduced."""
    config, data, model = prepared.config, prepared.data, prepared.model
    return {
        "method": prepared.method.name,
        "model": config.model,
        "model_location": prepared.model_location,
        "task": data.task,
        "labels": data.labels,
        "instruction": data.instruction,
        "generative_classification": data.generative_classification,
        "base_fingerprint": base_fingerprint(model.get_base_model() if hasattr(model, "get_base_model") else model),
        "trainable_parameters": trainable,
        "total_parameters": total,
        "seed": config.seed,
        "processes": processes,
        "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "versions": library_versions(),
        "code": records.code_version(),
        "data_fingerprint": {
            "train": records.data_fingerprint(data.train),
            "eval": records.data_fingerprint(data.eval),
        },
    }


def _build_trainer(prepared: Prepared, run_dir: Path, train_set, eval_set) -> "PeftLabsTrainer":
    config = prepared.config
    learning_rate = config.learning_rate or prepared.method.default_learning_rate
    args = TrainingArguments(
        output_dir=str(run_dir / runs.CHECKPOINT_DIR),
        num_train_epochs=config.epochs,
        max_steps=config.max_steps,
        per_device_train_batch_size=config.batch_size,
        per_device_eval_batch_size=config.eval_batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        learning_rate=learning_rate,
        weight_decay=config.weight_decay,
        warmup_ratio=config.warmup_ratio,
        lr_scheduler_type=config.lr_scheduler,
        seed=config.seed,
        data_seed=config.seed,
        bf16=prepared.precision == "bf16",
        fp16=prepared.precision == "fp16",
        use_cpu=prepared.device == "cpu",
        group_by_length=config.group_by_length,
        gradient_checkpointing=config.gradient_checkpointing,
        # Non-reentrant checkpointing: the reentrant form drops the gradient when
        # the checkpointed block's inputs do not require grad, which is the case
        # for every frozen base model here (the loss then has no grad_fn).
        gradient_checkpointing_kwargs={"use_reentrant": False},
        dataloader_num_workers=config.dataloader_workers,
        logging_steps=config.logging_steps,
        save_strategy="steps",
        save_steps=config.save_steps,
        save_total_limit=2,
        eval_strategy="steps" if config.eval_steps else "no",
        eval_steps=config.eval_steps,
        report_to=config.report_to or [],
        logging_dir=str(run_dir / tracking.TENSORBOARD_DIR),
        remove_unused_columns=False,
        disable_tqdm=False,
        label_names=["labels"],
        prediction_loss_only=prepared.data.task == "causal_lm",
    )
    causal = prepared.data.task == "causal_lm"
    if causal:
        prepared.tokenizer.padding_side = "left"  # responses end at the last column; see PeftLabsTrainer
    trainer = PeftLabsTrainer(
        model=prepared.model,
        args=args,
        train_dataset=train_set,
        eval_dataset=eval_set,
        data_collator=data_module.collator(prepared.tokenizer, prepared.data.task),
        compute_metrics=None if causal else _classification_metrics(prepared.data),
        response_only_logits=causal and _supports_logits_to_keep(prepared.model),
        shared_prefix=causal and config.shared_prefix and not config.gradient_checkpointing
        and _supports_shared_prefix(prepared.model),
    )
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(UnitsProgressCallback(trainer.token_counter, prepared.device))
    trainer.add_callback(tracking.JsonlLogCallback(run_dir / tracking.LOG_FILE, trainer.token_counter))
    return trainer


def _is_prompt_learning(model) -> bool:
    config = getattr(model, "active_peft_config", None)
    return bool(config is not None and getattr(config, "is_prompt_learning", False))


def _supports_logits_to_keep(model) -> bool:
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    has_output_layer = base.get_output_embeddings() is not None
    return has_output_layer and "logits_to_keep" in inspect.signature(base.forward).parameters


def _supports_shared_prefix(model) -> bool:
    """Return whether the model can run a batch's shared prompt once and continue every row from its cache.

    Prompt-learning methods are left out: they already pass their own
    virtual tokens as the cache. So are models with `adapters` bottleneck
    adapters: with adapters 1.3.0 a Llama model continuing from a cache
    gives a different loss (and repeats tokens in cached generation, see
    methods/bottleneck.py).
    """
    import inspect

    if _is_prompt_learning(model) or hasattr(model, "adapters_config"):
        return False
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    parameters = inspect.signature(base.forward).parameters
    is_decoder_only = not getattr(base.config, "is_encoder_decoder", False)
    return is_decoder_only and "past_key_values" in parameters and "use_cache" in parameters


def _classification_metrics(data):
    def compute(prediction):
        predicted = [data.labels[i] for i in prediction.predictions.argmax(-1)]
        gold = [data.labels[i] for i in prediction.label_ids]
        return classification_scores(gold, predicted)

    return compute


class TokenCounter:
    """Non-padding tokens processed by training steps, and the time they took."""

    def __init__(self):
        self.tokens = 0
        self.seconds = 0.0
        self.shared_tokens = 0  # prompt tokens computed once per batch instead of once per row


class PeftLabsTrainer(Trainer):
    """Trainer that counts real tokens and, for causal LMs, computes logits only where the loss needs them.

    Causal LM batches are padded on the left, so every response ends at the
    last column. The loss covers response tokens only, so the model computes
    hidden states for the last ``keep`` positions only (``logits_to_keep``).
    A forward pre-hook on the output layer (RowSelection) then keeps only the
    rows whose next token is in the loss, which also drops the padding of
    shorter responses inside that window. The vocabulary projection of
    SmolLM2 (576 x 49,152) is about a fifth of the model's multiply-adds per
    token, so skipping the prompt positions saves most of it. The kept rows
    form one 2-D matrix, which torch multiplies with one ``mm``. The strided
    3-D slice used before ran as a batched ``bmm``, about 1.5 times slower in
    a micro-benchmark. The loss is the same token-averaged cross-entropy
    that transformers computes.
    """

    def __init__(self, *args, response_only_logits: bool = False, shared_prefix: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.token_counter = TokenCounter()
        self.response_only_logits = response_only_logits
        # NOTE: the shared prefix calls the model twice per step, which DDP and the sharded
        # backends were not tested with, so multi-process runs compute every row in full.
        self.shared_prefix = response_only_logits and shared_prefix and self.args.world_size == 1
        if response_only_logits:
            # compute_loss below divides by the token count of the whole
            # accumulated batch, so the Trainer must not divide again.
            self.model_accepts_loss_kwargs = True
            self.loss_rows = RowSelection()
            self.model.get_output_embeddings().register_forward_pre_hook(self.loss_rows)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not self.response_only_logits or "labels" not in inputs:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

        loss_sum, outputs, targets, shared = response_loss_sum(model, inputs, self.loss_rows, self.shared_prefix)
        if model.training:
            self.token_counter.shared_tokens += shared
        count = num_items_in_batch if num_items_in_batch is not None else targets.numel()
        loss = loss_sum / count.to(loss_sum.device) if torch.is_tensor(count) else loss_sum / count
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            # The count is over all processes' batches and DDP averages the gradients over
            # processes, so each process's share is scaled back up, as Trainer.compute_loss does.
            loss = loss * self.accelerator.num_processes
        return (loss, outputs) if return_outputs else loss

    def training_step(self, model, inputs, num_items_in_batch=None):
        started = time.perf_counter()
        loss = super().training_step(model, inputs, num_items_in_batch)
        self.token_counter.seconds += time.perf_counter() - started
        mask = inputs.get("attention_mask")
        self.token_counter.tokens += int(mask.sum()) if mask is not None else inputs["input_ids"].numel()
        return loss


def response_loss_sum(model, inputs, row_selection: "RowSelection", shared_prefix: bool = False):
    """Return the summed cross-entropy over the response tokens, the model outputs, the targets
    and the number of prompt tokens the shared prefix saved computing.

    ``inputs`` is a left-padded causal LM batch with ``labels`` of -100 outside
    the responses. ``row_selection`` is the RowSelection hook registered on
    the model's output layer. With ``shared_prefix``, the prompt tokens that
    begin every row are computed once (see ``shared_prefix_length``).
    """
    labels = inputs["labels"]
    model_inputs = {key: value for key, value in inputs.items() if key != "labels"}
    if not _is_prompt_learning(model):
        # Left padding shifts positions, so each row gets positions counted from its first real token.
        # Prompt-learning models skip this: peft ignores their position ids, and rotary attention
        # depends only on relative positions, which left padding does not change.
        mask = inputs["attention_mask"]
        model_inputs["position_ids"] = (mask.long().cumsum(-1) - 1).clamp(min=0)

    # The prompt that every row begins with runs once, and the rows continue from its cache.
    prefix = shared_prefix_length(inputs["input_ids"], inputs["attention_mask"], labels) if shared_prefix else 0
    if prefix:
        model_inputs, labels = _continue_after_prefix(model, model_inputs, labels, prefix)

    # Hidden states for the positions from the one before the first response token to the
    # end. Position j of that window predicts token j + 1, so the last one predicts nothing.
    length = labels.shape[1]
    first_response = (labels != -100).long().argmax(dim=1)
    keep = min(int((length - first_response).max()) + 1, length)
    window_targets = torch.nn.functional.pad(labels[:, length - keep + 1:], (0, 1), value=-100)
    in_loss = window_targets != -100

    # Logits only for the rows in the loss, as one [rows, vocabulary] matrix.
    row_selection.rows = in_loss.reshape(-1).nonzero().squeeze(1)
    try:
        outputs = model(**model_inputs, logits_to_keep=keep)
    finally:
        row_selection.rows = None
    logits = outputs.logits.float()
    targets = window_targets[in_loss]

    loss_sum = torch.nn.functional.cross_entropy(logits, targets, reduction="sum")
    return loss_sum, outputs, targets, (labels.shape[0] - 1) * prefix


# Tokens. An estimate, not measured: a shorter prefix saves too little to pay for the extra forward call.
MIN_SHARED_PREFIX = 8


def shared_prefix_length(input_ids, attention_mask, labels) -> int:
    """Length of the prompt that begins every row of a left-padded batch, or 0 if not worth sharing.

    Instruction data usually renders the same system instruction at the start
    of every example, so a batch of B rows computes those tokens B times.
    The prefix stops before the position that predicts the first response
    token of any row, and leaves every row at least one token of its own.
    """
    rows, length = input_ids.shape
    real = attention_mask.long().sum(dim=1)
    start = length - real
    columns = torch.arange(length, device=input_ids.device)
    left_padded = torch.equal(attention_mask.bool(), columns[None] >= start[:, None])
    if rows < 2 or not left_padded:
        return 0

    # The first tokens every row has, aligned at each row's first real token.
    shortest = int(real.min())
    aligned = start[:, None] + columns[None, :shortest]
    tokens = input_ids.gather(1, aligned)
    same = (tokens == tokens[:1]).all(dim=0)
    prefix = int(same.long().cumprod(dim=0).sum())

    # Stop before the position that predicts each row's first response token.
    has_response = (labels != -100).any(dim=1)
    first_response = torch.where(has_response, (labels != -100).long().argmax(dim=1) - start, real)
    prefix = min(prefix, int(first_response.min()) - 1, shortest - 1)
    return prefix if prefix >= MIN_SHARED_PREFIX else 0


def _continue_after_prefix(model, model_inputs, labels, prefix: int):
    """Run the shared prefix once and return the inputs and labels of the rest of every row.

    The prefix's keys and values go into a cache, copied for every row, and
    each row continues after it with its own tokens, still left-padded. The
    keys are in the order [prefix, padding, row] and the positions are
    unchanged, so every loss term equals the one from the whole batch. Gradients flow back
    through the copies into the one prefix computation. One difference from
    per-row computation: dropout (such as LoRA's) draws one mask for the
    prefix and every row shares it.
    """
    from transformers import DynamicCache

    input_ids, mask, positions = model_inputs["input_ids"], model_inputs["attention_mask"], model_inputs["position_ids"]
    rows, length = input_ids.shape
    start = length - mask.long().sum(dim=1)

    # 1. The prefix, as a batch of one row. Its logits are not needed, so only one position's are computed.
    first = int(start[0])
    window = slice(first, first + prefix)
    cache = DynamicCache()
    model(input_ids=input_ids[:1, window], attention_mask=mask[:1, window], position_ids=positions[:1, window],
          past_key_values=cache, use_cache=True, logits_to_keep=1)
    cache.batch_repeat_interleave(rows)

    # 2. Every row without its prefix columns, with the padding still on the left.
    columns = torch.arange(length - prefix, device=input_ids.device)
    source = columns[None] + prefix * (columns[None] >= start[:, None])
    rest_mask = mask.gather(1, source)
    rest_inputs = {
        "input_ids": input_ids.gather(1, source),
        "attention_mask": torch.cat([mask.new_ones(rows, prefix), rest_mask], dim=1),
        "position_ids": positions.gather(1, source),
        "past_key_values": cache,
        "use_cache": True,
    }
    return rest_inputs, labels.gather(1, source)


class RowSelection:
    """Forward pre-hook of the output layer: while ``rows`` is set, the layer receives only those rows.

    The rows index the flattened [batch x positions] hidden states. Outside
    PeftLabsTrainer.compute_loss ``rows`` is None and the layer is unchanged.
    """

    def __init__(self):
        self.rows = None

    def __call__(self, module, args):
        if self.rows is None:
            return None
        hidden = args[0]
        return (hidden.reshape(-1, hidden.shape[-1])[self.rows], *args[1:])


class UnitsProgressCallback(ProgressCallback):
    """Progress bars, with log lines that give loss, throughput and memory in units."""

    def __init__(self, counter: TokenCounter, device: str):
        super().__init__()
        self.counter = counter
        self.device = device
        self.last_tokens = 0
        self.last_seconds = 0.0

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        if "loss" in logs:
            tokens = self.counter.tokens - self.last_tokens
            seconds = self.counter.seconds - self.last_seconds
            self.last_tokens, self.last_seconds = self.counter.tokens, self.counter.seconds
            rate = tokens / seconds if seconds > 0 else math.nan
            log.info("step %d/%d  loss %.4f  lr %.2e  %s tok/s  peak %s", state.global_step, state.max_steps,
                     logs["loss"], logs.get("learning_rate", math.nan), f"{rate:,.0f}",
                     format_bytes(peak_memory_bytes(self.device)))
        elif "eval_loss" in logs:
            extra = "  ".join(f"{k[5:]} {v:.4f}" for k, v in logs.items()
                              if k.startswith("eval_") and k not in ("eval_loss", "eval_runtime")
                              and isinstance(v, float) and "per_second" not in k)
            log.info("step %d  eval loss %.4f  %s", state.global_step, logs["eval_loss"], extra)


class _GracefulStop(TrainerCallback):
    """First Ctrl-C: stop after the current step and save a checkpoint. Second: abort."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def installed(self):
        stopper = self

        class _Scope:
            def __enter__(self):
                stopper._previous = signal.signal(signal.SIGINT, stopper._handle)

            def __exit__(self, *exc):
                signal.signal(signal.SIGINT, stopper._previous)

        return _Scope()

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        log.warning("Ctrl-C: finishing this step and saving a checkpoint (press again to abort)")

    def on_step_end(self, args, state, control, **kwargs):
        if self.requested:
            control.should_save = True
            control.should_training_stop = True
        return control


def _log_to_file(path: Path) -> logging.Handler:
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    logging.getLogger().addHandler(handler)
    return handler
