"""charlm: train character-level RNN, GRU and LSTM language models."""

__version__ = "0.1.0"
