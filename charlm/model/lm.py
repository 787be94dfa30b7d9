"""The char-LM: input layer -> recurrent layers -> dropout -> linear to vocabulary logits.

    tokens (B, T) --embedding (E) or one-hot (V)--> (B, T, I)
                  --recurrent layers (fused / scratch / fast)--> (B, T, H)
                  --dropout--> --linear--> logits (B, T, V)

The hyper-parameters are one dataclass, stored in every checkpoint, so a checkpoint rebuilds its
own model. The recurrent layers come from `charlm.model.cells.recurrent_layer`, which hides which
implementation runs behind the torch.nn.GRU-style interface.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from charlm.errors import CharlmError, UsageError

CELLS = ("rnn", "gru", "lstm")
NONLINEARITIES = ("tanh", "relu")
GRU_RESETS = ("after", "before")

State = torch.Tensor | tuple[torch.Tensor, torch.Tensor]


@dataclass
class ModelConfig:
    vocab_size: int
    cell: str = "gru"
    hidden: int = 256
    layers: int = 1
    embed: int = 0  # 0: one-hot inputs, exactly as in d2l
    dropout: float = 0.0  # between recurrent layers and before the output layer
    nonlinearity: str = "tanh"  # rnn only
    impl: str = "fused"  # the concrete implementation: fused | scratch | fast
    gru_reset: str = "after"  # gru only: reset gate after (PyTorch) or before (Cho/d2l) W_hh

    @property
    def mode(self) -> str:
        """The cell name the recurrent layer factory takes: rnn_tanh, rnn_relu, gru or lstm."""
        return f"rnn_{self.nonlinearity}" if self.cell == "rnn" else self.cell

    def validate(self) -> "ModelConfig":
        _check_choice("cell", self.cell, CELLS)
        _check_choice("nonlinearity", self.nonlinearity, NONLINEARITIES)
        _check_choice("gru_reset", self.gru_reset, GRU_RESETS)
        for key in ("vocab_size", "hidden", "layers"):
            _check_int(key, getattr(self, key), minimum=1)
        _check_int("embed", self.embed, minimum=0)
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            raise UsageError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if self.gru_reset == "before" and self.cell != "gru":
            raise UsageError("gru_reset applies to --cell gru only")
        return self

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "ModelConfig":
        if not isinstance(data, dict):
            raise CharlmError("checkpoint's model config is not a table; the file is damaged")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise CharlmError(
                f"checkpoint's model config has unknown keys {unknown}; it was written by a newer "
                "charlm: upgrade charlm to load it"
            )
        try:
            return cls(**data).validate()
        except (TypeError, UsageError) as exc:
            raise CharlmError(f"checkpoint's model config is invalid: {exc}") from None


def _check_choice(key: str, value, choices) -> None:
    if value not in choices:
        raise UsageError(f"{key} must be one of {', '.join(choices)}; got {value!r}")


def _check_int(key: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise UsageError(f"{key} must be an integer >= {minimum}, got {value!r}")


class CharLM(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        from charlm.model.cells import recurrent_layer

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


def check_vocab_size(where: str, tokens: int, said: object) -> None:
    """Refuse a checkpoint whose vocabulary and model config disagree on the vocabulary size."""
    if tokens != said:
        raise CharlmError(f"{where}: its vocabulary has {tokens} tokens but its model config says "
                          f"{said}; the file is damaged")


def check_parameters(where: str, model: nn.Module, saved: object) -> None:
    """Refuse, naming the parameter, saved weights whose names, shapes or values do not fit
    ``model`` (one-line CharlmErrors that start with ``where``, e.g. the checkpoint's path)."""
    if not isinstance(saved, dict):
        raise CharlmError(f"{where}: its 'model' entry is not a table of tensors; the file is damaged")
    expected = model.state_dict()
    missing = [k for k in expected if k not in saved]
    unexpected = [k for k in saved if k not in expected]
    if missing or unexpected:
        parts = ([f"missing {', '.join(missing[:3])}"] if missing else []) + (
            [f"unexpected {', '.join(map(str, unexpected[:3]))}"] if unexpected else [])
        raise CharlmError(
            f"{where}: its parameters do not match its model config ({'; '.join(parts)}); "
            "the file is damaged"
        )
    for name, want in expected.items():
        got = saved[name]
        if not isinstance(got, torch.Tensor) or got.shape != want.shape:
            shape = tuple(got.shape) if isinstance(got, torch.Tensor) else type(got).__name__
            raise CharlmError(
                f"{where}: parameter {name} is {shape} but its model config gives "
                f"{tuple(want.shape)}; the file is damaged"
            )
        if not torch.isfinite(got).all():
            raise CharlmError(f"{where}: parameter {name} holds NaN or infinity; use another checkpoint")


def model_from_checkpoint(ckpt: dict, impl: str | None = None, device="cpu") -> CharLM:
    """Rebuild a checkpoint's model, checking every field before use (one-line errors).

    `impl` loads the weights into another implementation (fused / scratch / fast): all lay out
    their parameters like torch.nn.RNN/GRU/LSTM, so the same state dict fits each.
    """
    config = ModelConfig.from_dict(ckpt.get("model_config"))
    if impl is not None and impl != "auto":
        config.impl = impl
    vocab = ckpt.get("vocab")
    tokens = vocab.get("tokens") if isinstance(vocab, dict) else None
    if not isinstance(tokens, list) or len(tokens) != config.vocab_size:
        size = len(tokens) if isinstance(tokens, list) else "no"
        raise CharlmError(
            f"checkpoint is inconsistent: its vocabulary has {size} tokens but the model expects "
            f"{config.vocab_size}; the file is damaged or was edited"
        )
    state = ckpt.get("model")
    model = CharLM(config)
    check_parameters("checkpoint", model, state)
    model.load_state_dict(state)
    return model.to(device)
