"""The training configuration: every option of `charlm train` declared once, here.

Each field of `TrainConfig` carries, in one `option(...)` declaration, its default, help text,
help panel, choices or range (a `charlm.checks.Rule`; the model's options take theirs from
`ModelConfig`) and whether a resumed run may change it. Everything else is made from that:

    the `charlm train` options, their --help, defaults and choices   charlm.cli.train
    types and ranges, precedence and the checks across options    charlm.config.build
    config files, a run's config.toml, the README's options table  charlm.config.file
    what --resume refuses to change                                fixed_on_resume()

Precedence: these defaults (equal to `configs/timemachine-gru.toml`, checked by a test) <
`--config FILE` < the options typed on the command line. Keys are the field names; a file may
group them in tables (`[data]`, `[model]`, ...), which are flattened: the table name is only
for reading. No torch here: `charlm train --help` imports this module.
"""

from __future__ import annotations

import types
import typing
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from charlm.about import install_extra
from charlm.checks import Rule, rule_of
from charlm.data.text import PREPROCESSING
from charlm.model.config import IMPLS, MIN_CELLS, ModelConfig

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("none", "cosine", "plateau")

SAMPLINGS = ("sequential", "random")
PRECISIONS = ("fp32", "bf16", "fp16")
DATA, MODEL, OPTIM, STOP, RUN = "Data", "Model", "Optimisation", "Stopping", "Run"


@dataclass(frozen=True)
class Option:
    """How one TrainConfig field shows up as a command-line option and a config key."""

    help: str
    panel: str
    rule: Rule | None = None
    fixed: bool = False  # a resumed run must keep the checkpoint's value
    short: str | None = None  # e.g. "-b"
    default_text: str | None = None  # what --help says for a default of None
    bare: str | None = None  # the value of the option given alone (`--tensorboard`)
    cells: tuple[str, ...] = ()  # the cells it applies to (all when empty)
    metavar: str | None = None  # what --help calls the value, where its type says too little

    @property
    def choices(self) -> tuple[str, ...]:
        return self.rule.choices if self.rule else ()


def option(default: Any, help: str, panel: str, *, rule: Rule | None = None, fixed: bool = False,
           short: str | None = None, default_text: str | None = None, model: bool = False,
           choices: tuple[str, ...] = (), bare: str | None = None,
           cells: tuple[str, ...] = (), metavar: str | None = None) -> Any:
    """A TrainConfig field. `model=True` takes the rule of ModelConfig's field of the same name
    (filled in below, once the field's name is known); `choices` is shorthand for a Rule; `bare`
    lets the option be given without a value, meaning that one; `cells`: the cells the option
    means something for (another cell refuses other values)."""
    meta = Option(help, panel, Rule(choices=choices) if choices else rule, fixed, short,
                  default_text, bare, cells, metavar)
    kwargs = {"default_factory": list} if isinstance(default, list) else {"default": default}
    return field(metadata={"option": meta, "model_rule": model}, **kwargs)


def _int(low: int = 0, **kw) -> Rule:
    return Rule(kind=int, low=low, **kw)


def _float(low: float, **kw) -> Rule:
    return Rule(kind=float, low=low, **kw)


@dataclass
class TrainConfig:
    # -- data ----------------------------------------------------------------------------------
    corpus: str | None = option(
        None, "A named corpus (see charlm data list): timemachine, tinyshakespeare, enwik8, text8, "
        "python-docs.",
        DATA, fixed=True, default_text="timemachine, else python-docs", metavar="<name>")
    text: list[str] = option(
        [], "Train on local UTF-8 file(s) instead (repeatable).", DATA, fixed=True,
        metavar="<file>")
    url: str | None = option(None, "Train on a text downloaded from this URL.", DATA, fixed=True,
                             metavar="<url>")
    sha256: str | None = option(None, "Expected sha256 of --url (64 hex digits).", DATA)
    data_dir: str | None = option(
        None, "Corpus cache directory.", DATA,
        default_text="$CHARLM_DATA_DIR, else $XDG_CACHE_HOME/charlm, else ~/.cache/charlm",
        metavar="<dir>")
    download_timeout: float = option(
        1800.0, "Give up on a download URL after this many seconds, retries included (0: "
        "never); the next URL is tried.", DATA, rule=_float(0))
    download_min_rate: int = option(
        1024, "Give up on a download URL that sends fewer bytes/s than this over 30 s (0: any "
        "pace).", DATA, rule=_int(0))
    preprocessing: str | None = option(
        None, "d2l (letters and single spaces, lowercased), lower, raw, or bytes (the UTF-8 "
        "bytes: at most 256 symbols, any script).", DATA, fixed=True,
        choices=PREPROCESSING, default_text="the corpus's own")
    min_freq: int = option(1, "Symbols rarer than this map to <unk>.", DATA, rule=_int(1),
                           fixed=True)
    max_vocab: int = option(0, "Keep at most this many symbols (0: all).", DATA, rule=_int(0),
                            fixed=True)
    max_tokens: int = option(0, "Use only the first N tokens, as d2l's loader (0: all).", DATA,
                             rule=_int(0), fixed=True)
    val_fraction: float | None = option(  # None: the corpus's own
        None, "Share of the corpus (from the end) for validation.", DATA, fixed=True,
        rule=_float(0, high=1, high_open=True), default_text="0.1 (enwik8, text8: 0.05)")
    test_fraction: float | None = option(
        None, "Share of the corpus (the very end) held out for test.", DATA, fixed=True,
        rule=_float(0, high=1, high_open=True), default_text="0 (enwik8, text8: 0.05)")
    # -- model ---------------------------------------------------------------------------------
    cell: str = option("gru", "The recurrent cell; mingru and minlstm (Feng et al. 2024) gate on "
                       "the input only and train in parallel over time.", MODEL, model=True,
                       fixed=True)
    hidden: int = option(256, "Hidden units per layer.", MODEL, model=True, fixed=True)
    layers: int = option(2, "Recurrent layers.", MODEL, model=True, fixed=True)
    embed: int = option(32, "Embedding size; 0: one-hot inputs, as in d2l.", MODEL, model=True,
                        fixed=True)
    dropout: float = option(0.2, "Dropout between layers and before the output.", MODEL,
                            model=True)
    nonlinearity: str = option("tanh", "The RNN's nonlinearity (--cell rnn only).", MODEL,
                               model=True, fixed=True, cells=("rnn",))
    impl: str = option(
        "auto", "auto: fast for the GRU and min cells on the CPU, scratch for --gru-reset "
        "before, else fused; fused: torch/cuDNN, for min cells the parallel scan; scratch: cells "
        "from the gate equations; fast: the CPU's, with its own backward (GRU: C time loops, ~2x "
        "fused).", MODEL, choices=("auto", *IMPLS))
    gru_reset: str = option(
        "after", "GRU reset gate after (PyTorch) or before (Cho et al., d2l) the recurrent "
        "product; before needs --impl scratch.", MODEL, model=True, fixed=True, cells=("gru",))
    input_dropout: float = option(
        0.0, "Dropout on the embedding (or one-hot) output, into the first layer.", MODEL,
        model=True)
    embed_dropout: float = option(
        0.0, "Drop whole characters: rows of the embedding, one mask per batch.", MODEL,
        model=True)
    weight_drop: float = option(
        0.0, "DropConnect on the recurrent weights W_hh, one mask per batch (AWD-LSTM).", MODEL,
        model=True, cells=("rnn", "gru", "lstm"))
    locked_dropout: bool = option(
        False, "Locked (variational) dropout: --dropout and --input-dropout draw one mask per "
        "sequence, the same at every step.", MODEL, model=True)
    tie_weights: bool = option(
        False, "The output layer shares the embedding's weight (through a projection when "
        "--embed is not --hidden).", MODEL, model=True, fixed=True)
    init_from: str | None = option(
        None, "Fine-tune: start from the weights of this run directory (its best.pt), checkpoint "
        "or exported folder; the model's sizes and preprocessing are its own, its vocabulary is "
        "extended by the new text's characters, the optimizer starts fresh.", MODEL, fixed=True,
        default_text="a new model")
    residual: bool = option(
        True, "Add each layer's output to its input where their widths agree (min cells only).",
        MODEL, model=True, fixed=True, cells=MIN_CELLS)
    norm: str = option(
        "layer", "Normalise each layer's input and the last layer's output: layer (LayerNorm), "
        "rms (RMSNorm) or none (min cells only).", MODEL, model=True, fixed=True, cells=MIN_CELLS)
    ffn: int = option(
        0, "A feed-forward block after each layer, N x --hidden wide (0: none; min cells "
        "only).", MODEL, model=True, fixed=True, cells=MIN_CELLS)
    # -- optimisation --------------------------------------------------------------------------
    batch_size: int = option(64, "Sequences per batch (the global batch with --nproc).", OPTIM,
                             rule=_int(1), fixed=True, short="-b")
    num_steps: int = option(32, "BPTT length: characters per sequence.", OPTIM, rule=_int(1),
                            fixed=True)
    sampling: str = option(
        "sequential", "sequential: state carried, truncated BPTT; random: state reset per batch.",
        OPTIM, choices=SAMPLINGS, fixed=True)
    optimizer: str = option("adamw", "The optimizer (d2l uses sgd).", OPTIM, choices=OPTIMIZERS,
                            fixed=True)
    lr: float = option(3e-3, "Learning rate (d2l uses sgd with 1).", OPTIM,
                       rule=_float(0, low_open=True))
    weight_decay: float = option(0.01, "Weight decay.", OPTIM, rule=_float(0))
    schedule: str = option(
        "cosine", "none; cosine: linear warm-up, then decay to the end of the run; plateau: "
        "multiply by --plateau-factor after --plateau-patience evaluations without improvement.",
        OPTIM, choices=SCHEDULES)
    warmup_steps: int = option(100, "Linear warm-up steps (cosine).", OPTIM, rule=_int(0))
    plateau_patience: int = option(2, "Evaluations without improvement before a decay (plateau).",
                                   OPTIM, rule=_int(1))
    plateau_factor: float = option(0.5, "Learning-rate factor per decay (plateau).", OPTIM,
                                   rule=_float(0, high=1, low_open=True, high_open=True))
    clip: float = option(1.0, "Clip gradients to this global L2 norm (0: off).", OPTIM,
                         rule=_float(0, text=">= 0 (0 disables clipping)"))
    ema: float = option(
        0.0, "Average the weights: an exponential moving average with this decay (e.g. 0.999), "
        "used for validation, best.pt, generate and eval (0: off). After step t the decay is "
        "min(--ema, (1+t)/(10+t)), a warm-up ramp: the first steps do not carry the random "
        "initial weights along.", OPTIM,
        rule=_float(0, high=1, high_open=True))
    # -- stopping: whichever comes first; 0 disables a limit -------------------------------------
    epochs: int = option(0, "Stop after this many epochs (0: no limit).", STOP, rule=_int(0))
    max_steps: int = option(0, "Stop after this many steps (0: no limit).", STOP, rule=_int(0))
    time_budget: str = option(
        "2m", "Stop after this much training time, e.g. 90s, 5m, 1h ('0': no limit).", STOP,
        metavar="<duration>")
    # -- runtime -------------------------------------------------------------------------------
    device: str = option(
        "auto", "auto (CUDA, then MPS but not for a GRU, then CPU), cpu, cuda, cuda:N or mps.", RUN)
    precision: str = option(
        "fp32", "Mixed precision needs CUDA: bf16 (recurrent layers too) or fp16 (loss scaling); "
        "for small models fp32 is faster.", RUN, choices=PRECISIONS)
    tf32: bool = option(
        False, "Let CUDA use TF32 tensor cores for float32 products (faster, 10-bit mantissa); "
        "eval perplexity never does.", RUN)
    threads: int = option(0, "CPU threads (0: the faster of one per core and one, timed every "
                          "200 steps; one for a tiny model).", RUN, rule=_int(0))
    seed: int = option(0, "Random seed: weights, batches, dropout.", RUN, fixed=True,
                       rule=_int(0, high=2**63, high_open=True, text="an integer in [0, 2**63)"))
    log_every: int = option(50, "Steps between progress lines.", RUN, rule=_int(1))
    eval_every: int = option(500, "Steps between validation + sample.", RUN, rule=_int(1))
    eval_tokens: int = option(250_000, "Validation tokens per evaluation while training: the "
                              "same first part of the split each time (0: all), an estimate; "
                              "the end of a run scores best.pt on all of it exactly.", RUN, rule=_int(0))
    checkpoint_every: int = option(500, "Steps between saves of last.pt.", RUN, rule=_int(1))
    sample_prefix: str | None = option(
        None, "Prompt for the samples shown at each evaluation.", RUN,
        default_text="the corpus's own")
    sample_length: int = option(200, "Characters per sample.", RUN, rule=_int(1))
    out: str | None = option(None, "Run directory.", RUN, short="-o",
                             default_text="runs/<time>-<cell>-<corpus>", metavar="<dir>")
    tensorboard: str | None = option(
        None, "Also log losses, perplexity, bits/char, learning rate, tokens/s, gradient norm and "
        "the samples for TensorBoard, in DIR (RUN_DIR/... is inside the run directory); alone: "
        "RUN_DIR/tensorboard; off: none (a resumed run logs where it logged). Needs "
        f"{install_extra('tensorboard')}.", RUN, default_text="off",
        bare="RUN_DIR/tensorboard")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def record_source(self, name: str, preprocessing: str, prefix: str, url: str | None) -> None:
        """Record what a run actually trains on, so its config.toml and a resume train on the
        same text: files absolute (found relative to here), the default corpus (or its
        python-docs fallback), preprocessing and sample prefix as they resolved, and `url` (the
        --url without a password, which config.toml and checkpoints never hold)."""
        self.text = absolute_files(self.text)
        self.url = url
        if not (self.corpus or self.text or self.url):
            self.corpus = name
        self.preprocessing = preprocessing
        if self.sample_prefix is None:
            self.sample_prefix = prefix

    def section(self, panel: str) -> dict[str, Any]:
        """The fields of one help panel, e.g. section(DATA) for `load_dataset`."""
        return {f.name: getattr(self, f.name) for f in fields(self) if OPTIONS[f.name].panel == panel}


def _options() -> dict[str, Option]:
    found = {}
    for f in fields(TrainConfig):
        meta: Option = f.metadata["option"]
        if f.metadata["model_rule"]:
            meta = replace(meta, rule=rule_of(ModelConfig, f.name))
        found[f.name] = meta
    return found


OPTIONS: dict[str, Option] = _options()  # field name -> its declaration
TYPES: dict[str, Any] = typing.get_type_hints(TrainConfig)  # field name -> int, str | None, ...


def base_type(name: str) -> Any:
    """The type of option `name` without its Optional: int, float, str, bool or list[str]."""
    kind = TYPES[name]
    if isinstance(kind, types.UnionType) or typing.get_origin(kind) is typing.Union:
        return next(k for k in typing.get_args(kind) if k is not type(None))
    return kind


def optional(name: str) -> bool:
    """Whether option `name` may be None (meaning: decided later, e.g. the corpus's own)."""
    return type(None) in typing.get_args(TYPES[name])


def default_of(name: str) -> Any:
    f = TrainConfig.__dataclass_fields__[name]
    return f.default_factory() if f.default is MISSING else f.default


def canonical(name: str, value: Any) -> Any:
    """A value of option `name` as the config keeps it: a choice lower-case (--cell GRU is --cell
    gru)."""
    return value.lower() if OPTIONS[name].choices and isinstance(value, str) else value


def absolute_files(files: list[str]) -> list[str]:
    """--text files as a run records them: absolute, found relative to the working directory."""
    return [str(Path(f).resolve()) for f in files]


def fixed_on_resume() -> tuple[str, ...]:
    """Options that define the model or its data: a resumed run must keep them."""
    return tuple(name for name, meta in OPTIONS.items() if meta.fixed)
