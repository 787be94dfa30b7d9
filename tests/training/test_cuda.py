"""On a CUDA GPU: the implementations agree, mixed precision trains, the default config resumes
bit-identically, checkpoints move between GPU and CPU, generate and eval run there.

Every test here is marked `cuda`: it is skipped without a GPU (tests/conftest.py), and it names
its device itself (the rest of the suite is pinned to the CPU). scripts/gpu_check.sh runs them.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from charlm.system.devices import set_tf32
from charlm.model.cells import recurrent_layer
from charlm.artifacts.checkpoint import load_checkpoint
from charlm.config.build import build_config
from charlm.training.trainer import Trainer
from helpers import invoke, pydoc_text

pytestmark = pytest.mark.cuda

IMPLS = {"gru": ("fused", "scratch", "fast"), "lstm": ("fused", "scratch"),
         "rnn_tanh": ("fused", "scratch"), "rnn_relu": ("fused", "scratch")}


@pytest.fixture(autouse=True)
def exact_float32():
    set_tf32(False)  # cuDNN would use TF32 by default: 1e-3, not 1e-6, between implementations
    yield


@pytest.fixture(scope="module")
def small_text(tmp_path_factory) -> Path:
    return pydoc_text(tmp_path_factory.mktemp("corpus") / "small.txt", 30_000)


def tiny(small_text: Path, out: Path, **over):
    values = dict(text=[str(small_text)], hidden=32, layers=2, embed=16, dropout=0.2,
                  batch_size=8, num_steps=16, max_steps=37, time_budget="0", log_every=5,
                  eval_every=10, checkpoint_every=10, warmup_steps=5, sample_length=20,
                  device="cuda", out=str(out))
    return build_config({}, {**values, **over})


def outputs_and_grads(layer, x, state):
    out, final = layer(x, state)
    finals = list(final) if isinstance(final, tuple) else [final]
    g = torch.Generator(device=x.device).manual_seed(1)
    loss = (out * torch.randn(out.shape, generator=g, device=x.device)).sum()
    for f in finals:
        loss = loss + (f * torch.randn(f.shape, generator=g, device=x.device)).sum()
    layer.zero_grad(set_to_none=True)
    loss.backward()
    return [out, *finals] + [p.grad for _, p in sorted(layer.named_parameters())]


@pytest.mark.parametrize("mode", IMPLS)
def test_the_implementations_agree_on_cuda_without_tf32(mode):
    torch.manual_seed(0)
    x = torch.randn(4, 9, 5, device="cuda")
    h = torch.randn(2, 4, 7, device="cuda")
    state = (h, torch.randn_like(h)) if mode == "lstm" else h
    layers = {impl: recurrent_layer(impl, mode, 5, 7, 2, 0.0).cuda() for impl in IMPLS[mode]}
    want = None
    for impl, layer in layers.items():
        layer.load_state_dict(layers["fused"].state_dict())
        got = outputs_and_grads(layer, x, state)
        want = want or got
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=impl)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_trains(small_text, tmp_path, precision):
    if precision == "bf16" and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")
    summary = Trainer(tiny(small_text, tmp_path / "run", precision=precision, max_steps=60,
                           dropout=0.0, lr=0.01)).run()
    rows = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [r["loss"] for r in rows if r["kind"] == "train"]
    assert train[-1] < train[0] - 0.3 and summary["val_loss"] is not None
    ckpt = load_checkpoint(tmp_path / "run" / "last.pt")
    assert ckpt["hidden"].dtype == torch.float32  # resumable under any precision, anywhere
    assert all(t.dtype == torch.float32 for t in ckpt["model"].values())


def test_bf16_runs_the_recurrent_layers_in_bf16():
    if not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")
    layer = recurrent_layer("fused", "gru", 5, 8, 2, 0.2).cuda().train()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out, h = layer(torch.randn(3, 4, 5, device="cuda"))
    assert out.dtype == h.dtype == torch.bfloat16  # autocast's cuDNN wrapper would give fp16


def _weights(path: Path) -> dict:
    return load_checkpoint(path)["model"]


def _stopped_then_resumed(cfg, stop_at: int) -> None:
    from charlm.training.state import resolve_resume
    from charlm.training.trainer import Interrupted

    trainer = Trainer(cfg)
    trainer.step_hook = lambda t: t.stop_signal.append("SIGINT") if t.loop.step == stop_at else None
    with pytest.raises(Interrupted):
        trainer.run()
    again, resumed = resolve_resume({}, cfg.out)
    Trainer(again, resume=resumed).run()


@pytest.mark.parametrize("over", [
    {},  # the default shape: 2 layers, dropout 0.2 between them (cuDNN's own state before)
    {"locked_dropout": True, "weight_drop": 0.3, "input_dropout": 0.1, "embed_dropout": 0.1,
     "tie_weights": True, "embed": 32, "ema": 0.9},
    {"cell": "lstm"},
], ids=["default", "every-regulariser", "lstm"])
def test_a_run_with_dropout_resumes_bit_identically(small_text, tmp_path, over):
    Trainer(tiny(small_text, tmp_path / "full", **over)).run()
    _stopped_then_resumed(tiny(small_text, tmp_path / "part", **over), 13)
    a, b = _weights(tmp_path / "full" / "last.pt"), _weights(tmp_path / "part" / "last.pt")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_a_gpu_checkpoint_on_the_cpu_and_generate_and_eval_on_cuda(small_text, tmp_path):
    Trainer(tiny(small_text, tmp_path / "run", max_steps=30)).run()
    run = str(tmp_path / "run")
    figures = {}
    for device in ("cuda", "cpu"):
        result = invoke("eval", "perplexity", "--checkpoint", run, "--device", device, "--json")
        assert result.exit_code == 0, result.output
        figures[device] = json.loads(result.stdout)
    assert figures["cuda"]["device"].startswith("cuda") and figures["cpu"]["device"] == "cpu"
    assert figures["cuda"]["nats_per_char"] == pytest.approx(figures["cpu"]["nats_per_char"],
                                                             rel=1e-5)
    drawn = [invoke("generate", "--checkpoint", run, "--device", "cuda", "--seed", "3",
                    "--length", "40", "--json") for _ in range(2)]
    assert all(d.exit_code == 0 for d in drawn), drawn[0].output
    samples = [json.loads(d.stdout)["samples"][0] for d in drawn]
    assert samples[0] == samples[1] and len(samples[0]) == 40


def test_a_fast_checkpoint_runs_fused_on_cuda(small_text, tmp_path):
    Trainer(tiny(small_text, tmp_path / "run", device="cpu", impl="fast", max_steps=10)).run()
    result = invoke("eval", "perplexity", "--checkpoint", str(tmp_path / "run"), "--device",
                    "cuda", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["impl"] == "fused"


def test_an_fp16_run_resumes_in_fp32_and_on_the_cpu(small_text, tmp_path):
    Trainer(tiny(small_text, tmp_path / "run", precision="fp16", max_steps=10)).run()
    shutil.copytree(tmp_path / "run", tmp_path / "cpu")
    on_gpu = invoke("train", "--resume", str(tmp_path / "run"), "--precision", "fp32",
                    "--max-steps", "20", "-q")
    assert on_gpu.exit_code == 0, on_gpu.output
    on_cpu = invoke("train", "--resume", str(tmp_path / "cpu"), "--precision", "fp32",
                    "--device", "cpu", "--max-steps", "20", "-q")
    assert on_cpu.exit_code == 0, on_cpu.output
    assert on_cpu.stderr.count("charlm: warning: the checkpoint was trained on cuda") == 1
    assert load_checkpoint(tmp_path / "cpu" / "last.pt")["step"] == 20


def test_two_gpus_train_one_model(small_text, tmp_path):
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    import os
    import subprocess
    import sys

    env = {**os.environ, "CHARLM_RUNS_DIR": str(tmp_path / "runs")}
    proc = subprocess.run(
        [sys.executable, "-m", "charlm", "train", "--text", str(small_text), "--hidden", "32",
         "--batch-size", "8", "--num-steps", "16", "--max-steps", "20", "--time-budget", "0",
         "--device", "cuda", "--nproc", "2", "--out", str(tmp_path / "ddp"), "--json"],
        capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["world_size"] == 2
