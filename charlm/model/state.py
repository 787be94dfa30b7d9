"""The recurrent state a CharLM carries between calls, and the few things done to it.

    State = h                (layers, B, H)   rnn, gru
          | (h, c)           two of them      lstm

Every function here works on either form, so the rest of charlm never asks which cell it has:
a checkpoint stores the pair as a list [h, c] (`to_plain`), everything else as a tuple.
"""

from __future__ import annotations

from typing import Callable

import torch

State = torch.Tensor | tuple[torch.Tensor, torch.Tensor]


def map_state(fn: Callable[[torch.Tensor], torch.Tensor], state):
    """`fn` applied to h, or to h and c; None stays None, a list stays a list."""
    if state is None:
        return None
    if isinstance(state, (tuple, list)):
        return type(state)(fn(s) for s in state)
    return fn(state)


def detach_state(state: State | None) -> State | None:
    """Cut the graph between BPTT windows but keep the values (truncated backprop)."""
    return map_state(torch.Tensor.detach, state)


def cat_states(states: list, dim: int):
    """States (all of one form) joined along `dim`: the batch's rows of several parts."""
    if isinstance(states[0], (tuple, list)):
        return type(states[0])(torch.cat(parts, dim) for parts in zip(*states))
    return torch.cat(states, dim)


def tensors(state: State) -> tuple[torch.Tensor, ...]:
    """(h,) or (h, c)."""
    return tuple(state) if isinstance(state, (tuple, list)) else (state,)


def layers_of(state: State) -> list:
    """Per layer: h (B, H), or the pair (h, c)."""
    if isinstance(state, (tuple, list)):
        return list(zip(state[0].unbind(0), state[1].unbind(0)))
    return list(state.unbind(0))


def from_layers(layers: list) -> State:
    """`layers_of` undone: the layers' h (or pairs) stacked into one State."""
    if isinstance(layers[0], tuple):
        return tuple(torch.stack(parts) for parts in zip(*layers))
    return torch.stack(layers)


def to_plain(state: State | None):
    """The carried state as a checkpoint keeps it: float32 CPU tensors, h or [h, c]. float32
    whatever the precision it was computed in, so a run resumes under any --precision and on
    any device."""
    plain = map_state(lambda s: s.detach().float().cpu(), state)
    return list(plain) if isinstance(plain, tuple) else plain


def from_plain(data, device) -> State | None:
    """A checkpoint's carried state on `device`, float32."""
    state = map_state(lambda s: s.to(device=device, dtype=torch.float32), data)
    return tuple(state) if isinstance(state, list) else state
