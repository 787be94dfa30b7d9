"""A GRU for the CPU with a hand-written backward: same parameters and math as ``nn.GRU``.

At character-model sizes a time step is one small matrix product plus element-wise work on ~10K
numbers, so what separates a fast layer from a slow one is how many ops run per step and how
often data makes a round trip through memory. ``nn.GRU`` on the CPU runs ~15 ops per step
forward and autograd replays ~30 more backward. Here each layer is one ``autograd.Function``:

* the input projections of all time steps are one matrix product before the loop; the weight
  gradients of all steps are a few matrix products after the backward loop;
* the time loops run in C where they can (``_GRULayerC``, ``charlm/model/fastgru_kernel.c`` built and
  loaded by ``charlm.model.ckernel``): per step one GEMM on W_hh (packed once per call, each thread
  keeping its slice of the hidden units and of W_hh in its own cache) and one fused pass that
  computes the gates, the new state and every factor the backward needs; a backward step is one
  pass (slot gradients = stored factors x incoming gradient) and one GEMM;
* elsewhere (no compiler, float64, CUDA tensors) ``_GRULayer`` runs the same algorithm as
  TorchScript loops of in-place torch ops: a forward step is ``addmm_``, ``sigmoid_``,
  ``addcmul``, ``sigmoid_``, ``addcmul``, ``lerp`` plus 8 small ops that store the backward's
  factors; a backward step is 3 ops.

Alternatives that lost are in docs/BENCHMARKS.md: torch.compile of the step's element-wise part
(slower per call than eager at these sizes, and slow to compile), the backward factors as
batched ops after the loop, the batch halves on two threads (torch.jit.fork). In C, the threads
split the hidden units rather than the batch rows: each thread's slice of W_hh stays in its own
cache.

Math (reset gate applied after the hidden projection, as in PyTorch/cuDNN), gate order r, z, n::

    r = sigmoid(W_ir x + b_ir + W_hr h + b_hr)
    z = sigmoid(W_iz x + b_iz + W_hz h + b_hz)
    n = tanh(W_in x + b_in + r * (W_hn h + b_hn))
    h' = (1 - z) * n + z * h          (= lerp(n, h, z))
"""

from __future__ import annotations

import math
import warnings
from typing import Optional

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from charlm.model import ckernel
from charlm.model.dropout import drop_weight, dropout

# Per time step and batch row, the backward works on 5 blocks of H numbers ("slots"):
#   0: dL/d(W_in x + b_in)          1: dL/d(r pre-activation)       2: dL/d(z pre-activation)
#   3: dL/d(W_hn h + b_hn)          4: dL/dh' * z (the direct path to the previous hidden state)
# Slots 1..3 line up with W_hh's rows (r, z, n), so one matrix product per step back-propagates
# them; slots 0..2 are the input projection's gradient with its n block moved to the front.
# Each slot is the incoming gradient s = dL/dh' times a factor that the forward already knows
# (M below), so a backward step is: s = dY[t] + g; D[t] = M[t] * s; g = D[t][4] + D[t][1:4] @ W_hh.
_SLOTS = 5

USE_TORCHSCRIPT = True  # run the two time loops as TorchScript (see _loops)


def _forward_loop(G: Tensor, gin2: Tensor, Y: Tensor, M: Optional[Tensor], h: Tensor, w_hh_t: Tensor) -> None:
    """The forward recurrence (M is None when no gradient is needed).

    G[t] holds [W_ir x + b_ir + b_hr | W_iz x + b_iz + b_hz | b_hn]; a step adds W_hh h in place and
    squashes, leaving [r | z | W_hn h + b_hn]. gin2[t] = 2 (W_in x + b_in).
    """
    H = Y.shape[2]
    one, minus_one, two = h.new_ones(1), h.new_full((1,), -1.0), h.new_full((1,), 2.0)
    n = torch.empty_like(h)
    tmp = torch.empty_like(h)
    for t in range(Y.shape[0]):
        g = G[t]
        r, z, ghn = g[:, :H], g[:, H : 2 * H], g[:, 2 * H :]
        g.addmm_(h, w_hh_t)
        g[:, : 2 * H].sigmoid_()
        # tanh(a) = 2 sigmoid(2a) - 1: torch's CPU sigmoid is much faster than its tanh.
        torch.addcmul(gin2[t], r, ghn, value=2, out=n)
        n.sigmoid_()
        torch.addcmul(minus_one, n, two, out=n)  # n = tanh(W_in x + b_in + r (W_hn h + b_hn))
        h = torch.lerp(n, h, z, out=Y[t])  # n + z (h - n)
        if M is not None:
            # The backward's factors, while r, z, n are in cache (8 small ops beat 8 big ones).
            m = M[t]
            m_nin, m_r, m_z, m_nh, m_h = m[:, 0], m[:, 1], m[:, 2], m[:, 3], m[:, 4]
            torch.addcmul(one, n, n, value=-1, out=tmp)  # 1 - n^2
            torch.addcmul(tmp, tmp, z, value=-1, out=m_nin)  # (1 - n^2)(1 - z)
            torch.mul(m_nin, r, out=m_nh)  # ... r
            torch.mul(m_nh, ghn, out=tmp)
            torch.addcmul(tmp, tmp, r, value=-1, out=m_r)  # ... ghn r (1 - r)
            torch.sub(h, n, out=m_z)  # h' - n = z (h - n)
            m_z.addcmul_(m_z, z, value=-1)  # z (1 - z)(h - n)
            m_h.copy_(z)


def _backward_loop(dY: Tensor, M: Tensor, D: Tensor, g: Tensor, w_hh: Tensor) -> Tensor:
    """The backward recurrence: fills D (T, B, 5, H) and returns dL/dh0."""
    B, H = g.shape
    s = torch.empty_like(g)
    for t in range(M.shape[0] - 1, -1, -1):
        torch.add(dY[t], g, out=s)
        torch.mul(M[t], s.unsqueeze(1), out=D[t])
        d = D[t].view(B, 5 * H)
        g = torch.addmm(d[:, 4 * H :], d[:, H : 4 * H], w_hh)
    return g


_SCRIPTED: tuple | None = None


def _loops():
    """(forward loop, backward loop): TorchScript versions, else these Python functions.

    TorchScript's interpreter dispatches the ~20 small ops of a step faster than Python
    (docs/BENCHMARKS.md). torch.jit.script is deprecated from torch 2.11 but
    still works; where scripting fails the Python functions give the same results.
    """
    global _SCRIPTED
    if not USE_TORCHSCRIPT:
        return _forward_loop, _backward_loop
    if _SCRIPTED is None:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                _SCRIPTED = (torch.jit.script(_forward_loop), torch.jit.script(_backward_loop))
        except Exception:  # noqa: BLE001 - whatever stops scripting, the Python loops do the same
            _SCRIPTED = (_forward_loop, _backward_loop)
    return _SCRIPTED


class _GRULayer(torch.autograd.Function):
    """One GRU layer over a whole time-major sequence: x (T, B, I), h0 (B, H) -> y (T, B, H)."""

    @staticmethod
    def forward(ctx, x, h0, w_ih, w_hh, b_ih, b_hh):
        T, B, I = x.shape
        H = w_hh.shape[1]
        train = any(ctx.needs_input_grad)
        x2 = x.reshape(T * B, I)
        G = x.new_empty(T * B, 3 * H)
        torch.addmm(b_ih[: 2 * H] + b_hh[: 2 * H], x2, w_ih[: 2 * H].t(), out=G[:, : 2 * H])
        G[:, 2 * H :] = b_hh[2 * H :]
        gin2 = torch.addmm(b_ih[2 * H :], x2, w_ih[2 * H :].t(), beta=2, alpha=2)
        G, gin2 = G.view(T, B, 3 * H), gin2.view(T, B, H)
        Y = x.new_empty(T, B, H)
        M = x.new_empty(T, B, _SLOTS, H) if train else None
        _loops()[0](G, gin2, Y, M, h0, w_hh.t())
        if train:
            ctx.save_for_backward(x, h0, w_ih, w_hh, M, Y)
        return Y, Y[-1].clone()

    @staticmethod
    @once_differentiable
    def backward(ctx, dY, dhn):
        x, h0, w_ih, w_hh, M, Y = ctx.saved_tensors
        T, B = x.shape[:2]
        H = w_hh.shape[1]
        D = torch.empty_like(M)
        dh0 = _loops()[1](dY, M, D, dhn, w_hh)
        # rows in (t, b) order; the previous state of row (t, b) is h0[b] at t = 0, else Y[t-1, b]
        h_prev = lambda: torch.cat([h0, Y[:-1].reshape((T - 1) * B, H)])  # noqa: E731
        return _grads(ctx, D, x, dh0, w_ih, h_prev)


class _GRULayerC(torch.autograd.Function):
    """One GRU layer, batch first, on the compiled loops: x (B, T, I), h0 (B, H) -> y (B, T, H).

    Same slots and factors as ``_GRULayer``; the C loops (``ckernel``) take the input projection
    with b_ih only and add W_hh h + b_hh per step, so there is no bias bookkeeping here.
    """

    @staticmethod
    def forward(ctx, x, h0, w_ih, w_hh, b_ih, b_hh):
        B, T, I = x.shape
        H = w_hh.shape[1]
        train = any(ctx.needs_input_grad)
        x, h0, w_hh, b_hh = x.contiguous(), h0.contiguous(), w_hh.contiguous(), b_hh.contiguous()
        XP = torch.addmm(b_ih, x.view(B * T, I), w_ih.t()).view(B, T, 3 * H)
        Y = x.new_empty(B, T, H)
        M = x.new_empty(B, T, _SLOTS, H) if train else None
        ckernel.forward(XP, h0, w_hh, b_hh, Y, M)
        if train:
            ctx.save_for_backward(x, h0, w_ih, w_hh, M, Y)
        return Y, Y[:, -1].clone()

    @staticmethod
    @once_differentiable
    def backward(ctx, dY, dhn):
        x, h0, w_ih, w_hh, M, Y = ctx.saved_tensors
        B, T = x.shape[:2]
        H = w_hh.shape[1]
        D = torch.empty_like(M)
        dh0 = dhn.contiguous().clone()  # in: dL/dh_T; the C loops leave dL/dh_0 here
        ckernel.backward(dY.contiguous(), M, w_hh.contiguous(), D, dh0)
        # rows in (b, t) order; the previous state of row (b, t) is h0[b] at t = 0, else Y[b, t-1]
        h_prev = lambda: torch.cat([h0.unsqueeze(1), Y[:, :-1]], 1).view(B * T, H)  # noqa: E731
        return _grads(ctx, D, x, dh0, w_ih, h_prev)


def _grads(ctx, D: Tensor, x: Tensor, dh0: Tensor, w_ih: Tensor, h_prev) -> tuple:
    """Both layers' backward after the time loop, whatever their layout: the gradients for
    (x, h0, w_ih, w_hh, b_ih, b_hh), None where not needed, from the slot gradients D (..., 5, H)
    and the inputs x (..., I) of the same rows (one per batch row and step), and from the callable
    h_prev their previous states (rows, H) in the same row order."""
    need = ctx.needs_input_grad
    H = w_ih.shape[0] // 3
    Df, x2 = D.reshape(-1, _SLOTS * H), x.reshape(-1, x.shape[-1])  # views: both contiguous
    dx = dw_ih = dw_hh = db_ih = db_hh = None
    if need[0]:
        w_perm = torch.cat([w_ih[2 * H :], w_ih[: 2 * H]])  # rows n, r, z like slots 0..2
        dx = torch.mm(Df[:, : 3 * H], w_perm).view_as(x)
    if need[2]:
        dw_ih = torch.empty_like(w_ih)
        torch.mm(Df[:, H : 3 * H].t(), x2, out=dw_ih[: 2 * H])
        torch.mm(Df[:, :H].t(), x2, out=dw_ih[2 * H :])
    if need[3]:
        dw_hh = torch.mm(Df[:, H : 4 * H].t(), h_prev())  # sum over rows of dgh^T h_prev
    if need[4] or need[5]:
        sums = Df[:, : 4 * H].sum(0)
        db_ih = torch.cat([sums[H : 3 * H], sums[:H]])
        db_hh = sums[H : 4 * H]
    return dx, dh0 if need[1] else None, dw_ih, dw_hh, db_ih, db_hh


class FastGRU(nn.Module):
    """Drop-in for ``nn.GRU(batch_first=True)`` (same parameters, same outputs), faster on CPU.

    `dropout` between layers (`locked`: one mask per sequence) and `weight_drop` (DropConnect on
    W_hh: the masked matrix is what the loops pack and multiply) as in `charlm.model.dropout`.
    """

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, dropout: float = 0.0,
                 locked: bool = False, weight_drop: float = 0.0):
        super().__init__()
        self.mode = "gru"
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.dropout = float(dropout)
        self.locked = bool(locked)
        self.weight_drop = float(weight_drop)
        for layer in range(num_layers):
            in_size = input_size if layer == 0 else hidden_size
            self.register_parameter(f"weight_ih_l{layer}", nn.Parameter(torch.empty(3 * hidden_size, in_size)))
            self.register_parameter(f"weight_hh_l{layer}", nn.Parameter(torch.empty(3 * hidden_size, hidden_size)))
            self.register_parameter(f"bias_ih_l{layer}", nn.Parameter(torch.empty(3 * hidden_size)))
            self.register_parameter(f"bias_hh_l{layer}", nn.Parameter(torch.empty(3 * hidden_size)))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        bound = 1.0 / math.sqrt(self.hidden_size)
        for p in self.parameters():
            nn.init.uniform_(p, -bound, bound)

    def forward(self, x: Tensor, state: Tensor | None = None) -> tuple[Tensor, Tensor]:
        B = x.shape[0]
        if state is None:
            state = x.new_zeros(self.num_layers, B, self.hidden_size)
        weights = [self._layer_weights(layer) for layer in range(self.num_layers)]
        compiled = ckernel.usable(x, state, *(w for ws in weights for w in ws))
        # the compiled loops run batch first; the TorchScript ones time-major (contiguous steps)
        seq = x if compiled else x.transpose(0, 1)
        finals = []
        for layer in range(self.num_layers):
            if layer > 0:
                seq = dropout(seq, self.dropout, self.training, self.locked,
                              time_dim=1 if compiled else 0)
            layer_fn = _GRULayerC if compiled else _GRULayer
            seq, h_n = layer_fn.apply(seq.contiguous(), state[layer], *weights[layer])
            finals.append(h_n)
        return (seq if compiled else seq.transpose(0, 1)), torch.stack(finals)

    def _layer_weights(self, layer: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        w_ih, w_hh, b_ih, b_hh = (getattr(self, f"{name}_l{layer}")
                                  for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"))
        # masked before the loops see it: the C loops pack this matrix once per call
        return w_ih, drop_weight(w_hh, self.weight_drop, self.training), b_ih, b_hh
