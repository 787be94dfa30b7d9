"""Every CUDA path of charlm, exercised once, as a pass/fail table (run by scripts/gpu_check.sh).

    scripts/gpu_check.sh [--out DIR] [--budget SECONDS] [--suite] [--json]

Rows, in order (each in subprocesses, as a user would run them; a row past the time budget is
SKIP (time)):

    environment       torch, CUDA, cuDNN, GPUs, charlm's commit
    cuda tests        pytest -m cuda (tests/training/test_cuda.py, tests/data/test_batches.py's CUDA test)
    suite             the whole suite on this machine (only with --suite: minutes)
    train CELL PREC   60 steps of a 2x256 model per cell (rnn, gru, lstm) and precision (fp32,
                      bf16, fp16): exit 0 and a finite loss; tokens/s in the detail
    resume exact      the default config (2 layers, dropout 0.2): 200 steps straight vs 100 +
                      --resume to 200, bit-identical weights (the max difference otherwise)
    fp16 -> fp32      an fp16 run resumed with --precision fp32, and on the CPU
    gpu ckpt on cpu   eval perplexity of one checkpoint on cuda and on the CPU agree to 1e-5
    generate / eval   generate, eval perplexity and eval perplexity --dynamic on cuda
    ddp 2 gpus        charlm train --nproc 2 --device cuda (SKIP with fewer than 2 GPUs)
    trainer vs bare   scripts/bench_train.py --device cuda: trainer / bare tokens/s >= 0.95
    precision HxP     bench_train's bare tokens/s per hidden size (256, 1024) and precision:
                      what mixed precision buys per model size (no pass/fail: a measurement)

Without CUDA every row but the environment is SKIP and the exit status is 0: CI runs it to check
that it starts. Exit status 1 when a row failed. The table is Markdown (paste it into
docs/BENCHMARKS.md with the date); --out DIR keeps the runs and a JSON copy.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
PASS, FAIL, SKIP = "PASS", "FAIL", "SKIP"


class Check:
    def __init__(self, args):
        self.args, self.rows = args, []
        self.deadline = time.monotonic() + args.budget
        self.out = Path(args.out or tempfile.mkdtemp(prefix="gpu-check-")).resolve()
        self.out.mkdir(parents=True, exist_ok=True)
        self.env = {**os.environ, "CHARLM_RUNS_DIR": str(self.out / "runs"),
                    "CHARLM_KERNEL_DIR": str(self.out / "kernels"), "PYTHONPATH": str(REPO)}
        if "CHARLM_MIRROR" not in self.env and SHARED.is_dir():
            self.env["CHARLM_MIRROR"] = str(SHARED)  # the reference corpora, offline
        import torch

        self.cuda = torch.cuda.is_available()
        self.gpus = torch.cuda.device_count() if self.cuda else 0

    def row(self, name: str, fn, *, needs_gpus: int = 1) -> None:
        if self.gpus < needs_gpus:
            why = "no CUDA device" if not self.cuda else f"needs {needs_gpus} GPUs, has {self.gpus}"
            self.rows.append((name, SKIP, why))
        elif time.monotonic() > self.deadline:
            self.rows.append((name, SKIP, f"time: the {self.args.budget:g} s budget is spent"))
        else:
            started = time.monotonic()
            try:
                status, detail = fn()
            except Exception as exc:  # a check that crashed is a failed row, not a crashed script
                status, detail = FAIL, f"{type(exc).__name__}: {exc}".splitlines()[0]
            self.rows.append((name, status, f"{detail} ({time.monotonic() - started:.0f} s)"))
        if not self.args.json:
            print(f"{self.rows[-1][1]:4}  {name}: {self.rows[-1][2]}", file=sys.stderr, flush=True)

    def run(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        left = max(10.0, min(timeout, self.deadline - time.monotonic() + 60))
        return subprocess.run([sys.executable, *args], cwd=REPO, env=self.env, text=True,
                              capture_output=True, timeout=left)

    def charlm(self, *args: str, timeout: float = 300) -> dict:
        done = self.run("-m", "charlm", *args, timeout=timeout)
        if done.returncode != 0:
            tail = (done.stderr.strip().splitlines() or ["?"])[-1]
            raise RuntimeError(f"charlm {args[0]} exited {done.returncode}: {tail}")
        return json.loads(done.stdout) if "--json" in args else {}


TRAIN = ["--hidden", "256", "--layers", "2", "--time-budget", "0", "--log-every", "20",
         "--eval-every", "1000", "--checkpoint-every", "1000", "-q", "--json"]


def environment() -> tuple[str, str]:
    import torch

    parts = [f"torch {torch.__version__}", f"CUDA {torch.version.cuda}",
             f"cuDNN {torch.backends.cudnn.version()}"]
    if torch.cuda.is_available():
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        parts.append(", ".join(names))
        parts.append(f"bf16 {'yes' if torch.cuda.is_bf16_supported() else 'no'}")
    else:
        parts.append("no CUDA device")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, text=True,
                            capture_output=True).stdout.strip()
    return PASS, "; ".join(parts + [f"charlm {commit or '?'}"])


def pytest_row(c: Check, *extra: str) -> tuple[str, str]:
    done = c.run("-m", "pytest", "-q", "-p", "no:cacheprovider", *extra, timeout=1800)
    summary = (done.stdout.strip().splitlines() or ["?"])[-1]
    return (PASS if done.returncode == 0 else FAIL), summary


def train_smoke(c: Check, cell: str, precision: str) -> tuple[str, str]:
    import torch

    if precision == "bf16" and not torch.cuda.is_bf16_supported():
        return SKIP, "this GPU has no bf16"
    out = c.out / "smoke" / f"{cell}-{precision}"
    s = c.charlm("train", "--cell", cell, "--precision", precision, "--device", "cuda",
                 "--max-steps", "60", *TRAIN, "--out", str(out))
    ok = s["val_loss"] is not None and math.isfinite(s["val_loss"])
    return (PASS if ok else FAIL), (f"val loss {s['val_loss']} (exact), "
                                    f"{s['mean_tokens_per_s']:,.0f} tokens/s, impl {s['impl']}")


def weights(path: Path) -> dict:
    import torch

    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def resume_exact(c: Check) -> tuple[str, str]:
    base = ["--device", "cuda", "--time-budget", "0", "--log-every", "50", "-q", "--json"]
    full, part = c.out / "resume" / "full", c.out / "resume" / "part"
    c.charlm("train", "--max-steps", "200", *base, "--out", str(full))
    c.charlm("train", "--max-steps", "100", *base, "--out", str(part))
    c.charlm("train", "--resume", str(part), "--max-steps", "200", "-q", "--json")
    a, b = weights(full / "last.pt"), weights(part / "last.pt")
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    return (PASS if worst == 0 else FAIL), ("bit-identical" if worst == 0 else
                                            f"max weight difference {worst:.3g}")


def fp16_then_fp32(c: Check) -> tuple[str, str]:
    run = c.out / "fp16"
    c.charlm("train", "--precision", "fp16", "--device", "cuda", "--max-steps", "30", *TRAIN,
             "--out", str(run))
    shutil.copytree(run, c.out / "fp16-cpu")
    c.charlm("train", "--resume", str(run), "--precision", "fp32", "--max-steps", "40", "-q",
             "--json")
    c.charlm("train", "--resume", str(c.out / "fp16-cpu"), "--precision", "fp32", "--device",
             "cpu", "--max-steps", "40", "-q", "--json")
    return PASS, "resumed in fp32 on cuda and on the CPU"


def gpu_checkpoint_on_cpu(c: Check) -> tuple[str, str]:
    run = str(c.out / "smoke" / "gru-fp32")
    figures = [c.charlm("eval", "perplexity", "--checkpoint", run, "--device", d, "--json")
               for d in ("cuda", "cpu")]
    diff = abs(figures[0]["nats_per_char"] - figures[1]["nats_per_char"])
    return (PASS if diff <= 1e-5 * figures[1]["nats_per_char"] else FAIL), (
        f"nats/char cuda {figures[0]['nats_per_char']:.6f}, cpu {figures[1]['nats_per_char']:.6f}")


def generate_eval(c: Check) -> tuple[str, str]:
    run = str(c.out / "smoke" / "lstm-fp32")
    drawn = c.charlm("generate", "--checkpoint", run, "--device", "cuda", "--seed", "1",
                     "--length", "100", "--json")
    dynamic = c.charlm("eval", "perplexity", "--checkpoint", run, "--device", "cuda",
                       "--dynamic", "--json")
    ok = len(drawn["samples"][0]) == 100 and math.isfinite(dynamic["dynamic"]["nats_per_char"])
    return (PASS if ok else FAIL), (f"static {dynamic['nats_per_char']:.4f}, dynamic "
                                    f"{dynamic['dynamic']['nats_per_char']:.4f} nats/char")


def ddp(c: Check) -> tuple[str, str]:
    s = c.charlm("train", "--nproc", "2", "--device", "cuda", "--max-steps", "60", *TRAIN,
                 "--out", str(c.out / "ddp"))
    return PASS, f"{s['world_size']} ranks, {s['tokens_per_s']:,.0f} tokens/s"


def bench(c: Check, *extra: str) -> dict:
    done = c.run("scripts/bench_train.py", "--device", "cuda", "--json", *extra, timeout=600)
    if done.returncode != 0:
        raise RuntimeError((done.stderr.strip().splitlines() or ["bench_train failed"])[-1])
    return json.loads(done.stdout)


def trainer_vs_bare(c: Check) -> tuple[str, str]:
    report = bench(c, "--config", "configs/timemachine-gru.toml", "--impl", "fused",
                   "--steps", "300", "--chunk", "50", "--repeats", "2")
    r = report["results"][0]
    ok = r["ratio_median"] >= 0.95
    return (PASS if ok else FAIL), (f"trainer {r['trainer_tokens_per_s']:,.0f} / bare "
                                    f"{r['bare_tokens_per_s']:,.0f} tokens/s = "
                                    f"{r['ratio_median']:.3f} (target 0.95)")


def precision_speed(c: Check, hidden: int, precision: str) -> tuple[str, str]:
    import torch

    if precision == "bf16" and not torch.cuda.is_bf16_supported():
        return SKIP, "this GPU has no bf16"
    report = bench(c, "--config", "configs/timemachine-gru.toml", "--impl", "fused", "--hidden",
                   str(hidden), "--precision", precision, "--steps", "200", "--chunk", "50",
                   "--repeats", "1")
    return "INFO", f"bare {report['results'][0]['bare_tokens_per_s']:,.0f} tokens/s"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", help="keep the runs and gpu-check.json here (default: a temp folder)")
    p.add_argument("--budget", type=float, default=450, help="seconds for all rows (default 450)")
    p.add_argument("--suite", action="store_true", help="also run the whole test suite")
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    args = p.parse_args(argv)
    c = Check(args)
    c.rows.append(("environment", *environment()))
    if not args.json:
        print(f"{PASS:4}  environment: {c.rows[0][2]}", file=sys.stderr, flush=True)
    c.row("cuda tests", lambda: pytest_row(c, "-m", "cuda", "tests"))
    if args.suite:
        c.row("suite", lambda: pytest_row(c, "-x", "tests"))
    for cell in ("gru", "lstm", "rnn"):
        for precision in ("fp32", "bf16", "fp16"):
            c.row(f"train {cell} {precision}", lambda cell=cell, p=precision: train_smoke(c, cell, p))
    c.row("resume exact (2 layers, dropout)", lambda: resume_exact(c))
    c.row("fp16 run resumed in fp32", lambda: fp16_then_fp32(c))
    c.row("gpu checkpoint on cpu", lambda: gpu_checkpoint_on_cpu(c))
    c.row("generate / eval / eval --dynamic", lambda: generate_eval(c))
    c.row("ddp on 2 gpus", lambda: ddp(c), needs_gpus=2)
    c.row("trainer vs bare step", lambda: trainer_vs_bare(c))
    for hidden in (256, 1024):
        for precision in ("fp32", "bf16", "fp16"):
            c.row(f"speed hidden {hidden} {precision}",
                  lambda h=hidden, p=precision: precision_speed(c, h, p))
    if args.out:
        (c.out / "gpu-check.json").write_text(json.dumps(c.rows, indent=1), encoding="utf-8")
    else:
        shutil.rmtree(c.out, ignore_errors=True)
    if args.json:
        print(json.dumps([{"check": n, "result": s, "detail": d} for n, s, d in c.rows], indent=2))
    else:
        print(f"charlm gpu_check, {time.strftime('%Y-%m-%d %H:%M %Z')}\n")
        print("| check | result | detail |\n|---|---|---|")
        for name, status, detail in c.rows:
            print(f"| {name} | {status} | {detail.replace('|', '/')} |")
    return 1 if any(status == FAIL for _, status, _ in c.rows) else 0


if __name__ == "__main__":
    sys.exit(main())
