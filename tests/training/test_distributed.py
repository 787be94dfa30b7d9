"""Data-parallel training: two gloo ranks on this machine train the model one process would.

The end-to-end tests launch real ranks (`charlm train --nproc 2` and torchrun) as subprocesses;
each launch costs a few seconds, so one 2-rank run (module fixture) serves several tests.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from charlm.data.batches import RandomBatches, SequentialBatches
from charlm.artifacts.checkpoint import load_checkpoint
from charlm.cli.app import app
from charlm.cli.train import launch_args
from charlm.training.launch import free_port
from charlm.training.distributed import eval_shards
from charlm.inference.evaluate import corpus_nll
from charlm.model.config import ModelConfig
from charlm.model.lm import CharLM
from helpers import pydoc_text


@pytest.mark.parametrize("cls", [SequentialBatches, RandomBatches])
@pytest.mark.parametrize("world", [2, 4])
def test_rank_rows_tile_every_global_batch(cls, world):
    tokens = torch.arange(5000) % 97
    whole = cls(tokens, 8, 7, seed=5)
    ranks = [cls(tokens, 8, 7, seed=5, rows=slice(r * 8 // world, (r + 1) * 8 // world))
             for r in range(world)]
    for _ in range(2):  # two epochs: a new offset (and permutation) each
        for (X, Y), *parts in zip(list(whole), *map(list, ranks), strict=True):
            assert torch.equal(torch.cat([x for x, _ in parts]), X)
            assert torch.equal(torch.cat([y for _, y in parts]), Y)
        assert all(r.state_dict() == whole.state_dict() for r in ranks)


@pytest.mark.parametrize("n, batch, world", [(203, 4, 2), (200, 4, 2), (201, 8, 4), (3, 4, 2)])
def test_eval_shards_add_up_to_one_process(n, batch, world):
    torch.manual_seed(0)
    model = CharLM(ModelConfig(vocab_size=11, cell="gru", hidden=8, layers=2, embed=4)).eval()
    tokens = torch.randint(11, (n,))
    nll, count = corpus_nll(model, tokens, batch, 5)
    parts = [corpus_nll(model, tokens[a:b], rows, 5)
             for rank in range(world) for a, b, rows in eval_shards(n, batch, world, rank)]
    assert sum(c for _, c in parts) == count == n - 1
    assert sum(x for x, _ in parts) == pytest.approx(nll, rel=1e-6)


def test_launch_args_give_the_ranks_the_same_command():
    explicit = {"text": ["a.txt", "b.txt"], "hidden": 16, "lr": 0.003, "device": None, "out": "r"}
    assert launch_args(explicit, Path("c.toml"), False, None, True, False) == [
        "train", "--text", "a.txt", "--text", "b.txt", "--hidden", "16", "--lr", "0.003",
        "--out", "r", "--config", "c.toml", "--json"]
    assert launch_args({"max_steps": 9}, None, True, "runs/x", False, True) == [
        "train", "--max-steps", "9", "--resume", "--quiet", "runs/x"]


# -- real ranks -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ddp")
    pydoc_text(root / "small.txt", 30_000)
    return root


def _args(work: Path, out: Path, steps: int) -> list[str]:
    # dropout 0 and one fixed impl: the ranks' arithmetic is the single process's, regrouped
    return ["train", "--text", str(work / "small.txt"), "--cell", "lstm", "--hidden", "24",
            "--layers", "2", "--embed", "8", "--dropout", "0", "--impl", "fused",
            "--batch-size", "4", "--num-steps", "16", "--schedule", "none", "--max-steps",
            str(steps), "--time-budget", "0", "--log-every", "2", "--eval-every", "4",
            "--checkpoint-every", "4", "--sample-length", "10", "--device", "cpu",
            "--out", str(out)]


def _run(work: Path, *cmd: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CHARLM_RUNS_DIR": str(work / "runs"),
           "CHARLM_DATA_DIR": str(work / "cache")}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return subprocess.run([sys.executable, "-m", *cmd], capture_output=True, text=True, env=env,
                          timeout=240)


@pytest.fixture(scope="module")
def two_ranks(work) -> subprocess.CompletedProcess:
    """A 2-rank run of 6 steps, launched by `charlm train --nproc 2`."""
    proc = _run(work, "charlm", *_args(work, work / "two6", 6), "--nproc", "2", "--json")
    assert proc.returncode == 0, proc.stderr
    return proc


def _assert_close(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-5, rtol=0), key


@pytest.mark.slow
def test_two_ranks_train_the_model_one_process_trains(work, two_ranks, tmp_path, monkeypatch):
    monkeypatch.setenv("CHARLM_RUNS_DIR", str(tmp_path / "runs"))
    result = CliRunner().invoke(app, [*_args(work, tmp_path / "one6", 6), "--quiet"])
    assert result.exit_code == 0, result.output
    one, two = load_checkpoint(tmp_path / "one6" / "last.pt"), load_checkpoint(work / "two6" / "last.pt")
    _assert_close(one["model"], two["model"])
    assert two["world_size"] == 2 and len(two["rank_rng"]) == 2 and "world_size" not in one
    # the carried state of both ranks, joined: the global batch's (layers, batch, hidden) state
    assert [tuple(h.shape) for h in two["hidden"]] == [(2, 4, 24), (2, 4, 24)]
    for h1, h2 in zip(one["hidden"], two["hidden"]):
        assert torch.allclose(h1, h2, atol=1e-5, rtol=0)
    # validation perplexity is reduced across ranks: the same number as one process's
    rows = [json.loads(line) for line in (work / "two6" / "metrics.jsonl").read_text().splitlines()]
    ref = [json.loads(line) for line in (tmp_path / "one6" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["kind"], r["step"]) for r in rows] == [(r["kind"], r["step"]) for r in ref]
    for r, s in zip(rows, ref):
        if r["kind"] in ("train", "val"):
            assert r["loss"] == pytest.approx(s["loss"], rel=1e-5)
    # one voice: rank 0 alone prints the summary and the progress lines
    summary = json.loads(two_ranks.stdout)
    assert summary["world_size"] == 2 and summary["steps"] == 6
    assert two_ranks.stderr.count("run directory:") == 1


@pytest.mark.slow
def test_two_rank_checkpoint_resumes_on_two_ranks(work, two_ranks, tmp_path):
    shutil.copytree(work / "two6", tmp_path / "part")
    resumed = _run(work, "charlm", "train", "--nproc", "2", "--resume", str(tmp_path / "part"),
                   "--max-steps", "12", "--quiet")
    assert resumed.returncode == 0, resumed.stderr
    port = str(free_port())  # the uninterrupted run, started by torchrun itself
    full = _run(work, "torch.distributed.run", "--nproc-per-node", "2", "--master-addr",
                "127.0.0.1", "--master-port", port, "-m", "charlm",
                *_args(work, tmp_path / "full", 12), "--quiet")
    assert full.returncode == 0, full.stderr
    a, b = load_checkpoint(tmp_path / "part" / "last.pt"), load_checkpoint(tmp_path / "full" / "last.pt")
    assert a["step"] == b["step"] == 12
    _assert_close(a["model"], b["model"])
    for h1, h2 in zip(a["hidden"], b["hidden"]):
        assert torch.allclose(h1, h2, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_ctrl_c_reaches_every_rank_once_and_saves(work, tmp_path):
    """SIGINT to the `--nproc` launcher: the ranks finish the same step, rank 0 saves and says
    how to resume, nothing else is printed, and the launcher exits 130."""
    import signal
    import time

    out = tmp_path / "stopped"
    args = _args(work, out, 100_000)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CHARLM_RUNS_DIR": str(work / "runs"),
           "CHARLM_DATA_DIR": str(work / "cache")}
    proc = subprocess.Popen([sys.executable, "-m", "charlm", *args, "--nproc", "2", "--quiet"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 120
    while not (out / "last.pt").exists() and time.monotonic() < deadline:
        time.sleep(0.2)  # training is under way once the first checkpoint is written
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    step = load_checkpoint(out / "last.pt")["step"]
    assert stderr == (f"charlm: SIGINT: saved {out / 'last.pt'} at step {step}; resume with: "
                      f"charlm train --nproc 2 --resume {out}\n")
    assert stdout == ""


@pytest.mark.slow
def test_resume_on_another_world_size_is_one_line(work, two_ranks, tmp_path, monkeypatch):
    monkeypatch.setenv("CHARLM_RUNS_DIR", str(tmp_path / "runs"))
    shutil.copytree(work / "two6", tmp_path / "part")
    result = CliRunner().invoke(app, ["train", "--resume", str(tmp_path / "part"), "--max-steps", "8"])
    assert result.exit_code == 1
    assert result.stderr == (
        "charlm: error: the checkpoint comes from a run on 2 process(es) but this one has 1; "
        "resume it on as many (--nproc 2, or torchrun with that many in all)\n")
    assert load_checkpoint(tmp_path / "part" / "last.pt")["step"] == 6


@pytest.mark.slow
def test_indivisible_global_batch_is_one_line_from_rank_0(work):
    args = _args(work, work / "bad", 6)
    args[args.index("--batch-size") + 1] = "3"
    proc = _run(work, "charlm", *args, "--nproc", "2")
    assert proc.returncode == 2
    assert proc.stderr == (
        "charlm: error: --batch-size 3 is the global batch and must be divisible by the number "
        "of processes (2); use e.g. --batch-size 4\n")
    assert not (work / "bad").exists()


def test_nproc_needs_a_positive_count(tmp_path):
    result = CliRunner().invoke(app, ["train", "--nproc", "0", "--out", str(tmp_path / "r")])
    assert result.exit_code == 2
    assert result.stderr == "charlm: error: --nproc must be >= 1, got 0\n"


AGREE = """
import json, sys
from charlm.training import distributed
group = distributed.from_env("cpu")
seen = []
for k in range(4):
    signal = ["SIGINT"] if (group.rank, k) == (1, 2) else []
    seen.append(group.agree_stop(10.0 * group.rank + k, signal))
distributed.close()
print(json.dumps(seen))
"""


@pytest.mark.slow
def test_the_stop_agreement_runs_one_step_behind(work):
    """Each check starts this step's reduction and reads the previous one's (the first check
    agrees at once): every rank gets the same answers, one step late, without waiting a step."""
    port = str(free_port())
    procs = []
    for rank in (0, 1):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, "-c", AGREE], env=env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    answers = []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        answers.append(json.loads(out))
    # rank 1 sends 10 + k and a SIGINT at check 2: rank 0 and 1 both read it at check 3
    assert answers[0] == answers[1] == [[10.0, None], [10.0, None], [11.0, None], [12.0, "SIGINT"]]


@pytest.mark.slow
def test_two_ranks_with_every_regulariser_and_averaging_resume_exactly(work, tmp_path):
    every = ["--dropout", "0.3", "--input-dropout", "0.2", "--embed-dropout", "0.1",
             "--weight-drop", "0.3", "--locked-dropout", "--tie-weights", "--embed", "24",
             "--ema", "0.9"]

    def args(out: Path, steps: int) -> list[str]:
        base = _args(work, out, steps)
        base[base.index("--dropout"):base.index("--dropout") + 2] = []
        base[base.index("--embed"):base.index("--embed") + 2] = []
        return [*base, *every, "--nproc", "2", "--quiet"]

    full = _run(work, "charlm", *args(tmp_path / "full", 6))
    assert full.returncode == 0, full.stderr
    part = _run(work, "charlm", *args(tmp_path / "part", 3))
    assert part.returncode == 0, part.stderr
    resumed = _run(work, "charlm", "train", "--nproc", "2", "--resume", str(tmp_path / "part"),
                   "--max-steps", "6", "--quiet")
    assert resumed.returncode == 0, resumed.stderr
    a, b = load_checkpoint(tmp_path / "full" / "last.pt"), load_checkpoint(tmp_path / "part" / "last.pt")
    assert a["step"] == b["step"] == 6 and a["model_config"]["tie_weights"] is True
    _assert_close(a["model"], b["model"])
    _assert_close(a["ema"]["model"], b["ema"]["model"])
