"""Recurrent layers written from the gate equations, and the factory that builds any implementation.

``ScratchRecurrent`` is the readable reference: one function per cell computes one time step from
the equations (names as in d2l.ai), ``_run_layer`` runs a step function over time, and the module
stacks layers with dropout between them. Parameter names, shapes and gate order are those of
``nn.RNN`` / ``nn.GRU`` / ``nn.LSTM`` (GRU rows r, z, n; LSTM rows i, f, g, o), so state_dicts
load across implementations and give the same outputs.

Implementations (``--impl``):
  fused    ``charlm.model.fused``: torch's own layers (cuDNN on CUDA, ATen kernels on CPU)
  scratch  this module: plain autograd over the step functions below (slow; for reading/checking)
  fast     ``charlm.model.fastgru.FastGRU``: hand-written backward, GRU only (fastest on CPU)
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from charlm.errors import UsageError
from charlm.model.config import GRU_RESETS, IMPLS, MODES, check_combination
from charlm.model.dropout import drop_weight
from charlm.model.dropout import dropout as drop
from charlm.model.fastgru import FastGRU
from charlm.model.fused import fused_layer
from charlm.model.state import from_layers, layers_of

_GATES = {"rnn_tanh": 1, "rnn_relu": 1, "gru": 3, "lstm": 4}


# --- one time step per cell ------------------------------------------------------------------
# The one home of the equations: the scratch layers run them over time, and `charlm generate`
# steps its characters through them (`charlm.inference.sample`). X_proj: (B, gates*H), the
# input's share X W_ih^T + b_ih, computed by the caller (for all steps at once, or a row lookup);
# H_prev, C_prev: (B, H); W_hh, b_hh as in torch (rows = gates: GRU r, z, n; LSTM i, f, g, o).


def rnn_step(X_proj, H_prev, W_hh, b_hh, activation: Callable[[Tensor], Tensor]):
    """H = phi(W_ih X + b_ih + W_hh H_prev + b_hh)."""
    return activation(X_proj + F.linear(H_prev, W_hh, b_hh))


def gru_step(X_proj, H_prev, W_hh, b_hh, reset: str = "after"):
    """One GRU step. ``reset="after"``: PyTorch/cuDNN; ``"before"``: Cho et al. 2014 / d2l.

        R, Z    = sigmoid(W_x{r,z} X + b_x{r,z} + W_h{r,z} H_prev + b_h{r,z})  reset, update gates
        H_tilde = tanh(W_xh X + b_xh + R * (W_hh H_prev + b_hh))       after
                  tanh(W_xh X + b_xh + W_hh (R * H_prev) + b_hh)       before
        H       = Z * H_prev + (1 - Z) * H_tilde
    """
    H = H_prev.shape[-1]
    x_rz, x_h = X_proj[:, : 2 * H], X_proj[:, 2 * H:]
    if reset == "after":
        h_all = F.linear(H_prev, W_hh, b_hh)
        R, Z = torch.sigmoid(x_rz + h_all[:, : 2 * H]).chunk(2, 1)
        H_tilde = torch.tanh(torch.addcmul(x_h, R, h_all[:, 2 * H:]))
    else:
        R, Z = torch.sigmoid(x_rz + F.linear(H_prev, W_hh[: 2 * H], b_hh[: 2 * H])).chunk(2, 1)
        H_tilde = torch.tanh(x_h + F.linear(R * H_prev, W_hh[2 * H:], b_hh[2 * H:]))
    return torch.lerp(H_tilde, H_prev, Z)  # Z * H_prev + (1 - Z) * H_tilde


def lstm_step(X_proj, H_prev, C_prev, W_hh, b_hh):
    """One LSTM step; returns (H, C).

        I, F, C_tilde, O = sigmoid, sigmoid, tanh, sigmoid of (W_x. X + b_x. + W_h. H_prev + b_h.)
        C = F * C_prev + I * C_tilde;  H = O * tanh(C)
    """
    I, F_, C_tilde, O = (X_proj + F.linear(H_prev, W_hh, b_hh)).chunk(4, 1)
    C = torch.addcmul(torch.sigmoid(F_) * C_prev, torch.sigmoid(I), torch.tanh(C_tilde))
    H = torch.sigmoid(O) * torch.tanh(C)
    return H, C


def cell_step(mode: str, X_proj: Tensor, state, W_hh: Tensor, b_hh: Tensor, reset: str = "after"):
    """One step of one layer of cell `mode`: state H (B, H), or (H, C) for lstm, in and out."""
    if mode == "lstm":
        return lstm_step(X_proj, *state, W_hh, b_hh)
    if mode == "gru":
        return gru_step(X_proj, state, W_hh, b_hh, reset)
    return rnn_step(X_proj, state, W_hh, b_hh, torch.tanh if mode == "rnn_tanh" else torch.relu)


# --- a step function run over time -------------------------------------------------------------


def _run_layer(mode: str, X: Tensor, state, weights, reset: str):
    """X: (B, T, I); state: H (B, H) or (H, C) for lstm. Returns outputs (B, T, H) and last state."""
    W_ih, W_hh, b_ih, b_hh = weights
    X_proj = F.linear(X, W_ih, b_ih)  # every step's input share in one product
    outputs = []
    for t in range(X.shape[1]):
        state = cell_step(mode, X_proj[:, t], state, W_hh, b_hh, reset)
        outputs.append(state[0] if mode == "lstm" else state)
    return torch.stack(outputs, dim=1), state


def _check_layer(mode: str, gru_reset: str, impl: str = "scratch") -> None:
    if mode not in MODES:
        raise UsageError(f"unknown cell {mode!r}; choose one of: {', '.join(MODES)}")
    if gru_reset not in GRU_RESETS:
        raise UsageError(f"unknown --gru-reset {gru_reset!r}; choose one of: {', '.join(GRU_RESETS)}")
    if impl not in IMPLS:
        raise UsageError(f"unknown implementation {impl!r}; choose one of: {', '.join(IMPLS)} (or auto)")
    check_combination("rnn" if mode.startswith("rnn") else mode, impl, gru_reset)


def add_torch_layout_parameters(module: nn.Module, gates: int, input_size: int, hidden_size: int,
                                num_layers: int) -> None:
    """Register weight_ih_l{k}, weight_hh_l{k}, bias_ih_l{k}, bias_hh_l{k} as torch does, and
    initialise them like torch: uniform(-1/sqrt(H), 1/sqrt(H))."""
    bound = 1.0 / math.sqrt(hidden_size)
    for layer in range(num_layers):
        in_size = input_size if layer == 0 else hidden_size
        shapes = {
            "weight_ih": (gates * hidden_size, in_size),
            "weight_hh": (gates * hidden_size, hidden_size),
            "bias_ih": (gates * hidden_size,),
            "bias_hh": (gates * hidden_size,),
        }
        for name, shape in shapes.items():
            param = nn.Parameter(torch.empty(shape))
            nn.init.uniform_(param, -bound, bound)
            module.register_parameter(f"{name}_l{layer}", param)


class ScratchRecurrent(nn.Module):
    """``nn.RNN``/``nn.GRU``/``nn.LSTM(batch_first=True)`` rebuilt from the step functions above."""

    def __init__(self, mode: str, input_size: int, hidden_size: int, num_layers: int = 1,
                 dropout: float = 0.0, gru_reset: str = "after", locked: bool = False,
                 weight_drop: float = 0.0):
        super().__init__()
        _check_layer(mode, gru_reset)
        self.mode = mode
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.dropout = float(dropout)
        self.gru_reset = gru_reset
        self.locked = bool(locked)  # dropout between layers: one mask per sequence
        self.weight_drop = float(weight_drop)  # DropConnect on W_hh, one mask per batch
        add_torch_layout_parameters(self, _GATES[mode], input_size, hidden_size, num_layers)

    def _weights(self, layer: int):
        w_ih, w_hh, b_ih, b_hh = (getattr(self, f"{name}_l{layer}")
                                  for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"))
        return w_ih, drop_weight(w_hh, self.weight_drop, self.training), b_ih, b_hh

    def forward(self, x: Tensor, state=None):
        if state is None:
            zeros = x.new_zeros(self.num_layers, x.shape[0], self.hidden_size)
            state = (zeros, zeros) if self.mode == "lstm" else zeros
        finals = []
        for layer, layer_state in enumerate(layers_of(state)):
            if layer > 0:
                x = drop(x, self.dropout, self.training, self.locked)
            x, last = _run_layer(self.mode, x, layer_state, self._weights(layer), self.gru_reset)
            finals.append(last)
        return x, from_layers(finals)

    def extra_repr(self) -> str:
        reset = f", gru_reset={self.gru_reset}" if self.mode == "gru" else ""
        weight_drop = f", weight_drop={self.weight_drop}" if self.weight_drop else ""
        return (f"{self.mode}, {self.input_size}, {self.hidden_size}, num_layers={self.num_layers}, "
                f"dropout={self.dropout}{' (locked)' if self.locked else ''}{reset}{weight_drop}")


# --- building the recurrent stack ------------------------------------------------------------


def recurrent_layer(impl: str, mode: str, input_size: int, hidden_size: int, num_layers: int = 1,
                    dropout: float = 0.0, gru_reset: str = "after", locked: bool = False,
                    weight_drop: float = 0.0) -> nn.Module:
    """Build the recurrent stack (batch_first) for a concrete ``impl``
    (`charlm.model.config.resolve_impl` turns "auto" into one): `dropout` between layers
    (`locked`: one mask per sequence), `weight_drop` on every layer's W_hh."""
    _check_layer(mode, gru_reset, impl)
    if impl == "scratch":
        return ScratchRecurrent(mode, input_size, hidden_size, num_layers, dropout, gru_reset,
                                locked, weight_drop)
    if impl == "fast":
        return FastGRU(input_size, hidden_size, num_layers, dropout, locked, weight_drop)
    return fused_layer(mode, input_size, hidden_size, num_layers, dropout, locked, weight_drop)
