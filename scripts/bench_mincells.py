"""minGRU / minLSTM against the GRU of the same parameter count, in one interleaved run: training
tokens/s and the generation chars/s of one stream (the rows of issue 28 in docs/BENCHMARKS.md).

    python scripts/bench_mincells.py              # shakespeare-gru.toml's GRU vs 3-layer min cells
    python scripts/bench_mincells.py --cells mingru --impls fast --layers 4 --threads 2
    python scripts/bench_mincells.py --min-hidden 256 --json   # a fixed width, not equal size

Training: the trainer's step (embedding -> recurrent layers -> head -> cross-entropy -> backward
-> clip 1.0 -> AdamW), the state carried between windows as sequential partitioning does, on
random tokens of a 65-symbol vocabulary; the baseline is `--cell gru --impl fast`. The min cells'
width is the one whose parameter count is nearest the GRU's (--min-hidden fixes it). Every round
times each arm at each thread count in turn, so the ratios come from the same minutes; reported
are medians over the rounds (ratios: the median of the rounds' ratios), by the wall clock and,
at one thread, by the thread's CPU clock, which a busy machine disturbs less. Generation:
`charlm.inference.sample.generate` of one stream (one thread, as generate runs it), the prefix warmed up
once, then --gen-length characters drawn.

The script reports how many cores other processes kept busy while it measured: on a shared
machine a ratio from a noisy run is still a ratio of the same minutes, but say so.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_cells import OtherLoad  # noqa: E402 - scripts/, beside this file
from benchlib import cpu_name  # noqa: E402

from charlm.system.devices import keep_freed_memory  # noqa: E402
from charlm.model.config import ModelConfig  # noqa: E402
from charlm.model.lm import CharLM, count_parameters, detach_state  # noqa: E402
from charlm.inference.sample import SampleSettings, generate  # noqa: E402
from charlm.training.optim import make_optimizer  # noqa: E402

VOCAB = 65  # Tiny Shakespeare's raw symbols


def model_config(args, cell: str, impl: str, hidden: int, layers: int) -> ModelConfig:
    extra = {} if cell == "gru" else dict(residual=args.residual, norm=args.norm, ffn=args.ffn)
    return ModelConfig(vocab_size=VOCAB, cell=cell, hidden=hidden, layers=layers,
                       embed=args.embed, dropout=args.dropout, impl=impl, **extra)


def size(args, cell: str, hidden: int, layers: int) -> int:
    return count_parameters(CharLM(model_config(args, cell, "fused", hidden, layers)))


def matching_hidden(args, cell: str, target: int) -> int:
    """The width (a multiple of 8) whose parameter count is nearest `target`."""
    return min(range(8, 2049, 8), key=lambda h: abs(size(args, cell, h, args.layers) - target))


def train_step(config: ModelConfig, args):
    torch.manual_seed(0)
    model = CharLM(config).train()
    opt = make_optimizer("adamw", model.parameters(), 1e-3, 0.01)
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, VOCAB, (args.batch, args.steps + 1), generator=gen)
    x, y = tokens[:, :-1], tokens[:, 1:]
    state = [None]

    def step():
        opt.zero_grad(set_to_none=True)
        logits, state[0] = model(x, state[0])
        F.cross_entropy(logits.reshape(-1, VOCAB), y.reshape(-1)).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        state[0] = detach_state(state[0])

    return model, step


def generation(model: CharLM, length: int):
    model = model.eval()
    settings = SampleSettings(length=length, temperature=1.0, seed=0)
    prefix = list(range(1, 9))
    return lambda: generate(model, prefix, settings)


def timed(work, count: int) -> tuple[float, float]:
    """count / seconds of `work()`, by the wall clock and by this thread's CPU clock. With one
    thread the second is what a quiet machine's wall clock would say: on a busy one it leaves out
    the time other processes held the core (the caches they share still cost something)."""
    wall, cpu = time.perf_counter(), time.thread_time()
    work()
    return count / (time.perf_counter() - wall), count / (time.thread_time() - cpu)


def interleaved(arms: dict, rounds: int, measure) -> tuple[dict, float]:
    """{arm: [(wall rate, cpu rate) per round]}: `rounds` rounds of measure(name, value) for
    every arm in turn."""
    rates = {name: [] for name in arms}
    load = OtherLoad()
    for _ in range(rounds):
        for name, value in arms.items():
            with load:
                rates[name].append(measure(name, value))
    return rates, load.cores


def medians(mine: list, base: list, which: int) -> tuple[float, float]:
    """The median rate, and the median of the per-round ratios to `base` (0: wall, 1: cpu)."""
    return (statistics.median(m[which] for m in mine),
            statistics.median(m[which] / b[which] for m, b in zip(mine, base)))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    words = lambda text: [w for w in text.split(",") if w]  # noqa: E731
    p.add_argument("--cells", type=words, default=["mingru", "minlstm"])
    p.add_argument("--impls", type=words, default=["fast", "fused"],
                   help="the min cells' implementations (default fast,fused)")
    p.add_argument("--gru-hidden", type=int, default=256)
    p.add_argument("--gru-layers", type=int, default=2)
    p.add_argument("--layers", type=int, default=3, help="the min cells' layers (default 3)")
    p.add_argument("--min-hidden", type=int, default=0,
                   help="the min cells' width (default: the GRU's parameter count)")
    p.add_argument("--norm", default="layer")
    p.add_argument("--ffn", type=int, default=0)
    p.add_argument("--no-residual", dest="residual", action="store_false")
    p.add_argument("--embed", type=int, default=64)
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=96, help="BPTT window (default 96)")
    p.add_argument("--threads", type=words, default=["1", "2"], help="comma list (default 1,2)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--iters", type=int, default=3, help="training steps timed per arm and round")
    p.add_argument("--gen-length", type=int, default=2000, help="characters per generation")
    p.add_argument("--no-generation", dest="generation", action="store_false")
    p.add_argument("--json", action="store_true")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    keep_freed_memory()  # as charlm train does on the CPU
    threads = [int(t) for t in args.threads]
    target = size(args, "gru", args.gru_hidden, args.gru_layers)
    configs = {"gru fast": model_config(args, "gru", "fast", args.gru_hidden, args.gru_layers)}
    for cell in args.cells:
        hidden = args.min_hidden or matching_hidden(args, cell, target)
        for impl in args.impls:
            configs[f"{cell} {impl}"] = model_config(args, cell, impl, hidden, args.layers)
    meta = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "torch": torch.__version__,
            "cpu": f"{cpu_name()}, {os.cpu_count()} cores",
            "command": " ".join(["scripts/bench_mincells.py", *(argv or sys.argv[1:])]),
            "loadavg_before": os.getloadavg()}
    steps = {name: train_step(cfg, args) for name, cfg in configs.items()}
    for _, step in steps.values():
        for n in threads:
            torch.set_num_threads(n)
            step()

    def train(name, value):
        torch.set_num_threads(value[1])
        step = steps[value[0]][1]
        return timed(lambda: [step() for _ in range(args.iters)],
                     args.batch * args.steps * args.iters)

    arms = {f"{name} @{n}": (name, n) for n in threads for name in configs}
    rates, busy = interleaved(arms, args.rounds, train)
    rows = []
    for name, cfg in configs.items():
        row = {"arm": name, "hidden": cfg.hidden, "layers": cfg.layers,
               "parameters": count_parameters(steps[name][0])}
        for n in threads:
            mine, base = rates[f"{name} @{n}"], rates[f"gru fast @{n}"]
            row[f"tokens_per_s@{n}"], row[f"vs_gru@{n}"] = medians(mine, base, 0)
            if n == 1:  # one thread: the CPU clock too (see `timed`)
                row["tokens_per_cpu_s@1"], row["vs_gru_cpu@1"] = medians(mine, base, 1)
        rows.append(row)
    gen_busy = None
    if args.generation:
        torch.set_num_threads(max(threads))  # generate picks its own (one thread, one stream)
        runs = {name: generation(steps[name][0], args.gen_length) for name in configs
                if not name.endswith("fused")}  # one stepper per cell: the impl plays no part
        for run in runs.values():
            run()
        got, gen_busy = interleaved(runs, args.rounds,
                                    lambda name, run: timed(run, args.gen_length))
        for row in rows:
            if row["arm"] in got:
                mine, base = got[row["arm"]], got["gru fast"]
                row["gen_chars_per_s"], row["gen_vs_gru"] = medians(mine, base, 0)
                row["gen_chars_per_cpu_s"], row["gen_vs_gru_cpu"] = medians(mine, base, 1)
    meta.update(loadavg_after=os.getloadavg(), other_cores_busy_training=round(busy, 2),
                other_cores_busy_generation=None if gen_busy is None else round(gen_busy, 2))
    if args.json:
        print(json.dumps({"meta": meta, "rows": rows}, indent=1))
        return 0
    print(f"# {meta['date']}  torch {meta['torch']}  {meta['cpu']}\n# {meta['command']}")
    print(f"# batch {args.batch} x {args.steps}, embed {args.embed}, dropout {args.dropout}; min "
          f"cells: {args.layers} layers, norm {args.norm}, ffn {args.ffn}, residual {args.residual}")
    print("# training tokens/s (wall clock) per thread count, and by CPU clock at one thread; "
          "generation chars/s of one stream, wall and CPU clock; ratios: medians of the rounds' "
          "ratios to the GRU")
    head = "".join(f"{'tok/s@' + str(n):>11} {'vs gru':>7}" for n in threads)
    cpu = 1 in threads
    print(f"{'arm':14} {'H':>4} {'L':>2} {'params':>9}{head}"
          + (f" {'cpu tok/s':>10} {'vs gru':>7}" if cpu else "")
          + f" {'gen ch/s':>9} {'vs gru':>7} {'cpu ch/s':>9} {'vs gru':>7}")
    for r in rows:
        line = "".join(f"{r[f'tokens_per_s@{n}']:11.0f} {r[f'vs_gru@{n}']:6.2f}x" for n in threads)
        if cpu:
            line += f" {r['tokens_per_cpu_s@1']:10.0f} {r['vs_gru_cpu@1']:6.2f}x"
        if "gen_chars_per_s" in r:
            line += (f" {r['gen_chars_per_s']:9.0f} {r['gen_vs_gru']:6.2f}x"
                     f" {r['gen_chars_per_cpu_s']:9.0f} {r['gen_vs_gru_cpu']:6.2f}x")
        print(f"{r['arm']:14} {r['hidden']:4} {r['layers']:2} {r['parameters']:9,}{line}")
    print(f"# other processes kept {meta['other_cores_busy_training']} cores busy while training "
          f"steps ran, {meta['other_cores_busy_generation']} during generation; load average "
          f"before {meta['loadavg_before']}, after {meta['loadavg_after']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
