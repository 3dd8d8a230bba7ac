"""The router in front of real workers, called with the `openai` client and httpx: prefix
affinity, retries when a replica stops or dies before answering, draining replicas left alone,
429 when every queue is full, streams relayed intact, pools by prompt length."""

from __future__ import annotations

import json
import socket
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from kvflock.router.config import RouterSettings
from kvflock.router.policy import Pool
from tests.router.conftest import MODEL, client, metric, token_prompt, wait_for


def complete(url: str, prompt: list[int], max_tokens: int = 4, **extra) -> httpx.Response:
    body = {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, **extra}
    return httpx.post(f"{url}/v1/completions", json=body, timeout=60)


def replica_of(response: httpx.Response) -> str:
    assert response.status_code == 200, response.text
    return response.headers["x-kvflock-replica"]


def test_requests_sharing_a_long_prefix_go_to_the_same_replica(start_worker, start_router):
    workers = [start_worker().url for _ in range(3)]
    prefix_router = start_router(workers, policy="prefix-aware")
    round_robin = start_router(workers, policy="round-robin")
    groups = range(4)
    placements: dict[str, dict[int, Counter]] = {}
    for name, url in (("prefix-aware", prefix_router), ("round-robin", round_robin)):
        placements[name] = {g: Counter() for g in groups}
        for suffix in range(6):
            for g in groups:
                placements[name][g][replica_of(complete(url, token_prompt(g, suffix)))] += 1

    for g in groups:
        assert len(placements["prefix-aware"][g]) == 1, placements["prefix-aware"][g]
    print("\nrequests per replica for each shared prefix (4 prefixes x 6 requests, 3 replicas)")
    for name, url in (("prefix-aware", prefix_router), ("round-robin", round_robin)):
        short = {w: f"w{i}" for i, w in enumerate(workers)}
        rows = ", ".join(f"prefix {g}: " + " ".join(f"{short[r]}={n}" for r, n in sorted(c.items()))
                         for g, c in placements[name].items())
        hit = metric(url, "kvflock_router_prefix_blocks_total") / metric(url, "kvflock_router_prompt_blocks_total")
        print(f"  {name:>12}: estimated prefix-cache hit rate {hit:5.1%} | {rows}")


def test_a_replica_stopped_under_load_fails_no_request(start_worker, start_router):
    workers = [start_worker() for _ in range(3)]
    # Round robin keeps sending the victim its share, and a slow poll leaves the router to find
    # out from the requests themselves.
    url = start_router([w.url for w in workers], policy="round-robin", poll_interval=5.0)
    victim = workers[0]
    done = threading.Event()
    results: list[int] = []

    def one(i: int) -> int:
        if i == 12:
            victim.stop()
            done.set()
        return complete(url, token_prompt(i % 6, i), max_tokens=8).status_code

    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(one, range(48)))

    assert done.is_set()
    assert results == [200] * 48
    after = [replica_of(complete(url, token_prompt(g, 99))) for g in range(6)]
    assert victim.url not in after
    assert metric(url, "kvflock_router_retries_total", replica=victim.url, reason="connect_error") >= 1
    print(f"\nretries after stopping {victim.url}: "
          f"{metric(url, 'kvflock_router_retries_total'):.0f}; every one of 48 requests answered 200")


class DyingReplica:
    """Answers /ready and /metrics like a healthy worker, then drops every request's connection
    before sending a byte: a worker that crashes as it starts on a request."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.dropped = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        with conn:
            while True:
                head = b""
                while b"\r\n\r\n" not in head:
                    chunk = conn.recv(65536)
                    if not chunk:
                        return
                    head += chunk
                if head.startswith((b"GET /ready", b"GET /metrics")):
                    body = b'{"ready": true}' if head.startswith(b"GET /ready") else b""
                    conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
                    continue
                self.dropped += 1
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                return

    def close(self) -> None:
        self.sock.close()


def test_a_replica_that_dies_before_the_first_byte_is_retried_elsewhere(start_worker, start_router):
    dying = DyingReplica()
    try:
        healthy = start_worker().url
        url = start_router([dying.url, healthy], policy="round-robin")
        answers = [complete(url, token_prompt(1, i)) for i in range(4)]
        assert [replica_of(a) for a in answers] == [healthy] * 4
        assert dying.dropped >= 1
        assert metric(url, "kvflock_router_retries_total", reason="disconnected") >= 1
    finally:
        dying.close()


def test_a_draining_replica_gets_no_new_requests(start_worker, start_router):
    workers = [start_worker().url for _ in range(2)]
    url = start_router(workers)
    httpx.post(f"{workers[0]}/admin/drain")
    wait_for(lambda: metric(url, "kvflock_router_replicas", state="draining") == 1, what="the router to see the drain")
    served = {replica_of(complete(url, token_prompt(g, 0))) for g in range(12)}
    assert served == {workers[1]}


def test_every_queue_full_sheds_load_with_429(start_worker, start_router):
    workers = [start_worker(max_queued_requests=0, max_num_seqs=1).url for _ in range(2)]
    url = start_router(workers)

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda i: complete(url, token_prompt(i, i), max_tokens=200, ignore_eos=True), range(8)))

    codes = Counter(a.status_code for a in answers)
    assert set(codes) <= {200, 429} and codes[200] >= 2 and codes[429] >= 1, codes
    refused = next(a for a in answers if a.status_code == 429)
    assert int(refused.headers["retry-after"]) >= 1
    assert refused.json()["error"]["type"] == "rate_limit_error"
    with pytest.raises(openai.RateLimitError):
        with ThreadPoolExecutor(8) as pool:
            calls = [pool.submit(client(url).completions.create, model=MODEL, prompt=token_prompt(i, i), max_tokens=200,
                                 extra_body={"ignore_eos": True}) for i in range(8)]
            [c.result() for c in calls]


def test_streaming_passes_through_intact(start_worker, start_router):
    worker = start_worker().url
    url = start_router([worker])
    prompt = token_prompt(3, 3)
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 12, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        raw = b"".join(response.iter_raw())
    events = [e for e in raw.decode().split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    chunks = [json.loads(e[len("data: "):]) for e in events[:-1]]
    streamed = "".join(c["choices"][0]["text"] for c in chunks if c["choices"])
    assert chunks[-1]["usage"]["completion_tokens"] == 12

    full = client(url).completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0)
    direct = client(worker).completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0)
    assert streamed == full.choices[0].text == direct.choices[0].text
    sdk = "".join(c.choices[0].text for c in client(url).completions.create(
        model=MODEL, prompt=prompt, max_tokens=12, temperature=0, stream=True))
    assert sdk == streamed


def test_models_health_ready_and_errors_pass_through(start_worker, start_router):
    url = start_router([start_worker().url])
    assert [m.id for m in client(url).models.list().data] == [MODEL]
    assert httpx.get(f"{url}/health").json()["status"] == "ok"
    assert httpx.get(f"{url}/ready").status_code == 200
    unknown = httpx.post(f"{url}/v1/completions", json={"model": "nope", "prompt": [1, 2], "max_tokens": 2})
    assert unknown.status_code == 404 and unknown.json()["error"]["param"] == "model"
    bad = httpx.post(f"{url}/v1/completions", content=b"{not json")
    assert bad.status_code == 400 and "JSON" in bad.json()["error"]["message"]


def test_no_ready_replica_is_503_and_the_router_is_unready(start_worker, start_router):
    worker = start_worker()
    url = start_router([worker.url])
    worker.stop()
    wait_for(lambda: httpx.get(f"{url}/ready").status_code == 503, what="the router to notice")
    refused = complete(url, token_prompt(1, 1))
    assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
    assert refused.json()["error"]["type"] == "service_unavailable"


def test_short_and_long_prompts_land_in_their_pools(start_worker, start_router):
    short, long = start_worker().url, start_worker().url
    settings = RouterSettings(pools=(Pool("short", 0, 64), Pool("long", 64, None)))
    url = start_router([f"short={short}", f"long={long}"], settings=settings)
    assert {replica_of(complete(url, token_prompt(g, 0, prefix_tokens=16))) for g in range(5)} == {short}
    assert {replica_of(complete(url, token_prompt(g, 0, prefix_tokens=200))) for g in range(5)} == {long}
    assert metric(url, "kvflock_router_routing_decisions_total", pool="long") == 5
