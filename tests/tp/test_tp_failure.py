"""`kvflock serve --tensor-parallel-size N` serves with N rank processes, and a replica is
all or nothing: when one rank dies, the server exits non-zero within seconds, naming the
rank, and leaves no rank process behind; when rank 0 dies, the other ranks exit by themselves."""

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from tests.server.conftest import free_port

EXIT_WITHIN_SECONDS = 10


def rank_pids(parent: int) -> list[int]:
    """The rank processes that `parent` started."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (entry / "cmdline").read_bytes()
        except (OSError, IndexError):
            continue
        if ppid == parent and b"kvflock.worker.tp" in cmdline:
            pids.append(int(entry.name))
    return sorted(pids)


def running(pid: int) -> bool:
    """True while `pid` exists and is not a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@contextmanager
def tp_server(model: Path, tp: int, tmp_path: Path, pp: int = 1) -> Iterator[tuple[subprocess.Popen, str, Path]]:
    port = free_port()
    log = tmp_path / "serve.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "kvflock.cli", "serve", "--model", str(model), "--served-model-name", "tiny",
             "--host", "127.0.0.1", "--port", str(port), "--device", "cpu", "--dtype", "float32",
             "--max-model-len", "128", "--tensor-parallel-size", str(tp), "--pipeline-parallel-size", str(pp)],
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


def wait_exit(proc: subprocess.Popen) -> tuple[int, float]:
    started = time.monotonic()
    code = proc.wait(timeout=EXIT_WITHIN_SECONDS * 3)
    return code, time.monotonic() - started


def test_killing_a_rank_takes_the_replica_down(tiny_models, tmp_path):
    with tp_server(tiny_models["qwen2"], 4, tmp_path) as (proc, url, log):
        ranks = rank_pids(proc.pid)
        assert len(ranks) == 3
        reply = httpx.post(f"{url}/v1/completions", json={"model": "tiny", "prompt": [5, 6, 7], "max_tokens": 4},
                           timeout=60)
        assert reply.status_code == 200, reply.text

        os.kill(ranks[1], signal.SIGKILL)
        code, seconds = wait_exit(proc)

    assert code != 0
    assert seconds < EXIT_WITHIN_SECONDS
    assert f"rank 2 (pid {ranks[1]}) exited with code -9" in log.read_text()
    assert not any(running(pid) for pid in ranks)
    assert not any(Path(f"/proc/{pid}").exists() for pid in ranks), "rank 0 must reap its ranks"


def test_ranks_exit_when_rank_0_dies(tiny_models, tmp_path):
    with tp_server(tiny_models["llama"], 2, tmp_path) as (proc, _, _):
        ranks = rank_pids(proc.pid)
        proc.kill()
        proc.wait()

    deadline = time.monotonic() + EXIT_WITHIN_SECONDS
    while any(running(pid) for pid in ranks) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(running(pid) for pid in ranks)


def test_serve_refuses_a_size_below_one_naming_the_field():
    result = subprocess.run([sys.executable, "-m", "kvflock.cli", "serve", "--tensor-parallel-size", "0"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "tensor_parallel_size" in result.stderr
