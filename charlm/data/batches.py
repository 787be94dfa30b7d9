"""Train/validation/test splits and the minibatch iterators of d2l (sequential and random).

Both iterators keep the encoded corpus as one tensor on its device and cut batches out of it by
slicing (sequential) or by indexing rows of a strided view (random). The only per-epoch host work
is drawing an offset and, for random sampling, a permutation on a CPU generator seeded from
(seed, epoch); batches are therefore a pure function of (seed, epoch, position), which makes
resuming exact and cheap.

Batches per epoch: ``len()`` is the same every epoch, as many batches of batch_size x num_steps
as fit after leaving num_steps - 1 tokens spare. Each epoch uses the U = ``len() * batch_size *
num_steps`` tokens from its offset (the "usable range") exactly once as inputs; the S tokens it
leaves out (the "slack": n - 1 - U, between num_steps - 1 and (batch_size + 1) * num_steps - 2)
lie before the offset and after the range::

    epoch offset o in [0, S]:   [ o tokens | usable range: U tokens ........ | S - o | last ]
                                  unused     inputs (targets: one later)      unused  target only

The offsets go round in cycles of 2 * num_steps epochs, taken two at a time: epochs 2k and
2k + 1 of a cycle start at o = p_k (the slack at the end) and at o = S - p_k (the slack at the
start), in an order drawn per pair, and p_0 = 0: the first two epochs of every cycle start at
both ends of the split, so from the second epoch on the first token has been an input and the
last a target (d2l draws its offset from [0, num_steps), which includes 0, but never reaches
the end). The other phases p < num_steps follow in an order drawn per cycle, so the cut points
between BPTT windows move from epoch to epoch and every position of the training split is used
in every cycle. Offsets and orders come from generators seeded by (seed, cycle) and (seed,
epoch): batches are a pure function of (seed, epoch, position).
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch

from charlm.errors import CharlmError, UsageError

Tensor = torch.Tensor

_STATE_KEYS = ("epoch", "position", "seed", "batch_size", "num_steps", "num_tokens")
# The batch order's version, saved in the state: 3 since each cycle's first two epochs start at
# the two ends of the split (2: the offsets spread over both ends of the slack in one drawn
# order; a state without it, 1, is older still). Another version's epochs are laid out
# otherwise: resumable at an epoch boundary only.
LAYOUT = 3


def split_tokens(tokens: Tensor, fractions=(0.9, 0.1, 0.0)) -> tuple[Tensor, Tensor, Tensor]:
    """Contiguous (train, validation, test) views: validation and test are cut from the end.

    ``[ train ............................ | val ...... | test .. ]``

    Validation and test get ``floor(fraction * n)`` tokens each; train gets the rest.
    """
    try:
        fr = [float(f) for f in fractions]
    except (TypeError, ValueError):
        fr = []
    if len(fr) != 3 or not all(math.isfinite(f) and f >= 0 for f in fr) or abs(sum(fr) - 1) > 1e-6:
        raise UsageError(
            "split fractions must be three numbers >= 0 (train, validation, test) that sum to 1; "
            f"got {tuple(fractions) if isinstance(fractions, (list, tuple)) else fractions!r}"
        )
    n = len(tokens)
    # round() first so that 0.29 * 100 = 28.999999999999996 still gives 29
    n_val, n_test = (int(round(n * f, 6)) for f in fr[1:])
    n_test = min(n_test, n)  # fractions may sum to 1 + 1e-6
    n_val = min(n_val, n - n_test)
    n_train = n - n_val - n_test
    return tokens[:n_train], tokens[n_train : n_train + n_val], tokens[n_train + n_val :]


def _check_shape(batch_size: int, num_steps: int) -> None:
    if batch_size < 1:
        raise UsageError(f"batch size must be >= 1, got {batch_size}")
    if num_steps < 1:
        raise UsageError(f"num_steps must be >= 1, got {num_steps}")


def _check_tokens(tokens: Tensor) -> Tensor:
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 1:
        raise TypeError("tokens must be a 1-D integer tensor")
    if tokens.is_floating_point() or tokens.is_complex() or tokens.dtype == torch.bool:
        raise TypeError(f"tokens must be an integer tensor, got {tokens.dtype}")
    return tokens.contiguous()


def _too_short(n: int, batch_size: int, num_steps: int, need: int) -> CharlmError:
    return CharlmError(
        f"corpus too short: {n} tokens make no batch of {batch_size} x {num_steps} "
        f"(need at least {need}); use a smaller --batch-size or --num-steps, or a longer text"
    )


def _epoch_generator(seed: int, epoch: int, salt: int = 0x632BE59BD9B4E019) -> torch.Generator:
    """A CPU generator for one epoch (or, with another salt, one cycle of epochs): splitmix64 of
    (seed, epoch), so nearby seeds and epochs give unrelated streams."""
    mask = (1 << 64) - 1
    z = (seed * 0x9E3779B97F4A7C15 + epoch * 0xD1B54A32D192ED03 + salt) & mask
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
    z ^= z >> 31
    return torch.Generator(device="cpu").manual_seed(z)


class _EpochBatches:
    """Shared epoch/position bookkeeping and state; subclasses lay out one epoch's batches."""

    def __init__(self, tokens: Tensor, batch_size: int, num_steps: int, seed: int = 0,
                 rows: slice | None = None):
        _check_shape(batch_size, num_steps)
        self.tokens = _check_tokens(tokens)
        self.batch_size = int(batch_size)
        self.num_steps = int(num_steps)
        self.seed = int(seed)
        # Data-parallel ranks all lay out the same global batches and keep only their own rows.
        self.rows = rows if rows is not None else slice(None)
        self.epoch = 0
        self.position = 0
        n = len(self.tokens)
        # n - 1 tokens have a following target; keeping num_steps - 1 of them spare, the same
        # number of batches fits every epoch and the offset can move (see the module docstring).
        self._num_batches = max(n - self.num_steps, 0) // (self.batch_size * self.num_steps)
        if self._num_batches == 0:
            raise _too_short(n, batch_size, num_steps, (batch_size + 1) * num_steps)
        self._layout_epoch = -1  # epoch whose layout is cached below

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)

    @property
    def usable_tokens(self) -> int:
        """Input positions used per epoch: len() * batch_size * num_steps."""
        return self._num_batches * self.batch_size * self.num_steps

    @property
    def slack(self) -> int:
        """Input positions each epoch leaves out (before its offset and after its range)."""
        return self.num_tokens - 1 - self.usable_tokens

    def __len__(self) -> int:
        return self._num_batches

    def epoch_offset(self, epoch: int) -> int:
        """Where the epoch's usable range starts, in [0, slack]: phase p at the start of the
        slack or S - p at its end, the two in consecutive epochs; phase 0 first in each cycle
        of 2 * num_steps epochs, the other phases in an order drawn per cycle."""
        cycle, k = divmod(epoch, 2 * self.num_steps)
        gen = _epoch_generator(self.seed, cycle, salt=0x3C6EF372FE94F82B)
        phases = torch.cat([torch.zeros(1, dtype=torch.long),
                            1 + torch.randperm(self.num_steps - 1, generator=gen)])
        ends_first = torch.randint(2, (self.num_steps,), generator=gen)
        pair, side = divmod(k, 2)
        p = int(phases[pair])
        return p if side == int(ends_first[pair]) else self.slack - p

    def _prepare(self, epoch: int) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _batch(self, i: int) -> tuple[Tensor, Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        """Yield the rest of the current epoch, then move on to the next epoch."""
        if self.position >= self._num_batches:  # a loop stopped right after the last batch
            self.epoch, self.position = self.epoch + 1, 0
        if self._layout_epoch != self.epoch:
            self._prepare(self.epoch)
            self._layout_epoch = self.epoch
        for i in range(self.position, self._num_batches):
            # Advance before yielding: a state_dict() taken while the caller holds batch i
            # resumes with batch i + 1.
            self.position = i + 1
            yield self._batch(i)
        self.epoch, self.position = self.epoch + 1, 0

    def state_dict(self) -> dict:
        """Where the next batch comes from. Right after an epoch's last batch that is the next
        epoch's first, whether or not the caller has asked for it yet."""
        epoch, position = self.epoch, self.position
        if position >= self._num_batches:
            epoch, position = epoch + 1, 0
        return {
            "epoch": epoch,
            "position": position,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "num_steps": self.num_steps,
            "num_tokens": self.num_tokens,
            "layout": LAYOUT,
        }

    def load_state_dict(self, d: dict) -> None:
        """Continue where the run that saved ``d`` stopped; the corpus and shapes must match."""
        if not isinstance(d, dict) or not all(
            isinstance(d.get(k), int) and not isinstance(d.get(k), bool) for k in _STATE_KEYS
        ):
            raise CharlmError(
                f"invalid batch iterator state: expected integers {', '.join(_STATE_KEYS)}"
            )
        for key, ours in (
            ("batch_size", self.batch_size),
            ("num_steps", self.num_steps),
            ("num_tokens", self.num_tokens),
        ):
            if d[key] != ours:
                raise CharlmError(
                    f"cannot resume: the saved run used {key}={d[key]} but this one has "
                    f"{key}={ours}; resume with the same data and batch settings"
                )
        if d["epoch"] < 0 or not 0 <= d["position"] <= self._num_batches:
            raise CharlmError(
                f"invalid batch iterator state: epoch {d['epoch']}, position {d['position']} "
                f"(an epoch has {self._num_batches} batches)"
            )
        layout = d.get("layout", 1)
        if not isinstance(layout, int) or isinstance(layout, bool):
            raise CharlmError(f"invalid batch iterator state: layout {layout!r}")
        if layout != LAYOUT and 0 < d["position"] < self._num_batches:
            raise CharlmError(
                f"cannot resume: the checkpoint stopped in the middle of epoch {d['epoch']} "
                f"(after batch {d['position']} of {self._num_batches}) and was written by "
                f"{'an older' if layout < LAYOUT else 'a newer'} charlm, whose batch order "
                "differs, so the rest of the epoch would repeat or skip text; start a new run, "
                "or resume it with the charlm that wrote it"
            )
        self.seed, self.epoch, self.position = d["seed"], d["epoch"], d["position"]
        self._layout_epoch = -1


class SequentialBatches(_EpochBatches):
    """d2l's ``seq_data_iter_sequential``: row r of batch i + 1 continues row r of batch i.

    The usable range ``tokens[offset : offset + B*L]`` (L = len() * num_steps) is laid out as B
    parallel streams, and batch i is columns ``[i*T, (i+1)*T)``; Y is the same window one token
    later in the corpus. With B = 3, T = 2, len() = 2 (letters are token positions)::

        tokens: o | a b c d  e f g h  i j k l | rest of the slack
                      batch 0   batch 1
        row 0:    [a b]     [c d]
        row 1:    [e f]     [g h]
        row 2:    [i j]     [k l]

    Unlike d2l, the streams are adjacent (L is the same every epoch) so the tokens an epoch
    leaves out are at the two ends of the split, and the next epochs use them (the offset moves
    across the whole slack: see the module docstring).
    """

    def _prepare(self, epoch: int) -> None:
        offset = self.epoch_offset(epoch)
        n = self.usable_tokens
        self._x = self.tokens[offset : offset + n].view(self.batch_size, -1)[self.rows]
        self._y = self.tokens[offset + 1 : offset + 1 + n].view(self.batch_size, -1)[self.rows]

    def _batch(self, i: int) -> tuple[Tensor, Tensor]:
        cols = slice(i * self.num_steps, (i + 1) * self.num_steps)
        return self._x[:, cols].long(), self._y[:, cols].long()


class RandomBatches(_EpochBatches):
    """d2l's ``seq_data_iter_random``: non-overlapping windows in a random order.

    The usable range from the epoch's offset is cut into K = len() * B windows of T tokens; a
    permutation of the K windows, drawn per epoch, fills the batches B windows at a time. With
    B = 2, T = 2, K = 4::

        tokens: o | a b  c d  e f  g h | rest   windows w0=[a b] w1=[c d] w2=[e f] w3=[g h]
        permutation 2 0 3 1  ->  batch 0 = [[e f], [a b]],  batch 1 = [[g h], [c d]]

    Consecutive batches are unrelated, so the model's state is reset for every batch. Unlike d2l
    (which drops a random handful of windows per epoch), each epoch covers its usable range
    exactly once; what it leaves out is at the two ends, and the offsets of the next epochs
    cover it (the module docstring).
    """

    def _prepare(self, epoch: int) -> None:
        gen = _epoch_generator(self.seed, epoch)
        offset = self.epoch_offset(epoch)
        num_windows = self._num_batches * self.batch_size
        order = torch.randperm(num_windows, generator=gen).view(self._num_batches, -1)
        order = order[:, self.rows].contiguous()
        n = self.usable_tokens
        self._x = self.tokens[offset : offset + n].view(num_windows, self.num_steps)
        self._y = self.tokens[offset + 1 : offset + 1 + n].view(num_windows, self.num_steps)
        if self.tokens.is_cuda:
            # One host-to-device copy per epoch, from pinned memory so it does not block the host.
            order = order.pin_memory().to(self.tokens.device, non_blocking=True)
        self._order = order

    def _batch(self, i: int) -> tuple[Tensor, Tensor]:
        rows = self._order[i]
        return self._x[rows].long(), self._y[rows].long()


def eval_windows(
    tokens: Tensor, batch_size: int, num_steps: int
) -> Iterator[tuple[Tensor, Tensor, bool]]:
    """Yield ``(X, Y, reset)`` covering every target position 1 .. n-1 exactly once, in order.

    The n - 1 (input, target) pairs are split into ``batch_size`` contiguous streams of
    q = (n - 1) // batch_size pairs, walked num_steps columns at a time (the last window may be
    narrower). The r = (n - 1) % batch_size pairs left over form one final stream of batch size 1.
    ``reset`` is True on the first window of each of these two parts: the hidden state must be
    started afresh there (the rows and the batch size change); otherwise it carries over. With
    n - 1 = 7 pairs, B = 2, T = 2::

        pairs:  0 1 2 | 3 4 5 | 6
        part 1: row 0 [0 1] [2]        reset on the first window
                row 1 [3 4] [5]
        part 2: row 0 [6]              reset

    The loss summed over all yielded Y equals the loss over every target once; X and Y are int64.
    """
    _check_shape(batch_size, num_steps)
    tokens = _check_tokens(tokens)
    pairs = len(tokens) - 1
    if pairs < 1:
        raise CharlmError(
            f"corpus too short: {len(tokens)} tokens leave nothing to evaluate; "
            "use a longer text or a larger validation/test fraction"
        )
    q, r = divmod(pairs, batch_size)
    parts = []
    if q:
        parts.append((0, batch_size, q))
    if r:
        parts.append((batch_size * q, 1, r))
    for start, rows, length in parts:
        x = tokens[start : start + rows * length].view(rows, length)
        y = tokens[start + 1 : start + 1 + rows * length].view(rows, length)
        for j in range(0, length, num_steps):
            yield x[:, j : j + num_steps].long(), y[:, j : j + num_steps].long(), j == 0
