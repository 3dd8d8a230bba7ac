"""Content hashes of full KV blocks: a block's hash covers its parent block's hash and its own
token ids, so equal hashes mean equal prefixes. Stable across processes and restarts (the
disk tier and the router rely on that), unlike Python's built-in hash(). A `root` stands in for
the first block's parent: KV computed under a LoRA adapter hashes from the adapter's, so it is
never shared with the base model or another adapter."""

import hashlib
from array import array

_NO_PARENT = b"\x00" * 8


def hash_block(parent: int | None, token_ids: list[int]) -> int:
    digest = hashlib.blake2b(digest_size=8)
    digest.update(_NO_PARENT if parent is None else parent.to_bytes(8, "little"))
    digest.update(array("q", token_ids).tobytes())
    return int.from_bytes(digest.digest(), "little")


def hash_blocks(token_ids: list[int], block_size: int, known: list[int] | None = None,
                root: int | None = None) -> list[int]:
    """Hashes of every full block of `token_ids`, extending the `known` leading hashes."""
    hashes = list(known or [])
    for start in range(len(hashes) * block_size, len(token_ids) - block_size + 1, block_size):
        hashes.append(hash_block(hashes[-1] if hashes else root, token_ids[start : start + block_size]))
    return hashes
