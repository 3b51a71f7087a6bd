"""Throughput and latency of `peftlabs serve`, recorded in docs/serving.md.

    python benchmarks/serve.py --adapter a=runs/serve-lora-a --adapter b=runs/serve-lora-b \\
        --merged merged/serve-lora-a --requests 24 --check-direct --output serve-benchmark.json

Starts `peftlabs serve` as a subprocess on a free 127.0.0.1 port, sends the
bundled demo tickets (test split) as completions and measures, per scenario,
requests per second and p50/p95 latency at 1 and 4 concurrent clients
(--clients). Every request is a chat completion with the first run's
instruction as system message:

  * adapter a only (no switching) and the base model alone;
  * adapters a and b alternating, so every request switches adapters; the
    difference to "a only" at 1 client is the cost of a switch;
  * the merged model (`peftlabs merge` of adapter a) served as a base model,
    against adapter a attached unmerged, with their outputs compared.

Every request sets the same max_tokens; answers that end earlier (the
end-of-turn token) are shorter, so the mean number of generated tokens is
reported beside each latency.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
TICKETS = ROOT / "src" / "peftlabs" / "demo_data" / "tickets_test.jsonl"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Server:
    """A `peftlabs serve` subprocess; stopped on exit."""

    def __init__(self, model: str, adapters: list[str], max_concurrent: int):
        self.port = free_port()
        command = [sys.executable, "-m", "peftlabs.cli", "serve", "--model", model, "--port", str(self.port),
                   "--max-concurrent", str(max_concurrent), "--queue-size", "64", "--max-tokens", "64"]
        for adapter in adapters:
            command += ["--adapter", adapter]
        environment = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT / "src")}
        started = time.perf_counter()
        self.process = subprocess.Popen(command, env=environment, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.PIPE, text=True)
        self.url = f"http://127.0.0.1:{self.port}"
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited: {self.process.stderr.read()[-2000:]}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.5)
        self.startup_s = time.perf_counter() - started

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.process.terminate()
        self.process.wait(timeout=60)


def run_scenario(url: str, models: list[str], prompts: list[str], clients: int, max_tokens: int,
                 instruction: str) -> dict:
    """Send one chat request per prompt, cycling through ``models``, from ``clients`` threads.

    Every request carries the run's instruction as system message, so the
    merged model, served as a base model, gets the same prompt as the adapter.
    """
    jobs = [(models[i % len(models)], prompt) for i, prompt in enumerate(prompts)]

    def send(job):
        model, prompt = job
        messages = [{"role": "system", "content": instruction}, {"role": "user", "content": prompt}]
        started = time.perf_counter()
        response = httpx.post(f"{url}/v1/chat/completions", timeout=600,
                              json={"model": model, "messages": messages, "max_tokens": max_tokens})
        elapsed = time.perf_counter() - started
        response.raise_for_status()
        body = response.json()
        return elapsed, body["usage"]["completion_tokens"], body["choices"][0]["message"]["content"]

    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=clients) as pool:
        results = list(pool.map(send, jobs))
    wall = time.perf_counter() - started
    latencies = sorted(result[0] for result in results)
    return {
        "models": models, "clients": clients, "requests": len(jobs),
        "requests_per_s": len(jobs) / wall,
        "p50_s": statistics.median(latencies),
        "p95_s": latencies[min(len(latencies) - 1, round(0.95 * (len(latencies) - 1)))],
        "mean_tokens": statistics.mean(result[1] for result in results),
        "answers": [result[2] for result in results],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--adapter", action="append", required=True, metavar="NAME=RUN_DIR",
                        help="two adapters: the first is the one compared with --merged")
    parser.add_argument("--merged", help="folder written by `peftlabs merge --run` of the first adapter")
    parser.add_argument("--requests", type=int, default=24, help="requests per scenario")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--clients", default="1,4", help="comma-separated numbers of concurrent clients")
    parser.add_argument("--output", help="write all results as JSON here")
    parser.add_argument("--check-direct", action="store_true",
                        help="also compare the first adapter's served answers with peftlabs.infer.predict")
    args = parser.parse_args()

    prompts_all = [json.loads(line)["text"] for line in TICKETS.read_text().splitlines() if line.strip()]
    prompts = (prompts_all * (args.requests // len(prompts_all) + 1))[:args.requests]
    names = [spec.split("=", 1)[0] for spec in args.adapter]
    client_counts = [int(count) for count in args.clients.split(",")]
    first_run = Path(args.adapter[0].split("=", 1)[1])
    instruction = json.loads((first_run / "run.json").read_text())["instruction"]
    results: dict = {"requests": args.requests, "max_tokens": args.max_tokens, "scenarios": []}

    def record(label: str, result: dict) -> None:
        result["label"] = label
        results["scenarios"].append(result)
        print(f"{label:38s} clients {result['clients']}  {result['requests_per_s']:6.2f} req/s  "
              f"p50 {result['p50_s']:6.2f} s  p95 {result['p95_s']:6.2f} s  tokens {result['mean_tokens']:.1f}",
              flush=True)

    with Server(args.model, args.adapter, max_concurrent=4) as server:
        results["unmerged_server"] = {"startup_s": server.startup_s, "rss_mb": server.rss_mb()}
        print(f"server with {len(names)} adapters: started in {server.startup_s:.1f} s, RSS {server.rss_mb():.0f} MB")
        run_scenario(server.url, [names[0]], prompts[:2], 1, args.max_tokens, instruction)  # warm-up
        for clients in client_counts:
            record(f"adapter {names[0]} (no switching)", run_scenario(server.url, [names[0]], prompts, clients,
                                                                      args.max_tokens, instruction))
        if len(names) > 1:
            for clients in client_counts:
                before = httpx.get(f"{server.url}/health").json()
                record(f"adapters {names[0]}/{names[1]} alternating",
                       run_scenario(server.url, names[:2], prompts, clients, args.max_tokens, instruction))
                after = httpx.get(f"{server.url}/health").json()
                switches = after["adapter_switches"] - before["adapter_switches"]
                seconds = after["switch_seconds"] - before["switch_seconds"]
                results["scenarios"][-1]["switches"] = switches
                results["scenarios"][-1]["mean_switch_ms"] = 1000 * seconds / max(switches, 1)
                print(f"  {switches} adapter switches, {1000 * seconds / max(switches, 1):.1f} ms each "
                      f"(detach + attach, measured in the server)")
        record("base model alone", run_scenario(server.url, [args.model], prompts, client_counts[0], args.max_tokens, instruction))

    if args.merged:
        unmerged = next(s for s in results["scenarios"] if s["models"] == [names[0]] and s["clients"] == client_counts[0])
        with Server(args.merged, [], max_concurrent=4) as server:
            results["merged_server"] = {"startup_s": server.startup_s, "rss_mb": server.rss_mb()}
            run_scenario(server.url, [args.merged], prompts[:2], 1, args.max_tokens, instruction)  # warm-up
            for clients in client_counts:
                result = run_scenario(server.url, [args.merged], prompts, clients, args.max_tokens, instruction)
                record(f"merged {names[0]} (base model)", result)
            merged = next(s for s in results["scenarios"] if s["models"] == [args.merged])
            same = sum(a == b for a, b in zip(unmerged["answers"], merged["answers"]))
            results["merged_answers_identical"] = f"{same}/{len(prompts)}"
            print(f"merged vs unmerged answers identical: {same}/{len(prompts)}")

    if args.check_direct:
        sys.path.insert(0, str(ROOT / "src"))
        from peftlabs.infer import load_run, predict

        loaded = load_run(args.adapter[0].split("=", 1)[1])
        direct = [predict(loaded, [prompt], batch_size=1, max_new_tokens=args.max_tokens)[0] for prompt in prompts]
        served = next(s for s in results["scenarios"] if s["models"] == [names[0]])["answers"]
        same = sum(a == b for a, b in zip(direct, served))
        results["served_equals_direct"] = f"{same}/{len(prompts)}"
        print(f"served answers of {names[0]} identical to peftlabs.infer.predict: {same}/{len(prompts)}")

    if args.output:
        Path(args.output).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
