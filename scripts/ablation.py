"""What each training technique adds, in equal time: the ablation table of docs/BENCHMARKS.md.

    python scripts/ablation.py [--rows timemachine,shakespeare] [--arms base,locked,...]
        [--arm NAME="--option value ..."] [--config ROW=FILE] [--seeds 0,1,2] [--budget-scale 1]
        [--out-dir runs/ablation] [--dynamic-args "..."] [--quiet] [--json]
        [--record FILE] [--table FILE[,FILE]] [--evaluate-dirs DIR[,DIR]]

Each arm is the row's shipped config (scripts/quality.py's rows: The Time Machine 120 s, Tiny
Shakespeare 240 s), or the file `--config ROW=FILE` names, plus a few `charlm train` options; every arm trains for the row's time
budget with each seed, then its best checkpoint is evaluated exactly, static and dynamic (one
`charlm eval perplexity --dynamic`). The table gives the mean and spread (sample standard
deviation) over the seeds, the difference of each arm's static mean from the base arm's, the
steps it managed and its tokens/s. The arms below are the candidates to tune from; `--arm`
adds one (or replaces one of the same name).

Seeds can be added in several sittings: `--record FILE` appends each finished run (its figures
and options) to a JSON-lines file as soon as it is evaluated, `--table FILE` prints the table
of every run recorded there (grouped by row and arm) without training,
and `--evaluate-dirs DIR` records the runs already in DIR (directories named ROW-ARM-sSEED-STAMP
by this script) by evaluating their best checkpoints again, for runs made before `--record`.

Quality figures do not depend on machine load, but a time budget does: run it on a quiet
machine (2 cores: about 2.5 min per Time Machine run and 4.5 per Tiny Shakespeare run,
evaluation included).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import sys
import time
from pathlib import Path

from quality import (  # scripts/
    ROWS,
    SHARED,
    eval_perplexity,
    machine,
    result_figures,
    summarise,
    train_and_evaluate,
)

# Arms: options on top of the row's config. AWD-LSTM's settings (Merity et al. 2018) scaled to
# these small models and short budgets are the starting points; the ema decays suit runs of
# ~1,000-3,000 steps (an average over the last ~1/(1 - decay) steps).
ARMS = {
    "base": "",
    "locked": "--locked-dropout",
    "input-drop": "--locked-dropout --input-dropout 0.1",
    "embed-drop": "--embed-dropout 0.1",
    "weight-drop": "--weight-drop 0.3",
    "tie": "--tie-weights --embed 256",
    "tie-proj": "--tie-weights",  # embed 32, through a 256 -> 32 projection
    "ema": "--ema 0.995",
    "awd": "--locked-dropout --input-dropout 0.1 --embed-dropout 0.1 --weight-drop 0.3 "
           "--tie-weights --embed 256 --ema 0.995",
    # candidates around the full stack, for the tuning runs
    "awd-wd0.2": "--locked-dropout --input-dropout 0.1 --embed-dropout 0.1 --weight-drop 0.2 "
                 "--tie-weights --embed 256 --ema 0.995",
    "awd-wd0.5": "--locked-dropout --input-dropout 0.1 --embed-dropout 0.1 --weight-drop 0.5 "
                 "--tie-weights --embed 256 --ema 0.995",
    "awd-drop0.3": "--locked-dropout --dropout 0.3 --input-dropout 0.1 --embed-dropout 0.1 "
                   "--weight-drop 0.3 --tie-weights --embed 256 --ema 0.995",
    "awd-ema0.999": "--locked-dropout --input-dropout 0.1 --embed-dropout 0.1 --weight-drop 0.3 "
                    "--tie-weights --embed 256 --ema 0.999",
    "awd-notie": "--locked-dropout --input-dropout 0.1 --embed-dropout 0.1 --weight-drop 0.3 "
                 "--ema 0.995",
}
ABLATION = ("base", "locked", "input-drop", "embed-drop", "weight-drop", "tie", "ema", "awd")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default="timemachine,shakespeare",
                   help="comma-separated rows of scripts/quality.py")
    p.add_argument("--arms", default=",".join(ABLATION),
                   help=f"comma-separated arms (default: the ablation); all: {', '.join(ARMS)}")
    p.add_argument("--arm", action="append", default=[], metavar='NAME="OPTIONS"',
                   help="define an arm (repeatable); it is run even if --arms omits it")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default 0,1,2)")
    p.add_argument("--budget-scale", type=float, default=1.0,
                   help="multiply every time budget (0.05: a quick check of the script)")
    p.add_argument("--config", action="append", default=[], metavar="ROW=FILE",
                   help="the arms of ROW start from this config instead of the row's (repeatable)")
    p.add_argument("--out-dir", default="runs/ablation", help="where the run directories go")
    p.add_argument("--dynamic-args", default="",
                   help="extra options for eval perplexity --dynamic, e.g. '--dynamic-lr 0.002'")
    p.add_argument("--quiet", action="store_true", help="no training progress on stderr")
    p.add_argument("--json", action="store_true", help="print JSON instead of Markdown")
    p.add_argument("--record", metavar="FILE",
                   help="append each finished run to this JSON-lines file")
    p.add_argument("--table", metavar="FILE[,FILE]",
                   help="print the table of the runs recorded in these files; no training")
    p.add_argument("--evaluate-dirs", metavar="DIR[,DIR]",
                   help="evaluate the runs in these directories (made by this script) and "
                        "record them (needs --record); no training")
    args = p.parse_args(argv)
    if args.evaluate_dirs and not args.record:
        p.error("--evaluate-dirs needs --record FILE (where the figures go)")
    arms = dict(ARMS)
    extra = []
    for item in args.arm:
        name, sep, options = item.partition("=")
        if not sep or not name.strip():
            p.error(f'--arm takes NAME="OPTIONS"; got {item!r}')
        arms[name.strip()] = options
        extra.append(name.strip())
    names = [a.strip() for a in args.arms.split(",") if a.strip()]
    names += [a for a in extra if a not in names]
    unknown = [a for a in names if a not in arms]
    if unknown:
        p.error(f"unknown arm(s) {', '.join(unknown)}; choose from {', '.join(arms)} or --arm")
    args.configs = {}
    for item in args.config:
        name, _, path = item.partition("=")
        if name not in ROWS or ROWS[name].gpu or not path:
            p.error(f"--config takes ROW=FILE with ROW one of timemachine, shakespeare; got {item!r}")
        args.configs[name] = path
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    bad = [r for r in rows if r not in ROWS or ROWS[r].gpu]
    if bad:
        p.error(f"unknown row(s) {', '.join(bad)}; choose from timemachine, shakespeare")
    try:
        args.seed_list = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        p.error(f"--seeds takes comma-separated integers; got {args.seeds!r}")
    if not args.budget_scale > 0 or not args.seed_list:
        p.error("--budget-scale must be > 0 and --seeds must name at least one seed")
    args.arm_options = {a: shlex.split(arms[a]) for a in names}
    args.row_names = rows
    args.dynamic = True
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    env = dict(os.environ)
    if "CHARLM_MIRROR" not in env and SHARED.is_dir():
        env["CHARLM_MIRROR"] = str(SHARED)
    if args.table:
        results = grouped(read_records(args.table.split(",")))
    elif args.evaluate_dirs:
        results = grouped(evaluate_dirs(args.evaluate_dirs.split(","), args, env))
    else:
        results = []
        for row_name in args.row_names:
            row = ROWS[row_name]
            for arm, options in args.arm_options.items():
                if not args.quiet and not args.json:
                    print(f"== {row_name} / {arm}: {' '.join(options) or '(shipped config)'}",
                          file=sys.stderr, flush=True)
                runs = []
                for seed in args.seed_list:
                    config = args.configs.get(row_name, row.config)
                    run = train_and_evaluate(f"{row_name}-{arm}", row, config, seed, options,
                                             args, env)
                    runs.append(run)
                    record(args.record, row_name, arm, options, {"config": config, **run})
                results.append({"row": row_name, "corpus": row.corpus, "arm": arm,
                                "options": " ".join(options), "runs": runs, **summarise(runs)})
    report = {"budget_scale": args.budget_scale, "machine": machine(None),
              "date": time.strftime("%Y-%m-%d %H:%M %Z"), "results": results}
    print(json.dumps(report, indent=2) if args.json else markdown(report))
    return 1 if any("error" in r for res in results for r in res["runs"]) else 0


def record(path: str | None, row: str, arm: str, options: list[str], run: dict) -> dict:
    """Append one run (finished or not) to the JSON-lines file `path`, if one is named."""
    entry = {"row": row, "arm": arm, "options": " ".join(options), **run}
    if path:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(entry) + "\n")
    return entry


def read_records(paths: list[str]) -> list[dict]:
    entries = []
    for path in paths:
        with open(path, encoding="utf-8") as f:
            entries += [json.loads(line) for line in f if line.strip()]
    return entries


def grouped(entries: list[dict]) -> list[dict]:
    """One result per (row, arm), summarised over its runs: rows and arms in the order of ROWS and
    ARMS, arms defined by --arm after them in order of appearance."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for e in entries:
        groups.setdefault((e["row"], e["arm"]), []).append(e)
    seen = {k: i for i, k in enumerate(groups)}  # (list.sort empties the list it sorts)
    arms = list(ARMS)
    order = sorted(groups, key=lambda k: (list(ROWS).index(k[0]),
                                          arms.index(k[1]) if k[1] in arms else len(arms) + seen[k]))
    return [{"row": row, "corpus": ROWS[row].corpus, "arm": arm, "options": groups[row, arm][0]["options"],
             "runs": groups[row, arm], **summarise(groups[row, arm])} for row, arm in order]


def evaluate_dirs(parents: list[str], args, env: dict) -> list[dict]:
    """Record the runs under `parents` (named ROW-ARM-sSEED-STAMP): their training summary from
    metrics.jsonl, their figures from evaluating best.pt again (static and dynamic)."""
    entries = []
    for parent in parents:
        for run_dir in sorted(Path(parent).iterdir(), key=lambda d: d.name[-15:]):
            m = re.fullmatch(r"(?P<row>[a-z]+)-(?P<arm>.+)-s(?P<seed>\d+)-\d{8}-\d{6}",
                             run_dir.name)
            if not m or m["row"] not in ROWS or not run_dir.is_dir():
                continue
            summary = next((json.loads(line) for line in
                            (run_dir / "metrics.jsonl").read_text().splitlines()[::-1]
                            if '"kind": "summary"' in line), None)
            if summary is None:
                continue  # unfinished
            arm = m["arm"]
            run = {"seed": int(m["seed"]), "run_dir": str(run_dir.resolve())}
            try:
                ev = eval_perplexity(run_dir, ROWS[m["row"]].device, env,
                                     args.dynamic_args.split())
                run.update(result_figures(summary, ev))
            except (RuntimeError, json.JSONDecodeError) as exc:
                run["error"] = str(exc)
            options = shlex.split(ARMS.get(arm, "")) if arm in ARMS else ["?"]
            entries.append(record(args.record, m["row"], arm, options, run))
    return entries


def _pm(r: dict, key: str, digits: int = 4) -> str:
    if key not in r:
        return "-"
    return f"{r[key]:.{digits}f} ± {r[key + '_sd']:.{digits}f}" if len(r["seeds"]) > 1 else \
        f"{r[key]:.{digits}f}"


def markdown(report: dict) -> str:
    lines = [f"{report['machine']}, {report['date']}, budgets x{report['budget_scale']:g}", "",
             "| corpus | arm | options | seeds (finished) | static nats/char | vs base | "
             "perplexity | dynamic nats/char | dynamic gain | steps | tokens/s |",
             "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    base = {r["row"]: r.get("nats_per_char") for r in report["results"] if r["arm"] == "base"}
    for r in report["results"]:
        delta = "-"
        if r.get("nats_per_char") is not None and base.get(r["row"]) is not None:
            delta = f"{r['nats_per_char'] - base[r['row']]:+.4f}"
        gain = f"{r['dynamic_gain']:.4f}" if "dynamic_gain" in r else "-"
        steps = f"{r['steps']:,.0f}" if "steps" in r else "-"
        speed = f"{r['tokens_per_s']:,.0f}" if "tokens_per_s" in r else "-"
        seeds = f"{','.join(map(str, r['seeds']))} ({r['finished']})"
        lines.append(f"| {r['corpus']} | {r['arm']} | {r['options'] or '-'} | {seeds} | "
                     f"{_pm(r, 'nats_per_char')} | {delta} | {_pm(r, 'perplexity')} | "
                     f"{_pm(r, 'dynamic_nats_per_char')} | {gain} | {steps} | {speed} |")
    errors = [f"{res['row']}/{res['arm']} seed {r['seed']}: {r['error']}"
              for res in report["results"] for r in res["runs"] if "error" in r]
    return "\n".join(lines + ([""] + errors if errors else []))


if __name__ == "__main__":
    sys.exit(main())
