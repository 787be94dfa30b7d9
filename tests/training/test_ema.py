"""--ema's averaged weights against the formula in charlm/training/ema.py, by hand:

    avg <- d_t * avg + (1 - d_t) * w        d_t = min(DECAY, (1 + t) / (10 + t)),  t = 1, 2, ...
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from charlm.training.ema import WeightAverage


def _scalar_model(value: float) -> nn.Linear:
    model = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(value)
    return model


def _set(model: nn.Module, value: float) -> None:
    with torch.no_grad():
        model.weight.fill_(value)


def test_the_first_updates_follow_the_warm_up_ramp():
    model = _scalar_model(1.0)
    ema = WeightAverage(model, decay=0.999)
    _set(model, 2.0)
    assert ema.factor() == pytest.approx(2 / 11)  # t = 1
    ema.update()
    assert ema.avg[0].item() == pytest.approx(2 / 11 * 1.0 + 9 / 11 * 2.0)  # 20/11
    _set(model, 4.0)
    assert ema.factor() == pytest.approx(3 / 12)  # t = 2
    ema.update()
    assert ema.avg[0].item() == pytest.approx(3 / 12 * 20 / 11 + 9 / 12 * 4.0)  # 38/11
    assert ema.updates == 2
    assert model.weight.item() == 4.0  # training steps the raw weights


def test_the_decay_caps_the_ramp():
    """With DECAY 0.5 the ramp (1+t)/(10+t) reaches it at t = 8: d = 2/11, 3/12, ..., 8/17, then
    0.5 for good."""
    model = _scalar_model(0.0)
    ema = WeightAverage(model, decay=0.5)
    factors, avg = [], 0.0
    for t in range(1, 13):
        factors.append(ema.factor())
        w = float(t * t)
        _set(model, w)
        ema.update()
        d = min(0.5, (1 + t) / (10 + t))
        avg = d * avg + (1 - d) * w
        assert ema.avg[0].item() == pytest.approx(avg, rel=1e-6), t
    assert factors == pytest.approx([2 / 11, 3 / 12, 4 / 13, 5 / 14, 6 / 15, 7 / 16, 8 / 17,
                                     0.5, 0.5, 0.5, 0.5, 0.5])


def test_every_tensor_is_averaged_and_applied_only_inside_the_block():
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    start = [p.detach().clone() for p in model.parameters()]
    ema = WeightAverage(model, decay=0.9)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update()  # d_1 = 2/11
    raw = [p.detach().clone() for p in model.parameters()]
    expected = [2 / 11 * s + 9 / 11 * r for s, r in zip(start, raw)]
    for got, want in zip(ema.avg, expected):
        assert torch.allclose(got, want, rtol=0, atol=1e-6)
    with ema.applied():
        for p, want in zip(model.parameters(), expected):
            assert torch.allclose(p, want, rtol=0, atol=1e-6)
    for p, r in zip(model.parameters(), raw):
        assert torch.equal(p, r)
    state = ema.state_dict()
    assert (state["decay"], state["updates"]) == (0.9, 1)
    assert torch.equal(state["model"]["weight"], ema.avg[0])
    assert torch.equal(state["model"]["bias"], ema.avg[1])
