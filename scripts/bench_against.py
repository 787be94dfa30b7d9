"""Benchmark guard: this working tree against another revision, whole `charlm train` processes
run in interleaved pairs on the same config.

    python scripts/bench_against.py --against REV [--configs seeds,default] [--pairs 5]
        [--steps 400] [--env K=V] [--against-env K=V] [--args "..."] [--against-args "..."]
        [--json]

Run it before merging a change to the kernel, the model, the trainer or the thread policy:
`--against main` (or the commit the branch started from) says whether the change cost speed.

* REV is checked out as a detached git worktree in a temporary folder (removed at the end;
  `--worktree DIR` reuses or keeps one); "." means this working tree itself, which with
  --env/--against-env compares two settings of one version.
* Each version gets its own CHARLM_KERNEL_DIR (a kernel built from one source never serves the
  other), CHARLM_DATA_DIR and CHARLM_RUNS_DIR, all in the temporary folder; the corpora come
  from ../shared/data (CHARLM_MIRROR) when that folder exists. Nothing is written to runs/.
* One untimed run of each version first (kernel build, page cache), then --pairs pairs; the
  order within a pair alternates (this, REV / REV, this, ...) so a drift in load falls on both.
* Per pair: wall time of the whole process (start to exit: imports, data, training, the final
  evaluation), the user CPU seconds, and the trainer's own tokens/s (its --json summary).
  Reported: this / REV per pair, median (min-max). Wall ratio < 1 and tokens/s ratio > 1 mean
  this tree is faster. The load average is printed before and after: run on a quiet machine, at
  normal priority, and repeat when the load moved.

Named configs: `seeds` = configs/d2l-gru.toml (the d2l book's GRU: one-hot, hidden 256, batch
32 x 35, SGD lr 1, clip 1, first 10,000 tokens, d2l preprocessing); `default` = charlm's
defaults (configs/timemachine-gru.toml: 2 x 256 GRU, embedding 32, AdamW). Anything else is
taken as a path to a TOML config. Both run with --device cpu.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchlib import cpu_name  # scripts/, beside this file

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
NAMED = {"seeds": "configs/d2l-gru.toml", "default": None}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--against", required=True, help="git revision to compare with ('.': this tree)")
    p.add_argument("--configs", default="seeds,default",
                   help="comma-separated: seeds, default, or paths to TOML configs")
    p.add_argument("--pairs", type=int, default=5, help="interleaved pairs per config")
    p.add_argument("--steps", type=int, default=400, help="training steps per process")
    p.add_argument("--args", default="", help="extra charlm train arguments for this tree")
    p.add_argument("--against-args", default="", help="extra charlm train arguments for REV")
    p.add_argument("--env", action="append", default=[], metavar="K=V",
                   help="environment for this tree's processes (repeatable)")
    p.add_argument("--against-env", action="append", default=[], metavar="K=V",
                   help="environment for REV's processes (repeatable)")
    p.add_argument("--worktree", default=None, help="folder for REV's worktree (kept afterwards)")
    p.add_argument("--json", action="store_true", help="print JSON instead of Markdown")
    args = p.parse_args(argv)
    if args.pairs < 1 or args.steps < 1:
        p.error("--pairs and --steps must be >= 1")
    for kv in args.env + args.against_env:
        if "=" not in kv:
            p.error(f"--env/--against-env take K=V, not {kv!r}")
    return args


def git(*cmd: str) -> str:
    return subprocess.run(["git", "-C", str(REPO), *cmd], check=True, capture_output=True,
                          text=True).stdout.strip()


class Version:
    """One side of the comparison: a source tree, its environment and extra arguments."""

    def __init__(self, name: str, root: Path, env: list[str], extra: str, tmp: Path):
        self.name, self.root = name, root
        scratch = tmp / name
        self.env = dict(os.environ)
        self.env.pop("CHARLM_DEBUG", None)
        self.env.update(
            PYTHONPATH=str(root), CHARLM_KERNEL_DIR=str(scratch / "kernels"),
            CHARLM_DATA_DIR=str(scratch / "data"), CHARLM_RUNS_DIR=str(scratch / "runs"),
        )
        if "CHARLM_MIRROR" not in os.environ and SHARED.is_dir():
            self.env["CHARLM_MIRROR"] = str(SHARED)
        self.env.update(kv.split("=", 1) for kv in env)
        self.extra = shlex.split(extra)
        self.cwd = scratch
        scratch.mkdir(parents=True, exist_ok=True)

    def run(self, config: str | None, steps: int) -> dict:
        """One whole `charlm train` process; wall seconds, user CPU seconds, tokens/s."""
        cmd = [sys.executable, "-m", "charlm", "train", "--device", "cpu", "--max-steps", str(steps),
               "--epochs", "0", "--time-budget", "0", "--eval-every", str(steps + 1),
               "--checkpoint-every", str(steps + 1), "--quiet", "--json", *self.extra]
        if config:
            cmd[4:4] = ["--config", str(REPO / config if not Path(config).is_absolute() else config)]
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=self.cwd, env=self.env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        out, err = proc.communicate()
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            raise SystemExit(f"bench_against: {self.name} failed (exit {proc.returncode}): "
                             f"{shlex.join(cmd)}\n{err.strip()[-2000:]}")
        summary = json.loads(out[out.index("{"):])
        shutil.rmtree(self.cwd / "runs", ignore_errors=True)
        # the summary's mean rate: `mean_tokens_per_s`, `tokens_per_s` in revisions before 27a
        tps = summary.get("mean_tokens_per_s", summary.get("tokens_per_s"))
        return {"wall_s": wall, "tokens_per_s": tps}


def timed(version: Version, config: str | None, steps: int) -> dict:
    """version.run with the child's user CPU time (RUSAGE_CHILDREN before and after)."""
    import resource

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    row = version.run(config, steps)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    row["user_s"] = after.ru_utime - before.ru_utime
    row["sys_s"] = after.ru_stime - before.ru_stime
    row["minor_faults"] = after.ru_minflt - before.ru_minflt  # the malloc setting shows here
    return row


def summarize(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def compare(this: Version, other: Version, config: str | None, args) -> dict:
    timed(this, config, args.steps)  # untimed: kernel build, page cache, first imports
    timed(other, config, args.steps)
    pairs = []
    for i in range(args.pairs):
        order = (this, other) if i % 2 == 0 else (other, this)
        rows = {v.name: timed(v, config, args.steps) for v in order}
        a, b = rows[this.name], rows[other.name]
        pairs.append({"this": a, "against": b,
                      "wall_ratio": a["wall_s"] / b["wall_s"],
                      "tps_ratio": a["tokens_per_s"] / b["tokens_per_s"],
                      "user_ratio": a["user_s"] / b["user_s"],
                      "faults_ratio": a["minor_faults"] / max(1, b["minor_faults"])})
    return {
        "config": config or "(defaults)", "pairs": pairs,
        "wall_ratio": summarize([p["wall_ratio"] for p in pairs]),
        "tps_ratio": summarize([p["tps_ratio"] for p in pairs]),
        "user_ratio": summarize([p["user_ratio"] for p in pairs]),
        "faults_ratio": summarize([p["faults_ratio"] for p in pairs]),
        "this_tps": statistics.median(p["this"]["tokens_per_s"] for p in pairs),
        "against_tps": statistics.median(p["against"]["tokens_per_s"] for p in pairs),
        "this_wall": statistics.median(p["this"]["wall_s"] for p in pairs),
        "against_wall": statistics.median(p["against"]["wall_s"] for p in pairs),
    }


def markdown(report: dict) -> str:
    lines = [
        f"`{report['command']}`  ",
        f"this tree ({report['this']}) against {report['against']}; {report['cpu']}, "
        f"{report['cores']} cores; {report['pairs']} pairs x {report['steps']} steps; load average "
        f"before/after {report['load_before']:.2f} / {report['load_after']:.2f}; {report['date']}",
        "",
        "| config | this tok/s | against tok/s | tok/s ratio, median (min-max) "
        "| wall ratio, median (min-max) | user CPU ratio | page faults ratio |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["results"]:
        t, w, u = r["tps_ratio"], r["wall_ratio"], r["user_ratio"]
        lines.append(
            f"| {r['config']} | {r['this_tps']:,.0f} | {r['against_tps']:,.0f} | "
            f"{t['median']:.3f} ({t['min']:.3f}-{t['max']:.3f}) | "
            f"{w['median']:.3f} ({w['min']:.3f}-{w['max']:.3f}) | {u['median']:.3f} | "
            f"{r['faults_ratio']['median']:.3f} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    args = parse_args(argv)
    configs = [NAMED.get(c.strip(), c.strip()) for c in args.configs.split(",") if c.strip()]
    head = git("rev-parse", "--short", "HEAD") + ("+changes" if git("status", "--porcelain", "-uno") else "")
    with tempfile.TemporaryDirectory(prefix="bench_against-") as tmp:
        tmp = Path(tmp)
        made = None
        if args.against == ".":
            root, label = REPO, f"{head} (this tree)"
        else:
            rev = git("rev-parse", "--short", args.against + "^{commit}")
            root, label = Path(args.worktree) if args.worktree else tmp / "against-tree", rev
            if not (root / "charlm").is_dir():
                git("worktree", "add", "--detach", str(root), rev)
                made = None if args.worktree else root
        try:
            this = Version("this", REPO, args.env, args.args, tmp)
            other = Version("against", root, args.against_env, args.against_args, tmp)
            load_before = os.getloadavg()[0]
            results = [compare(this, other, c, args) for c in configs]
            load_after = os.getloadavg()[0]
        finally:
            if made is not None:
                git("worktree", "remove", "--force", str(made))
    report = {
        "command": "python scripts/bench_against.py " + shlex.join(sys.argv[1:]),
        "this": head, "against": label, "cpu": cpu_name(), "cores": os.cpu_count(),
        "pairs": args.pairs, "steps": args.steps, "load_before": load_before,
        "load_after": load_after, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "results": results,
    }
    print(json.dumps(report, indent=2) if args.json else markdown(report))


if __name__ == "__main__":
    main()
