"""What the trainer shows a person: live progress on a terminal, plain lines otherwise.

Human output goes to stderr so that `charlm train --json` leaves stdout to the JSON summary.

    training: gru 2x256 (fast: ...), 625,564 parameters, on cpu (2 threads), until time_budget 2m
    corpus timemachine: ...; run directory: ...
    epochs 2.93 step 143 ━━━━━━━━━━ 100% ppl 5.512  61.2K tok/s  lr 3.00e-04 0:02:00 ETA 0:00:00

On a terminal the live line moves every step (`tick`: step, epoch, share done and ETA are host
numbers, so no device sync); its loss and speed are those of the latest log point. The ETA comes
from the limit that will stop the run (`Limits.eta`). "epochs" counts the epochs done, a
fraction, here and in the summary alike. When the run ends, the line is drawn once
more at its final step, 100%. Off a terminal there is one plain line per log point instead, and
one for the last steps. A reader that goes away (a closed pipe) silences the display; training
goes on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from charlm.system.console import console as make_console


@dataclass
class RunInfo:
    """What the first lines say about a run (made by the trainer)."""

    resumed_at: int | None  # the step a resumed run continues from; None for a new run
    model: str  # e.g. "gru 2x256 (fast: compiled C loops)"
    impl: str
    parameters: int
    device: str  # e.g. "cpu"
    device_text: str  # e.g. "cpu (2 threads)"
    corpus: str
    num_tokens: int
    preprocessing: str
    vocab_size: int
    train_tokens: int
    val_tokens: int
    batches_per_epoch: int
    batch_size: int
    num_steps: int
    run_dir: Path
    extra: dict  # more summary entries (a process group's world_size)
    limits: str = ""  # what stops the run, e.g. "max_steps 5000 or time_budget 2m"
    eval_tokens: int = 0  # validation tokens per evaluation while training (0: all)
    init_from: str | None = None  # the checkpoint a fine-tuning run started from
    new_symbols: int = 0  # symbols its vocabulary gained

    @classmethod
    def of(cls, trainer, resuming: bool, impl: str, device_text: str) -> "RunInfo":
        """What a `charlm.training.trainer.Trainer` is about to do; `impl` and `device_text`
        say how the model runs where it runs (`charlm.training.runtime`)."""
        from charlm.model.lm import count_parameters
        from charlm.training.distributed import describe as describe_group

        mc, data, device = trainer.model_config, trainer.data, trainer.device
        return cls(
            resumed_at=trainer.loop.step if resuming else None,
            model=f"{mc.cell} {mc.layers}x{mc.hidden} ({impl})", impl=mc.impl,
            parameters=count_parameters(trainer.model), device=str(device),
            device_text=device_text, corpus=data.name, num_tokens=data.num_tokens,
            preprocessing=data.preprocessing, vocab_size=len(data.vocab),
            train_tokens=data.train.numel(), val_tokens=data.val.numel(),
            batches_per_epoch=len(trainer.batches), batch_size=trainer.cfg.batch_size,
            num_steps=trainer.cfg.num_steps, run_dir=trainer.run_dir,
            extra=describe_group(trainer.group), limits=trainer.limits.describe(),
            eval_tokens=trainer.cfg.eval_tokens, init_from=trainer.cfg.init_from,
            new_symbols=len(data.vocab) - len(trainer.source.vocab["tokens"])
            if trainer.source else 0)


def _si(x: float) -> str:
    return f"{x / 1e3:.1f}K" if x < 1e6 else f"{x / 1e6:.2f}M"


def clock(seconds: float | None) -> str:
    """0:02:05, or -:--:-- while unknown."""
    if seconds is None or not math.isfinite(seconds):
        return "-:--:--"
    whole = int(round(seconds))
    return f"{whole // 3600}:{whole // 60 % 60:02d}:{whole % 60:02d}"


class TrainDisplay:
    def __init__(self, enabled: bool = True, console: Console | None = None):
        self.enabled = enabled
        self.console = console or make_console(stderr=True)  # literal, unwrapped off a terminal
        self.live = enabled and self.console.is_terminal
        self.progress: Progress | None = None
        self.task = None

    def print(self, *args, **kwargs) -> None:
        if not self.enabled:
            return
        try:
            self.console.print(*args, **kwargs)
        except BrokenPipeError:  # the reader went away (`train 2>&1 | head`): train on, quietly
            self.enabled = False

    def start(self, run: "RunInfo") -> None:
        verb = f"resuming at step {run.resumed_at}" if run.resumed_at is not None else "training"
        if run.init_from and run.resumed_at is None:
            gained = (f", vocabulary + {run.new_symbols} new symbol"
                      f"{'' if run.new_symbols == 1 else 's'}" if run.new_symbols else "")
            verb = f"fine-tuning {run.init_from}{gained}"
        self.print(f"{verb}: {run.model}, {run.parameters:,} parameters, on {run.device_text}, "
                   f"until {run.limits}")
        part = (f" (estimates on the first {run.eval_tokens:,}, the exact figure on all of it "
                f"at the end)"
                if 0 < run.eval_tokens < run.val_tokens else "")
        self.print(
            f"corpus {run.corpus}: {run.num_tokens:,} tokens ({run.preprocessing}, vocab "
            f"{run.vocab_size}), train {run.train_tokens:,} / val {run.val_tokens:,}{part}; "
            f"{run.batches_per_epoch} batches of {run.batch_size}x{run.num_steps} per epoch"
        )
        self.print(f"run directory: {run.run_dir}")
        if self.live:
            self.progress = Progress(
                TextColumn("{task.fields[head]}", style="bold", markup=False), BarColumn(),
                TaskProgressColumn(), TextColumn("{task.fields[stats]}", markup=False),
                TimeElapsedColumn(), TextColumn("ETA {task.fields[eta]}", markup=False),
                console=self.console, transient=False,
            )
            self.progress.start()
            self.task = self.progress.add_task("train", total=1000, head="starting", stats="",
                                               eta=clock(None))

    def tick(self, step: int, epochs: float, progress: float, eta: float | None) -> None:
        """After every step: the live line's step, epochs done, share done and ETA (host
        numbers only)."""
        if self.progress is not None:
            self.progress.update(self.task, completed=progress * 1000, eta=clock(eta),
                                 head=f"epochs {epochs:.2f} step {step}")

    def log(self, row: dict, progress: float, eta: float | None = None,
            epochs: float = 0.0) -> None:
        stats = (f"ppl {row['ppl']:.3f}  {_si(row['tokens_per_s'])} tok/s  lr {row['lr']:.2e}")
        head = f"epochs {epochs:.2f} step {row['step']}"
        if self.progress is not None:
            self.progress.update(self.task, completed=progress * 1000, head=head, stats=stats,
                                 eta=clock(eta))
        else:  # rounded down: only the end says 100%
            self.print(f"{head} | loss {row['loss']:.4f} | {stats} | "
                       f"{math.floor(progress * 100 + 1e-9)}% | ETA {clock(eta)}")

    def evaluation(self, row: dict, sample: str | None, improved: bool) -> None:
        """A periodic validation: an estimate (`charlm.training.validation`)."""
        if row["loss"] is None or not math.isfinite(row["loss"]):
            return
        mark = ", best so far" if improved else ""
        self.print(f"[step {row['step']}] val ppl {row['ppl']:.3f}, {_bits(row)} "
                   f"(estimate{mark})")
        if sample is not None:
            self.print(f"  sample: {sample!r}")

    def exact(self, row: dict | None) -> None:
        """The end's exact figure, of best.pt."""
        if row is None or not math.isfinite(row["loss"]):
            return
        self.print(f"[step {row['step']}] val ppl {row['ppl']:.4f}, {_bits(row, 4)} (exact: "
                   f"{row['checkpoint']}, all {row['characters']:,} characters of the "
                   f"validation split, one stream, float32)")

    def stop(self) -> None:
        """Stop the live line; it stays on screen as last drawn."""
        if self.progress is not None:
            try:
                self.progress.stop()
            except BrokenPipeError:
                self.enabled = False
            self.progress = None


def _bits(row: dict, places: int = 3) -> str:
    """Bits per character; a byte-level model's per byte too."""
    text = f"{row['bpc']:.{places}f} bits/char"
    if row.get("bits_per_byte") is not None:
        text = f"{row['bits_per_byte']:.{places}f} bits/byte, {text}"
    return text


def run_summary(run: RunInfo, reason: str, loop, exact: dict | None) -> dict:
    """The end of a run in numbers (`loop`: the trainer's LoopState; `exact`: the end's exact
    row, `charlm.training.validation`): what --json prints, the summary row of metrics.jsonl,
    and what summary_table shows. `val_*` are the exact figures of best.pt, `*_estimate` the
    best of the periodic estimates."""
    from charlm.inference.evaluate import perplexity_from  # (torch: not for `train --help`)

    best = loop.best_val_loss
    finite = math.isfinite(best)
    per_epoch = run.batches_per_epoch * run.batch_size * run.num_steps
    per_byte = run.preprocessing == "bytes"
    exact = exact if exact is not None and math.isfinite(exact["loss"]) else {}
    figures = {"val_ppl": exact.get("ppl"), "val_bpc": exact.get("bpc"),
               **({"val_bits_per_byte": exact.get("bits_per_byte")} if per_byte else {}),
               "val_loss": exact.get("loss"),
               "val_checkpoint": str(run.run_dir / exact["checkpoint"]) if exact else None}
    bits = "best_val_bits_per_byte_estimate" if per_byte else "best_val_bpc_estimate"
    return {
        "stopped_by": reason,
        "steps": loop.step,
        "epochs": round(loop.tokens_seen / max(1, per_epoch), 3),
        **figures,
        "best_val_loss_estimate": best if finite else None,
        "best_val_ppl_estimate": perplexity_from(best) if finite else None,  # may be inf
        bits: best / math.log(2) if finite else None,
        "mean_tokens_per_s": loop.tokens_seen / max(loop.elapsed, 1e-9),
        "wall_time_s": round(loop.elapsed, 2),
        "parameters": run.parameters,
        "device": run.device,
        **run.extra,
        **({"init_from": run.init_from} if run.init_from else {}),
        "impl": run.impl,
        "run_dir": str(run.run_dir),
        "best_checkpoint": str(run.run_dir / "best.pt"),
        "last_checkpoint": str(run.run_dir / "last.pt"),
    }


# What the summary's figures are, where a key alone would not say it
LABELS = {
    "epochs": "epochs (done)",
    "val_ppl": "val ppl (exact)", "val_bpc": "val bits/char (exact)",
    "val_bits_per_byte": "val bits/byte (exact)", "val_loss": "val loss (exact, nats)",
    "val_checkpoint": "scored checkpoint",
    "best_val_loss_estimate": "best val loss (estimate)",
    "best_val_ppl_estimate": "best val ppl (estimate)",
    "best_val_bpc_estimate": "best val bits/char (estimate)",
    "best_val_bits_per_byte_estimate": "best val bits/byte (estimate)",
    "mean_tokens_per_s": "tokens/s (mean over the run)",
}


def summary_table(summary: dict) -> Table:
    table = Table(title="charlm train: summary", show_header=False)
    table.add_column("metric", style="bold")
    table.add_column("value")
    four = "{:.4f}"
    fmt = {"val_ppl": four, "val_bpc": four, "val_bits_per_byte": four, "val_loss": four,
           "best_val_ppl_estimate": four, "best_val_bpc_estimate": four,
           "best_val_bits_per_byte_estimate": four, "best_val_loss_estimate": four,
           "mean_tokens_per_s": "{:,.0f}", "parameters": "{:,}"}
    for key, value in summary.items():
        text = fmt.get(key, "{}").format(value) if value is not None else "-"
        table.add_row(LABELS.get(key, key.replace("_", " ")), text)
    return table
