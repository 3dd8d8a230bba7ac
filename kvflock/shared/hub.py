"""Where a model from the Hugging Face Hub lives: `hf://org/name@revision` parsed, and the folder
of a cache that holds its files. The operator names that folder in the worker's command before
anything is fetched; `kvflock fetch-model` (kvflock.worker.model.hub) fills it."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import PurePosixPath

SCHEME = "hf://"
SOURCE_PATTERN = r"^hf://[A-Za-z0-9][-._A-Za-z0-9]*/[-._A-Za-z0-9]+(@[-._/A-Za-z0-9]+)?$"


@dataclass(frozen=True)
class HubSource:
    """A parsed `hf://org/name@revision` (revision: a branch, tag or commit; default main)."""

    repo: str
    revision: str

    @classmethod
    def parse(cls, source: str) -> HubSource:
        if not re.match(SOURCE_PATTERN, source):
            raise ValueError(f"model source: {source!r} is not hf://org/name[@revision]")
        repo, _, revision = source.removeprefix(SCHEME).partition("@")
        return cls(repo, revision or "main")


def model_dir(cache: PurePosixPath, source: HubSource) -> PurePosixPath:
    """`<cache>/<org>--<name>/<revision>`: one folder per revision, so pods of two revisions share a cache."""
    return cache / source.repo.replace("/", "--") / source.revision.replace("/", "--")
