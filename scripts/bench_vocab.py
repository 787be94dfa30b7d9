"""Benchmark: training speed on a text with a large vocabulary, and the two ways out of it.

    python scripts/bench_vocab.py [--chars 10M] [--symbols 21500] [--steps 200]
        [--ways raw,bytes,max-vocab-1000,max-vocab-256] [--json]

The text is Tiny Shakespeare (../shared/data, or $CHARLM_SHARED_DATA) with CJK characters mixed
in: every fourth word is replaced by a word of 1-3 of ~--symbols distinct CJK characters drawn
with Zipf-like frequencies (seeded), repeated to --chars characters: the issue's "100 MB with
~21,500 distinct characters". Each way trains the default model for --steps steps in a fresh
process, beside nothing else (run it on a quiet machine):

    raw              --preprocessing raw: one symbol per character (~21,500 + 66)
    bytes            --preprocessing bytes: UTF-8 bytes, at most 256 symbols; a CJK character is
                     3 tokens, so a step covers fewer characters
    max-vocab-N      --max-vocab N: the N most frequent characters, the rest <unk>

Reported: training tokens/s and characters/s (tokens/s over tokens per character), the
validation loss in bits per character at the end (over the whole validation split: for bytes,
per byte times bytes per character; for max-vocab, <unk> hides what it replaced), and the first
line's warning when there is one. Issue 17's figure before: 500 tokens/s with raw on 100 MB.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchlib import cpu_name  # scripts/, beside this file

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("CHARLM_SHARED_DATA") or REPO.parent / "shared" / "data")
UNITS = {"K": 10**3, "M": 10**6, "G": 10**9}
WAYS = {"raw": ["--preprocessing", "raw"], "bytes": ["--preprocessing", "bytes"]}


def make_text(path: Path, chars: int, symbols: int, seed: int = 0) -> Path:
    rng = random.Random(seed)
    cjk = [chr(0x4E00 + i) for i in range(min(symbols, 20_992))]
    cjk += [chr(0x3400 + i) for i in range(max(symbols - 20_992, 0))]  # extension A
    weights = [1.0 / (rank + 1) ** 0.8 for rank in range(len(cjk))]
    words = (SHARED / "tinyshakespeare.txt").read_text("utf-8").split(" ")
    out, size = [], 0
    while size < chars:
        for i, word in enumerate(words):
            if i % 4 == 3:
                word = "".join(rng.choices(cjk, weights, k=rng.randint(1, 3)))
            out.append(word)
            size += len(word) + 1
            if size >= chars:
                break
    path.write_text(" ".join(out)[:chars], encoding="utf-8")
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--chars", default="10M")
    p.add_argument("--symbols", type=int, default=21_500)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--ways", default="raw,bytes,max-vocab-1000,max-vocab-256")
    p.add_argument("--json", action="store_true")
    opts = p.parse_args(argv)
    chars = int(float(opts.chars[:-1]) * UNITS[opts.chars[-1].upper()]) \
        if opts.chars[-1].upper() in UNITS else int(opts.chars)
    rows = []
    with tempfile.TemporaryDirectory(prefix="charlm-vocab-") as tmp:
        text = make_text(Path(tmp) / "mixed.txt", chars, opts.symbols)
        n_bytes = text.stat().st_size
        env = dict(os.environ, PYTHONPATH=str(REPO), CHARLM_RUNS_DIR=str(Path(tmp) / "runs"))
        for way in opts.ways.split(","):
            extra = WAYS.get(way) or ["--preprocessing", "raw", "--max-vocab",
                                      way.rsplit("-", 1)[1]]
            run = Path(tmp) / way
            began = time.perf_counter()
            done = subprocess.run(
                [sys.executable, "-m", "charlm", "train", "--text", str(text), *extra,
                 "--max-steps", str(opts.steps), "--time-budget", "0", "--eval-every",
                 str(opts.steps), "--checkpoint-every", str(opts.steps), "--out", str(run),
                 "--json"], capture_output=True, text=True, env=env, cwd=REPO)
            if done.returncode:
                raise SystemExit(f"{way} failed:\n{done.stderr[-3000:]}")
            summary = json.loads(done.stdout)
            per_char = n_bytes / chars if way == "bytes" else 1.0  # tokens per character
            warning = next((line for line in done.stderr.splitlines()
                            if line.startswith("charlm: warning:")), "")
            rows.append({
                "way": way, "tokens_per_s": summary["mean_tokens_per_s"],
                "chars_per_s": summary["mean_tokens_per_s"] / per_char,
                "val_bpc": (summary["val_loss"] or math.nan) * per_char / math.log(2),
                "wall_s": round(time.perf_counter() - began, 1), "warning": warning})
            print(f"{way}: {summary['mean_tokens_per_s']:,.0f} tokens/s", file=sys.stderr)
    machine = {"cpu": cpu_name(), "cores": os.cpu_count(), "load": os.getloadavg()[0],
               "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    if opts.json:
        print(json.dumps({"machine": machine, "chars": chars, "rows": rows}, indent=2))
        return 0
    print(f"Machine: {machine['cpu']}, {machine['cores']} cores, load {machine['load']:.2f}; "
          f"{machine['date']}; {chars:,} characters, {opts.steps} steps\n")
    print("| way | tokens/s | characters/s | val bits/char | warned |")
    print("|---|---:|---:|---:|---|")
    for r in rows:
        print(f"| {r['way']} | {r['tokens_per_s']:,.0f} | {r['chars_per_s']:,.0f} | "
              f"{r['val_bpc']:.3f} | {'yes' if r['warning'] else 'no'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
