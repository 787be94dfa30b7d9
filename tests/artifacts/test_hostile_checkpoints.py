"""Crafted checkpoints: plain data that would still exhaust memory, corrupt it, or break a resume.

Three classes, one section each:

* tensors that declare more elements than their storage holds (a 57 KB file declaring a
  200000 x 20000 tensor of stride 0): refused by arithmetic on the sizes, before any check reads
  a value; the commands run under a memory cap, so a regression fails instead of swapping;
* optimizer state that does not fit its parameters (a wrong-shaped `exp_avg` made the fused
  AdamW step write out of bounds: SIGSEGV): run in forked children, which may crash alone;
* training-state fields missing, of the wrong type or absurd, weights near float32's limit,
  complex or integer weights: each a one-line "damaged" error, and no file of the run touched.
"""

from __future__ import annotations

import contextlib
import math
import os
import resource
import shutil
from pathlib import Path

import pytest

pytestmark = pytest.mark.usefixtures("one_thread")
import torch

from helpers import run_main
from forkserver import ForkServer

DAMAGED = "the file is damaged or was edited"
HUGE = (200_000, 20_000)  # 4e9 elements: 16 GB as float32, declared over one stored element


def plain(tiny_run: Path) -> dict:
    return torch.load(tiny_run / "run" / "last.pt", weights_only=True)


def expanded(dtype=torch.float32, shape=HUGE) -> torch.Tensor:
    return torch.zeros(1, dtype=dtype).expand(*shape)


@contextlib.contextmanager
def memory_cap(extra: int = 1 << 30):
    """Address space capped at what this process maps now + `extra`: a check that computes over a
    declared 16 GB fails with an allocation error instead of taking the machine down."""
    with open("/proc/self/status") as fh:
        vm = next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmSize:"))
    before = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (vm + extra, before[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, before)


def edited_run(tiny_run: Path, tmp_path: Path, edit) -> Path:
    """A copy of the tiny run whose last.pt has been edited (best.pt removed)."""
    run = tmp_path / "run"
    shutil.copytree(tiny_run / "run", run)
    ckpt = plain(tiny_run)
    edit(ckpt)
    torch.save(ckpt, run / "last.pt")
    (run / "best.pt").unlink()
    return run


def contents(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


COMMANDS = {
    "generate": ["generate", "--checkpoint", "{run}/last.pt", "--length", "5", "--seed", "1"],
    "eval": ["eval", "perplexity", "--checkpoint", "{run}/last.pt", "--text", "{small}"],
    "resume": ["train", "--resume", "{run}", "--max-steps", "12", "-q"],
}


def refused(command: str, run: Path, tiny_run: Path, tmp_path: Path, monkeypatch,
            runner=None) -> tuple[int, str, str]:
    """Run `command` on the edited run; the run directory must come out untouched."""
    monkeypatch.setenv("CHARLM_RUNS_DIR", str(tmp_path / "runs"))
    before = contents(run)
    args = [a.replace("{run}", str(run)).replace("{small}", str(tiny_run / "small.txt"))
            for a in COMMANDS[command]]
    if runner is None:
        with memory_cap():
            result = run_main(args)
    else:
        env = {**os.environ, "CHARLM_RUNS_DIR": str(tmp_path / "runs")}
        result = runner(args, tmp_path, env)
    assert contents(run) == before
    assert not (tmp_path / "runs").exists()  # no `latest` pointer written either
    return result


@pytest.fixture(scope="module")
def fork_server(tmp_path_factory):
    server = ForkServer(tmp_path_factory.mktemp("fork-server"))
    yield server
    server.close()


# --- tensors that declare more than they hold -----------------------------------------------------


def _expand_weight(ckpt):
    ckpt["model"]["head.weight"] = expanded()


def _expand_hidden(ckpt):
    ckpt["hidden"] = expanded(shape=HUGE + (16,))


def _expand_exp_avg(ckpt):
    ckpt["optimizer"]["state"][0]["exp_avg"] = expanded()


def _expand_rng(ckpt):
    ckpt["rng"]["torch"] = expanded(torch.uint8, (torch.get_rng_state().numel(),))


DECLARED = {
    "weight": (_expand_weight, "'model' entry holds a tensor head.weight that declares shape "
               "(200000, 20000) (4,000,000,000 elements) but holds data for 1"),
    "hidden": (_expand_hidden, "'hidden' entry holds a tensor that declares shape (200000, "
               "20000, 16) (64,000,000,000 elements) but holds data for 1"),
    "exp_avg": (_expand_exp_avg, "'optimizer' entry holds a tensor state.0.exp_avg that declares "
                "shape (200000, 20000) (4,000,000,000 elements) but holds data for 1"),
    "rng": (_expand_rng, "'rng' entry holds a tensor torch that declares shape (5056,) (5,056 "
            "elements) but holds data for 1"),
}


@pytest.mark.slow
@pytest.mark.parametrize("field, command", [
    pytest.param(f, c, id=f"{c}-{f}") for f in DECLARED for c in COMMANDS
    if c == "resume" or f == "weight"])
def test_a_tensor_larger_than_its_storage_is_refused_before_any_arithmetic(
        field, command, tiny_run, tmp_path, monkeypatch, fork_server):
    edit, problem = DECLARED[field]
    run = edited_run(tiny_run, tmp_path, edit)
    assert (run / "last.pt").stat().st_size < 200_000  # a small file, whatever it declares
    # an optimizer step over it writes out of bounds: only in a forked child, which may crash
    runner = fork_server.run if field == "exp_avg" else None
    code, out, err = refused(command, run, tiny_run, tmp_path, monkeypatch, runner)
    assert (code, out, err) == (1, "", f"charlm: error: {run / 'last.pt'}: its {problem}; "
                                       f"{DAMAGED}\n")


# --- optimizer state that does not fit its parameters ---------------------------------------------


def _shape(ckpt) -> tuple:
    return tuple(ckpt["optimizer"]["state"][0]["exp_avg"].shape)


OPTIMIZER_EDITS = {
    "exp_avg-too-short": (
        lambda c: c["optimizer"]["state"][0].update(exp_avg=torch.zeros(3)),
        "holds exp_avg of parameter 0 as a float32 tensor of shape (3,); it must be a float "
        "tensor of shape {shape}"),
    "exp_avg_sq-too-long": (
        lambda c: c["optimizer"]["state"][0].update(exp_avg_sq=torch.zeros(4096, 64)),
        "holds exp_avg_sq of parameter 0 as a float32 tensor of shape (4096, 64); it must be a "
        "float tensor of shape {shape}"),
    "exp_avg-complex": (
        lambda c: c["optimizer"]["state"][0].update(
            exp_avg=torch.zeros(_shape(c), dtype=torch.complex64)),
        "holds exp_avg of parameter 0 as a complex64 tensor of shape {shape}; it must be a "
        "float tensor of shape {shape}"),
    "step-a-number": (
        lambda c: c["optimizer"]["state"][0].update(step=10.0),
        "holds step of parameter 0 as float; it must be a float tensor of shape ()"),
    "exp_avg_sq-negative": (
        lambda c: c["optimizer"]["state"][0]["exp_avg_sq"].fill_(-1.0),
        "holds exp_avg_sq of parameter 0 with values no optimizer makes"),
    "state-of-an-unknown-parameter": (
        lambda c: c["optimizer"]["state"].update({99: c["optimizer"]["state"][0]}),
        "holds state for an unknown parameter 99"),
    "one-parameter-short": (
        lambda c: c["optimizer"]["param_groups"][0]["params"].pop(),
        "has groups of [{n_1}] parameters, but the model's optimizer has [{n}]"),
    "sgd-state-in-adamw": (
        lambda c: c["optimizer"]["state"].update({0: {"momentum_buffer": torch.zeros(3)}}),
        "holds ['momentum_buffer'] for parameter 0, not a AdamW state (exp_avg, exp_avg_sq, "
        "max_exp_avg_sq, step)"),
}


@pytest.mark.slow
@pytest.mark.parametrize("edit", list(OPTIMIZER_EDITS))
def test_optimizer_state_is_checked_against_its_parameters_before_a_step(
        edit, tiny_run, tmp_path, monkeypatch, fork_server):
    change, problem = OPTIMIZER_EDITS[edit]
    ckpt = plain(tiny_run)
    n, shape = len(ckpt["optimizer"]["param_groups"][0]["params"]), _shape(ckpt)
    run = edited_run(tiny_run, tmp_path, change)
    code, out, err = refused("resume", run, tiny_run, tmp_path, monkeypatch,
                             runner=fork_server.run)
    problem = (problem.replace("{shape}", str(shape)).replace("{n_1}", str(n - 1))
               .replace("{n}", str(n)))
    assert (code, out, err) == (1, "", f"charlm: error: {run / 'last.pt'}: its 'optimizer' entry "
                                       f"{problem}; {DAMAGED}\n")


def test_an_optimizer_state_of_the_right_shape_resumes_with_this_runs_hyperparameters(
        tiny_run, tmp_path, monkeypatch):
    """Only the per-parameter state comes from the file: an edited weight decay or a 'fused'
    flag from another machine does not (the run's configuration says what they are)."""
    def edit(c):
        c["optimizer"]["param_groups"][0].update(weight_decay=1e9, betas=(2.0, "x"), fused=None)
    run = edited_run(tiny_run, tmp_path, edit)
    monkeypatch.setenv("CHARLM_RUNS_DIR", str(tmp_path / "runs"))
    assert run_main(["train", "--resume", str(run), "--max-steps", "12", "-q"])[0] == 0
    group = torch.load(run / "last.pt", weights_only=True)["optimizer"]["param_groups"][0]
    assert group["weight_decay"] == 0.01 and group["betas"] == (0.9, 0.999)


# --- training-state fields: missing, of the wrong type, absurd ------------------------------------


def _set(path: str, value):
    def edit(ckpt):
        *parents, last = path.split("/")
        target = ckpt
        for key in parents:
            target = target[key]
        if value is KeyError:
            del target[last]
        else:
            target[last] = value(target[last]) if callable(value) else value
    return edit


def _ema(fill=None, decay=0.9, dtype=None):
    """An edit that gives the run averaged weights (--ema), optionally made absurd."""
    def edit(ckpt):
        weights = {k: v.clone() for k, v in ckpt["model"].items()}
        if fill is not None:
            weights["head.weight"].fill_(fill)
        if dtype is not None:
            weights["head.weight"] = weights["head.weight"].to(dtype)
        ckpt["ema"] = {"decay": decay, "updates": 3, "model": weights}
    return edit


STATE_EDITS = {
    "rng-missing": (_set("rng", KeyError), "'rng' entry is missing, so the run cannot be resumed"),
    "iterator-missing": (_set("iterator", KeyError),
                         "'iterator' entry is missing, so the run cannot be resumed"),
    "iterator-position-a-string": (
        _set("iterator/position", "3"), "'iterator' entry does not hold whole numbers >= 0 for "
        "epoch, position, seed, batch_size, num_steps, num_tokens"),
    "iterator-epoch-beyond-int64": (
        _set("iterator/epoch", 2**70), "'iterator' entry does not hold whole numbers >= 0 for "
        "epoch, position, seed, batch_size, num_steps, num_tokens"),
    "scheduler-without-scale": (_set("scheduler/scale", KeyError),
                                "'scheduler' entry lacks one of scale, best, bad_evals"),
    "scheduler-scale-negative": (
        _set("scheduler/scale", -1.0),
        "'scheduler' entry holds {'scale': -1.0, 'best': inf, 'bad_evals': 0}, not a schedule's "
        "state"),
    "step-beyond-int64": (_set("step", 2**70),
                          f"'step' entry is {2**70}, not a whole number in [0, 2**63)"),
    "world-size-a-string": (_set("world_size", "2"),
                            "'world_size' entry is '2', not a number of processes"),
    "world-size-zero": (_set("world_size", 0), "'world_size' entry is 0, not a number of processes"),
    "hidden-of-another-batch": (_set("hidden", torch.zeros(1, 3, 16)),
                                "'hidden' entry has shape (1, 3, 16) but its train_config has "
                                "batch_size = 4"),
    "hidden-complex": (_set("hidden", torch.zeros(1, 4, 16, dtype=torch.complex64)),
                       "'hidden' entry has dtype complex64, not a float"),
    "hidden-integer": (_set("hidden", torch.zeros(1, 4, 16, dtype=torch.int64)),
                       "'hidden' entry has dtype int64, not a float"),
    "hidden-two-parts-for-a-gru": (_set("hidden", lambda h: [h, h]),
                                   "'hidden' entry holds 2 state tensor(s), but a gru carries 1"),
    "hidden-near-float32-max": (_set("hidden", lambda h: h.fill_(3e38)),
                                "'hidden' entry holds a tensor of magnitude 3e+38, beyond any "
                                "trained model's (at most 1e+06)"),
    "weights-near-float32-max": (_set("model/head.weight", lambda w: w.fill_(-3.4e38)),
                                 "'model' entry holds a weight head.weight of magnitude 3.4e+38, "
                                 "beyond any trained model's (at most 1e+06)"),
    "weights-complex": (_set("model/head.weight", lambda w: w.to(torch.complex64)),
                        "'model' entry holds weight head.weight of dtype complex64, not a float"),
    "weights-integer": (_set("model/rnn.weight_hh_l0", lambda w: w.to(torch.int32)),
                        "'model' entry holds weight rnn.weight_hh_l0 of dtype int32, not a float"),
    "train-config-batch-zero": (_set("train_config/batch_size", 0),
                                "'train_config' entry is invalid (batch_size must be an integer "
                                ">= 1, got 0)"),
    "corpus-tokens-a-string": (_set("corpus/num_tokens", "many"),
                               "'corpus' entry has num_tokens = 'many', of the wrong type"),
    "scaler-not-numbers": (_set("scaler", {"scale": "x"}),
                           "'scaler' entry is not a loss scaler's state (numbers)"),
    "ema-weights-near-float32-max": (_ema(fill=3.4e38), "'ema' entry holds a weight head.weight "
                                     "of magnitude 3.4e+38, beyond any trained model's (at most "
                                     "1e+06)"),
    "ema-weights-integer": (_ema(dtype=torch.int32),
                            "'ema' entry is not a table of averaged float weights"),
    "ema-decay-one": (_ema(decay=1.0),
                      "'ema' entry lacks its decay in [0, 1) and whole update count"),
    "rng-device-state-a-string": (lambda ckpt: ckpt["rng"].update(device="cuda", device_rng="x"),
                                  "'rng' entry does not hold its device's generator state"),
    "eval-pending-a-number": (_set("eval_pending", 1),
                              "'eval_pending' entry is 1, not false, 'periodic' or 'whole'"),
    "eval-pending-true": (_set("eval_pending", True),
                          "'eval_pending' entry is True, not false, 'periodic' or 'whole'"),
    "eval-pending-missing": (_set("eval_pending", KeyError),
                             "'eval_pending' entry is missing, not false, 'periodic' or 'whole'"),
    "rng-python-position-past-the-end": (lambda ckpt: ckpt["rng"]["python"].__setitem__(-1, 625),
                                         "'rng' entry does not hold Python's generator state"),
}


@pytest.mark.parametrize("edit", list(STATE_EDITS))
def test_a_damaged_training_state_is_one_line_before_any_file_is_written(
        edit, tiny_run, tmp_path, monkeypatch):
    change, problem = STATE_EDITS[edit]
    run = edited_run(tiny_run, tmp_path, change)
    code, out, err = refused("resume", run, tiny_run, tmp_path, monkeypatch)
    assert (code, out, err) == (1, "", f"charlm: error: {run / 'last.pt'}: its {problem}; "
                                       f"{DAMAGED}\n")


def test_a_checkpoint_of_another_batch_order_is_not_resumed(tiny_run, tmp_path, monkeypatch):
    """An iterator state without this batch order's "layout" would repeat or skip windows. One
    line, nothing written."""
    run = edited_run(tiny_run, tmp_path, _set("iterator/layout", KeyError))
    code, out, err = refused("resume", run, tiny_run, tmp_path, monkeypatch)
    assert (code, out, err) == (1, "", "charlm: error: invalid batch iterator state: layout None, "
                                       "not 3\n")


def test_a_model_config_without_every_key_is_not_loaded(tiny_run, tmp_path, monkeypatch):
    """A missing key would load with today's default: another model than the one trained."""
    run = edited_run(tiny_run, tmp_path, lambda ckpt: ckpt["model_config"].pop("layers"))
    code, out, err = refused("resume", run, tiny_run, tmp_path, monkeypatch)
    assert (code, out, err) == (1, "", "charlm: error: checkpoint's model config lacks "
                                       "['layers']; the file is damaged\n")


@pytest.mark.parametrize("edit", ["weights-near-float32-max", "weights-complex", "weights-integer"])
@pytest.mark.parametrize("command", ["generate", "eval"])
def test_generate_and_eval_refuse_weights_no_model_was_trained_to(
        edit, command, tiny_run, tmp_path, monkeypatch):
    change, problem = STATE_EDITS[edit]
    run = edited_run(tiny_run, tmp_path, change)
    code, out, err = refused(command, run, tiny_run, tmp_path, monkeypatch)
    assert (code, out, err) == (1, "", f"charlm: error: {run / 'last.pt'}: its {problem}; "
                                       f"{DAMAGED}\n")


def test_a_float64_carried_state_resumes_as_the_models_float32(tiny_run, tmp_path, monkeypatch):
    run = edited_run(tiny_run, tmp_path, _set("hidden", lambda h: h.double()))
    monkeypatch.setenv("CHARLM_RUNS_DIR", str(tmp_path / "runs"))
    code, _, err = run_main(["train", "--resume", str(run), "--max-steps", "12", "-q"])
    assert code == 0, err
    assert torch.load(run / "last.pt", weights_only=True)["hidden"].dtype == torch.float32
    assert math.isfinite(torch.load(run / "last.pt", weights_only=True)["best_val_loss"])


# --- the text a checkpoint was trained on ------------------------------------------------------------


def test_the_corpus_digest_is_the_sha256_of_the_token_ids_whatever_their_dtype():
    import hashlib
    import struct

    from charlm.data.dataset import token_digest

    ids = [0, 5, 27, 3, 3, 1000, 7]
    want = hashlib.sha256(struct.pack(f"<{len(ids)}i", *ids)).hexdigest()
    tokens = torch.tensor(ids)
    assert token_digest(tokens) == token_digest(tokens.to(torch.int16)) == want
    assert token_digest(tokens[:3], tokens[3:], chunk=2) == want  # splits, chunks: one digest


def test_a_text_replaced_by_another_of_the_same_length_is_refused(tiny_run, tmp_path, monkeypatch):
    text = tmp_path / "notes.txt"
    original = (tiny_run / "small.txt").read_text(encoding="utf-8")
    text.write_text(original, encoding="utf-8")
    run = edited_run(tiny_run, tmp_path, _set("train_config/text", [str(text)]))
    trained = torch.load(run / "last.pt", weights_only=True)["corpus"]["sha256"]
    swapped = original.translate(str.maketrans("ae", "ea"))  # same length, same symbols
    text.write_text(swapped, encoding="utf-8")
    monkeypatch.setenv("CHARLM_RUNS_DIR", str(tmp_path / "runs"))
    before = contents(run)

    code, out, err = run_main(["eval", "perplexity", "--checkpoint", str(run / "last.pt"), "-q"])
    now = err.split("hashes to sha256 ")[1].split()[0] if "sha256" in err else "?"
    assert now != trained and len(now) == 64
    assert (code, out, err) == (1, "", (
        f"charlm: error: the corpus now hashes to sha256 {now} but {run / 'last.pt'} was trained "
        f"on a text that hashes to {trained}; the text changed since training, so its splits "
        "cannot be rebuilt: to evaluate this text anyway, pass it with --text FILE\n"))
    code, out, err = run_main(["train", "--resume", str(run), "--max-steps", "12", "-q"])
    assert (code, out, err) == (1, "", (
        f"charlm: error: {run / 'last.pt'}: the corpus is not the text this run was trained on "
        f"(its tokens hash to sha256 {now}, the text trained on to {trained}); resume with the "
        "same text\n"))
    assert contents(run) == before
    # the explicit way to score the changed text
    code, out, err = run_main(["eval", "perplexity", "--checkpoint", str(run / "last.pt"),
                               "--text", str(text), "--json"])
    assert code == 0, err
    # and the text as it was resumes
    text.write_text(original, encoding="utf-8")
    assert run_main(["train", "--resume", str(run), "--max-steps", "12", "-q"])[0] == 0
