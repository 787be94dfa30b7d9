"""The char-LM: input layer -> recurrent layers -> dropout -> linear to vocabulary logits.

    tokens (B, T) --embedding (E) or one-hot (V), embed_dropout (whole characters)--> (B, T, I)
                  --input_dropout--> --recurrent layers (fused / scratch / fast), dropout
                  between them, weight_drop on W_hh--> (B, T, H)
                  --dropout--> [--projection H -> E, when tied and E != H]
                  --linear (tie_weights: the embedding's weight)--> logits (B, T, V)

The three activation dropouts are ordinary or, with `locked_dropout`, one mask per sequence
(`charlm.model.dropout`); all of them are off in eval mode.

The hyper-parameters are one dataclass (`charlm.model.config.ModelConfig`), stored in every
checkpoint, so a checkpoint rebuilds its own model (`charlm.inference.loading`). The recurrent
layers come from `charlm.model.cells.recurrent_layer`, which hides which implementation runs
behind the torch.nn.GRU-style interface.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from charlm.model.cells import recurrent_layer
from charlm.model.config import MIN_CELLS, ModelConfig
from charlm.model.dropout import dropout, row_scale
from charlm.model.mincells import MinStack

State = torch.Tensor | tuple[torch.Tensor, torch.Tensor]


class CharLM(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config.validate()
        vocab, hidden = config.vocab_size, config.hidden
        self.embedding = nn.Embedding(vocab, config.embed) if config.embed > 0 else None
        input_size = config.embed if config.embed > 0 else vocab
        between = config.dropout if config.layers > 1 else 0.0
        if config.cell in MIN_CELLS:
            self.rnn = MinStack(config.cell, config.impl, input_size, hidden, config.layers,
                                between, config.locked_dropout, config.residual, config.norm,
                                config.ffn)
        else:
            self.rnn = recurrent_layer(
                config.impl, config.mode, input_size, hidden, config.layers, between,
                config.gru_reset, config.locked_dropout, config.weight_drop
            )
        tied = config.tie_weights
        self.proj = nn.Linear(hidden, config.embed, bias=False) if tied and config.embed != hidden else None
        self.head = nn.Linear(config.embed if tied else hidden, vocab)
        if tied:
            self.head.weight = self.embedding.weight  # one tensor: state_dict names it twice

    def inputs(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, T) ids -> (B, T, I) inputs of the first recurrent layer, dropouts applied."""
        cfg, train = self.config, self.training
        scale = (row_scale(cfg.vocab_size, cfg.embed_dropout, self.head.weight)
                 if train and cfg.embed_dropout else None)
        if self.embedding is not None:
            weight = self.embedding.weight
            x = F.embedding(tokens, weight if scale is None else weight * scale[:, None])
        else:
            x = F.one_hot(tokens, cfg.vocab_size).to(self.head.weight.dtype)
            x = x if scale is None else x * scale  # one-hot: the row's factor lands on its 1
        return dropout(x, cfg.input_dropout, train, cfg.locked_dropout)

    def forward(self, tokens: torch.Tensor, state: State | None = None):
        """tokens (B, T) int64 -> logits (B, T, V) and the final state."""
        out, state = self.rnn(self.inputs(tokens), state)
        out = dropout(out, self.config.dropout, self.training, self.config.locked_dropout)
        return self.head(out if self.proj is None else self.proj(out)), state

    def output_weight(self) -> torch.Tensor:
        """The (V, H) matrix from the last layer's state to the logits (the projection folded in)."""
        return self.head.weight if self.proj is None else self.head.weight @ self.proj.weight

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
