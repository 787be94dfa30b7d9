"""`charlm.load(...)`: a trained model to use from Python, and the core of generate, eval and export.

    import charlm
    model = charlm.load("runs/latest")          # a checkpoint, a run folder or an export folder
    model.generate("time traveller", length=100, seed=0)   # -> text (prefix + continuation)
    for piece in model.stream("time traveller"):           # the same, piece by piece
        print(piece, end="")
    model.perplexity(split="val").perplexity    # the figures `charlm eval perplexity` prints
    model.save_pretrained("share/my-model")     # the folder `charlm export` writes

`charlm generate`, `charlm eval perplexity` and `charlm export` are thin wrappers over this class
(they parse, print and word the messages), so the API and the commands give the same text and
figures for the same checkpoint and seed. Nothing here imports the trainer.
"""

from __future__ import annotations

import codecs
import os
import secrets
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

import torch

from charlm.data.text import preprocess, read_text, readable
from charlm.errors import CharlmError, UsageError, warn
from charlm.inference import evaluate as scoring  # scoring.perplexity_of: one name to patch
from charlm.inference.evaluate import Perplexity
from charlm.inference.loading import Loaded, describe, load_model, model_info, weights_used
from charlm.inference.sample import SampleSettings, draw_steps, generate as draw
from charlm.model.lm import count_parameters

if TYPE_CHECKING:
    from charlm.data.vocab import Vocab
    from charlm.inference.export import Exported
    from charlm.system.spool import IdSpool
    from charlm.model.config import ModelConfig

SPLITS = ("train", "val", "test")


@dataclass
class Drawn:
    """What one `Model.draw` call gave: the prefix as the model read it and one continuation per
    sample (both as text a person reads), the settings (with the seed used), beam scores."""

    prefix: str
    samples: list[str]
    settings: SampleSettings
    beam: int | None = None
    scores: list[dict] | None = None
    text: str = ""  # the prefix as the model read it (for a byte-level model: its bytes)

    @property
    def texts(self) -> list[str]:
        return [self.prefix + s for s in self.samples]


@dataclass
class Evaluation(Perplexity):
    """`charlm eval perplexity`'s figures (`Perplexity`'s: the exact perplexity, nats and bits
    per character, the characters evaluated and the share that were <unk>; a byte-level model's
    per byte too), what was evaluated, and `dynamic`, with dynamic=True, the dynamically
    evaluated figures and their settings."""

    split: str | None = None  # the split evaluated, or None for a text
    text: str | None = None  # the file evaluated (None: a split, or a string given in Python)
    dynamic: dict | None = None

    @classmethod
    def of(cls, result: Perplexity, **where: Any) -> "Evaluation":
        return cls(**{f.name: getattr(result, f.name) for f in fields(Perplexity)}, **where)

    def to_dict(self) -> dict:
        figures = Perplexity(**{f.name: getattr(self, f.name) for f in fields(Perplexity)})
        out = {"split": self.split, "text": self.text, **figures.to_dict()}
        return {**out, "dynamic": self.dynamic} if self.dynamic is not None else out


class Model:
    """A trained character-level language model ready for use (see the module docstring).

    Attributes: `path` (the checkpoint file or export folder), `device`, `config` (its
    ModelConfig), `vocab`, `preprocessing`, `weights` ("raw" or "ema": which weights run),
    `module` (the torch module, in eval mode), `checkpoint` (the file's plain data)."""

    def __init__(self, loaded: Loaded, weights: str = "auto"):
        self.loaded = loaded
        self.path: Path = loaded.path
        self.device: torch.device = loaded.device
        self.module = loaded.model
        self.vocab: Vocab = loaded.vocab
        self.preprocessing: str = loaded.preprocessing
        self.checkpoint: dict = loaded.ckpt
        self.weights = weights_used(loaded, weights)

    @classmethod
    def load(cls, path_or_run: str | os.PathLike | None = None, device: str = "auto",
             impl: str | None = None, weights: str = "auto",
             how_to_name: str = "pass --checkpoint PATH") -> "Model":
        """A checkpoint file, a run folder (its best.pt), a folder `charlm export` wrote, or None
        (the latest run's best.pt under $CHARLM_RUNS_DIR or ./runs), on `device` (auto, cpu,
        cuda, cuda:N, mps); `impl` another implementation to run the weights in; `weights`
        auto (a run trained with --ema: its averaged weights), ema or raw."""
        target = None if path_or_run is None else os.fspath(path_or_run)
        return cls(load_model(target, impl, device, weights, how_to_name), weights)

    # -- what it is ----------------------------------------------------------------------------
    @property
    def config(self) -> "ModelConfig":
        return self.module.config

    @property
    def parameters(self) -> int:
        return count_parameters(self.module)

    @property
    def corpus(self) -> str | None:
        corpus = self.checkpoint.get("corpus")
        return corpus.get("name") if isinstance(corpus, dict) else None

    def info(self) -> dict:
        """Which model this is: what `describe()` says, as data (the commands' --json "model")."""
        return model_info(self.loaded, self.weights)

    def describe(self) -> str:
        """One line: the file, cell and size, corpus and when it was trained."""
        return describe(self.info())

    def __repr__(self) -> str:
        mc = self.config
        return (f"<charlm.Model {mc.cell} {mc.layers}x{mc.hidden} ({self.parameters:,} "
                f"parameters), corpus {self.corpus or 'unknown'}, vocabulary {mc.vocab_size}, "
                f"on {self.device}, from {self.path}>")

    # -- generating ------------------------------------------------------------------------------
    def encode(self, prefix: str) -> tuple[str, list[int]]:
        """The prefix as the model reads it (its preprocessing) and its ids; characters outside
        the vocabulary become <unk>, with one warning line."""
        text = preprocess(prefix, self.preprocessing)
        unknown = [c for c in dict.fromkeys(text) if c not in self.vocab]
        if unknown:
            what = "byte" if self.preprocessing == "bytes" else "character"  # bytes: as hex
            shown = [f"0x{ord(c):02x}" if what == "byte" else repr(c) for c in unknown]
            warn(f"{len(unknown)} prefix {what}{'s' if len(unknown) > 1 else ''} not in the "
                 f"model's vocabulary, read as <unk>: {', '.join(shown)}")
        return text, self.vocab.encode(text).tolist()

    def settings(self, length: int = 200, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float = 1.0, beam: int | None = None, seed: int | None = None,
                 num_samples: int = 1, greedy: bool = False) -> SampleSettings:
        """The sampling settings, checked (`check_settings`, then --beam against this model's
        vocabulary); a fresh seed when none is given and the draw is random (Drawn.settings.seed
        reports it, so the text can be drawn again)."""
        settings = check_settings(length, temperature, top_k, top_p, beam, seed, num_samples,
                                  greedy)
        if beam is not None:
            if beam > len(self.vocab) - 1:  # <unk> is never a continuation
                raise UsageError(f"--beam {beam} is more than the {len(self.vocab) - 1} symbols "
                                 f"a continuation can use (the model's vocabulary less <unk>); "
                                 f"use --beam {len(self.vocab) - 1} or less")
            settings.seed = None
        elif not settings.greedy and settings.seed is None:
            settings.seed = secrets.randbits(63)
        return settings

    def draw(self, prefix: str = "", length: int = 200, temperature: float = 1.0,
             top_k: int | None = None, top_p: float = 1.0, beam: int | None = None,
             seed: int | None = None, num_samples: int = 1, greedy: bool = False,
             spool: "IdSpool | None" = None) -> Drawn:
        """`generate` with everything it decided: the prefix as read, each continuation, the
        settings (the seed drawn), beam scores (what `charlm generate --json` prints). With a
        `spool` (charlm.system.spool, `beam` or `num_samples` wide) the ids go there, column k
        the k-th sample, and `samples` is None: memory stays flat in the length."""
        settings = self.settings(length, temperature, top_k, top_p, beam, seed, num_samples,
                                 greedy)
        text, ids = self.encode(prefix)
        scores = None
        if beam is not None:
            from charlm.inference.beam import beam_search

            best = beam_search(self.module, ids, beam, length, spool=spool)[:num_samples]
            drawn = [h.ids for h in best]
            scores = [{"log_prob": h.log_prob, "nats_per_char": -h.score} for h in best]
        else:
            drawn = draw(self.module, ids, settings, spool=spool, keep=spool is None)
        mode = self.preprocessing
        samples = None if spool is not None else [readable(self.vocab.decode(row), mode)
                                                   for row in drawn]
        return Drawn(readable(text, mode), samples, settings, beam, scores, text)

    def generate(self, prefix: str = "", length: int = 200, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float = 1.0, beam: int | None = None,
                 seed: int | None = None, num_samples: int = 1,
                 greedy: bool = False) -> str | list[str]:
        """The prefix and `length` characters drawn after it (a list of num_samples texts when
        num_samples > 1). temperature 0 or greedy=True: always the likeliest character; top_k
        None or 0: off; top_p 1: off; beam N: beam search (the likeliest continuation); the same
        seed gives the same text, as `charlm generate --seed` does."""
        texts = self.draw(prefix, length, temperature, top_k, top_p, beam, seed, num_samples,
                          greedy).texts
        return texts[0] if num_samples == 1 else texts

    def stream(self, prefix: str = "", length: int = 200, temperature: float = 1.0,
               top_k: int | None = None, top_p: float = 1.0, seed: int | None = None,
               greedy: bool = False, settings: SampleSettings | None = None) -> Iterator[str]:
        """One sample as pieces of text while it is drawn: the prefix, then each character (a
        byte-level model's bytes once they complete a character); joined, they are what
        `generate` returns for the same arguments. Memory does not grow with `length`. The
        settings are checked here, the prefix read, before the first piece is asked for."""
        settings = settings or self.settings(length, temperature, top_k, top_p, None, seed, 1,
                                             greedy)
        text, ids = self.encode(prefix)
        return self._pieces(text, ids, settings)

    def _pieces(self, text: str, ids: list[int], settings: SampleSettings) -> Iterator[str]:
        tokens = self.vocab.tokens
        utf8 = (codecs.getincrementaldecoder("utf-8")("replace")
                if self.preprocessing == "bytes" else None)

        def show(piece: str) -> str:
            return utf8.decode(piece.encode("latin-1", "replace")) if utf8 else piece

        if first := show(text):
            yield first
        for step_ids in draw_steps(self.module, ids, settings):
            if piece := show(tokens[int(step_ids[0])]):
                yield piece
        if utf8 and (rest := utf8.decode(b"", final=True)):
            yield rest

    generate_iter = stream

    # -- scoring -------------------------------------------------------------------------------
    def perplexity(self, text: str | os.PathLike | None = None, split: str | None = None,
                   chunk: int = 512, threads: int = 0, dynamic: bool = False,
                   dynamic_lr: float = 1e-4, dynamic_decay: float = 0.02,
                   dynamic_window: int = 50) -> Evaluation:
        """The exact perplexity (`charlm eval perplexity`'s figures) of `text` (a string, or a
        path to a UTF-8 file) or of a split of the run's own corpus (train, val, test; the
        default is val). `chunk`: characters per forward pass (memory against speed; never
        changes the result); `threads`: CPU threads (0: timed). dynamic=True also scores with
        dynamic evaluation (Krause et al. 2018) with these lr, decay and window."""
        return self.evaluate(check_evaluation(text, split, chunk, threads, dynamic, dynamic_lr,
                                              dynamic_decay, dynamic_window))

    def evaluate(self, request: "EvalRequest") -> Evaluation:
        """`perplexity` for a request `check_evaluation` made."""
        from charlm.inference.splits import run_data
        from charlm.system.devices import set_tf32

        set_tf32(False)  # exact float32 figures on every GPU
        data, split, file = None, request.split, request.file
        if request.raw is not None:
            tokens = self.vocab.encode(preprocess(request.raw, self.preprocessing)).to(self.device)
            what = f"--text {file}" if file is not None else "the text"
        else:  # the run's dataset, read once: the split evaluated and --dynamic's train split
            split = split or "val"
            data = run_data(self.loaded, split)
            tokens = getattr(data, split)
            what = f"the {split} split of the run of {self.path}"
        if tokens.numel() < 2:
            raise CharlmError(
                f"{what} has {tokens.numel()} character{'s' if tokens.numel() != 1 else ''} "
                "after preprocessing: nothing to evaluate (a character is predicted from the ones "
                "before it, so at least 2 are needed)")
        settings = request.dynamic
        train = self._training_split(data) if settings else None  # checked before any scoring
        byte_vocab = self.vocab if self.preprocessing == "bytes" else None
        result = Evaluation.of(
            scoring.perplexity_of(self.module, tokens, window=request.chunk,
                                  threads=request.threads, byte_vocab=byte_vocab),
            split=split, text=str(file) if file is not None else None)
        if settings is not None:
            from charlm.inference.dynamic import adaptable, dynamic_perplexity, gradient_rms

            model = adaptable(self.module)
            rms = gradient_rms(model, train, settings.window, settings.stats_tokens)
            adapted = dynamic_perplexity(model, tokens, settings, rms, request.threads,
                                         byte_vocab)
            result.dynamic = {**adapted.to_dict(), **settings.to_dict(),
                              "gain_nats_per_char": result.nats_per_char - adapted.nats_per_char}
        return result

    def _training_split(self, data) -> torch.Tensor:
        """The run's training split, for dynamic evaluation's gradient statistics: from `data`
        (the run's dataset, when the evaluated split came from it), else rebuilt."""
        from charlm.inference.splits import run_data

        if data is not None:
            return data.train
        if not isinstance(self.checkpoint.get("train_config"), dict):
            raise CharlmError(f"--dynamic needs the run's training text (for its gradient "
                              f"statistics) but {self.path} holds no training configuration to "
                              "rebuild it from; evaluate without --dynamic")
        try:
            return run_data(self.loaded, "train").train
        except CharlmError as exc:
            raise CharlmError(f"--dynamic needs the run's training text: {exc}") from None

    # -- sharing -------------------------------------------------------------------------------
    def save_pretrained(self, directory: str | os.PathLike, format: str = "safetensors",
                        force: bool = False, prefix: str | None = None, sample_length: int = 300,
                        seed: int = 0, device: str | None = None,
                        say: Callable[[str], None] = lambda line: None) -> "Exported":
        """Write the folder `charlm export` writes (model.safetensors, config.json, README.md
        with the exact validation figures and a sample; format "onnx" adds model.onnx), from
        this model's file and weights; `charlm.load(directory)` reads it back. `force` replaces
        an earlier export there."""
        from charlm.inference.export import export_model
        from charlm.inference.loading import impl_for

        mc = self.config
        # the folder's figures come from the model as the folder gives it: implementation auto
        as_exported = self.device.type == "cpu" and mc.impl == impl_for(
            mc.impl, "auto", mc.cell, "cpu", mc.gru_reset)
        return export_model(self.loaded if as_exported else str(self.path), Path(directory),
                            format.lower(), device or str(self.device), force, prefix,
                            sample_length, seed, say, weights=self.weights)


def check_settings(length: int = 200, temperature: float = 1.0, top_k: int | None = None,
                   top_p: float = 1.0, beam: int | None = None, seed: int | None = None,
                   num_samples: int = 1, greedy: bool = False) -> SampleSettings:
    """Sampling settings checked without a model (a command checks them before it reads the
    checkpoint). top_k None or 0: off; temperature 0: greedy."""
    if top_k is not None and top_k < 0:
        raise UsageError(f"--top-k must be >= 0 (0: off), got {top_k}")
    settings = SampleSettings(length=length, temperature=temperature, top_k=top_k or 0,
                              top_p=top_p, greedy=greedy, num_samples=num_samples, seed=seed)
    settings.validate()
    if beam is not None:
        if isinstance(beam, bool) or not isinstance(beam, int) or beam < 1:
            raise UsageError(f"--beam must be >= 1, got {beam}")
        if greedy:
            raise UsageError("give --greedy or --beam, not both (--beam 1 is greedy)")
        if num_samples > beam:
            raise UsageError(f"--num-samples {num_samples} asks for more of the best beams than "
                             f"--beam {beam} keeps; use --num-samples <= --beam")
    return settings


@dataclass
class EvalRequest:
    """What to evaluate, checked: a text (`raw`, read from `file` when one was named) or a split."""

    raw: str | None
    file: Path | None
    split: str | None
    chunk: int
    threads: int
    dynamic: Any  # DynamicSettings, or None


def check_evaluation(text: str | os.PathLike | None = None, split: str | None = None,
                     chunk: int = 512, threads: int = 0, dynamic: bool = False,
                     dynamic_lr: float = 1e-4, dynamic_decay: float = 0.02,
                     dynamic_window: int = 50) -> EvalRequest:
    """`Model.perplexity`'s arguments checked and a file read, without a model (a command does
    this before it reads the checkpoint)."""
    if split is not None and text is not None:
        raise UsageError("give --split or --text, not both")
    if split is not None and split not in SPLITS:
        raise UsageError(f"--split must be one of {', '.join(SPLITS)}; got {split!r}")
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise UsageError(f"--chunk must be >= 1, got {chunk}")
    if threads < 0:
        raise UsageError(f"--threads must be >= 0, got {threads}")
    settings = None
    if dynamic:
        from charlm.checks import Rule
        from charlm.inference.dynamic import MAX_LR, DynamicSettings

        Rule(kind=float, low=0, high=MAX_LR).check("--dynamic-lr", dynamic_lr)
        Rule(kind=float, low=0, high=1).check("--dynamic-decay", dynamic_decay)
        Rule(kind=int, low=1).check("--dynamic-window", dynamic_window)
        settings = DynamicSettings(lr=dynamic_lr, decay=dynamic_decay, window=dynamic_window)
    file = Path(text) if isinstance(text, os.PathLike) else None
    raw = read_text(file, "--text", allow_empty=True) if file is not None else text
    if raw == "":
        raise CharlmError(f"--text {file if file is not None else '(a string)'} is empty: "
                          "nothing to evaluate; give a file of at least 2 characters")
    return EvalRequest(raw, file, split, chunk, threads, settings)


def load(path_or_run: str | os.PathLike | None = None, device: str = "auto",
         impl: str | None = None, weights: str = "auto") -> Model:
    """`charlm.load`: see `Model.load`."""
    return Model.load(path_or_run, device, impl, weights,
                      how_to_name="give charlm.load a checkpoint, a run folder or an exported "
                                  "folder")


__all__ = ["Model", "Drawn", "Evaluation", "EvalRequest", "check_evaluation", "check_settings",
           "load"]
