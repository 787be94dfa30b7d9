"""The dropouts of a recurrent language model (AWD-LSTM's set, Merity et al. 2018).

    ordinary   a fresh mask per number                     x (B, T, C) * m (B, T, C)
    locked     one mask per sequence, the same at every    x (B, T, C) * m (B, 1, C)
               time step (variational; Gal & Ghahramani 2016)
    rows       whole characters: rows of the embedding     W (V, E) * m (V, 1)
    weights    DropConnect on a recurrent weight, one      W_hh (G*H, H) * m (G*H, H)
               mask per batch, shared by every row and step (Wan et al. 2013)

Every mask is scaled by 1/(1 - p) (inverted dropout), so evaluation uses activations and weights
as they are. Masks are drawn from the default generator of the tensor's device, whose state a
checkpoint holds, so a resumed run draws the masks an uninterrupted one would. A mask keeps a
number where a uniform draw on [0, 1) is >= p (`keep_mask`), the same law as a Bernoulli(1 - p)
draw: torch's CPU Bernoulli sampler (what `F.dropout` uses) takes about three times as long per
number as its uniform one, and on the CPU a layer's mask costs a sizeable share of the step
(docs/BENCHMARKS.md, issue 29).
"""

from __future__ import annotations

import torch
from torch import Tensor


def keep_mask(like: Tensor, shape: tuple[int, ...], p: float) -> Tensor:
    """A mask of `shape` on `like`'s device and dtype: 1/(1 - p) where a uniform draw (float32,
    from the device's default generator) is >= p, i.e. with probability 1 - p, else 0; all zeros
    at p = 1."""
    if p >= 1:
        return like.new_zeros(shape)
    mask = torch.rand(shape, device=like.device).ge_(p).mul_(1 / (1 - p))
    return mask if mask.dtype == like.dtype else mask.to(like.dtype)


def dropout(x: Tensor, p: float, training: bool, locked: bool = False, time_dim: int = 1) -> Tensor:
    """Dropout on (B, T, C) activations (time_dim 0: (T, B, C)): a mask per number, or with
    `locked` one per sequence, the same at every step."""
    if not training or p == 0:
        return x
    shape = list(x.shape)
    if locked:
        shape[time_dim] = 1
    return x * keep_mask(x, tuple(shape), p)


def row_scale(vocab_size: int, p: float, like: Tensor) -> Tensor:
    """Embedding dropout: one factor per character, 0 for the dropped ones, 1/(1-p) for the rest."""
    return keep_mask(like, (vocab_size,), p)


def drop_weight(weight: Tensor, p: float, training: bool) -> Tensor:
    """DropConnect: `weight` with a fresh mask (one per call, i.e. per batch) in training."""
    if not training or p == 0:
        return weight
    return weight * keep_mask(weight, tuple(weight.shape), p)
