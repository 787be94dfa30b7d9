"""`charlm generate --beam N`: beam search equals exhaustive search when the beam is wide enough,
a plainly written beam search when it is not, and --greedy at --beam 1; bad beams are usage
errors."""

from __future__ import annotations

import itertools
import json

import pytest
import torch
import torch.nn.functional as F

from charlm.inference.beam import beam_search
from charlm.model.config import ModelConfig
from charlm.model.lm import CharLM
from charlm.inference.sample import without_unk
from helpers import run_main

pytestmark = pytest.mark.usefixtures("one_thread")

V, LENGTH, PREFIX = 5, 4, [1, 2, 3]
CHARS = range(1, V)  # what a continuation is made of: every id but <unk> (0)


def tiny_model(cell: str, impl: str, seed: int) -> CharLM:
    torch.manual_seed(seed)
    model = CharLM(ModelConfig(vocab_size=V, cell=cell, hidden=8, layers=2, embed=3, impl=impl))
    with torch.no_grad():  # peakier distributions than at initialisation
        for p in model.parameters():
            p.mul_(4)
    return model.eval()


@torch.no_grad()
def log_prob(model: CharLM, prefix: list[int], continuations: list[list[int]]) -> torch.Tensor:
    """log p(continuation | prefix) for each continuation, from one forward over the whole text,
    <unk> (id 0) excluded as it is when sampling."""
    text = torch.tensor([prefix + c for c in continuations])
    logp = F.log_softmax(without_unk(model(text[:, :-1])[0]).double(), -1)
    targets = text[:, 1:, None]
    return logp.gather(-1, targets)[:, len(prefix) - 1:, 0].sum(1)


@torch.no_grad()
def plain_beam(model: CharLM, prefix: list[int], beam: int, length: int) -> list[list[int]]:
    """Beam search as written in a textbook: score every extension from scratch, keep the best."""
    beams = [[]]
    for _ in range(length):
        candidates = [b + [c] for b in beams for c in CHARS]
        scores = log_prob(model, prefix, candidates).tolist()
        ranked = sorted(range(len(candidates)), key=lambda i: -scores[i])
        beams = [candidates[i] for i in ranked[:beam]]
    return beams


@pytest.mark.parametrize("cell, impl", [("gru", "fast"), ("lstm", "fused"), ("rnn", "scratch")])
@pytest.mark.parametrize("prefix", [PREFIX, []], ids=["prefix", "no-prefix"])
def test_a_beam_of_v_to_the_length_minus_one_is_exhaustive_search(cell, impl, prefix):
    model = tiny_model(cell, impl, seed=3)
    every = [list(c) for c in itertools.product(CHARS, repeat=LENGTH)]
    if not prefix:  # from the zero state: charlm reads the first character off the bias
        scores = torch.stack([log_prob_from_zero(model, c) for c in every])
    else:
        scores = log_prob(model, prefix, every)
    order = torch.argsort(scores, descending=True).tolist()
    width = len(CHARS) ** (LENGTH - 1)
    found = beam_search(model, prefix, width, LENGTH)
    assert len(found) == width
    assert [h.log_prob for h in found] == pytest.approx(scores[order[:width]].tolist(), abs=1e-5)
    for h in found:  # each is what exhaustive search scores it
        assert h.log_prob == pytest.approx(scores[every.index(h.ids)].item(), abs=1e-5)
        assert h.score == pytest.approx(h.log_prob / LENGTH)
    assert found[0].ids == every[order[0]]  # the likeliest continuation of all


@torch.no_grad()
def log_prob_from_zero(model: CharLM, continuation: list[int]) -> torch.Tensor:
    """Without a prefix: the first character from the zero state (the head's bias), the rest
    from a forward pass that starts at the zero state."""
    first = F.log_softmax(without_unk(model.head.bias).double(), -1)[continuation[0]]
    return first + log_prob(model, continuation[:1], [continuation[1:]])[0]


@pytest.mark.parametrize("beam", [1, 2, 3])
def test_a_narrow_beam_equals_a_plainly_written_beam_search(beam):
    model = tiny_model("gru", "fused", seed=5)
    found = beam_search(model, PREFIX, beam, 6)
    assert [h.ids for h in found] == plain_beam(model, PREFIX, beam, 6)
    best = max(log_prob(model, PREFIX, [list(c) for c in itertools.product(CHARS, repeat=6)]))
    assert found[0].log_prob <= best.item() + 1e-5


def test_beam_one_is_greedy_and_a_beam_finds_likelier_text(tiny_run):
    run = str(tiny_run / "run")
    args = ["generate", "--checkpoint", run, "--prefix", "the ", "--length", "80", "-q"]
    greedy, beam1 = run_main([*args, "--greedy"]), run_main([*args, "--beam", "1"])
    assert greedy[0] == 0 and greedy == beam1
    code, out, err = run_main([*args, "--beam", "6", "--num-samples", "3", "--json"])
    assert (code, err) == (0, "")
    payload = json.loads(out)
    assert payload["settings"]["beam"] == 6 and payload["settings"]["seed"] is None
    assert len(payload["samples"]) == len(payload["scores"]) == 3
    from charlm.inference.loading import load_model

    loaded = load_model(run, None, "cpu")
    prefix = loaded.vocab.encode("the ").tolist()
    texts = [loaded.vocab.encode(s).tolist() for s in payload["samples"]]
    exact = log_prob(loaded.model, prefix, texts).tolist()
    for score, lp in zip(payload["scores"], exact):
        assert score["log_prob"] == pytest.approx(lp, abs=1e-5)
        assert score["nats_per_char"] == pytest.approx(-lp / 80, abs=1e-7)
    assert exact == sorted(exact, reverse=True)
    greedy_text = loaded.vocab.encode(greedy[1][len("the "):-1]).tolist()
    assert exact[0] >= log_prob(loaded.model, prefix, [greedy_text]).item() - 1e-6


@pytest.mark.parametrize("args, message", [
    (["--beam", "0"], "--beam must be >= 1, got 0"),
    (["--beam", "2", "--greedy"], "give --greedy or --beam, not both (--beam 1 is greedy)"),
    (["--beam", "2", "--num-samples", "3"],
     "--num-samples 3 asks for more of the best beams than --beam 2 keeps; use --num-samples <= --beam"),
    (["--beam", "1000"], "--beam 1000 is more than the {V} symbols a continuation can use (the "
                         "model's vocabulary less <unk>); use --beam {V} or less"),
    (["--beam", "{V+1}"], "--beam {V+1} is more than the {V} symbols a continuation can use (the "
                          "model's vocabulary less <unk>); use --beam {V} or less"),
])
def test_bad_beams_are_one_line_usage_errors(tiny_run, args, message):
    from charlm.artifacts.checkpoint import load_checkpoint

    vocab = load_checkpoint(tiny_run / "run" / "best.pt")["model_config"]["vocab_size"]
    usable = vocab - 1  # all but <unk>

    def filled(text):
        return text.replace("{V+1}", str(usable + 1)).replace("{V}", str(usable))

    code, out, err = run_main(["generate", "--checkpoint", str(tiny_run / "run"), "-q",
                               *map(filled, args)])
    assert (code, out, err) == (2, "", f"charlm: error: {filled(message)}\n")
