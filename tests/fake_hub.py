"""A local stand-in for the Hugging Face Hub's file API, serving model folders the tests build:
`GET /api/models/{repo}/revision/{rev}` (the file list with sizes, git blob ids and LFS sha256)
and `GET /{repo}/resolve/{rev}/{file}` (with Range requests, and the ETag the Hub sends). It can
cut a download once after some bytes, serve a file corrupted, and require a token."""

from __future__ import annotations

import hashlib
import http.server
import json
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path

# Files the Hub stores in LFS (it lists their sha256); others are plain git blobs (sha1).
LFS_SUFFIXES = (".safetensors", ".gguf", ".bin")


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(f"blob {len(data)}\0".encode() + data).hexdigest()


@dataclass
class FakeHub:
    """`repos` maps `org/name` to {revision: folder}."""

    repos: dict[str, dict[str, Path]]
    token: str | None = None
    cut_once: dict[str, int] = field(default_factory=dict)  # file name -> bytes sent before the cut
    corrupt: set[str] = field(default_factory=set)
    ranges: list[str] = field(default_factory=list)  # the Range headers received, in order
    url: str = ""

    def __post_init__(self) -> None:
        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def _send(self, code: int, body: bytes, headers: dict[str, str] | None = None) -> None:
                self.send_response(code)
                for key, value in {"Content-Length": str(len(body)), **(headers or {})}.items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                if hub.token is not None and self.headers.get("Authorization") != f"Bearer {hub.token}":
                    self._send(401, b'{"error": "Invalid credentials"}')
                    return
                path = self.path.split("?")[0]
                if match := re.fullmatch(r"/api/models/([^/]+/[^/]+)/revision/([^/]+)", path):
                    folder = hub.folder(match[1], match[2])
                    if folder is None:
                        self._send(404, b'{"error": "Repository not found"}')
                        return
                    self._send(200, json.dumps(hub.listing(folder)).encode(), {"Content-Type": "application/json"})
                elif match := re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path):
                    folder = hub.folder(match[1], match[2])
                    file = folder / match[3] if folder else None
                    if file is None or not file.is_file():
                        self._send(404, b"Entry not found")
                        return
                    self._file(file)
                else:
                    self._send(404, b"not found")

            def _file(self, file: Path) -> None:
                data = file.read_bytes()
                etag = hashlib.sha256(data).hexdigest() if file.name.endswith(LFS_SUFFIXES) else git_blob_sha1(data)
                if file.name in hub.corrupt:
                    data = bytes([data[0] ^ 0xFF]) + data[1:]
                start = 0
                if (header := self.headers.get("Range")) is not None:
                    hub.ranges.append(header)
                    start = int(re.fullmatch(r"bytes=(\d+)-", header)[1])
                    if start >= len(data):
                        self._send(416, b"", {"Content-Range": f"bytes */{len(data)}"})
                        return
                headers = {"ETag": f'"{etag}"', "Accept-Ranges": "bytes", "Content-Length": str(len(data) - start)}
                self.send_response(206 if start else 200)
                if start:
                    headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
                for key, value in headers.items():
                    self.send_header(key, value)
                self.end_headers()
                cut = hub.cut_once.pop(file.name, None)
                if cut is not None:  # send part of the body, then drop the connection
                    self.wfile.write(data[start:start + cut])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(data[start:])

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def folder(self, repo: str, revision: str) -> Path | None:
        return self.repos.get(repo, {}).get(revision)

    @staticmethod
    def listing(folder: Path) -> dict[str, object]:
        siblings = []
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            data = path.read_bytes()
            sibling: dict[str, object] = {"rfilename": path.relative_to(folder).as_posix(), "size": len(data),
                                          "blobId": git_blob_sha1(data)}
            if path.name.endswith(LFS_SUFFIXES):
                sibling["lfs"] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
            siblings.append(sibling)
        return {"sha": hashlib.sha1(folder.as_posix().encode()).hexdigest(), "siblings": siblings}

    def __enter__(self) -> FakeHub:
        self._thread.start()
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
