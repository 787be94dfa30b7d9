"""What a run does differently on a GPU (or an Apple GPU), checked on the CPU where it can be:
dropout between layers from a generator the checkpoint holds, the training device's own RNG
state, the carried state in float32, real bf16, the implementation following the device, MPS
(no float64, auto passing over it for a GRU), the process group's devices, TF32, and the suite
pinned to the CPU. The GPU halves are the cuda-marked tests of tests/training/test_cuda.py."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from charlm.system import devices
from charlm.inference.evaluate import corpus_nll, perplexity_of
from charlm.model.config import ModelConfig
from charlm.model.fused import FusedGRU, FusedLSTM, fused_layer
from charlm.model.lm import CharLM
from charlm.training import runtime
from charlm.model.state import from_plain, to_plain
from charlm.training.state import rng_state, set_rng_state
from helpers import invoke, no_float64

pytestmark = pytest.mark.usefixtures("one_thread")


# -- the suite itself ---------------------------------------------------------------------------

def test_the_suite_runs_on_the_cpu_unless_a_test_is_marked_cuda():
    import os

    assert not torch.cuda.is_available() and torch.cuda.device_count() == 0
    assert devices.select_device("auto") == torch.device("cpu")
    assert os.environ["CUDA_VISIBLE_DEVICES"] == ""  # for the processes tests start


# -- dropout between fused layers ---------------------------------------------------------------

@pytest.mark.parametrize("cls", [FusedGRU, FusedLSTM])
def test_fused_dropout_between_layers_comes_from_the_default_generator(cls):
    """Layer by layer, the mask drawn from torch's generator (which checkpoints hold): the same
    as two single-layer modules with the mask between them (kept where a uniform draw is >= p)
    drawn after the same seed."""
    torch.manual_seed(0)
    stack = cls(3, 5, 2, dropout=0.5).train()
    one = {k: nn.GRU(3 if k == 0 else 5, 5, batch_first=True) if cls is FusedGRU
           else nn.LSTM(3 if k == 0 else 5, 5, batch_first=True) for k in (0, 1)}
    for k, layer in one.items():
        layer.load_state_dict({n.replace(f"_l{k}", "_l0"): v for n, v in stack.state_dict().items()
                               if n.endswith(f"_l{k}")})
    x = torch.randn(4, 6, 3)
    torch.manual_seed(7)
    got, _ = stack(x)
    torch.manual_seed(7)
    between = one[0](x)[0]
    want, _ = one[1](between * ((torch.rand(between.shape) >= 0.5) / 0.5))  # keep: uniform >= p
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    torch.manual_seed(7)
    assert torch.equal(stack(x)[0], got)  # the generator's state fixes the masks


def test_fused_layers_keep_torchs_parameters_and_load_old_checkpoints():
    torch.manual_seed(0)
    old = nn.GRU(3, 5, 2, dropout=0.2, batch_first=True)  # what a fused run saved before
    torch.manual_seed(0)
    new = fused_layer("gru", 3, 5, 2, dropout=0.2)
    assert list(new.state_dict()) == list(old.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(new.parameters(), old.parameters()))
    new.load_state_dict(old.state_dict())
    x = torch.randn(2, 7, 3)
    torch.testing.assert_close(new.eval()(x)[0], old.eval()(x)[0], rtol=0, atol=1e-6)


def test_bf16_autocast_runs_the_recurrent_layers_in_bf16():
    """autocast's cuDNN RNN wrapper would run them in fp16 whatever autocast's dtype: under bf16
    autocast the fused layers run on bf16 copies of input, state and weights instead."""
    torch.manual_seed(0)
    layer = fused_layer("gru", 3, 8, 2, dropout=0.0)
    x = torch.randn(2, 5, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, h = layer(x)
    assert out.dtype == h.dtype == torch.bfloat16
    plain = fused_layer("gru", 3, 8, 2)
    plain.load_state_dict(layer.state_dict())
    want, _ = plain.to(torch.bfloat16)(x.to(torch.bfloat16))
    assert torch.equal(out, want)


# -- the RNG state of the training device --------------------------------------------------------

class FakeCuda:
    """torch.cuda's generator functions, recording which device each call names."""

    def __init__(self, monkeypatch, devices_: int = 2):
        self.states = {i: torch.full((16,), i, dtype=torch.uint8) for i in range(devices_)}
        self.set_calls = []
        monkeypatch.setattr(torch.cuda, "get_rng_state", lambda d: self.states[d.index].clone())
        monkeypatch.setattr(torch.cuda, "set_rng_state",
                            lambda s, d: self.set_calls.append((d.index, s.clone())))
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)


def test_the_checkpoint_holds_the_training_devices_own_generator(monkeypatch):
    fake = FakeCuda(monkeypatch)
    state = rng_state(torch.device("cuda", 1))
    assert state["device"] == "cuda" and torch.equal(state["device_rng"], fake.states[1])
    assert set_rng_state(state, torch.device("cuda", 0)) is None  # resumed on another GPU
    assert [(i, s.tolist()) for i, s in fake.set_calls] == [(0, [1] * 16)]


def test_a_state_that_cannot_be_restored_says_so_in_one_line(monkeypatch):
    FakeCuda(monkeypatch)
    cpu_run = rng_state(torch.device("cpu"))
    assert set_rng_state(cpu_run, torch.device("cuda", 0)) == (
        "the checkpoint holds no usable cuda generator state (trained on cpu): from here on the "
        "run draws other dropout masks than an uninterrupted run would")
    assert set_rng_state(cpu_run, torch.device("cuda", 0), needed=False) is None  # no dropout
    gpu_run = rng_state(torch.device("cuda", 0))
    assert set_rng_state(gpu_run, torch.device("cpu")) == (
        "the checkpoint was trained on cuda, so its dropout masks came from that device's "
        "generator: resumed on the CPU, the run draws other masks than an uninterrupted run "
        "would")


def test_resuming_a_gpu_runs_checkpoint_on_the_cpu_warns_once(tiny_run, tmp_path):
    import shutil

    from charlm.artifacts.checkpoint import load_checkpoint, save_checkpoint

    run = tmp_path / "run"
    shutil.copytree(tiny_run / "run", run)
    ckpt = load_checkpoint(run / "last.pt")
    ckpt["rng"].update(device="cuda", device_rng=torch.zeros(16, dtype=torch.uint8))
    save_checkpoint({k: v for k, v in ckpt.items() if k not in ("format", "version")},
                    run / "last.pt")
    result = invoke("train", "--resume", str(run), "--max-steps", "12", "--dropout", "0.1", "-q")
    assert result.exit_code == 0, result.output
    assert result.stderr.count("charlm: warning: the checkpoint was trained on cuda") == 1


# -- the carried state ---------------------------------------------------------------------------

def test_the_carried_state_is_saved_and_restored_in_float32():
    h = torch.randn(2, 3, 4).to(torch.float16)
    assert to_plain(h).dtype == torch.float32
    assert all(t.dtype == torch.float32 for t in to_plain((h, h.bfloat16())))
    assert from_plain(h, "cpu").dtype == torch.float32  # an older fp16 checkpoint's
    assert all(t.dtype == torch.float32 for t in from_plain([h, h], "cpu"))


def test_a_checkpoint_with_a_half_precision_state_resumes_in_fp32(tiny_run, tmp_path):
    """What an fp16 run on a GPU saved before this fix: its state in fp16. It resumes on the
    CPU in fp32 (before: 'Input and hidden tensors are not the same dtype')."""
    import shutil

    from charlm.artifacts.checkpoint import load_checkpoint, save_checkpoint

    run = tmp_path / "run"
    shutil.copytree(tiny_run / "run", run)
    ckpt = load_checkpoint(run / "last.pt")
    assert ckpt["hidden"].dtype == torch.float32
    ckpt["hidden"] = ckpt["hidden"].half()
    save_checkpoint({k: v for k, v in ckpt.items() if k not in ("format", "version")},
                    run / "last.pt")
    result = invoke("train", "--resume", str(run), "--max-steps", "12", "--precision", "fp32",
                    "-q", "--json")
    assert result.exit_code == 0, result.output
    assert load_checkpoint(run / "last.pt")["hidden"].dtype == torch.float32


# -- the implementation follows the device --------------------------------------------------------

def test_a_fast_checkpoint_runs_fused_on_a_gpu_unless_told_otherwise(monkeypatch):
    from charlm.inference.loading import impl_for

    assert impl_for("fast", None, "gru", "cuda", "after") == "fused"
    assert impl_for("fast", None, "gru", "mps", "after") == "fused"
    assert impl_for("fast", None, "gru", "cpu", "after") == "fast"
    assert impl_for("fast", "fast", "gru", "cuda", "after") == "fast"  # --impl fast: as asked
    assert impl_for("scratch", None, "gru", "cuda", "before") == "scratch"
    assert impl_for("fused", "auto", "gru", "cpu", "after") == "fast"


def test_train_impl_fast_on_a_gpu_says_the_c_loops_are_cpu_only():
    mc = ModelConfig(vocab_size=5, impl="fast")
    text = runtime.impl_text(mc, torch.device("cuda", 0))
    assert text == ("fast: TorchScript loops on cuda; the C loops are CPU-only, and --impl fused "
                    "(cuDNN) is faster here")
    assert runtime.impl_text(dataclasses.replace(mc, impl="fused"), torch.device("cuda")) == "fused"


def test_mixed_precision_on_a_small_model_gets_a_warning():
    from charlm.config.build import build_config

    note = runtime.precision_note(build_config({}, {"precision": "fp16"}))
    assert note.startswith("--precision fp16 was measured slower than fp32 for the 2x256 GRU")
    assert runtime.precision_note(build_config({}, {"precision": "fp32"})) is None
    assert runtime.precision_note(build_config({}, {"precision": "bf16", "hidden": 1024})) is None


# -- Apple GPUs (MPS) ----------------------------------------------------------------------------

def test_evaluation_uses_no_float64():
    torch.manual_seed(0)
    model = CharLM(ModelConfig(vocab_size=11, cell="gru", hidden=8, layers=2, embed=4,
                               impl="fused")).eval()
    tokens = torch.randint(11, (300,))
    with no_float64():
        nll, count = corpus_nll(model, tokens, 4, 7)
        exact = perplexity_of(model, tokens, window=50)
    with torch.no_grad():  # the plain definition, in float64 on the CPU
        logits, _ = model(tokens[:-1][None])
        want = F.cross_entropy(logits[0].double(), tokens[1:], reduction="sum").item()
    assert exact.characters == 299 and exact.nats_per_char == pytest.approx(want / 299, rel=1e-6)
    assert count == 299 and nll / count == pytest.approx(want / 299, rel=0.05)  # B streams: an estimate


def test_auto_passes_over_mps_for_a_gru_and_says_so(monkeypatch):
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert devices.select_device("auto", "gru") == torch.device("cpu")
    assert devices.select_device("auto", "lstm") == torch.device("mps")
    assert devices.select_device("mps", "gru") == torch.device("mps")  # asked for: used
    from charlm.config.build import build_config

    text = runtime.device_text(build_config({}, {}), torch.device("cpu"))
    assert text.endswith("; auto skipped MPS for the GRU: slower than the CPU and NaN in "
                         "published reports, pytorch#123148, #94691; --device mps to use it")
    assert devices.auto_note("cpu", "gru") is None and devices.auto_note("auto", "lstm") is None


# -- CUDA devices and process groups ---------------------------------------------------------------

def test_cuda_n_becomes_the_current_device(monkeypatch):
    current = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda i: current.append(i))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: current[-1] if current else 0)
    assert devices.select_device("cuda:1") == torch.device("cuda", 1)
    assert current == [1]


def test_a_rank_sets_its_gpu_before_the_process_group_and_names_it(monkeypatch):
    import torch.distributed as dist

    from charlm.training import distributed

    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda i: calls.append(("set_device", i)))
    monkeypatch.setattr(dist, "init_process_group", lambda backend, device_id=None, **kw:
                        calls.append(("init", device_id)))
    monkeypatch.setattr(dist, "new_group", lambda **kw: "ctrl")
    for key, value in {"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(distributed, "_joined", False)  # both put back after the test
    monkeypatch.setattr(distributed, "_current", distributed.SINGLE)
    group = distributed.from_env("auto")
    assert calls == [("set_device", 1), ("init", torch.device("cuda", 1))]
    assert group.rank == 1 and group.ctrl == "ctrl"
    calls.clear()
    distributed._current = distributed.SINGLE
    distributed.from_env("cpu")  # --device cpu: the GPUs are left alone
    assert calls == [("init", None)]


# -- TF32 ---------------------------------------------------------------------------------------

def test_eval_perplexity_turns_tf32_off_and_training_records_its_choice(tiny_run):
    from charlm.artifacts.checkpoint import load_checkpoint

    devices.set_tf32(True)
    result = invoke("eval", "perplexity", "--checkpoint", str(tiny_run / "run"), "--json")
    assert result.exit_code == 0, result.output
    assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.set_flags(False)  # what torch.export does: the flags stay readable
    assert load_checkpoint(tiny_run / "run" / "last.pt")["train_config"]["tf32"] is False
    assert json.loads(result.stdout)["weights"] == "raw"


# -- scripts/gpu_check.sh ----------------------------------------------------------------------------

@pytest.mark.slow
def test_gpu_check_starts_and_prints_its_table_with_the_gpu_rows_skipped(tmp_path):
    """What CI can check of the GPU script on a machine without a GPU (the suite hides the GPUs
    from the processes it starts): it runs, says what it found, skips the rest, exits 0."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    done = subprocess.run(["bash", str(repo / "scripts" / "gpu_check.sh"), "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHON": sys.executable})
    assert done.returncode == 0, done.stderr
    table = [line for line in done.stdout.splitlines() if line.startswith("| ")]
    assert table[0] == "| check | result | detail |"
    rows = {cells[1].strip(): (cells[2].strip(), cells[3].strip())
            for cells in (line.split("|") for line in table[1:])}
    assert rows["environment"][0] == "PASS" and "no CUDA device" in rows["environment"][1]
    gpu_rows = [name for name in rows if name != "environment"]
    assert {"cuda tests", "train gru bf16", "resume exact (2 layers, dropout)",
            "ddp on 2 gpus", "trainer vs bare step"} <= set(gpu_rows)
    assert all(rows[name] == ("SKIP", "no CUDA device") for name in gpu_rows)
    assert json.loads((tmp_path / "gpu-check.json").read_text())[0][0] == "environment"
