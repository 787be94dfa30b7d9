"""Tokens/s of a full char-LM training step for each cell x implementation x device.

One training step = embedding -> recurrent layers -> linear to vocabulary logits -> cross-entropy
-> backward -> AdamW step (the trainer's, fused where torch has it), on random tokens. For every (device, hidden, batch, cell) the
implementations are measured interleaved in rounds (fused, scratch, fast, fused, scratch, ...), so
the ratio to the fused layer is taken from the same minutes of the same run; reported are the
median tokens/s over rounds and the median of the per-round ratios.

On a shared machine other processes steal cores; the script reports how many cores other processes
kept busy while it measured (Linux only), so a reader can tell a quiet run from a noisy one.

    python scripts/bench_cells.py                                  # cpu (+ cuda if present), H 256, B 32
    python scripts/bench_cells.py --hidden 128,256,512 --batch 32,64,128 --cells gru --repeats 7
    python scripts/bench_cells.py --device cuda --impls fused,fast --json
    python scripts/bench_cells.py --cells gru --impls fused,fast --weight-drop 0.3 --layers 2 \
        --dropout 0.2 --locked                                      # the regularised step
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchlib import cpu_name  # noqa: E402 - scripts/, beside this file

from charlm.model.cells import recurrent_layer  # noqa: E402
from charlm.model.config import FAST_MODES, MODES  # noqa: E402
from charlm.system.devices import keep_freed_memory  # noqa: E402
from charlm.training.optim import make_optimizer  # noqa: E402
from charlm.model import ckernel  # noqa: E402


class OtherLoad:
    """Seconds of CPU that processes other than this one used during a block (Linux /proc/stat)."""

    def __init__(self):
        self.others = 0.0
        self.wall = 0.0

    @staticmethod
    def _busy() -> float | None:
        try:
            with open("/proc/stat") as f:
                v = [int(x) for x in f.readline().split()[1:]]
        except OSError:
            return None
        # user nice system idle iowait irq softirq steal
        return (v[0] + v[1] + v[2] + v[5] + v[6] + v[7]) / os.sysconf("SC_CLK_TCK")

    def __enter__(self):
        self._b, self._t, self._s = self._busy(), time.perf_counter(), sum(os.times()[:2])
        return self

    def __exit__(self, *exc):
        self.wall += time.perf_counter() - self._t
        b = self._busy()
        if b is not None and self._b is not None:
            self.others += max(0.0, (b - self._b) - (sum(os.times()[:2]) - self._s))

    @property
    def cores(self) -> float:
        return self.others / self.wall if self.wall else 0.0


def wait_for_quiet(max_cores: float, timeout: float = 600.0) -> None:
    """Sleep until other processes kept fewer than max_cores busy for one second (or timeout)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        load = OtherLoad()
        with load:
            time.sleep(1.0)
        if load.cores < max_cores:
            return


class TinyLM(nn.Module):
    def __init__(self, impl, cell, vocab, embed, hidden, layers, dropout=0.0, locked=False,
                 weight_drop=0.0):
        super().__init__()
        self.embedding = nn.Embedding(vocab, embed)
        self.rnn = recurrent_layer(impl, cell, embed, hidden, layers, dropout, locked=locked,
                                   weight_drop=weight_drop)
        self.head = nn.Linear(hidden, vocab)

    def forward(self, tokens):
        out, _ = self.rnn(self.embedding(tokens))
        return self.head(out)


def make_step(impl, cell, args, hidden, batch, device):
    torch.manual_seed(0)
    model = TinyLM(impl, cell, args.vocab, args.embed, hidden, args.layers, args.dropout,
                   args.locked, args.weight_drop).to(device)
    opt = make_optimizer("adamw", model.parameters(), 1e-3, 0.01)  # the trainer's (fused) AdamW
    gen = torch.Generator(device="cpu").manual_seed(1)
    tokens = torch.randint(0, args.vocab, (batch, args.steps + 1), generator=gen).to(device)
    x, y = tokens[:, :-1], tokens[:, 1:]

    def step():
        opt.zero_grad(set_to_none=True)
        logits = model(x)
        F.cross_entropy(logits.reshape(-1, args.vocab), y.reshape(-1)).backward()
        opt.step()

    return step


def impls_for(cell, impls):
    return [i for i in impls if i != "fast" or cell in FAST_MODES]


def measure(args, device, hidden, batch, cell):
    impls = impls_for(cell, args.impls)
    steps = {impl: make_step(impl, cell, args, hidden, batch, device) for impl in impls}
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for step in steps.values():
        for _ in range(args.warmup):
            step()
    sync()
    rates = {impl: [] for impl in impls}
    load = OtherLoad()
    tries = 0
    while min(len(r) for r in rates.values()) < args.repeats and tries < args.max_rounds:
        tries += 1
        if args.max_other_cores is not None:
            wait_for_quiet(args.max_other_cores)
        rnd, rnd_load = {}, OtherLoad()
        for impl, step in steps.items():
            with rnd_load:
                t0 = time.perf_counter()
                for _ in range(args.iters):
                    step()
                sync()
                rnd[impl] = batch * args.steps * args.iters / (time.perf_counter() - t0)
        if args.max_other_cores is not None and rnd_load.cores > args.max_other_cores:
            continue  # another process took CPU during this round: measure it again
        load.others += rnd_load.others
        load.wall += rnd_load.wall
        for impl, rate in rnd.items():
            rates[impl].append(rate)
    if not rates[impls[0]]:
        raise SystemExit(f"no round with other processes under {args.max_other_cores} cores "
                         f"in {tries} tries; the machine is too busy")
    rows = []
    for impl in impls:
        ratios = [r / f for r, f in zip(rates[impl], rates[impls[0]])] if impls[0] == "fused" else []
        rows.append({
            "device": device.type, "cell": cell, "hidden": hidden, "batch": batch, "impl": impl,
            "tokens_per_s": statistics.median(rates[impl]),
            "vs_fused": statistics.median(ratios) if ratios else None,
            "rounds": [round(r) for r in rates[impl]], "rounds_tried": tries,
        })
    return rows, load.cores



def ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def words(text: str) -> list[str]:
    return [v for v in text.split(",") if v]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=ints, default=[256], help="comma list (default 256)")
    p.add_argument("--batch", type=ints, default=[32], help="comma list (default 32)")
    p.add_argument("--steps", type=int, default=35, help="time steps per sequence (default 35)")
    p.add_argument("--cells", type=words, default=list(MODES), help="comma list of " + ",".join(MODES))
    p.add_argument("--impls", type=words, default=["fused", "scratch", "fast"],
                   help="comma list of fused,scratch,fast (fused first gives the ratios)")
    p.add_argument("--device", type=words, default=None, help="cpu,cuda (default: cpu, and cuda if available)")
    p.add_argument("--repeats", type=int, default=5, help="interleaved rounds (default 5)")
    p.add_argument("--iters", type=int, default=3, help="training steps timed per round (default 3)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--max-other-cores", type=float, default=None,
                   help="drop rounds in which other processes kept more cores than this busy")
    p.add_argument("--max-rounds", type=int, default=200, help="give up after this many rounds")
    p.add_argument("--layers", type=int, default=1)
    p.add_argument("--dropout", type=float, default=0.0, help="dropout between layers (default 0)")
    p.add_argument("--locked", action="store_true", help="locked dropout between layers")
    p.add_argument("--weight-drop", type=float, default=0.0,
                   help="DropConnect on W_hh, one mask per step (default 0)")
    p.add_argument("--embed", type=int, default=32)
    p.add_argument("--vocab", type=int, default=65)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    devices = args.device or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    if "cuda" in devices and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    meta = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "torch": torch.__version__, "python": platform.python_version(), "nproc": os.cpu_count(),
        "cpu": cpu_name(), "threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "loadavg_before": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "fast_gru_loops": ckernel.status(),
        "keep_freed_memory": keep_freed_memory(),  # as charlm train does on the CPU
    }
    rows = []
    if not args.json:
        print(f"# {meta['date']}  torch {meta['torch']}  {meta['nproc']} CPUs ({meta['cpu']}), "
              f"{meta['threads']} threads  cuda: {meta['cuda']}")
        print(f"# {meta['command']}")
        print(f"# fast GRU: {meta['fast_gru_loops']}; malloc keeps freed memory: {meta['keep_freed_memory']}")
        print(f"{'device':6} {'cell':8} {'H':>4} {'B':>4} {'impl':8} {'tokens/s':>10} {'vs fused':>8}  other cores busy")
    for dev in devices:
        device = torch.device(dev)
        for hidden in args.hidden:
            for batch in args.batch:
                for cell in args.cells:
                    got, others = measure(args, device, hidden, batch, cell)
                    for row in got:
                        row["other_cores_busy"] = round(others, 2)
                        rows.append(row)
                        if not args.json:
                            ratio = f"{row['vs_fused']:.2f}x" if row["vs_fused"] is not None else "-"
                            print(f"{dev:6} {cell:8} {hidden:4} {batch:4} {row['impl']:8} "
                                  f"{row['tokens_per_s']:10.0f} {ratio:>8}  {others:.2f}", flush=True)
    meta["loadavg_after"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    if args.json:
        print(json.dumps({"meta": meta, "results": rows}, indent=1))
    else:
        print(f"# load average before {meta['loadavg_before']}, after {meta['loadavg_after']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
