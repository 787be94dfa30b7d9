"""Benchmark: vocabulary build + encode of a large text, charlm.data.vocab against the naive way.

    python scripts/bench_encode.py [PATH] [--chars 100000000] [--naive-chars 5000000] [--repeat 3]

PATH defaults to ../shared/data/tinyshakespeare.txt (relative to the repository root); the text
is repeated up to --chars characters. Each measurement runs in a fresh Python subprocess so that
its peak RSS (``ru_maxrss``) is its own:

* fast:  ``Vocab.build(text)`` + ``vocab.encode(text)`` on the full text, best and median of
  --repeat runs. Memory = peak RSS during the first run minus RSS once the text was in memory
  (the text itself, 1 byte per ASCII character, is therefore not counted; it is reported
  separately). The encoded ids are 4 bytes per character of that.
* the same with the chunk loops on all torch threads instead of one (ablation of
  ``charlm.data.vocab.one_thread``).
* streamed: what the trainer runs since the large-corpus data path, ``charlm.data.stream.chunks``
  + ``charlm.data.encode.encode_chunks`` (4 MiB pieces, one pass, uint8 ids for this text).
* naive: ``list(text)``, ``collections.Counter``, sorted vocabulary, a dict lookup per character
  into a list, ``torch.tensor(ids, dtype=torch.int32)``; run on the first --naive-chars
  characters only and scaled per character (time and memory). It also checks that both give
  identical vocabularies and ids there.

Prints a Markdown table for docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchlib import cpu_name  # scripts/, beside this file

REPO = Path(__file__).resolve().parents[1]
DEFAULT_TEXT = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"


def _rss_kib() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS in /proc/self/status")


def _peak_kib() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux


def _load(path: str, chars: int) -> str:
    base = Path(path).read_text(encoding="utf-8")
    reps, rest = divmod(chars, len(base))
    # join allocates the result once: no transient second copy that would raise the peak RSS
    return "".join([base] * reps + [base[:rest]])


def child_fast(path: str, chars: int, repeat: int, all_threads: bool = False,
               streamed: bool = False) -> dict:
    import contextlib

    import torch

    import charlm.data.vocab
    from charlm.data.vocab import Vocab

    if all_threads:  # ablation: let torch split each chunk's ops across all its threads
        charlm.data.vocab.one_thread = contextlib.nullcontext

    Vocab.build("warm up").encode("warm up")  # first-call setup is not what we measure
    before_text = _rss_kib()
    text = _load(path, chars)
    rss0, peak0 = _rss_kib(), _peak_kib()
    times = []
    for run in range(repeat):
        t0 = time.perf_counter()
        if streamed:  # what the trainer runs: charlm.data.stream + charlm.data.encode
            from charlm.data import stream
            from charlm.data.encode import encode_chunks

            vocab, ids = encode_chunks(stream.chunks("raw", text=text), len(text))
        else:
            vocab = Vocab.build(text)
            ids = vocab.encode(text)
            assert ids.dtype == torch.int32
        times.append(time.perf_counter() - t0)
        assert len(ids) == len(text)
        del ids
        if run == 0:
            peak1 = _peak_kib()  # memory: first run only, so allocator reuse cannot flatter it
    return {
        "chars": len(text),
        "vocab": len(vocab),
        "times": times,
        "text_mib": (rss0 - before_text) / 1024,
        "rss_base_mib": rss0 / 1024,
        "peak_before_mib": peak0 / 1024,
        "peak_growth_bytes_per_char": (peak1 - rss0) * 1024 / len(text),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }


def child_naive(path: str, chars: int) -> dict:
    import collections

    import torch

    from charlm.data.vocab import Vocab

    text = _load(path, chars)
    rss0 = _rss_kib()
    t0 = time.perf_counter()
    chars_list = list(text)
    counter = collections.Counter(chars_list)
    tokens = ["<unk>"] + [c for c, _ in sorted(counter.items(), key=lambda kv: (-kv[1], kv[0]))]
    index = {t: i for i, t in enumerate(tokens)}
    ids = torch.tensor([index.get(c, 0) for c in chars_list], dtype=torch.int32)
    seconds = time.perf_counter() - t0
    peak1 = _peak_kib()
    fast = Vocab.build(text)
    same = fast.tokens == tokens and bool((fast.encode(text) == ids).all())
    return {
        "chars": len(text),
        "seconds": seconds,
        "peak_growth_bytes_per_char": (peak1 - rss0) * 1024 / len(text),
        "identical": same,
    }


def _run_child(*args: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        sys.exit(f"bench_encode: child {' '.join(args)} failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])



def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("path", nargs="?", default=str(DEFAULT_TEXT))
    ap.add_argument("--chars", type=int, default=100_000_000)
    ap.add_argument("--naive-chars", type=int, default=5_000_000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--child", choices=["fast", "fast-all-threads", "streamed", "naive"],
                    help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.child in ("fast", "fast-all-threads", "streamed"):
        all_threads = args.child == "fast-all-threads"
        print(json.dumps(child_fast(args.path, args.chars, args.repeat, all_threads,
                                    streamed=args.child == "streamed")))
        return
    if args.child == "naive":
        print(json.dumps(child_naive(args.path, args.naive_chars)))
        return
    if not Path(args.path).is_file():
        sys.exit(f"bench_encode: no such file {args.path}; pass the path of a text file")

    load = os.getloadavg()
    fast = _run_child(args.path, "--chars", str(args.chars), "--repeat", str(args.repeat), "--child", "fast")
    threaded = _run_child(
        args.path, "--chars", str(args.chars), "--repeat", str(args.repeat), "--child", "fast-all-threads"
    )
    streamed = _run_child(args.path, "--chars", str(args.chars), "--repeat", str(args.repeat),
                          "--child", "streamed")
    naive = _run_child(args.path, "--naive-chars", str(args.naive_chars), "--child", "naive")
    best, median = min(fast["times"]), statistics.median(fast["times"])
    naive_scaled = naive["seconds"] * fast["chars"] / naive["chars"]
    print(f"machine: nproc={os.cpu_count()}, {cpu_name()}, torch threads={fast['threads']}, "
          f"Python {platform.python_version()}, torch {fast['torch']}")
    print(f"command: python scripts/bench_encode.py {' '.join(sys.argv[1:])}".rstrip())
    print(f"date: {time.strftime('%Y-%m-%d %H:%M %Z')}; load average before: {load[0]:.2f}, after: "
          f"{os.getloadavg()[0]:.2f} (the machine is shared: other work inflates the timings)")
    print()
    print("| approach | chars | seconds (best / median of runs) | peak RSS growth, bytes/char |")
    print("|---|---|---|---|")
    print(f"| charlm.data.vocab build + encode | {fast['chars']:,} | {best:.2f} / {median:.2f} "
          f"({len(fast['times'])} runs) | {fast['peak_growth_bytes_per_char']:.2f} |")
    print(f"| same, chunk ops on all {threaded['threads']} torch threads (ablation) | {threaded['chars']:,} | "
          f"{min(threaded['times']):.2f} / {statistics.median(threaded['times']):.2f} "
          f"({len(threaded['times'])} runs) | {threaded['peak_growth_bytes_per_char']:.2f} |")
    print(f"| charlm.data.encode.encode_chunks (the trainer's path: chunks, uint8 ids) | "
          f"{streamed['chars']:,} | {min(streamed['times']):.2f} / "
          f"{statistics.median(streamed['times']):.2f} ({len(streamed['times'])} runs) | "
          f"{streamed['peak_growth_bytes_per_char']:.2f} |")
    print(f"| naive (list + Counter + dict per char), run on {naive['chars']:,} chars | "
          f"{fast['chars']:,} (scaled) | {naive_scaled:.2f} (scaled from {naive['seconds']:.2f}) | "
          f"{naive['peak_growth_bytes_per_char']:.2f} |")
    print()
    print(f"speed-up (naive scaled / fast best): {naive_scaled / best:.1f}x; vocabulary {fast['vocab']} "
          f"tokens; ids identical to naive on the slice: {naive['identical']}")
    print(f"text itself: {fast['text_mib']:.0f} MiB resident (not in the growth figure); RSS with text "
          f"{fast['rss_base_mib']:.0f} MiB, peak before the runs {fast['peak_before_mib']:.0f} MiB")


if __name__ == "__main__":
    main()
