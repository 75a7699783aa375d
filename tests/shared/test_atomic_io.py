"""shared.atomic_io: a file appears whole under its final name, or the previous one stays."""

import os
import stat

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


@pytest.fixture
def umask():
    """`umask(mask)` sets the process umask within the test; the previous one is restored afterwards."""
    previous = os.umask(0o022)
    yield os.umask
    os.umask(previous)


@pytest.mark.parametrize("mask", [0o022, 0o027, 0o002], ids=oct)
def test_files_get_the_mode_the_umask_gives_a_normally_created_file(tmp_path, umask, mask):
    umask(mask)
    expected = 0o666 & ~mask
    (tmp_path / "plain.txt").write_text("reference")  # what open(path, "w") gives
    assert stat.S_IMODE((tmp_path / "plain.txt").stat().st_mode) == expected
    atomic_write_text(tmp_path / "text.md", "x")
    with atomic_open(tmp_path / "data.bin", "wb", durable=False) as f:
        f.write(b"x")
    with atomic_path(tmp_path / "figure.png", suffix=".tmp.png") as tmp:
        Image.new("RGB", (1, 1)).save(tmp)
    (tmp_path / "old.txt").write_text("private")
    (tmp_path / "old.txt").chmod(0o600)
    atomic_write_text(tmp_path / "old.txt", "replaced")  # the new file's mode, as for any newly written file
    for name in ("text.md", "data.bin", "figure.png", "old.txt"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == expected, name
