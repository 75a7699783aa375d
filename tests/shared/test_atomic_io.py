"""shared.atomic_io: a file appears whole under its final name, or the previous one stays."""

import pytest
from PIL import Image

from shared.atomic_io import atomic_open, atomic_path, atomic_write_text


def test_failed_write_keeps_previous_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "out" / "report.md"
    atomic_write_text(target, "first\n")
    with pytest.raises(RuntimeError, match="crash"), atomic_open(target, "w", encoding="utf-8") as f:
        f.write("half of the sec")
        raise RuntimeError("crash")
    assert target.read_text() == "first\n"
    assert [p.name for p in target.parent.iterdir()] == ["report.md"]


def test_success_replaces_the_file_and_creates_parent_folders(tmp_path):
    target = tmp_path / "a" / "b" / "data.bin"
    with atomic_open(target, "wb", durable=False) as f:
        f.write(b"\x00\x01")
    assert target.read_bytes() == b"\x00\x01"
    atomic_write_text(target, "new")
    assert target.read_text() == "new"


def test_atomic_path_suffix_lets_writers_pick_the_format_from_the_name(tmp_path):
    target = tmp_path / "figure.png"
    with atomic_path(target, suffix=".tmp.png") as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".figure.png.") and tmp.suffix == ".png"
        Image.new("RGB", (3, 2)).save(tmp)  # PIL chooses PNG from the temporary name's extension
    assert Image.open(target).size == (3, 2)
    assert [p.name for p in tmp_path.iterdir()] == ["figure.png"]
