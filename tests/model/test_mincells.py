"""minGRU and minLSTM (charlm.model.mincells): the parallel scan (fused) and the CPU loop (fast)
equal the step equations (scratch) to 1e-5 in float32, pass float64 gradcheck, carry their state
across windows exactly, and the sampler's step gives the forward pass's logits."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from charlm.errors import UsageError
from charlm.model.config import ModelConfig, resolve_impl
from charlm.model import minkernel
from charlm.model.lm import CharLM, count_parameters
from charlm.model.mincells import (MinStack, MinStepper, g, gru_step, log_g, log_scan, lstm_step,
                                   parameter_count)
from charlm.artifacts.card import _model_line
from charlm.config.build import build_config

pytestmark = pytest.mark.usefixtures("one_thread")
TOL = dict(atol=1e-5, rtol=1e-5)  # as tests/test_cells.py compares the other cells

CELLS = ("mingru", "minlstm")
STACKS = {  # the stack's options: the default, the bare cells, every option on
    "default": {},
    "bare": {"residual": False, "norm": "none"},
    "rms-ffn": {"norm": "rms", "ffn": 2},
}


@pytest.fixture(params=["compiled", "torch"])
def loops(request, monkeypatch):
    """`fast` in its C loops (charlm.model.minkernel) and in its torch fallback."""
    if request.param == "torch":
        monkeypatch.setattr(minkernel, "usable", lambda *tensors: False)
    elif minkernel.load() is None:
        pytest.skip(f"no compiled loops here: {minkernel.status()}")
    return request.param


@pytest.fixture(params=["fused", "fast", "fast-torch"])
def window_impl(request, monkeypatch):
    """The implementations that take the window at once: the parallel scan, and `fast` in its C
    loops and in its torch fallback."""
    if request.param == "fast-torch":
        monkeypatch.setattr(minkernel, "usable", lambda *tensors: False)
    elif request.param == "fast" and minkernel.load() is None:
        pytest.skip(f"no compiled loops here: {minkernel.status()}")
    return request.param.removesuffix("-torch")


def stack(cell: str, impl: str, options: dict, seed: int = 0, scale: float = 2.0, **sizes) -> MinStack:
    torch.manual_seed(seed)
    sizes = {"input_size": 6, "hidden": 8, "layers": 3, **sizes}
    model = MinStack(cell, impl, **sizes, **options)
    with torch.no_grad():  # larger gate weights than at initialisation: gates that move
        for block in model.blocks:
            block.gates.weight.mul_(scale)
    return model


def inputs(B: int, T: int, I: int, H: int, L: int, dtype=torch.float32):
    gen = torch.Generator().manual_seed(1)
    return (torch.randn(B, T, I, generator=gen, dtype=dtype),
            torch.rand(L, B, H, generator=gen, dtype=dtype))


def test_g_is_the_papers_activation():
    x = torch.tensor([-30.0, -2.0, -1e-3, 0.0, 1e-3, 2.0, 50.0], dtype=torch.float64)
    assert torch.equal(g(x), torch.where(x >= 0, x + 0.5, torch.sigmoid(x)))
    assert g(torch.tensor(0.0)).item() == 0.5 and g(torch.tensor(2.0)).item() == 2.5
    assert torch.allclose(log_g(x), g(x).log(), rtol=1e-12, atol=0)
    assert log_g(torch.tensor(-200.0)).item() == pytest.approx(-200.0)  # no log(0)


def test_the_step_equations_by_hand():
    k, h_tilde, h = torch.tensor([[0.3]]), torch.tensor([[-1.2]]), torch.tensor([[0.7]])
    z = 1 / (1 + math.exp(-0.3))
    cand = 1 / (1 + math.exp(1.2))
    assert gru_step(torch.cat([k, h_tilde], 1), h).item() == pytest.approx((1 - z) * 0.7 + z * cand)
    kf, ki = torch.tensor([[1.5]]), torch.tensor([[-0.5]])
    f, i = 1 / (1 + math.exp(-1.5)), 1 / (1 + math.exp(0.5))
    want = f / (f + i) * 0.7 + i / (f + i) * cand  # the gates normalised to sum 1
    assert lstm_step(torch.cat([kf, ki, h_tilde], 1), h).item() == pytest.approx(want)


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("options", STACKS.values(), ids=STACKS.keys())
@pytest.mark.parametrize("T, with_state", [(1, True), (37, True), (100, False)])
def test_the_window_at_once_equals_the_step_equations_to_1e5(cell, window_impl, options, T,
                                                              with_state):
    impl = window_impl
    ref, model = stack(cell, "scratch", options), stack(cell, impl, options)
    x, h0 = inputs(3, T, 6, 8, 3)
    want, want_h = ref(x, h0 if with_state else None)
    got, got_h = model(x, h0 if with_state else None)
    assert got.shape == (3, T, 8) and got_h.shape == (3, 3, 8)
    torch.testing.assert_close(got, want, **TOL)
    torch.testing.assert_close(got_h, want_h, **TOL)
    assert want_h.abs().max() > 0.5  # states that moved


@pytest.mark.parametrize("cell", CELLS)
def test_gradients_equal_the_step_equations(cell, window_impl):
    impl = window_impl
    x, h0 = inputs(2, 21, 6, 8, 3)
    gen = torch.Generator().manual_seed(4)  # a loss that weights every output differently
    weights = torch.randn(2, 21, 8, generator=gen), torch.randn(3, 2, 8, generator=gen)
    grads = []
    for which in ("scratch", impl):
        model = stack(cell, which, STACKS["rms-ffn"], scale=1.0)
        xs, hs = x.clone().requires_grad_(), h0.clone().requires_grad_()
        out, h_n = model(xs, hs)
        ((out * weights[0]).sum() + (h_n * weights[1]).sum()).backward()
        grads.append([xs.grad, hs.grad] + [p.grad for p in model.parameters()])
    for got, want in zip(grads[1], grads[0]):
        torch.testing.assert_close(got, want, **TOL)


@pytest.mark.parametrize("lstm", [False, True])
def test_the_compiled_loops_give_the_same_numbers_on_two_threads(lstm):
    """Each thread runs whole rows: splitting them changes no number."""
    if minkernel.load() is None:
        pytest.skip(f"no compiled loops here: {minkernel.status()}")
    gen = torch.Generator().manual_seed(5)
    gates = torch.randn(5, 40, (3 if lstm else 2) * 24, generator=gen)
    h0, dh = torch.rand(5, 24, generator=gen), torch.randn(5, 40, 24, generator=gen)
    results = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        h = minkernel.forward(lstm, gates, h0)
        results.append([h, *minkernel.backward(lstm, gates, h0, h, dh)])
    torch.set_num_threads(1)
    assert all(torch.equal(a, b) for a, b in zip(*results))


def test_without_the_kernel_the_torch_loops_run_and_say_why(monkeypatch):
    monkeypatch.setenv("CHARLM_KERNEL", "0")
    minkernel.reset()
    try:
        assert minkernel.load() is None
        assert minkernel.status() == "torch loops (disabled by CHARLM_KERNEL=0)"
        assert not minkernel.usable(torch.zeros(2))
    finally:
        minkernel.reset()


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("impl", ["scratch", "fused", "fast"])
def test_gradcheck_float64(cell, impl):
    model = stack(cell, impl, STACKS["rms-ffn"], hidden=4, layers=2, input_size=3).double()
    x, h0 = inputs(2, 19, 3, 4, 2, dtype=torch.float64)  # 19: a chunk and a padded one (fused)
    x.requires_grad_()
    h0.requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: model(a, b)[0], (x, h0))
    assert torch.autograd.gradcheck(lambda a, b: model(a, b)[1], (x, h0))


def test_the_log_scan_in_chunks_equals_the_recurrence_over_512_steps():
    """One 512-step log-space scan errs by ~1e-4 in float32; in chunks it stays within 1e-5."""
    gen = torch.Generator().manual_seed(2)
    log_a = F.logsigmoid(torch.randn(2, 512, 16, generator=gen, dtype=torch.float64))
    log_b = torch.randn(2, 512, 16, generator=gen, dtype=torch.float64)
    h0 = torch.rand(2, 16, generator=gen, dtype=torch.float64)
    h, want = h0, []
    for t in range(512):
        h = log_a[:, t].exp() * h + log_b[:, t].exp()
        want.append(h)
    want = torch.stack(want, 1)
    got = log_scan(log_a.float(), log_b.float(), h0.float())
    assert ((got - want).abs() / want.abs()).max() < 1e-5


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("impl", ["scratch", "fused", "fast"])
def test_two_windows_with_the_carried_state_are_one_window(cell, impl):
    """What truncated BPTT with sequential partitioning, and the exact evaluation pass, rely on."""
    model = stack(cell, impl, STACKS["default"])
    x, h0 = inputs(3, 40, 6, 8, 3)
    whole, h_whole = model(x, h0)
    first, h_mid = model(x[:, :23], h0)
    second, h_end = model(x[:, 23:], h_mid)
    torch.testing.assert_close(torch.cat([first, second], 1), whole, **TOL)
    torch.testing.assert_close(h_end, h_whole, **TOL)


@pytest.mark.parametrize("cell", CELLS)
def test_every_implementation_has_the_same_parameters(cell):
    names = {impl: [(n, tuple(p.shape)) for n, p in stack(cell, impl, STACKS["rms-ffn"]).named_parameters()]
             for impl in ("scratch", "fused", "fast")}
    assert names["scratch"] == names["fused"] == names["fast"]
    assert ("blocks.0.gates.weight", ((2 if cell == "mingru" else 3) * 8, 6)) in names["fast"]


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("options", STACKS.values(), ids=STACKS.keys())
@pytest.mark.parametrize("embed", [0, 5, 12])  # one-hot; an embedding; one as wide as the layers
def test_parameter_count_and_the_models_count_agree(cell, options, embed):
    config = ModelConfig(vocab_size=11, cell=cell, hidden=12, layers=3, embed=embed, **options)
    model = CharLM(config)
    inputs_ = embed or 11
    head = 12 * 11 + 11 + (11 * embed if embed else 0)
    want = parameter_count(cell, inputs_, 12, 3, config.norm, config.ffn) + head
    assert count_parameters(model) == want
    assert model.rnn.blocks[0].residual == (embed == 12 and config.residual)
    assert all(b.residual == config.residual for b in model.rnn.blocks[1:])


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("options", STACKS.values(), ids=STACKS.keys())
@pytest.mark.parametrize("embed", [0, 8])
def test_the_samplers_step_gives_the_forward_passs_outputs(cell, options, embed, loops):
    torch.manual_seed(0)
    model = CharLM(ModelConfig(vocab_size=9, cell=cell, hidden=8, layers=3, embed=embed,
                               **options)).eval()
    tokens = torch.randint(0, 9, (2, 30), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        out, h_n = model.rnn(model.inputs(tokens), None)
        vocab_ids = torch.arange(9)[None]
        stepper = MinStepper(model.rnn, model.inputs(vocab_ids)[0])
        states = stepper.split(model.begin_state(2))
        for t in range(30):
            assert (stepper.step(tokens[:, t], states) - out[:, t]).abs().max() < 1e-5
    assert (torch.stack(states) - h_n).abs().max() < 1e-5


def test_dropout_acts_between_layers_in_training_only():
    model = stack("mingru", "fast", STACKS["default"], input_size=8, dropout=1.0)  # all dropped
    x, _ = inputs(2, 5, 8, 8, 3)  # input as wide as the layers: every layer residual
    model.train()
    dropped, _ = model(x)
    alone = stack("mingru", "fast", STACKS["default"], input_size=8)  # the same weights
    for k in (0, 1):  # what layers 0 and 1 add is dropped: the last layer sees x itself
        alone.blocks[k].gates.weight.data.zero_()
        alone.blocks[k].gates.bias.data.fill_(-1e4)  # z = 0: h stays at h0 = 0
    assert torch.allclose(dropped, alone(x)[0], atol=1e-6)
    model.eval()
    assert not torch.allclose(model(x)[0], dropped)


def test_the_state_is_h_alone_as_for_a_gru():
    model = CharLM(ModelConfig(vocab_size=7, cell="minlstm", hidden=5, layers=2, embed=3))
    state = model.begin_state(4)
    assert isinstance(state, torch.Tensor) and state.shape == (2, 4, 5)
    _, h = model(torch.zeros(4, 6, dtype=torch.long), state)
    assert h.shape == (2, 4, 5)


# --- choices and refusals ------------------------------------------------------------------------


def test_auto_runs_the_cpu_loop_on_the_cpu_and_the_parallel_scan_elsewhere():
    for cell in CELLS:
        assert resolve_impl("auto", cell, "cpu") == "fast"
        assert resolve_impl("auto", cell, "cuda") == "fused"
        assert resolve_impl("scratch", cell, "cpu") == "scratch"


@pytest.mark.parametrize("values, message", [
    ({"cell": "mingru", "weight_drop": 0.3},
     "--weight-drop 0.3 applies only to --cell rnn or gru or lstm, not --cell mingru; drop it or "
     "choose that cell"),
    ({"cell": "gru", "ffn": 4},
     "--ffn 4 applies only to --cell mingru or minlstm, not --cell gru; drop it or choose that cell"),
    ({"cell": "lstm", "residual": False, "norm": "rms"},
     "--no-residual applies only to --cell mingru or minlstm and --norm rms applies only to "
     "--cell mingru or minlstm, not --cell lstm; drop it or choose that cell"),
    ({"cell": "minlstm", "gru_reset": "before"},
     "--gru-reset before applies only to --cell gru, not --cell minlstm; drop it or choose that "
     "cell"),
    ({"cell": "mingru", "norm": "batch"}, "norm must be one of layer, rms, none; got 'batch'"),
    ({"cell": "mingru", "ffn": -1}, "ffn must be an integer in [0, 64], got -1"),
])
def test_options_that_do_not_fit_the_cell_are_refused(values, message):
    with pytest.raises(UsageError) as err:
        build_config({}, values)
    assert str(err.value) == message
    assert err.value.exit_code == 2


def test_a_model_config_with_weight_drop_is_refused_for_the_min_cells():
    with pytest.raises(UsageError, match="^--weight-drop masks recurrent weights, which --cell "
                                         "minlstm has none of; drop it$"):
        ModelConfig(vocab_size=5, cell="minlstm", weight_drop=0.1).validate()


def test_the_cards_model_line_names_the_stack():
    model = ModelConfig(vocab_size=66, cell="mingru", hidden=384, layers=3, embed=64,
                        norm="rms", ffn=2, dropout=0.0).to_dict()
    assert _model_line(model, 1000) == (
        "3-layer minGRU, 384 hidden units, residual connections, RMSNorm, feed-forward blocks 2x "
        "wide, a 64-dimensional embedding, dropout 0.0, 66 output characters; 1,000 parameters")
    bare = {**model, "cell": "minlstm", "residual": False, "norm": "none", "ffn": 0}
    assert _model_line(bare, 5).startswith(
        "3-layer minLSTM, 384 hidden units, no residual connections, no normalisation, a 64-")
