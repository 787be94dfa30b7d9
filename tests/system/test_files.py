"""charlm.system.files.atomic_write: the file is written whole or not at all."""

from __future__ import annotations

import errno
import os
import stat

import pytest

from charlm.errors import CharlmError
from charlm.system.files import atomic_write, remove_stale_temp_files, write_text_atomic


@pytest.fixture
def umask_022():
    before = os.umask(0o022)
    yield
    os.umask(before)


def test_a_new_file_is_written_whole_with_the_usual_mode_and_no_temp_left(tmp_path, umask_022):
    path = tmp_path / "notes.txt"
    assert atomic_write(path, lambda fh: fh.write(b"one\ntwo\n")) == path
    assert path.read_bytes() == b"one\ntwo\n"
    assert stat.S_IMODE(path.stat().st_mode) == 0o644  # 0666 less the umask, as open() makes
    assert os.listdir(tmp_path) == ["notes.txt"]
    write_text_atomic(path, "\u00e9t\u00e9\n")
    assert path.read_bytes() == "\u00e9t\u00e9\n".encode("utf-8")
    assert os.listdir(tmp_path) == ["notes.txt"]


def test_the_old_file_survives_a_failing_writer(tmp_path):
    path = tmp_path / "last.pt"
    path.write_bytes(b"the previous checkpoint")

    def half_then_fail(fh):
        fh.write(b"half of the new one")
        raise ValueError("the writer failed")

    with pytest.raises(ValueError, match="the writer failed"):  # not ours to rephrase
        atomic_write(path, half_then_fail)
    assert path.read_bytes() == b"the previous checkpoint"
    assert os.listdir(tmp_path) == ["last.pt"]


def test_ctrl_c_while_writing_leaves_the_old_file_and_no_temp(tmp_path):
    path = tmp_path / "config.toml"
    path.write_text("old = 1\n")

    def interrupted(fh):
        fh.write(b"new = ")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, interrupted)
    assert path.read_text() == "old = 1\n"
    assert os.listdir(tmp_path) == ["config.toml"]


def test_a_full_disk_is_one_line_naming_the_file(tmp_path):
    path = tmp_path / "best.pt"
    path.write_bytes(b"kept")

    def full(fh):
        fh.write(b"x" * 100)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(CharlmError) as exc:
        atomic_write(path, full)
    assert str(exc.value) == (f"cannot write {path}: No space left on device; the previous "
                              "best.pt, if any, is intact")
    assert path.read_bytes() == b"kept"
    assert os.listdir(tmp_path) == ["best.pt"]


def test_a_folder_that_is_not_there_is_one_line(tmp_path):
    path = tmp_path / "gone" / "metrics.jsonl"
    with pytest.raises(CharlmError) as exc:
        atomic_write(path, lambda fh: fh.write(b"{}\n"))
    assert str(exc.value) == (f"cannot write {path}: No such file or directory; the previous "
                              "metrics.jsonl, if any, is intact")


def test_a_killed_writers_temp_file_is_swept_and_a_live_ones_kept(tmp_path):
    dead = tmp_path / f".last.pt.{2**22 + 12345}.0123abcd.tmp"  # above any pid_max: no such process
    live = tmp_path / f".last.pt.{os.getpid()}.89abcdef.tmp"
    other = tmp_path / ".notes.tmp"
    for p in (dead, live, other):
        p.write_bytes(b"")
    assert remove_stale_temp_files(tmp_path) == [dead]
    assert sorted(os.listdir(tmp_path)) == sorted([live.name, other.name])
