"""CPU threads: one for work too small to split (and on a busy machine a second one turns every
op into a wait), one per core for the shipped models' steps; --threads overrides; torch's
OpenMP waits are kept short. Speeds are measured by scripts/bench_threads.py, not here."""

from __future__ import annotations

import torch

from charlm.cli import app
from charlm.devices import SMALL_WORK, threads_for
from charlm.evaluate import perplexity_of
from charlm.model.config import ModelConfig
from charlm.model.lm import CharLM
from helpers import TINY, pydoc_text, run_main

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


def test_exact_perplexity_runs_on_one_thread_and_puts_the_count_back(monkeypatch):
    seen = []
    import charlm.evaluate as evaluate

    real = evaluate.corpus_nll

    def spy(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return real(*args, **kwargs)

    monkeypatch.setattr(evaluate, "corpus_nll", spy)
    model = CharLM(ModelConfig(vocab_size=5, hidden=8))
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        perplexity_of(model, torch.tensor([1, 2, 3, 4, 1, 2]))
        assert seen == [1] and torch.get_num_threads() == 2
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
        seen.clear()
        code, _, err = run_main(["train", "--text", str(text), *TINY[:-1], "--max-steps", "3",
                                 "--threads", threads, "--out", str(tmp_path / threads)])
        assert code == 0, err
        assert seen == [want] * 3 and f"cpu ({want} threads)" in err
        assert torch.get_num_threads() == before


def test_openmp_waits_are_bounded_unless_the_environment_says_otherwise(monkeypatch):
    for name in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT"):
        monkeypatch.delenv(name, raising=False)
    app._bounded_openmp_waits()
    assert app.os.environ["GOMP_SPINCOUNT"] == app.OPENMP_SPINS == "1000"
    monkeypatch.setenv("GOMP_SPINCOUNT", "5")
    app._bounded_openmp_waits()
    assert app.os.environ["GOMP_SPINCOUNT"] == "5"
    monkeypatch.delenv("GOMP_SPINCOUNT")
    monkeypatch.setenv("OMP_WAIT_POLICY", "active")
    app._bounded_openmp_waits()
    assert "GOMP_SPINCOUNT" not in app.os.environ
