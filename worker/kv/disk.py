"""The disk tier's files: one file per KV block, named by the block's prefix hash.

A file starts with a header (magic, format version, the model identity, payload size and
checksum), so that a block written for another model, by another format version, or cut
short by a crash is detected and never used. Files outlive the worker: a restarted worker
with the same model finds its prefixes again.
"""

import hashlib
import logging
import os
import struct
import zlib
from pathlib import Path

log = logging.getLogger(__name__)

MAGIC = b"KVFB"
FORMAT_VERSION = 1
_HEADER = struct.Struct("<4sI32sQI")  # magic, version, model identity, payload bytes, CRC-32


def _checksum(payload: bytes | bytearray | memoryview) -> int:
    """CRC-32: cheap enough for multi-MiB blocks on the restore path, and it catches torn or
    flipped bytes; identity and size checks catch foreign and truncated files."""
    return zlib.crc32(payload)


class DiskBlockStore:
    """Block files under `root`, at most `capacity_blocks` of them (oldest written go first)."""

    def __init__(self, root: Path, capacity_blocks: int, identity: bytes, block_bytes: int) -> None:
        self.root = root
        self.capacity_blocks = capacity_blocks
        self.identity = hashlib.sha256(identity).digest()
        self.block_bytes = block_bytes
        self.num_failures = 0
        self.root.mkdir(parents=True, exist_ok=True)
        files = sorted(self.root.glob("*.kvblock"), key=lambda p: p.stat().st_mtime)
        self._index: dict[int, Path] = {}
        for path in files:
            try:
                self._index[int(path.stem, 16)] = path
            except ValueError:
                continue
        while len(self._index) > capacity_blocks:
            self._evict_oldest()

    def __contains__(self, block_hash: int) -> bool:
        return block_hash in self._index

    def __len__(self) -> int:
        return len(self._index)

    def write(self, block_hash: int, payload: bytes) -> None:
        if block_hash in self._index or self.capacity_blocks == 0:
            return
        while len(self._index) >= self.capacity_blocks:
            self._evict_oldest()
        path = self.root / f"{block_hash:016x}.kvblock"
        tmp = path.with_suffix(".tmp")
        try:
            with open(tmp, "wb") as f:
                f.write(_HEADER.pack(MAGIC, FORMAT_VERSION, self.identity, len(payload), _checksum(payload)))
                f.write(payload)
            os.replace(tmp, path)  # readers never see a half-written block
        except OSError as exc:
            self._fail(f"cannot write {path} ({exc})")
            tmp.unlink(missing_ok=True)
            return
        self._index[block_hash] = path

    def read(self, block_hash: int) -> bytearray | None:
        """The block's payload, or None (with a warning, and the file dropped) if it is
        missing, truncated, corrupt, or from another model or format."""
        path = self._index.get(block_hash)
        if path is None:
            return None
        payload = bytearray(self.block_bytes)
        try:
            with open(path, "rb") as f:
                header = f.read(_HEADER.size)
                got = f.readinto(payload) if len(header) == _HEADER.size else 0
                extra = f.read(1)
        except OSError as exc:
            return self._drop(block_hash, f"cannot read {path} ({exc})")
        if len(header) < _HEADER.size:
            return self._drop(block_hash, f"{path} is truncated")
        magic, version, identity, size, checksum = _HEADER.unpack(header)
        if magic != MAGIC or version != FORMAT_VERSION:
            return self._drop(block_hash, f"{path} is not a kvflock block file of format {FORMAT_VERSION}")
        if identity != self.identity:
            return self._drop(block_hash, f"{path} belongs to another model or KV layout")
        if size != self.block_bytes or got != size or extra or _checksum(payload) != checksum:
            return self._drop(block_hash, f"{path} is truncated or corrupt")
        return payload

    def _drop(self, block_hash: int, reason: str) -> None:
        self._fail(reason)
        path = self._index.pop(block_hash, None)
        if path is not None:
            path.unlink(missing_ok=True)
        return None

    def _fail(self, reason: str) -> None:
        """One warning, then debug lines: a broken disk must not flood the log."""
        self.num_failures += 1
        level = logging.WARNING if self.num_failures == 1 else logging.DEBUG
        log.log(level, "disk KV tier: %s; recomputing instead (failures so far: %d)", reason, self.num_failures)

    def _evict_oldest(self) -> None:
        block_hash = next(iter(self._index))
        self._index.pop(block_hash).unlink(missing_ok=True)
