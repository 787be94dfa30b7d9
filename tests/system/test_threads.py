"""CPU threads: one for work too small to split (and on a busy machine a second one turns every
op into a wait), one per core for the shipped models' steps; --threads overrides; torch's
OpenMP waits are kept short. Speeds are measured by scripts/bench_threads.py, not here."""

from __future__ import annotations

import json

import torch

from charlm.cli import app
from charlm.system.threads import SMALL_WORK, threads_for
from charlm.inference.evaluate import perplexity_of
from charlm.model.config import ModelConfig
from charlm.model.lm import CharLM
from helpers import TINY, pydoc_text, run_main, train_runs

DEFAULT = torch.get_num_threads()


def test_threads_by_the_work_of_an_operation():
    cores = threads_for("train", 256, 64)
    assert cores >= 1
    assert threads_for("train", 256, 32) == cores  # the d2l configs, the default config
    assert threads_for("train", 16, 4) == 1  # a tiny model: forks and joins cost more
    assert threads_for("train", 256, SMALL_WORK // 256 - 1) == 1
    assert threads_for("stream", 1024, 1) == 1  # one sequence: matrix-vector products
    assert threads_for("stream", 1024, 1, requested=3) == 3  # --threads wins
    assert threads_for("train", 16, 4, requested=2) == 2


def test_a_single_stream_chooses_by_the_width_of_the_model():
    from charlm.system.threads import STREAM_HIDDEN, ThreadChooser

    cores = threads_for("train", STREAM_HIDDEN, 64)
    assert ThreadChooser.for_stream("cpu", STREAM_HIDDEN - 1).counts == (1,)  # too small to split
    assert ThreadChooser.for_stream("cpu", STREAM_HIDDEN).counts == tuple(dict.fromkeys((cores, 1)))
    assert ThreadChooser.for_stream(torch.device("cuda", 0), 1024) is None
    assert ThreadChooser.for_stream("mps", 1024) is None
    assert ThreadChooser.for_stream("cpu", 1024, requested=3).counts == (3,)  # --threads 3
    assert ThreadChooser.for_stream("cpu", 16, requested=2).counts == (2,)


def test_eval_perplexity_threads_fixes_the_count(tmp_path, monkeypatch):
    import charlm.inference.evaluate as evaluate

    made = train_runs(tmp_path, {"run": []})
    real, used = evaluate.corpus_nll, []

    def spy(*args, threads=None, **kwargs):
        used.append(threads.counts)
        return real(*args, threads=threads, **kwargs)

    monkeypatch.setattr(evaluate, "corpus_nll", spy)
    results = []
    for threads in ("1", "2"):
        code, out, err = run_main(["eval", "perplexity", "--checkpoint", str(made["run"]),
                                   "--threads", threads, "--json", "-q"])
        assert (code, err) == (0, "")
        results.append(json.loads(out)["nats_per_char"])
    assert used == [(1,), (2,)] and results[0] == results[1]
    assert run_main(["eval", "perplexity", "--checkpoint", str(made["run"]), "--threads",
                     "-1"]) == (2, "", "charlm: error: --threads must be >= 0, got -1\n")


def windows_threads(monkeypatch, model, tokens, cost, window=4):
    """The thread count of each window of perplexity_of, run through a chooser that sees the
    machine `cost` describes; and the result."""
    from charlm.system.threads import ThreadChooser

    monkeypatch.setattr(ThreadChooser, "for_stream", classmethod(
        lambda cls, device, hidden, requested=0: cls((2, 1), period=20, trial=3, warmup=0,
                                        clock=FakeClock(cost))))
    seen = []
    hook = model.head.register_forward_hook(lambda *_: seen.append(torch.get_num_threads()))
    try:
        return seen, perplexity_of(model, tokens, window=window)
    finally:
        hook.remove()


def test_exact_perplexity_times_its_windows_threads_and_puts_the_count_back(monkeypatch):
    model = CharLM(ModelConfig(vocab_size=5, hidden=8, layers=1, embed=0, dropout=0.0))
    tokens = torch.randint(1, 5, (81,), generator=torch.Generator().manual_seed(0))
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        seen, idle = windows_threads(monkeypatch, model, tokens, {2: 1.0, 1: 1.9})
        assert seen == [2] * 4 + [1] * 4 + [2] * 12 and torch.get_num_threads() == 2
        seen, busy = windows_threads(monkeypatch, model, tokens, {2: 2.2, 1: 1.0})
        assert seen == [2] * 4 + [1] * 4 + [1] * 12 and torch.get_num_threads() == 2
        assert busy == idle  # the same figures whichever count ran which window
        torch.set_num_threads(1)
        assert perplexity_of(model, tokens, window=4) == idle
    finally:
        torch.set_num_threads(before)


def test_a_single_streams_figures_do_not_depend_on_its_threads():
    """What lets the chooser switch counts between windows: a window computes the same bits on
    1 and 2 threads (256 units, where the stream is split; every cell)."""
    from charlm.inference.evaluate import corpus_nll
    from charlm.system.threads import ThreadChooser

    tokens = torch.randint(0, 40, (1200,), generator=torch.Generator().manual_seed(1))
    before = torch.get_num_threads()
    try:
        for cell, impl in (("gru", "fast"), ("gru", "fused"), ("lstm", "fused"), ("rnn", "scratch")):
            torch.manual_seed(0)
            model = CharLM(ModelConfig(vocab_size=40, hidden=256, layers=2, embed=16, cell=cell,
                                       impl=impl))
            torch.set_num_threads(1)
            one = corpus_nll(model, tokens, 1, 100)
            torch.set_num_threads(2)
            two = corpus_nll(model, tokens, 1, 100)
            switching = corpus_nll(model, tokens, 1, 100,
                                   threads=ThreadChooser((2, 1), period=3, trial=1, warmup=0))
            assert one == two == switching, (cell, impl)
    finally:
        torch.set_num_threads(before)


def test_the_trainer_uses_threads_and_restores_them(tmp_path, monkeypatch):
    monkeypatch.setenv("CHARLM_RUNS_DIR", str(tmp_path / "runs"))
    text = pydoc_text(tmp_path / "t.txt", 8000)
    from charlm.training.trainer import Trainer

    seen = []
    real_init = Trainer.__init__

    def init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        self.step_hook = lambda t: seen.append(torch.get_num_threads())

    monkeypatch.setattr(Trainer, "__init__", init)
    before = torch.get_num_threads()
    for threads, want in (("0", 1), ("2", 2)):  # TINY is a tiny model: 1 thread unless asked
        # (--threads 2 is a fixed count: no chooser switches it)
        seen.clear()
        code, _, err = run_main(["train", "--text", str(text), *TINY[:-1], "--max-steps", "3",
                                 "--threads", threads, "--out", str(tmp_path / threads)])
        assert code == 0, err
        assert seen == [want] * 3 and f"cpu ({want} thread{'s' if want > 1 else ''})" in err
        assert torch.get_num_threads() == before


def test_openmp_waits_are_bounded_unless_the_environment_says_otherwise(monkeypatch):
    for name in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(app.openmp, "others_running", lambda: [1, 1, 1, 1, 1])  # a busy machine
    app._bounded_openmp_waits()
    assert app.os.environ["GOMP_SPINCOUNT"] == app.OPENMP_SPINS == "1000"
    monkeypatch.setenv("GOMP_SPINCOUNT", "5")
    app._bounded_openmp_waits()
    assert app.os.environ["GOMP_SPINCOUNT"] == "5"
    monkeypatch.delenv("GOMP_SPINCOUNT")
    monkeypatch.setenv("OMP_WAIT_POLICY", "active")
    app._bounded_openmp_waits()
    assert "GOMP_SPINCOUNT" not in app.os.environ


class FakeClock:
    """Each step lasts what `cost[threads]` says: the chooser sees the machine we describe."""

    def __init__(self, cost: dict[int, float]):
        self.cost, self.now, self.started = cost, 0.0, False

    def __call__(self) -> float:
        if self.started:  # the end of a step
            self.now += self.cost[torch.get_num_threads()]
        self.started = not self.started
        return self.now


def run_steps(chooser, n: int) -> list[int]:
    used = []
    for _ in range(n):
        with chooser.step():
            used.append(torch.get_num_threads())
    return used


def test_the_chooser_tries_both_counts_each_period_and_keeps_the_faster():
    from charlm.system.threads import ThreadChooser

    before = torch.get_num_threads()
    clock = FakeClock({2: 1.0, 1: 1.9})  # an idle 2-core machine: two threads win
    chooser = ThreadChooser((2, 1), period=20, trial=3, clock=clock, warmup=0)
    try:
        first = run_steps(chooser, 20)
        assert first == [2] * 4 + [1] * 4 + [2] * 12  # A (1 + 3 timed), B (1 + 3), the faster
        clock.cost = {2: 2.2, 1: 1.0}  # busy neighbours arrive: the next period switches
        assert run_steps(chooser, 20) == [2] * 4 + [1] * 4 + [1] * 12
        assert chooser.best == 1
    finally:
        torch.set_num_threads(before)


class WarmingClock(FakeClock):
    """The first `slow` steps of a run cost 3x (memory allocated and faulted in), whatever the
    thread count; `chooser.seen` says which step is ending."""

    def __init__(self, cost: dict[int, float], slow: int):
        super().__init__(cost)
        self.slow, self.chooser = slow, None

    def __call__(self) -> float:
        if self.started and self.chooser.seen < self.slow:
            self.now += 2 * self.cost[torch.get_num_threads()]
        return super().__call__()


def chooser_on(clock: WarmingClock, warmup: int):
    from charlm.system.threads import ThreadChooser

    clock.chooser = ThreadChooser((2, 1), period=50, trial=3, clock=clock, warmup=warmup)
    return clock.chooser


def test_the_first_trial_waits_for_the_warm_up():
    """Timing a run's first steps blamed their warm-up on the count tried first: one thread was
    chosen on an idle machine where two are faster, for the whole first period."""
    before = torch.get_num_threads()
    try:
        cold = chooser_on(WarmingClock({2: 1.0, 1: 1.9}, slow=4), warmup=0)
        run_steps(cold, 8)
        assert cold.best == 1  # the defect, had the first trial started at once
        warm = chooser_on(WarmingClock({2: 1.0, 1: 1.9}, slow=4), warmup=5)
        used = run_steps(warm, 20)
        assert used == [2] * 5 + [2] * 4 + [1] * 4 + [2] * 7 and warm.best == 2
    finally:
        torch.set_num_threads(before)


def test_fixed_counts_and_cuda_choose_nothing():
    from charlm.system.threads import ThreadChooser

    assert ThreadChooser.of(0, 256, 64, on_cpu=False) is None
    assert ThreadChooser.of(3, 256, 64, on_cpu=True).counts == (3,)  # --threads 3
    assert ThreadChooser.of(0, 16, 4, on_cpu=True).counts == (1,)  # a tiny model
    assert ThreadChooser.of(0, 256, 64, on_cpu=True).counts == tuple(
        dict.fromkeys((threads_for("train", 256, 64), 1)))


def test_the_thread_count_changes_no_number(tmp_path, monkeypatch):
    """What lets the chooser switch counts mid-run: a step computes the same bits on 1 and on 2
    threads (a model large enough to be split: 64 rows x 64 units, dropout, AdamW, clipping)."""
    monkeypatch.setenv("CHARLM_RUNS_DIR", str(tmp_path / "runs"))
    text = pydoc_text(tmp_path / "t.txt", 30_000)
    from charlm.artifacts.checkpoint import load_checkpoint

    weights = {}
    for threads in ("1", "2", "0"):
        code, _, err = run_main(["train", "--text", str(text), "--hidden", "64", "--embed", "16",
                                 "--batch-size", "64", "--num-steps", "16", "--max-steps", "6",
                                 "--time-budget", "0", "--threads", threads, "-q",
                                 "--out", str(tmp_path / threads)])
        assert code == 0, err
        weights[threads] = load_checkpoint(tmp_path / threads / "last.pt")["model"]
    for name, tensor in weights["1"].items():
        assert torch.equal(tensor, weights["2"][name]) and torch.equal(tensor, weights["0"][name])
