"""kvflock.router.drain: a router told to stop keeps answering on its clients' kept-alive
connections for the drain period, each answer closing its connection, then stops."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys

import httpx

from tests.polling import wait_for

# A real uvicorn DrainingServer in its own process (signals reach only a main thread).
SERVER = """
import sys, uvicorn
from fastapi import FastAPI
from kvflock.router.drain import DrainingServer
app = FastAPI()
@app.get("/ping")
def ping() -> dict: return {"ok": True}
DrainingServer(uvicorn.Config(app, host="127.0.0.1", port=int(sys.argv[1]), log_config=None), drain_seconds=3).run()
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_after_sigterm_a_kept_alive_connection_is_answered_and_closed_then_the_server_stops() -> None:
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-P", "-c", SERVER, str(port)])
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}") as client:
            wait_for(lambda: _answers(client), 60, "the server to listen")
            assert client.get("/ping").headers.get("connection") != "close"
            server.send_signal(signal.SIGTERM)
            answer = client.get("/ping")  # on the kept-alive connection, while draining
            assert answer.status_code == 200 and answer.headers["connection"] == "close"
            assert server.poll() is None
        server.wait(timeout=30)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()


def _answers(client: httpx.Client) -> bool:
    try:
        return client.get("/ping").status_code == 200
    except httpx.TransportError:
        return False
