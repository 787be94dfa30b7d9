"""`charlm data list/download/add/info`, in process (CliRunner) and as a real subprocess."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from collections import Counter

import pytest
from typer.testing import CliRunner

from charlm.data import corpus
from charlm.cli.app import app

TM_SHA256 = "8424dbd9532ac81f7e5f0b6add90e6952baea29158309d7d1bf3884f4e12c516"
TS_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
HINT = "set CHARLM_MIRROR to a mirror URL or directory, or add a copy you have with"


def run(*args: str):
    return CliRunner().invoke(app, list(args))


def test_list_json_shows_every_corpus_and_what_is_cached(shared_data, isolated_cache):
    assert run("data", "add", "timemachine", str(shared_data / "timemachine.txt")).exit_code == 0
    result = run("data", "list", "--json")
    assert result.exit_code == 0, result.output
    listing = json.loads(result.stdout)
    assert listing["cache_dir"] == str(isolated_cache)
    rows = {row["name"]: row for row in listing["corpora"]}
    assert list(rows) == ["enwik8", "python-docs", "text8", "timemachine", "tinyshakespeare"]
    assert (rows["timemachine"]["bytes"], rows["timemachine"]["status"], rows["timemachine"]["cached"]) == (
        178_979, "yes", True
    )
    assert rows["timemachine"]["path"] == str(isolated_cache / "timemachine.txt")
    assert (rows["tinyshakespeare"]["bytes"], rows["tinyshakespeare"]["status"]) == (1_115_394, "no")
    assert rows["python-docs"]["status"] == "built in"
    assert rows["python-docs"]["bytes"] == len(corpus.python_docs_text().encode("utf-8"))


def test_list_table_and_data_dir_option(tmp_path):
    other = tmp_path / "elsewhere"
    other.mkdir()
    (other / "tinyshakespeare.txt").write_text("tampered")
    result = run("data", "list", "--data-dir", str(other))
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert any(line.startswith("│ timemachine") and "│ 178,979" in line and "│ no " in line for line in lines)
    assert any(line.startswith("│ tinyshakespeare") and "│ bad checksum" in line for line in lines)
    assert lines[-1] == f"cache: {other}"


def test_download_via_mirror_then_no_op_when_cached(shared_data, http_server, monkeypatch, isolated_cache):
    server = http_server(shared_data)
    monkeypatch.setenv("CHARLM_MIRROR", server.base)
    result = run("data", "download", "timemachine")
    path = isolated_cache / "timemachine.txt"
    assert (result.exit_code, result.stdout) == (0, f"downloaded timemachine to {path} (checksum verified)\n")
    assert path.read_bytes() == (shared_data / "timemachine.txt").read_bytes()
    result = run("data", "download", "timemachine")
    assert (result.exit_code, result.stdout) == (0, f"timemachine is already cached and verified: {path}\n")
    assert len(server.seen) == 1


def test_download_failure_is_one_line_exit_1(isolated_cache):
    result = run("data", "download", "tinyshakespeare")
    url = corpus.entry("tinyshakespeare").urls[0]
    assert result.exit_code == 1
    assert result.stderr == (
        f"charlm: error: could not download tinyshakespeare.txt: {url}: connection refused "
        f"(after 2 attempts); {HINT} 'charlm data add tinyshakespeare FILE'\n"
    )
    assert not isolated_cache.exists() or list(isolated_cache.iterdir()) == []


def test_add_right_file_then_wrong_file(shared_data, isolated_cache):
    right, wrong = shared_data / "tinyshakespeare.txt", shared_data / "timemachine.txt"
    result = run("data", "add", "timemachine", str(wrong))  # the right file for timemachine
    assert (result.exit_code, result.stdout) == (
        0, f"added timemachine: {isolated_cache / 'timemachine.txt'} (checksum verified)\n"
    )
    result = run("data", "add", "tinyshakespeare", str(wrong))
    assert result.exit_code == 1
    assert result.stderr == (
        f"charlm: error: {wrong} is not the expected tinyshakespeare.txt: sha256 mismatch "
        f"(got {TM_SHA256}, expected {TS_SHA256}); nothing was written\n"
    )
    assert sorted(p.name for p in isolated_cache.iterdir()) == ["timemachine.txt"]
    assert run("data", "add", "tinyshakespeare", str(right)).exit_code == 0
    assert hashlib.sha256((isolated_cache / "tinyshakespeare.txt").read_bytes()).hexdigest() == TS_SHA256


def test_add_needs_a_file(tmp_path):
    result = run("data", "add", "timemachine", str(tmp_path / "nope.txt"))
    assert (result.exit_code, result.stderr) == (
        1, f"charlm: error: {tmp_path / 'nope.txt'} is not a file; give the path of your copy of timemachine.txt\n"
    )


def test_info_json_of_a_file(shared_data):
    path = shared_data / "tinyshakespeare.txt"
    text = path.read_text("utf-8")
    result = run("data", "info", str(path), "--json")
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    counts = Counter(text)
    top = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:10]
    assert info == {
        "name": "tinyshakespeare",
        "source": str(path),
        "characters": 1_115_394,
        "distinct_symbols": 65,
        "top_symbols": [list(kv) for kv in top],
        # vocabulary = distinct symbols after preprocessing, plus <unk>; bytes: every byte
        "vocab_size": {"d2l": 28, "lower": len(set(text.lower())) + 1, "raw": 66,
                       "bytes": 256},
        "preprocessing": "raw",
        "sample_prefix": "First",
    }


def test_info_table_of_the_cached_default(shared_data, isolated_cache):
    run("data", "add", "timemachine", str(shared_data / "timemachine.txt"))
    result = run("data", "info")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[:6] == [
        "corpus            timemachine",
        f"source            {isolated_cache / 'timemachine.txt'}",
        "characters        178,979",
        "distinct symbols  70",
        "vocab size        d2l 28, lower 46, raw 71, bytes 256  (symbols + <unk>)",  # every byte
        "defaults          preprocessing d2l, sample prefix 'time traveller'",
    ]
    text = (shared_data / "timemachine.txt").read_text("utf-8")
    assert (len(set(text)), len(set(text.lower()))) == (70, 45)
    space = Counter(text)[" "]
    assert any(line.startswith("│ ' '") and f"│ {space:,}" in line for line in lines)
    assert result.stderr == ""


def test_info_falls_back_to_python_docs_with_one_warning_line(monkeypatch, tmp_path):
    monkeypatch.setenv("CHARLM_MIRROR", str(tmp_path / "empty"))
    result = run("data", "info", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["name"] == "python-docs"
    assert len(result.stderr.splitlines()) == 1
    assert result.stderr.startswith(
        "charlm: warning: timemachine is not cached and cannot be downloaded, so the built-in "
        "python-docs corpus is used instead: a model trained on it writes Python's "
        "documentation, not The Time Machine, whatever the prompt ('time traveller' too) "
        "(could not download timemachine.txt: "
    )


def test_info_of_an_explicit_name_does_not_fall_back():
    result = run("data", "info", "timemachine")
    assert result.exit_code == 1
    assert result.stderr.startswith("charlm: error: could not download timemachine.txt: ")
    assert result.stdout == ""


def test_an_unknown_name_lists_the_known_ones_and_only_what_the_command_takes(tmp_path):
    """info also takes a file; add and download take only a name (no URL: that is train's)."""
    known = ("unknown corpus 'shakespeare': choose one of enwik8, python-docs, text8, timemachine, "
             "tinyshakespeare")
    result = run("data", "info", "shakespeare")
    assert (result.exit_code, result.stderr) == (
        2, f"charlm: error: {known}, or give the path of a text file (did you mean "
           "tinyshakespeare?)\n")
    mine = tmp_path / "mine.txt"
    mine.write_text("text", encoding="utf-8")
    for args in (["add", "shakespeare", str(mine)], ["download", "shakespeare"]):
        result = run("data", *args)
        assert (result.exit_code, result.stderr) == (
            2, f"charlm: error: {known} (did you mean tinyshakespeare?)\n"), args


def test_with_a_mirror_set_a_failure_says_to_check_it_not_to_set_it(tmp_path, monkeypatch,
                                                                     isolated_cache):
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    monkeypatch.setenv("CHARLM_MIRROR", str(mirror))
    result = run("data", "download", "tinyshakespeare")
    url = corpus.entry("tinyshakespeare").urls[0]
    assert result.exit_code == 1
    assert result.stderr == (
        f"charlm: error: could not download tinyshakespeare.txt: "
        f"{(mirror / 'tinyshakespeare.txt').as_uri()}: file not found; {url}: connection refused "
        f"(after 2 attempts); check that CHARLM_MIRROR ({mirror}) holds tinyshakespeare.txt, or "
        "add a copy you have with 'charlm data add tinyshakespeare FILE'\n")


def test_tables_are_not_wrapped_when_stdout_is_not_a_terminal(tmp_path):
    """`charlm data list | cat`: each corpus is one line, however long its description."""
    deep = tmp_path / ("a-cache-folder-with-a-long-name-" * 3) / "charlm"
    result = run("data", "list", "--data-dir", str(deep))
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    for name in corpus.corpus_names():
        row = next(line for line in lines if line.startswith(f"│ {name} "))
        assert corpus.entry(name).description in row
    assert lines[-1] == f"cache: {deep}"


@pytest.mark.slow
def test_subprocess_errors_are_one_stderr_line_and_exit_codes(tmp_path, shared_data):
    def charlm(*args):
        return subprocess.run(
            [sys.executable, "-m", "charlm", "data", *args], capture_output=True, text=True, timeout=60
        )

    missing = tmp_path / "missing.txt"
    latin = tmp_path / "latin.txt"
    latin.write_bytes("na\xefve".encode("latin-1"))
    p = charlm("info", str(missing))
    assert (p.returncode, p.stdout, p.stderr) == (
        1, "", f"charlm: error: {missing} does not exist; check the path\n"
    )
    p = charlm("info", str(latin), "--json")
    assert (p.returncode, p.stdout) == (1, "")
    assert p.stderr == (
        f"charlm: error: {latin} is not UTF-8 text (byte 0xef at offset 2); convert it first, "
        f"e.g. iconv -f latin1 -t utf-8 {latin} > latin.utf8.txt\n"
    )
    p = charlm("add", "tinyshakespeare", str(shared_data / "timemachine.txt"))
    assert p.returncode == 1
    assert len(p.stderr.splitlines()) == 1
    assert p.stderr.startswith(f"charlm: error: {shared_data / 'timemachine.txt'} is not the expected ")
