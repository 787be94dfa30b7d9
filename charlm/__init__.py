"""charlm: train character-level RNN, GRU and LSTM language models.

The public API (see the README's "Using charlm from Python")::

    import charlm
    run = charlm.train(text="notes.txt", max_steps=300, hidden=64)   # -> RunResult
    model = charlm.load(run.run_dir)                                  # -> Model
    model.generate("the ", length=100, seed=0)

Imported lazily: `import charlm` costs no torch, and `charlm.load` never imports the trainer.
"""

from charlm.about import __version__

__all__ = ["load", "Model", "train", "RunResult", "__version__"]

_HOMES = {"load": "charlm.inference.model", "Model": "charlm.inference.model",
          "train": "charlm.training.run", "RunResult": "charlm.training.run"}


def __getattr__(name: str):
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'charlm' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(home), name)
    globals()[name] = value  # found once
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
