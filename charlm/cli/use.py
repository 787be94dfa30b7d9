"""`charlm generate` and `charlm eval perplexity`: use a trained checkpoint.

Both load a checkpoint the same way (`load_model`): the latest run's best.pt unless --checkpoint
names a file or a run directory; the model is rebuilt from the checkpoint's own model config,
vocabulary and preprocessing, with the parameters checked against that config before use.
"""

from __future__ import annotations

import json
import os
import secrets
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import typer

from charlm.cli.common import handle_errors
from charlm.errors import CharlmError, UsageError

if TYPE_CHECKING:  # torch is imported by the commands themselves: `charlm --help` stays quick
    import torch

eval_app = typer.Typer(
    help="Evaluate a trained model.\n\nExample: charlm eval perplexity --split val",
    no_args_is_help=True,
    rich_markup_mode=None,
)

SPLITS = ("train", "val", "test")
FRACTION_OPTION = {"val": "--val-fraction", "test": "--test-fraction"}

CheckpointOpt = typer.Option(
    None, "--checkpoint",
    help="A checkpoint file or a run directory (its best.pt). Default: the latest run's best.pt "
         "(runs root: $CHARLM_RUNS_DIR or ./runs).",
)
DeviceOpt = typer.Option("auto", "--device", help="auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps.")
ImplOpt = typer.Option(
    None, "--impl",
    help="Load with another implementation: auto, fused, scratch or fast (GRU on CPU). "
         "Default: the checkpoint's own. Parameters are laid out alike in all of them.",
)
JsonOpt = typer.Option(False, "--json", help="Print JSON on stdout instead of text.")


@dataclass
class Loaded:
    path: Path
    ckpt: dict[str, Any]
    model: Any  # charlm.model.lm.CharLM
    vocab: Any  # charlm.data.vocab.Vocab
    preprocessing: str
    device: "torch.device"


def load_model(target: Optional[str], impl: Optional[str], device_spec: str) -> Loaded:
    """The checkpoint at `target` (None: latest run), its model rebuilt, checked and in eval mode."""
    from charlm.training import rundir
    from charlm.model.cells import resolve_impl
    from charlm.training.checkpoint import find_checkpoint, load_checkpoint
    from charlm.devices import select_device
    from charlm.model.lm import CharLM, ModelConfig, check_parameters, check_vocab_size
    from charlm.data.vocab import PREPROCESSING, Vocab

    device = select_device(device_spec)
    path = find_checkpoint(target, rundir.runs_root())
    ckpt = load_checkpoint(path, map_location=device)
    cfg = ModelConfig.from_dict(ckpt["model_config"])
    try:
        vocab = Vocab.from_dict(ckpt["vocab"])
    except CharlmError as exc:
        raise CharlmError(f"{path}: {exc}; the file is damaged") from None
    check_vocab_size(str(path), len(vocab), cfg.vocab_size)
    preprocessing = ckpt.get("preprocessing")
    if preprocessing not in PREPROCESSING:
        raise CharlmError(f"{path}: unknown preprocessing {preprocessing!r}; the file is damaged")
    if impl is not None:
        cfg.impl = resolve_impl(impl, cfg.mode, device.type, cfg.gru_reset)
    model = CharLM(cfg)
    check_parameters(str(path), model, ckpt["model"])
    model.load_state_dict(ckpt["model"])
    model.to(device).eval()
    return Loaded(path, ckpt, model, vocab, preprocessing, device)


def _read_text(path: Path, what: str) -> str:
    if not path.exists():
        raise CharlmError(f"{what} {path} does not exist")
    if path.is_dir():
        raise CharlmError(f"{what} {path} is a directory, not a text file")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise CharlmError(f"{what} {path} is not UTF-8 text") from None


def _warn(message: str) -> None:
    sys.stderr.write(f"charlm: warning: {message}\n")
    sys.stderr.flush()


# --- generate ----------------------------------------------------------------------------------


def generate(
    prefix: Optional[str] = typer.Option(None, "--prefix", "-p", help="Text to continue (warms up the state). Default: none, start from a neutral state."),
    prefix_file: Optional[Path] = typer.Option(None, "--prefix-file", help="Read the prefix from this UTF-8 file (verbatim, newlines included)."),
    length: int = typer.Option(200, "--length", "-n", help="Characters to draw after the prefix."),
    temperature: float = typer.Option(1.0, "--temperature", help="Divide the logits by this (< 1: safer, > 1: wilder)."),
    top_k: Optional[int] = typer.Option(None, "--top-k", help="Draw only among the K likeliest characters."),
    top_p: float = typer.Option(1.0, "--top-p", help="Draw only among the smallest set of characters holding this much probability (nucleus)."),
    greedy: bool = typer.Option(False, "--greedy", help="Always take the likeliest character (d2l's predict_ch8); ignores temperature, top-k, top-p and seed."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Random seed: the same seed gives the same text. Default: a fresh one (shown by --json)."),
    num_samples: int = typer.Option(1, "--num-samples", help="Draw this many samples as one batch; printed after drawing, separated by a blank line."),
    checkpoint: Optional[str] = CheckpointOpt,
    impl: Optional[str] = ImplOpt,
    device: str = DeviceOpt,
    json_out: bool = JsonOpt,
) -> None:
    """Generate text from a trained model.

    The prefix goes through the checkpoint's own preprocessing, warms up the hidden state, and
    characters are drawn one at a time. One sample streams to stdout as it is drawn; several
    are printed once drawn. --json prints {prefix, samples, settings, checkpoint}; each
    sample there is the continuation only (the text is prefix + sample).

    Example: charlm generate --prefix "time traveller" --length 300 --temperature 0.8
    """
    from charlm.sample import SampleSettings
    from charlm.sample import generate as draw
    from charlm.data.vocab import preprocess

    if top_k is not None and top_k < 1:
        raise UsageError(f"--top-k must be >= 1, got {top_k}")
    settings = SampleSettings(length=length, temperature=temperature, top_k=top_k or 0,
                              top_p=top_p, greedy=greedy, num_samples=num_samples, seed=seed)
    settings.validate()
    if prefix is not None and prefix_file is not None:
        raise UsageError("give --prefix or --prefix-file, not both")
    raw = _read_text(prefix_file, "--prefix-file") if prefix_file is not None else (prefix or "")

    loaded = load_model(checkpoint, impl, device)
    vocab = loaded.vocab
    text = preprocess(raw, loaded.preprocessing)
    unknown = [c for c in dict.fromkeys(text) if c not in vocab]
    if unknown:
        _warn(
            f"{len(unknown)} prefix character{'s' if len(unknown) > 1 else ''} not in the "
            f"model's vocabulary, read as <unk>: {', '.join(repr(c) for c in unknown)}"
        )
    ids = vocab.encode(text).tolist()
    if not greedy and settings.seed is None:
        settings.seed = secrets.randbits(63)  # reported by --json so the text can be redrawn

    stream = num_samples == 1 and not json_out
    tokens, out = vocab.tokens, sys.stdout

    def write_char(step_ids: list[int]) -> None:
        out.write(tokens[step_ids[0]])
        out.flush()

    on_step = write_char if stream else None
    if stream:
        out.write(text)
        out.flush()

    try:
        drawn = draw(loaded.model, ids, settings, on_step=on_step)
        samples = [vocab.decode(row) for row in drawn]
        if json_out:
            payload = {"prefix": text, "samples": samples, "settings": settings.to_dict(),
                       "checkpoint": str(loaded.path)}
            sys.stdout.write(json.dumps(payload, indent=2, ensure_ascii=False) + "\n")
        elif stream:
            sys.stdout.write("\n")
        else:
            sys.stdout.write("\n\n".join(text + s for s in samples) + "\n")
        sys.stdout.flush()
    except BrokenPipeError:  # e.g. `charlm generate | head -c 100`: the reader has had enough
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise typer.Exit(0) from None


# --- eval perplexity ---------------------------------------------------------------------------


def _split_tokens(loaded: Loaded, split: str) -> "torch.Tensor":
    """Rebuild the run's splits from its train_config; the corpus must be the one trained on."""
    from dataclasses import fields

    from charlm.training.config import TrainConfig, build_config
    from charlm.data.dataset import load_dataset

    ckpt, path = loaded.ckpt, loaded.path
    saved = ckpt.get("train_config")
    if not isinstance(saved, dict):
        raise CharlmError(
            f"{path} holds no training configuration, so its splits cannot be rebuilt; "
            "evaluate a file with --text FILE"
        )
    known = {f.name for f in fields(TrainConfig)}
    cfg = build_config({k: v for k, v in saved.items() if k in known}, {})
    corpus_info = ckpt.get("corpus") if isinstance(ckpt.get("corpus"), dict) else {}
    if not (cfg.corpus or cfg.text or cfg.url) and corpus_info.get("name"):
        cfg.corpus = corpus_info["name"]  # the default corpus as it resolved then (or its fallback)
    fraction = {"val": cfg.val_fraction, "test": cfg.test_fraction}.get(split)
    if fraction == 0:
        raise CharlmError(
            f"the run of {path} held out no {split} split ({split}_fraction 0): train with "
            f"{FRACTION_OPTION[split]} 0.1 (for example) to get one, or evaluate a file with "
            "--text FILE"
        )
    data = load_dataset(cfg, vocab=ckpt["vocab"], device=loaded.device)
    trained_on = corpus_info.get("num_tokens")
    if trained_on is not None and trained_on != data.num_tokens:
        raise CharlmError(
            f"the corpus now has {data.num_tokens} tokens but {path} was trained on {trained_on}; "
            "the text changed since training, so its splits cannot be rebuilt: evaluate a file "
            "with --text FILE"
        )
    return getattr(data, split)


@eval_app.command("perplexity")
@handle_errors
def eval_perplexity(
    split: Optional[str] = typer.Option(None, "--split", help="Which split of the run's own corpus: train, val (default) or test."),
    text: Optional[Path] = typer.Option(None, "--text", help="Evaluate this UTF-8 file instead (the checkpoint's preprocessing and vocabulary applied)."),
    checkpoint: Optional[str] = CheckpointOpt,
    batch_size: int = typer.Option(512, "--batch-size", "-b", help="Characters per forward pass. Evaluation is one stream with the state carried across passes, so this trades memory for speed and never changes the result."),
    impl: Optional[str] = ImplOpt,
    device: str = DeviceOpt,
    json_out: bool = JsonOpt,
) -> None:
    """Exact perplexity of a trained model on its validation split, another split or a file.

    One sequential pass over every character after the first, each predicted from all of the
    text before it (the state is carried). Reports perplexity, nats and bits per character,
    the characters evaluated and the share of them that were <unk>.

    Example: charlm eval perplexity --split test --json
    """
    from charlm.evaluate import perplexity_of
    from charlm.data.vocab import preprocess

    if split is not None and text is not None:
        raise UsageError("give --split or --text, not both")
    if split is not None and split not in SPLITS:
        raise UsageError(f"--split must be one of {', '.join(SPLITS)}; got {split!r}")
    if batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {batch_size}")
    raw = _read_text(text, "--text") if text is not None else None
    if raw == "":
        raise CharlmError(f"--text {text} is empty: nothing to evaluate; give a file of at least 2 characters")

    loaded = load_model(checkpoint, impl, device)
    if text is not None:
        tokens = loaded.vocab.encode(preprocess(raw, loaded.preprocessing)).to(loaded.device)
        source, what = str(text), f"--text {text}"
    else:
        split = split or "val"
        tokens = _split_tokens(loaded, split)
        source, what = f"{split} split", f"the {split} split of the run of {loaded.path}"
    if tokens.numel() < 2:
        raise CharlmError(
            f"{what} has {tokens.numel()} character{'s' if tokens.numel() != 1 else ''} after "
            "preprocessing: nothing to evaluate (a character is predicted from the ones before "
            "it, so at least 2 are needed)"
        )
    result = perplexity_of(loaded.model, tokens, window=batch_size)

    if json_out:
        payload = {"checkpoint": str(loaded.path), "split": None if text is not None else split,
                   "text": str(text) if text is not None else None, **result.to_dict(),
                   "impl": loaded.model.config.impl, "device": str(loaded.device)}
        sys.stdout.write(json.dumps(payload, indent=2) + "\n")
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title="charlm eval perplexity", show_header=False)
    table.add_column(style="bold")
    table.add_column(justify="right", overflow="fold")
    table.add_row("checkpoint", str(loaded.path))
    table.add_row("evaluated on", source)
    table.add_row("perplexity", f"{result.perplexity:.4f}")
    table.add_row("nats / char", f"{result.nats_per_char:.4f}")
    table.add_row("bits / char", f"{result.bits_per_char:.4f}")
    table.add_row("characters evaluated", f"{result.characters:,}")
    table.add_row("<unk> share", f"{result.unk_share:.4%} ({result.unk_characters:,})")
    Console().print(table)
