"""`charlm train`: options map one-to-one onto TrainConfig keys (- written as _ in TOML)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import typer

from charlm.errors import CharlmError, UsageError

DATA, MODEL, OPTIM, STOP, RUN = "Data", "Model", "Optimisation", "Stopping", "Run"


def train(
    target: Optional[str] = typer.Argument(None, metavar="[RUN_DIR|CHECKPOINT]", help="With --resume: the run directory or checkpoint to continue (default: the latest run).", show_default=False),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="TOML config file (configs/*.toml); options given here override it.", rich_help_panel=RUN),
    resume: bool = typer.Option(False, "--resume", help="Continue a run exactly where it stopped: --resume (latest run), --resume RUN_DIR or --resume FILE.pt.", rich_help_panel=RUN),
    corpus: Optional[str] = typer.Option(None, "--corpus", help="Named corpus: timemachine (default), tinyshakespeare, python-docs.", rich_help_panel=DATA),
    text: Optional[list[Path]] = typer.Option(None, "--text", help="Train on local UTF-8 file(s) instead (repeatable).", rich_help_panel=DATA),
    url: Optional[str] = typer.Option(None, "--url", help="Train on a text downloaded from this URL.", rich_help_panel=DATA),
    sha256: Optional[str] = typer.Option(None, "--sha256", help="Expected sha256 of --url.", rich_help_panel=DATA),
    data_dir: Optional[str] = typer.Option(None, "--data-dir", help="Corpus cache directory (default $CHARLM_DATA_DIR or ~/.cache/charlm).", rich_help_panel=DATA),
    preprocessing: Optional[str] = typer.Option(None, "--preprocessing", help="d2l (letters+space, lowercased), lower, or raw. Default: the corpus's own.", rich_help_panel=DATA),
    min_freq: Optional[int] = typer.Option(None, "--min-freq", help="Symbols rarer than this map to <unk>.", rich_help_panel=DATA),
    max_vocab: Optional[int] = typer.Option(None, "--max-vocab", help="Keep at most this many symbols (0: all).", rich_help_panel=DATA),
    max_tokens: Optional[int] = typer.Option(None, "--max-tokens", help="Use only the first N tokens, as d2l's loader (0: all).", rich_help_panel=DATA),
    val_fraction: Optional[float] = typer.Option(None, "--val-fraction", help="Share of the corpus (from the end) for validation.", rich_help_panel=DATA),
    test_fraction: Optional[float] = typer.Option(None, "--test-fraction", help="Share of the corpus (the very end) held out for test.", rich_help_panel=DATA),
    cell: Optional[str] = typer.Option(None, "--cell", help="rnn, gru or lstm.", rich_help_panel=MODEL),
    hidden: Optional[int] = typer.Option(None, "--hidden", help="Hidden units per layer.", rich_help_panel=MODEL),
    layers: Optional[int] = typer.Option(None, "--layers", help="Recurrent layers.", rich_help_panel=MODEL),
    embed: Optional[int] = typer.Option(None, "--embed", help="Embedding size; 0 = one-hot inputs as in d2l.", rich_help_panel=MODEL),
    dropout: Optional[float] = typer.Option(None, "--dropout", help="Dropout between layers and before the output, in [0, 1).", rich_help_panel=MODEL),
    nonlinearity: Optional[str] = typer.Option(None, "--nonlinearity", help="tanh or relu (rnn only).", rich_help_panel=MODEL),
    impl: Optional[str] = typer.Option(None, "--impl", help="auto (default: fast for the GRU on the CPU, else fused), fused (torch/cuDNN), scratch (cells from the gate equations), fast (CPU GRU: own backward, C time loops; ~2x fused).", rich_help_panel=MODEL),
    gru_reset: Optional[str] = typer.Option(None, "--gru-reset", help="GRU reset gate after (PyTorch) or before (Cho et al., d2l) the recurrent product; before needs --impl scratch.", rich_help_panel=MODEL),
    bidirectional: bool = typer.Option(False, "--bidirectional", help="Refused: a bidirectional layer reads the characters it must predict.", rich_help_panel=MODEL),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", "-b", help="Sequences per batch.", rich_help_panel=OPTIM),
    num_steps: Optional[int] = typer.Option(None, "--num-steps", help="BPTT length: characters per sequence.", rich_help_panel=OPTIM),
    sampling: Optional[str] = typer.Option(None, "--sampling", help="sequential (state carried, truncated BPTT) or random (state reset per batch).", rich_help_panel=OPTIM),
    optimizer: Optional[str] = typer.Option(None, "--optimizer", help="sgd, adam or adamw.", rich_help_panel=OPTIM),
    lr: Optional[float] = typer.Option(None, "--lr", help="Learning rate (d2l uses sgd with 1).", rich_help_panel=OPTIM),
    weight_decay: Optional[float] = typer.Option(None, "--weight-decay", help="Weight decay.", rich_help_panel=OPTIM),
    schedule: Optional[str] = typer.Option(None, "--schedule", help="none, cosine (with warm-up) or plateau.", rich_help_panel=OPTIM),
    warmup_steps: Optional[int] = typer.Option(None, "--warmup-steps", help="Linear warm-up steps (cosine).", rich_help_panel=OPTIM),
    clip: Optional[float] = typer.Option(None, "--clip", help="Clip gradients to this global L2 norm (0: off).", rich_help_panel=OPTIM),
    epochs: Optional[int] = typer.Option(None, "--epochs", help="Stop after this many epochs (0: no limit).", rich_help_panel=STOP),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", help="Stop after this many steps (0: no limit).", rich_help_panel=STOP),
    time_budget: Optional[str] = typer.Option(None, "--time-budget", help="Stop after this much training time, e.g. 90s, 5m, 1h ('0': no limit).", rich_help_panel=STOP),
    device: Optional[str] = typer.Option(None, "--device", help="auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps.", rich_help_panel=RUN),
    nproc: Optional[int] = typer.Option(None, "--nproc", help="Train data-parallel on N processes here (one GPU each with CUDA); --batch-size is the global batch. Like torchrun --standalone --nproc-per-node N.", rich_help_panel=RUN),
    precision: Optional[str] = typer.Option(None, "--precision", help="fp32, bf16 or fp16 (CUDA only).", rich_help_panel=RUN),
    seed: Optional[int] = typer.Option(None, "--seed", help="Random seed (weights, batches, dropout).", rich_help_panel=RUN),
    log_every: Optional[int] = typer.Option(None, "--log-every", help="Steps between progress updates.", rich_help_panel=RUN),
    eval_every: Optional[int] = typer.Option(None, "--eval-every", help="Steps between validation + sample.", rich_help_panel=RUN),
    checkpoint_every: Optional[int] = typer.Option(None, "--checkpoint-every", help="Steps between saves of last.pt.", rich_help_panel=RUN),
    sample_prefix: Optional[str] = typer.Option(None, "--sample-prefix", help="Prompt for the samples shown at each evaluation.", rich_help_panel=RUN),
    sample_length: Optional[int] = typer.Option(None, "--sample-length", help="Characters per sample.", rich_help_panel=RUN),
    out: Optional[str] = typer.Option(None, "--out", "-o", help="Run directory (default runs/<time>-<cell>-<corpus>).", rich_help_panel=RUN),
    json_out: bool = typer.Option(False, "--json", help="Print the final summary as JSON on stdout.", rich_help_panel=RUN),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress output (errors and the summary only).", rich_help_panel=RUN),
) -> None:
    """Train a character-level language model.

    Example: charlm train --cell gru --time-budget 5m
    """
    if bidirectional:
        raise UsageError(
            "--bidirectional is not supported: a bidirectional layer reads the characters it is "
            "asked to predict, so it cannot be a language model"
        )
    explicit = dict(
        corpus=corpus, text=[str(t) for t in text] if text else None, url=url, sha256=sha256,
        data_dir=data_dir, preprocessing=preprocessing, min_freq=min_freq, max_vocab=max_vocab,
        max_tokens=max_tokens, val_fraction=val_fraction, test_fraction=test_fraction, cell=cell,
        hidden=hidden, layers=layers, embed=embed, dropout=dropout, nonlinearity=nonlinearity,
        impl=impl, gru_reset=gru_reset, batch_size=batch_size, num_steps=num_steps,
        sampling=sampling, optimizer=optimizer, lr=lr, weight_decay=weight_decay,
        schedule=schedule, warmup_steps=warmup_steps, clip=clip, epochs=epochs,
        max_steps=max_steps, time_budget=time_budget, device=device, precision=precision,
        seed=seed, log_every=log_every, eval_every=eval_every,
        checkpoint_every=checkpoint_every, sample_prefix=sample_prefix,
        sample_length=sample_length, out=out,
    )
    if nproc is not None and nproc != 1:
        if nproc < 1:
            raise UsageError(f"--nproc must be >= 1, got {nproc}")
        if "WORLD_SIZE" in os.environ:
            raise UsageError("--nproc starts its own processes; drop it when running under torchrun")
        raise typer.Exit(launch(nproc, launch_args(explicit, config, resume, target, json_out, quiet)))
    from charlm.training import distributed

    group = distributed.from_env()
    try:
        _train(group, explicit, config, resume, target, json_out, quiet)
    except CharlmError as exc:
        if group.rank and getattr(exc, "on_every_rank", False):
            raise typer.Exit(exc.exit_code) from None  # rank 0 reports it
        if group.rank:
            exc.args = (f"rank {group.rank}: {exc}",)
        raise
    except RuntimeError as exc:
        if not distributed.peer_lost(exc):
            raise
        first = (str(exc).strip().splitlines() or [""])[0]
        raise CharlmError(
            f"rank {group.rank}: lost contact with another process of the run, which stopped or "
            f"crashed (see its own output): {first}"
        ) from None
    finally:
        distributed.close()


def launch_args(explicit: dict, config, resume: bool, target, json_out: bool, quiet: bool) -> list[str]:
    """The `charlm train` arguments, less --nproc, that each rank of `--nproc N` runs with."""
    args = ["train"]
    for key, value in explicit.items():
        for item in value if isinstance(value, list) else [value]:
            if item is not None:
                args += [f"--{key.replace('_', '-')}", str(item)]
    args += ["--config", str(config)] if config else []
    args += ["--resume"] if resume else []
    args += ["--json"] if json_out else []
    args += ["--quiet"] if quiet else []
    return args + ([str(target)] if target is not None else [])


def _train(group, explicit: dict, config, resume: bool, target, json_out: bool, quiet: bool) -> None:
    from charlm.training.config import build_config, load_config_file
    from charlm.training.display import TrainDisplay, summary_table
    from charlm.training.state import resolve_resume
    from charlm.training.trainer import Interrupted, Trainer

    def configure():
        file_values = load_config_file(config) if config else {}
        if target is not None and not resume:
            raise UsageError(f"unexpected argument {target!r}; to continue a run use --resume {target}")
        if resume:
            if explicit["out"] is not None:
                raise UsageError("--out cannot be combined with --resume (a run resumes in its own directory)")
            merged = {**file_values, **{k: v for k, v in explicit.items() if v is not None}}
            return resolve_resume(None, merged, target or "latest")
        return build_config(file_values, explicit), None

    cfg, resumed = group.together(configure)
    display = TrainDisplay(enabled=not quiet and group.is_main)  # one voice: rank 0's
    trainer = Trainer(cfg, resume=resumed, display=display, group=group)
    try:
        summary = trainer.run()
    except Interrupted as exc:
        if not group.is_main:
            raise typer.Exit(130) from None
        again = "charlm train" + (f" --nproc {group.world_size}" if group.active else "")
        again += f" --resume {trainer.run_dir}"
        if exc.checkpoint is None:
            sys.stderr.write(f"charlm: {exc.signame}: stopped before any checkpoint was saved\n")
        elif exc.signame.endswith("(twice)"):
            sys.stderr.write(
                f"charlm: {exc.signame}: stopped mid-step without saving; the last checkpoint is "
                f"{exc.checkpoint}; resume with: {again}\n"
            )
        else:
            sys.stderr.write(
                f"charlm: {exc.signame}: saved {exc.checkpoint} at step {trainer.loop.step}; "
                f"resume with: {again}\n"
            )
        raise typer.Exit(130) from None
    if not group.is_main:
        return
    if json_out:
        sys.stdout.write(json.dumps(summary, indent=2) + "\n")
    else:
        from rich.console import Console

        Console().print(summary_table(summary))


GRACE_S = 10.0  # after one rank fails, how long the others get to stop by themselves


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(nproc: int, args: list[str], env: dict[str, str] | None = None) -> int:
    """Run `python -m charlm <args>` as `nproc` ranks on this machine; return the exit code.

    Like `torchrun --standalone --nproc-per-node N`, but a failure stays the ranks' own one-line
    error and exit code (torchrun wraps it in a traceback and exit code 1). Each rank starts in
    its own session, so a Ctrl-C reaches it exactly once, forwarded from here. When one rank
    fails, the others get GRACE_S seconds, then SIGTERM, then SIGKILL.
    """
    base = dict(os.environ if env is None else env)
    base.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    base.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE=str(nproc),
                LOCAL_WORLD_SIZE=str(nproc), GROUP_RANK="0")
    procs: list[subprocess.Popen] = []

    def forward(signum, frame):
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    old = {}
    try:
        for sig in (signal.SIGINT, signal.SIGTERM):
            old[sig] = signal.signal(sig, forward)
    except ValueError:  # not the main thread: signals stay with the caller
        pass
    try:
        for rank in range(nproc):
            rank_env = {**base, "RANK": str(rank), "LOCAL_RANK": str(rank)}
            procs.append(subprocess.Popen([sys.executable, "-m", "charlm", *args], env=rank_env,
                                          start_new_session=True))
        failed_at = None
        while any(p.poll() is None for p in procs):
            if failed_at is None and any(p.returncode not in (None, 0) for p in procs):
                failed_at = time.monotonic()
            if failed_at is not None and time.monotonic() - failed_at > GRACE_S:
                _stop(procs)
                break
            time.sleep(0.05)
    finally:
        _stop(procs)
        for sig, handler in old.items():
            signal.signal(sig, handler)
    codes = [1 if p.returncode is None else p.returncode if p.returncode >= 0 else 128 - p.returncode
             for p in procs]
    return codes[0] or next((c for c in codes if c), 0)  # rank 0's, which reported the error


def _stop(procs: list[subprocess.Popen]) -> None:
    for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        alive = [p for p in procs if p.poll() is None]
        for p in alive:
            p.send_signal(sig)
        for p in alive:
            try:
                p.wait(wait)
            except subprocess.TimeoutExpired:
                pass
