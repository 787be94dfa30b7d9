"""torch's own recurrent kernels (cuDNN on CUDA, ATen/oneDNN on the CPU), one layer at a time when
anything happens between or inside the layers.

`nn.GRU(num_layers=2, dropout=p)` on CUDA draws its between-layer dropout inside cuDNN, from a
dropout state of cuDNN's own that no checkpoint holds: a run resumed on a GPU drew other masks
than the run it continues (0.042 max weight difference after 100 steps on an H200). So when
there is dropout between layers or weight drop, these modules call the same kernel once per
layer and do the dropouts themselves (`charlm.model.dropout`), from the device's default
generator, whose state the checkpoint holds::

    x --layer 0--> y0 --dropout--> --layer 1--> y1 --> ...     (each layer: one _VF.gru / lstm /
                                                               rnn_* call, num_layers=1)

With neither, a forward is nn.GRU's own single call over all layers. The modules *are*
nn.RNN / nn.GRU / nn.LSTM (subclasses), so the parameters keep their names (`weight_ih_l{k}`,
...), their order and their initialisation: old checkpoints and optimizer states load as before.

cuDNN wants the weights of one call in one flat buffer; nn.GRU flattens all layers into one, so
the per-layer calls flatten each layer's four tensors into a buffer of its own instead.
A masked W_hh (weight drop) or weights cast to bf16 are new tensors, copied by cuDNN on each call
(the copy is what weight drop costs there); its warning about that is expected and kept quiet.

bf16: autocast's cuDNN RNN wrapper casts to fp16 whatever autocast's dtype, so under bf16
autocast these layers leave autocast and run their kernels on bf16 copies of input, state and
weights: `--precision bf16` really runs the recurrent layers in bf16.
"""

from __future__ import annotations

import contextlib
import warnings

import torch
from torch import _VF, Tensor, nn

from charlm.model.dropout import drop_weight, dropout

_KERNELS = {"RNN_TANH": _VF.rnn_tanh, "RNN_RELU": _VF.rnn_relu, "GRU": _VF.gru, "LSTM": _VF.lstm}
_COPY_WARNING = "RNN module weights are not part of single contiguous chunk of memory"


def autocast_bf16(device_type: str) -> bool:
    """Whether bf16 autocast is on for `device_type` here."""
    try:
        return (torch.is_autocast_enabled(device_type)
                and torch.get_autocast_dtype(device_type) == torch.bfloat16)
    except TypeError:  # torch < 2.4: no per-device queries; only CUDA autocast is used
        return (device_type == "cuda" and torch.is_autocast_enabled()
                and torch.get_autocast_gpu_dtype() == torch.bfloat16)


class _LayerByLayer:
    """What FusedRNN / FusedGRU / FusedLSTM add to torch's classes (see the module docstring)."""

    mode: str
    num_layers: int
    hidden_size: int
    input_size: int
    training: bool
    _flat_weights: list

    def _regularise(self, dropout: float, locked: bool, weight_drop: float) -> None:
        self.between = float(dropout) if self.num_layers > 1 else 0.0
        self.locked = bool(locked)
        self.weight_drop = float(weight_drop)
        self._per_layer = self.between > 0 or self.weight_drop > 0
        self.flatten_parameters()

    def flatten_parameters(self) -> None:
        if not getattr(self, "_per_layer", False):
            return super().flatten_parameters()  # type: ignore[misc]
        weights = self._flat_weights
        if not _cudnn_flattenable(weights):
            return
        import torch.backends.cudnn.rnn as cudnn_rnn

        with torch.cuda.device_of(weights[0]), torch.no_grad():
            for k in range(self.num_layers):
                torch._cudnn_rnn_flatten_weight(
                    weights[4 * k: 4 * k + 4], 4, self.input_size if k == 0 else self.hidden_size,
                    cudnn_rnn.get_cudnn_mode(self.mode), self.hidden_size, 0, 1, True, False)

    def forward(self, x: Tensor, state=None):
        bf16 = autocast_bf16(x.device.type)
        if not self._per_layer and not bf16:
            return super().forward(x, state)  # type: ignore[misc]
        lstm = self.mode == "LSTM"
        if state is None:
            zeros = x.new_zeros(self.num_layers, x.shape[0], self.hidden_size)
            state = (zeros, zeros) if lstm else zeros
        h0, c0 = state if lstm else (state, None)
        kernel = _KERNELS[self.mode]
        copies = bf16 or (self.training and self.weight_drop > 0)
        with contextlib.ExitStack() as stack:
            if bf16:
                stack.enter_context(torch.autocast(x.device.type, enabled=False))
                x, h0 = x.to(torch.bfloat16), h0.to(torch.bfloat16)
                c0 = c0.to(torch.bfloat16) if lstm else None
            if copies and x.is_cuda:
                stack.enter_context(warnings.catch_warnings())
                warnings.filterwarnings("ignore", message=_COPY_WARNING)
            finals_h, finals_c = [], []
            for k in range(self.num_layers):
                if k:
                    x = dropout(x, self.between, self.training, self.locked)
                w_ih, w_hh, b_ih, b_hh = self._flat_weights[4 * k: 4 * k + 4]
                weights = [w_ih, drop_weight(w_hh, self.weight_drop, self.training), b_ih, b_hh]
                if bf16:
                    weights = [w.to(torch.bfloat16) for w in weights]
                if lstm:
                    x, h, c = kernel(x, (h0[k: k + 1], c0[k: k + 1]), weights, True, 1, 0.0,
                                     self.training, False, True)
                    finals_c.append(c)
                else:
                    x, h = kernel(x, h0[k: k + 1], weights, True, 1, 0.0, self.training, False,
                                  True)
                finals_h.append(h)
        h_n = torch.cat(finals_h)
        return x, ((h_n, torch.cat(finals_c)) if lstm else h_n)

    def extra_repr(self) -> str:
        extra = super().extra_repr()  # type: ignore[misc]
        if self.between:
            extra += f", dropout between layers={self.between}" + (" (locked)" if self.locked else "")
        return extra + (f", weight_drop={self.weight_drop}" if self.weight_drop else "")


def _cudnn_flattenable(weights: list) -> bool:
    """nn.RNNBase.flatten_parameters' conditions: CUDA tensors cuDNN accepts, one dtype, none
    aliasing another."""
    if not weights or not all(isinstance(w, Tensor) for w in weights):
        return False
    dtype = weights[0].dtype
    if not all(w.dtype == dtype and w.is_cuda and torch.backends.cudnn.is_acceptable(w)
               for w in weights):
        return False
    return (len({w.data_ptr() for w in weights}) == len(weights)
            and torch._use_cudnn_rnn_flatten_weight())


class FusedRNN(_LayerByLayer, nn.RNN):
    def __init__(self, input_size, hidden_size, num_layers=1, dropout=0.0, nonlinearity="tanh",
                 locked=False, weight_drop=0.0):
        super().__init__(input_size, hidden_size, num_layers, nonlinearity=nonlinearity,
                         batch_first=True)
        self._regularise(dropout, locked, weight_drop)


class FusedGRU(_LayerByLayer, nn.GRU):
    def __init__(self, input_size, hidden_size, num_layers=1, dropout=0.0, locked=False,
                 weight_drop=0.0):
        super().__init__(input_size, hidden_size, num_layers, batch_first=True)
        self._regularise(dropout, locked, weight_drop)


class FusedLSTM(_LayerByLayer, nn.LSTM):
    def __init__(self, input_size, hidden_size, num_layers=1, dropout=0.0, locked=False,
                 weight_drop=0.0):
        super().__init__(input_size, hidden_size, num_layers, batch_first=True)
        self._regularise(dropout, locked, weight_drop)


def fused_layer(mode: str, input_size: int, hidden_size: int, num_layers: int = 1,
                dropout: float = 0.0, locked: bool = False, weight_drop: float = 0.0) -> nn.Module:
    """The fused stack for a mode (rnn_tanh, rnn_relu, gru, lstm), batch first."""
    if mode == "gru":
        return FusedGRU(input_size, hidden_size, num_layers, dropout, locked, weight_drop)
    if mode == "lstm":
        return FusedLSTM(input_size, hidden_size, num_layers, dropout, locked, weight_drop)
    return FusedRNN(input_size, hidden_size, num_layers, dropout, mode.removeprefix("rnn_"),
                    locked, weight_drop)
