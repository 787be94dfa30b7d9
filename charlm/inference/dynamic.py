"""Dynamic evaluation (Krause et al. 2018): the model keeps learning from the text it has scored.

The text is read as `perplexity_of` reads it (one stream, the state carried), in windows of
`window` characters. Each window is scored first, with the weights as they are; then the
gradient g of its mean loss moves a copy of the weights before the next window is read
(Krause et al.'s RMS-normalised rule, their eq. for "RMS norm" with a global prior)::

    theta <- theta - lr * g / (rms + eps) + decay * min(rms / mean(rms), 1 / decay) * (theta_0 - theta)

rms is each weight's root-mean-square gradient over windows of the training text, measured once
before (`gradient_rms`); theta_0 the trained weights, which the last term pulls the adapted ones
back to, faster where gradients are large. Every prediction is still made before its character
is learnt from, so the figure is a fair one. lr 0 leaves the weights alone: the static figure,
exactly. The checkpoint is never touched: the adapted weights live in a copy (`adaptable`).
"""

from __future__ import annotations

import dataclasses
import math
from contextlib import nullcontext

import torch

from charlm.data.batches import eval_windows
from charlm.errors import CharlmError, warn
from charlm.inference.evaluate import Perplexity, WindowSums, figures, utf8_characters
from charlm.model.lm import CharLM, detach_state
from charlm.system.threads import ThreadChooser, threads_within

MAX_NATS = 700.0  # exp(709.8) overflows float64: a perplexity beyond this cannot be printed
EPS = 1e-5  # keeps g / (rms + eps) finite for weights whose training gradient was ~0
STATS_STREAMS = 16  # streams read in parallel while measuring rms
# A step moves each weight by about lr times its typical training gradient (g / rms ~ 1): at
# lr 1 a window already moves the weights by as much as their own gradient scale, so anything
# larger only destroys the model (Krause et al. tune lr around 1e-4..1e-2)
MAX_LR = 1.0


@dataclasses.dataclass
class DynamicSettings:  # the defaults a user sees are `charlm eval perplexity`'s options
    lr: float
    decay: float
    window: int
    stats_tokens: int = 200_000  # of the training text, for rms

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def adaptable(model: CharLM) -> CharLM:
    """A copy of `model` that takes gradients as evaluation does: every dropout off, but in
    training mode (cuDNN's RNN has no backward in eval mode); its weights are its own."""
    off = dict(dropout=0.0, input_dropout=0.0, embed_dropout=0.0, weight_drop=0.0)
    copy = CharLM(dataclasses.replace(model.config, **off)).to(model.head.weight.device)
    copy.load_state_dict(model.state_dict())
    return copy.train()


def gradient_rms(model: CharLM, tokens: torch.Tensor, window: int, max_tokens: int) -> list:
    """Per weight, the root mean square of the gradients of windows' mean losses over the first
    `max_tokens` characters of `tokens` (STATS_STREAMS streams, the state carried)."""
    params = list(model.parameters())
    squares = [torch.zeros_like(p) for p in params]
    tokens = tokens[: max_tokens + 1].to(model.head.weight.device)
    state, windows = None, 0
    for X, Y, reset in eval_windows(tokens, min(STATS_STREAMS, max(1, (tokens.numel() - 1) // window)), window):
        state = None if reset else state
        logits, state = model(X, state)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)).float(),
                                                 Y.reshape(-1))
        model.zero_grad(set_to_none=True)
        loss.backward()
        state = detach_state(state)
        torch._foreach_addcmul_(squares, [p.grad for p in params], [p.grad for p in params])
        windows += 1
    model.zero_grad(set_to_none=True)
    return [s.div_(max(windows, 1)).sqrt_() for s in squares]


def dynamic_perplexity(model: CharLM, tokens: torch.Tensor, settings: DynamicSettings,
                       rms: list, threads: int = 0, byte_vocab=None) -> Perplexity:
    """Score `tokens` while adapting `model` (an `adaptable` copy: its weights change);
    `threads` > 0 fixes the CPU threads; `byte_vocab` as for `perplexity_of`."""
    if not 0 <= settings.lr <= MAX_LR or not 0 <= settings.decay <= 1:
        raise ValueError(f"lr must be in [0, {MAX_LR:g}] and decay in [0, 1], got "
                         f"{settings.lr} and {settings.decay}")
    params = list(model.parameters())
    device = model.head.weight.device
    tokens = tokens.to(device)
    theta0 = [p.detach().clone() for p in params]
    mean_rms = sum(float(r.sum()) for r in rms) / max(1, sum(r.numel() for r in rms))
    step = [r + EPS for r in rms]
    pull = [(r / max(mean_rms, 1e-30)).clamp_(max=1 / settings.decay).mul_(settings.decay)
            if settings.decay > 0 else torch.zeros_like(r) for r in rms]
    adapt = settings.lr > 0
    sums = WindowSums(tokens.numel(), 1, settings.window, device)
    state = None
    chooser = ThreadChooser.for_stream(device, model.config.hidden, threads)  # as perplexity_of
    with torch.set_grad_enabled(adapt), threads_within(torch.get_num_threads()):
        for X, Y, _ in eval_windows(tokens, 1, settings.window):
            with chooser.step() if chooser else nullcontext():
                logits, state = model(X, state)
                loss = sums.add(logits, Y)  # scored before it is learnt from
                state = detach_state(state)
                if not adapt:
                    continue
                model.zero_grad(set_to_none=True)
                (loss / Y.numel()).backward()
                with torch.no_grad():
                    torch._foreach_addcdiv_(params, [p.grad for p in params], step,
                                            value=-settings.lr)
                    back = torch._foreach_sub(theta0, params)
                    torch._foreach_mul_(back, pull)
                    torch._foreach_add_(params, back)
    nats = sums.total() / sums.count
    if not nats < MAX_NATS:  # NaN, infinite, or a perplexity past float64's range
        raise CharlmError(f"dynamic evaluation diverged: the adapted model's loss became "
                          f"{'NaN' if math.isnan(nats) else 'too large to report'} with "
                          f"--dynamic-lr {settings.lr:g} and --dynamic-decay {settings.decay:g}; "
                          "use a smaller --dynamic-lr (the default is 1e-4) or a larger "
                          "--dynamic-decay")
    uniform = math.log(model.config.vocab_size)  # nats per character of a uniform guess
    if nats > 2 * uniform:  # adapting wrecked the model rather than tuned it
        warn(f"dynamic evaluation made the model far worse than a uniform guess ({nats:.4g} "
             f"nats per character, against {uniform:.4g}): --dynamic-lr {settings.lr:g} is "
             "too large; try a smaller one (the default is 1e-4)")
    unk = int((tokens[1:] == 0).sum().item())
    chars = utf8_characters(tokens[1:], byte_vocab) if byte_vocab is not None else None
    return figures(sums.total(), sums.count, unk, chars)

