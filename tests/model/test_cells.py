"""Scratch recurrent cells equal torch's fused layers: outputs, states and every gradient."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call

from charlm.model.cells import ScratchRecurrent, gru_step, recurrent_layer
from charlm.model.config import IMPLS, resolve_impl
from charlm.errors import UsageError

MODES = ("rnn_tanh", "rnn_relu", "gru", "lstm")
# (batch, time, input, hidden)
SHAPES = [(1, 1, 3, 4), (3, 5, 4, 6), (2, 9, 5, 3)]
TOL = dict(atol=1e-5, rtol=1e-5)


def make_state(mode, layers, batch, hidden, dtype=torch.float32):
    shape = (layers, batch, hidden)
    if mode == "lstm":
        return (torch.randn(shape, dtype=dtype, requires_grad=True),
                torch.randn(shape, dtype=dtype, requires_grad=True))
    return torch.randn(shape, dtype=dtype, requires_grad=True)


def state_tensors(state):
    return list(state) if isinstance(state, tuple) else [state]


def run_and_grad(module, x, state):
    """Outputs, final states, then gradients of x, the initial state and every parameter."""
    for t in [x, *([] if state is None else state_tensors(state))]:
        t.grad = None
    module.zero_grad(set_to_none=True)
    out, final = module(x, state)
    finals = state_tensors(final)
    # A loss that weights every output and final state differently, so no gradient is trivial.
    g = torch.Generator().manual_seed(1)
    loss = (out * torch.randn(out.shape, generator=g)).sum()
    for f in finals:
        loss = loss + (f * torch.randn(f.shape, generator=g)).sum()
    loss.backward()
    grads = [x.grad] + ([] if state is None else [s.grad for s in state_tensors(state)])
    params = [p.grad for _, p in sorted(module.named_parameters())]
    return [out, *finals], grads, params


def assert_same_as_fused(impl, mode, shape, layers, with_state):
    torch.manual_seed(0)
    B, T, I, H = shape
    fused = recurrent_layer("fused", mode, I, H, layers, 0.0)
    other = recurrent_layer(impl, mode, I, H, layers, 0.0)
    other.load_state_dict(fused.state_dict(), strict=True)
    x = torch.randn(B, T, I, requires_grad=True)
    state = make_state(mode, layers, B, H) if with_state else None
    want = run_and_grad(fused, x, state)
    got = run_and_grad(other, x, state)
    for want_part, got_part in zip(want, got):
        assert len(want_part) == len(got_part)
        for w, g in zip(want_part, got_part):
            torch.testing.assert_close(g, w, **TOL)


@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("layers", [1, 2])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("mode", MODES)
def test_scratch_equals_fused(mode, shape, layers, with_state):
    assert_same_as_fused("scratch", mode, shape, layers, with_state)


def test_parameter_names_and_shapes_match_torch():
    for mode in MODES:
        fused = recurrent_layer("fused", mode, 5, 7, 2, 0.0)
        scratch = ScratchRecurrent(mode, 5, 7, 2)
        want = {k: tuple(v.shape) for k, v in fused.state_dict().items()}
        assert {k: tuple(v.shape) for k, v in scratch.state_dict().items()} == want


def test_initialisation_is_uniform_within_torch_bound():
    scratch = ScratchRecurrent("lstm", 10, 400, 1)
    bound = 1 / 400**0.5
    for p in scratch.parameters():
        assert p.abs().max().item() <= bound
        assert p.abs().max().item() > 0.95 * bound  # fills the range, not a smaller one


def _gradcheck(module, x, state):
    names = [n for n, _ in module.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_(True) for _, p in module.named_parameters())
    n_state = len(state_tensors(state))

    def fn(x, *rest):
        st = rest[:n_state]
        st = tuple(st) if module.mode == "lstm" else st[0]
        out, final = functional_call(module, dict(zip(names, rest[n_state:])), (x, st))
        return (out, *state_tensors(final))

    assert torch.autograd.gradcheck(fn, (x, *state_tensors(state), *params))


@pytest.mark.parametrize("mode", MODES)
def test_scratch_gradcheck_float64(mode):
    torch.manual_seed(0)
    module = ScratchRecurrent(mode, 3, 4, 2).double()
    x = torch.randn(2, 3, 3, dtype=torch.float64, requires_grad=True)
    _gradcheck(module, x, make_state(mode, 2, 2, 4, torch.float64))


def test_scratch_gru_reset_before_gradcheck_float64():
    torch.manual_seed(0)
    module = ScratchRecurrent("gru", 3, 4, 1, gru_reset="before").double()
    x = torch.randn(2, 3, 3, dtype=torch.float64, requires_grad=True)
    _gradcheck(module, x, make_state("gru", 1, 2, 4, torch.float64))


def naive_gru_reset_before(x, h0, w_ih, w_hh, b_ih, b_hh):
    """Cho et al. 2014 / d2l, one batch row and one time step at a time, vector by vector."""
    B, T, _ = x.shape
    H = w_hh.shape[1]
    w_ir, w_iz, w_in = w_ih[:H], w_ih[H : 2 * H], w_ih[2 * H :]
    w_hr, w_hz, w_hn = w_hh[:H], w_hh[H : 2 * H], w_hh[2 * H :]
    b_ir, b_iz, b_in = b_ih[:H], b_ih[H : 2 * H], b_ih[2 * H :]
    b_hr, b_hz, b_hn = b_hh[:H], b_hh[H : 2 * H], b_hh[2 * H :]
    rows = []
    for b in range(B):
        h = h0[b]
        outs = []
        for t in range(T):
            xt = x[b, t]
            r = torch.sigmoid(w_ir @ xt + b_ir + w_hr @ h + b_hr)
            z = torch.sigmoid(w_iz @ xt + b_iz + w_hz @ h + b_hz)
            n = torch.tanh(w_in @ xt + b_in + w_hn @ (r * h) + b_hn)
            h = (1 - z) * n + z * h
            outs.append(h)
        rows.append(torch.stack(outs))
    return torch.stack(rows)


@pytest.mark.parametrize("shape", [(1, 1, 2, 3), (2, 4, 3, 5)])
def test_gru_reset_before_matches_its_equation(shape):
    torch.manual_seed(0)
    B, T, I, H = shape
    module = ScratchRecurrent("gru", I, H, 1, gru_reset="before")
    x = torch.randn(B, T, I, requires_grad=True)
    h0 = torch.randn(1, B, H, requires_grad=True)
    out, h_n = module(x, h0)
    weights = [module.weight_ih_l0, module.weight_hh_l0, module.bias_ih_l0, module.bias_hh_l0]
    want = naive_gru_reset_before(x, h0[0], *weights)
    torch.testing.assert_close(out, want, **TOL)
    torch.testing.assert_close(h_n[0], want[:, -1], **TOL)
    got_grads = torch.autograd.grad(out.sum(), [x, h0, *weights])
    want_grads = torch.autograd.grad(want.sum(), [x, h0, *weights])
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, **TOL)


def test_gru_reset_before_differs_from_after():
    torch.manual_seed(0)
    after = ScratchRecurrent("gru", 3, 4)
    before = ScratchRecurrent("gru", 3, 4, gru_reset="before")
    before.load_state_dict(after.state_dict())
    x = torch.randn(2, 5, 3)
    assert not torch.allclose(after(x)[0], before(x)[0], atol=1e-3)


def test_gru_step_reset_placement_with_zero_state():
    # With H_prev = 0 both placements reduce to tanh(W_in x + b_in + b_hn) times (1 - Z): a
    # consistency check that "before" only moves R, not the biases.
    torch.manual_seed(0)
    w_ih, w_hh, b_ih, b_hh = torch.randn(9, 2), torch.randn(9, 3), torch.randn(9), torch.randn(9)
    x, h = torch.randn(4, 2), torch.zeros(4, 3)
    a = gru_step(x, h, w_ih, w_hh, b_ih, b_hh, reset="after")
    b = gru_step(x, h, w_ih, w_hh, b_ih, b_hh, reset="before")
    # after: R * b_hn; before: b_hn -> equal only if R == 1, so compare against the formula.
    r = torch.sigmoid(x @ w_ih[:3].T + b_ih[:3] + b_hh[:3])
    z = torch.sigmoid(x @ w_ih[3:6].T + b_ih[3:6] + b_hh[3:6])
    torch.testing.assert_close(a, (1 - z) * torch.tanh(x @ w_ih[6:].T + b_ih[6:] + r * b_hh[6:]))
    torch.testing.assert_close(b, (1 - z) * torch.tanh(x @ w_ih[6:].T + b_ih[6:] + b_hh[6:]))


def _impls_for(mode):
    return ["fused", "scratch"] + (["fast"] if mode == "gru" else [])


@pytest.mark.parametrize("mode", MODES)
def test_state_dict_cross_loading(mode):
    torch.manual_seed(0)
    x = torch.randn(2, 4, 3)
    modules = {impl: recurrent_layer(impl, mode, 3, 5, 2, 0.0) for impl in _impls_for(mode)}
    for src in modules.values():
        want = None
        for dst in modules.values():
            dst.load_state_dict(src.state_dict(), strict=True)
            out, final = dst(x)
            got = [out, *state_tensors(final)]
            if want is None:
                want = got
            for g, w in zip(got, want):
                torch.testing.assert_close(g, w, **TOL)


@pytest.mark.parametrize("mode", MODES)
def test_dropout_only_between_layers_and_only_in_training(mode):
    torch.manual_seed(0)
    x = torch.randn(3, 4, 2)
    for impl in _impls_for(mode):
        one = recurrent_layer(impl, mode, 2, 5, 1, 0.9).train()
        assert torch.equal(one(x)[0], one.eval()(x)[0])
        two = recurrent_layer(impl, mode, 2, 5, 2, 0.5)
        assert torch.equal(two.eval()(x)[0], two(x)[0])
        assert not torch.equal(two.eval()(x)[0], two.train()(x)[0])


@pytest.mark.parametrize("mode", MODES)
def test_dropout_one_feeds_zeros_to_second_layer_in_every_impl(mode):
    # p = 1 makes training-mode dropout deterministic: layer 2 sees zeros, in every implementation.
    torch.manual_seed(0)
    x = torch.randn(3, 4, 2)
    fused = recurrent_layer("fused", mode, 2, 5, 2, 1.0).train()
    want = fused(x)[0]
    single = recurrent_layer("fused", mode, 5, 5, 1, 0.0)
    single.load_state_dict({k.replace("_l1", "_l0"): v for k, v in fused.state_dict().items()
                            if k.endswith("_l1")})
    torch.testing.assert_close(want, single(torch.zeros(3, 4, 5))[0], **TOL)
    for impl in _impls_for(mode):
        other = recurrent_layer(impl, mode, 2, 5, 2, 1.0).train()
        other.load_state_dict(fused.state_dict())
        torch.testing.assert_close(other(x)[0], want, **TOL)


def test_recurrent_layer_types():
    assert isinstance(recurrent_layer("fused", "rnn_relu", 2, 3, 1, 0.0), nn.RNN)
    assert recurrent_layer("fused", "rnn_relu", 2, 3, 1, 0.0).nonlinearity == "relu"
    assert recurrent_layer("fused", "rnn_tanh", 2, 3, 1, 0.0).nonlinearity == "tanh"
    assert isinstance(recurrent_layer("fused", "gru", 2, 3, 1, 0.0), nn.GRU)
    assert isinstance(recurrent_layer("fused", "lstm", 2, 3, 1, 0.0), nn.LSTM)
    assert recurrent_layer("fused", "gru", 2, 3, 1, 0.0).batch_first
    assert isinstance(recurrent_layer("scratch", "gru", 2, 3, 2, 0.1, "before"), ScratchRecurrent)


RESET_MSG = "--gru-reset before exists only in the scratch implementation; use --impl scratch"


@pytest.mark.parametrize("impl", ["fused", "fast"])
def test_reset_before_only_in_scratch(impl):
    with pytest.raises(UsageError) as err:
        recurrent_layer(impl, "gru", 2, 3, 1, 0.0, gru_reset="before")
    assert str(err.value) == RESET_MSG
    assert err.value.exit_code == 2


@pytest.mark.parametrize("mode", ["rnn_tanh", "rnn_relu", "lstm"])
def test_fast_for_unsupported_cell_is_a_usage_error(mode):
    with pytest.raises(UsageError) as err:
        recurrent_layer("fast", mode, 2, 3, 1, 0.0)
    cell = "rnn" if mode.startswith("rnn") else mode
    assert str(err.value) == (
        f"--impl fast exists only for gru, mingru, minlstm, not {cell}; use --impl fused or "
        "--impl scratch"
    )


def test_unknown_values_are_usage_errors():
    with pytest.raises(UsageError, match="unknown implementation 'cudnn'"):
        recurrent_layer("cudnn", "gru", 2, 3)
    with pytest.raises(UsageError, match="unknown cell 'rnn'"):
        recurrent_layer("fused", "rnn", 2, 3)
    with pytest.raises(UsageError, match="unknown --gru-reset 'middle'"):
        recurrent_layer("scratch", "gru", 2, 3, gru_reset="middle")


def test_resolve_impl():
    assert IMPLS == ("fused", "scratch", "fast")
    assert resolve_impl("auto", "gru", "cpu") == "fast"
    assert resolve_impl("auto", "gru", "cuda") == "fused"
    assert resolve_impl("auto", "gru", "cuda", "before") == "scratch"
    assert resolve_impl("auto", "gru", "cpu", "before") == "scratch"
    for cell in ("rnn", "lstm"):
        assert resolve_impl("auto", cell, "cpu") == "fused"
        assert resolve_impl("auto", cell, "cuda") == "fused"
    for impl in ("fused", "scratch", "fast"):
        assert resolve_impl(impl, "gru", "cuda") == impl
