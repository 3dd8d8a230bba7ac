"""A replica of tensor x pipeline ranks is all or nothing too: when a rank of the last stage is
killed while requests are generating, the server exits non-zero within seconds and leaves no
rank process behind, so the pod restarts."""

import os
import signal
import threading

import httpx

from tests.tp.test_tp_failure import EXIT_WITHIN_SECONDS, rank_pids, running, tp_server, wait_exit


def test_killing_a_rank_of_the_last_stage_under_load_takes_the_replica_down(tiny_models, tmp_path):
    with tp_server(tiny_models["qwen2"], 2, tmp_path, pp=2) as (proc, url, log):
        ranks = rank_pids(proc.pid)
        assert len(ranks) == 3
        generating = threading.Event()

        def generate() -> None:
            body = {"model": "tiny", "prompt": [5, 6, 7], "max_tokens": 120, "stream": True, "ignore_eos": True}
            try:
                with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as reply:
                    for _ in reply.iter_lines():
                        generating.set()
            except httpx.HTTPError:
                pass  # the server goes down under it

        clients = [threading.Thread(target=generate) for _ in range(4)]
        for client in clients:
            client.start()
        assert generating.wait(60), log.read_text()

        os.kill(ranks[2], signal.SIGKILL)  # rank 3: the last stage's second tensor rank
        code, seconds = wait_exit(proc)
        for client in clients:
            client.join(30)

    text = log.read_text()
    assert code != 0
    assert seconds < EXIT_WITHIN_SECONDS
    assert "replica (TP2xPP2) failed" in text
    assert not any(running(pid) for pid in ranks)
