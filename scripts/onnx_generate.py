#!/usr/bin/env python3
"""Generate text from a folder written by `charlm export --format onnx`, with onnxruntime and the
standard library alone: no torch, no charlm, no numpy of our own (onnxruntime takes lists).

    python scripts/onnx_generate.py share/gru-timemachine --prefix "time traveller" --length 300
    python scripts/onnx_generate.py share/gru-timemachine --prefix "time traveller" --greedy

What it does is what `charlm generate` does: the prefix goes through the model's preprocessing
(config.json's "preprocessing"; in "bytes" mode the symbols are UTF-8 bytes, written out as
the text they decode to) and its vocabulary (unknown characters read as <unk>, id 0),
warms up the state one character per call of model.onnx, and each next character is drawn from
softmax(logits / T) (or taken as the argmax with --greedy) and fed back. Without a prefix the
first character comes from the zero state, whose logits are the output layer's bias: read here
from model.safetensors (an 8-byte length, a JSON header, then raw little-endian arrays).
With --greedy the text is the text `charlm generate --greedy` prints.
"""

from __future__ import annotations

import argparse
import array
import codecs
import json
import math
import os
import random
import re
import struct
import sys
from pathlib import Path


PROG = "onnx_generate.py"
PREPROCESSING = ("d2l", "lower", "raw", "bytes")
CONFIG_BYTES = 64 << 20  # config.json holds a vocabulary and a few numbers: never this much
HEADER_BYTES = 100 << 20  # a safetensors header lists a handful of tensors
MAX_DEPTH = 32  # config.json nests 4 deep
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


class Refused(Exception):
    """The folder (exit 1) or the options (exit 2) cannot be used: one line says why."""

    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.code = code


def shown(value: object, limit: int = 200) -> str:
    """Text a file controls, printable: control characters escaped, at most `limit` characters."""
    text = _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", str(value)[: 4 * limit])
    return text if len(text) <= limit else text[: limit - 3] + "..."


def preprocess(text: str, mode: str) -> str:
    """charlm's preprocessing modes (charlm/data/text.py)."""
    if mode == "d2l":
        return re.sub("[^A-Za-z]+", " ", text).lower()
    if mode == "lower":
        return text.lower()
    if mode == "raw":
        return text
    return text.encode("utf-8", "surrogatepass").decode("latin-1")  # "bytes": one per byte


def _depth(value) -> int:
    deepest, todo = 0, [(value, 0)]
    while todo:
        item, depth = todo.pop()
        if isinstance(item, (dict, list)):
            deepest = max(deepest, depth + 1)
            todo += [(v, depth + 1) for v in (item.values() if isinstance(item, dict) else item)]
    return deepest


def _json(data: bytes, what: str):
    try:
        value = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise Refused(f"{what} is not valid JSON ({shown(exc)}); export the model again") from None
    except RecursionError:
        value = None
    if value is None or _depth(value) > MAX_DEPTH:
        raise Refused(f"{what} nests arrays or objects too deeply; export the model again")
    return value


def inside(folder: Path, name: object, what: str) -> Path:
    """`folder / name` for a plain file name: no folder part, no '..', no link out of it."""
    if not isinstance(name, str) or not name or name in (".", "..") or "/" in name \
            or "\\" in name or "\x00" in name or Path(name).is_absolute():
        raise Refused(f"{what} names {shown(repr(name))}, not a file inside {folder}")
    path = folder / name
    if path.resolve().parent != folder.resolve():
        raise Refused(f"{what} names {shown(name)}, which leads out of {folder}")
    if not path.is_file():
        raise Refused(f"{path} is missing or not a file; export the model again")
    return path


def read_config(folder: Path) -> dict:
    """config.json, checked: the facts the sampler sizes things by, each within its bounds."""
    path = folder / "config.json"
    if not folder.is_dir():
        raise Refused(f"{folder} is not a folder; give a folder written by charlm export", 2)
    try:
        with open(path, "rb") as fh:
            data = fh.read(CONFIG_BYTES + 1)
    except OSError as exc:
        raise Refused(f"{folder} holds no model exported with --format onnx "
                      f"({shown(exc.strerror or exc)})", 2) from None
    if len(data) > CONFIG_BYTES:
        raise Refused(f"{path} is larger than {CONFIG_BYTES >> 20} MiB; it is not charlm's")
    config = _json(data, str(path))
    if not isinstance(config, dict) or not isinstance(config.get("onnx"), dict):
        raise Refused(f"{folder} holds no model exported with --format onnx ('onnx')", 2)
    if config.get("format") != "charlm-model" or config.get("version") != 1:
        raise Refused(f"{path} is not a version-1 charlm model config")
    model, vocab, onnx = config.get("model"), config.get("vocab"), config["onnx"]
    if not isinstance(model, dict) or not isinstance(vocab, dict):
        raise Refused(f"{path} lacks its 'model' or 'vocab' table; export the model again")
    for key in ("hidden", "layers", "vocab_size"):
        value = model.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise Refused(f"{path}: model.{key} is {shown(repr(value))}, not a positive integer")
    tokens = vocab.get("tokens")
    if not isinstance(tokens, list) or len(tokens) != model["vocab_size"] or len(tokens) < 2 \
            or tokens[:1] != ["<unk>"] \
            or not all(isinstance(t, str) and len(t) == 1 for t in tokens[1:]):
        raise Refused(f"{path}: vocab.tokens is not <unk> and then model.vocab_size "
                      f"({model['vocab_size']}) single characters")
    if config.get("preprocessing") not in PREPROCESSING:
        raise Refused(f"{path}: unknown preprocessing {shown(repr(config.get('preprocessing')))}")
    names = [onnx.get("inputs"), onnx.get("outputs")]
    if not all(isinstance(n, list) and len(n) in (2, 3) and all(isinstance(x, str) for x in n)
               for n in names) or len(names[0]) != len(names[1]):
        raise Refused(f"{path}: onnx.inputs and onnx.outputs are not two or three names each")
    return config


def weights_header(path: Path) -> tuple[dict, int]:
    """The safetensors header (checked against the file's size) and where the data starts."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise Refused(f"{path} is truncated ({size} bytes); export the model again")
        (length,) = struct.unpack("<Q", head)
        if length > min(size - 8, HEADER_BYTES):
            raise Refused(f"{path} says its header is {length:,} bytes, more than the file's "
                          f"{size:,}; the file is truncated or damaged")
        header = _json(fh.read(length), f"the header of {path}")
    if not isinstance(header, dict):
        raise Refused(f"the header of {path} is not a table of tensors")
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        ok = isinstance(entry, dict) and entry.get("dtype") == "F32"
        shape, offsets = (entry.get("shape"), entry.get("data_offsets")) if ok else (None, None)
        ok = ok and isinstance(shape, list) and all(
            isinstance(d, int) and not isinstance(d, bool) and 0 <= d for d in shape)
        ok = ok and isinstance(offsets, list) and len(offsets) == 2 and all(
            isinstance(o, int) and not isinstance(o, bool) for o in offsets)
        if ok:
            count = math.prod(shape)
            ok = 0 <= offsets[0] <= offsets[1] <= size - 8 - length \
                and offsets[1] - offsets[0] == 4 * count
        if not ok:
            raise Refused(f"{path}: tensor {shown(name)} is not float32 data inside the file; "
                          "the file is truncated or damaged")
    return header, 8 + length


# the gate rows per hidden unit of a min cell layer (its only weight matrix): z, h~ / f, i, h~
MIN_CELL_GATES = {"mingru": 2, "minlstm": 3}


def check_sizes(config: dict, header: dict, path: Path) -> None:
    """hidden, layers and vocab_size as the weights hold them, before any buffer is sized."""
    model = config["model"]
    hidden, layers, vocab = model["hidden"], model["layers"], model["vocab_size"]
    if header.get("head.bias", {}).get("shape") != [vocab]:
        raise Refused(f"{path} holds no head.bias of {vocab} values, the vocabulary's size in "
                      "config.json; the files do not belong together")
    if layers > len(header):
        raise Refused(f"config.json says {layers} layers but {path} holds {len(header)} tensors")
    gates = MIN_CELL_GATES.get(model.get("cell"))  # a min cell has no recurrent weights
    for k in range(layers):
        name = f"rnn.blocks.{k}.gates.weight" if gates else f"rnn.weight_hh_l{k}"
        shape = header.get(name, {}).get("shape")
        fits = (shape[0] == gates * hidden) if gates else (shape[1] == hidden) if shape else False
        if not shape or len(shape) != 2 or not fits:
            what = f"{gates * hidden} rows" if gates else f"{hidden} columns"
            raise Refused(f"config.json says {layers} layers of {hidden} but {path} holds no "
                          f"{name} of {what}; the files do not belong together")


def read_bias(path: Path, header: dict, data_start: int) -> list[float]:
    start, end = header["head.bias"]["data_offsets"]
    values = array.array("f")
    with open(path, "rb") as fh:
        fh.seek(data_start + start)
        values.frombytes(fh.read(end - start))
    if sys.byteorder == "big":
        values.byteswap()
    return values.tolist()


def open_session(ort, path: Path, config: dict):
    """model.onnx in onnxruntime, its inputs and outputs checked against config.json."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime's own exception types, not importable by name
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise Refused(f"{path} cannot be loaded by onnxruntime ({shown(first)}); the file is "
                      "truncated or damaged: export the model again") from None
    onnx, model = config["onnx"], config["model"]
    inputs = {i.name: i.shape for i in session.get_inputs()}
    outputs = [o.name for o in session.get_outputs()]
    if sorted(inputs) != sorted(onnx["inputs"]) or sorted(outputs) != sorted(onnx["outputs"]):
        raise Refused(f"{path} takes {shown(sorted(inputs))} and gives {shown(outputs)}, not "
                      "what config.json names; the files do not belong together")
    for name in onnx["inputs"][1:]:
        shape = inputs[name]
        fixed = [shape[0], shape[2]] if len(shape) == 3 else None
        if fixed != [model["layers"], model["hidden"]]:
            raise Refused(f"{path}: state input {shown(name)} has shape {shown(shape)}, not "
                          f"({model['layers']}, batch, {model['hidden']}) as config.json says")
    return session


def pick(logits: list[float], rng: random.Random, temperature: float, top_k: int,
         greedy: bool) -> int:
    # <unk> (id 0) is never drawn, as in charlm: it stands for characters left out
    if greedy:
        return max(range(1, len(logits)), key=lambda i: (logits[i], -i))  # the first maximum
    order = sorted(range(1, len(logits)), key=lambda i: -logits[i])
    kept = order[:top_k] if top_k else order
    top = logits[kept[0]]
    weights = [math.exp((logits[i] - top) / temperature) for i in kept]
    if not math.isfinite(sum(weights)) or sum(weights) <= 0:
        raise Refused("model.onnx gave logits that are NaN or infinite; the file is damaged")
    return rng.choices(kept, weights=weights)[0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path, help="a folder written by charlm export --format onnx")
    parser.add_argument("--prefix", default="", help="text to continue (default: none)")
    parser.add_argument("--length", type=int, default=200, help="characters to draw (default 200)")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0, help="draw among the K likeliest (0: all)")
    parser.add_argument("--greedy", action="store_true", help="always the likeliest character")
    parser.add_argument("--seed", type=int, default=None)
    args = parser.parse_args(argv)
    if args.length < 1 or not 0 < args.temperature < math.inf or args.top_k < 0:
        parser.error("--length must be >= 1, --temperature > 0 and --top-k >= 0")
    try:
        import onnxruntime as ort
    except ImportError:
        parser.error("needs onnxruntime: pip install onnxruntime")
    try:
        return sample(ort, args)
    except Refused as refused:
        sys.stdout.flush()
        sys.stderr.write(f"{PROG}: error: {' '.join(str(refused).split())}\n")
        return refused.code
    except BrokenPipeError:  # the reader went away (| head): a normal end
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as exc:
        sys.stderr.write(f"{PROG}: error: cannot read {shown(exc.filename or args.folder)}: "
                         f"{shown(exc.strerror or exc)}\n")
        return 1
    except KeyboardInterrupt:
        sys.stderr.write(f"{PROG}: error: interrupted\n")
        return 130


def sample(ort, args) -> int:
    folder = args.folder
    config = read_config(folder)
    onnx, tokens = config["onnx"], config["vocab"]["tokens"]
    onnx_path = inside(folder, onnx.get("file"), f"{folder / 'config.json'}: onnx.file")
    weights = inside(folder, "model.safetensors", "the weights")
    header, data_start = weights_header(weights)
    check_sizes(config, header, weights)
    session = open_session(ort, onnx_path, config)
    hidden, layers = config["model"]["hidden"], config["model"]["layers"]
    index = {t: i for i, t in enumerate(tokens) if i}  # id 0 is <unk>
    zeros = [[[0.0] * hidden] for _ in range(layers)]  # (layers, 1, hidden)
    state = [zeros] * (len(onnx["inputs"]) - 1)  # h, and c for an LSTM

    def step(token: int) -> list[float]:
        nonlocal state
        try:
            logits, *state = session.run(None, dict(zip(onnx["inputs"], [[token], *state])))
        except Exception as exc:  # onnxruntime's own exception types
            raise Refused(f"{onnx_path} failed to run a step ({shown(str(exc).strip())}); the "
                          "file is damaged: export the model again") from None
        row = logits[0].tolist() if len(logits) == 1 else []
        if len(row) != len(tokens):
            raise Refused(f"{onnx_path} gave {len(row)} logits, not one per token of the "
                          f"vocabulary ({len(tokens)}); the files do not belong together")
        return row

    text = preprocess(args.prefix, config["preprocessing"])
    logits = read_bias(weights, header, data_start)
    for ch in text:
        logits = step(index.get(ch, 0))
    rng = random.Random(args.seed)
    write = writer(config["preprocessing"])
    write(text)
    for i in range(args.length):
        token = pick(logits, rng, args.temperature, args.top_k, args.greedy)
        write(tokens[token])
        if i < args.length - 1:
            logits = step(token)
    write("", final=True)
    sys.stdout.write("\n")
    return 0


def writer(mode: str):
    """Writes symbols to stdout as they come; in "bytes" mode each symbol is one byte, decoded
    as UTF-8 once its character is whole (a bad or cut-off sequence shows as U+FFFD)."""
    utf8 = codecs.getincrementaldecoder("utf-8")("replace") if mode == "bytes" else None

    def write(symbols: str, final: bool = False) -> None:
        if utf8 is not None:
            symbols = utf8.decode(symbols.encode("latin-1", "replace"), final)
        sys.stdout.write(symbols)
        sys.stdout.flush()

    return write


if __name__ == "__main__":
    sys.exit(main())
