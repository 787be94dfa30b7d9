"""Training better models: each technique against a plain reference computation (locked and
embedding dropout, weight drop in every implementation, weight tying, averaged weights), then
exact resume with every option on, in every implementation."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest
import torch

from charlm.errors import UsageError
from charlm.model.cells import ScratchRecurrent, recurrent_layer
from charlm.model.config import ModelConfig
from charlm.model.dropout import dropout, drop_weight
from charlm.model.lm import CharLM
from charlm.artifacts.checkpoint import load_checkpoint
from charlm.artifacts.rundir import read_metrics
from charlm.config.build import build_config
from charlm.training.trainer import Trainer
from helpers import invoke, pydoc_text

pytestmark = pytest.mark.usefixtures("one_thread")

IMPLS = {"gru": ("fused", "scratch", "fast"), "lstm": ("fused", "scratch"),
         "rnn_tanh": ("fused", "scratch")}
EVERY_OPTION = dict(dropout=0.3, input_dropout=0.2, embed_dropout=0.1, weight_drop=0.3,
                    locked_dropout=True, tie_weights=True, ema=0.9)


@pytest.fixture(scope="module")
def small_text(tmp_path_factory) -> Path:
    return pydoc_text(tmp_path_factory.mktemp("corpus") / "small.txt", 20_000)


def tiny(small_text: Path, out: Path, **over):
    values = dict(text=[str(small_text)], hidden=16, layers=2, embed=8, batch_size=4,
                  num_steps=8, max_steps=16, time_budget="0", log_every=4, eval_every=6,
                  checkpoint_every=6, sample_length=10, warmup_steps=3, out=str(out))
    return build_config({}, {**values, **over})


# -- locked dropout -----------------------------------------------------------------------------

def test_a_locked_mask_is_the_same_at_every_step_and_differs_between_sequences():
    torch.manual_seed(0)
    out = dropout(torch.ones(64, 9, 20), 0.5, training=True, locked=True)
    assert torch.equal(out, out[:, :1].expand_as(out))  # one mask per sequence
    assert set(out.unique().tolist()) == {0.0, 2.0}  # dropped, or kept and scaled by 1/(1-p)
    assert not torch.equal(out[0], out[1])
    time_major = dropout(torch.ones(9, 64, 20), 0.5, training=True, locked=True, time_dim=0)
    assert torch.equal(time_major, time_major[:1].expand_as(time_major))
    assert torch.equal(dropout(torch.ones(3, 4, 5), 0.5, training=False, locked=True),
                       torch.ones(3, 4, 5))


@pytest.mark.parametrize("mode", IMPLS)
def test_locked_dropout_between_layers_in_every_implementation(mode):
    """Layer 2 of each implementation sees layer 1's output times one (B, 1, H) mask: the same
    as a hand-run of the two layers with that mask, drawn from the same generator state."""
    torch.manual_seed(0)
    x = torch.randn(3, 6, 4)
    for impl in IMPLS[mode]:
        stack = recurrent_layer(impl, mode, 4, 5, 2, 0.5, locked=True).train()
        single = [recurrent_layer("fused", mode, 4 if k == 0 else 5, 5, 1) for k in (0, 1)]
        for k, layer in enumerate(single):
            layer.load_state_dict({n.replace(f"_l{k}", "_l0"): v for n, v in
                                   stack.state_dict().items() if n.endswith(f"_l{k}")})
        torch.manual_seed(11)
        got, _ = stack(x)
        torch.manual_seed(11)
        mask = (torch.rand(3, 1, 5) >= 0.5) / 0.5  # keep where a uniform draw >= p
        want, _ = single[1](single[0](x)[0] * mask)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=impl)


def test_the_models_input_and_output_dropouts_are_locked_too():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=7, hidden=6, layers=1, embed=5, input_dropout=0.5,
                      dropout=0.5, locked_dropout=True, impl="scratch")
    model = CharLM(cfg).train()
    tokens = torch.full((2, 9), 3)  # the same character at every step
    x = model.inputs(tokens)
    assert torch.equal(x, x[:, :1].expand_as(x)) and (x == 0).any()


# -- embedding dropout ----------------------------------------------------------------------------

@pytest.mark.parametrize("embed", [6, 0])  # an embedding, or one-hot inputs
def test_embedding_dropout_drops_whole_characters(embed):
    torch.manual_seed(0)
    model = CharLM(ModelConfig(vocab_size=8, hidden=6, embed=embed, embed_dropout=0.5,
                               impl="fused")).train()
    tokens = torch.arange(8).repeat(4, 3)  # every character, 12 times per batch
    torch.manual_seed(5)
    x = model.inputs(tokens)
    torch.manual_seed(5)
    scale = (torch.rand(8) >= 0.5) / 0.5  # one factor per character
    plain = model.eval().inputs(tokens)
    torch.testing.assert_close(x, plain * scale[tokens][..., None])
    assert 0 < int((scale == 0).sum()) < 8


# -- weight drop ----------------------------------------------------------------------------------

def test_drop_weight_draws_one_mask_per_call():
    torch.manual_seed(3)
    w = torch.ones(6, 4)
    a = drop_weight(w, 0.5, training=True)
    assert set(a.unique().tolist()) <= {0.0, 2.0} and (a == 0).any()
    assert torch.equal(drop_weight(w, 0.5, training=False), w)


@pytest.mark.parametrize("mode", IMPLS)
def test_weight_drops_mask_reaches_the_recurrent_product(mode):
    """Every implementation multiplies by W_hh * mask (the mask drawn once for the batch, then
    used at every step and row): equal to the scratch cell run on that masked matrix."""
    torch.manual_seed(0)
    x = torch.randn(3, 7, 4)
    h0 = torch.randn(1, 3, 5)
    state = (h0, torch.randn(1, 3, 5)) if mode == "lstm" else h0
    for impl in IMPLS[mode]:
        layer = recurrent_layer(impl, mode, 4, 5, 1, weight_drop=0.5).train()
        reference = ScratchRecurrent(mode, 4, 5, 1).eval()
        reference.load_state_dict(layer.state_dict())
        torch.manual_seed(21)
        mask = (torch.rand_like(layer.weight_hh_l0) >= 0.5) / 0.5
        with torch.no_grad():
            reference.weight_hh_l0.mul_(mask)
        torch.manual_seed(21)
        got, _ = layer(x, state)
        want, _ = reference(x, state)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=impl)
        assert not torch.allclose(layer.eval()(x, state)[0], want)  # eval: W_hh as it is


def test_weight_drops_gradient_reaches_only_the_kept_weights():
    torch.manual_seed(0)
    for impl in IMPLS["gru"]:
        layer = recurrent_layer(impl, "gru", 3, 4, 1, weight_drop=0.5).train()
        x, h0 = torch.randn(2, 5, 3), torch.randn(1, 2, 4)
        torch.manual_seed(2)
        mask = (torch.rand_like(layer.weight_hh_l0) >= 0.5).float()
        torch.manual_seed(2)
        layer(x, h0)[0].sum().backward()
        grad = layer.weight_hh_l0.grad
        assert (grad[mask == 0] == 0).all() and (grad[mask == 1] != 0).all(), impl


# -- weight tying ---------------------------------------------------------------------------------

def test_tied_weights_are_one_tensor():
    torch.manual_seed(0)
    model = CharLM(ModelConfig(vocab_size=9, hidden=6, layers=1, embed=6, dropout=0.0,
                               tie_weights=True, impl="fused"))
    assert model.head.weight is model.embedding.weight and model.proj is None
    assert {"embedding.weight", "head.weight"} <= set(model.state_dict())
    assert len(list(model.parameters())) == 6  # embedding, 4 recurrent, head bias: counted once
    assert len(list(model.named_parameters(remove_duplicate=False))) == 7
    untied = CharLM(dataclasses.replace(model.config, tie_weights=False))
    untied.load_state_dict(model.state_dict())  # the same numbers in two tensors
    tokens, g = torch.tensor([[1, 2, 3, 1]]), torch.randn(1, 4, 9)
    (model(tokens)[0] * g).sum().backward()
    (untied(tokens)[0] * g).sum().backward()
    # the one tensor's gradient: what the input side and the output side each ask, added
    torch.testing.assert_close(model.embedding.weight.grad,
                               untied.embedding.weight.grad + untied.head.weight.grad)


def test_tying_with_another_embedding_size_goes_through_a_projection():
    torch.manual_seed(0)
    model = CharLM(ModelConfig(vocab_size=9, hidden=6, embed=4, tie_weights=True,
                               impl="scratch")).eval()
    assert model.proj.weight.shape == (4, 6) and model.head.weight is model.embedding.weight
    tokens = torch.tensor([[1, 2, 3, 4]])
    out, _ = model.rnn(model.inputs(tokens))
    want = out @ model.proj.weight.t() @ model.embedding.weight.t() + model.head.bias
    torch.testing.assert_close(model(tokens)[0], want)
    torch.testing.assert_close(model.output_weight(), model.embedding.weight @ model.proj.weight)


def test_tying_without_an_embedding_is_one_line():
    with pytest.raises(UsageError) as err:
        ModelConfig(vocab_size=9, embed=0, tie_weights=True).validate()
    assert str(err.value) == (
        "--tie-weights shares the embedding with the output layer, but --embed 0 has no "
        "embedding (one-hot inputs); give --embed N (N = --hidden ties without a projection)")
    result = invoke("train", "--embed", "0", "--tie-weights", "--time-budget", "1s")
    assert (result.exit_code, result.stderr) == (2, f"charlm: error: {err.value}\n")


def test_generate_folds_the_projection_into_its_steps(tmp_path):
    from charlm.inference.sample import SampleSettings, generate

    torch.manual_seed(0)
    model = CharLM(ModelConfig(vocab_size=9, hidden=6, embed=4, layers=2, tie_weights=True,
                               impl="fused")).eval()
    drawn = generate(model, [1, 2], SampleSettings(length=12, greedy=True))[0]
    ids, state, want = [1, 2], None, []  # one model call per character: the plain way
    logits, state = model(torch.tensor([ids]))
    for _ in range(12):
        nxt = int(logits[0, -1].argmax())
        want.append(nxt)
        logits, state = model(torch.tensor([[nxt]]), state)
    assert drawn == want


# -- averaged weights -----------------------------------------------------------------------------

def test_the_average_equals_a_hand_computed_one(small_text, tmp_path):
    trainer = Trainer(tiny(small_text, tmp_path / "run", ema=0.8, max_steps=7, eval_every=100))
    seen = [[p.detach().clone() for p in trainer.model.parameters()]]
    trainer.step_hook = lambda t: seen.append([p.detach().clone() for p in t.model.parameters()])
    trainer.run()
    avg = seen[0]
    for t, weights in enumerate(seen[1:], start=1):
        d = min(0.8, (1 + t) / (10 + t))
        avg = [d * a + (1 - d) * w for a, w in zip(avg, weights)]
    assert trainer.ema.updates == 7
    for got, want in zip(trainer.ema.avg, avg):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


def test_averaged_weights_are_validated_saved_and_used_by_generate_and_eval(small_text, tmp_path):
    trainer = Trainer(tiny(small_text, tmp_path / "run", ema=0.9))
    trainer.run()
    best = load_checkpoint(tmp_path / "run" / "best.pt")
    last = load_checkpoint(tmp_path / "run" / "last.pt")
    raw = dict(trainer.model.named_parameters())
    assert all(torch.equal(last["model"][n], p) for n, p in raw.items())  # raw: resume exact
    assert last["ema"]["updates"] == 16 and not torch.equal(
        last["ema"]["model"]["head.weight"], last["model"]["head.weight"])
    with trainer.ema.applied():  # the logged validation is the averaged model's
        logged = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl")
                  if r.get("val_kind") == "estimate"][-1]
        assert trainer.evaluate() == pytest.approx(logged["loss"], rel=1e-6)
    assert all(torch.equal(p, raw[n]) for n, p in trainer.model.named_parameters())

    def evaluate(*extra):
        result = invoke("eval", "perplexity", "--checkpoint", str(tmp_path / "run" / "last.pt"),
                        "--json", *extra)
        assert result.exit_code == 0, result.output
        import json

        return json.loads(result.stdout)

    auto, raw_eval = evaluate(), evaluate("--weights", "raw")
    assert (auto["weights"], raw_eval["weights"]) == ("ema", "raw")
    assert auto["nats_per_char"] != raw_eval["nats_per_char"]
    assert best["ema"] is not None


def test_a_stop_while_the_average_is_copied_in_saves_the_raw_weights(small_text, tmp_path):
    """A first Ctrl-C that lands while evaluation swaps the average in (or back out) is only a
    stop request: last.pt's "model" is the raw weights, exactly, and "ema" the average."""
    import signal

    from charlm.training.trainer import Interrupted

    trainer = Trainer(tiny(small_text, tmp_path / "run", ema=0.9, eval_every=3, max_steps=10))
    raw, avg = {}, {}

    class Tripwire(list):
        """The average's tensors; the first time they are read (to be copied in), the signal
        arrives after the first one."""

        def __iter__(self):
            if raw:
                yield from list.__iter__(self)
                return
            raw.update({k: v.clone() for k, v in trainer.model.state_dict().items()})
            avg.update({k: v.clone() for k, v in trainer.ema.state_dict()["model"].items()})
            for i, tensor in enumerate(list.__iter__(self)):
                yield tensor
                if i == 0:
                    trainer.requests.on_signal(signal.SIGINT, None)

    real_update = trainer.ema.update

    def update():  # after step 3's update, the evaluation at step 3 copies the average in
        real_update()
        if trainer.ema.updates == 3:
            trainer.ema.avg = Tripwire(trainer.ema.avg)

    trainer.ema.update = update
    with pytest.raises(Interrupted):
        trainer.run()
    last = load_checkpoint(tmp_path / "run" / "last.pt")
    assert last["step"] == 3 and raw.keys() == last["model"].keys() == avg.keys()
    assert all(torch.equal(last["model"][k], raw[k]) for k in raw)
    assert all(torch.equal(last["ema"]["model"][k], avg[k]) for k in avg)
    assert not torch.equal(raw["head.weight"], avg["head.weight"])


def test_asking_for_averaged_weights_a_run_does_not_have(tiny_run):
    result = invoke("eval", "perplexity", "--checkpoint", str(tiny_run / "run"), "--weights", "ema")
    assert result.exit_code == 1
    assert result.stderr == (f"charlm: error: {tiny_run / 'run' / 'best.pt'} holds no averaged "
                             "weights (it was trained without --ema); drop --weights ema\n")


# -- all together: checkpoints, exact resume, old checkpoints --------------------------------------

def _stopped_then_resumed(cfg, stop_at: int):
    from charlm.training.state import resolve_resume
    from charlm.training.trainer import Interrupted

    trainer = Trainer(cfg)

    def hook(t):
        if t.loop.step == stop_at:
            t.stop_signal.append("SIGINT")

    trainer.step_hook = hook
    with pytest.raises(Interrupted):
        trainer.run()
    again, resumed = resolve_resume({}, cfg.out)
    return Trainer(again, resume=resumed).run()


@pytest.mark.slow
@pytest.mark.parametrize("cell, impl", [("gru", "fused"), ("gru", "scratch"), ("gru", "fast"),
                                        ("lstm", "fused")])
def test_every_option_on_resumes_bit_identically(small_text, tmp_path, cell, impl):
    over = dict(EVERY_OPTION, cell=cell, impl=impl, embed=16)  # tied without a projection
    Trainer(tiny(small_text, tmp_path / "full", **over)).run()
    _stopped_then_resumed(tiny(small_text, tmp_path / "part", **over), 7)
    a, b = (load_checkpoint(tmp_path / run / "last.pt") for run in ("full", "part"))
    assert a["model_config"] == b["model_config"] and a["model_config"]["weight_drop"] == 0.3
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
        assert torch.equal(a["ema"]["model"][key], b["ema"]["model"][key]), key
    assert a["ema"]["updates"] == b["ema"]["updates"] == 16


def test_train_options_reach_the_checkpoint_and_the_regularisers_can_change_on_resume(small_text,
                                                                                      tmp_path):
    run = tmp_path / "run"
    shutil.rmtree(run, ignore_errors=True)
    args = ["train", "--text", str(small_text), "--hidden", "16", "--embed", "16", "--layers",
            "2", "--batch-size", "4", "--num-steps", "8", "--max-steps", "6", "--time-budget",
            "0", "--eval-every", "3", "--checkpoint-every", "3", "-q", "--out", str(run),
            "--tie-weights", "--locked-dropout", "--weight-drop", "0.2", "--input-dropout",
            "0.1", "--embed-dropout", "0.1", "--ema", "0.99"]
    assert invoke(*args).exit_code == 0
    ckpt = load_checkpoint(run / "last.pt")
    assert {k: ckpt["model_config"][k] for k in EVERY_OPTION if k in ckpt["model_config"]} == {
        "dropout": 0.2, "input_dropout": 0.1, "embed_dropout": 0.1, "weight_drop": 0.2,
        "locked_dropout": True, "tie_weights": True}
    assert ckpt["train_config"]["ema"] == 0.99 and ckpt["ema"]["decay"] == 0.99
    more = invoke("train", "--resume", str(run), "--max-steps", "9", "--weight-drop", "0.4", "-q")
    assert more.exit_code == 0, more.output
    assert load_checkpoint(run / "last.pt")["model_config"]["weight_drop"] == 0.4
    refused = invoke("train", "--resume", str(run), "--no-tie-weights")
    assert (refused.exit_code, refused.stderr) == (
        2, "charlm: error: --tie-weights False disagrees with the checkpoint (True) being "
           "resumed; drop the option or start a new run\n")
