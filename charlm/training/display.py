"""What the trainer shows a person: live progress on a terminal, plain lines otherwise.

Human output goes to stderr so that `charlm train --json` leaves stdout to the JSON summary.
"""

from __future__ import annotations

import math

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table


def _si(x: float) -> str:
    return f"{x / 1e3:.1f}K" if x < 1e6 else f"{x / 1e6:.2f}M"


class TrainDisplay:
    def __init__(self, enabled: bool = True, console: Console | None = None):
        self.enabled = enabled
        self.console = console or Console(stderr=True)
        self.live = enabled and self.console.is_terminal
        self.progress: Progress | None = None
        self.task = None

    def print(self, *args, **kwargs) -> None:
        if self.enabled:
            self.console.print(*args, **kwargs)

    def start(self, trainer, params: int, resuming: bool) -> None:
        from charlm.devices import describe

        cfg, data = trainer.cfg, trainer.data
        verb = f"resuming at step {trainer.loop.step}" if resuming else "training"
        impl = trainer.model_config.impl
        if impl == "fast" and trainer.device.type == "cpu":
            from charlm.model import ckernel

            impl = f"fast: {ckernel.status()}"  # says so when the slower fallback loops run
        self.print(
            f"{verb}: {cfg.cell} {cfg.layers}x{cfg.hidden} ({impl}), "
            f"{params:,} parameters, on {describe(trainer.device)}"
        )
        self.print(
            f"corpus {data.name}: {data.num_tokens:,} tokens ({data.preprocessing}, vocab "
            f"{len(data.vocab)}), train {data.train.numel():,} / val {data.val.numel():,}; "
            f"{len(trainer.batches)} batches of {cfg.batch_size}x{cfg.num_steps} per epoch"
        )
        self.print(f"run directory: {trainer.run_dir}")
        if self.live:
            self.progress = Progress(
                TextColumn("[bold]{task.fields[head]}"), BarColumn(),
                TextColumn("{task.fields[stats]}"), TimeElapsedColumn(), TextColumn("ETA"),
                TimeRemainingColumn(), console=self.console, transient=False,
            )
            self.progress.start()
            self.task = self.progress.add_task("train", total=1000, head="starting", stats="")

    def log(self, row: dict, progress: float) -> None:
        stats = (f"ppl {row['ppl']:.3f}  {_si(row['tokens_per_s'])} tok/s  lr {row['lr']:.2e}")
        head = f"epoch {row['epoch'] + 1} step {row['step']}"
        if self.progress is not None:
            self.progress.update(self.task, completed=progress * 1000, head=head, stats=stats)
        else:
            self.print(f"{head} | loss {row['loss']:.4f} | {stats} | {progress:.0%}")

    def evaluation(self, row: dict, sample: str, improved: bool) -> None:
        if row["loss"] is None or not math.isfinite(row["loss"]):
            return
        mark = " (best)" if improved else ""
        self.print(f"[step {row['step']}] val ppl {row['ppl']:.3f}, {row['bpc']:.3f} bits/char{mark}",
                   markup=False, highlight=False)
        self.print(f"  sample: {sample!r}", markup=False, highlight=False)

    def stop(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


def summary_table(summary: dict) -> Table:
    table = Table(title="charlm train: summary", show_header=False)
    table.add_column("metric", style="bold")
    table.add_column("value")
    fmt = {
        "best_val_ppl": "{:.4f}", "best_val_bpc": "{:.4f}", "best_val_loss": "{:.4f}",
        "final_val_loss": "{:.4f}", "tokens_per_s": "{:,.0f}", "parameters": "{:,}",
    }
    for key, value in summary.items():
        text = fmt.get(key, "{}").format(value) if value is not None else "-"
        table.add_row(key.replace("_", " "), text)
    return table
