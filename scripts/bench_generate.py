"""Benchmark: characters per second drawn by `charlm.inference.sample.generate`, one stream, on the CPU.

    python scripts/bench_generate.py [--hidden 256] [--vocab 28] [--embed 0] [--length 20000]
                                     [--repeat 5] [--threads N]

Model: an untrained GRU of the shape asked for (default: d2l's, one-hot inputs over 28 symbols,
one layer of 256 units); the speed does not depend on the weights. Each row draws --length
characters after a 14-character prefix, --repeat times; best and median are reported.

* `generate, sampled`: temperature 1 draws (Gumbel-max), the library call;
* `generate, greedy`: argmax (d2l's predict_ch8);
* `generate, top-k 5 + top-p 0.9`: with both filters on;
* `generate, streamed`: sampled, each character written and flushed to /dev/null as the CLI does;
* `d2l-style loop (baseline)`: measured in the same run: per character `model(x, state)`
  through the recurrent module, softmax, `torch.multinomial`, `.item()` (what `generate` did
  before it stepped the layers from their parameters), on one torch thread like `generate`;
* `d2l-style loop, all threads`: the same on torch's thread count (the ablation for running
  the per-step loop on one thread).

Rows for the `fused` and `fast` implementations (the prefix warm-up runs through them; the
per-character steps do not). Prints the machine, the load average before and after, and a
Markdown table for docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchlib import cpu_name  # noqa: E402 - scripts/, beside this file

from charlm.model.config import ModelConfig  # noqa: E402
from charlm.model.lm import CharLM  # noqa: E402
from charlm.inference.sample import SampleSettings, generate  # noqa: E402

PREFIX = list(range(1, 15))


def one_thread(fn):
    def run(*args):
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return fn(*args)
        finally:
            torch.set_num_threads(threads)
    return run


@torch.inference_mode()
def d2l_loop(model: CharLM, length: int, generator: torch.Generator) -> list[int]:
    logits, state = model(torch.tensor([PREFIX]))
    logits = logits[:, -1]
    out = []
    for _ in range(length):
        probs = torch.softmax(logits, -1)
        nxt = torch.multinomial(probs, 1, generator=generator)
        out.append(nxt.item())
        logits, state = model(nxt, state)
        logits = logits[:, -1]
    return out


def timed(fn, repeat: int) -> list[float]:
    fn(200)  # warm-up
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn(None)
        times.append(time.perf_counter() - t0)
    return times



def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=28)
    ap.add_argument("--embed", type=int, default=0)
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--length", type=int, default=20_000)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    print(f"machine: {cpu_name()}, {os.cpu_count()} logical CPUs, torch {torch.__version__}, "
          f"{torch.get_num_threads()} torch threads")
    print(f"model: GRU {args.layers}x{args.hidden}, vocab {args.vocab}, "
          f"{'one-hot' if not args.embed else f'embed {args.embed}'}; {args.length:,} characters "
          f"per run, best/median of {args.repeat}")
    devnull = open(os.devnull, "w", encoding="utf-8")
    rows = []
    for impl in ("fused", "fast"):
        torch.manual_seed(0)
        model = CharLM(ModelConfig(vocab_size=args.vocab, cell="gru", hidden=args.hidden,
                                   layers=args.layers, embed=args.embed, impl=impl)).eval()

        def draw(n, **kw):
            return generate(model, PREFIX, SampleSettings(length=n or args.length, seed=0, **kw))

        def streamed(n):
            def on_step(ids):
                devnull.write(str(ids[0]))
                devnull.flush()
            return generate(model, PREFIX, SampleSettings(length=n or args.length, seed=0),
                            on_step=on_step)

        cases = [
            ("generate, sampled", lambda n: draw(n)),
            ("generate, greedy", lambda n: draw(n, greedy=True)),
            ("generate, top-k 5 + top-p 0.9", lambda n: draw(n, top_k=5, top_p=0.9)),
            ("generate, streamed", streamed),
            ("d2l-style loop (baseline)", one_thread(
                lambda n: d2l_loop(model, n or args.length, torch.Generator().manual_seed(0)))),
            (f"d2l-style loop, {torch.get_num_threads()} threads",
             lambda n: d2l_loop(model, n or args.length, torch.Generator().manual_seed(0))),
        ]
        base = None
        for name, fn in cases:
            times = timed(fn, args.repeat)
            best, median = args.length / min(times), args.length / statistics.median(times)
            rows.append([impl, name, best, median])
            if "baseline" in name:
                base = median
        for row in rows[-len(cases):]:
            row.append(row[3] / base)
    load_after = os.getloadavg()
    print(f"load average (1, 5, 15 min): before {load_before[0]:.2f} {load_before[1]:.2f} "
          f"{load_before[2]:.2f}, after {load_after[0]:.2f} {load_after[1]:.2f} {load_after[2]:.2f}")
    print()
    print("| impl | path | chars/s best | chars/s median | median vs baseline |")
    print("|---|---|---:|---:|---:|")
    for impl, name, best, median, ratio in rows:
        print(f"| {impl} | {name} | {best:,.0f} | {median:,.0f} | {ratio:.2f}x |")


if __name__ == "__main__":
    main()
