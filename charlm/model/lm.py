"""The char-LM: input layer -> recurrent layers -> dropout -> linear to vocabulary logits.

    tokens (B, T) --embedding (E) or one-hot (V)--> (B, T, I)
                  --recurrent layers (fused / scratch / fast)--> (B, T, H)
                  --dropout--> --linear--> logits (B, T, V)

The hyper-parameters are one dataclass (`charlm.model.config.ModelConfig`), stored in every
checkpoint, so a checkpoint rebuilds its own model (`charlm.model.loading`). The recurrent
layers come from `charlm.model.cells.recurrent_layer`, which hides which implementation runs
behind the torch.nn.GRU-style interface.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from charlm.model.cells import recurrent_layer
from charlm.model.config import ModelConfig

State = torch.Tensor | tuple[torch.Tensor, torch.Tensor]


class CharLM(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config.validate()
        vocab, hidden = config.vocab_size, config.hidden
        self.embedding = nn.Embedding(vocab, config.embed) if config.embed > 0 else None
        input_size = config.embed if config.embed > 0 else vocab
        between = config.dropout if config.layers > 1 else 0.0
        self.rnn = recurrent_layer(
            config.impl, config.mode, input_size, hidden, config.layers, between, config.gru_reset
        )
        self.drop = nn.Dropout(config.dropout)
        self.head = nn.Linear(hidden, vocab)

    def inputs(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.embedding is not None:
            return self.embedding(tokens)
        return F.one_hot(tokens, self.config.vocab_size).to(self.head.weight.dtype)

    def forward(self, tokens: torch.Tensor, state: State | None = None):
        """tokens (B, T) int64 -> logits (B, T, V) and the final state."""
        out, state = self.rnn(self.inputs(tokens), state)
        return self.head(self.drop(out)), state

    def begin_state(self, batch_size: int, device=None) -> State:
        """Zeros: (layers, B, H), or the pair (h, c) for an LSTM."""
        device = device if device is not None else self.head.weight.device
        shape = (self.config.layers, batch_size, self.config.hidden)
        h = torch.zeros(shape, device=device, dtype=self.head.weight.dtype)
        return (h, torch.zeros_like(h)) if self.config.cell == "lstm" else h


def detach_state(state: State | None) -> State | None:
    """Cut the graph between BPTT windows but keep the values (truncated backprop)."""
    if state is None:
        return None
    if isinstance(state, tuple):
        return tuple(s.detach() for s in state)
    return state.detach()


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
