"""Reading a GGUF file's header: its metadata and where each tensor lies, without numpy or torch.

gguf's own GGUFReader parses every metadata array item by item into numpy views; for a real
model's tokenizer (SmolLM2's 49,152-token vocabulary and merges) that took 8.8 s on this project's
2-core machine, on every worker start and in the operator's model check. This reader skips arrays
(nothing here needs them: the tokenizer is read by transformers), keeps scalars and strings, and
reads the tensor table, in about 0.2 s. Layout, from the GGUF specification: magic, version, tensor
count, metadata count, the metadata (key, type, value), the tensor table (name, dims, type,
offset), then the tensor data from the next multiple of `general.alignment` (default 32).
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
_LENGTH = struct.Struct("<Q")
_DEFAULT_ALIGNMENT = 32


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dims: tuple[int, ...]  # GGUF's order: the fastest-varying dimension first
    ggml_type: int
    offset: int  # from the start of the data section


@dataclass
class GGUFHeader:
    metadata: dict[str, Any]  # scalars and strings; arrays are present with the value None
    tensors: list[TensorInfo] = field(default_factory=list)
    data_offset: int = 0  # where the data section starts in the file


class _Reader:
    """Reads values from a memory map of the file, skipping arrays by their sizes."""

    def __init__(self, data: mmap.mmap) -> None:
        self.data, self.pos = data, 0

    def scalar(self, fmt: str) -> Any:
        size = struct.calcsize(fmt)
        if self.pos + size > len(self.data):
            raise ValueError("the header ends early")
        value = struct.unpack_from(fmt, self.data, self.pos)[0]
        self.pos += size
        return value

    def string(self) -> str:
        size = self.scalar("<Q")
        if self.pos + size > len(self.data):
            raise ValueError("the header ends early")
        text = self.data[self.pos:self.pos + size].decode("utf-8", errors="replace")
        self.pos += size
        return text

    def value(self, kind: int) -> Any:
        if kind in _SCALARS:
            return self.scalar(_SCALARS[kind])
        if kind == _STRING:
            return self.string()
        if kind == _ARRAY:
            item, count = self.scalar("<I"), self.scalar("<Q")
            if item in _SCALARS:
                self.pos += struct.calcsize(_SCALARS[item]) * count
            elif item == _STRING:  # a vocabulary: tens of thousands of strings, lengths only
                length, pos = _LENGTH.unpack_from, self.pos
                for _ in range(count):
                    pos += 8 + length(self.data, pos)[0]
                self.pos = pos
            else:
                for _ in range(count):
                    self.value(item)
            return None
        raise ValueError(f"unknown metadata value type {kind}")


def read_header(path: Path, tensors: bool = True) -> GGUFHeader:
    """The header of the GGUF file at `path`; ValueError naming the file when it is not one."""
    try:
        with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            read = _Reader(data)
            if data[:4] != b"GGUF":
                raise ValueError("no GGUF magic number")
            read.pos = 4
            read.scalar("<I")  # version
            num_tensors, num_metadata = read.scalar("<Q"), read.scalar("<Q")
            header = GGUFHeader({})
            for _ in range(num_metadata):
                key = read.string()
                header.metadata[key] = read.value(read.scalar("<I"))
            if not tensors:
                return header
            for _ in range(num_tensors):
                name = read.string()
                dims = tuple(read.scalar("<Q") for _ in range(read.scalar("<I")))
                header.tensors.append(TensorInfo(name, dims, read.scalar("<I"), read.scalar("<Q")))
            alignment = header.metadata.get("general.alignment") or _DEFAULT_ALIGNMENT
            header.data_offset = -(-read.pos // alignment) * alignment
            return header
    except (struct.error, OverflowError, MemoryError, ValueError) as exc:
        raise ValueError(f"{path}: not a readable GGUF file ({exc})") from exc
