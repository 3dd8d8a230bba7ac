"""Fetching a model from the Hugging Face Hub (or a mirror at `HF_ENDPOINT`) into a local cache:
what `kvflock fetch-model` does, and what a worker pod's init container runs before the worker.

A source is `hf://org/name@revision` (kvflock.shared.hub parses it and names its folder in the
cache, `<cache>/<org>--<name>/<revision>/`, so the operator can point the worker there first). The Hub's file API gives each
file's size and checksum (the LFS sha256, else the git blob sha1); each file downloads into a
`.partial` file, resumes with an HTTP Range request after a cut connection, and is moved into
place only once its checksum matches. A mismatch deletes the partial file and fails, naming the
file. One fetch at a time per model folder (a file lock), so pods on one node share the cache.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO
from urllib.parse import quote

import httpx

from kvflock.shared.hub import HubSource
from kvflock.shared.hub import model_dir as shared_model_dir

DEFAULT_ENDPOINT = "https://huggingface.co"
ENDPOINT_ENV = "HF_ENDPOINT"
TOKEN_ENV = "HF_TOKEN"
# Written last into a complete model folder: the revision's files and checksums, so a later start
# skips the Hub when nothing changed and re-reads nothing from disk.
COMPLETE_MARKER = ".kvflock-complete.json"
CHUNK = 1 << 20
# Attempts per file; each resumes where the last one stopped.
ATTEMPTS = 5


@dataclass(frozen=True)
class HubFile:
    """One file of a revision, as the Hub lists it."""

    name: str
    size: int
    algorithm: str  # "sha256" (LFS files) or "sha1" (git blob id of small files)
    digest: str


def model_dir(cache: Path, source: HubSource) -> Path:
    return Path(shared_model_dir(PurePosixPath(cache), source))


def _git_blob_sha1(size: int) -> hashlib._Hash:
    digest = hashlib.sha1()
    digest.update(f"blob {size}\0".encode())
    return digest


def _new_hash(file: HubFile) -> hashlib._Hash:
    return hashlib.sha256() if file.algorithm == "sha256" else _git_blob_sha1(file.size)


class Progress:
    """One updating line per file on a terminal; one line per finished file otherwise."""

    def __init__(self, stream: IO[str] = sys.stderr) -> None:
        self.stream = stream
        self.tty = stream.isatty()
        self._last = 0.0

    def update(self, file: HubFile, done: int) -> None:
        now = time.monotonic()
        if not self.tty or (now - self._last < 0.1 and done < file.size):
            return
        self._last = now
        percent = 100 * done / file.size if file.size else 100.0
        self.stream.write(f"\r{file.name}: {done / 2**20:.1f}/{file.size / 2**20:.1f} MiB ({percent:.0f}%)\033[K")
        self.stream.flush()

    def finished(self, file: HubFile, how: str) -> None:
        line = f"{file.name}: {how} ({file.size} bytes)"
        self.stream.write(f"\r{line}\033[K\n" if self.tty else f"{line}\n")
        self.stream.flush()


class HubClient:
    """The Hub's file API: a revision's file list, and a file's bytes from an offset."""

    def __init__(self, endpoint: str | None = None, token: str | None = None, timeout: float = 30.0) -> None:
        self.endpoint = (endpoint or os.environ.get(ENDPOINT_ENV) or DEFAULT_ENDPOINT).rstrip("/")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.http = httpx.Client(headers=headers, timeout=timeout, follow_redirects=True)

    def close(self) -> None:
        self.http.close()

    def files(self, source: HubSource) -> list[HubFile]:
        url = f"{self.endpoint}/api/models/{source.repo}/revision/{quote(source.revision, safe='')}"
        response = self.http.get(url, params={"blobs": "true"})
        if response.status_code in (401, 403):
            raise ValueError(f"{source.repo}@{source.revision}: the Hub refused access ({response.status_code}); "
                             f"a gated or private model needs a token (the token Secret, or {TOKEN_ENV})")
        if response.status_code == 404:
            raise ValueError(f"{source.repo}@{source.revision}: no such model or revision at {self.endpoint}")
        response.raise_for_status()
        files = []
        for sibling in response.json().get("siblings", []):
            lfs = sibling.get("lfs")
            if lfs:
                files.append(HubFile(sibling["rfilename"], int(lfs["size"]), "sha256", lfs["sha256"]))
            else:
                files.append(HubFile(sibling["rfilename"], int(sibling["size"]), "sha1", sibling["blobId"]))
        return files

    @contextmanager
    def open(self, source: HubSource, file: HubFile, offset: int) -> Iterator[tuple[httpx.Response, int]]:
        """The file's bytes from `offset` (a Range request), and the offset they really start at:
        0 when the server ignored the Range."""
        url = f"{self.endpoint}/{source.repo}/resolve/{quote(source.revision, safe='')}/{quote(file.name)}"
        headers = {"Range": f"bytes={offset}-"} if offset else {}
        with self.http.stream("GET", url, headers=headers) as response:
            if response.status_code == 416:  # nothing left past `offset`: the partial file is whole
                yield response, offset
                return
            response.raise_for_status()
            yield response, offset if response.status_code == 206 else 0


def _hash_file(path: Path, digest: hashlib._Hash) -> hashlib._Hash:
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest


def _download(client: HubClient, source: HubSource, file: HubFile, target: Path, progress: Progress,
              sleep: Callable[[float], None]) -> str:
    """Fetch one file to `target`, resuming a `.partial` left by an earlier attempt; returns how."""
    partial = target.with_name(target.name + ".partial")
    partial.parent.mkdir(parents=True, exist_ok=True)
    resumed = partial.exists() and partial.stat().st_size > 0
    for attempt in range(1, ATTEMPTS + 1):
        offset = partial.stat().st_size if partial.exists() else 0
        try:
            with client.open(source, file, offset) as (response, start):
                with partial.open("r+b" if partial.exists() else "wb") as out:
                    out.truncate(start)
                    out.seek(start)
                    done = start
                    if response.status_code != 416:
                        for chunk in response.iter_bytes():  # as received: a cut keeps every byte read
                            out.write(chunk)
                            done += len(chunk)
                            progress.update(file, done)
            if done < file.size:
                raise httpx.ReadError(f"connection closed after {done} of {file.size} bytes")
            break
        except (httpx.TransportError, httpx.RemoteProtocolError) as exc:
            if attempt == ATTEMPTS:
                raise ValueError(f"{file.name}: download failed {ATTEMPTS} times, last: {exc}") from None
            resumed = True
            sleep(min(2.0 ** attempt, 30.0))
    got, size = _hash_file(partial, _new_hash(file)).hexdigest(), partial.stat().st_size
    if size != file.size or got != file.digest:
        partial.unlink()
        raise ValueError(f"{file.name}: checksum mismatch: the Hub lists {file.algorithm} {file.digest} "
                         f"({file.size} bytes), the download has {got} ({size} bytes); deleted it, the next "
                         f"fetch starts over")
    partial.replace(target)
    return "resumed and verified" if resumed else "downloaded and verified"


@contextmanager
def _locked(folder: Path) -> Iterator[None]:
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def fetch(source: HubSource, cache: Path, client: HubClient, progress: Progress | None = None,
          sleep: Callable[[float], None] = time.sleep) -> Path:
    """Make `model_dir(cache, source)` hold every file of the revision, verified; returns it."""
    progress = progress or Progress()
    folder = model_dir(cache, source)
    with _locked(folder):
        files = client.files(source)
        listing = {f.name: f"{f.algorithm}:{f.digest}" for f in files}
        marker = folder / COMPLETE_MARKER
        if marker.exists() and json.loads(marker.read_text()) == listing:
            progress.stream.write(f"{source.repo}@{source.revision}: already in {folder}\n")
            return folder
        for file in files:
            target = folder / file.name
            if not target.resolve().is_relative_to(folder.resolve()):
                raise ValueError(f"{file.name}: the Hub listed a file outside the model folder")
            if target.exists() and target.stat().st_size == file.size and \
                    _hash_file(target, _new_hash(file)).hexdigest() == file.digest:
                progress.finished(file, "already here")
                continue
            progress.finished(file, _download(client, source, file, target, progress, sleep))
        marker.write_text(json.dumps(listing, indent=1, sort_keys=True) + "\n")
    return folder
