"""Benchmark: `charlm train` against the d2l book's own loop and a bare stock `nn.GRU` step,
whole processes interleaved in one run.

    python scripts/bench_baselines.py [--configs seeds,default] [--rounds 3] [--steps 400]
        [--d2l PATH] [--args "..."] [--json]

Rows, per config (every process on the CPU, torch's default threads, run one after another in
rounds so a change in load falls on all of them):

* charlm:  `charlm train` with the config for --steps steps (no evaluation or checkpoint
           inside the run); tokens/s is the trainer's own summary figure (every step counted).
* bare:    stock torch, the same model written plainly: one-hot (or nn.Embedding) -> nn.GRU ->
           nn.Linear, cross-entropy, zero_grad, backward, clip_grad_norm_, the optimizer step,
           the state detached and carried; batches pre-built as int64 tensors; timed after 20
           warm-up steps. No charlm code.
* d2l:     (seeds only) d2l 0.17.6's `train_epoch_ch8` with its `RNNModel(nn.GRU(V, 256))`,
           `load_data_time_machine(32, 35)` (first 10,000 tokens) and SGD lr 1, as the book's
           chapter 9.1 trains it; tokens/s as the book prints it, over the epochs after the
           first. --d2l names the unpacked d2l 0.17.6 wheel (the folder holding `d2l/`, e.g.
           `pip download d2l==0.17.6 --no-deps` and unzip); the book's plotting and vision
           imports are stubbed, its data comes from ../shared/data/timemachine.txt. Without
           --d2l the row is left out.

* peak:    (each round) the machine's float32 matrix-product rate: the best of a few seconds of
           2048 x 2048 x 2048 `torch.mm` at torch's default threads, in a process of its own.

Ratios are charlm over each baseline, per round (median, min-max). Beside them, the roofline:
each row's tokens/s as GFLOP/s of the products a training step cannot avoid (per character, per
dense weight: forward, weight gradient and, where the input needs one, input gradient; a one-hot
input's product is a row lookup and is not counted) and as a share of the peak, and the ceiling:
the tokens/s of a step that did nothing but those products at the peak rate, over each baseline.
No float32 implementation of the model can beat that ratio on the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchlib import cpu_name  # scripts/, beside this file

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
TIMEMACHINE = SHARED / "timemachine.txt"
# the bare models: what the named configs build (configs/d2l-gru.toml, timemachine-gru.toml)
MODELS = {
    "seeds": dict(config="configs/d2l-gru.toml", embed=0, hidden=256, layers=1, dropout=0.0,
                  batch=32, steps=35, optimizer="sgd", lr=1.0, max_tokens=10000),
    "default": dict(config=None, embed=32, hidden=256, layers=2, dropout=0.2, batch=64, steps=32,
                    optimizer="adamw", lr=3e-3, max_tokens=0),
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default="seeds,default", help="comma-separated: seeds, default")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=400, help="training steps per process")
    p.add_argument("--d2l", default=None, help="folder holding d2l 0.17.6's d2l/ package")
    p.add_argument("--args", default="", help="extra charlm train arguments")
    p.add_argument("--json", action="store_true")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for c in args.configs.split(","):
        if c.strip() not in MODELS:
            p.error(f"--configs: unknown {c.strip()!r}; choose from {', '.join(MODELS)}")
    return args


def train_flops_per_token(m: dict, vocab: int) -> int:
    """FLOPs of the products one training step needs per character, at the least (2 per
    multiply-add): forward, weight gradient and input gradient of every dense weight, except the
    input gradient of the first layer's product when its input is one-hot (nothing learns from
    it) and that product itself (a row lookup then)."""
    H, E, gates = m["hidden"], m["embed"], 3 * m["hidden"]
    total = 6 * H * vocab  # the head
    for layer in range(m["layers"]):
        total += 6 * H * gates  # W_hh
        if layer:
            total += 6 * H * gates  # W_ih on the layer below's output
        elif E:
            total += 6 * E * gates  # W_ih on the embedding (the embedding learns: input gradient)
    return total


# -- the workers (each a process of its own) ----------------------------------------------------
def peak_worker(seconds: float = 3.0) -> float:
    """The best GFLOP/s of a large float32 product at torch's default threads."""
    import torch

    n = 2048
    a, b, c = torch.randn(n, n), torch.randn(n, n), torch.empty(n, n)
    for _ in range(3):
        torch.mm(a, b, out=c)
    best, end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        t0 = time.perf_counter()
        torch.mm(a, b, out=c)
        best = max(best, 2 * n**3 / (time.perf_counter() - t0) / 1e9)
    return best


def d2l_text() -> list[str]:
    import re

    lines = TIMEMACHINE.read_text(encoding="utf-8").splitlines(keepends=True)
    return [re.sub("[^A-Za-z]+", " ", line).strip().lower() for line in lines]


def bare_worker(name: str, steps: int) -> float:
    """tokens/s of a stock torch loop for the model of MODELS[name]."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    m = MODELS[name]
    text = "".join(d2l_text())  # lines joined as d2l joins them
    chars = sorted(set(text))
    V = len(chars) + 1  # + <unk>, as charlm's vocabulary
    index = {c: i + 1 for i, c in enumerate(chars)}
    ids = torch.tensor([index[c] for c in text], dtype=torch.long)
    if m["max_tokens"]:
        ids = ids[: m["max_tokens"]]
    ids = ids[: int(len(ids) * 0.9)]
    B, T = m["batch"], m["steps"]
    cols = (len(ids) - 1) // B
    Xs, Ys = ids[: B * cols].view(B, cols), ids[1: B * cols + 1].view(B, cols)
    batches = [(Xs[:, i: i + T].contiguous(), Ys[:, i: i + T].contiguous())
               for i in range(0, cols - T + 1, T)]

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(V, m["embed"]) if m["embed"] else None
            self.rnn = nn.GRU(m["embed"] or V, m["hidden"], m["layers"], batch_first=True,
                              dropout=m["dropout"] if m["layers"] > 1 else 0.0)
            self.drop = nn.Dropout(m["dropout"])
            self.head = nn.Linear(m["hidden"], V)

        def forward(self, x, h):
            x = self.embed(x) if self.embed is not None else F.one_hot(x, V).float()
            y, h = self.rnn(x, h)
            return self.head(self.drop(y)), h

    torch.manual_seed(0)
    model = Model().train()
    params = list(model.parameters())
    opt = (torch.optim.SGD(params, m["lr"]) if m["optimizer"] == "sgd"
           else torch.optim.AdamW(params, m["lr"], weight_decay=0.01))
    h, warm = None, 20
    for i in range(warm + steps):
        if i == warm:
            t0 = time.perf_counter()
        X, Y = batches[i % len(batches)]
        logits, h = model(X, h)
        h = h.detach()
        loss = F.cross_entropy(logits.reshape(-1, V), Y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
    return steps * B * T / (time.perf_counter() - t0)


def d2l_worker(folder: str, steps: int) -> float:
    """tokens/s of d2l 0.17.6's train_epoch_ch8 (epochs after the first), chapter 9.1's GRU."""
    import types

    import torch._dynamo  # noqa: F401  (before the stubs: it looks the stubbed names up)

    for stub in ("torchvision", "pandas"):  # imported by d2l.torch for other chapters
        mod = types.ModuleType(stub)
        mod.transforms = None
        sys.modules[stub] = mod
    sys.path.insert(0, folder)
    import matplotlib

    matplotlib.use("Agg")
    import torch
    from d2l import torch as d2l
    from torch import nn

    d2l.download = lambda name, cache_dir=None: str(TIMEMACHINE)
    train_iter, vocab = d2l.load_data_time_machine(32, 35)
    net = d2l.RNNModel(nn.GRU(len(vocab), 256), len(vocab))
    loss, updater = nn.CrossEntropyLoss(), torch.optim.SGD(net.parameters(), 1)
    per_epoch = sum(1 for _ in train_iter)
    epochs = 1 + max(1, steps // per_epoch)
    speeds = [d2l.train_epoch_ch8(net, train_iter, loss, updater, torch.device("cpu"), False)[1]
              for _ in range(epochs)]
    return statistics.median(speeds[1:])


# -- the driver -------------------------------------------------------------------------------
def charlm_run(name: str, args, env: dict, cwd: Path) -> float:
    steps = args.steps
    cmd = [sys.executable, "-m", "charlm", "train", "--device", "cpu", "--max-steps", str(steps),
           "--epochs", "0", "--time-budget", "0", "--eval-every", str(steps + 1),
           "--checkpoint-every", str(steps + 1), "--quiet", "--json", *shlex.split(args.args)]
    if MODELS[name]["config"]:
        cmd[4:4] = ["--config", str(REPO / MODELS[name]["config"])]
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"bench_baselines: charlm failed: {done.stderr.strip()[-2000:]}")
    summary = json.loads(done.stdout[done.stdout.index("{"):])
    return summary.get("mean_tokens_per_s", summary.get("tokens_per_s"))


def worker_run(kind: str, name: str, args, env: dict) -> float:
    cmd = [sys.executable, __file__, "--worker", kind, "--configs", name, "--steps", str(args.steps)]
    if args.d2l:
        cmd += ["--d2l", args.d2l]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"bench_baselines: {kind} failed: {done.stderr.strip()[-2000:]}")
    return float(done.stdout.split()[-1])


def roofline(name: str, rows: list[dict], kinds: list[str]) -> dict:
    """Each row's GFLOP/s and share of the peak (medians over the rounds), and the ceiling."""
    vocab = len(set("".join(d2l_text()))) + 1  # the bare model's vocabulary (+ <unk>)
    flops = train_flops_per_token(MODELS[name], vocab)
    peak = statistics.median(row["peak"] for row in rows)
    out = {"flops_per_token": flops, "peak_gflops": peak, "ceiling_tokens_per_s": peak * 1e9 / flops}
    for k in kinds:
        tps = statistics.median(row[k] for row in rows)
        out[k] = {"gflops": tps * flops / 1e9, "of_peak": tps * flops / 1e9 / peak,
                  "ceiling_over": peak * 1e9 / flops / tps}
    return out


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        name = args.configs
        if args.worker == "peak":
            print(peak_worker())
        else:
            print(d2l_worker(args.d2l, args.steps) if args.worker == "d2l"
                  else bare_worker(name, args.steps))
        return
    names = [c.strip() for c in args.configs.split(",")]
    load_before = os.getloadavg()[0]
    results = []
    with tempfile.TemporaryDirectory(prefix="bench_baselines-") as tmp:
        env = dict(os.environ, PYTHONPATH=str(REPO), CHARLM_RUNS_DIR=str(Path(tmp) / "runs"),
                   CHARLM_KERNEL_DIR=str(Path(tmp) / "kernels"),
                   CHARLM_DATA_DIR=str(Path(tmp) / "data"))
        if "CHARLM_MIRROR" not in os.environ and SHARED.is_dir():
            env["CHARLM_MIRROR"] = str(SHARED)
        for name in names:
            kinds = ["charlm", "bare"] + (["d2l"] if name == "seeds" and args.d2l else []) + ["peak"]
            charlm_run(name, args, env, Path(tmp))  # untimed: the kernel's build, page cache
            rows = []
            for r in range(args.rounds):
                order = kinds if r % 2 == 0 else kinds[::-1]
                rows.append({k: charlm_run(name, args, env, Path(tmp)) if k == "charlm"
                             else worker_run(k, name, args, env) for k in order})
            entry = {"config": name, "rounds": rows}
            for k in kinds[1:-1]:
                ratios = [row["charlm"] / row[k] for row in rows]
                entry[f"vs_{k}"] = {"median": statistics.median(ratios), "min": min(ratios),
                                    "max": max(ratios)}
            entry["roofline"] = roofline(name, rows, kinds[:-1])
            results.append(entry)
    report = {"command": "python scripts/bench_baselines.py " + shlex.join(sys.argv[1:]),
              "cpu": cpu_name(), "cores": os.cpu_count(), "load_before": load_before,
              "load_after": os.getloadavg()[0],
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "results": results}
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(f"`{report['command']}`  \n{report['cpu']}, {report['cores']} cores; load average "
          f"before/after {load_before:.2f} / {report['load_after']:.2f}; {report['date']}\n")
    print("| config | baseline | charlm tok/s (rounds) | baseline tok/s (rounds) | charlm / baseline, median (min-max) |")
    print("|---|---|---:|---:|---:|")
    for e in results:
        for k in [k[3:] for k in e if k.startswith("vs_")]:
            c = ", ".join(f"{row['charlm']:,.0f}" for row in e["rounds"])
            b = ", ".join(f"{row[k]:,.0f}" for row in e["rounds"])
            v = e[f"vs_{k}"]
            print(f"| {e['config']} | {k} | {c} | {b} | {v['median']:.2f}x ({v['min']:.2f}-{v['max']:.2f}) |")
    print("\n| config | products per token | peak GFLOP/s | ceiling tok/s | row | GFLOP/s | of peak | ceiling / row |")
    print("|---|---:|---:|---:|---|---:|---:|---:|")
    for e in results:
        r = e["roofline"]
        for k in [k for k in r if isinstance(r[k], dict)]:
            print(f"| {e['config']} | {r['flops_per_token'] / 1e6:.2f} MFLOP | {r['peak_gflops']:.0f} | "
                  f"{r['ceiling_tokens_per_s']:,.0f} | {k} | {r[k]['gflops']:.0f} | "
                  f"{r[k]['of_peak']:.0%} | {r[k]['ceiling_over']:.2f}x |")


if __name__ == "__main__":
    main()
