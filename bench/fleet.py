"""Fleet routing: throughput and TTFT of 2 worker replicas behind the router, prefix-aware
against round robin, on a shared-prefix workload (a few long system prompts, each followed by
a distinct question), printed side by side.

Everything runs on 127.0.0.1: two `kvflock serve` processes, and one `kvflock router` process
per policy in front of them. Each policy gets its own fresh system prompts, so neither finds
the workers' prefix caches warmed by the other. The prefix-cache hit rate is the workers' own
(their /metrics, hit tokens over looked-up tokens), beside the router's estimate. On CPU each
worker gets its share of the cores as torch threads: with a thread per core in each of two
processes, every operation waits for threads the other process has descheduled. On CUDA each
worker gets its own GPU (GPUs 0 and 1).
Bounded by --requests and --time-limit.

    python bench/fleet.py                                   # CPU, SmolLM2 demo
    python bench/fleet.py --device cuda --dtype bfloat16 --requests 256 --concurrency 32 --prefix-words 1500
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import date

import httpx
from prometheus_client.parser import text_string_to_metric_families

WORDS = ("model replica cache prefix token block router latency batch decode prefill memory "
         "kernel tensor scheduler request stream answer system careful helpful concise").split()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def process(args: list[str], url: str, what: str, timeout: float, env: dict[str, str] | None = None) -> Iterator[str]:
    """Run `kvflock ARGS` until the block ends; yields `url` once its /ready answers 200."""
    proc = subprocess.Popen([sys.executable, "-m", "kvflock.cli", "--log-level", "warning", *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})})
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{what} exited with {proc.returncode}: {proc.stderr.read()[-2000:]}")
            try:
                if httpx.get(f"{url}/ready", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what} was not ready within {timeout:.0f} s")
            time.sleep(0.2)
        yield url
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def workload(seed: int, prefixes: int, prefix_words: int, requests: int) -> list[str]:
    """`requests` prompts over `prefixes` system prompts, in a shuffled order (what a router sees:
    a fixed rotation would let round robin send each prefix to the same replica by accident)."""
    rng = random.Random(seed)
    systems = [f"System prompt {seed}-{p}: " + " ".join(rng.choice(WORDS) for _ in range(prefix_words))
               for p in range(prefixes)]
    order = [i % prefixes for i in range(requests)]
    rng.shuffle(order)
    return [f"{systems[p]}\nQuestion {i}: what is {rng.choice(WORDS)} {rng.randint(0, 999)}?\nAnswer:"
            for i, p in enumerate(order)]


async def run_load(url: str, model: str, prompts: list[str], concurrency: int, max_tokens: int,
                   time_limit: float) -> dict[str, float]:
    """Stream every prompt through the router, `concurrency` at a time; TTFT is the time to the
    first chunk that carries text."""
    queue: asyncio.Queue[str] = asyncio.Queue()
    for p in prompts:
        queue.put_nowait(p)
    ttfts: list[float] = []
    tokens = failures = 0
    deadline = time.monotonic() + time_limit

    async def user(client: httpx.AsyncClient) -> None:
        nonlocal tokens, failures
        while not queue.empty() and time.monotonic() < deadline:
            prompt = queue.get_nowait()
            body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                    "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
            start = time.monotonic()
            first = None
            try:
                async with client.stream("POST", f"{url}/v1/completions", json=body) as response:
                    if response.status_code != 200:
                        failures += 1
                        continue
                    async for line in response.aiter_lines():
                        if not line.startswith("data: ") or line == "data: [DONE]":
                            continue
                        chunk = json.loads(line[6:])
                        if first is None and chunk["choices"] and chunk["choices"][0]["text"]:
                            first = time.monotonic() - start
                        if chunk.get("usage"):
                            tokens += chunk["usage"]["completion_tokens"]
            except httpx.HTTPError:
                failures += 1
                continue
            if first is not None:
                ttfts.append(first)

    began = time.monotonic()
    async with httpx.AsyncClient(timeout=None) as client:
        await asyncio.gather(*(user(client) for _ in range(concurrency)))
    elapsed = time.monotonic() - began
    ttfts.sort()
    pick = lambda q: ttfts[min(len(ttfts) - 1, int(q * len(ttfts)))] if ttfts else float("nan")  # noqa: E731
    return {"done": len(ttfts), "failed": failures, "seconds": elapsed, "req_s": len(ttfts) / elapsed,
            "tok_s": tokens / elapsed, "ttft_p50": pick(0.5), "ttft_p99": pick(0.99)}


def counters(url: str) -> dict[str, float]:
    """A server's metrics, summed over label sets."""
    totals: dict[str, float] = {}
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics").text):
        for sample in family.samples:
            totals[sample.name] = totals.get(sample.name, 0.0) + sample.value
    return totals


def split(url: str) -> str:
    """How the router spread its answered requests over the replicas, e.g. "30/18"."""
    per_replica: dict[str, float] = {}
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics").text):
        for sample in family.samples:
            if sample.name == "kvflock_router_requests_total":
                replica = sample.labels["replica"]
                per_replica[replica] = per_replica.get(replica, 0.0) + sample.value
    return "/".join(f"{n:.0f}" for _, n in sorted(per_replica.items()))


def worker_hit_rate(workers: list[str], before: list[dict[str, float]]) -> float:
    """Prompt tokens found in the workers' prefix caches over those looked up, since `before`."""
    after = [counters(w) for w in workers]
    hits = sum(a.get("kvflock_prefix_cache_hits_total", 0.0) - b.get("kvflock_prefix_cache_hits_total", 0.0)
               for a, b in zip(after, before))
    queries = sum(a.get("kvflock_prefix_cache_queries_total", 0.0) - b.get("kvflock_prefix_cache_queries_total", 0.0)
                  for a, b in zip(after, before))
    return hits / max(1.0, queries)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="demo")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--prefixes", type=int, default=4, help="distinct shared system prompts")
    parser.add_argument("--prefix-words", type=int, default=300, help="words per system prompt")
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--time-limit", type=float, default=120.0, help="seconds per policy at most")
    args = parser.parse_args()

    env_note = f"{platform.node()} {args.device} ({os.cpu_count()} cores) {date.today()}"
    workers = [f"http://127.0.0.1:{free_port()}" for _ in range(2)]
    serve = ["serve", "--model", args.model, "--served-model-name", "bench", "--device", args.device,
             "--dtype", args.dtype, "--host", "127.0.0.1", "--max-model-len", "2048"]
    if args.device == "cpu":
        placement = [{"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // 2))}] * 2
    else:
        placement = [{"CUDA_VISIBLE_DEVICES": str(i)} for i in range(2)]
    results: dict[str, dict[str, float]] = {}
    spreads: dict[str, str] = {}
    with process([*serve, "--port", workers[0].rsplit(":", 1)[1]], workers[0], "worker 0", 600, placement[0]), \
         process([*serve, "--port", workers[1].rsplit(":", 1)[1]], workers[1], "worker 1", 600, placement[1]):
        for seed, policy in enumerate(("round-robin", "prefix-aware")):
            port = free_port()
            router = ["router", "--host", "127.0.0.1", "--port", str(port), "--policy", policy,
                      "--model", args.model, *(a for w in workers for a in ("--worker", w))]
            with process(router, f"http://127.0.0.1:{port}", f"router ({policy})", 300) as url:
                prompts = workload(seed, args.prefixes, args.prefix_words, args.requests)
                before = [counters(w) for w in workers]
                result = asyncio.run(run_load(url, "bench", prompts, args.concurrency, args.max_tokens,
                                              args.time_limit))
                routed = counters(url)
                result["est_hit"] = routed.get("kvflock_router_prefix_blocks_total", 0.0) / max(
                    1.0, routed.get("kvflock_router_prompt_blocks_total", 0.0))
                result["hit"] = worker_hit_rate(workers, before)
                spreads[policy] = split(url)
                results[policy] = result

    print(f"\n2 replicas of {args.model} on {env_note}; {args.requests} requests over {args.prefixes} shared "
          f"prefixes of ~{args.prefix_words} words, {args.concurrency} concurrent, {args.max_tokens} tokens each")
    rows = [("requests answered", "done", "{:.0f}"), ("requests failed", "failed", "{:.0f}"),
            ("throughput (req/s)", "req_s", "{:.2f}"), ("output tokens/s", "tok_s", "{:.1f}"),
            ("TTFT p50 (s)", "ttft_p50", "{:.3f}"), ("TTFT p99 (s)", "ttft_p99", "{:.3f}"),
            ("workers' prefix-cache hit rate", "hit", "{:.1%}"),
            ("router's est. prefix hit rate", "est_hit", "{:.1%}")]
    print(f"{'':32}{'round-robin':>14}{'prefix-aware':>14}")
    for label, key, fmt in rows:
        print(f"{label:32}" + "".join(f"{fmt.format(results[p][key]):>14}" for p in ("round-robin", "prefix-aware")))
    print(f"{'requests per replica':32}" + "".join(f"{spreads[p]:>14}" for p in ("round-robin", "prefix-aware")))
    rr, pa = results["round-robin"], results["prefix-aware"]
    print(f"prefix-aware vs round-robin: throughput x{pa['req_s'] / rr['req_s']:.2f}, "
          f"TTFT p50 x{pa['ttft_p50'] / rr['ttft_p50']:.2f}, TTFT p99 x{pa['ttft_p99'] / rr['ttft_p99']:.2f} "
          f"(below 1 is better), workers' hit rate x{pa['hit'] / max(rr['hit'], 1e-9):.2f}")


if __name__ == "__main__":
    main()
