"""`peftlabs serve`: an OpenAI-compatible HTTP server for one base model and many adapters.

    peftlabs serve --model smollm2-135m-instruct --adapter tickets=runs/demo --adapter e2e=runs/e2e
    curl http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \\
        -d '{"model": "tickets", "prompt": "I was charged twice", "max_tokens": 16}'

Endpoints: POST /v1/completions and /v1/chat/completions (OpenAI request and
response shapes, server-sent events with ``"stream": true``), POST
/v1/classify for classification runs, GET /v1/models, GET /health, and
POST /v1/adapters / DELETE /v1/adapters/{name} to load and unload adapters
while the server runs. The request's ``model`` field selects an adapter by
the name it was loaded under; the base model alone is served under its
``--model`` name. How adapters share the base: see peftlabs.adapter_host.

Prompts are formatted as `peftlabs infer --text` formats them: a completion
prompt becomes the user turn of the model's chat template, after the run's
instruction as system message. Decoding is greedy unless the request sets a
temperature above 0, so an adapter returns the same text as `peftlabs infer`.
This differs from OpenAI's API, where ``prompt`` is raw text and the default
temperature is 1.

Safe defaults: the server binds 127.0.0.1; with --api-key (or the environment
variable PEFTLABS_API_KEY) every endpoint but /health needs
``Authorization: Bearer KEY``; prompts, ``max_tokens``, request bodies, running
and queued requests and request time are limited, and a full queue is answered
with 429 at once. Adapters load from safetensors files only, and model code
from the hub runs only with --trust-remote-code. Errors use OpenAI's shape:
``{"error": {"message": ..., "type": ..., "code": ...}}``.
"""


import asyncio
import hmac
import json
import logging
import os
import re
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any, Literal

from peftlabs.adapter_host import BASE_MAX_NEW_TOKENS, HostError, HostedAdapter, ModelHost
from peftlabs.errors import UserError

log = logging.getLogger("peftlabs.serve")

API_KEY_VARIABLE = "PEFTLABS_API_KEY"
ADAPTER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$")
MAX_CLASSIFY_INPUTS = 64


@dataclass
class ServeSettings:
    """Limits and access control of one server."""

    api_key: str | None = None
    max_concurrent: int = 1  # requests running at once; the model lock runs one model call at a time
    queue_size: int = 32  # requests waiting for a running slot; one more gets 429
    max_prompt_tokens: int = 1024  # per prompt, after the chat template is applied
    max_tokens: int = 256  # largest max_tokens a request may ask for
    timeout: float = 120.0  # seconds from arrival to the last token
    max_body_bytes: int = 1_000_000

    def validate(self) -> None:
        for name in ("max_concurrent", "max_prompt_tokens", "max_tokens", "max_body_bytes"):
            if getattr(self, name) < 1:
                raise UserError(f"invalid --{name.replace('_', '-')} {getattr(self, name)}: it must be at least 1")
        if self.queue_size < 0:
            raise UserError(f"invalid --queue-size {self.queue_size}: it must be 0 or more")
        if self.timeout <= 0:
            raise UserError(f"invalid --timeout {self.timeout}: it must be a positive number of seconds")


class Admission:
    """Admit at most ``max_concurrent`` running requests and ``queue_size`` waiting ones; reject the rest.

    Runs on the event loop only, so the counters need no lock.
    """

    def __init__(self, max_concurrent: int, queue_size: int):
        self.slots = asyncio.Semaphore(max_concurrent)
        self.queue_size = queue_size
        self.waiting = 0
        self.rejected = 0

    async def enter(self, deadline: float) -> None:
        if not self.slots.locked():
            await self.slots.acquire()
            return
        if self.waiting >= self.queue_size:
            self.rejected += 1
            if self.rejected % 100 == 1:  # one log line per 100 rejections
                log.warning("queue full (%d waiting): %d requests rejected with 429 so far", self.waiting,
                            self.rejected)
            raise HostError(429, f"server busy: {self.queue_size} requests already queued; retry later",
                            "queue_full", "rate_limit_error")
        self.waiting += 1
        try:
            await asyncio.wait_for(self.slots.acquire(), timeout=max(0.0, deadline - time.monotonic()))
        except asyncio.TimeoutError:
            raise HostError(504, "request timed out in the queue: retry later or raise --timeout", "timeout",
                            "timeout_error") from None
        finally:
            self.waiting -= 1

    def leave(self) -> None:
        self.slots.release()


def create_app(host: ModelHost, settings: ServeSettings):
    """Build the FastAPI application serving ``host`` under ``settings``."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
    from pydantic import BaseModel, ConfigDict, Field
    from starlette.background import BackgroundTask
    from starlette.exceptions import HTTPException as StarletteHTTPException
    from starlette.concurrency import run_in_threadpool

    settings.validate()
    app = FastAPI(title="peftlabs serve", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.host = host
    app.state.settings = settings
    admission = Admission(settings.max_concurrent, settings.queue_size)
    app.state.admission = admission

    # -- request bodies ----------------------------------------------------

    class Sampling(BaseModel):
        model_config = ConfigDict(extra="ignore")

        model: str
        max_tokens: int | None = Field(default=None, ge=1)
        max_completion_tokens: int | None = Field(default=None, ge=1)
        temperature: float | None = Field(default=None, ge=0.0, le=2.0)
        top_p: float | None = Field(default=None, gt=0.0, le=1.0)
        seed: int | None = None
        stream: bool = False
        n: int | None = Field(default=None, ge=1)
        stop: str | list[str] | None = None
        logprobs: Any = None

    class CompletionRequest(Sampling):
        prompt: str | list[str]
        echo: bool = False

    class Message(BaseModel):
        model_config = ConfigDict(extra="ignore")

        role: Literal["system", "user", "assistant", "developer"]
        content: str | list[dict[str, Any]]

    class ChatRequest(Sampling):
        messages: list[Message]

    class ClassifyRequest(BaseModel):
        model: str
        input: str | list[str]

    class AdapterRequest(BaseModel):
        name: str
        path: str

    # -- errors ------------------------------------------------------------

    def error_response(status: int, message: str, kind: str, code: str | None) -> JSONResponse:
        return JSONResponse({"error": {"message": message, "type": kind, "code": code}}, status_code=status)

    @app.exception_handler(HostError)
    async def host_error(request: Request, error: HostError):
        if error.status != 429:
            log.info("%s %s failed: %d %s", request.method, request.url.path, error.status, error.message)
        return error_response(error.status, error.message, error.kind, error.code)

    @app.exception_handler(UserError)
    async def user_error(request: Request, error: UserError):
        log.info("%s %s failed: 400 %s", request.method, request.url.path, error)
        return error_response(400, str(error), "invalid_request_error", "invalid_adapter")

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, error: RequestValidationError):
        message = describe_validation_error(error)
        log.info("%s %s failed: 400 %s", request.method, request.url.path, message)
        return error_response(400, message, "invalid_request_error", "invalid_request")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException):
        message = f"{error.detail}: {request.method} {request.url.path}"
        return error_response(error.status_code, message, "invalid_request_error", None)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, error: Exception):
        log.exception("request %s %s failed", request.method, request.url.path)
        return error_response(500, f"internal error: {type(error).__name__}: {error}", "server_error", None)

    # -- access control and body size --------------------------------------

    @app.middleware("http")
    async def check_access(request: Request, call_next):
        if settings.api_key and request.url.path != "/health":
            header = request.headers.get("authorization", "")
            scheme, _, token = header.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), settings.api_key.encode()):
                return error_response(401, "missing or invalid API key: send 'Authorization: Bearer KEY'",
                                      "authentication_error", "invalid_api_key")
        length = request.headers.get("content-length")
        # NOTE: a chunked body without Content-Length is not measured here.
        if length is not None and length.isdigit() and int(length) > settings.max_body_bytes:
            return error_response(413, f"request body of {length} bytes exceeds the limit of "
                                       f"{settings.max_body_bytes} bytes", "invalid_request_error",
                                  "body_too_large")
        return await call_next(request)

    # -- endpoints ---------------------------------------------------------

    @app.get("/health")
    async def health():
        return {"status": "ok", "models": len(host.model_names()), "queued": admission.waiting,
                "rejected": admission.rejected, "adapter_switches": host.switches,
                "switch_seconds": round(host.switch_seconds, 4)}

    @app.get("/v1/models")
    async def models():
        data = [{"id": host.name, "object": "model", "created": 0, "owned_by": "peftlabs", "task": host.task,
                 "method": None}]
        for adapter in list(host.adapters.values()):
            data.append({"id": adapter.name, "object": "model", "created": 0, "owned_by": "peftlabs",
                         "task": adapter.info["task"], "method": adapter.method.name,
                         "run": str(adapter.run_dir), "parent": host.name})
        return {"object": "list", "data": data}

    @app.post("/v1/adapters")
    async def load_adapter(body: AdapterRequest):
        if not ADAPTER_NAME.match(body.name):
            raise HostError(400, f"invalid adapter name '{body.name}': use 1-64 letters, digits and ._:- "
                                 f"starting with a letter or digit", "invalid_name")
        adapter = await run_in_threadpool(host.add_adapter, body.name, body.path)
        return {"id": adapter.name, "object": "model", "method": adapter.method.name, "run": str(adapter.run_dir)}

    @app.delete("/v1/adapters/{name}")
    async def unload_adapter(name: str):
        await run_in_threadpool(host.remove_adapter, name)
        return {"id": name, "object": "model", "deleted": True}

    @app.post("/v1/classify")
    async def classify(body: ClassifyRequest):
        adapter = resolve_for_task(body.model, "classification")
        texts = [body.input] if isinstance(body.input, str) else body.input
        if not texts or any(not text.strip() for text in texts):
            raise HostError(400, "input is empty: send a non-empty string or list of strings", "empty_input")
        if len(texts) > MAX_CLASSIFY_INPUTS:
            raise HostError(400, f"{len(texts)} inputs exceed the limit of {MAX_CLASSIFY_INPUTS} per request: "
                                 f"split them", "too_many_inputs")
        deadline = time.monotonic() + settings.timeout
        await admission.enter(deadline)
        try:
            for index, text in enumerate(texts):
                count = host.count_tokens(text)
                if count > settings.max_prompt_tokens:
                    raise prompt_too_long(count, f"input {index}")
            labels = await run_in_threadpool(host.classify, adapter, texts, deadline)
        finally:
            admission.leave()
        return {"object": "list", "model": body.model,
                "data": [{"object": "classification", "index": i, "label": label} for i, label in enumerate(labels)]}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest):
        adapter = resolve_for_task(body.model, "causal_lm")
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if len(prompts) != 1:
            raise HostError(400, f"prompt is a list of {len(prompts)} prompts: send one prompt per request",
                            "unsupported_parameter")
        if not prompts[0].strip():
            raise HostError(400, "prompt is empty: send the text to answer", "empty_prompt")
        if body.echo:
            raise HostError(400, "echo is not supported: the prompt is formatted with the chat template",
                            "unsupported_parameter")
        return await run_generation(body, adapter, lambda: host.encode_completion(adapter, prompts[0]), chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest):
        adapter = resolve_for_task(body.model, "causal_lm")
        messages = []
        for message in body.messages:
            content = message.content if isinstance(message.content, str) else "".join(
                part.get("text", "") for part in message.content if part.get("type") == "text")
            messages.append({"role": "system" if message.role == "developer" else message.role, "content": content})
        if not messages or not any(message["content"].strip() for message in messages):
            raise HostError(400, "messages are empty: send at least one message with content", "empty_prompt")
        return await run_generation(body, adapter, lambda: host.encode_chat(adapter, messages), chat=True)

    # -- generation --------------------------------------------------------

    def resolve_for_task(name: str, task: str) -> HostedAdapter | None:
        adapter = host.resolve(name)
        if host.task != task:
            endpoint = "/v1/classify" if host.task == "classification" else "/v1/completions or /v1/chat/completions"
            raise HostError(400, f"model '{name}' is a {host.task} model: use {endpoint}", "wrong_endpoint")
        if adapter is None and task == "classification":
            raise HostError(400, f"the base model '{name}' has no trained classification head: choose an adapter "
                                 f"from /v1/models", "no_classification_head")
        return adapter

    def prompt_too_long(count: int, what: str) -> HostError:
        return HostError(400, f"{what} has {count} tokens, more than the limit of {settings.max_prompt_tokens}: "
                              f"shorten it", "prompt_too_long")

    def generation_settings(body: Sampling, adapter: HostedAdapter | None) -> tuple[int, dict[str, Any]]:
        if body.n not in (None, 1):
            raise HostError(400, f"n={body.n} is not supported: send one request per answer", "unsupported_parameter")
        if body.stop:
            raise HostError(400, "stop sequences are not supported: generation stops at the end-of-turn token "
                                 "or max_tokens", "unsupported_parameter")
        if body.logprobs:
            raise HostError(400, "logprobs are not supported", "unsupported_parameter")
        requested = body.max_completion_tokens or body.max_tokens
        default = adapter.default_max_tokens if adapter is not None else BASE_MAX_NEW_TOKENS
        max_tokens = requested or min(default, settings.max_tokens)
        if max_tokens > settings.max_tokens:
            raise HostError(400, f"max_tokens {max_tokens} exceeds the server limit of {settings.max_tokens}: "
                                 f"ask for fewer", "max_tokens_too_large")
        sampling: dict[str, Any] = {"seed": body.seed}
        if body.temperature:
            sampling.update(do_sample=True, temperature=body.temperature, top_p=body.top_p or 1.0)
        return max_tokens, sampling

    def check_prompt(prompt_ids: list[int], max_tokens: int) -> None:
        if len(prompt_ids) > settings.max_prompt_tokens:
            raise prompt_too_long(len(prompt_ids), "prompt")
        if host.max_positions and len(prompt_ids) + max_tokens > host.max_positions:
            raise HostError(400, f"prompt ({len(prompt_ids)} tokens) plus max_tokens ({max_tokens}) exceeds the "
                                 f"model's context of {host.max_positions} tokens: shorten the prompt or lower "
                                 f"max_tokens", "context_length_exceeded")

    async def run_generation(body: Sampling, adapter: HostedAdapter | None, encode, chat: bool):
        max_tokens, sampling = generation_settings(body, adapter)
        deadline = time.monotonic() + settings.timeout
        await admission.enter(deadline)
        try:
            prompt_ids = await run_in_threadpool(encode)
            check_prompt(prompt_ids, max_tokens)
            if body.stream:
                # The stream's own cleanup leaves the admission slot, also when the client disconnects.
                return start_stream(body, adapter, prompt_ids, max_tokens, sampling, deadline, chat)
            result = await run_in_threadpool(host.generate, adapter, prompt_ids, max_tokens, sampling, deadline)
        except BaseException:
            admission.leave()
            raise
        admission.leave()
        return completion_body(body.model, result, chat)

    def start_stream(body, adapter, prompt_ids, max_tokens, sampling, deadline, chat):
        loop = asyncio.get_running_loop()
        pieces: asyncio.Queue = asyncio.Queue()
        cancelled = threading.Event()
        left = threading.Event()

        def leave_once() -> None:
            if not left.is_set():
                left.set()
                admission.leave()

        def work() -> None:
            try:
                result = host.generate(adapter, prompt_ids, max_tokens, sampling, deadline,
                                       on_text=lambda piece: loop.call_soon_threadsafe(pieces.put_nowait, piece),
                                       cancelled=cancelled)
                loop.call_soon_threadsafe(pieces.put_nowait, result)
            except BaseException as error:  # sent to the client as an error event
                loop.call_soon_threadsafe(pieces.put_nowait, error)

        identifier = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        created = int(time.time())
        worker = loop.run_in_executor(None, work)

        async def events():
            try:
                if chat:
                    yield sse(chunk(identifier, created, body.model, chat, {"role": "assistant", "content": ""}))
                while True:
                    item = await pieces.get()
                    if isinstance(item, str):
                        yield sse(chunk(identifier, created, body.model, chat, item))
                        continue
                    if isinstance(item, BaseException):
                        if not isinstance(item, HostError):
                            log.error("streamed generation failed: %s: %s", type(item).__name__, item)
                        yield sse(error_body(item))
                    else:
                        yield sse(chunk(identifier, created, body.model, chat, None, item.finish_reason))
                    yield "data: [DONE]\n\n"
                    break
            finally:
                cancelled.set()
                try:
                    await worker
                finally:
                    leave_once()

        return StreamingResponse(events(), media_type="text/event-stream", background=BackgroundTask(leave_once))

    return app


def completion_body(model: str, result, chat: bool) -> dict[str, Any]:
    usage = {"prompt_tokens": result.prompt_tokens, "completion_tokens": len(result.token_ids),
             "total_tokens": result.prompt_tokens + len(result.token_ids)}
    if chat:
        choice = {"index": 0, "message": {"role": "assistant", "content": result.text},
                  "finish_reason": result.finish_reason, "logprobs": None}
        return {"id": "chatcmpl-" + uuid.uuid4().hex, "object": "chat.completion", "created": int(time.time()),
                "model": model, "choices": [choice], "usage": usage}
    choice = {"index": 0, "text": result.text, "finish_reason": result.finish_reason, "logprobs": None}
    return {"id": "cmpl-" + uuid.uuid4().hex, "object": "text_completion", "created": int(time.time()),
            "model": model, "choices": [choice], "usage": usage}


def chunk(identifier: str, created: int, model: str, chat: bool, piece, finish_reason: str | None = None):
    """Build one streamed event: a text piece, the chat role (a dict), or the final finish reason."""
    if chat:
        if isinstance(piece, dict):
            delta = piece
        elif piece is not None:
            delta = {"content": piece}
        else:
            delta = {}
        choice = {"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}
        return {"id": identifier, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": [choice]}
    choice = {"index": 0, "text": piece or "", "finish_reason": finish_reason, "logprobs": None}
    return {"id": identifier, "object": "text_completion", "created": created, "model": model, "choices": [choice]}


def error_body(error: BaseException) -> dict[str, Any]:
    if isinstance(error, HostError):
        return {"error": {"message": error.message, "type": error.kind, "code": error.code}}
    return {"error": {"message": f"internal error: {type(error).__name__}: {error}", "type": "server_error",
                      "code": None}}


def sse(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


def describe_validation_error(error) -> str:
    """Describe in one line the first invalid field of a request body, or that the JSON is malformed."""
    problems = error.errors()
    if not problems:
        return "invalid request body"
    first = problems[0]
    if first.get("type") == "json_invalid":
        return f"request body is not valid JSON ({first.get('ctx', {}).get('error', 'parse error')}): send a JSON object"
    location = ".".join(str(part) for part in first.get("loc", ()) if part != "body") or "body"
    if first.get("type") == "missing":
        return f"missing required field '{location}'"
    return f"invalid field '{location}': {first.get('msg', 'invalid value')}"


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------


def add_arguments(parser) -> None:
    """Add the flags of `peftlabs serve` to ``parser``."""
    defaults = ServeSettings()
    parser.add_argument("--model", required=True, help="base model: alias, local folder, .gguf file or hub id")
    parser.add_argument("--adapter", action="append", default=[], metavar="NAME=RUN_DIR",
                        help="serve a run directory's adapter under NAME (repeatable)")
    parser.add_argument("--task", choices=["causal_lm", "classification"],
                        help="serve the base as this task; default: detected from the model")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1, this machine only)")
    parser.add_argument("--port", type=int, default=8000, help="TCP port")
    parser.add_argument("--api-key", help=f"require 'Authorization: Bearer KEY' (default: ${API_KEY_VARIABLE})")
    parser.add_argument("--max-concurrent", type=int, default=defaults.max_concurrent,
                        help="requests running at once (model calls still run one at a time)")
    parser.add_argument("--queue-size", type=int, default=defaults.queue_size,
                        help="requests waiting for a running slot; more get HTTP 429")
    parser.add_argument("--max-prompt-tokens", type=int, default=defaults.max_prompt_tokens,
                        help="largest prompt, in tokens after the chat template")
    parser.add_argument("--max-tokens", type=int, default=defaults.max_tokens,
                        help="largest max_tokens a request may ask for")
    parser.add_argument("--timeout", type=float, default=defaults.timeout,
                        help="seconds a request may take from arrival to its last token")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="run model code shipped with a hub model (off by default)")


def serve_from_args(args) -> int:
    """Load the base and adapters, then serve until Ctrl-C."""
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError:
        raise UserError("peftlabs serve needs fastapi and uvicorn: run `pip install 'peftlabs[serve]'`") from None

    if not 0 < args.port < 65536:
        raise UserError(f"invalid --port {args.port}: use 1-65535")
    settings = ServeSettings(api_key=args.api_key or os.environ.get(API_KEY_VARIABLE) or None,
                             max_concurrent=args.max_concurrent, queue_size=args.queue_size,
                             max_prompt_tokens=args.max_prompt_tokens, max_tokens=args.max_tokens,
                             timeout=args.timeout)
    settings.validate()
    adapters = [parse_adapter_flag(value) for value in args.adapter]

    host = ModelHost(args.model, args.trust_remote_code, args.task)
    for name, run_dir in adapters:
        try:
            host.add_adapter(name, run_dir)
        except HostError as error:
            raise UserError(f"--adapter {name}={run_dir}: {error.message}") from None
    app = create_app(host, settings)

    if args.host not in ("127.0.0.1", "localhost", "::1") and not settings.api_key:
        log.warning("serving on %s without an API key: anyone who can reach this address can use the models and "
                    "load adapters from this machine's disk; pass --api-key", args.host)
    log.info("serving %s on http://%s:%d/v1", ", ".join(host.model_names()), args.host, args.port)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0


def parse_adapter_flag(value: str) -> tuple[str, str]:
    name, separator, run_dir = value.partition("=")
    if not separator or not name or not run_dir:
        raise UserError(f"invalid --adapter '{value}': use NAME=RUN_DIR, for example --adapter tickets=runs/demo")
    if not ADAPTER_NAME.match(name):
        raise UserError(f"invalid adapter name '{name}': use 1-64 letters, digits and ._:- "
                        f"starting with a letter or digit")
    return name, run_dir
