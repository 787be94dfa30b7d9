"""The training loop: get batch, forward, loss, backward, clip, step, log, evaluate, save.

Everything the loop touches per step stays on the device: the corpus is one integer tensor
there, batches are slices of it, the running loss is a device tensor. The host only syncs at
log, evaluation and checkpoint points.
"""

from __future__ import annotations

import math
import random
import signal
import time
from contextlib import ExitStack, closing, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from charlm.training import distributed
from charlm.training import rundir
from charlm.data.batches import RandomBatches, SequentialBatches
from charlm.training.checkpoint import save_checkpoint
from charlm.training.config import TrainConfig, parse_duration
from charlm.data.dataset import Dataset, load_dataset
from charlm.devices import keep_freed_memory
from charlm.errors import CharlmError, UsageError
from charlm.model.lm import CharLM, ModelConfig, State, count_parameters, detach_state
from charlm.training.state import payload, restore
from charlm.training.optim import LRSchedule, make_optimizer
from charlm.training.display import TrainDisplay
from charlm.sample import SampleSettings, generate

class Interrupted(Exception):
    """SIGINT/SIGTERM arrived: the loop stopped at a step boundary and saved a checkpoint."""

    def __init__(self, checkpoint: Path | None, signame: str):
        super().__init__(signame)
        self.checkpoint, self.signame = checkpoint, signame


@dataclass
class LoopState:
    step: int = 0
    epoch: int = 0
    tokens_seen: int = 0
    elapsed: float = 0.0  # training wall time across resumes
    best_val_loss: float = math.inf
    last_val_loss: float = math.nan
    history: list = field(default_factory=list)


class _NoMetrics:
    """What ranks other than 0 write metrics to."""

    def write(self, row: dict) -> None:
        pass


class Trainer:
    """One process's trainer; with a process group (`charlm.training.distributed`), one rank of many:
    all ranks step together and rank 0 alone writes the run directory."""

    def __init__(self, cfg: TrainConfig, resume: dict | None = None, display: TrainDisplay | None = None,
                 group: distributed.Group | None = None):
        self.cfg = cfg
        self.group = g = group or distributed.current()
        self.display = display or TrainDisplay(enabled=False)
        ckpt = resume["ckpt"] if resume else None
        self.resume_path = str(resume.get("path") or "checkpoint") if resume else None
        g.together(lambda: self._check_setup(cfg, ckpt))
        self.data: Dataset = g.local_first(lambda: load_dataset(
            cfg, vocab=ckpt["vocab"] if ckpt else None, device=self.device))
        # the files were found relative to here; record them absolute so a resume works anywhere
        cfg.text = [str(Path(t).resolve()) for t in cfg.text]
        g.together(lambda: self._build(cfg, ckpt))
        self.net = g.wrap(self.model, self.device)  # DDP: same weights everywhere, grads averaged
        self.run_dir = Path(g.broadcast(str(
            Path(cfg.out) if cfg.out else rundir.default_run_dir(cfg.cell, self.data.name))))

    def _check_setup(self, cfg: TrainConfig, ckpt: dict | None) -> None:
        self.device = distributed.select_rank_device(cfg.device, self.group)
        if self.device.type == "cpu":
            keep_freed_memory()  # no page-fault churn from freeing each step's activations
        if cfg.precision != "fp32" and self.device.type != "cuda":
            raise UsageError(f"--precision {cfg.precision} needs a CUDA device; use fp32 on {self.device.type}")
        distributed.check_world(self.group, cfg.batch_size, ckpt.get("world_size", 1) if ckpt else None)

    def _build(self, cfg: TrainConfig, ckpt: dict | None) -> None:
        g = self.group
        if ckpt and ckpt.get("corpus", {}).get("num_tokens") not in (None, self.data.num_tokens):
            raise CharlmError(
                f"the corpus has {self.data.num_tokens} tokens but the checkpoint was trained on "
                f"{ckpt['corpus']['num_tokens']}; resume with the same text"
            )
        from charlm.model.cells import resolve_impl

        mc = ModelConfig(
            vocab_size=len(self.data.vocab), cell=cfg.cell, hidden=cfg.hidden, layers=cfg.layers,
            embed=cfg.embed, dropout=cfg.dropout, nonlinearity=cfg.nonlinearity,
            gru_reset=cfg.gru_reset,
        )
        # --impl auto resolves per device and cell; the checkpoint records the concrete choice,
        # and a resumed run uses the impl given now (parameters are laid out alike in all).
        mc.impl = resolve_impl(cfg.impl, mc.mode, self.device.type, cfg.gru_reset)
        self.model_config = mc.validate()
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        self.model = CharLM(self.model_config).to(self.device)
        if g.rank:  # the same weights on every rank, but other dropout masks
            torch.manual_seed((cfg.seed + 0x9E3779B97F4A7C15 * g.rank) % 2**63)
        self.optimizer = make_optimizer(cfg.optimizer, self.model.parameters(), cfg.lr, cfg.weight_decay)
        self.schedule = LRSchedule(cfg.schedule, cfg.lr, cfg.warmup_steps, cfg.plateau_factor,
                                   cfg.plateau_patience)
        iterator_cls = SequentialBatches if cfg.sampling == "sequential" else RandomBatches
        self.batches = iterator_cls(self.data.train, cfg.batch_size, cfg.num_steps, seed=cfg.seed,
                                    rows=g.rows(cfg.batch_size))
        self.scaler = torch.amp.GradScaler("cuda") if cfg.precision == "fp16" else None
        self.loop = LoopState()
        self.stop_signal: list[str] = []  # a signal name once SIGINT/SIGTERM arrived
        self.agreed_stop: str | None = None  # in a process group: the signal all ranks stop for
        self.step_hook = None  # called after every step with the trainer (tests, tools)
        self.hidden: State | None = None
        self.time_budget = parse_duration(cfg.time_budget)
        if ckpt is not None:
            self._restore(ckpt, self.resume_path)

    # -- checkpoints ---------------------------------------------------------------------
    def _payload(self) -> dict:
        return payload(self)

    def _restore(self, ckpt: dict, where: str) -> None:
        restore(self, ckpt, where)

    def save(self, name: str) -> Path:
        payload, path = self._payload(), self.run_dir / name
        self.group.on_main(lambda: save_checkpoint(payload, path))
        return path

    # -- pieces of the loop --------------------------------------------------------------
    def progress(self) -> float:
        """How far along the run is, 0..1, by whichever limit is closest to stopping it."""
        cfg, loop = self.cfg, self.loop
        parts = [0.0]
        if cfg.max_steps:
            parts.append(loop.step / cfg.max_steps)
        if cfg.epochs:
            parts.append((self.batches.epoch + self.batches.position / len(self.batches)) / cfg.epochs)
        if self.time_budget:
            parts.append(loop.elapsed / self.time_budget)
        return min(max(parts), 1.0)

    def stop_reason(self) -> str | None:
        cfg, loop = self.cfg, self.loop
        if cfg.max_steps and loop.step >= cfg.max_steps:
            return f"max_steps {cfg.max_steps}"
        if cfg.epochs and self.batches.epoch >= cfg.epochs:
            return f"epochs {cfg.epochs}"
        if self.time_budget and loop.elapsed >= self.time_budget:
            return f"time_budget {cfg.time_budget}"
        return None

    def autocast(self):
        if self.cfg.precision == "fp32":
            return nullcontext()
        dtype = torch.bfloat16 if self.cfg.precision == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    def train_step(self, X: torch.Tensor, Y: torch.Tensor, state: State | None):
        """One optimisation step; returns the (device) loss and the new (attached) state."""
        cfg = self.cfg
        with self.autocast():
            logits, state = self.net(X, state)
            loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), Y.reshape(-1))
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
        else:
            loss.backward()
        if cfg.clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.clip)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        return loss.detach(), state

    def evaluate(self) -> float:
        """Mean NLL per character over the whole validation split (state carried)."""
        if self.data.val.numel() < 2:
            return math.nan
        nll, count = distributed.corpus_nll(self.group, self.model, self.data.val,
                                            self.cfg.batch_size, self.cfg.num_steps, self.autocast)
        return nll / count

    def sample_text(self) -> str:
        prefix = self.data.sample_prefix(self.cfg.sample_prefix)
        ids = self.data.vocab.encode(prefix).tolist()
        gen = torch.Generator(device=self.device).manual_seed(self.cfg.seed + self.loop.step)
        drawn = generate(self.model, ids, SampleSettings(length=self.cfg.sample_length), generator=gen)
        return prefix + self.data.vocab.decode(drawn[0])

    # -- the loop ------------------------------------------------------------------------
    def run(self) -> dict:
        cfg, loop = self.cfg, self.loop
        resuming = loop.step > 0 or self.batches.position > 0 or self.batches.epoch > 0
        with ExitStack() as stack:
            def open_run_dir() -> rundir.MetricsLog:
                rundir.prepare_run_dir(self.run_dir, resuming=resuming)
                stack.enter_context(rundir.RunLock(self.run_dir))
                rundir.write_text_atomic(self.run_dir / "config.toml", _config_toml(cfg, self.run_dir))
                rundir.point_latest(self.run_dir)
                return stack.enter_context(closing(rundir.MetricsLog(
                    self.run_dir / "metrics.jsonl", keep_until_step=loop.step if resuming else -1)))

            metrics = self.group.on_main(open_run_dir) or _NoMetrics()  # rank 0 alone writes it
            return self._run(metrics, resuming)

    def _run(self, metrics: rundir.MetricsLog, resuming: bool) -> dict:
        cfg, loop, display = self.cfg, self.loop, self.display
        params = count_parameters(self.model)
        display.start(self, params, resuming)
        stop_signal = self.stop_signal

        def on_signal(signum, frame):
            if stop_signal:  # a second Ctrl-C: stop now, without waiting for the step
                raise KeyboardInterrupt
            stop_signal.append(signal.Signals(signum).name)

        old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        loss_sum = torch.zeros((), device=self.device)
        n_steps, n_tokens = 0, 0
        last_log = time.perf_counter()
        t_mark = time.perf_counter()
        reason = self.stop_reason()
        batch_tokens = cfg.batch_size * cfg.num_steps
        self.net.train()
        try:
            while reason is None:
                # position == len: a run stopped right after an epoch's last batch; iterating
                # starts the next epoch, whose first batch gets a fresh state too
                at_epoch_start = self.batches.position in (0, len(self.batches))
                for X, Y in self.batches:
                    if cfg.sampling == "random" or at_epoch_start:
                        state, at_epoch_start = None, False  # fresh state per batch / per epoch
                    else:
                        state = detach_state(self.hidden)  # truncated BPTT: keep values, cut graph
                    lr = self.schedule.lr(loop.step, self.progress())
                    for group in self.optimizer.param_groups:
                        group["lr"] = lr
                    loss, state = self.train_step(X, Y, state)
                    self.hidden = state if cfg.sampling == "sequential" else None
                    loss_sum += loss
                    n_steps += 1
                    n_tokens += batch_tokens
                    loop.step += 1
                    loop.tokens_seen += batch_tokens
                    now = time.perf_counter()
                    loop.elapsed += now - t_mark
                    t_mark = now
                    if loop.step % cfg.log_every == 0:
                        mean = self._mean_loss(loss_sum, n_steps)
                        self._check_finite(mean)
                        seconds = time.perf_counter() - last_log
                        row = {"kind": "train", "step": loop.step, "epoch": self.batches.epoch,
                               "tokens": loop.tokens_seen, "time": round(loop.elapsed, 3),
                               "loss": mean, "ppl": math.exp(min(mean, 50)), "lr": lr,
                               "tokens_per_s": n_tokens / max(seconds, 1e-9)}
                        metrics.write(row)
                        display.log(row, self.progress())
                        loss_sum.zero_()
                        n_steps, n_tokens, last_log = 0, 0, time.perf_counter()
                    if loop.step % cfg.eval_every == 0:
                        self._eval_and_sample(metrics)
                        t_mark = last_log = time.perf_counter()
                    if loop.step % cfg.checkpoint_every == 0:
                        self._check_finite(self._mean_loss(loss_sum, n_steps) if n_steps else 0.0)
                        self.save("last.pt")
                        t_mark = last_log = time.perf_counter()
                    if self.step_hook is not None:
                        self.step_hook(self)
                    if self._stopping():  # checked after a whole step: position and weights agree
                        break
                    reason = self.stop_reason()
                    if reason:
                        break
                if self._stopping(sync=False):
                    break
                reason = self.stop_reason()  # an epoch just ended: the epochs limit may be hit
        except KeyboardInterrupt:  # a second Ctrl-C mid-step: the step is torn, so save nothing
            display.stop()
            last = self.run_dir / "last.pt"
            raise Interrupted(last if last.exists() else None, "SIGINT (twice)") from None
        finally:
            for sig, handler in old.items():
                signal.signal(sig, handler)
        stopped = self._stopping(sync=False)
        if stopped:
            path = self.save("last.pt")
            display.stop()
            raise Interrupted(path, stopped)
        if n_steps:
            self._check_finite(self._mean_loss(loss_sum, n_steps))
        evaluated_now = loop.step % cfg.eval_every == 0 and math.isfinite(loop.last_val_loss)
        final_val = loop.last_val_loss if evaluated_now else self._eval_and_sample(metrics)
        self.save("last.pt")
        display.stop()
        summary = self._summary(reason or "done", params, final_val)
        metrics.write({"kind": "summary", "step": loop.step, **summary})
        return summary

    def _stopping(self, sync: bool = True) -> str | None:
        """The signal the run stops for, if any. In a process group the ranks agree on it, and on
        the elapsed time (the schedule and --time-budget read it), once at the end of each step:
        a small host-side message, no device sync."""
        if sync or not self.group.active:
            self.loop.elapsed, self.agreed_stop = self.group.agree_stop(self.loop.elapsed,
                                                                        self.stop_signal)
        return self.agreed_stop

    def _mean_loss(self, loss_sum: torch.Tensor, n_steps: int) -> float:
        mean = (loss_sum / n_steps).item()  # the one host sync per log interval
        g = self.group
        return g.sum([mean])[0] / g.world_size if g.active else mean

    def _check_finite(self, mean_loss: float) -> None:
        if not math.isfinite(mean_loss):
            last = self.run_dir / "last.pt"
            kept = f"the last good checkpoint is {last}" if last.exists() else "no checkpoint was saved"
            self.display.stop()
            error = CharlmError(
                f"loss became {mean_loss} by step {self.loop.step}; training stopped and {kept}; "
                "try a lower --lr or --clip 1"
            )
            raise distributed.shared(error) if self.group.active else error

    def _eval_and_sample(self, metrics: rundir.MetricsLog) -> float:
        loop, g = self.loop, self.group
        val = self.evaluate()
        sample = self.sample_text() if g.is_main else ""
        self.model.train()
        loop.last_val_loss = val
        improved = math.isfinite(val) and val < loop.best_val_loss
        if improved:
            loop.best_val_loss = val
        self.schedule.observe(val) if math.isfinite(val) else None
        row = {"kind": "val", "step": loop.step, "epoch": self.batches.epoch,
               "tokens": loop.tokens_seen, "time": round(loop.elapsed, 3), "loss": val,
               "ppl": math.exp(min(val, 50)) if math.isfinite(val) else None,
               "bpc": val / math.log(2) if math.isfinite(val) else None}
        metrics.write(row)
        if g.is_main:
            with open(self.run_dir / "samples.txt", "a", encoding="utf-8") as fh:
                fh.write(f"--- step {loop.step}\n{sample}\n")
        self.display.evaluation(row, sample, improved)
        if g.broadcast(improved or not (self.run_dir / "best.pt").exists()):  # rank 0 decides
            self.save("best.pt")
        return val

    def _summary(self, reason: str, params: int, final_val: float) -> dict:
        loop = self.loop
        best = loop.best_val_loss if math.isfinite(loop.best_val_loss) else final_val
        finite = math.isfinite(best)
        return {
            "stopped_by": reason,
            "steps": loop.step,
            "epochs": round(loop.tokens_seen / max(1, len(self.batches) * self.cfg.batch_size
                                                   * self.cfg.num_steps), 3),
            "best_val_loss": best if finite else None,
            "best_val_ppl": math.exp(best) if finite else None,
            "best_val_bpc": best / math.log(2) if finite else None,
            "final_val_loss": final_val if math.isfinite(final_val) else None,
            "tokens_per_s": loop.tokens_seen / max(loop.elapsed, 1e-9),
            "wall_time_s": round(loop.elapsed, 2),
            "parameters": params,
            "device": str(self.device),
            **distributed.describe(self.group),
            "impl": self.model_config.impl,
            "run_dir": str(self.run_dir),
            "best_checkpoint": str(self.run_dir / "best.pt"),
            "last_checkpoint": str(self.run_dir / "last.pt"),
        }


def _config_toml(cfg: TrainConfig, run_dir: Path) -> str:
    from charlm.training.config import to_toml

    values = cfg.to_dict()
    values["out"] = str(run_dir)
    return to_toml(values)
