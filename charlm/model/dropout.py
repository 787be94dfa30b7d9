"""The dropouts of a recurrent language model (AWD-LSTM's set, Merity et al. 2018).

    ordinary   a fresh mask per number                     x (B, T, C) * m (B, T, C)
    locked     one mask per sequence, the same at every    x (B, T, C) * m (B, 1, C)
               time step (variational; Gal & Ghahramani 2016)
    rows       whole characters: rows of the embedding     W (V, E) * m (V, 1)
    weights    DropConnect on a recurrent weight, one      W_hh (G*H, H) * m (G*H, H)
               mask per batch, shared by every row and step (Wan et al. 2013)

Every mask is scaled by 1/(1 - p) (inverted dropout), so evaluation uses activations and weights
as they are. Masks are drawn from the default generator of the tensor's device, whose state a
checkpoint holds, so a resumed run draws the masks an uninterrupted one would.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def _keep_mask(like: Tensor, shape: tuple[int, ...], p: float) -> Tensor:
    """Bernoulli(1 - p) / (1 - p) of `shape`; all zeros at p = 1."""
    if p >= 1:
        return like.new_zeros(shape)
    return like.new_empty(shape).bernoulli_(1 - p).div_(1 - p)


def dropout(x: Tensor, p: float, training: bool, locked: bool = False, time_dim: int = 1) -> Tensor:
    """Dropout on (B, T, C) activations (time_dim 0: (T, B, C)): a mask per number, or with
    `locked` one per sequence, the same at every step."""
    if not training or p == 0:
        return x
    if not locked:
        return F.dropout(x, p, training=True)
    shape = list(x.shape)
    shape[time_dim] = 1
    return x * _keep_mask(x, tuple(shape), p)


def row_scale(vocab_size: int, p: float, like: Tensor) -> Tensor:
    """Embedding dropout: one factor per character, 0 for the dropped ones, 1/(1-p) for the rest."""
    return _keep_mask(like, (vocab_size,), p)


def drop_weight(weight: Tensor, p: float, training: bool) -> Tensor:
    """DropConnect: `weight` with a fresh mask (one per call, i.e. per batch) in training."""
    if not training or p == 0:
        return weight
    return weight * _keep_mask(weight, tuple(weight.shape), p)
