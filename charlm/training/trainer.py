"""The training loop: get batch, forward, loss, backward, clip, step; then log, evaluate, save.

Per step everything stays on the device (the corpus one integer tensor, batches slices of it,
the running loss a device tensor); the host syncs at log, evaluation and checkpoint points.

The Trainer owns its state: `state_dict()` is what a checkpoint holds (each part of the run
gives its own: model, optimizer, LR schedule, batch iterator, counters), `load_state_dict()`
puts a run back where a checkpoint left it.
"""

from __future__ import annotations

import math
import random
import time
from contextlib import ExitStack, nullcontext
from pathlib import Path
from shlex import quote

import torch
import torch.nn.functional as F

from charlm.artifacts import rundir
from charlm.artifacts.checkpoint import save_checkpoint
from charlm.artifacts.fields import check_resumable, corpus_changed
from charlm.config.file import run_config_toml
from charlm.config.train import DATA, TrainConfig
from charlm.config.build import model_config
from charlm.data.batches import RandomBatches, SequentialBatches
from charlm.data.dataset import Dataset, load_dataset
from charlm.data.text import readable
from charlm.data.transfer import public_url
from charlm.errors import CharlmError, warn
from charlm.inference.loading import model_from_checkpoint
from charlm.inference.sample import SampleSettings, generate
from charlm.model.config import large_vocab_note, resolve_impl
from charlm.model.lm import CharLM, State, detach_state
from charlm.system.threads import ThreadChooser, use_threads
from charlm.training import distributed, finetune, runtime, tensorboard, validation
from charlm.training.display import RunInfo, TrainDisplay, run_summary
from charlm.training.ema import WeightAverage
from charlm.training.divergence import checkpoints_left, unsavable
from charlm.training.limits import Limits
from charlm.training.optim import LRSchedule, load_optimizer_state, make_optimizer
from charlm.training.signals import Abandoned, Interrupted, StopRequests, stop_requests
from charlm.training.state import (LogWindow, LoopState, hidden_from_plain, hidden_to_plain,
                                   rng_state, set_rng_state)


class Trainer:
    """One process's trainer; with a process group (`charlm.training.distributed`), one rank of
    many: all ranks step together and rank 0 alone writes the run directory."""

    def __init__(self, cfg: TrainConfig, resume: dict | None = None,
                 display: TrainDisplay | None = None, group: distributed.Group | None = None):
        self.cfg = cfg
        tensorboard.require(cfg.tensorboard)  # a missing extra is refused before any work
        self.group = g = group or distributed.current()
        self.display = display or TrainDisplay(enabled=False)
        ckpt = resume["ckpt"] if resume else None
        self.where = str(resume.get("path") or "checkpoint") if resume else "checkpoint"
        self.device = g.together(lambda: runtime.setup_device(cfg, g, ckpt))
        self.source = g.together(lambda: finetune.start(cfg)) if (  # --init-from's weights,
            cfg.init_from and not ckpt) else None  # cfg given their model
        self.data: Dataset = g.local_first(lambda: load_dataset(
            **cfg.section(DATA), vocab=ckpt["vocab"] if ckpt else None,
            extend=self.source.vocab if self.source else None, device=self.device))
        cfg.record_source(self.data.name, self.data.preprocessing, self.data.default_prefix,
                          public_url(cfg.url) if cfg.url else None)
        self.model, self.optimizer, self.schedule, self.batches, self.scaler = g.together(
            lambda: self._parts(ckpt))
        self.model_config = self.model.config
        self.ema = WeightAverage(self.model, cfg.ema) if cfg.ema else None
        self.loop = LoopState()
        self.hidden: State | None = None  # carried across batches (sequential sampling)
        self.stop_signal: list[str] = []  # a signal name once SIGINT/SIGTERM/SIGHUP arrived
        self.requests = StopRequests(self.stop_signal)  # what those signals do (signals.py)
        self.agreed_stop: str | None = None  # the signal all ranks stop for
        self.step_hook = None  # called after every step with the trainer (tests, tools)
        self.board = tensorboard.NO_BOARD  # rank 0's TensorBoard log with --tensorboard
        self.grad_norm: torch.Tensor | None = None  # the last step's, when clipped or logged
        self.limits = Limits.of(cfg)
        if ckpt is not None:
            g.together(lambda: self.load_state_dict(ckpt))
        self.net = g.wrap(self.model, self.device)  # DDP: same weights everywhere, grads averaged
        self.run_dir = Path(g.broadcast(str(
            Path(cfg.out) if cfg.out else rundir.default_run_dir(cfg.cell, self.data.name))))

    def _parts(self, ckpt: dict | None):
        """The model (a checkpoint's, on resume), optimizer, schedule, batches and loss scaler."""
        cfg, g = self.cfg, self.group
        # --impl auto resolves per device and cell; the checkpoint records the concrete choice,
        # and a resumed run uses the impl given now (parameters are laid out alike in all).
        impl = resolve_impl(cfg.impl, cfg.cell, self.device.type, cfg.gru_reset)
        wanted = model_config(cfg, len(self.data.vocab), impl)
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        if ckpt is None:
            model = CharLM(wanted).to(self.device)
            if self.source:  # new characters' rows as initialised just now, the rest trained
                finetune.load_weights(model, self.source)
        else:  # the file checked first (a damaged vocabulary also changes the tokens' digest)
            model = model_from_checkpoint(ckpt, self.where, impl, self.device, wanted).model.train()
            if change := corpus_changed(ckpt.get("corpus"), self.data):
                raise CharlmError(f"{self.where}: the corpus is not the text this run was "
                                  f"trained on ({change}); resume with the same text")
        if g.rank:  # the same weights on every rank, but other dropout masks
            torch.manual_seed((cfg.seed + 0x9E3779B97F4A7C15 * g.rank) % 2**63)
        optimizer = make_optimizer(cfg.optimizer, model.parameters(), cfg.lr, cfg.weight_decay)
        schedule = LRSchedule(cfg.schedule, cfg.lr, cfg.warmup_steps, cfg.plateau_factor,
                              cfg.plateau_patience)
        iterator_cls = SequentialBatches if cfg.sampling == "sequential" else RandomBatches
        batches = iterator_cls(self.data.train, cfg.batch_size, cfg.num_steps, seed=cfg.seed,
                               rows=g.rows(cfg.batch_size))
        scaler = torch.amp.GradScaler("cuda") if cfg.precision == "fp16" else None
        return model, optimizer, schedule, batches, scaler

    # -- state -----------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything a checkpoint holds, as plain data. In a process group this is a
        collective: every rank's hidden rows and RNG state are joined on rank 0."""
        sequential = self.cfg.sampling == "sequential"
        rng = rng_state(self.device)
        hidden, ranks = distributed.gather_state(
            self.group, hidden_to_plain(self.hidden) if sequential else None, rng)
        return {
            "model_config": self.model_config.to_dict(),
            "vocab": self.data.vocab.to_dict(),
            "preprocessing": self.data.preprocessing,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.schedule.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler else None,
            "ema": self.ema.state_dict() if self.ema else None,
            "rng": rng,
            "iterator": (iterator := self.batches.state_dict()),
            "hidden": hidden,
            "epoch": iterator["epoch"],
            **self.loop.state_dict(),
            "train_config": self.cfg.to_dict(),
            "corpus": self.data.describe(),
            **ranks,
        }

    def load_state_dict(self, ckpt: dict) -> None:
        """Put the run back where `ckpt` left it (its weights came with the model, loaded and
        checked by `model_from_checkpoint`)."""
        check_resumable(ckpt, self.where)
        load_optimizer_state(self.optimizer, ckpt["optimizer"], self.where)
        self.schedule.load_state_dict(ckpt["scheduler"])
        if self.scaler and ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        if self.ema and ckpt.get("ema") is not None:  # else the average starts here
            self.ema.load_state_dict(ckpt["ema"], self.where)
        self.batches.load_state_dict(ckpt["iterator"])
        hidden, rng = distributed.rank_state(self.group, ckpt, self.cfg.batch_size)
        self.hidden = hidden_from_plain(hidden, self.device)
        self.loop.load_state_dict(ckpt)
        note = set_rng_state(rng, self.device, needed=self.model_config.stochastic)
        if note and self.group.is_main:
            warn(note)

    def save(self, name: str) -> Path:
        state, path = self.state_dict(), self.run_dir / name
        if problem := unsavable(state, path, self.loop.step):  # never what charlm would refuse
            self._diverged(problem)
        self.group.on_main(lambda: save_checkpoint(state, path))
        return path

    # -- pieces of a step --------------------------------------------------------------------
    def fraction_done(self) -> float:
        """How far along the run is, 0..1, by whichever limit is closest to stopping it."""
        return self.limits.fraction_done(self.loop.step, self._epochs_done(), self.loop.elapsed)

    def _epochs_done(self) -> float:
        return self.batches.epoch + self.batches.position / len(self.batches)

    def _eta(self) -> float | None:
        return self.limits.eta(self.loop.step, self._epochs_done(), self.loop.elapsed)

    def autocast(self):
        if self.cfg.precision == "fp32":
            return nullcontext()
        dtype = torch.bfloat16 if self.cfg.precision == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    def train_step(self, X: torch.Tensor, Y: torch.Tensor, state: State | None):
        """One optimisation step; returns the (device) loss and the new (attached) state."""
        with self.autocast():
            logits, state = self.net(X, state)
            loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), Y.reshape(-1))
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
        else:
            loss.backward()
        if self.cfg.clip > 0 or self.board.enabled:  # --clip 0: the norm alone (scaled by 1)
            self.grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(),
                                                            self.cfg.clip or math.inf)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        if self.ema is not None:
            self.ema.update()
        return loss.detach(), state

    def evaluate(self) -> float:
        """The estimate (`charlm.training.validation`): mean NLL per token over the validation
        split's first --eval-tokens, in --batch-size streams, the state carried."""
        val = self.data.val[: self.cfg.eval_tokens] if self.cfg.eval_tokens else self.data.val
        if val.numel() < 2:
            return math.nan
        nll, count = distributed.validation_nll(self.group, self.model, val, self.cfg.batch_size,
                                                self.cfg.num_steps, self.autocast)
        return nll / count

    def sample_text(self) -> str:
        prefix = self.data.sample_prefix(self.cfg.sample_prefix)
        ids = self.data.vocab.encode(prefix).tolist()
        gen = torch.Generator(device=self.device).manual_seed(self.cfg.seed + self.loop.step)
        drawn = generate(self.model, ids, SampleSettings(length=self.cfg.sample_length), generator=gen)
        return readable(prefix + self.data.vocab.decode(drawn[0]), self.data.preprocessing)

    # -- the loop ----------------------------------------------------------------------------
    def run(self) -> dict:
        resuming = self.loop.step > 0 or self.batches.position > 0 or self.batches.epoch > 0
        if resuming and not self.loop.eval_pending:  # a run that reached its limit has nothing
            # to do but an evaluation a stop request cut short: say how to go on
            nproc = f" --nproc {self.group.world_size}" if self.group.active else ""
            again = f"charlm train{nproc} --resume {quote(str(self.run_dir))}"
            self.limits.check_not_reached(self.loop.step, self._epochs_done(), self.loop.elapsed,
                                          again)
        with ExitStack() as stack:
            self.threads = ThreadChooser.of(self.cfg.threads, self.cfg.hidden,
                                            self.cfg.batch_size, self.device.type == "cpu")
            if self.threads:  # the count in use is put back after the run
                stack.callback(use_threads, torch.get_num_threads())
                use_threads(self.threads.best)
            metrics = self.group.on_main(lambda: self._open_run_dir(stack, resuming))
            return self._loop(metrics or rundir.NO_METRICS, resuming)

    def _open_run_dir(self, stack: ExitStack, resuming: bool) -> rundir.MetricsLog:
        config, resumed_at = run_config_toml(self.cfg), self.loop.step if resuming else None
        tensorboard.make_log_dir(self.cfg.tensorboard, self.run_dir)  # refused before any write
        metrics = rundir.open_run(stack, self.run_dir, config, resumed_at)
        self.board = tensorboard.open_board(stack, self.cfg.tensorboard, self.run_dir, resumed_at,
                                            config)
        return metrics

    def _loop(self, metrics, resuming: bool) -> dict:
        cfg, loop = self.cfg, self.loop
        info = RunInfo.of(self, resuming, runtime.impl_text(self.model_config, self.device),
                          runtime.device_text(cfg, self.device))
        for note in (runtime.precision_note(cfg), large_vocab_note(self.model_config)):
            if note and self.group.is_main:
                warn(note)  # on stderr before anything else, even with -q
        self.display.start(info)
        self._window = LogWindow(self.device)
        self._mark, self._clock = time.perf_counter(), loop.elapsed  # this process's; elapsed: agreed
        batches = self._batches()
        self._units = validation.EstimateUnits(self.data, cfg.eval_tokens or self.data.val.numel())
        self.net.train()
        try:
            with stop_requests(self.requests):
                if loop.eval_pending == "whole":  # the exact pass was cut short: the estimate
                    loop.evaluated_at = loop.step  # of this step was done, the exact one follows
                elif loop.eval_pending:  # the evaluation a stop request cut short, done now
                    self._evaluate_and_sample(metrics)
                    self._restart_clock()
                while (stop := self._stop_check()) is None:
                    X, Y, fresh = next(batches)
                    state = None if fresh else detach_state(self.hidden)  # truncated BPTT
                    lr = self.schedule.lr(loop.step, self.fraction_done())
                    for group in self.optimizer.param_groups:
                        group["lr"] = lr
                    with self.threads.step() if self.threads else nullcontext():
                        loss, state = self.train_step(X, Y, state)
                    self.hidden = state if cfg.sampling == "sequential" else None
                    self._on_step_end(loss, lr, metrics)
                if not self.agreed_stop:  # the last evaluations; a stop request may cut them
                    if self._window.steps:  # the steps since the last log line: logged, checked
                        self._log(lr, metrics)
                    self.display.stop()  # its last line: the final step, 100%
                    if loop.evaluated_at != loop.step:  # the last estimate: it may pick best.pt
                        self._evaluate_and_sample(metrics)
                    final = validation.exact_evaluation(self, metrics)
        except Abandoned:  # a stop request during an evaluation: the steps so far are saved
            self.agreed_stop = self.stop_signal[0]
        except KeyboardInterrupt:  # a second Ctrl-C mid-step: the step is torn, so save nothing
            self.display.stop()
            last = self.run_dir / "last.pt"
            raise Interrupted(last if last.exists() else None, "SIGINT (twice)", loop.step) from None
        if self.agreed_stop:
            path = self.save("last.pt")
            self.display.stop()
            raise Interrupted(path, self.agreed_stop, loop.step)
        self.save("last.pt")
        summary = run_summary(info, stop, loop, final)
        metrics.write({"kind": "summary", "step": loop.step, **summary})
        return summary

    def _batches(self):
        """(X, Y, fresh) forever, epoch after epoch; fresh: start from a zero state (every batch
        with random sampling, each epoch's first with sequential)."""
        while True:
            # position == len: a run stopped right after an epoch's last batch; iterating
            # starts the next epoch, whose first batch gets a fresh state too
            fresh = self.batches.position in (0, len(self.batches))
            for X, Y in self.batches:
                yield X, Y, fresh or self.cfg.sampling == "random"
                fresh = False

    def _stop_check(self) -> str | None:
        """Why the run stops now, if it does: a signal, which the ranks of a process group agree
        on (with the elapsed time, which the schedule and --time-budget read), or a limit."""
        self.loop.elapsed, self.agreed_stop = self.group.agree_stop(self._clock,
                                                                    self.stop_signal)
        return self.agreed_stop or self.limits.reached(self.loop.step, self._epochs_done(),
                                                       self.loop.elapsed)

    def _on_step_end(self, loss: torch.Tensor, lr: float, metrics) -> None:
        cfg, loop = self.cfg, self.loop
        tokens = cfg.batch_size * cfg.num_steps
        self._window.add(loss, tokens)
        loop.step += 1
        loop.tokens_seen += tokens
        now = time.perf_counter()
        self._clock += now - self._mark
        self._mark = now
        if not self.group.active:  # a process group agrees on it at the next stop check
            loop.elapsed = self._clock
        self.display.tick(loop.step, self._epochs_done(), self.fraction_done(), self._eta())
        if loop.step % cfg.log_every == 0:
            self._log(lr, metrics)
        if loop.step % cfg.eval_every == 0:
            self._evaluate_and_sample(metrics)
            self._restart_clock()
        if loop.step % cfg.checkpoint_every == 0:
            self._check_finite(self._mean_loss() if self._window.steps else 0.0)
            self.save("last.pt")
            self._restart_clock()
        if self.step_hook is not None:
            self.step_hook(self)

    def _restart_clock(self) -> None:
        """After a pause (evaluation, checkpoint): no training time, and not in tokens/s."""
        now = time.perf_counter()
        self._window.pause(self._mark, now)
        self._mark = now

    def _log(self, lr: float, metrics) -> None:
        loop, window = self.loop, self._window
        self._check_finite(mean := self._mean_loss())
        seconds = time.perf_counter() - window.since
        row = {"kind": "train", "step": loop.step, "epoch": self.batches.epoch,
               "tokens": loop.tokens_seen, "time": round(loop.elapsed, 3), "loss": mean,
               "ppl": math.exp(min(mean, 50)), "lr": lr,
               "tokens_per_s": window.tokens / max(seconds, 1e-9)}
        if self.grad_norm is not None:
            row["grad_norm"] = self.grad_norm.item()  # the last step's, before clipping
        metrics.write(row)
        self.board.write(row)
        self.display.log(row, self.fraction_done(), self._eta(), self._epochs_done())
        window.reset()

    def _mean_loss(self) -> float:
        mean = (self._window.loss_sum / self._window.steps).item()  # the one host sync per log
        g = self.group
        return g.sum([mean])[0] / g.world_size if g.active else mean

    def _check_finite(self, mean_loss: float) -> None:
        if not math.isfinite(mean_loss):
            self._diverged(f"loss became {mean_loss} by step {self.loop.step}")

    def _diverged(self, what: str) -> None:
        self.display.stop()
        error = CharlmError(f"{what}; training stopped; {checkpoints_left(self.run_dir)}; "
                            "try a lower --lr or --clip 1")
        raise distributed.shared(error) if self.group.active else error

    def _evaluate_and_sample(self, metrics) -> float:
        """A periodic evaluation (an estimate: `charlm.training.validation`) and a sample.
        A stop request may abandon them (not in a process group, where they are collectives),
        and then the run resumes by doing them first."""
        loop, g = self.loop, self.group
        began = time.perf_counter()
        loop.eval_pending = "periodic"
        with (self.ema.applied() if self.ema else nullcontext(),  # validation sees the average
              self.requests.abandonable(allowed=not g.active)):  # (its copies never cut short)
            val = self.evaluate()
            sample = self.sample_text() if g.is_main else None
        loop.eval_pending, loop.evaluated_at = None, loop.step
        self.model.train()
        loop.last_val_loss = val
        improved = math.isfinite(val) and val < loop.best_val_loss
        if improved:
            loop.best_val_loss = val
        if math.isfinite(val):
            self.schedule.observe(val)
        row = {**validation.row(self, val), **self._units.figures(val), "whole_split": False,
               "val_kind": "estimate", "eval_s": round(time.perf_counter() - began, 3)}
        metrics.write(row)
        self.board.write(row)
        if sample is not None:  # rank 0's periodic evaluations
            self.board.sample(loop.step, sample)
            with open(self.run_dir / "samples.txt", "a", encoding="utf-8",
                      errors="backslashreplace") as fh:  # a prompt's bytes need not be UTF-8
                fh.write(f"--- step {loop.step}\n{sample}\n")
        self.display.evaluation(row, sample, improved)
        first = not (self.run_dir / "best.pt").exists() and math.isfinite(val)
        if g.broadcast(improved or first):  # rank 0 decides
            self.save("best.pt")
        return val
