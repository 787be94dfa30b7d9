"""Benchmark: tokens/s with 1 and 2 (or N) CPU threads, on a quiet machine and beside busy ones.

    python scripts/bench_threads.py [--configs default,shakespeare-gru,d2l-gru,d2l-lstm,d2l-rnn]
        [--variants 1,2,2:GOMP_SPINCOUNT=300000,auto] [--loads quiet,busy,pinned] [--seconds 15]
        [--repeats 3] [--json]

For each config (configs/<name>.toml; `default` is the built-in default config), each variant
and each load, a fresh Python process builds the model and batches the trainer would (on the
CPU) and measures, each for --seconds after a warm-up:

* train:  full training steps (forward, loss, backward, clip, optimizer), tokens/s;
* eval:   the trainer's validation (corpus_nll in --batch-size streams), tokens/s;
* eval-1: `charlm eval perplexity`'s exact pass (one stream, 512-character windows), chars/s.

Variants: a thread count (`torch.set_num_threads(N)`) or `auto` (what charlm does: its
ThreadChooser times 1 and one-per-core during the training steps and keeps the faster; the
trainer's validation then uses that count; eval-1 times both counts over its windows the same way), optionally with settings for the OpenMP runtime after a
colon, e.g. `2:GOMP_SPINCOUNT=0;OMP_PROC_BIND=true`. Every variant runs with charlm's own
OpenMP setting (charlm.system.openmp: GOMP_SPINCOUNT=1000 where another task wants a CPU as the
child starts, libgomp's own 300,000 on a quiet machine) unless it gives one: `2:GOMP_SPINCOUNT=300000` is torch's default behaviour.

Loads: `quiet` is the machine as it is (run it on a quiet machine: nothing else running);
`busy` starts one busy process per core (a pure-Python loop, at normal priority) for the length
of each measurement and stops it after: the "busy neighbour" of issue 20; `pinned` the same,
each held to its own core. (Unpinned, the scheduler sometimes stacks both busy processes on one
core for many seconds and leaves charlm the other: runs then differ 1.5-2x by luck.) The rounds repeat
--repeats times, the variants interleaved within a round; the table gives medians and, per
variant, busy / quiet. Target (issue 20): with its own choice (`auto`), charlm loses at most 2x
to the busy neighbours (busy / quiet >= 0.5) and keeps its quiet-machine speed (auto quiet >=
the best fixed count quiet, within noise).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchlib import cpu_name  # scripts/, beside this file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from charlm.system import openmp  # noqa: E402  (no torch: cheap)

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("CHARLM_SHARED_DATA") or REPO.parent / "shared" / "data")
WHAT = ("train", "eval", "eval-1")


def _spin(deadline: float, cpu: int | None = None) -> None:
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})
    while time.time() < deadline:
        pass


class BusyNeighbours:
    """One busy process per core until `seconds` have passed (or stop() is called); `pinned`:
    each held to its own core, so the scheduler cannot stack two on one core."""

    def __init__(self, seconds: float, pinned: bool = False):
        deadline = time.time() + seconds
        ctx = multiprocessing.get_context("spawn")
        cpus = sorted(os.sched_getaffinity(0)) if pinned else [None] * (os.cpu_count() or 1)
        self.procs = [ctx.Process(target=_spin, args=(deadline, cpu), daemon=True)
                      for cpu in cpus]
        for p in self.procs:
            p.start()

    def stop(self) -> None:
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            p.join(5)


def child(config: str, variant: str, seconds: float) -> dict:
    """Measure one (config, variant) in this process; the variant's env is already set."""
    from contextlib import nullcontext

    from charlm.system.threads import threads_for, use_threads
    from charlm.inference.evaluate import corpus_nll
    from charlm.config.build import build_config
    from charlm.config.file import load_config_file
    from charlm.system.threads import ThreadChooser
    from charlm.training.trainer import Trainer

    file = {} if config == "default" else load_config_file(REPO / "configs" / f"{config}.toml")
    with tempfile.TemporaryDirectory() as tmp:
        cfg = build_config(file, {"device": "cpu", "out": str(Path(tmp) / "run"),
                                  "time_budget": "0", "epochs": 0, "max_steps": 0})
        trainer = Trainer(cfg)
    model, data = trainer.model, trainer.data
    batches, it = [], iter(trainer.batches)
    while len(batches) < 50:
        try:
            X, Y = next(it)
        except StopIteration:
            it = iter(trainer.batches)
            continue
        batches.append((X, Y))
    count = variant.split(":")[0]
    tokens = cfg.batch_size * cfg.num_steps

    def threads(kind: str) -> int:
        if count != "auto":
            return int(count)
        return threads_for("stream" if kind == "eval-1" else "train", cfg.hidden, cfg.batch_size)

    def timed(run, unit: int) -> tuple[float, int]:
        run()  # warm-up
        began, done = time.perf_counter(), 0
        while time.perf_counter() - began < seconds:
            run()
            done += unit
        return done / (time.perf_counter() - began), done

    result = {}
    # auto: the trainer's own chooser, timing both counts every 200 steps (charlm.training.threads)
    chooser = ThreadChooser.of(0, cfg.hidden, cfg.batch_size, True) if count == "auto" else None
    use_threads(threads("train"))
    state = {"i": 0, "h": None}

    def step():
        X, Y = batches[state["i"] % len(batches)]
        state["i"] += 1
        with chooser.step() if chooser else nullcontext():
            loss, h = trainer.train_step(X, Y, state["h"] if cfg.sampling == "sequential" else None)
        state["h"] = tuple(s.detach() for s in h) if isinstance(h, tuple) else h.detach()

    rate = timed(step, tokens)[0]
    result["train"] = {"threads": f"{chooser.best} (chosen)" if chooser else threads("train"),
                       "rate": rate}
    part = data.val[: 50_000]
    use_threads(chooser.best if chooser else threads("eval"))  # the trainer evaluates likewise
    result["eval"] = {"threads": chooser.best if chooser else threads("eval"), "rate": timed(
        lambda: corpus_nll(model, part, cfg.batch_size, cfg.num_steps), part.numel() - 1)[0]}
    one = data.val[: 4_000]
    # auto: eval perplexity's own chooser, timing both counts over its windows (one chooser
    # across the repeated passes here, as over one long split)
    stream = ThreadChooser.for_stream("cpu", cfg.hidden) if count == "auto" else None
    use_threads(stream.counts[0] if stream else threads("eval-1"))
    rate = timed(lambda: corpus_nll(model, one, 1, 512, threads=stream), one.numel() - 1)[0]
    result["eval-1"] = {"threads": f"{stream.best} (chosen)" if stream and len(stream.counts) > 1
                        else threads("eval-1"), "rate": rate}
    model.train()
    return result


def run_child(config: str, variant: str, seconds: float) -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.setdefault("CHARLM_MIRROR", str(SHARED))
    spins = openmp.spin_count(env)  # as `charlm` itself decides (charlm.cli.app), now
    if spins is not None:
        env["GOMP_SPINCOUNT"] = spins
    for setting in (variant.split(":", 1)[1].split(";") if ":" in variant else []):
        key, _, value = setting.partition("=")
        env[key] = value
    done = subprocess.run([sys.executable, __file__, "--child", config, variant,
                           "--seconds", str(seconds)], capture_output=True, text=True, env=env,
                          timeout=seconds * 12 + 300, cwd=REPO)
    if done.returncode:
        raise SystemExit(f"{config} {variant} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default="default,shakespeare-gru,d2l-gru,d2l-lstm,d2l-rnn")
    p.add_argument("--variants", default="1,2,2:GOMP_SPINCOUNT=300000,auto")
    p.add_argument("--loads", default="quiet,busy")
    p.add_argument("--seconds", type=float, default=15.0, help="per measurement")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", action="store_true")
    p.add_argument("--child", nargs=2, metavar=("CONFIG", "VARIANT"), help=argparse.SUPPRESS)
    opts = p.parse_args(argv)
    if opts.child:
        print(json.dumps(child(*opts.child, opts.seconds)))
        return 0
    configs, variants = opts.configs.split(","), opts.variants.split(",")
    got: dict = {}  # (config, variant, load, what) -> [rates]
    chosen: dict = {}  # (config, variant, what) -> threads used
    load_before = os.getloadavg()[0]
    for round_ in range(opts.repeats):
        for load in opts.loads.split(","):
            for config in configs:
                for variant in variants:
                    # a measurement is 3 x (warm-up + seconds) plus start-up: the neighbours
                    # stop on their own after that, whatever happens here
                    busy = (BusyNeighbours(3 * opts.seconds + 120, pinned=load == "pinned")
                            if load in ("busy", "pinned") else None)
                    try:
                        r = run_child(config, variant, opts.seconds)
                    finally:
                        if busy:
                            busy.stop()
                    for what in WHAT:
                        got.setdefault((config, variant, load, what), []).append(r[what]["rate"])
                        chosen[(config, variant, what)] = r[what]["threads"]
                    print(f"round {round_ + 1} {load} {config} {variant}: " + ", ".join(
                        f"{w} {r[w]['rate']:,.0f}" for w in WHAT), file=sys.stderr)
    rows = []
    for config in configs:
        for what in WHAT:
            for variant in variants:
                med = {load: statistics.median(got[(config, variant, load, what)])
                       for load in opts.loads.split(",")}
                rows.append({"config": config, "what": what, "variant": variant,
                             "threads": chosen[(config, variant, what)], **med,
                             **{f"{load}/quiet": med[load] / med["quiet"] for load in med
                                if load != "quiet" and "quiet" in med}})
    machine = {"cpu": cpu_name(), "cores": os.cpu_count(), "load_before": load_before,
               "load_after": os.getloadavg()[0],
               "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    if opts.json:
        print(json.dumps({"machine": machine, "rows": rows}, indent=2))
        return 0
    print(f"Machine: {machine['cpu']}, {machine['cores']} cores; load average "
          f"{machine['load_before']:.2f} before, {machine['load_after']:.2f} after; "
          f"{machine['date']}; medians of {opts.repeats} rounds of {opts.seconds:g} s\n")
    loads = opts.loads.split(",")
    ratios = [f"{load}/quiet" for load in loads if load != "quiet" and "quiet" in loads]
    print("| config | measured | variant | threads | " + " | ".join(
        f"{load} tok/s" for load in loads) + "".join(f" | {r.replace('/', ' / ')}"
                                                     for r in ratios) + " |")
    print("|---|---|---|---:|" + "---:|" * (len(loads) + len(ratios)))
    for r in rows:
        print(f"| {r['config']} | {r['what']} | {r['variant']} | {r['threads']} | " + " | ".join(
            f"{r[load]:,.0f}" for load in loads) + "".join(f" | {r[x]:.2f}" for x in ratios)
            + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
