"""`kvflock serve --context-parallel-size 2` answers a long prompt (split over the two ranks)
through the OpenAI API exactly as one rank does, and the replica is all or nothing: killing
the context-parallel rank takes the server down within seconds, naming the rank."""

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import openai
import pytest
import torch

from kvflock.worker.config import SamplingParams
from kvflock.worker.llm import LLM
from tests.server.conftest import free_port
from tests.tiny_models import VOCAB
from tests.tp.test_tp_failure import EXIT_WITHIN_SECONDS, rank_pids, running, wait_exit

LIMITS = ["--dtype", "float64", "--max-model-len", "128", "--block-size", "4", "--max-num-batched-tokens", "32"]


@contextmanager
def cp_server(model: Path, tmp_path: Path) -> Iterator[tuple[subprocess.Popen, str, Path]]:
    port = free_port()
    log = tmp_path / "serve.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "kvflock.cli", "serve", "--model", str(model), "--served-model-name", "tiny",
             "--host", "127.0.0.1", "--port", str(port), "--device", "cpu", *LIMITS,
             "--context-parallel-size", "2", "--context-parallel-min-tokens", "8"],
            stdout=out, stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "the server did not become ready"
            try:
                if httpx.get(f"{url}/ready").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        yield proc, url, log
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_cp_server_answers_as_one_rank_and_goes_down_with_its_rank(tiny_models, tmp_path):
    prompt = torch.randint(0, VOCAB, (45,), generator=torch.Generator().manual_seed(3)).tolist()
    one_rank = LLM(str(tiny_models["llama"]), dtype="float64", max_model_len=128, block_size=4,
                   max_num_batched_tokens=32)
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, logprobs=0)
    expected = [t.logprob for t in one_rank.generate([prompt], params)[0].outputs[0].logprobs]

    with cp_server(tiny_models["llama"], tmp_path) as (proc, url, log):
        ranks = rank_pids(proc.pid)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
        reply = client.completions.create(model="tiny", prompt=prompt, max_tokens=8, temperature=0.0, logprobs=0,
                                          extra_body={"ignore_eos": True})
        # The tiny model has no tokenizer (no text): the greedy tokens' log-probabilities tell them apart.
        assert reply.choices[0].logprobs.token_logprobs == pytest.approx(expected, abs=1e-9)

        os.kill(ranks[0], signal.SIGKILL)
        code, seconds = wait_exit(proc)

    assert len(ranks) == 1
    assert code != 0 and seconds < EXIT_WITHIN_SECONDS
    assert f"rank 1 (pid {ranks[0]}) exited with code -9" in log.read_text()
    assert not any(running(pid) for pid in ranks)
