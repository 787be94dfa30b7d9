"""FastGRU (hand-written backward) equals nn.GRU: outputs, final state and every gradient."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call

import charlm.model.fastgru as fastgru
from charlm.model.cells import recurrent_layer
from charlm.model.fastgru import FastGRU

SHAPES = [(1, 1, 3, 4), (3, 5, 4, 6), (2, 9, 5, 3), (4, 2, 1, 1)]  # (batch, time, input, hidden)
TOL = dict(atol=1e-5, rtol=1e-5)


def outputs_and_grads(module, x, h0):
    """[out, h_n], [dx, dh0], [d param for each sorted parameter name] for a weighted-sum loss."""
    for t in (x, h0):
        if t is not None:
            t.grad = None
    module.zero_grad(set_to_none=True)
    out, h_n = module(x, h0)
    g = torch.Generator().manual_seed(1)
    loss = (out * torch.randn(out.shape, generator=g, dtype=out.dtype)).sum()
    loss = loss + (h_n * torch.randn(h_n.shape, generator=g, dtype=out.dtype)).sum()
    loss.backward()
    inputs = [t.grad for t in (x, h0) if t is not None]
    return [out, h_n], inputs, [p.grad for _, p in sorted(module.named_parameters())]


def pair(I, H, layers, seed=0):
    torch.manual_seed(seed)
    fused = nn.GRU(I, H, layers, batch_first=True)
    fast = FastGRU(I, H, layers)
    fast.load_state_dict(fused.state_dict(), strict=True)
    return fused, fast


def assert_all_close(want, got, **tol):
    for want_part, got_part in zip(want, got):
        assert len(want_part) == len(got_part)
        for w, g in zip(want_part, got_part):
            torch.testing.assert_close(g, w, **(tol or TOL))


@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("layers", [1, 2])
@pytest.mark.parametrize("shape", SHAPES)
def test_fast_equals_fused(shape, layers, with_state):
    B, T, I, H = shape
    fused, fast = pair(I, H, layers)
    x = torch.randn(B, T, I, requires_grad=True)
    h0 = torch.randn(layers, B, H, requires_grad=True) if with_state else None
    assert_all_close(outputs_and_grads(fused, x, h0), outputs_and_grads(fast, x, h0))


@pytest.mark.parametrize("script", [True, False])
def test_python_loops_equal_torchscript_loops(script, monkeypatch):
    monkeypatch.setattr(fastgru, "USE_TORCHSCRIPT", script)
    scripted = isinstance(fastgru._loops()[0], torch.jit.ScriptFunction)
    assert scripted is script  # TorchScript works in this torch; False: the Python loops
    fused, fast = pair(3, 5, 2)
    x = torch.randn(3, 4, 3, requires_grad=True)
    h0 = torch.randn(2, 3, 5, requires_grad=True)
    assert_all_close(outputs_and_grads(fused, x, h0), outputs_and_grads(fast, x, h0))


def test_a_large_batch_equals_fused():
    fused, fast = pair(5, 7, 2)
    x = torch.randn(40, 6, 5, requires_grad=True)
    h0 = torch.randn(2, 40, 7, requires_grad=True)
    # weight gradients sum 40 x 6 terms here: compare them relative to their size
    assert_all_close(outputs_and_grads(fused, x, h0), outputs_and_grads(fast, x, h0), atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("script", [True, False])
def test_gradcheck_float64(script, monkeypatch):
    monkeypatch.setattr(fastgru, "USE_TORCHSCRIPT", script)
    torch.manual_seed(0)
    module = FastGRU(3, 4, 2).double()
    names = [n for n, _ in module.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_(True) for p in module.parameters())
    x = torch.randn(2, 3, 3, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(2, 2, 4, dtype=torch.float64, requires_grad=True)

    def fn(x, h0, *ps):
        return functional_call(module, dict(zip(names, ps)), (x, h0))

    assert torch.autograd.gradcheck(fn, (x, h0, *params))


def test_loss_on_final_state_only_and_input_without_grad():
    fused, fast = pair(3, 5, 2)
    x = torch.randn(3, 4, 3)  # like one-hot inputs: no gradient wanted
    grads = []
    for m in (fused, fast):
        m.zero_grad(set_to_none=True)
        m(x)[1].pow(2).sum().backward()
        grads.append([p.grad for _, p in sorted(m.named_parameters())])
    assert_all_close([grads[0]], [grads[1]])


def test_backward_twice_with_retain_graph_gives_the_same_gradients():
    _, fast = pair(3, 5, 1)
    x = torch.randn(2, 4, 3, requires_grad=True)
    out, _ = fast(x)
    first = torch.autograd.grad(out.sum(), [x, *fast.parameters()], retain_graph=True)
    second = torch.autograd.grad(out.sum(), [x, *fast.parameters()])
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_no_grad_and_inference_mode_and_non_contiguous_input():
    fused, fast = pair(4, 6, 2)
    x = torch.randn(5, 3, 4).transpose(0, 1)  # (B=3, T=5, I=4), not contiguous
    h0 = torch.randn(2, 3, 6)
    want = fused(x, h0)
    with torch.no_grad():
        got = fast(x, h0)
    assert_all_close([want], [got])
    with torch.inference_mode():
        got = fast(x, h0)
    assert_all_close([want], [got])


def test_float64_matches_fused_float64():
    fused, fast = pair(3, 4, 2)
    fused, fast = fused.double(), fast.double()
    x = torch.randn(2, 5, 3, dtype=torch.float64, requires_grad=True)
    want = outputs_and_grads(fused, x, None)
    got = outputs_and_grads(fast, x, None)
    assert got[0][0].dtype == torch.float64
    assert_all_close(want, got, atol=1e-12, rtol=1e-12)


def test_dropout_between_layers_only_in_training():
    torch.manual_seed(0)
    fast = FastGRU(3, 5, 2, dropout=0.5)
    x = torch.randn(2, 4, 3)
    fast.eval()
    assert torch.equal(fast(x)[0], fast(x)[0])
    fast.train()
    assert not torch.equal(fast(x)[0], fast.eval()(x)[0])


def test_same_parameters_as_nn_gru_and_torch_initialisation():
    fused, fast = nn.GRU(3, 300, 2, batch_first=True), recurrent_layer("fast", "gru", 3, 300, 2, 0.0)
    assert [(k, v.shape) for k, v in fused.state_dict().items()] == [
        (k, v.shape) for k, v in fast.state_dict().items()
    ]
    bound = 1 / 300**0.5
    for p in fast.parameters():
        assert 0.95 * bound < p.abs().max().item() <= bound
