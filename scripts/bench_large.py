"""Benchmark rows for enwik8 and text8: bits per character on the papers' test split after a
time budget, and the share of a run's time spent evaluating.

    python scripts/bench_large.py [--rows enwik8,text8] [--budgets 10m,1h] [--device cpu|cuda]
        [--out-dir runs/large] [--text FILE] [--json]

Per corpus and budget, as a user would, in subprocesses:

    charlm train --config configs/<corpus>-gru.toml --time-budget B --device D --out DIR --json
    charlm eval perplexity --checkpoint DIR --split test --json     (DIR's best.pt)

The corpora must be in the cache first: `charlm data download enwik8` (36 MB zip from
mattmahoney.net) or, offline, `charlm data add enwik8 enwik8.zip`; the same for text8. The time
budget counts training time only; evaluation is reported beside it: "eval share" is the time the
run spent in its evaluations (the periodic ones over --eval-tokens and the whole-split one at the
end, from metrics.jsonl) over training plus evaluation time. Target (issue 17): at most ~10%
with the defaults on a 100 MB corpus. No published figure exists for small recurrent models at
such budgets; these rows are the reference (for scale: AWD-LSTM 1.232 bpc on enwik8, mLSTM 1.27
on text8, after days on GPUs).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from benchlib import cpu_name  # scripts/, beside this file

REPO = Path(__file__).resolve().parents[1]


def charlm(*args: str) -> dict:
    done = subprocess.run([sys.executable, "-m", "charlm", *args], capture_output=True, text=True,
                          cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)))
    if done.returncode:
        raise SystemExit(f"charlm {' '.join(args)} failed ({done.returncode}):\n"
                         f"{done.stderr[-3000:]}")
    return json.loads(done.stdout)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default="enwik8,text8")
    p.add_argument("--budgets", default="10m,1h")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out-dir", default="runs/large")
    p.add_argument("--text", default=None,
                   help="train on this file instead of the corpus, with the same config and a "
                        "90/5/5 split (to smoke-test the script where the corpora are absent)")
    p.add_argument("--json", action="store_true")
    opts = p.parse_args(argv)
    rows = []
    for corpus in opts.rows.split(","):
        for budget in opts.budgets.split(","):
            out = Path(opts.out_dir) / f"{corpus}-{budget}-{time.strftime('%Y%m%d-%H%M%S')}"
            instead = (["--text", opts.text, "--val-fraction", "0.05", "--test-fraction", "0.05"]
                       if opts.text else [])
            summary = charlm("train", "--config", str(REPO / "configs" / f"{corpus}-gru.toml"),
                             *instead, "--time-budget", budget, "--device", opts.device,
                             "--out", str(out), "--json", "-q")
            test = charlm("eval", "perplexity", "--checkpoint", str(out), "--split", "test",
                          "--device", opts.device, "--json")
            evals = [json.loads(line) for line in (out / "metrics.jsonl").open()
                     if json.loads(line)["kind"] == "val"]
            eval_s = sum(r.get("eval_s", 0.0) for r in evals)
            rows.append({
                "corpus": corpus, "budget": budget, "device": opts.device,
                # enwik8's papers' "bits per character" are per byte
                "test_bpc": test["bits_per_byte"] if test.get("unit") == "byte" else test["bits_per_char"], "test_characters": test["characters"],
                "steps": summary["steps"], "tokens_per_s": summary["mean_tokens_per_s"],
                "train_s": summary["wall_time_s"], "eval_s": round(eval_s, 1),
                "eval_share": eval_s / (eval_s + summary["wall_time_s"]),
                "final_val_bpc": (summary["val_loss"] or float("nan")) / 0.6931471805599453,
                "run": str(out)})
            print(f"{corpus} {budget}: test {rows[-1]['test_bpc']:.3f} bpc", file=sys.stderr)
    machine = {"cpu": cpu_name(), "cores": os.cpu_count(),
               "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    if opts.json:
        print(json.dumps({"machine": machine, "rows": rows}, indent=2))
        return 0
    print(f"Machine: {machine['cpu']}, {machine['cores']} cores; {machine['date']}\n")
    print("| corpus | budget | device | test bpc | val bpc (whole split) | steps | tokens/s | "
          "eval share |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['corpus']} | {r['budget']} | {r['device']} | {r['test_bpc']:.3f} | "
              f"{r['final_val_bpc']:.3f} | {r['steps']:,} | {r['tokens_per_s']:,.0f} | "
              f"{r['eval_share']:.1%} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
