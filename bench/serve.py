"""Load generator for a worker (or router): Poisson arrivals at a given rate, prompt and output
lengths drawn uniformly from stated ranges (seeded), bounded in request count and time, and
aimed at loopback addresses only. Prints throughput, TTFT and inter-token latency p50/p99.

    python bench/serve.py                                  # starts `kvflock serve` on SmolLM2 itself
    python bench/serve.py --url http://127.0.0.1:8000 --model demo --qps 4 --num-requests 64
"""

import argparse
import asyncio
import ipaddress
import json
import random
import socket
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import date
from urllib.parse import urlparse

import httpx


@dataclass
class Result:
    ok: bool
    ttft: float = 0.0
    latency: float = 0.0
    itls: list[float] = field(default_factory=list)
    output_tokens: int = 0
    error: str = ""


def require_loopback(url: str) -> None:
    host = urlparse(url).hostname or ""
    if host == "localhost":
        return
    try:
        if ipaddress.ip_address(host).is_loopback:
            return
    except ValueError:
        pass
    raise SystemExit(f"--url: {url} is not a loopback address; this benchmark only loads local servers")


async def one_request(client: httpx.AsyncClient, url: str, model: str, prompt: list[int], max_tokens: int) -> Result:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    result, last = Result(ok=False), None
    try:
        async with client.stream("POST", f"{url}/v1/completions", json=body) as response:
            if response.status_code != 200:
                result.error = f"HTTP {response.status_code}: {(await response.aread())[:120]!r}"
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    result.output_tokens = chunk["usage"]["completion_tokens"]
                if not chunk.get("choices"):
                    continue
                now = time.perf_counter()  # one chunk per engine step, so per token
                if last is None:
                    result.ttft = now - start
                else:
                    result.itls.append(now - last)
                last = now
    except httpx.HTTPError as exc:
        result.error = repr(exc)
        return result
    result.ok, result.latency = True, time.perf_counter() - start
    return result


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def run_load(args: argparse.Namespace, url: str) -> None:
    rng = random.Random(args.seed)
    requests = [
        ([rng.randrange(1000, 20000) for _ in range(rng.randint(*args.prompt_len))], rng.randint(*args.output_len))
        for _ in range(args.num_requests)
    ]
    deadline = time.perf_counter() + args.max_seconds
    limits = httpx.Limits(max_connections=args.num_requests)
    async with httpx.AsyncClient(timeout=args.max_seconds, limits=limits) as client:
        tasks = []
        start = time.perf_counter()
        for prompt, max_tokens in requests:
            if time.perf_counter() > deadline:
                break
            tasks.append(asyncio.create_task(one_request(client, url, args.model, prompt, max_tokens)))
            await asyncio.sleep(rng.expovariate(args.qps))
        remaining = max(0.0, deadline - time.perf_counter())
        done, pending = await asyncio.wait(tasks, timeout=remaining)
        for task in pending:
            task.cancel()
        elapsed = time.perf_counter() - start
    results = [t.result() for t in done]
    ok = [r for r in results if r.ok]
    tokens = sum(r.output_tokens for r in ok)
    ttfts, itls = [r.ttft for r in ok], [x for r in ok for x in r.itls]
    print(f"serving load: {args.model} at {url}, {date.today()}")
    print(f"  arrivals: Poisson {args.qps}/s; prompt tokens U{tuple(args.prompt_len)}, output tokens U{tuple(args.output_len)}, seed {args.seed}")
    print(f"  requests: {len(ok)} ok, {len(results) - len(ok)} failed, {len(pending)} unfinished at the time limit")
    for error, count in Counter(r.error for r in results if not r.ok).most_common(3):
        print(f"  failed {count}x: {error}")
    print(f"  output throughput: {tokens / elapsed:.1f} tokens/s over {elapsed:.1f} s ({len(ok) / elapsed:.2f} requests/s)")
    print(f"  TTFT  p50 {percentile(ttfts, 0.5) * 1000:8.1f} ms   p99 {percentile(ttfts, 0.99) * 1000:8.1f} ms")
    print(f"  ITL   p50 {percentile(itls, 0.5) * 1000:8.1f} ms   p99 {percentile(itls, 0.99) * 1000:8.1f} ms")


def start_server(model: str) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "kvflock.cli", "--log-level", "warning", "serve", "--model", model,
                             "--host", "127.0.0.1", "--port", str(port), "--max-model-len", "2048"])
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if httpx.get(f"{url}/ready", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            raise SystemExit("the server exited during start-up")
        time.sleep(0.5)
    proc.kill()
    raise SystemExit("the server did not become ready")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="a running server (loopback only); default: start one")
    parser.add_argument("--model", default="demo")
    parser.add_argument("--qps", type=float, default=2.0)
    parser.add_argument("--num-requests", type=int, default=32)
    parser.add_argument("--prompt-len", type=int, nargs=2, default=[32, 256], metavar=("MIN", "MAX"))
    parser.add_argument("--output-len", type=int, nargs=2, default=[16, 64], metavar=("MIN", "MAX"))
    parser.add_argument("--max-seconds", type=float, default=300.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    proc = None
    if args.url:
        require_loopback(args.url)
        url = args.url.rstrip("/")
    else:
        proc, url = start_server(args.model)
    try:
        asyncio.run(run_load(args, url))
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=30)


if __name__ == "__main__":
    main()
