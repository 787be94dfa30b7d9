"""An LSTM for the CPU whose time loops run in C: ``nn.LSTM`` with a faster forward and backward.

``FastLSTM`` is an ``nn.LSTM(batch_first=True)``: the same parameters, initialisation and
state_dict, and where the compiled loops cannot run (no C compiler, float64, CUDA, see
``charlm.ckernel``) it simply is torch's LSTM. Elsewhere each layer is one ``autograd.Function``
(``_LSTMLayerC``) in the style of ``charlm.fastgru``: the input projection of all steps is one
matrix product before the loop, the weight gradients of all steps a few after the backward loop,
and a time step is one GEMM on W_hh plus one fused pass that computes the gates, the new cell and
hidden state and every factor the backward needs (``fast_kernels.c`` has the math).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from charlm import ckernel

_SLOTS = 6  # factors stored per unit and step (see fast_kernels.c)


class _LSTMLayerC(torch.autograd.Function):
    """One LSTM layer, batch first: x (B, T, I), h0, c0 (B, H) -> y (B, T, H), h_T, c_T."""

    @staticmethod
    def forward(ctx, x, h0, c0, w_ih, w_hh, b_ih, b_hh):
        B, T, I = x.shape
        H = w_hh.shape[1]
        train = any(ctx.needs_input_grad)
        x, h0, w_hh, b_hh = x.contiguous(), h0.contiguous(), w_hh.contiguous(), b_hh.contiguous()
        XP = torch.addmm(b_ih, x.view(B * T, I), w_ih.t()).view(B, T, 4 * H)
        Y = x.new_empty(B, T, H)
        c = c0.contiguous().clone()  # c_0 in, c_T out
        M = x.new_empty(B, T, _SLOTS, H) if train else None
        ckernel.lstm_forward(XP, h0, c, w_hh, b_hh, Y, M)
        if train:
            ctx.save_for_backward(x, h0, w_ih, w_hh, M, Y)
        return Y, Y[:, -1].clone(), c

    @staticmethod
    @once_differentiable
    def backward(ctx, dY, dhn, dcn):
        x, h0, w_ih, w_hh, M, Y = ctx.saved_tensors
        B, T, I = x.shape
        H = w_hh.shape[1]
        D = x.new_empty(B, T, 4, H)
        dh0 = dhn.contiguous().clone()  # dL/dh_T, dL/dc_T in; dL/dh_0, dL/dc_0 out
        dc0 = dcn.contiguous().clone()
        ckernel.lstm_backward(dY.contiguous(), M, w_hh.contiguous(), D, dh0, dc0)
        Df = D.view(B * T, 4 * H)  # gate pre-activation gradients, rows i, f, g, o like W's
        dx = dw_ih = dw_hh = db = None
        if ctx.needs_input_grad[0]:
            dx = torch.mm(Df, w_ih).view(B, T, I)
        if ctx.needs_input_grad[3]:
            dw_ih = torch.mm(Df.t(), x.view(B * T, I))
        if ctx.needs_input_grad[4]:
            h_prev = torch.cat([h0.unsqueeze(1), Y[:, :-1]], 1).view(B * T, H)
            dw_hh = torch.mm(Df.t(), h_prev)
        if ctx.needs_input_grad[5] or ctx.needs_input_grad[6]:
            db = Df.sum(0)
        return (dx, dh0 if ctx.needs_input_grad[1] else None, dc0 if ctx.needs_input_grad[2] else None,
                dw_ih, dw_hh, db, db)


class FastLSTM(nn.LSTM):
    """``nn.LSTM(batch_first=True)`` whose forward and backward run the compiled loops on the CPU."""

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, dropout: float = 0.0):
        super().__init__(input_size, hidden_size, num_layers, batch_first=True,
                         dropout=dropout if num_layers > 1 else 0.0)
        self.dropout_between = float(dropout) if num_layers > 1 else 0.0

    def forward(self, x: Tensor, state: tuple[Tensor, Tensor] | None = None):
        weights = self._flat_weights
        if x.dim() != 3 or not ckernel.usable(x, *weights, *(state or ())):
            return super().forward(x, state)
        B, L, H = x.shape[0], self.num_layers, self.hidden_size
        if state is None:
            state = (x.new_zeros(L, B, H), x.new_zeros(L, B, H))
        h0, c0 = state
        seq, finals_h, finals_c = x, [], []
        for layer in range(L):
            if layer > 0 and self.dropout_between > 0 and self.training:
                seq = F.dropout(seq, self.dropout_between, training=True)
            w_ih, w_hh, b_ih, b_hh = weights[4 * layer: 4 * layer + 4]
            seq, h_n, c_n = _LSTMLayerC.apply(seq.contiguous(), h0[layer], c0[layer], w_ih, w_hh, b_ih, b_hh)
            finals_h.append(h_n)
            finals_c.append(c_n)
        return seq, (torch.stack(finals_h), torch.stack(finals_c))
