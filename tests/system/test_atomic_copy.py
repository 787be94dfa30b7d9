"""`atomic_copy`: the one way data/ copies a stream into the cache, with temp names that
`remove_stale_temp_files` recognises."""

import io
import os
import subprocess
import sys

import pytest

from charlm.errors import CharlmError
from charlm.system.files import (TooLong, atomic_copy, remove_stale_temp_files, temp_path)


def test_a_copy_lands_whole_and_its_check_sees_the_finished_temp_file(tmp_path):
    seen = []

    def check(tmp, copied):
        seen.append((tmp.parent, tmp.name.startswith(".dest."), tmp.read_bytes(), copied))

    assert atomic_copy(io.BytesIO(b"abc" * 1000), tmp_path / "dest", check=check) == tmp_path / "dest"
    assert (tmp_path / "dest").read_bytes() == b"abc" * 1000
    assert seen == [(tmp_path, True, b"abc" * 1000, 3000)]
    assert os.listdir(tmp_path) == ["dest"]


def test_a_refused_or_too_long_copy_leaves_the_old_file_and_no_temp(tmp_path):
    (tmp_path / "dest").write_bytes(b"old")

    def refuse(tmp, copied):
        raise CharlmError("no")

    with pytest.raises(CharlmError, match="^no$"):
        atomic_copy(io.BytesIO(b"new"), tmp_path / "dest", check=refuse)
    with pytest.raises(TooLong):
        atomic_copy(io.BytesIO(b"x" * 11), tmp_path / "dest", limit=10)
    assert atomic_copy(io.BytesIO(b"x" * 10), tmp_path / "other", limit=10).read_bytes() == b"x" * 10
    assert sorted(os.listdir(tmp_path)) == ["dest", "other"]
    assert (tmp_path / "dest").read_bytes() == b"old"


def test_a_failed_write_names_the_file_and_what_was_kept(tmp_path):
    code = ("import io, resource, signal\n"
            "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
            "resource.setrlimit(resource.RLIMIT_FSIZE, (1000, 1000))\n"
            "from charlm.system.files import atomic_copy\n"
            "from charlm.errors import CharlmError\n"
            "try:\n"
            f"    atomic_copy(io.BytesIO(b'x' * 5000), {str(tmp_path / 'big')!r}, kept='nothing was written')\n"
            "except CharlmError as exc:\n"
            "    print(exc)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stdout == f"cannot write {tmp_path / 'big'}: File too large; nothing was written\n"
    assert os.listdir(tmp_path) == []


def test_the_stale_file_cleaner_knows_every_temp_name(tmp_path):
    name = temp_path(tmp_path / "enwik8").name
    assert name.startswith(".enwik8.") and name.endswith(".tmp")
    dead = name.replace(f".{os.getpid()}.", ".999999999.")  # no process has that id
    (tmp_path / dead).write_bytes(b"half")
    assert remove_stale_temp_files(tmp_path) == [tmp_path / dead]
