"""Reproduce the quality rows of docs/BENCHMARKS.md: train a shipped config for its time budget,
then measure the exact validation perplexity of the best checkpoint, static and dynamic.

    python scripts/quality.py [--rows shakespeare,timemachine] [--gpu] [--budget-scale 1]
        [--seeds 0,1,2] [--no-dynamic] [--out-dir runs/quality] [--config ROW=FILE]
        [--quiet] [--json]

Per row and seed, training in a subprocess (its own process, so its time budget and threads
are a user's), then the evaluation through the Python API, which gives `charlm eval perplexity`'s
figures (the tests hold them equal):

    charlm train --config FILE --time-budget B --seed S --out DIR --json
    charlm.load(DIR, device).perplexity(split="val", dynamic=True)          (DIR's best.pt)

The second gives both figures: the static one and dynamic evaluation's (Krause et al. 2018,
`--dynamic`; its default settings unless --dynamic-args says otherwise). With several
seeds the table gives each figure's mean and spread (sample standard deviation) over the seeds:
single runs of one config differ by up to 0.1 on a 2-core CPU.

The time budget counts training time only (evaluation pauses excluded), as the trainer's own
--time-budget does. --budget-scale 0.1 makes a quick smoke check of the script: the targets are
then not expected to be met. The reference corpora are read from ../shared/data (relative to the
repository) when that folder exists and CHARLM_MIRROR is unset, so the runs work offline.

Exit status: 1 when a run or evaluation failed, or (at --budget-scale 1) a row missed its target.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from benchlib import cpu_name  # scripts/, beside this file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # charlm from this checkout

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"


@dataclass(frozen=True)
class Row:
    corpus: str
    config: str  # relative to the repository
    budget_s: float
    metric: str  # "nats" (nats/char <= target) or "ppl" (perplexity <= target)
    target: float
    device: str | None = None  # None: the config's own (auto)
    gpu: bool = False  # runs only with --gpu
    dynamic_gain: float = 0.03  # dynamic evaluation: at least this many nats/char below static

    def target_text(self) -> str:
        return f"<= {self.target} nats/char" if self.metric == "nats" else f"ppl <= {self.target}"

    def passed(self, nats: float, ppl: float) -> bool:
        value = nats if self.metric == "nats" else ppl
        return math.isfinite(value) and value <= self.target


ROWS = {
    # targets of issue 16 (before it: Tiny Shakespeare <= 1.50 nats/char, issue 5)
    "shakespeare": Row("Tiny Shakespeare (raw, 65 symbols)", "configs/shakespeare-gru.toml", 240,
                       "nats", 1.42),
    # the best shipped config of the row (issue 28's ablation): the default GRU, wider, more dropout
    "timemachine": Row("The Time Machine (d2l)", "configs/timemachine-gru384.toml", 120, "ppl", 3.6),
    "shakespeare-gpu": Row("Tiny Shakespeare (raw, 65 symbols)", "configs/shakespeare-lstm.toml",
                           600, "nats", 1.38, device="cuda", gpu=True),
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default=None,
                   help=f"comma-separated rows (default: all CPU rows, plus the GPU row with --gpu): "
                        f"{', '.join(ROWS)}")
    p.add_argument("--gpu", action="store_true", help="also run the GPU row (--device cuda)")
    p.add_argument("--budget-scale", type=float, default=1.0,
                   help="multiply every time budget (e.g. 0.1 for a quick check of the script)")
    p.add_argument("--out-dir", default="runs/quality",
                   help="where the run directories go (a fresh <row>-<time> per row)")
    p.add_argument("--config", action="append", default=[], metavar="ROW=FILE",
                   help="train ROW with another config file (repeatable)")
    p.add_argument("--seeds", default="0",
                   help="comma-separated training seeds; several give mean and spread (default 0)")
    p.add_argument("--no-dynamic", dest="dynamic", action="store_false",
                   help="only the static figure (skips dynamic evaluation)")
    p.add_argument("--dynamic-args", default="",
                   help="extra options for eval perplexity --dynamic, e.g. '--dynamic-lr 0.002'")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a training option for every row, e.g. --set weight_drop=0.3 (repeatable)")
    p.add_argument("--quiet", action="store_true", help="no training progress on stderr")
    p.add_argument("--json", action="store_true", help="print JSON instead of a Markdown table")
    args = p.parse_args(argv)
    if not args.budget_scale > 0:
        p.error("--budget-scale must be > 0")
    names = [n.strip() for n in args.rows.split(",") if n.strip()] if args.rows else [
        n for n, r in ROWS.items() if args.gpu or not r.gpu]
    unknown = [n for n in names if n not in ROWS]
    if unknown:
        p.error(f"unknown row(s) {', '.join(unknown)}; choose from {', '.join(ROWS)}")
    skipped = [n for n in names if ROWS[n].gpu and not args.gpu]
    if skipped:
        p.error(f"row(s) {', '.join(skipped)} need --gpu")
    configs = {}
    for item in args.config:
        name, _, path = item.partition("=")
        if name not in ROWS or not path:
            p.error(f"--config takes ROW=FILE with ROW one of {', '.join(ROWS)}; got {item!r}")
        configs[name] = path
    try:
        args.seed_list = [int(x) for x in args.seeds.split(",") if x.strip()]
    except ValueError:
        p.error(f"--seeds takes comma-separated integers; got {args.seeds!r}")
    if not args.seed_list:
        p.error("--seeds needs at least one seed")
    args.options = options_of(args.set, p)
    args.names, args.configs = names, configs
    return args


def options_of(items: list[str], p: argparse.ArgumentParser) -> list[str]:
    """KEY=VALUE pairs as `charlm train` options (true/false: the --flag / --no-flag form)."""
    options = []
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            p.error(f"--set takes KEY=VALUE; got {item!r}")
        flag = "--" + key.strip().replace("_", "-")
        if value.lower() in ("true", "false"):
            options.append(flag if value.lower() == "true" else f"--no-{flag[2:]}")
        else:
            options += [flag, value]
    return options


def machine(device: str | None) -> str:
    if device and device.startswith("cuda"):
        try:
            import torch

            return torch.cuda.get_device_name(0)
        except Exception:  # no CUDA here: the training run will have said so
            return "cuda (unavailable)"
    cpu = cpu_name()
    return f"{cpu}, {os.cpu_count()} cores"


def charlm(args: list[str], env: dict, quiet: bool) -> dict:
    """Run `python -m charlm ARGS` (stdout: JSON); its stderr goes to ours unless quiet."""
    cmd = [sys.executable, "-m", "charlm", *args]
    done = subprocess.run(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE if quiet else None, text=True)
    if done.returncode != 0:
        tail = (done.stderr or "").strip().splitlines()[-1:] if quiet else []
        raise RuntimeError(f"`{' '.join(cmd[2:])}` exited {done.returncode}"
                           + (f": {tail[0]}" if tail else ""))
    return json.loads(done.stdout)


DYNAMIC_ARGS = {"--dynamic-lr": ("dynamic_lr", float), "--dynamic-decay": ("dynamic_decay", float),
                "--dynamic-window": ("dynamic_window", int)}


def dynamic_options(words: list[str]) -> dict:
    """`eval perplexity`'s --dynamic-* options ("--dynamic-lr 0.002", "--dynamic-lr=0.002") as
    `Model.perplexity` keywords."""
    words = [part for word in words for part in word.split("=", 1)]
    if len(words) % 2 or any(w not in DYNAMIC_ARGS for w in words[::2]):
        raise SystemExit(f"--dynamic-args takes {', '.join(DYNAMIC_ARGS)} with values; got "
                         f"{' '.join(words)!r}")
    return {DYNAMIC_ARGS[k][0]: DYNAMIC_ARGS[k][1](v) for k, v in zip(words[::2], words[1::2])}


@contextmanager
def environment(env: dict):
    """os.environ as `env` says (the corpora's mirror) while inside."""
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(env)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def eval_perplexity(run_dir: Path, device: str | None, env: dict,
                    dynamic: list[str] | None = None) -> dict:
    """Exact val perplexity of the run's best checkpoint (`charlm eval perplexity --json`'s
    figures, through charlm.load); with `dynamic` (extra options, maybe none) also dynamic
    evaluation's figure."""
    import charlm
    from charlm.errors import CharlmError

    options = {"dynamic": True, **dynamic_options(dynamic)} if dynamic is not None else {}
    try:
        with environment(env):
            model = charlm.load(run_dir, device=device or "auto")
            return model.perplexity(split="val", **options).to_dict()
    except CharlmError as exc:
        raise RuntimeError(f"evaluating {run_dir}: {exc}") from None


def train_and_evaluate(name: str, row: Row, config: str, seed: int, options: list[str], args,
                       env: dict) -> dict:
    """One training run of `config` (+ `options`) for the row's budget, then its evaluation."""
    budget = row.budget_s * args.budget_scale
    stamp = time.strftime("%Y%m%d-%H%M%S")
    run_dir = (Path(args.out_dir) / f"{name}-s{seed}-{stamp}").resolve()
    train = ["train", "--config", str(REPO / config) if not Path(config).is_absolute() else config,
             "--time-budget", f"{budget:g}s", "--seed", str(seed), *options,
             "--out", str(run_dir), "--json"]
    if row.device:
        train += ["--device", row.device]
    if args.quiet:
        train.append("--quiet")
    result = {"seed": seed, "run_dir": str(run_dir)}
    try:
        summary = charlm(train, env, args.quiet)
        ev = eval_perplexity(run_dir, row.device, env,
                             args.dynamic_args.split() if args.dynamic else None)
    except (RuntimeError, json.JSONDecodeError) as exc:
        return {**result, "error": str(exc)}
    return {**result, **result_figures(summary, ev)}


def result_figures(summary: dict, ev: dict) -> dict:
    """A run's figures from its training summary and its `eval perplexity --json`."""
    out = {"nats_per_char": float(ev["nats_per_char"]), "perplexity": float(ev["perplexity"]),
           "characters": ev["characters"], "steps": summary.get("steps"),
           "train_time_s": summary.get("wall_time_s"),
           # `mean_tokens_per_s` since issue 27 renamed the summary's key
           "tokens_per_s": summary.get("mean_tokens_per_s", summary.get("tokens_per_s")),
           "device": summary.get("device"), "impl": summary.get("impl")}
    if "dynamic" in ev:
        out.update(dynamic_nats_per_char=float(ev["dynamic"]["nats_per_char"]),
                   dynamic_perplexity=float(ev["dynamic"]["perplexity"]),
                   dynamic_settings={k: ev["dynamic"][k] for k in ("lr", "decay", "window")})
    return out


def mean_sd(values: list[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return mean, sd


def summarise(runs: list[dict]) -> dict:
    """Mean and spread of each figure over the runs that finished."""
    done = [r for r in runs if "error" not in r]
    out: dict = {"seeds": [r["seed"] for r in runs], "finished": len(done)}
    for key in ("nats_per_char", "perplexity", "dynamic_nats_per_char", "dynamic_perplexity",
                "steps", "tokens_per_s"):
        values = [r[key] for r in done if r.get(key) is not None]
        if values:
            out[key], out[f"{key}_sd"] = mean_sd([float(v) for v in values])
    if "dynamic_nats_per_char" in out:
        out["dynamic_gain"] = out["nats_per_char"] - out["dynamic_nats_per_char"]
    return out


def run_row(name: str, row: Row, args, env: dict) -> dict:
    config = args.configs.get(name, row.config)
    runs = [train_and_evaluate(name, row, config, seed, args.options, args, env)
            for seed in args.seed_list]
    result = {"row": name, "corpus": row.corpus, "config": config,
              "options": " ".join(args.options), "budget_s": row.budget_s * args.budget_scale,
              "target": row.target_text(), "machine": machine(row.device), "runs": runs,
              **summarise(runs)}
    errors = [r["error"] for r in runs if "error" in r]
    if errors:
        return {**result, "error": errors[0], "passed": False}
    result["passed"] = row.passed(result["nats_per_char"], result["perplexity"])
    if "dynamic_gain" in result:
        result["dynamic_passed"] = result["dynamic_gain"] >= row.dynamic_gain
    return result


def _figure(r: dict, key: str, digits: int = 4) -> str:
    if key not in r:
        return "-"
    spread = f" ± {r[key + '_sd']:.{digits}f}" if len(r["seeds"]) > 1 else ""
    return f"{r[key]:.{digits}f}{spread}"


def markdown(results: list[dict], scale: float) -> str:
    lines = ["| corpus | config | budget | seeds | nats/char | perplexity | target | pass | "
             "dynamic nats/char | dynamic gain (>= 0.03) | machine |",
             "|---|---|---:|---|---:|---:|---|---|---:|---|---|"]
    for r in results:
        budget = f"{r['budget_s']:g} s"
        config = r["config"] + (f" {r['options']}" if r["options"] else "")
        seeds = ",".join(map(str, r["seeds"]))
        if "error" in r:
            lines.append(f"| {r['corpus']} | {config} | {budget} | {seeds} | - | - | "
                         f"{r['target']} | error: {r['error']} | - | - | {r['machine']} |")
            continue
        verdict = "pass" if r["passed"] else "fail"
        gain = "-" if "dynamic_gain" not in r else (
            f"{r['dynamic_gain']:.4f} {'pass' if r['dynamic_passed'] else 'fail'}")
        lines.append(
            f"| {r['corpus']} | {config} | {budget} | {seeds} | {_figure(r, 'nats_per_char')} | "
            f"{_figure(r, 'perplexity')} | {r['target']} | {verdict} | "
            f"{_figure(r, 'dynamic_nats_per_char')} | {gain} | {r['machine']} |"
        )
    if scale != 1:
        lines.append("")
        lines.append(f"Budgets scaled by {scale:g}: a check of the script, the targets are not expected.")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    env = dict(os.environ)
    if "CHARLM_MIRROR" not in env and SHARED.is_dir():
        env["CHARLM_MIRROR"] = str(SHARED)  # the reference corpora, offline
    results = []
    for name in args.names:
        if not args.quiet and not args.json:
            print(f"== {name}: {ROWS[name].corpus}, {ROWS[name].budget_s * args.budget_scale:g} s",
                  file=sys.stderr, flush=True)
        results.append(run_row(name, ROWS[name], args, env))
    if args.json:
        print(json.dumps({"budget_scale": args.budget_scale, "rows": results}, indent=2))
    else:
        print(markdown(results, args.budget_scale))
    if any("error" in r for r in results):
        return 1
    met = all(r["passed"] and r.get("dynamic_passed", True) for r in results)
    return 0 if args.budget_scale != 1 or met else 1


if __name__ == "__main__":
    sys.exit(main())
