"""Digests of a feature cache's arrays: recorded when it is built, checked when it is opened.

Opening always runs the cheap check: each file's size, and the sha1 of a few sampled blocks (the first, middle and
last SAMPLE_BLOCK bytes), so a cache edited or damaged where those blocks lie is never used, at the cost of a few
MiB read. `verify=True` (the `verify_cache` key) also hashes every byte and compares the sha1 the build recorded
(the one a sharded build already checks its parts by), catching an edit anywhere.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

SAMPLE_BLOCK = 1 << 20  # bytes per sampled block: 1 MiB
READ_CHUNK = 16 << 20


def sample_offsets(size: int, block: int) -> list[int]:
    """Start offsets of the sampled blocks of a `size`-byte file: first, middle, last (fewer when they overlap)."""
    if size <= 3 * block:
        return [0]  # the whole file is hashed in one read below
    return [0, (size - block) // 2, size - block]


def sampled_sha1(path: Path) -> str:
    """sha1 of the sampled blocks of `path` (its whole bytes when it is at most 3 blocks long)."""
    block, size, digest = SAMPLE_BLOCK, path.stat().st_size, hashlib.sha1()
    digest.update(f"{size}:{block}\n".encode())  # a block size change reads as a mismatch, never as a pass
    with open(path, "rb") as f:
        for offset in sample_offsets(size, block):
            f.seek(offset)
            digest.update(f.read(size if size <= 3 * block else block))
    return digest.hexdigest()


def full_sha1(path: Path) -> str:
    """sha1 of every byte of `path` (equal to the digest the build computed as it wrote)."""
    digest, buffer = hashlib.sha1(), bytearray(READ_CHUNK)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buffer):
            digest.update(memoryview(buffer)[:n])
    return digest.hexdigest()


def sampled_digests(folder: Path, files: dict[str, str | None]) -> dict:
    """{"sampled_sha1": {file: digest}} for the meta.json of a finished build; `files` maps name -> full sha1 key
    (None for a file the cache does not have, e.g. labels of an unlabelled split)."""
    return {"sampled_sha1": {name: sampled_sha1(folder / name) for name, key in files.items() if key is not None},
            "sample_block": SAMPLE_BLOCK}


def check_digests(folder: Path, meta: dict, files: dict[str, str], *, verify: bool) -> str | None:
    """What is wrong with the arrays of `folder` (`files` maps name -> meta key of its full sha1), or None.

    Sizes are checked by the caller (they need the shapes); here the sampled blocks, and with `verify` every byte.
    """
    recorded = meta.get("sampled_sha1")
    if not isinstance(recorded, dict) or meta.get("sample_block") != SAMPLE_BLOCK:
        return "its meta.json records no digest of sampled blocks (made by an older version)"
    for name, sha_key in files.items():
        if recorded.get(name) != sampled_sha1(folder / name):
            return f"{name} does not match the digest of its sampled blocks (edited or damaged on disk)"
        if verify and meta.get(sha_key) != full_sha1(folder / name):
            return f"{name} does not match its recorded sha1 (verify_cache=true; edited or damaged on disk)"
    return None
