"""Hardened, round 3: what a peer or a file controls reaches the terminal escaped and bounded;
absurd nesting and absurd dynamic-evaluation rates end in one line, never "bug in charlm".

Each section is a class of input, tried in several instances:
- text a server sends (reason phrases, garbage status lines, redirect targets) and text from
  files (archive member names, config keys and values, file names): no control character
  reaches stderr, no value quoted longer than text_safety.LIMIT;
- JSON and TOML nested far deeper than charlm writes (config.json of an export folder,
  metrics.jsonl, --config): one line, exit 1 or 2;
- --dynamic-lr outside its range, or a rate that wrecks the model: one line.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import threading
import zipfile
from pathlib import Path

import pytest

from charlm.data import archive
from charlm.data.download import DownloadError, download
from charlm.errors import CharlmError
from charlm.text_safety import LIMIT, one_line, quoted, shown
from helpers import run_main

pytestmark = pytest.mark.usefixtures("one_thread")

CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")  # anything but \t and \n
FAST = {"timeout": (2, 2), "backoff": 0.01, "progress": False, "retries": 0}
TITLE, CLEAR = "\x1b]0;pwned\x07", "\x1b[2J\x1b[H"


def assert_one_clean_line(err: str, limit: int = 2100) -> None:
    assert err.count("\n") == 1 and err.endswith("\n"), err
    assert not CONTROL.search(err), repr(err)
    assert len(err) < limit, len(err)
    assert "bug in charlm" not in err and "Traceback" not in err


# --- the helper --------------------------------------------------------------------------------


@pytest.mark.parametrize("raw, expected", [
    ("plain text", "plain text"),
    (f"Not Found{TITLE}{CLEAR}", "Not Found\\x1b]0;pwned\\x07\\x1b[2J\\x1b[H"),
    ("tab\tnew\nline\rCR", "tab\\x09new\\x0aline\\x0dCR"),
    ("c1 \x9b31m and del \x7f", "c1 \\x9b31m and del \\x7f"),
    ("bidi \u202eevil\u2066", "bidi \\u202eevil\\u2066"),
    ("name\udc9b\udce9", "name\\x9b\udce9"),  # a non-UTF-8 byte that is a C1 control, escaped
    (10**5000, "<int too large to show>"),
], ids=["plain", "title-and-clear", "white-space", "c1-and-del", "bidi", "surrogates", "bigint"])
def test_shown_escapes_every_control_character(raw, expected):
    assert shown(raw) == expected


def test_shown_and_one_line_cut_long_text_with_an_ellipsis():
    assert shown("x" * 1000) == "x" * (LIMIT - 3) + "..."
    assert len(shown("\x1b" * 10**6)) == LIMIT  # escaping cannot make it longer than the limit
    assert shown("y" * LIMIT) == "y" * LIMIT
    assert one_line("a\n  b\t c" + "z" * 5000, 100) == "a b c" + "z" * 92 + "..."
    assert quoted("é\x1b") == "'é\\x1b'"
    assert quoted(list(range(10**4))) == "<list of 10,000 items>"


# --- a server's words ------------------------------------------------------------------------


class RawServer:
    """A loopback server that answers every request with the same raw bytes, then closes."""

    def __init__(self, answer: bytes):
        self.answer, self.sock = answer, socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/timemachine.txt"
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                conn.recv(65536)
                conn.sendall(self.answer)

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def raw_server():
    servers = []

    def start(answer: bytes) -> RawServer:
        servers.append(RawServer(answer))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


@pytest.mark.parametrize("answer, cause", [
    (f"HTTP/1.1 404 Not Found{TITLE}{CLEAR}\r\nContent-Length: 0\r\n\r\n".encode(),
     "HTTP 404 Not Found\\x1b]0;pwned\\x07\\x1b[2J\\x1b[H"),
    (b"HTTP/1.1 403 \x9b2J\xc2\x9b2J forbidden\r\nContent-Length: 0\r\n\r\n",
     "HTTP 403 \\x9b2J\u00c2\\x9b2J forbidden"),  # a C1 control byte (http.client: latin-1)
    (b"HTTP/1.1 500 " + b"A" * 30_000 + b"\r\nContent-Length: 0\r\n\r\n",
     "HTTP 500 " + "A" * (LIMIT - 3) + "..."),
], ids=["escapes", "c1", "30-kb"])
def test_a_hostile_reason_phrase_is_escaped_and_cut(raw_server, tmp_path, answer, cause):
    server = raw_server(answer)
    with pytest.raises(DownloadError) as err:
        download([server.url], tmp_path / "cache" / "timemachine.txt", **FAST)
    assert str(err.value) == f"could not download timemachine.txt: {server.url}: {cause}"


@pytest.mark.parametrize("answer", [
    b"\x1b]0;pwned\x07\x1b[2J garbage, not HTTP at all\r\n\r\n",
    b"HTTP/1.1 200 OK\r\n" + b"X-Junk: " + b"\x1b[2J" * 40_000 + b"\r\n\r\n",
    b"HTTP/1.1 301 Moved\r\nLocation: ftp://x/\x1b]0;pwned\x07" + b"y" * 5000 + b"\r\n\r\n",
    b"HTTP/1.1 200 OK\r\n" + b"A" * 70_000 + b"\r\n\r\n",  # a header line past http.client's limit
], ids=["not-http", "junk-header", "redirect", "long-header"])
def test_a_garbage_answer_is_one_short_line_without_control_characters(raw_server, tmp_path,
                                                                       answer):
    server = raw_server(answer)
    with pytest.raises(DownloadError) as err:
        download([server.url], tmp_path / "cache" / "timemachine.txt", **FAST)
    message = str(err.value)
    assert message.startswith(f"could not download timemachine.txt: {server.url}: ")
    assert not CONTROL.search(message) and len(message) < 400, repr(message)


def test_the_cli_prints_a_hostile_reason_as_one_escaped_line(raw_server, monkeypatch, tmp_path):
    from charlm.data import corpus

    server = raw_server(f"HTTP/1.1 404 gone{TITLE}{CLEAR}\r\nContent-Length: 0\r\n\r\n".encode())
    e = corpus.registry()["timemachine"]
    monkeypatch.setitem(corpus.registry(), "timemachine",
                        type(e)(**{**e.__dict__, "urls": (server.url,)}))
    monkeypatch.setenv("CHARLM_MIRROR", "")
    code, out, err = run_main(["data", "download", "timemachine"])
    assert code == 1 and out == ""
    assert_one_clean_line(err)
    assert "HTTP 404 gone\\x1b]0;pwned\\x07\\x1b[2J\\x1b[H" in err


# --- a file's words --------------------------------------------------------------------------


def test_member_names_inside_an_archive_are_escaped_and_cut(tmp_path):
    path = tmp_path / "enwik8.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(f"a{TITLE}", b"x")
        zf.writestr("b" * 5000, b"y")
    with pytest.raises(CharlmError) as err:
        archive.extract(path, "enwik8", tmp_path / "enwik8")
    held = str(err.value).split("(it holds: ")[1]
    assert held == "a\\x1b]0;pwned\\x07, " + "b" * 57 + "...); nothing was written"


@pytest.mark.parametrize("args", [
    ["generate", "--checkpoint", f"x{TITLE}{CLEAR}.pt"],  # a file name echoed
    ["generate", "--checkpoint", "x" * 100_000 + ".pt"],
    ["train", "--text", f"{CLEAR}nothing.txt"],
], ids=["escapes", "long", "train"])
def test_names_a_user_gives_are_echoed_escaped(args, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, err = run_main(args)
    assert code in (1, 2)
    assert_one_clean_line(err)


@pytest.mark.parametrize("toml, shown_part", [
    ('cell = "\\u001b]0;pwned\\u0007"', "must be one of rnn, gru, lstm, mingru, minlstm; got '\\x1b]0;pwned\\x07'"),
    ('"\\u001b[2J" = 1', "unknown key '\\x1b[2J' in config file"),
    ('hidden = "' + "9" * 5000 + '"', "key 'hidden' in config file"),
    ("hidden = " + "9" * 5000, "holds a value charlm cannot read: Exceeds the limit (4300 "
                               "digits) for integer string conversion"),  # too long to read
], ids=["value", "key", "long-string", "long-int"])
def test_config_values_echoed_in_errors_are_escaped_and_cut(toml, shown_part, tmp_path):
    config = tmp_path / "c.toml"
    config.write_text(toml + "\n", encoding="utf-8")
    code, out, err = run_main(["train", "--config", str(config), "--text", "none.txt"])
    assert code == 2, err
    assert_one_clean_line(err, limit=LIMIT + 300)
    assert shown_part in err


# --- nesting ----------------------------------------------------------------------------------


@pytest.mark.parametrize("toml", [
    "hidden = " + "[" * 5000 + "]" * 5000,
    "hidden = " + "{a = " * 3000 + "1" + "}" * 3000,
    "cell = [" + "[" * 100_000 + "]" * 100_000 + "]",
], ids=["arrays", "tables", "deeper"])
def test_a_deeply_nested_config_is_refused_in_one_line(toml, tmp_path):
    config = tmp_path / "deep.toml"
    config.write_text(toml + "\n", encoding="utf-8")
    assert config.stat().st_size < 1 << 20  # under the size cap: the depth is what is refused
    code, out, err = run_main(["train", "--config", str(config)])
    assert code == 2
    assert err == (f"charlm: error: config file {config} nests arrays or tables too deeply; a "
                   "config file is a few lines of TOML\n")


@pytest.fixture(scope="module")
def folder(tiny_run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("export") / "model"
    code, _, err = run_main(["export", str(tiny_run / "run" / "best.pt"),
                             "--out", str(out)])
    assert code == 0, err
    return out


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


@pytest.mark.parametrize("key, depth", [("evaluation", 100_000), ("training", 5000),
                                        ("onnx", 40), ("extra", 33)])
@pytest.mark.parametrize("command", [["generate", "--length", "5"], ["eval", "perplexity"]])
def test_a_deeply_nested_config_json_is_refused_in_one_line(folder, tmp_path, key, depth, command):
    copy = tmp_path / "model"
    shutil.copytree(folder, copy)
    text = (copy / "config.json").read_text(encoding="utf-8").rstrip()
    value = '{"x": ' + nested(depth) + "}"
    if f'"{key}": ' in text:  # the entry charlm reads, nested deep
        text = re.sub(f'"{key}": ', f'"{key}": {value}, "{key}_was": ', text, count=1)
    else:  # an entry charlm does not read
        text = text[:-1] + f', "{key}": {value}}}'
    (copy / "config.json").write_text(text, encoding="utf-8")
    code, out, err = run_main([*command, "--checkpoint", str(copy)])
    assert code == 1 and out == ""
    path = copy / "config.json"
    assert err in (
        f"charlm: error: {path} nests arrays or objects too deeply; the folder is damaged\n",
        f"charlm: error: {path} nests arrays or objects more than 32 deep; the folder is "
        "damaged\n"), err


def test_a_deeply_nested_metrics_row_is_skipped_as_damaged(tiny_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run / "run", run)
    with open(run / "metrics.jsonl", "a", encoding="utf-8") as fh:
        fh.write(nested(100_000) + "\n" + '{"a": ' * 5000 + "1" + "}" * 5000 + "\n")
    code, out, err = run_main(["plot", str(run), "--out", str(tmp_path / "curve.png")])
    assert err == f"charlm: warning: skipped 2 damaged rows of {run / 'metrics.jsonl'}\n"
    assert code == 0


# --- dynamic evaluation ------------------------------------------------------------------------


@pytest.mark.parametrize("lr", ["1e308", "1e30", "3e38", "1.5", "inf", "nan"])
@pytest.mark.parametrize("decay", ["0", "0.02"])
def test_a_dynamic_lr_out_of_range_is_refused_before_anything_runs(tiny_run, lr, decay):
    code, out, err = run_main(["eval", "perplexity", "--checkpoint", str(tiny_run / "run" / "best.pt"),
                               "--dynamic", "--dynamic-lr", lr, "--dynamic-decay", decay])
    assert code == 2 and out == ""
    assert err == f"charlm: error: --dynamic-lr must be in [0, 1], got {float(lr):g}\n" or \
        err == f"charlm: error: --dynamic-lr must be in [0, 1], got {float(lr)}\n", err


def test_a_rate_that_wrecks_the_model_is_a_warning_and_the_figures_stand(tiny_run):
    code, out, err = run_main(["eval", "perplexity", "--checkpoint", str(tiny_run / "run" / "best.pt"),
                               "--dynamic", "--dynamic-lr", "1", "--dynamic-decay", "0", "--json",
                               "-q"])
    assert code == 0, err
    assert err.startswith("charlm: warning: dynamic evaluation made the model far worse than a "
                          "uniform guess (") and err.count("\n") == 1
    assert err.endswith("--dynamic-lr 1 is too large; try a smaller one (the default is 1e-4)\n")
    assert json.loads(out)["dynamic"]["nats_per_char"] > 9


@pytest.mark.parametrize("lr, decay", [(1e30, 0.0), (1e308, 0.02), (3e38, 0.0)])
def test_the_library_refuses_an_absurd_rate_and_reports_divergence(tiny_run, lr, decay):
    import torch

    from charlm.inference.dynamic import DynamicSettings, adaptable, dynamic_perplexity
    from charlm.inference.loading import load_model

    model = adaptable(load_model(str(tiny_run / "run" / "best.pt"), None, "cpu", "raw").model)
    tokens = torch.randint(1, model.config.vocab_size, (400,))
    rms = [torch.full_like(p, 1e-3) for p in model.parameters()]
    with pytest.raises(ValueError, match=r"lr must be in \[0, 1\] and decay in \[0, 1\]"):
        dynamic_perplexity(model, tokens, DynamicSettings(lr=lr, decay=decay, window=50), rms)
    with torch.no_grad():  # a model that already diverged: its loss is NaN
        model.head.bias.fill_(float("nan"))
    with pytest.raises(CharlmError, match="^dynamic evaluation diverged: the adapted model's "
                                          "loss became NaN with --dynamic-lr 0.5"):
        dynamic_perplexity(model, tokens, DynamicSettings(lr=0.5, decay=decay, window=50), rms)
