"""Beam search: the likeliest continuations of a prefix, one character at a time.

Each step extends every kept hypothesis by every character and keeps the `beam` best
candidates by their score, the log-probability of the continuation divided by its length
(nats per character, so a score reads like the per-character loss and hypotheses of different
lengths compare fairly)::

    scores (N,)  +  log_softmax(logits) (N, V)  ->  N*V candidates  --best N-->  scores, parents
    state[:, parents]  --CharLM.forward on the N new characters-->  logits (N, V)

Every hypothesis here has the same length at each step, so ranking by the normalised score is
ranking by total log-probability: the search returns what exhaustive search would return when
the beam is wide enough (V^(length-1)), and `--beam 1` is greedy decoding. Candidates are ranked
by a stable sort, so among equal scores the lower beam and character index wins, as argmax picks
the first maximum. `<unk>` is never part of a continuation (charlm.inference.sample.without_unk).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from charlm.inference.sample import without_unk
from charlm.model.lm import CharLM, State
from charlm.system import spool as spooling
from charlm.system.spool import IdSpool


@dataclass
class Hypothesis:
    ids: list[int]  # the continuation (the prefix not included)
    log_prob: float  # natural log of its probability given the prefix
    score: float  # log_prob / len(ids): nats per character (higher is likelier)


def _select(state: State, rows: torch.Tensor) -> State:
    if isinstance(state, tuple):
        return tuple(s.index_select(1, rows) for s in state)
    return state.index_select(1, rows)


@torch.inference_mode()
def beam_search(model: CharLM, prefix_ids: list[int], beam: int, length: int,
                spool: IdSpool | None = None) -> list[Hypothesis]:
    """The `beam` best continuations of `length` characters, best first. With a `spool`
    (width `beam`), their ids go there, column k the k-th best, and each Hypothesis's ids are
    []: memory stays flat in the length (charlm.system.spool)."""
    if beam < 1 or length < 1:
        raise ValueError(f"beam and length must be >= 1, got {beam} and {length}")
    was_training = model.training
    model.eval()
    device = model.head.weight.device
    try:
        if prefix_ids:
            logits, state = model(torch.tensor([prefix_ids], dtype=torch.long, device=device))
            logits = logits[:, -1]
        else:  # a zero state: the first character comes from the output layer's bias alone
            state = model.begin_state(1, device)
            logits = model.head.bias[None]
        vocab = logits.size(-1)
        # the ranking runs on the host in float64 (exact sums of many log-probabilities; MPS
        # has no float64): one (N, V) copy per step, as small as the model's own output
        scores = torch.zeros(1, dtype=torch.float64)
        # each step's (parents, chars), on disk; the paths are read back from the end
        pointers = IdSpool(2 * beam)
        for step in range(length):
            # <unk> is never a continuation, as in sampling (so --beam 1 is --greedy)
            log_probs = F.log_softmax(without_unk(logits).cpu().double(), -1)
            candidates = (scores[:, None] + log_probs).reshape(-1)
            best = torch.sort(candidates, descending=True, stable=True).indices[:beam]
            parents, chars = best // vocab, best % vocab
            scores = candidates[best]
            pointers.append(torch.cat([_padded(parents, beam), _padded(chars, beam)]))
            if step == length - 1:
                break
            logits, state = model(chars[:, None].to(device), _select(state, parents.to(device)))
            logits = logits[:, -1]
        out = spool if spool is not None else IdSpool(scores.numel())
        if out.width != scores.numel():
            raise ValueError(f"the spool has {out.width} columns for {scores.numel()} beams")
        _backtrack(pointers, out, scores.numel())
        paths = out.lists() if spool is None else [[] for _ in range(scores.numel())]
        if spool is None:
            out.close()
        pointers.close()
        return [Hypothesis(ids, lp, lp / length) for ids, lp in zip(paths, scores.tolist())]
    finally:
        model.train(was_training)


def _padded(row: torch.Tensor, width: int) -> torch.Tensor:
    """A step keeps fewer than `beam` hypotheses while N * V < beam: pad its row."""
    return row if row.numel() == width else torch.cat([row, row.new_zeros(width - row.numel())])


def _backtrack(pointers: IdSpool, out: IdSpool, kept: int) -> None:
    """Follow the parents from the last step to the first, writing each kept hypothesis's
    characters to `out` (row t: the characters of step t), a block of steps at a time."""
    pointers.flush()
    beam = pointers.width // 2
    rows = torch.arange(kept)
    for stop in range(pointers.steps, 0, -spooling.READ_STEPS):
        start = max(0, stop - spooling.READ_STEPS)
        block = pointers.rows(start, stop)
        chars = torch.empty(stop - start, kept, dtype=torch.long)
        for t in range(stop - start - 1, -1, -1):
            chars[t] = block[t, beam:][rows]
            rows = block[t, :beam][rows]
        out.write_rows(start, chars)
