"""Fine-tuning: `charlm train --init-from RUN_OR_CHECKPOINT` (char-rnn's -init_from) starts a new
run from trained weights.

    the source (a run directory's best.pt, a checkpoint, an exported folder)
      --load_source--> its model config, vocabulary, preprocessing and the weights generate
                       uses (the average, for a run trained with --ema)
      --adopt--> the run's config takes the source's model: its sizes (SHAPE; given otherwise:
                 one error naming them), its other model options where none were given, and
                 its preprocessing
      --the dataset: the source's vocabulary, extended by the new text's characters (new ids
                 after the old ones, so every old id keeps its meaning)
      --load_weights--> the fresh model of the run (seeded as any new run) takes the source's
                 weights; the rows of new characters (embedding or one-hot input columns,
                 output rows) keep their fresh initialisation

The optimizer, schedule, counters and batches start fresh: it is a new run, which records in
its config.toml and checkpoints (`init_from`) and its summary where it started from.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

import torch

from charlm.artifacts.checkpoint import find_checkpoint, load_checkpoint
from charlm.artifacts.folder import read_model_folder
from charlm.config.train import TrainConfig, default_of
from charlm.config.build import validate
from charlm.errors import CharlmError, UsageError
from charlm.inference.loading import model_from_checkpoint
from charlm.model.config import ModelConfig
from charlm.model.lm import CharLM

# What defines the source's weights: a run starting from them keeps these
SHAPE = ("cell", "hidden", "layers", "embed", "nonlinearity", "gru_reset", "tie_weights")


@dataclass
class Source:
    path: Path
    config: ModelConfig
    vocab: dict  # Vocab.to_dict()
    preprocessing: str
    weights: dict[str, torch.Tensor]  # on the CPU


def load_source(target: str) -> Source:
    """The weights to start from, checked as any checkpoint is (`model_from_checkpoint`)."""
    path = find_checkpoint(target, how_to_name="name one: --init-from RUN_DIR|CHECKPOINT",
                           exported=True)
    ckpt = read_model_folder(path) if path.is_dir() else load_checkpoint(path)
    restored = model_from_checkpoint(ckpt, str(path), "auto", "cpu", weights="auto")
    return Source(path, restored.model.config, restored.vocab.to_dict(), restored.preprocessing,
                  restored.model.state_dict())


def start(cfg: TrainConfig) -> Source:
    """The source of `cfg.init_from`, and `cfg` given its model (`adopt`)."""
    source = load_source(cfg.init_from)
    adopt(cfg, source)
    return source


def adopt(cfg: TrainConfig, source: Source) -> None:
    """Give `cfg` the source's model; an option that would change a weight's shape (or what the
    weights mean), given otherwise than the source has it, is refused."""
    saved = source.config
    differ = [name for name in SHAPE
              if getattr(cfg, name) not in (default_of(name), getattr(saved, name))]
    if cfg.preprocessing not in (None, source.preprocessing):
        differ.append("preprocessing")
    if differ:
        theirs = {**saved.to_dict(), "preprocessing": source.preprocessing}
        raise UsageError(
            f"{' and '.join(f'--{_flag(n)} {getattr(cfg, n)}' for n in differ)} "
            f"{'differs' if len(differ) == 1 else 'differ'} from the model of {source.path} "
            f"({', '.join(f'{n} {theirs[n]}' for n in differ)}) that --init-from starts from: "
            "its weights keep their shapes; drop the option, or train a new model without "
            "--init-from")
    for f in fields(ModelConfig):
        if f.name not in ("impl", "vocab_size") and getattr(cfg, f.name) == default_of(f.name):
            setattr(cfg, f.name, getattr(saved, f.name))
    cfg.preprocessing = source.preprocessing
    cfg.init_from = str(source.path.resolve())
    validate(cfg)


def _flag(name: str) -> str:
    return name.replace("_", "-")


@torch.no_grad()
def load_weights(model: CharLM, source: Source) -> None:
    """The source's weights into `model`, whose vocabulary extends the source's: every weight
    copied, and of those with a vocabulary dimension (embedding rows, one-hot input columns,
    output rows) the source's ids; a new character's row keeps the model's own initialisation."""
    state, old = model.state_dict(), len(source.vocab["tokens"])
    for name, weight in source.weights.items():
        target = state.get(name)
        if target is None:
            raise CharlmError(f"{source.path}: the weight {name} has no place in this model")
        if target.shape == weight.shape:
            target.copy_(weight)
            continue
        dims = [d for d, (a, b) in enumerate(zip(target.shape, weight.shape)) if a != b]
        if (target.dim() != weight.dim() or len(dims) != 1
                or (weight.shape[dims[0]], target.shape[dims[0]]) != (old, model.config.vocab_size)):
            raise CharlmError(f"{source.path}: the weight {name} is {tuple(weight.shape)}, this "
                              f"model's {tuple(target.shape)}")
        target.narrow(dims[0], 0, old).copy_(weight)
