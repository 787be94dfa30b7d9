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
import random
import re
import struct
import sys
from pathlib import Path


def preprocess(text: str, mode: str) -> str:
    """charlm's preprocessing modes (charlm/data/text.py)."""
    if mode == "d2l":
        return re.sub("[^A-Za-z]+", " ", text).lower()
    if mode == "lower":
        return text.lower()
    if mode == "raw":
        return text
    if mode == "bytes":  # one symbol per UTF-8 byte, U+0000..U+00FF
        return text.encode("utf-8", "surrogatepass").decode("latin-1")
    raise SystemExit(f"onnx_generate: unknown preprocessing {mode!r} in config.json")


def safetensors_tensor(path: Path, name: str) -> list[float]:
    """One float32 tensor of a safetensors file, flattened."""
    with open(path, "rb") as fh:
        (size,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(size))
        entry = header[name]
        if entry["dtype"] != "F32":
            raise SystemExit(f"onnx_generate: {name} in {path} is {entry['dtype']}, not F32")
        start, end = entry["data_offsets"]
        fh.seek(8 + size + start)
        values = array.array("f")
        values.frombytes(fh.read(end - start))
    if sys.byteorder == "big":
        values.byteswap()
    return values.tolist()


def pick(logits: list[float], rng: random.Random, temperature: float, top_k: int,
         greedy: bool) -> int:
    if greedy:
        return max(range(len(logits)), key=lambda i: (logits[i], -i))  # the first maximum
    order = sorted(range(len(logits)), key=lambda i: -logits[i])
    kept = order[:top_k] if top_k else order
    top = logits[kept[0]]
    weights = [math.exp((logits[i] - top) / temperature) for i in kept]
    return rng.choices(kept, weights=weights)[0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path, help="a folder written by charlm export --format onnx")
    parser.add_argument("--prefix", default="", help="text to continue (default: none)")
    parser.add_argument("--length", type=int, default=200, help="characters to draw (default 200)")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0, help="draw among the K likeliest (0: all)")
    parser.add_argument("--greedy", action="store_true", help="always the likeliest character")
    parser.add_argument("--seed", type=int, default=None)
    args = parser.parse_args(argv)
    if args.length < 1 or not args.temperature > 0 or args.top_k < 0:
        parser.error("--length must be >= 1, --temperature > 0 and --top-k >= 0")
    try:
        import onnxruntime as ort
    except ImportError:
        parser.error("needs onnxruntime: pip install onnxruntime")
    try:
        config = json.loads((args.folder / "config.json").read_text(encoding="utf-8"))
        onnx = config["onnx"]
    except (OSError, ValueError, KeyError) as exc:
        parser.error(f"{args.folder} holds no model exported with --format onnx ({exc})")

    model, tokens = config["model"], config["vocab"]["tokens"]
    index = {t: i for i, t in enumerate(tokens) if i}  # id 0 is <unk>
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(args.folder / onnx["file"]), options,
                                   providers=["CPUExecutionProvider"])
    zeros = [[[0.0] * model["hidden"]] for _ in range(model["layers"])]  # (layers, 1, hidden)
    state = [zeros] * (len(onnx["inputs"]) - 1)  # h, and c for an LSTM

    def step(token: int) -> list[float]:
        nonlocal state
        logits, *state = session.run(None, dict(zip(onnx["inputs"], [[token], *state])))
        return logits[0].tolist()

    text = preprocess(args.prefix, config["preprocessing"])
    logits = safetensors_tensor(args.folder / "model.safetensors", "head.bias")
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
