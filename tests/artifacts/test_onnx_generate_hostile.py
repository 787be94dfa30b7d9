"""scripts/onnx_generate.py against folders it must not trust: it checks them as charlm does.

Names inside config.json stay inside the folder; every size the sampler allocates by (hidden,
layers, the vocabulary, a safetensors header's length) is checked against what the files hold
first; a truncated or inconsistent file is one line and exit 1 (2 for a folder that is not an
ONNX export at all), never a traceback. The sampler runs with torch and charlm unimportable.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import run_main, train_runs

pytestmark = pytest.mark.usefixtures("one_thread")

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "onnx_generate.py"
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")


@pytest.fixture(scope="module")
def folder(tmp_path_factory, one_thread) -> Path:
    made = train_runs(tmp_path_factory.mktemp("onnx-hostile"), {
        "gru": ["--layers", "1", "--embed", "8", "--max-steps", "10"]})
    out = made["root"] / "share"
    code, _, err = run_main(["export", str(made["gru"]), "--out", str(out), "--format", "onnx",
                             "--sample-length", "10"])
    assert code == 0, err
    return out


def sampler(args: list[str]) -> subprocess.CompletedProcess:
    code = ("import runpy, sys\n"
            "sys.modules['torch'] = sys.modules['charlm'] = None\n"
            f"sys.argv = ['onnx_generate.py', *{args!r}]\n"
            f"runpy.run_path({str(SCRIPT)!r}, run_name='__main__')\n")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)


def edit_config(folder: Path, change) -> None:
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    change(config)
    (folder / "config.json").write_text(json.dumps(config), encoding="utf-8")


def set_in(path: str, value):
    def change(config):
        *outer, last = path.split(".")
        table = config
        for key in outer:
            table = table[key]
        table[last] = value
    return lambda folder: edit_config(folder, change)


def cut(name: str, keep):
    def change(folder):
        data = (folder / name).read_bytes()
        (folder / name).write_bytes(data[: keep(len(data))])
    return change


def header_length(value: int):
    def change(folder):
        path = folder / "model.safetensors"
        data = path.read_bytes()
        path.write_bytes(struct.pack("<Q", value) + data[8:])
    return change


def link_out(folder):
    os.symlink("/etc/hostname", folder / "evil.onnx")
    edit_config(folder, lambda c: c["onnx"].update(file="evil.onnx"))


def write(name: str, text: str):
    return lambda folder: (folder / name).write_text(text, encoding="utf-8")


def huge_config(folder):
    with open(folder / "config.json", "r+b") as fh:
        fh.truncate((64 << 20) + 10)  # sparse: nothing is written


def other_names(folder):
    edit_config(folder, lambda c: c["onnx"].update(inputs=["token", "x"], outputs=["y", "z"]))


CASES = {  # edit -> (exit code, the error line after "onnx_generate.py: error: ")
    "traversal": (set_in("onnx.file", "../../etc/passwd"), 1,
                  "{f}/config.json: onnx.file names '../../etc/passwd', not a file inside {f}"),
    "absolute": (set_in("onnx.file", "/etc/passwd"), 1,
                 "{f}/config.json: onnx.file names '/etc/passwd', not a file inside {f}"),
    "not-a-name": (set_in("onnx.file", 12), 1,
                   "{f}/config.json: onnx.file names 12, not a file inside {f}"),
    "link-out": (link_out, 1, "{f}/config.json: onnx.file names evil.onnx, which leads out of {f}"),
    "truncated-onnx": (cut("model.onnx", lambda n: n // 2), 1,
                       "{f}/model.onnx cannot be loaded by onnxruntime ("),
    "empty-onnx": (cut("model.onnx", lambda n: 0), 1,
                   "{f}/model.onnx cannot be loaded by onnxruntime ("),
    "hidden-2**31": (set_in("model.hidden", 2**31), 1,
                     "config.json says 1 layers of 2147483648 but {f}/model.safetensors holds no "
                     "rnn.weight_hh_l0 of 2147483648 columns; the files do not belong together"),
    "layers-1e9": (set_in("model.layers", 10**9), 1,
                   "config.json says 1000000000 layers but {f}/model.safetensors holds 8 tensors"),
    "layers-2": (set_in("model.layers", 2), 1,
                 "config.json says 2 layers of 16 but {f}/model.safetensors holds no "
                 "rnn.weight_hh_l1 of 16 columns; the files do not belong together"),
    "hidden-bool": (set_in("model.hidden", True), 1,
                    "{f}/config.json: model.hidden is True, not a positive integer"),
    "vocab-size": (set_in("model.vocab_size", 5), 1,
                   "{f}/config.json: vocab.tokens is not <unk> and then model.vocab_size (5) "
                   "single characters"),
    "long-token": (set_in("vocab.tokens", ["<unk>", "ab"]), 1,
                   "{f}/config.json: vocab.tokens is not <unk> and then model.vocab_size"),
    "header-2**62": (header_length(2**62), 1,
                     "{f}/model.safetensors says its header is 4,611,686,018,427,387,904 bytes, "
                     "more than the file's "),
    "header-past-end": (header_length(10**6), 1, "{f}/model.safetensors says its header is "
                                                 "1,000,000 bytes, more than the file's "),
    "truncated-weights": (cut("model.safetensors", lambda n: n - 100), 1,
                          "{f}/model.safetensors: tensor "),
    "tiny-weights": (cut("model.safetensors", lambda n: 4), 1,
                     "{f}/model.safetensors is truncated (4 bytes); export the model again"),
    "no-weights": (lambda f: (f / "model.safetensors").unlink(), 1,
                   "{f}/model.safetensors is missing or not a file; export the model again"),
    "truncated-config": (cut("config.json", lambda n: n // 2), 1,
                         "{f}/config.json is not valid JSON ("),
    "nested-config": (write("config.json", "[" * 100_000 + "]" * 100_000), 1,
                      "{f}/config.json nests arrays or objects too deeply; export the model again"),
    "nested-entry": (set_in("training", json.loads("[" * 40 + "]" * 40)), 1,
                     "{f}/config.json nests arrays or objects too deeply; export the model again"),
    "huge-config": (huge_config, 1, "{f}/config.json is larger than 64 MiB; it is not charlm's"),
    "other-names": (other_names, 1, "{f}/model.onnx takes ['h', 'token'] and gives "
                                    "['logits', 'h_next'], not what config.json names"),
    "escapes": (set_in("preprocessing", "\x1b]0;pwned\x07"), 1,
                "{f}/config.json: unknown preprocessing '\\x1b]0;pwned\\x07'"),
    "not-onnx": (write("config.json", "[]"), 2,
                 "{f} holds no model exported with --format onnx ('onnx')"),
}


@pytest.mark.parametrize("case", CASES)
def test_a_hostile_folder_is_one_line_and_an_exit_code(folder, tmp_path, case):
    edit, code, line = CASES[case]
    copy = tmp_path / "share"
    shutil.copytree(folder, copy)
    edit(copy)
    done = sampler([str(copy), "--length", "20", "--seed", "1"])
    assert done.returncode == code, done.stderr
    assert done.stdout == "" and done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    assert done.stderr.startswith("onnx_generate.py: error: " + line.format(f=copy)), done.stderr


def test_a_folder_that_is_not_there_is_a_usage_error(tmp_path):
    done = sampler([str(tmp_path / "nothing")])
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr == (f"onnx_generate.py: error: {tmp_path / 'nothing'} is not a folder; "
                           "give a folder written by charlm export\n")


def test_the_untouched_folder_still_samples(folder):
    done = sampler([str(folder), "--length", "40", "--greedy"])
    assert (done.returncode, done.stderr) == (0, "")
    code, out, err = run_main(["generate", "--checkpoint", str(folder), "--greedy", "--length", "40",
                               "-q"])
    assert (code, err) == (0, "") and done.stdout == out
