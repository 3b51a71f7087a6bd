"""`peftlabs serve` over real HTTP: adapters of several methods sharing one tiny base.

Each server runs uvicorn in a thread on a free loopback port and is queried
with httpx and the `openai` client. Expected answers come from direct
inference with each run (peftlabs.infer.load_run + predict, one prompt at a
time, as the server runs them).
"""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from conftest import make_sentences, tiny_config, write_jsonl
from peftlabs.adapter_host import ModelHost
from peftlabs.serve import ServeSettings, create_app

API_KEY = "test-key"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
PROBES = ["the cat is here", "a plum near one", "my old horse is very big", "one red cherry there"]
MAX_TOKENS = 8
# RSS growth allowed over a burst of 200 requests; the growth seen on the tiny models was a few MB.
RSS_GROWTH_LIMIT_MB = 150


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("VmRSS not found in /proc/self/status")


@contextmanager
def running_server(host: ModelHost, settings: ServeSettings):
    """Serve ``host`` on a free 127.0.0.1 port in a thread; yield its base URL."""
    import uvicorn

    app = create_app(host, settings)
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, backlog=512))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start within 30 s")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        listener.close()


# ---------------------------------------------------------------------------
# Runs and direct-inference answers
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sentence_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("serve-data")
    return {
        "train": write_jsonl(folder / "train.jsonl", make_sentences(96, seed=1)),
        "eval": write_jsonl(folder / "eval.jsonl", make_sentences(16, seed=2)),
    }


def train_run(model: Path, data, folder: Path, method: str, method_args: dict, learning_rate: float) -> Path:
    from peftlabs.train import train

    config = tiny_config(model, data, folder, method=method, method_args=method_args, learning_rate=learning_rate,
                         max_steps=6, save_steps=100, final_eval=False)
    train(config)
    return folder


@pytest.fixture(scope="module")
def llama_runs(tiny_llama, sentence_files, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("serve-llama-runs")
    return {
        "lora": train_run(tiny_llama, sentence_files, root / "lora", "lora",
                          {"lora": {"target_modules": ["all-linear"]}}, 1e-2),
        "prefix": train_run(tiny_llama, sentence_files, root / "prefix", "prefix_tuning",
                            {"prefix_tuning": {"num_virtual_tokens": 8, "encoder_hidden_size": 32}}, 1e-2),
        "bottleneck": train_run(tiny_llama, sentence_files, root / "bottleneck", "adapters",
                                {"adapters": {"variant": "houlsby", "reduction_factor": 1}}, 1e-2),
    }


@pytest.fixture(scope="module")
def bert_runs(tiny_bert, sentence_files, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("serve-bert-runs")
    return {
        "bitfit": train_run(tiny_bert, sentence_files, root / "bitfit", "bitfit", {}, 3e-2),
        "lora": train_run(tiny_bert, sentence_files, root / "lora", "lora",
                          {"lora": {"target_modules": ["all-linear"]}}, 1e-2),
    }


def direct_answers(run_dir: Path) -> dict[str, str]:
    from peftlabs.infer import load_run, predict

    loaded = load_run(run_dir)
    return {probe: predict(loaded, [probe], batch_size=1, max_new_tokens=MAX_TOKENS)[0] for probe in PROBES}


@pytest.fixture(scope="module")
def expected(tiny_llama, llama_runs) -> dict[str, dict[str, str]]:
    from peftlabs.evaluate import generate
    from peftlabs.models import load_base_model, load_tokenizer

    tokenizer = load_tokenizer(str(tiny_llama))
    base = load_base_model(str(tiny_llama), "causal_lm", None, tokenizer)
    answers = {name: direct_answers(run) for name, run in llama_runs.items()}
    answers["base"] = {probe: generate(base, tokenizer, [probe], None, MAX_TOKENS, 1, False)[0] for probe in PROBES}
    return answers


@pytest.fixture(scope="module")
def llama_host(tiny_llama, llama_runs) -> ModelHost:
    host = ModelHost(str(tiny_llama))
    host.add_adapter("lora", llama_runs["lora"])
    host.add_adapter("prefix", llama_runs["prefix"])
    return host


@pytest.fixture(scope="module")
def llama_url(llama_host):
    settings = ServeSettings(api_key=API_KEY, max_concurrent=4, queue_size=256, max_prompt_tokens=48, max_tokens=16)
    with running_server(llama_host, settings) as url:
        yield url


def openai_client(url: str, key: str = API_KEY):
    from openai import OpenAI

    return OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=60)


# ---------------------------------------------------------------------------
# Answers
# ---------------------------------------------------------------------------


def test_adapters_differ_from_each_other(expected):
    # Guards the tests below: if every model gave the same answers, serving the wrong one would pass.
    distinct = {tuple(answers[p] for p in PROBES) for answers in expected.values()}
    assert len(distinct) >= 3, expected


def test_concurrent_adapters_match_direct_inference(llama_url, tiny_llama, expected):
    client = openai_client(llama_url)
    names = {"lora": "lora", "prefix": "prefix", "base": str(tiny_llama)}
    jobs = [(kind, probe) for _ in range(2) for probe in PROBES for kind in names]

    def complete(job):
        kind, probe = job
        response = client.completions.create(model=names[kind], prompt=probe, max_tokens=MAX_TOKENS)
        return response.choices[0].text

    def chat(job):
        kind, probe = job
        response = client.chat.completions.create(model=names[kind], max_tokens=MAX_TOKENS,
                                                  messages=[{"role": "user", "content": probe}])
        return response.choices[0].message.content

    with ThreadPoolExecutor(max_workers=4) as pool:
        completions = list(pool.map(complete, jobs))
        chats = list(pool.map(chat, jobs))
    for (kind, probe), text, chat_text in zip(jobs, completions, chats):
        assert text == expected[kind][probe], (kind, probe)
        assert chat_text == expected[kind][probe], (kind, probe)


def test_streaming_matches_non_streaming(llama_url, expected):
    client = openai_client(llama_url)
    for name in ("lora", "prefix"):
        for probe in PROBES[:2]:
            stream = client.completions.create(model=name, prompt=probe, max_tokens=MAX_TOKENS, stream=True)
            pieces = [event.choices[0].text for event in stream]
            assert "".join(pieces) == expected[name][probe]

            stream = client.chat.completions.create(model=name, max_tokens=MAX_TOKENS, stream=True,
                                                    messages=[{"role": "user", "content": probe}])
            deltas = [event.choices[0].delta.content or "" for event in stream]
            assert "".join(deltas) == expected[name][probe]

    body = {"model": "lora", "prompt": PROBES[0], "max_tokens": MAX_TOKENS, "stream": True}
    with httpx.stream("POST", f"{llama_url}/v1/completions", json=body, headers=AUTH, timeout=60) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    assert json.loads(lines[-2][len("data: "):])["choices"][0]["finish_reason"] in ("stop", "length")


def test_models_lists_base_and_adapters(llama_url, tiny_llama):
    response = httpx.get(f"{llama_url}/v1/models", headers=AUTH)
    assert response.status_code == 200
    ids = [model["id"] for model in response.json()["data"]]
    assert ids[0] == str(tiny_llama)
    assert {"lora", "prefix"} <= set(ids)
    assert httpx.get(f"{llama_url}/health").json()["status"] == "ok"


# ---------------------------------------------------------------------------
# Bad requests
# ---------------------------------------------------------------------------


BAD_REQUESTS = [
    ("unknown model", {"model": "nope", "prompt": "the cat"}, 404, "not found"),
    ("empty prompt", {"model": "lora", "prompt": "  "}, 400, "prompt is empty"),
    ("oversize prompt", {"model": "lora", "prompt": "the cat " * 40}, 400, "more than the limit"),
    ("max_tokens over limit", {"model": "lora", "prompt": "the cat", "max_tokens": 17}, 400, "exceeds the server limit"),
    ("negative max_tokens", {"model": "lora", "prompt": "the cat", "max_tokens": -1}, 400, "max_tokens"),
    ("missing prompt", {"model": "lora"}, 400, "missing required field 'prompt'"),
    ("stop sequences", {"model": "lora", "prompt": "the cat", "stop": ["."]}, 400, "not supported"),
]


@pytest.mark.parametrize("body,status,message", [case[1:] for case in BAD_REQUESTS],
                         ids=[case[0] for case in BAD_REQUESTS])
def test_bad_request_gets_error(llama_url, body, status, message):
    response = httpx.post(f"{llama_url}/v1/completions", json=body, headers=AUTH)
    assert response.status_code == status
    error = response.json()["error"]
    assert message in error["message"]
    assert error["type"]


def test_malformed_json_gets_400(llama_url):
    response = httpx.post(f"{llama_url}/v1/completions", content=b'{"model": "lora", "prompt": ',
                          headers={**AUTH, "Content-Type": "application/json"})
    assert response.status_code == 400
    assert "not valid JSON" in response.json()["error"]["message"]


def test_wrong_api_key_gets_401(llama_url):
    from openai import AuthenticationError

    with pytest.raises(AuthenticationError, match="invalid API key"):
        openai_client(llama_url, key="wrong").completions.create(model="lora", prompt="the cat", max_tokens=2)
    response = httpx.get(f"{llama_url}/v1/models")
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "invalid_api_key"


def test_classify_on_causal_server_gets_400(llama_url):
    response = httpx.post(f"{llama_url}/v1/classify", json={"model": "lora", "input": "the cat"}, headers=AUTH)
    assert response.status_code == 400
    assert "/v1/completions" in response.json()["error"]["message"]


def test_timeout_gets_504(llama_host):
    with running_server(llama_host, ServeSettings(timeout=1e-6)) as url:
        response = httpx.post(f"{url}/v1/completions", json={"model": "lora", "prompt": "the cat"})
    assert response.status_code == 504
    assert "timed out" in response.json()["error"]["message"]


# ---------------------------------------------------------------------------
# Bursts
# ---------------------------------------------------------------------------


async def send_burst(url: str, count: int) -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=count, max_keepalive_connections=count)
    async with httpx.AsyncClient(limits=limits, timeout=120, headers=AUTH) as client:
        bodies = [{"model": ["lora", "prefix"][i % 2], "prompt": PROBES[i % len(PROBES)], "max_tokens": 2}
                  for i in range(count)]
        return await asyncio.gather(*(client.post(f"{url}/v1/completions", json=body) for body in bodies))


def test_burst_of_200_all_answered(llama_url):
    asyncio.run(send_burst(llama_url, 20))  # warm-up: allocator pools and buffers reach their working size
    before = rss_mb()
    responses = asyncio.run(send_burst(llama_url, 200))
    growth = rss_mb() - before

    assert len(responses) == 200
    assert [r.status_code for r in responses] == [200] * 200
    assert all(r.json()["choices"][0]["text"] is not None for r in responses)
    print(f"RSS {before:.0f} MB before 200 requests, growth {growth:.1f} MB")
    assert growth < RSS_GROWTH_LIMIT_MB, f"RSS grew by {growth:.0f} MB over 200 requests"


def test_burst_with_small_queue_gets_429(llama_host):
    settings = ServeSettings(api_key=API_KEY, max_concurrent=1, queue_size=2)
    with running_server(llama_host, settings) as url:
        responses = asyncio.run(send_burst(url, 200))

    statuses = [r.status_code for r in responses]
    assert len(statuses) == 200
    assert set(statuses) <= {200, 429}
    assert statuses.count(200) >= 3  # the running slot and the two queued places
    assert statuses.count(429) > 0
    rejected = next(r for r in responses if r.status_code == 429)
    assert rejected.json()["error"]["code"] == "queue_full"


# ---------------------------------------------------------------------------
# Loading and unloading at runtime
# ---------------------------------------------------------------------------


def test_runtime_load_and_unload(llama_url, llama_runs, expected):
    response = httpx.post(f"{llama_url}/v1/adapters", json={"name": "houlsby", "path": str(llama_runs["bottleneck"])},
                          headers=AUTH, timeout=60)
    assert response.status_code == 200, response.text
    ids = [model["id"] for model in httpx.get(f"{llama_url}/v1/models", headers=AUTH).json()["data"]]
    assert "houlsby" in ids

    client = openai_client(llama_url)
    for probe in PROBES:
        for name in ("houlsby", "lora", "houlsby"):  # switch back and forth
            text = client.completions.create(model=name, prompt=probe, max_tokens=MAX_TOKENS).choices[0].text
            assert text == expected["bottleneck" if name == "houlsby" else name][probe], (name, probe)

    again = httpx.post(f"{llama_url}/v1/adapters", json={"name": "houlsby", "path": str(llama_runs["lora"])},
                       headers=AUTH)
    assert again.status_code == 409
    assert httpx.delete(f"{llama_url}/v1/adapters/houlsby", headers=AUTH).status_code == 200
    gone = httpx.post(f"{llama_url}/v1/completions", json={"model": "houlsby", "prompt": "the cat"}, headers=AUTH)
    assert gone.status_code == 404
    assert httpx.delete(f"{llama_url}/v1/adapters/houlsby", headers=AUTH).status_code == 404

    # The base and the remaining adapters answer as before.
    assert client.completions.create(model="prefix", prompt=PROBES[0], max_tokens=MAX_TOKENS).choices[0].text == \
        expected["prefix"][PROBES[0]]


def test_load_rejects_other_base_and_pickle(llama_url, llama_runs, bert_runs, tmp_path):
    other_base = tmp_path / "other-base"
    shutil.copytree(llama_runs["lora"], other_base)
    info = json.loads((other_base / "run.json").read_text())
    info["base_fingerprint"] = "0" * 16
    (other_base / "run.json").write_text(json.dumps(info))

    pickled = tmp_path / "pickled"
    shutil.copytree(llama_runs["lora"], pickled)
    (pickled / "adapter" / "adapter_model.bin").write_bytes(b"not loaded")

    corrupt = tmp_path / "corrupt"
    shutil.copytree(llama_runs["lora"], corrupt)
    (corrupt / "adapter" / "adapter_model.safetensors").write_bytes(b"not a safetensors file")

    cases = [(other_base, "differs from the served base"), (pickled, "pickle files"), (corrupt, "could not load"),
             (bert_runs["lora"], "classification run"), (tmp_path / "missing", "not found")]
    for path, message in cases:
        response = httpx.post(f"{llama_url}/v1/adapters", json={"name": "bad", "path": str(path)}, headers=AUTH,
                              timeout=60)
        assert response.status_code == 400, (path, response.text)
        assert message in response.json()["error"]["message"], path
    ids = [model["id"] for model in httpx.get(f"{llama_url}/v1/models", headers=AUTH).json()["data"]]
    assert "bad" not in ids


# ---------------------------------------------------------------------------
# The remaining methods, on the host without HTTP
# ---------------------------------------------------------------------------


OTHER_METHOD_ARGS = {
    "ia3": {},
    "prompt_tuning": {"prompt_tuning": {"num_virtual_tokens": 8, "init": "random"}},
    "p_tuning": {"p_tuning": {"num_virtual_tokens": 8, "encoder_hidden_size": 32}},
    "p_tuning_v2": {"p_tuning_v2": {"num_virtual_tokens": 8}},
    "qlora": {"qlora": {"target_modules": ["all-linear"]}},
}


def test_other_methods_match_direct_inference(tiny_llama, sentence_files, llama_runs, tmp_path):
    runs = {method: train_run(tiny_llama, sentence_files, tmp_path / method, method, method_args, 3e-2)
            for method, method_args in OTHER_METHOD_ARGS.items()}
    runs["lora"] = llama_runs["lora"]  # a peft tuner on the fp32 base, switched with the prompt-learning methods
    expected = {method: direct_answers(run) for method, run in runs.items()}
    host = ModelHost(str(tiny_llama))
    for method, run in runs.items():
        host.add_adapter(method, run)

    for _ in range(2):  # the second round attaches every adapter after another one was detached
        for method in runs:
            adapter = host.resolve(method)
            for probe in PROBES[:2]:
                prompt_ids = host.encode_completion(adapter, probe)
                text = host.generate(adapter, prompt_ids, MAX_TOKENS, {}, deadline=None).text
                assert text == expected[method][probe], (method, probe)


# ---------------------------------------------------------------------------
# Classification
# ---------------------------------------------------------------------------


def test_classification_adapters_match_direct_inference(tiny_bert, bert_runs):
    from peftlabs.infer import load_run, predict

    texts = PROBES + ["a small mango", "the wolf is near"]
    expected = {name: predict(load_run(run), texts) for name, run in bert_runs.items()}
    host = ModelHost(str(tiny_bert))
    for name, run in bert_runs.items():
        host.add_adapter(name, run)

    with running_server(host, ServeSettings()) as url:
        def classify(name):
            response = httpx.post(f"{url}/v1/classify", json={"model": name, "input": texts}, timeout=60)
            assert response.status_code == 200, response.text
            return name, [row["label"] for row in response.json()["data"]]

        with ThreadPoolExecutor(max_workers=4) as pool:
            results = list(pool.map(classify, ["bitfit", "lora"] * 4))
        base = httpx.post(f"{url}/v1/classify", json={"model": str(tiny_bert), "input": "the cat"})
        completion = httpx.post(f"{url}/v1/completions", json={"model": "lora", "prompt": "the cat"})

    for name, labels in results:
        assert labels == expected[name], name
    assert base.status_code == 400
    assert "no trained classification head" in base.json()["error"]["message"]
    assert completion.status_code == 400


def test_cli_rejects_bad_adapter_flag(capsys):
    from peftlabs.cli import main

    assert main(["serve", "--model", "unused", "--adapter", "no-equals-sign"]) == 2
    assert "use NAME=RUN_DIR" in capsys.readouterr().err
