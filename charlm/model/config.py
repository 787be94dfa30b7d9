"""The model's hyper-parameters: one dataclass, stored in every checkpoint, and the choices it takes.

No torch here: `charlm train --help` and config checking import this module. The Rules on the
fields are the one home of each value's range; the training options of the same names take
theirs from here (`charlm.config.train`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

from charlm.checks import Rule, check_fields
from charlm.errors import CharlmError, UsageError

CELLS = ("rnn", "gru", "lstm", "mingru", "minlstm")
MIN_GATES = {"mingru": 2, "minlstm": 3}  # cells whose gates read the input only (model/mincells)
MIN_CELLS = tuple(MIN_GATES)
NORMS = ("layer", "rms", "none")  # a min-cell stack's normalisation: LayerNorm, RMSNorm
NONLINEARITIES = ("tanh", "relu")
GRU_RESETS = ("after", "before")  # the GRU's reset gate after (PyTorch, cuDNN) or before W_hh
IMPLS = ("fused", "scratch", "fast")  # the concrete implementations; "auto" picks one
MODES = ("rnn_tanh", "rnn_relu", "gru", "lstm")  # what the layer factory takes: cell + nonlinearity
FAST_MODES = ("gru", *MIN_CELLS)  # the cells `fast` exists for
# --weights of generate and eval: auto (the averaged weights where a run has them), ema, raw
WEIGHTS = ("auto", "ema", "raw")


def _rule(**kw) -> dict:
    return {"rule": Rule(**kw)}


# Upper bounds keep every size torch is asked for within int64 (a model that large is refused as
# "out of memory", not with an overflow deep in C++); no real model comes near them.
MAX_WIDTH = 2**24
MAX_LAYERS = 1024
MAX_VOCAB = 0x110000 + 1  # every Unicode code point, and <unk>

# The model's dropout probabilities, declared once: `stochastic` reads them, dynamic evaluation
# (`charlm.inference.dynamic.adaptable`) turns them off, and with `locked_dropout` and `impl`
# they are what a resumed run may change (ADJUSTABLE; `charlm.config.train` makes every other
# model option fixed on resume from it). None of them changes a weight's shape.
DROPOUTS = ("dropout", "input_dropout", "embed_dropout", "weight_drop")
ADJUSTABLE = ("impl", *DROPOUTS, "locked_dropout")


@dataclass
class ModelConfig:
    """The defaults are `charlm train`'s (whose model options take theirs from here), so
    `CharLM(ModelConfig(vocab_size=V))` is the model a run with default options trains."""

    vocab_size: int = field(metadata=_rule(kind=int, low=1, high=MAX_VOCAB))
    cell: str = field(default="gru", metadata=_rule(choices=CELLS))
    hidden: int = field(default=256, metadata=_rule(kind=int, low=1, high=MAX_WIDTH))
    layers: int = field(default=2, metadata=_rule(kind=int, low=1, high=MAX_LAYERS))
    # 0: one-hot inputs, exactly as in d2l
    embed: int = field(default=32, metadata=_rule(kind=int, low=0, high=MAX_WIDTH))
    # between recurrent layers and before the output layer
    dropout: float = field(default=0.2, metadata=_rule(kind=float, low=0, high=1, high_open=True))
    nonlinearity: str = field(default="tanh", metadata=_rule(choices=NONLINEARITIES))  # rnn only
    impl: str = field(default="fused", metadata=_rule(choices=IMPLS))
    gru_reset: str = field(default="after", metadata=_rule(choices=GRU_RESETS))  # gru only
    # AWD-LSTM's regularisers (charlm.model.dropout), off by default
    input_dropout: float = field(default=0.0, metadata=_rule(kind=float, low=0, high=1, high_open=True))
    embed_dropout: float = field(default=0.0, metadata=_rule(kind=float, low=0, high=1, high_open=True))
    weight_drop: float = field(default=0.0, metadata=_rule(kind=float, low=0, high=1, high_open=True))
    locked_dropout: bool = field(default=False, metadata=_rule(kind=bool))
    # the output layer shares the embedding's weight (through a projection when embed != hidden)
    tie_weights: bool = field(default=False, metadata=_rule(kind=bool))
    # the min cells' stack (charlm.model.mincells); other cells ignore these
    residual: bool = field(default=True, metadata=_rule(kind=bool))
    norm: str = field(default="layer", metadata=_rule(choices=NORMS))
    ffn: int = field(default=2, metadata=_rule(kind=int, low=0, high=64))

    @property
    def mode(self) -> str:
        """The cell name the recurrent layer factory takes: rnn_tanh, rnn_relu, gru or lstm."""
        return f"rnn_{self.nonlinearity}" if self.cell == "rnn" else self.cell

    @property
    def stochastic(self) -> bool:
        """Whether training draws random masks (any dropout): resume then needs the generators."""
        return any(getattr(self, name) > 0 for name in DROPOUTS)

    def validate(self) -> "ModelConfig":
        check_fields(self)
        check_combination(self.cell, self.impl, self.gru_reset)
        check_tying(self.tie_weights, self.embed)
        if self.cell in MIN_CELLS and self.weight_drop:
            raise UsageError(f"--weight-drop masks recurrent weights, which --cell {self.cell} has "
                             "none of; drop it")
        return self

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "ModelConfig":
        """A checkpoint's model config, checked: one-line errors, never a half-valid config."""
        if not isinstance(data, dict):
            raise CharlmError("checkpoint's model config is not a table; the file is damaged")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise CharlmError(
                f"checkpoint's model config has unknown keys {unknown}; it was written by a newer "
                "charlm: upgrade charlm to load it"
            )
        missing = sorted(known - set(data))
        if missing:  # every key: a default here would silently change the model
            raise CharlmError(f"checkpoint's model config lacks {missing}; the file is damaged")
        try:
            return cls(**data).validate()
        except (TypeError, UsageError) as exc:
            raise CharlmError(f"checkpoint's model config is invalid: {exc}") from None


def check_combination(cell: str, impl: str, gru_reset: str) -> None:
    """Settings that are each valid but do not go together (impl may still be "auto")."""
    if gru_reset == "before" and cell != "gru":
        raise UsageError("gru_reset before applies to --cell gru only")
    if gru_reset == "before" and impl not in ("auto", "scratch"):
        raise UsageError(
            "--gru-reset before exists only in the scratch implementation; use --impl scratch"
        )
    if impl == "fast" and cell not in FAST_MODES:
        raise UsageError(
            f"--impl fast exists only for {', '.join(FAST_MODES)}, not {cell}; "
            "use --impl fused or --impl scratch"
        )


def check_tying(tie_weights: bool, embed: int) -> None:
    if tie_weights and embed == 0:
        raise UsageError(
            "--tie-weights shares the embedding with the output layer, but --embed 0 has no "
            "embedding (one-hot inputs); give --embed N (N = --hidden ties without a projection)"
        )


def resolve_impl(impl: str, cell: str, device_type: str, gru_reset: str = "after") -> str:
    """Turn ``auto`` into a concrete implementation; other values are returned unchanged.

    Rule (from scripts/bench_cells.py, docs/BENCHMARKS.md):
      * ``--gru-reset before``                 -> scratch (the only implementation that has it)
      * CUDA (any cell)                        -> fused (cuDNN)
      * CPU, a cell in FAST_MODES (gru, the min cells) -> fast
      * CPU, any other cell                    -> fused
    """
    if impl != "auto":
        return impl
    if cell == "gru" and gru_reset == "before":
        return "scratch"
    if device_type == "cpu" and cell in FAST_MODES:
        return "fast"
    return "fused"


LARGE_VOCAB = 1024  # symbols past which a vocabulary's cost is worth a warning


def large_vocab_note(config: ModelConfig) -> str | None:
    """What a large vocabulary costs, when it dominates: the output layer (and a one-hot input
    layer) do vocab_size x hidden multiply-adds per character, against the recurrent layers'
    gates x hidden x (input + hidden). A character-level text has 30-300 symbols; a text with
    CJK in it has tens of thousands, and training slows by the ratio."""
    gates = {"rnn": 1, "gru": 3, "lstm": 4, **MIN_GATES}[config.cell]
    vocab, hidden = config.vocab_size, config.hidden
    one_hot = config.embed == 0
    per_vocab = hidden * vocab + (gates * hidden * vocab if one_hot else 0)
    recurrent = gates * hidden * ((0 if one_hot else config.embed) + hidden)
    recurrent += (config.layers - 1) * gates * hidden * 2 * hidden
    if vocab <= LARGE_VOCAB or per_vocab <= recurrent:
        return None
    return (f"the vocabulary has {vocab:,} symbols: the layers over it cost "
            f"{per_vocab / recurrent:.0f}x the recurrent layers per character, so they take most "
            "of the time of training and evaluation; --preprocessing bytes (at most 256 symbols, "
            "any script) or --max-vocab N (the N most frequent; the rest become <unk>) make it "
            "small")
