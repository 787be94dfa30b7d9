"""The one-character step as an ONNX graph, so any ONNX runtime can generate text without PyTorch.

    inputs   token   int64   (batch,)                  the characters just read (ids)
             h       float32 (layers, batch, hidden)   the state; zeros to start
             c       float32 (layers, batch, hidden)   LSTM only: the cell state; zeros to start
    outputs  logits  float32 (batch, vocab)            scores of the next character
             h_next, c_next                            the state to feed back in

A runtime warms the state up on a prefix (one call per character, ignoring the logits but the
last), then draws from softmax(logits / T) and feeds the draw back: `scripts/onnx_generate.py`.

The graph is CharLM's own forward over a sequence of one character, with the recurrent layers in
the scratch implementation: the same weights as every implementation, computed from the gate
equations as elementary ops (MatMul, Sigmoid, Tanh, ...) that every runtime has, and the only
implementation that has every cell (`--gru-reset before` included). torch.export (the dynamo
exporter) traces it for every cell, which the tests check, so there is no TorchScript fallback.
"""

from __future__ import annotations

import importlib.util
import logging
import warnings
from contextlib import contextmanager
from dataclasses import replace

import torch
from torch import nn

from charlm.about import install_extra
from charlm.errors import CharlmError
from charlm.model.lm import CharLM

EXTRA = "onnx"  # pip install 'charlm-rnn[onnx]': onnx and onnxscript export, onnxruntime checks
OPSET = 18


def io_names(cell: str) -> tuple[list[str], list[str]]:
    """The graph's input and output names (config.json records them for runtimes)."""
    if cell == "lstm":
        return ["token", "h", "c"], ["logits", "h_next", "c_next"]
    return ["token", "h"], ["logits", "h_next"]


class Step(nn.Module):
    """(token (B,), h [, c]) -> (logits (B, V), h_next [, c_next]) through CharLM.forward."""

    def __init__(self, model: CharLM):
        super().__init__()
        self.model = model

    def forward(self, token: torch.Tensor, h: torch.Tensor, c: torch.Tensor | None = None):
        state = (h, c) if c is not None else h
        logits, state = self.model(token[:, None], state)
        if isinstance(state, tuple):
            return logits[:, 0], state[0], state[1]
        return logits[:, 0], state


def require_extra() -> None:
    """A one-line error naming the extra when a package --format onnx needs is missing."""
    missing = [m for m in ("onnx", "onnxscript", "onnxruntime") if importlib.util.find_spec(m) is None]
    if missing:
        raise CharlmError(f"--format onnx needs {', '.join(missing)}: install the onnx extra with "
                          f"{install_extra(EXTRA)}")


def scratch_copy(model: CharLM) -> CharLM:
    """The model's weights in the scratch implementation, in eval mode on the CPU."""
    config = replace(model.config, impl="scratch")
    copy = CharLM(config)
    copy.load_state_dict({k: v.detach().cpu() for k, v in model.state_dict().items()})
    return copy.eval()


@contextmanager
def _quiet():
    """The exporter logs and warns freely (progress, skipped optimisations, torchvision ops it
    cannot find); none of it is for the user of a command."""
    previous = logging.root.manager.disable
    logging.disable(logging.CRITICAL)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(previous)


def example_inputs(model: CharLM, batch: int = 2) -> tuple[torch.Tensor, ...]:
    cfg = model.config
    token = torch.zeros(batch, dtype=torch.long)
    h = torch.zeros(cfg.layers, batch, cfg.hidden)
    return (token, h, torch.zeros_like(h)) if cfg.cell == "lstm" else (token, h)


def onnx_bytes(model: CharLM) -> bytes:
    """model.onnx for `model`'s weights: the step above, batch size left free."""
    require_extra()
    step = Step(scratch_copy(model))
    inputs, outputs = io_names(model.config.cell)
    batch = torch.export.Dim("batch")
    dynamic = {"token": {0: batch}, "h": {1: batch}}
    if model.config.cell == "lstm":
        dynamic["c"] = {1: batch}
    try:
        with _quiet(), torch.no_grad():
            program = torch.onnx.export(
                step, example_inputs(model), input_names=inputs, output_names=outputs,
                dynamic_shapes=dynamic, dynamo=True, opset_version=OPSET, verbose=False,
                external_data=False)
            return program.model_proto.SerializeToString()
    except Exception as exc:  # the exporter's own errors are long reports; keep their first line
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise CharlmError(f"exporting the {model.config.cell} step to ONNX failed: {first}; "
                          "the folder was not written") from None


@torch.no_grad()
def onnx_difference(data: bytes, model: CharLM, tokens: list[int], batch: int = 1) -> float:
    """The largest |logit difference| between `model` reading `tokens` in one forward pass (the
    state carried, as charlm evaluates) and onnxruntime running `data` one character per call
    with the state fed back, in each of `batch` rows."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: no notices on the user's stderr
    session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
    inputs, _ = io_names(model.config.cell)
    x = torch.tensor([tokens] * batch, dtype=torch.long)
    want = model(x.to(model.head.weight.device))[0].float().cpu()
    state = [t.numpy() for t in example_inputs(model, batch)[1:]]
    worst = 0.0
    for t in range(len(tokens)):
        got, *state = session.run(None, dict(zip(inputs, [x[:, t].numpy(), *state])))
        worst = max(worst, float((torch.from_numpy(got) - want[:, t]).abs().max()))
    return worst
