"""Per-key limits: under them answers are unchanged, over them 429 with Retry-After."""

from __future__ import annotations

import httpx
import pytest

from kvflock.shared.auth import AccessPolicy, KeyLimiter, requested_tokens
from tests.auth.conftest import SECOND_USER_KEY, USER_KEY, keys

PROMPT = [5, 17, 42, 99, 3, 250, 8]


def complete(url: str, key: str, max_tokens: int = 2) -> httpx.Response:
    return httpx.post(f"{url}/v1/completions", headers={"Authorization": f"Bearer {key}"},
                      json={"model": "tiny_llama", "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0})


def test_under_the_request_limit_answers_are_unchanged(start_worker):
    limited = start_worker(AccessPolicy(api_keys=keys(USER_KEY), requests_per_minute=3), model="tiny_llama")
    free = start_worker(AccessPolicy(api_keys=keys(USER_KEY)), model="tiny_llama")
    for _ in range(3):
        answer = complete(limited, USER_KEY)
        assert answer.status_code == 200
        assert answer.json()["choices"] == complete(free, USER_KEY).json()["choices"]


def test_over_the_request_limit_gets_429_with_retry_after_for_that_key_only(start_worker):
    url = start_worker(AccessPolicy(api_keys=keys(USER_KEY, SECOND_USER_KEY), requests_per_minute=2),
                       model="tiny_llama")
    assert [complete(url, USER_KEY).status_code for _ in range(2)] == [200, 200]
    refused = complete(url, USER_KEY)
    assert refused.status_code == 429
    assert refused.json()["error"]["type"] == "rate_limit_error"
    assert 1 <= int(refused.headers["retry-after"]) <= 60
    assert USER_KEY not in refused.text
    assert complete(url, SECOND_USER_KEY).status_code == 200


def test_over_the_token_limit_gets_429(start_worker):
    url = start_worker(AccessPolicy(api_keys=keys(USER_KEY), tokens_per_minute=30), model="tiny_llama")
    assert complete(url, USER_KEY, max_tokens=10).status_code == 200  # 7 prompt + 10 output tokens
    refused = complete(url, USER_KEY, max_tokens=10)
    assert refused.status_code == 429 and "30 tokens per minute" in refused.json()["error"]["message"]
    assert complete(url, USER_KEY, max_tokens=4).status_code == 200, "a smaller request still fits"


def test_limits_are_off_by_default(start_worker):
    url = start_worker(AccessPolicy(api_keys=keys(USER_KEY)), model="tiny_llama")
    assert all(complete(url, USER_KEY).status_code == 200 for _ in range(20))


def test_a_window_frees_its_requests_after_a_minute():
    now = [0.0]
    limiter = KeyLimiter(AccessPolicy(api_keys=keys(USER_KEY), requests_per_minute=1), clock=lambda: now[0])
    assert limiter.admit(0, 0) is None
    now[0] = 20.0
    assert limiter.admit(0, 0) == pytest.approx(40.0)
    now[0] = 60.0
    assert limiter.admit(0, 0) is None


def test_requested_tokens_counts_the_prompt_and_the_output_asked_for():
    assert requested_tokens(b'{"prompt": [1, 2, 3], "max_tokens": 5}') == 8
    assert requested_tokens(b'{"messages": [{"role": "user", "content": "abcdefgh"}], "max_completion_tokens": 2}') == 4
    assert requested_tokens(b"not json") == 0
