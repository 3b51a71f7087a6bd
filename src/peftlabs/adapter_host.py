"""One base model in memory and many adapters of any method, switched per request.

This is the model side of `peftlabs serve` (the HTTP side is serve.py). The
host loads the base model once and registers adapters from peftlabs run
directories. At most one adapter is attached to the base at a time. A request
for another adapter first restores the base and then attaches the requested
one, and a single model lock orders these switches and every model call:

  * LoRA, IA3 and QLoRA (peft tuners) inject layers into the base in place:
    attach is ``PeftModel.from_pretrained`` and detach is ``unload()``, which
    puts the original linear layers back without merging anything.
  * Prompt tuning, prefix tuning, P-tuning and P-tuning v2 (peft prompt
    learning) wrap the base without changing it: detach drops the wrapper.
  * Bottleneck adapters (the `adapters` library) are loaded into the base with
    ``load_adapter`` and removed with ``delete_adapter``.
  * BitFit copies trained bias vectors into the base: the original biases are
    kept on attach and copied back on detach.

Attaching uses each method's own ``load()``, the same call that
``peftlabs infer`` makes, so every adapter returns what direct inference with
its run returns. Repeated requests to the same adapter pay no switching cost;
benchmarks/serve.py measures the cost of a switch.

Limits of this design:
  * Requests run one at a time on the model, because switching adapters
    changes the shared base. Concurrency only overlaps HTTP handling.
  * QLoRA adapters need the 4-bit NF4 base they were trained on, so the host
    loads a 4-bit copy of the base when the first QLoRA adapter is registered.
  * Bottleneck adapters get a second fp32 copy of the base, loaded with the
    first one (see SLOT_OF_METHOD): that copy costs as much memory as the base.
  * The host serves one task, which comes from the base model: a causal LM
    base serves causal-LM runs, an encoder base serves classification runs.
    A classification run trained on a causal LM base (``--task classification``
    on SmolLM2) needs a server of its own (``--task classification``).
  * A switch reads the adapter file again from disk; adapters are not cached
    in memory between switches.
"""

from __future__ import annotations

import copy
import logging
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from peftlabs import runs
from peftlabs.data import chat_messages, encode_prompt
from peftlabs.errors import UserError
from peftlabs.infer import LoadedRun, predict, read_run_config
from peftlabs.methods.base import PeftMethod
from peftlabs.models import (
    HEAD_NAMES,
    base_fingerprint,
    classification_head_name,
    detect_task,
    load_base_model,
    load_tokenizer,
    read_model_config,
    resolve_model,
)

log = logging.getLogger("peftlabs.serve")

# File types that unpickle on load; the host loads adapters from safetensors files only.
PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt"}
# Label names of the served classification base before any adapter installs its own head.
PLACEHOLDER_LABELS = ["LABEL_0", "LABEL_1"]
# Base copy each method attaches to; methods not listed use the fp32 base ("fp32").
# QLoRA needs the 4-bit base it was trained on. Bottleneck adapters get their own
# copy because `adapters.init` changes the model's classes for good, and with
# adapters 1.3.0 cached decoding of such a model differs from the plain model's
# even with no adapter active, which changed LoRA answers after a switch.
SLOT_OF_METHOD = {"qlora": "nf4", "adapters": "adapters"}
# Default answer length for the base model alone; an adapter uses its run's max_new_tokens.
BASE_MAX_NEW_TOKENS = 64


class HostError(Exception):
    """A request the host cannot serve; ``status`` is the HTTP status the server sends."""

    def __init__(self, status: int, message: str, code: str, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.kind = kind


@dataclass
class HostedAdapter:
    """A registered run: its settings and, for classification, its own head module."""

    name: str
    run_dir: Path
    info: dict[str, Any]
    config: Any
    method: Any
    params: Any
    slot: str  # key of the base copy it attaches to: "fp32", or "nf4" for QLoRA
    head: torch.nn.Module | None
    removed: bool = False

    @property
    def default_max_tokens(self) -> int:
        # The same rule as peftlabs.infer.predict.
        return 8 if self.info["generative_classification"] else self.config.max_new_tokens


@dataclass
class Attachment:
    """The adapter now attached to a base copy, the module to call, and how to detach it."""

    adapter: HostedAdapter
    model: torch.nn.Module
    detach: Callable[[], None]


@dataclass
class BaseSlot:
    """One in-memory copy of the base model and the adapter attached to it, if any."""

    model: torch.nn.Module
    fingerprint: str
    active: Attachment | None = None


@dataclass
class Generation:
    prompt_tokens: int
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str = "stop"  # "length" when max_tokens ended the answer


class ModelHost:
    """The served base model, its registered adapters and the lock that orders their use."""

    def __init__(self, model: str, trust_remote_code: bool = False, task: str | None = None):
        self.name = model
        self.location = resolve_model(model)
        self.trust_remote_code = trust_remote_code
        model_config = read_model_config(self.location, trust_remote_code)
        self.task = task or detect_task(model_config)
        self.max_positions = getattr(model_config, "max_position_embeddings", None)
        self.tokenizer = load_tokenizer(self.location, trust_remote_code)

        base = self._load_base("fp32")
        self.slots = {"fp32": BaseSlot(base, base_fingerprint(base))}
        self.adapters: dict[str, HostedAdapter] = {}

        # The model lock orders every use of a base copy (attach, detach, forward).
        # The tokenizer lock guards the fast tokenizer, whose padding and
        # truncation settings are not safe to change from two threads at once.
        # Lock order: model lock first, then tokenizer lock.
        self.model_lock = threading.Lock()
        self.tokenizer_lock = threading.Lock()
        self.registry_lock = threading.Lock()
        self.switches = 0  # adapter attaches, including those at registration
        self.switch_seconds = 0.0  # time spent detaching and attaching, summed
        log.info("serving base model %s (%s) from %s", model, self.task, self.location)

    # -- registry ----------------------------------------------------------

    def model_names(self) -> list[str]:
        return [self.name, *self.adapters]

    def resolve(self, name: str) -> HostedAdapter | None:
        """Return the adapter served as ``name``, None for the base model, or raise 404."""
        if name == self.name:
            return None
        adapter = self.adapters.get(name)
        if adapter is None:
            known = ", ".join(self.model_names())
            raise HostError(404, f"model '{name}' not found: choose one of {known}", "model_not_found")
        return adapter

    def add_adapter(self, name: str, run_dir: str | Path) -> HostedAdapter:
        """Register a run under ``name`` after checking it fits the served base; attach it once to prove it loads."""
        run_dir = Path(run_dir).expanduser()
        with self.registry_lock:
            if name == self.name or name in self.adapters:
                raise HostError(409, f"model name '{name}' is already in use: unload it first or choose another name",
                                "name_in_use")
            try:
                adapter = self._load_adapter(name, run_dir)
            except (UserError, HostError):
                raise
            except Exception as error:
                # A corrupt file or an adapter that does not fit the model's layers.
                raise UserError(f"could not load the adapter in {run_dir}: {type(error).__name__}: {error}") from error
            self.adapters[name] = adapter
        log.info("loaded adapter %s (%s) from %s", name, adapter.method.name, run_dir)
        return adapter

    def _load_adapter(self, name: str, run_dir: Path) -> HostedAdapter:
        """Check a run against the served base and attach it once; raise UserError when it does not fit."""
        info, config, method, params = read_run_config(run_dir)
        if info["task"] != self.task:
            raise UserError(
                f"run {run_dir} is a {info['task']} run, but this server's base model {self.name} is served "
                f"as {self.task}: start a separate server for {info['task']} runs"
            )
        _check_safetensors_only(run_dir / runs.ADAPTER_DIR)

        slot_key = SLOT_OF_METHOD.get(method.name, "fp32")
        slot = self._slot(slot_key, method, params)
        if info["base_fingerprint"] != slot.fingerprint:
            raise UserError(
                f"adapter in {run_dir} was trained on base model '{info['model']}', which differs from the "
                f"served base '{self.name}' (architecture or weights): serve it with --model {info['model']}"
            )
        head = _head_for_labels(slot.model, info["labels"]) if self.task == "classification" else None
        adapter = HostedAdapter(name, run_dir, info, config, method, params, slot_key, head)

        with self.model_lock:
            self._activate(adapter)
            self._detach(slot)
        return adapter

    def remove_adapter(self, name: str) -> None:
        with self.registry_lock:
            if name == self.name:
                raise HostError(400, f"'{name}' is the base model, which cannot be unloaded", "base_model")
            adapter = self.resolve(name)
            with self.model_lock:
                slot = self.slots[adapter.slot]
                if slot.active is not None and slot.active.adapter is adapter:
                    self._detach(slot)
                adapter.removed = True
                del self.adapters[name]
        log.info("unloaded adapter %s", name)

    def _slot(self, key: str, method, params) -> BaseSlot:
        """Return the base copy ``key``, loading it the first time a run needs it."""
        if key not in self.slots:
            log.info("loading a second copy of %s (%s) for %s adapters", self.name, key, method.name)
            base = self._load_base(key)
            self.slots[key] = BaseSlot(base, base_fingerprint(base))
        return self.slots[key]

    def _load_base(self, key: str) -> torch.nn.Module:
        from peftlabs.methods import get_method

        labels = PLACEHOLDER_LABELS if self.task == "classification" else None
        if key == "nf4":
            method = get_method("qlora")
            base = method.load_base(self.location, self.task, labels, self.tokenizer, method.parse_params({}),
                                    self.trust_remote_code)
        else:
            base = load_base_model(self.location, self.task, labels, self.tokenizer,
                                   trust_remote_code=self.trust_remote_code)
        base.eval()
        return base

    # -- switching ---------------------------------------------------------

    @contextmanager
    def use(self, adapter: HostedAdapter | None, deadline: float | None) -> Iterator[torch.nn.Module]:
        """Hold the model lock with ``adapter`` (None: the bare base) attached; yield the module to call."""
        timeout = -1 if deadline is None else max(0.0, deadline - time.monotonic())
        if not self.model_lock.acquire(timeout=timeout):
            raise HostError(504, "request timed out waiting for the model: retry later or raise --timeout",
                            "timeout", "timeout_error")
        try:
            if adapter is not None and adapter.removed:
                raise HostError(404, f"model '{adapter.name}' was unloaded while the request waited",
                                "model_not_found")
            yield self._activate(adapter) if adapter is not None else self._bare_base()
        finally:
            self.model_lock.release()

    def _bare_base(self) -> torch.nn.Module:
        slot = self.slots["fp32"]
        self._detach(slot)
        return slot.model

    def _activate(self, adapter: HostedAdapter) -> torch.nn.Module:
        slot = self.slots[adapter.slot]
        if slot.active is not None and slot.active.adapter is adapter:
            return slot.active.model
        started = time.perf_counter()
        self._detach(slot)
        try:
            slot.active = self._attach(slot.model, adapter)
        except BaseException:
            # A failed attach may have left the base half-changed: load it again.
            self._reload(adapter.slot)
            raise
        self.switches += 1
        self.switch_seconds += time.perf_counter() - started
        return slot.active.model

    def _detach(self, slot: BaseSlot) -> None:
        if slot.active is None:
            return
        attachment, slot.active = slot.active, None
        try:
            attachment.detach()
        except BaseException:
            log.exception("detaching adapter %s failed; reloading the base model", attachment.adapter.name)
            self._reload(attachment.adapter.slot)
            raise

    def _reload(self, key: str) -> None:
        self.slots[key] = BaseSlot(self._load_base(key), self.slots[key].fingerprint)

    def _attach(self, base: torch.nn.Module, adapter: HostedAdapter) -> Attachment:
        directory = adapter.run_dir / runs.ADAPTER_DIR
        task = adapter.info["task"]
        if adapter.head is not None:
            _install_head(base, adapter.head, adapter.info["labels"])

        if isinstance(adapter.method, PeftMethod):
            model = adapter.method.load(base, directory, task)
            model.eval()
            return Attachment(adapter, model, lambda: _detach_peft(model, base))

        if adapter.method.name == "adapters":
            from peftlabs.methods.bottleneck import ADAPTER_NAME

            use_cache = getattr(getattr(base, "generation_config", None), "use_cache", None)
            model = adapter.method.load(base, directory, task)

            def detach_bottleneck() -> None:
                base.delete_adapter(ADAPTER_NAME)
                if use_cache is not None:
                    base.generation_config.use_cache = use_cache

            return Attachment(adapter, model, detach_bottleneck)

        if adapter.method.name == "bitfit":
            from safetensors import safe_open

            from peftlabs.methods.bitfit import WEIGHTS_FILE

            parameters = dict(base.named_parameters())
            with safe_open(str(directory / WEIGHTS_FILE), "pt") as file:
                names = list(file.keys())
            # Keep the originals before BitFit's load() copies the trained values in.
            originals = {name: parameters[name].detach().clone() for name in names if name in parameters}
            model = adapter.method.load(base, directory, task)

            def restore_biases() -> None:
                with torch.no_grad():
                    for name, value in originals.items():
                        parameters[name].copy_(value)

            return Attachment(adapter, model, restore_biases)

        raise UserError(f"method '{adapter.method.name}' cannot be served: it has no attach/detach rule")

    # -- inference ---------------------------------------------------------

    def encode_completion(self, adapter: HostedAdapter | None, prompt: str) -> list[int]:
        """Token ids of ``prompt`` formatted as `peftlabs infer --text` formats it."""
        instruction = adapter.info["instruction"] if adapter is not None else None
        with self.tokenizer_lock:
            return encode_prompt(self.tokenizer, prompt, instruction)

    def encode_chat(self, adapter: HostedAdapter | None, messages: list[dict[str, str]]) -> list[int]:
        """Token ids of a chat; the run's instruction becomes the system message unless the chat has one."""
        instruction = adapter.info["instruction"] if adapter is not None else None
        if instruction and not any(message["role"] == "system" for message in messages):
            messages = chat_messages("", instruction)[:1] + messages
        with self.tokenizer_lock:
            if self.tokenizer.chat_template:
                return list(self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True))
            text = "".join(f"{message['role']}: {message['content']}\n" for message in messages) + "assistant: "
            return self.tokenizer(text)["input_ids"]

    def count_tokens(self, text: str) -> int:
        with self.tokenizer_lock:
            return len(self.tokenizer(text)["input_ids"])

    def generate(self, adapter: HostedAdapter | None, prompt_ids: list[int], max_new_tokens: int,
                 sampling: dict[str, Any], deadline: float | None, on_text: Callable[[str], None] | None = None,
                 cancelled: threading.Event | None = None) -> Generation:
        """Generate an answer to ``prompt_ids``; ``on_text`` receives the text as it grows, in pieces.

        Greedy decoding (``sampling`` empty) runs the same ``generate`` call as
        peftlabs.evaluate.generate does for one prompt, so the text is the same.
        """
        from transformers import StoppingCriteria, StoppingCriteriaList
        from transformers.generation.streamers import BaseStreamer

        result = Generation(prompt_tokens=len(prompt_ids))
        pieces = TextPieces(self.tokenizer, self.tokenizer_lock)
        timed_out = threading.Event()

        class Streamer(BaseStreamer):
            first = True

            def put(self, value):
                if self.first:  # generate() passes the prompt first
                    self.first = False
                    return
                ids = value.reshape(-1).tolist()
                result.token_ids.extend(ids)
                piece = pieces.add(ids)
                if piece and on_text is not None:
                    on_text(piece)

            def end(self):
                pass

        class StopEarly(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                if deadline is not None and time.monotonic() > deadline:
                    timed_out.set()
                stop = timed_out.is_set() or (cancelled is not None and cancelled.is_set())
                return torch.full((input_ids.shape[0],), stop, dtype=torch.bool, device=input_ids.device)

        with self.use(adapter, deadline) as model:
            device = next(model.parameters()).device
            input_ids = torch.tensor([prompt_ids], device=device)
            if sampling.get("seed") is not None:
                torch.manual_seed(sampling["seed"])
            model.generate(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                max_new_tokens=max_new_tokens,
                **sampling_arguments(sampling),
                pad_token_id=self.tokenizer.pad_token_id,
                eos_token_id=self.tokenizer.eos_token_id,
                stopping_criteria=StoppingCriteriaList([StopEarly()]),
                streamer=Streamer(),
            )
        if timed_out.is_set():
            raise HostError(504, "request timed out during generation: lower max_tokens or raise --timeout",
                            "timeout", "timeout_error")

        piece = pieces.finish()
        if piece and on_text is not None:
            on_text(piece)
        result.text = pieces.text
        ended_by_eos = bool(result.token_ids) and result.token_ids[-1] == self.tokenizer.eos_token_id
        result.finish_reason = "length" if len(result.token_ids) >= max_new_tokens and not ended_by_eos else "stop"
        return result

    def classify(self, adapter: HostedAdapter, texts: list[str], deadline: float | None) -> list[str]:
        """Labels of ``texts`` from peftlabs.infer.predict with ``adapter`` attached."""
        with self.use(adapter, deadline) as model:
            base = self.slots[adapter.slot].model
            loaded = LoadedRun(adapter.info, adapter.config, adapter.method, adapter.params, self.tokenizer, base,
                               model)
            with self.tokenizer_lock:
                labels = predict(loaded, texts)
        if deadline is not None and time.monotonic() > deadline:
            raise HostError(504, "request timed out during classification: send fewer inputs or raise --timeout",
                            "timeout", "timeout_error")
        return labels


def sampling_arguments(sampling: dict[str, Any]) -> dict[str, Any]:
    """generate() arguments: greedy unless the request set a temperature above 0."""
    if not sampling.get("do_sample"):
        return {"do_sample": False}
    return {"do_sample": True, "temperature": sampling["temperature"], "top_p": sampling.get("top_p", 1.0)}


class TextPieces:
    """Decode generated ids incrementally into pieces whose concatenation is the final, stripped answer.

    The final answer is ``decode(ids, skip_special_tokens=True).strip()``, as in
    peftlabs.evaluate.generate. A piece is sent only once it cannot change:
    trailing whitespace and an incomplete UTF-8 character (decoded as U+FFFD)
    wait for the next token.
    """

    def __init__(self, tokenizer, lock: threading.Lock):
        self.tokenizer = tokenizer
        self.lock = lock
        self.ids: list[int] = []
        self.text = ""  # text sent so far

    def add(self, ids: list[int]) -> str:
        self.ids.extend(ids)
        decoded = self._decode().lstrip()
        stable = decoded.rstrip()
        if stable.endswith("\ufffd") or not stable.startswith(self.text):
            return ""
        piece, self.text = stable[len(self.text):], stable
        return piece

    def finish(self) -> str:
        final = self._decode().strip()
        if not final.startswith(self.text):
            # NOTE: only a tokenizer whose decoding of a longer sequence rewrites
            # earlier characters gets here; the pieces sent so far cannot be taken back.
            log.warning("streamed text is not a prefix of the final answer; sending the final answer's tail")
            piece = final[len(self.text):] if len(final) > len(self.text) else ""
        else:
            piece = final[len(self.text):]
        self.text += piece
        return piece

    def _decode(self) -> str:
        with self.lock:
            return self.tokenizer.decode(self.ids, skip_special_tokens=True)


def _detach_peft(model, base: torch.nn.Module) -> None:
    """Remove a peft adapter: tuners are unloaded without merging, prompt-learning wrappers are dropped."""
    if not model.active_peft_config.is_prompt_learning:
        model.unload()
    if hasattr(base, "peft_config"):
        del base.peft_config


def _check_safetensors_only(directory: Path) -> None:
    unsafe = sorted(path.name for path in directory.rglob("*") if path.suffix.lower() in PICKLE_SUFFIXES)
    if unsafe:
        raise UserError(
            f"adapter folder {directory} contains pickle files ({', '.join(unsafe)}), which can run code when "
            f"loaded: peftlabs serve loads safetensors only; save the adapter with safe_serialization=True"
        )
    if not any(directory.rglob("*.safetensors")):
        raise UserError(f"adapter folder {directory} has no .safetensors file: it is not a finished adapter")


def _head_for_labels(base: torch.nn.Module, labels: list[str]) -> torch.nn.Module:
    """Build a classification head like the base's with one output per label; the adapter supplies its weights."""
    name = classification_head_name(base)
    if name is None:
        raise UserError(f"the served base has no classification head ({', '.join(HEAD_NAMES)})")
    head = copy.deepcopy(getattr(base, name))
    head = getattr(head, "original_module", head)  # a peft modules_to_save wrapper left by a detached adapter
    if isinstance(head, torch.nn.Linear):
        return _linear_like(head, len(labels))
    if isinstance(getattr(head, "out_proj", None), torch.nn.Linear):  # RoBERTa-style two-layer head
        head.out_proj = _linear_like(head.out_proj, len(labels))
        return head
    raise UserError(
        f"cannot build a {len(labels)}-label head for this base: its '{name}' module is not a linear layer "
        f"or a head with an out_proj layer"
    )


def _linear_like(layer: torch.nn.Linear, outputs: int) -> torch.nn.Linear:
    return torch.nn.Linear(layer.in_features, outputs, bias=layer.bias is not None, dtype=layer.weight.dtype,
                           device=layer.weight.device)


def _install_head(base: torch.nn.Module, head: torch.nn.Module, labels: list[str]) -> None:
    setattr(base, classification_head_name(base), head)
    base.num_labels = len(labels)
    base.config.id2label = dict(enumerate(labels))
    base.config.label2id = {label: i for i, label in enumerate(labels)}
