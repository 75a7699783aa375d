"""Fixtures shared by every test folder: crafted files whose unpickling would run code, and the test device.

`USS_TEST_DEVICE=cuda` (set by `make gpu-check`) runs the device-parametrised tests on the GPU; the default suite
runs on the CPU.

`crafted_file` is parametrised over the ways a file read with pickle can carry a payload, so a test that takes it
runs once per format. Each payload creates a marker file when it runs; a reader that is safe leaves none.
"""

from __future__ import annotations

import io
import os
import pathlib
import pickle
import pickletools
from dataclasses import dataclass

import pytest
import torch

# torch.save's legacy (non-zip) format is five pickles in a row: magic number, protocol version, system info, the
# object (tensors as persistent ids), storage keys; the raw storage bytes follow.
LEGACY_PICKLES = ("magic", "protocol", "sysinfo", "main", "storage-keys")
CRAFTED_FORMATS = ("raw-pickle", "zip", *(f"legacy-{name}" for name in LEGACY_PICKLES))


class Touch:
    """Unpickling this calls `pathlib.Path.touch(marker)` (via getattr in protocol 2), as a crafted file would."""

    def __init__(self, marker: pathlib.Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (self.marker,)


class EvalTo:
    """Unpickling this runs `eval`, which touches the marker and returns `value`, so the load would go on."""

    def __init__(self, marker: pathlib.Path, value) -> None:
        self.marker, self.value = marker, value

    def __reduce__(self):
        return eval, (f"__import__('pathlib').Path({str(self.marker)!r}).touch() or {self.value!r}",)


@dataclass
class Crafted:
    path: pathlib.Path
    marker: pathlib.Path
    format: str


def split_pickles(data: bytes, count: int) -> list[bytes]:
    """The first `count` pickles of `data` and the rest, found by walking the opcodes (nothing is unpickled)."""
    stream, parts, start = io.BytesIO(data), [], 0
    for _ in range(count):
        for _ in pickletools.genops(stream):
            pass
        parts.append(data[start : stream.tell()])
        start = stream.tell()
    return [*parts, data[start:]]


def legacy_with_payload(content: dict, position: int, marker: pathlib.Path) -> bytes:
    """A legacy torch.save file of `content` whose pickle number `position` is a payload returning the original."""
    buffer = io.BytesIO()
    torch.save(content, buffer, _use_new_zipfile_serialization=False)
    parts = split_pickles(buffer.getvalue(), len(LEGACY_PICKLES))
    original = pickle.loads(parts[position])  # our own plain values: magic number, protocol, sys info or keys
    parts[position] = pickle.dumps(EvalTo(marker, original), protocol=2)
    return b"".join(parts)


def write_crafted(path: pathlib.Path, fmt: str, content: dict, marker: pathlib.Path) -> None:
    """Write `content` in format `fmt` with a payload in it (or, for the legacy side pickles, beside it)."""
    with_payload = {**content, "payload": Touch(marker)}
    if fmt == "raw-pickle":
        path.write_bytes(pickle.dumps({"payload": Touch(marker)}, protocol=2))
    elif fmt == "zip":
        torch.save(with_payload, path)
    elif fmt == "legacy-main":
        torch.save(with_payload, path, _use_new_zipfile_serialization=False)
    else:
        position = LEGACY_PICKLES.index(fmt.removeprefix("legacy-"))
        path.write_bytes(legacy_with_payload(content, position, marker))


@pytest.fixture(params=CRAFTED_FORMATS)
def crafted_file(request, tmp_path):
    """Factory: crafted_file(name, content) -> Crafted(path, marker, format), one test run per format.

    `content` (a dict of tensors and plain values) is what the file would hold without the payload, e.g. a valid
    checkpoint, so a reader that ran the payload would go on and succeed.
    """

    def make(name: str = "crafted.pt", content: dict | None = None) -> Crafted:
        path, marker = tmp_path / name, tmp_path / "payload-ran"
        path.parent.mkdir(parents=True, exist_ok=True)
        write_crafted(path, request.param, content if content is not None else {"w": torch.ones(3)}, marker)
        return Crafted(path, marker, request.param)

    return make


@pytest.fixture(scope="session")
def test_device() -> str:
    return os.environ.get("USS_TEST_DEVICE", "cpu")
