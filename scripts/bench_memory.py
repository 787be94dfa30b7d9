"""Benchmark: peak memory of `charlm train` (and `charlm data info`) on large texts.

    python scripts/bench_memory.py [--sizes 10M,100M,1G] [--modes raw,bytes,d2l] [--steps 50]
        [--dir DIR] [--keep] [--info] [--json]

Each text is Tiny Shakespeare (../shared/data, or $CHARLM_SHARED_DATA) repeated to exactly the
size asked for (10M = 10,000,000 characters; the text is ASCII, so bytes = characters), written
once into --dir (default: a temporary folder, deleted afterwards unless --keep). For each size
and preprocessing mode the script runs, in a fresh process,

    python -m charlm train --text FILE --preprocessing MODE --max-steps STEPS --eval-every
        STEPS --val-fraction 0.001 --time-budget 0 --out RUN --json

and reads that process's peak resident set size from the kernel when it ends (`os.wait4`'s
ru_maxrss: the figure `/usr/bin/time -v` prints as "Maximum resident set size"). The small
validation split only shortens the final whole-split evaluation; the split is a view of the
same token tensor, so it changes no memory figure. --info adds `charlm data info FILE`.

Targets (issue 17): a 1 GB corpus trains with peak RSS <= 2 bytes per character in raw and
bytes modes, <= 3 with d2l preprocessing. Peak RSS does not depend on the machine's load; the
wall times do (setup = wall time less training and evaluation: reading, encoding, start-up).
Prints a Markdown table (or --json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchlib import cpu_name  # scripts/, beside this file

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("CHARLM_SHARED_DATA") or REPO.parent / "shared" / "data")
TARGET = {"raw": 2.0, "bytes": 2.0, "d2l": 3.0, "lower": 2.0}  # bytes of peak RSS per char
UNITS = {"K": 10**3, "M": 10**6, "G": 10**9}


def size_of(text: str) -> int:
    text = text.strip().upper()
    return int(float(text[:-1]) * UNITS[text[-1]]) if text[-1] in UNITS else int(text)


def make_text(folder: Path, chars: int) -> Path:
    """Tiny Shakespeare repeated to `chars` characters, written in pieces (never whole here)."""
    path = folder / f"shakespeare-{chars}.txt"
    if path.is_file() and path.stat().st_size == chars:
        return path
    base = (SHARED / "tinyshakespeare.txt").read_bytes()
    with open(path, "wb") as f:
        left = chars
        while left:
            piece = base[:left]
            f.write(piece)
            left -= len(piece)
    return path


def measure(args: list[str], env: dict) -> dict:
    """Run `python -m charlm ARGS`; its exit code, wall time, peak RSS and output."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        began = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-m", "charlm", *args], stdout=out, stderr=err,
                                env=env, cwd=REPO)
        _, status, usage = os.wait4(proc.pid, 0)  # reaped here, with its resource usage
        wall = time.perf_counter() - began
        proc.returncode = code = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        return {"code": code, "wall_s": round(wall, 2), "peak_rss": usage.ru_maxrss * 1024,
                "stdout": out.read().decode("utf-8", "replace"),
                "stderr": err.read().decode("utf-8", "replace")[-2000:]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="10M,100M,1G", help="text sizes, e.g. 10M,100M,1G")
    p.add_argument("--modes", default="raw,bytes,d2l", help="preprocessing modes")
    p.add_argument("--steps", type=int, default=50, help="training steps per run")
    p.add_argument("--dir", default=None, help="where the texts (and runs) go")
    p.add_argument("--keep", action="store_true", help="keep the texts and runs")
    p.add_argument("--info", action="store_true", help="also measure `charlm data info FILE`")
    p.add_argument("--json", action="store_true", help="print JSON instead of Markdown")
    opts = p.parse_args(argv)
    if not (SHARED / "tinyshakespeare.txt").is_file():
        p.error(f"{SHARED / 'tinyshakespeare.txt'} not found; set CHARLM_SHARED_DATA")
    folder = Path(opts.dir) if opts.dir else Path(tempfile.mkdtemp(prefix="charlm-mem-"))
    folder.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "CHARLM_RUNS_DIR": str(folder / "runs"),
           "CHARLM_DATA_DIR": str(folder / "cache"), "PYTHONPATH": str(REPO)}
    rows = []
    try:
        for size in [size_of(s) for s in opts.sizes.split(",")]:
            text = make_text(folder, size)
            for mode in opts.modes.split(","):
                run = folder / f"run-{size}-{mode}"
                shutil.rmtree(run, ignore_errors=True)
                got = measure(["train", "--text", str(text), "--preprocessing", mode,
                               "--max-steps", str(opts.steps), "--eval-every", str(opts.steps),
                               "--checkpoint-every", str(opts.steps), "--val-fraction", "0.001",
                               "--time-budget", "0", "--out", str(run), "--json"], env)
                row = {"what": "train", "chars": size, "mode": mode, **got}
                if got["code"] == 0:
                    summary = json.loads(got["stdout"])
                    evals = [json.loads(line) for line in (run / "metrics.jsonl").open()
                             if '"kind": "val"' in line]
                    row["train_s"] = summary["wall_time_s"]
                    row["eval_s"] = round(sum(r.get("eval_s", 0) for r in evals), 2)
                    row["setup_s"] = round(got["wall_s"] - row["train_s"] - row["eval_s"], 2)
                rows.append(row)
                print(f"train {size:,} {mode}: exit {got['code']}, peak "
                      f"{got['peak_rss'] / 1e9:.2f} GB", file=sys.stderr)
                if not opts.keep:
                    shutil.rmtree(run, ignore_errors=True)
            if opts.info:
                got = measure(["data", "info", str(text), "--json"], env)
                rows.append({"what": "data info", "chars": size, "mode": "all", **got})
            if not opts.keep:
                text.unlink()
    finally:
        if not opts.keep and not opts.dir:
            shutil.rmtree(folder, ignore_errors=True)
    for row in rows:
        row["bytes_per_char"] = round(row["peak_rss"] / row["chars"], 2)
        row["target"] = TARGET.get(row["mode"]) if row["what"] == "train" else None
        row.pop("stdout")
    machine = {"cpu": cpu_name(), "cores": os.cpu_count(), "python": platform.python_version(),
               "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    if opts.json:
        print(json.dumps({"machine": machine, "rows": rows}, indent=2))
    else:
        print(f"Machine: {machine['cpu']}, {machine['cores']} cores, Python {machine['python']}; "
              f"{machine['date']}\n")
        print("| command | characters | mode | peak RSS | bytes/char | target | wall s | setup s |")
        print("|---|---:|---|---:|---:|---:|---:|---:|")
        for r in rows:
            target = f"<= {r['target']:g}" if r["target"] else ""
            ok = "" if r["code"] == 0 else f" (exit {r['code']})"
            print(f"| {r['what']}{ok} | {r['chars']:,} | {r['mode']} | "
                  f"{r['peak_rss'] / 1e9:.2f} GB | {r['bytes_per_char']:.2f} | {target} | "
                  f"{r['wall_s']:.1f} | {r.get('setup_s', '')} |")
    failed = [r for r in rows if r["code"] != 0]
    for r in failed:
        print(f"{r['what']} {r['chars']:,} {r['mode']} failed:\n{r['stderr']}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
