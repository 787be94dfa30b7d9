"""The learning-rate schedules' values and the optimizer state loader, directly (the CLI runs
reach them only through whole trainings)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from charlm.errors import CharlmError
from charlm.training.optim import LRSchedule, load_optimizer_state, make_optimizer


# --- LRSchedule ---------------------------------------------------------------------------------


def test_none_is_the_base_rate_at_every_step():
    s = LRSchedule("none", 0.1, warmup=5)
    assert [s.lr(step, p) for step, p in ((0, 0.0), (3, 0.1), (1000, 0.7), (10**6, 1.0))] == [0.1] * 4
    s.observe(1.0)
    s.observe(2.0)
    s.observe(3.0)
    assert s.lr(7, 0.5) == 0.1  # validation losses move only plateau


def test_cosine_warms_up_linearly_then_decays_to_the_floor():
    s = LRSchedule("cosine", 2.0, warmup=4, floor=0.05)
    assert [s.lr(step, 0.0) for step in range(4)] == [0.5, 1.0, 1.5, 2.0]  # base x (step+1)/4
    # after the warm-up: base x (floor + (1 - floor) x (1 + cos(pi p)) / 2)
    assert s.lr(4, 0.0) == pytest.approx(2.0)
    assert s.lr(50, 0.25) == pytest.approx(2.0 * (0.05 + 0.95 * (1 + math.sqrt(2) / 2) / 2))
    assert s.lr(50, 0.25) == pytest.approx(1.7217514421272201)
    assert s.lr(60, 0.5) == pytest.approx(2.0 * (0.05 + 0.95 * 0.5))  # 1.05
    assert s.lr(70, 0.75) == pytest.approx(2.0 * (0.05 + 0.95 * (1 - math.sqrt(2) / 2) / 2))
    assert s.lr(80, 1.0) == pytest.approx(0.1)  # floor x base
    assert s.lr(90, 1.7) == pytest.approx(0.1)  # progress past the end stays at the floor
    assert s.lr(5, -0.3) == pytest.approx(2.0)  # and before the start at the base


def test_cosine_without_warm_up_starts_at_the_base_rate():
    s = LRSchedule("cosine", 0.001, warmup=0, floor=0.0)
    assert s.lr(0, 0.0) == pytest.approx(0.001)
    assert s.lr(1, 0.5) == pytest.approx(0.0005)
    assert s.lr(2, 1.0) == pytest.approx(0.0, abs=1e-15)


def test_plateau_halves_after_patience_evaluations_without_improvement():
    s = LRSchedule("plateau", 0.01, factor=0.5, patience=2)
    rates = []
    for loss in (2.0, 2.0, 1.9999, 1.0, 1.0, 0.99995, 0.5, 0.6, 0.7):
        s.observe(loss)
        rates.append(s.lr(0, 0.0))
    # 2.0 best; 2.0 and 1.9999 (not 1e-4 better) are two bad evaluations: x0.5; 1.0 best;
    # 1.0, 0.99995 two more: x0.5; 0.5 best; 0.6, 0.7 two more: x0.5
    assert rates == [0.01, 0.01, 0.005, 0.005, 0.005, 0.0025, 0.0025, 0.0025, 0.00125]
    assert s.state_dict() == {"scale": 0.125, "best": 0.5, "bad_evals": 0}
    assert s.lr(10**6, 1.0) == 0.00125  # steps and progress do not move it


def test_a_plateau_schedule_continues_from_its_state():
    s = LRSchedule("plateau", 0.01, factor=0.1, patience=1)
    s.load_state_dict({"scale": 0.1, "best": 3.0, "bad_evals": 0})
    assert s.lr(0, 0.0) == pytest.approx(0.001)
    s.observe(3.5)
    assert s.lr(0, 0.0) == pytest.approx(0.0001)


# --- load_optimizer_state -----------------------------------------------------------------------


def _model_and_adam(seed: int = 0, lr: float = 0.01):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 1, bias=False))
    return model, make_optimizer("adam", model.parameters(), lr=lr, weight_decay=0.0)


def _step(model, optimizer) -> None:
    x = torch.arange(12, dtype=torch.float32).reshape(4, 3) / 10
    optimizer.zero_grad()
    model(x).square().sum().backward()
    optimizer.step()


def test_a_good_state_is_restored_equal_and_the_next_step_is_the_same():
    model, adam = _model_and_adam()
    _step(model, adam)
    _step(model, adam)
    saved = copy.deepcopy(adam.state_dict())  # as read from a file: no tensor shared with adam
    twin, fresh = _model_and_adam(seed=1, lr=0.5)
    twin.load_state_dict(model.state_dict())
    load_optimizer_state(fresh, saved, "ckpt.pt")
    got = fresh.state_dict()
    assert got["state"].keys() == saved["state"].keys() == {0, 1, 2}
    for i, entry in saved["state"].items():
        assert got["state"][i].keys() == entry.keys()
        for name, value in entry.items():
            assert torch.equal(got["state"][i][name], value), (i, name)
    assert got["param_groups"][0]["lr"] == 0.5  # hyperparameters stay the optimizer's own
    for group in adam.param_groups:
        group["lr"] = 0.5
    _step(model, adam)
    _step(twin, fresh)
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)


def _saved():
    model, adam = _model_and_adam()
    _step(model, adam)
    return adam.state_dict()


def _refusal(saved) -> str:
    _, fresh = _model_and_adam()
    with pytest.raises(CharlmError) as exc:
        load_optimizer_state(fresh, saved, "ckpt.pt")
    assert fresh.state_dict()["state"] == {}  # nothing was loaded
    return str(exc.value)


def _end(problem: str) -> str:
    return f"ckpt.pt: its 'optimizer' entry {problem}; the file is damaged or was edited"


def test_a_state_tensor_of_the_wrong_shape_is_refused():
    saved = _saved()
    saved["state"][0]["exp_avg"] = torch.zeros(5)
    assert _refusal(saved) == _end("holds exp_avg of parameter 0 as a float32 tensor of shape "
                                   "(5,); it must be a float tensor of shape (2, 3)")
    saved = _saved()
    saved["state"][1]["step"] = torch.zeros(1)
    assert _refusal(saved) == _end("holds step of parameter 1 as a float32 tensor of shape (1,); "
                                   "it must be a float tensor of shape ()")
    saved = _saved()
    saved["state"][2]["exp_avg_sq"] = torch.zeros(1, 2, dtype=torch.int64)
    assert _refusal(saved) == _end("holds exp_avg_sq of parameter 2 as a int64 tensor of shape "
                                   "(1, 2); it must be a float tensor of shape (1, 2)")
    saved = _saved()
    saved["state"][2]["exp_avg"] = [[0.0, 0.0]]
    assert _refusal(saved) == _end("holds exp_avg of parameter 2 as list; it must be a float "
                                   "tensor of shape (1, 2)")


def test_wrong_keys_and_parameters_are_refused():
    saved = _saved()
    saved["state"][0]["momentum_buffer"] = torch.zeros(2, 3)
    assert _refusal(saved) == _end(
        "holds ['exp_avg', 'exp_avg_sq', 'momentum_buffer', 'step'] for parameter 0, not a Adam "
        "state (exp_avg, exp_avg_sq, max_exp_avg_sq, step)")
    saved = _saved()
    del saved["state"][1]["exp_avg_sq"]
    assert _refusal(saved) == _end(
        "holds ['exp_avg', 'step'] for parameter 1, not a Adam state (exp_avg, exp_avg_sq, "
        "max_exp_avg_sq, step)")
    saved = _saved()
    saved["state"][7] = saved["state"].pop(2)
    assert _refusal(saved) == _end("holds state for an unknown parameter 7")
    saved = _saved()
    saved["param_groups"][0]["params"] = [0, 1]
    assert _refusal(saved) == _end("has groups of [2] parameters, but the model's optimizer has [3]")
    saved = _saved()
    saved["param_groups"][0]["params"] = [0, 1, 1]
    assert _refusal(saved) == _end("names its parameters other than by distinct numbers")
    assert _refusal({"state": {}}) == _end("lacks its 'state' and 'param_groups'")


def test_values_no_optimizer_makes_are_refused():
    saved = _saved()
    saved["state"][1]["exp_avg_sq"][0] = -1.0
    assert _refusal(saved) == _end("holds exp_avg_sq of parameter 1 with values no optimizer makes")
    saved = _saved()
    saved["state"][0]["exp_avg"][1, 2] = float("nan")
    assert _refusal(saved) == _end("holds exp_avg of parameter 0 with values no optimizer makes")
