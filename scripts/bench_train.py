"""Benchmark: tokens/s of the real trainer against a bare training step on the same model and data.

    python scripts/bench_train.py [--config configs/d2l-gru.toml] [--steps 200] [--chunk 10]
        [--repeats 5] [--impl auto,fused] [--device cpu|cuda] [--cell ...] [--hidden ...] [--json]

* bare:    forward, cross-entropy, zero_grad, backward, clip, optimizer step; nothing else. The
           batches are built beforehand by the trainer's own iterator, as a list of int64 tensors
           on the device; the model and optimizer come from a Trainer built with the same config
           (same construction, same impl). No state is carried (None per batch).
* trainer: a fresh `Trainer(cfg).run()` per repeat, everything included: the batch iterator, the
           lr schedule, state detach/carry, the on-device running loss, logging (metrics.jsonl
           rows, and the display's progress lines rendered by rich into /dev/null), the stop
           checks. Evaluation and checkpoints are pushed beyond the run
           (eval_every/checkpoint_every > max_steps); the evaluation and save that run() does
           after its loop are not timed, nor is the set-up before it.

Interleaving, in one process: `Trainer.step_hook` (called after every step, after its logging) is
used after the first --warmup steps of each run (first-touch allocations, optimizer state) to cut
the run into slices of --chunk steps. At each slice boundary the hook reads the clock, runs
--chunk bare steps of every impl measured (timed separately), and restarts the trainer's slice
clock: trainer, bare, trainer, bare, ... a fraction of a second each, so a change in machine load
falls on both sides alike. Trainer tokens/s = its slices' tokens over their summed time; the same
for bare; the ratio is reported per run (median, min-max over --repeats) and per slice (median).
On CUDA the device is synchronized at each boundary (nowhere else). As a cross-check the
trainer's own clock (summary tokens_per_s, warm-up steps included) is reported with the hook's
time taken off.

The impls given by --impl (e.g. auto,fused) are compared by their bare steps in the same slices.

Prints a Markdown table (or --json) with the machine, torch, threads and load average.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from benchlib import cpu_name  # scripts/, beside this file

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
OVERRIDES = {  # option -> (type, TrainConfig key)
    "cell": str, "hidden": int, "layers": int, "embed": int, "dropout": float,
    "batch_size": int, "num_steps": int, "sampling": str, "optimizer": str, "lr": float,
    "clip": float, "device": str, "precision": str, "corpus": str, "max_tokens": int,
    "log_every": int,
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(REPO / "configs" / "d2l-gru.toml"),
                   help="TOML config (default configs/d2l-gru.toml)")
    for key, kind in OVERRIDES.items():
        p.add_argument(f"--{key.replace('_', '-')}", type=kind, default=None, dest=key)
    p.add_argument("--impl", default=None,
                   help="implementation(s), comma-separated, measured interleaved: e.g. auto,fused")
    p.add_argument("--steps", type=int, default=200, help="timed steps per measurement")
    p.add_argument("--warmup", type=int, default=20, help="untimed steps before each measurement")
    p.add_argument("--chunk", type=int, default=10,
                   help="steps per slice: trainer and bare alternate every CHUNK steps")
    p.add_argument("--repeats", type=int, default=5, help="fresh trainer runs per impl")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
    p.add_argument("--json", action="store_true", help="print JSON instead of Markdown")
    args = p.parse_args(argv)
    if min(args.steps, args.warmup, args.repeats, args.chunk) < 1:
        p.error("--steps, --warmup, --chunk and --repeats must be >= 1")
    args.steps = -(-args.steps // args.chunk) * args.chunk  # whole slices
    return args


def machine() -> dict:
    import torch

    cpu = cpu_name()
    info = {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "python": platform.python_version()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


class Side:
    """One impl: its config, a bare model/optimizer, and the pre-built batches."""

    def __init__(self, base: dict, impl: str, steps: int, warmup: int, root: Path):
        import torch

        from charlm.config.build import build_config
        from charlm.training.optim import make_optimizer
        from charlm.training.trainer import Trainer

        self.impl, self.root = impl, root
        self.steps, self.warmup = steps, warmup
        values = dict(base, impl=impl)
        self.cfg = build_config({}, values)
        self.runs = 0
        ref = Trainer(self.cfg)  # built like the trainer's own: same model, same data
        self.device = ref.device
        self.model = ref.model.train()
        self.optimizer = make_optimizer(self.cfg.optimizer, self.model.parameters(), self.cfg.lr,
                                        self.cfg.weight_decay)
        self.resolved_impl = ref.model_config.impl
        batches, it = [], iter(ref.batches)
        while len(batches) < steps:
            try:
                X, Y = next(it)
            except StopIteration:  # an epoch ended: the iterator moves on to the next one
                it = iter(ref.batches)
                continue
            batches.append((X.long().contiguous(), Y.long().contiguous()))
        self.batches = batches
        self.vocab = len(ref.data.vocab)
        self.batch_tokens = self.cfg.batch_size * self.cfg.num_steps
        self.autocast = ref.autocast
        self.sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
        self.cursor = 0  # next pre-built batch for the bare loop
        self.others: list[Side] = [self]  # every impl measured (set by measure())
        self.slots: list[dict[str, float]] = []  # bare seconds per impl, one dict per slice
        self.results: list[dict] = []  # one per trainer run

    def bare(self, n: int) -> float:
        """n bare steps over the pre-built batches; seconds (the device synced at both ends)."""
        import torch
        import torch.nn.functional as F

        model, opt, clip, V = self.model, self.optimizer, self.cfg.clip, self.vocab
        params = list(model.parameters())
        batches = self.batches
        self.sync()
        t0 = time.perf_counter()
        for _ in range(n):
            X, Y = batches[self.cursor]
            self.cursor = (self.cursor + 1) % len(batches)
            with self.autocast():
                logits, _ = model(X)
                loss = F.cross_entropy(logits.reshape(-1, V).float(), Y.reshape(-1))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if clip > 0:
                torch.nn.utils.clip_grad_norm_(params, clip)
            opt.step()
        self.sync()
        return time.perf_counter() - t0

    def run(self, chunk: int) -> dict:
        """One fresh Trainer.run() of warmup + steps steps, bare chunks interleaved via its hook.

        After the warm-up, every `chunk` trainer steps the hook stops the trainer's clock, runs
        `chunk` bare steps, and restarts it: trainer, bare, trainer, bare, ... in ~chunk-step
        slices, so both see the same machine load."""
        from rich.console import Console

        from charlm.config.build import build_config
        from charlm.training.display import TrainDisplay
        from charlm.training.trainer import Trainer

        self.runs += 1
        out = self.root / f"run-{self.impl}-{self.runs}"
        cfg = build_config({}, dict(self.cfg.to_dict(), out=str(out)))
        sink = open(os.devnull, "w", encoding="utf-8")
        display = TrainDisplay(enabled=True, console=Console(file=sink, force_terminal=False))
        trainer = Trainer(cfg, display=display)
        first, last, sync = self.warmup, self.warmup + self.steps, self.sync
        pairs: list[tuple[float, float]] = []  # (trainer seconds, bare seconds) per slice
        clock = {"mark": None, "in_hook": 0.0}

        def hook(t) -> None:
            step = t.loop.step
            if step < first or (step - first) % chunk:
                return
            sync()
            now = time.perf_counter()
            if clock["mark"] is None:  # the trainer's warm-up just ended
                self.bare(chunk)  # re-warm the bare model (caches) before the first slice
            else:
                pairs.append((now - clock["mark"], self.bare(chunk)))
                # the other impls' bare steps in the same slot: their ratio to this one is
                # measured under the same load too
                self.slots.append({o.impl: o.bare(chunk) if o is not self else pairs[-1][1]
                                   for o in self.others})
            after = time.perf_counter()
            if step < last:  # the last call comes after the trainer's clock stopped
                clock["in_hook"] += after - now
            clock["mark"] = after

        trainer.step_hook = hook
        try:
            summary = trainer.run()
        finally:
            sink.close()
        shutil.rmtree(out, ignore_errors=True)
        tokens = chunk * self.batch_tokens
        t_sum, b_sum = sum(p[0] for p in pairs), sum(p[1] for p in pairs)
        # the trainer's own clock (loop.elapsed = tokens / its tokens_per_s) ran on through the
        # hook, so the time spent in there is taken off
        seen = summary["steps"] * self.batch_tokens
        own_elapsed = seen / summary["mean_tokens_per_s"] - clock["in_hook"]
        return {
            "trainer_tps": len(pairs) * tokens / t_sum,
            "bare_tps": len(pairs) * tokens / b_sum,
            "pair_ratios": [b / t for t, b in pairs],  # trainer tok/s over bare tok/s
            "own_tps": seen / own_elapsed,
        }


def base_values(args) -> dict:
    from charlm.config.file import load_config_file

    values = load_config_file(args.config)
    for key in OVERRIDES:
        if getattr(args, key) is not None:
            values[key] = getattr(args, key)
    total = args.warmup + args.steps
    values.update(max_steps=total, epochs=0, time_budget="0",
                  eval_every=total + 1, checkpoint_every=total + 1)
    return values


def measure(args) -> dict:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    impls = [s.strip() for s in (args.impl or "").split(",") if s.strip()]
    base = base_values(args)
    if not impls:
        impls = [base.get("impl", "auto")]
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench_train-") as tmp:
        root = Path(tmp)
        os.environ["CHARLM_RUNS_DIR"] = str(root / "runs")  # leave the user's runs/latest alone
        sides = [Side(base, impl, args.steps, args.warmup, root) for impl in impls]
        for side in sides:
            side.others = sides
        for side in sides:  # warm-up: kernels, allocator, caches
            side.bare(args.warmup)
        for _ in range(args.repeats):
            for side in sides:
                side.results.append(side.run(args.chunk))
    load_after = os.getloadavg()
    med = statistics.median
    results = []
    for side in sides:
        runs = side.results
        ratios = [r["trainer_tps"] / r["bare_tps"] for r in runs]
        pair_ratios = [x for r in runs for x in r["pair_ratios"]]
        results.append({
            "impl": side.impl, "resolved_impl": side.resolved_impl,
            "bare_tokens_per_s": med(r["bare_tps"] for r in runs),
            "trainer_tokens_per_s": med(r["trainer_tps"] for r in runs),
            "trainer_own_tokens_per_s": med(r["own_tps"] for r in runs),
            "ratio_median": med(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios),
            "pair_ratio_median": med(pair_ratios), "pairs": len(pair_ratios),
            "runs": [{k: v for k, v in r.items() if k != "pair_ratios"} for r in runs],
        })
    slots = [slot for side in sides for slot in side.slots]
    first = sides[0].impl
    versus = {o.impl: med(slot[first] / slot[o.impl] for slot in slots) for o in sides[1:]}
    cfg = sides[0].cfg
    return {
        "command": "python scripts/bench_train.py " + " ".join(sys.argv[1:]),
        "config": os.path.relpath(args.config, REPO) if Path(args.config).is_absolute() else args.config,
        "model": f"{cfg.cell} {cfg.layers}x{cfg.hidden}, embed {cfg.embed or 'one-hot'}, "
                 f"batch {cfg.batch_size}x{cfg.num_steps}, {cfg.optimizer} lr {cfg.lr}, clip {cfg.clip}",
        "device": str(sides[0].device), "steps": args.steps, "warmup": args.warmup,
        "chunk": args.chunk, "repeats": args.repeats, "machine": machine(),
        "loadavg_before": load_before, "loadavg_after": load_after, "results": results,
        "bare_speed_vs_first_impl": versus, "slots": len(slots),
    }


def markdown(report: dict) -> str:
    m = report["machine"]
    where = m.get("gpu") if report["device"].startswith("cuda") else f"{m['cpu']}, {m['threads']} threads"
    lines = [
        f"`{report['command']}`  ",
        f"{report['config']}: {report['model']}; device {report['device']} ({where}); "
        f"torch {m['torch']}; {report['repeats']} repeats x {report['steps']} steps "
        f"(+{report['warmup']} warm-up); load average before/after "
        f"{report['loadavg_before'][0]:.2f} / {report['loadavg_after'][0]:.2f}",
        "",
        "| impl | bare tokens/s | trainer tokens/s | trainer / bare: median of runs (min-max) "
        "| median of slices | trainer's own clock |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in report["results"]:
        name = r["impl"] if r["impl"] == r["resolved_impl"] else f"{r['impl']} ({r['resolved_impl']})"
        lines.append(
            f"| {name} | {r['bare_tokens_per_s']:,.0f} | {r['trainer_tokens_per_s']:,.0f} | "
            f"{r['ratio_median']:.3f} ({r['ratio_min']:.3f}-{r['ratio_max']:.3f}) | "
            f"{r['pair_ratio_median']:.3f} (n={r['pairs']}) | {r['trainer_own_tokens_per_s']:,.0f} |"
        )
    first = report["results"][0]["impl"]
    for impl, ratio in report["bare_speed_vs_first_impl"].items():
        lines.append("")
        lines.append(f"{impl} vs {first}: {ratio:.3f}x the tokens/s (bare steps, median of "
                     f"{report['slots']} interleaved slices)")
    return "\n".join(lines)


def main(argv=None) -> None:
    args = parse_args(argv)
    if "CHARLM_MIRROR" not in os.environ and SHARED.is_dir():
        os.environ["CHARLM_MIRROR"] = str(SHARED)  # the corpora, offline
    sys.path.insert(0, str(REPO))
    report = measure(args)
    print(json.dumps(report, indent=2) if args.json else markdown(report))


if __name__ == "__main__":
    main()
