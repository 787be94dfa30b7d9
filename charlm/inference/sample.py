"""Drawing text from a trained char-LM.

d2l's `predict_ch8` order: run the prefix through the model once to warm up the hidden state,
then draw one character at a time, feeding each back in. Each new character costs exactly one
step of the recurrent layers; the prefix is never re-run. Several samples are drawn as one
batch (the warmed-up state is copied into each row).

A step is computed from the recurrent layers' torch-layout parameters (`weight_ih_l{k}`,
`weight_hh_l{k}`, `bias_ih_l{k}`, `bias_hh_l{k}`, which every implementation shares) by the
cells' own step functions (`charlm.model.cells.cell_step`, the one home of the equations),
because a per-step call through a sequence layer costs more in dispatch than the arithmetic.
The first layer's input projection becomes a row lookup::

    table[v] = input(v) @ W_ih_l0^T + b_ih_l0        (V, gates*H), once per call
    step:  x_proj = table[x] | h_below @ W_ih^T + b_ih;  cell_step(x_proj, h (, c)) -> h (, c)
           logits = h_top @ (W_out / T)^T + b_out / T     (the temperature folded into the head)

`<unk>` (id 0 of every vocabulary) is never drawn: it stands for characters the vocabulary left
out, not for a character to print, so its logit is -inf (in the head's bias, at no cost per
step) and the draw is over the real characters.

A character is drawn with the Gumbel-max trick, argmax(logits / T + g) with g = -log E,
E ~ Exp(1): exactly a draw from softmax(logits / T), for one add and one argmax per step. The
noise comes from `gumbel_noise` in blocks of steps, so a seed fixes the text.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import asdict, dataclass
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

from charlm.errors import UsageError
from charlm.model.cells import cell_step
from charlm.model.config import MIN_CELLS
from charlm.model.lm import CharLM
from charlm.model.state import layers_of, map_state
from charlm.system.threads import threads_for, threads_within
from charlm.system.spool import IdSpool
from charlm.model.mincells import MinStepper

NOISE_BLOCK_STEPS = 64  # noise drawn per block: (steps, samples, vocab)
NOISE_BLOCK_NUMBERS = 1 << 22  # ... but at most this many numbers (16 MB) per block
# Below this temperature a draw is the likeliest character anyway: logits / T then differ by more
# than the Gumbel noise can span (-5..88) wherever float32 logits differ at all. Such draws are
# made greedily, since logits / T overflows float32 (and degenerates to <unk>) for smaller T;
# temperature 0 is greedy by definition (the limit T -> 0).
MIN_TEMPERATURE = 1e-8
UNK_ID = 0  # <unk> in every charlm vocabulary (charlm.data.vocab.Vocab)


@dataclass
class SampleSettings:
    length: int = 200
    temperature: float = 1.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1.0: off
    greedy: bool = False
    num_samples: int = 1
    seed: int | None = None

    def validate(self) -> "SampleSettings":
        if isinstance(self.length, bool) or not isinstance(self.length, int) or self.length <= 0:
            raise UsageError(f"--length must be a positive integer, got {self.length}")
        if not self.temperature >= 0 or self.temperature == float("inf"):
            raise UsageError(f"--temperature must be a number >= 0 (0: greedy), got "
                             f"{self.temperature}")
        if self.temperature < MIN_TEMPERATURE:
            self.greedy = True  # what sampling at this temperature amounts to (see above)
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise UsageError(f"--seed must be an integer in [0, 2**63), got {self.seed}")
        if self.top_k < 0:
            raise UsageError(f"--top-k must be >= 0 (0: off), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise UsageError(f"--top-p must be in (0, 1], got {self.top_p}")
        if self.num_samples < 1:
            raise UsageError(f"--num-samples must be >= 1, got {self.num_samples}")
        return self

    def to_dict(self) -> dict:
        return asdict(self)


def without_unk(logits: torch.Tensor) -> torch.Tensor:
    """A copy of `logits` (..., V) in which <unk> cannot be drawn."""
    return logits.index_fill(-1, torch.tensor([UNK_ID], device=logits.device), float("-inf"))


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Mask (to -inf) all but the top-k logits and/or the smallest nucleus of mass >= top_p."""
    if top_k and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # drop a token when the mass before it already reaches top_p (the first always stays,
        # even for a top_p that rounds to 0 in float32)
        drop_sorted = (probs.cumsum(-1) - probs) >= top_p
        drop_sorted[..., 0] = False
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def gumbel_noise(generator: torch.Generator | None, steps: int, n: int, vocab: int,
                 device=None) -> Iterator[torch.Tensor]:
    """Gumbel(0, 1) noise for each of `steps` steps, one (n, vocab) tensor per step.

    Drawn in blocks of min(NOISE_BLOCK_STEPS, NOISE_BLOCK_NUMBERS // (n * vocab)) steps (at
    least 1, never past `steps`); E is clamped away from 0 so that g stays finite and a masked
    (-inf) logit stays -inf."""
    block = max(1, min(NOISE_BLOCK_STEPS, NOISE_BLOCK_NUMBERS // max(1, n * vocab)))
    tiny = torch.finfo(torch.float32).tiny
    for start in range(0, steps, block):
        count = min(block, steps - start)
        e = torch.empty(count, n, vocab, device=device).exponential_(generator=generator)
        yield from e.clamp_min_(tiny).log_().neg_().unbind(0)


class _Stepper:
    """One recurrent step per character through the cells' own step functions
    (`charlm.model.cells.cell_step`; the min cells' `MinStepper`), from torch-layout parameters
    (see the module docstring)."""

    def __init__(self, model: CharLM, scale: float):
        cfg, rnn = model.config, model.rnn
        self.mode, self.reset, self.layers = cfg.mode, cfg.gru_reset, cfg.layers

        def p(name: str, k: int) -> torch.Tensor:
            return getattr(rnn, f"{name}_l{k}").detach()

        vocab_ids = torch.arange(cfg.vocab_size, device=model.head.weight.device)[None]
        self.head_w = (model.output_weight().detach().t() * scale).contiguous()
        self.head_b = without_unk(model.head.bias.detach() * scale)
        self.min = MinStepper(rnn, model.inputs(vocab_ids)[0]) if cfg.cell in MIN_CELLS else None
        if self.min is not None:
            return
        self.table = torch.addmm(p("bias_ih", 0), model.inputs(vocab_ids)[0], p("weight_ih", 0).t())
        self.ih = [None] + [(p("weight_ih", k), p("bias_ih", k)) for k in range(1, cfg.layers)]
        self.hh = [(p("weight_hh", k), p("bias_hh", k)) for k in range(cfg.layers)]

    @staticmethod
    def supports(model: CharLM) -> bool:
        return model.config.cell in MIN_CELLS or all(
            hasattr(model.rnn, f"{n}_l{k}") for k in range(model.config.layers)
            for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"))

    def step(self, x: torch.Tensor, states: list) -> torch.Tensor:
        """x (B,) ids; updates `states` (per layer, `layers_of`) in place and returns the scaled
        logits (B, V)."""
        if self.min is not None:
            return torch.addmm(self.head_b, self.min.step(x, states), self.head_w)
        below = None
        for k in range(self.layers):
            x_proj = self.table.index_select(0, x) if k == 0 else F.linear(below, *self.ih[k])
            states[k] = cell_step(self.mode, x_proj, states[k], *self.hh[k], self.reset)
            below = states[k][0] if self.mode == "lstm" else states[k]
        return torch.addmm(self.head_b, below, self.head_w)


@torch.inference_mode()
def generate(
    model: CharLM,
    prefix_ids: list[int],
    settings: SampleSettings,
    on_step: Callable[[list[int]], None] | None = None,
    generator: torch.Generator | None = None,
    keep: bool = True,
    spool: IdSpool | None = None,
) -> list[list[int]]:
    """Token ids drawn after `prefix_ids`, one list per sample (the prefix is not included).

    `on_step` receives the ids drawn at each step (one per sample), for streaming output (it
    costs one host sync per step); with `keep` False nothing else is kept (memory does not grow
    with the length) and the result is []; with a `spool`, each step's ids go to it instead
    (one host copy per block of steps, memory flat in the length) and the result is []. An
    empty prefix starts from the zero state, the first
    character drawn from the output layer's bias alone. With `greedy`, each step takes the
    argmax (d2l's predict_ch8) and temperature, top-k, top-p and the generator play no part.
    """
    drawn = []
    for nxt in draw_steps(model, prefix_ids, settings, generator):
        if spool is not None:
            spool.append(nxt)
        elif keep:
            drawn.append(nxt)
        if on_step is not None:
            on_step(nxt.tolist())
    if spool is not None:
        spool.flush()
    return torch.stack(drawn, 1).tolist() if keep and spool is None else []


@torch.inference_mode()
def draw_steps(model: CharLM, prefix_ids: list[int], settings: SampleSettings,
               generator: torch.Generator | None = None) -> Iterator[torch.Tensor]:
    """`generate`'s draws as they come: the ids of each step (n,), on the model's device, for a
    caller that pulls them (`charlm.inference.model.Model.stream`)."""
    settings.validate()
    was_training = model.training
    model.eval()
    device = model.head.weight.device
    n, length = settings.num_samples, settings.length
    scale = 1.0 if settings.greedy else 1.0 / settings.temperature
    if generator is None and settings.seed is not None:
        generator = torch.Generator(device=device).manual_seed(settings.seed)
    try:
        if prefix_ids:
            x = torch.tensor([prefix_ids], dtype=torch.long, device=device)
            logits, state = model(x)
            logits = (logits[:, -1] * scale).expand(n, -1)
            state = map_state(lambda s: s.expand(-1, n, -1).contiguous(), state)
        else:
            state = model.begin_state(n, device)
            logits = (model.head.bias * scale).expand(n, -1)
        logits = without_unk(logits)
        fast = _Stepper.supports(model)
        if fast:
            stepper = _Stepper(model, scale)
            states = layers_of(state)
        noise = None if settings.greedy else gumbel_noise(
            generator, length, n, logits.size(-1), device)
        filtering = not settings.greedy and (settings.top_k or settings.top_p < 1.0)
        # up to 16 samples on the CPU: one thread (threads.threads_for "stream"): a step's ops
        # last microseconds, a second thread gains nothing (equal speed on an idle machine), and
        # on a busy one every op may wait at a barrier for it
        single = device.type == "cpu" and n <= 16
        with threads_within(threads_for("stream", model.config.hidden, n)) if single \
                else nullcontext():
            for step in range(length):
                if noise is not None:
                    if filtering:
                        logits = filter_logits(logits, settings.top_k, settings.top_p)
                    logits = logits + next(noise)
                nxt = logits.argmax(-1)
                yield nxt
                if step == length - 1:
                    break  # no model step for a character nobody will draw after
                if fast:
                    logits = stepper.step(nxt, states)
                else:
                    logits, state = model(nxt[:, None], state)
                    logits = without_unk(logits[:, -1] * scale)
    finally:
        model.train(was_training)
