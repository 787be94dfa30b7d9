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
from charlm.model.lm import CharLM
from charlm.model.state import map_state


@dataclass
class Hypothesis:
    ids: list[int]  # the continuation (the prefix not included)
    log_prob: float  # natural log of its probability given the prefix
    score: float  # log_prob / len(ids): nats per character (higher is likelier)


@torch.inference_mode()
def beam_search(model: CharLM, prefix_ids: list[int], beam: int, length: int) -> list[Hypothesis]:
    """The `beam` best continuations of `length` characters, best first."""
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
        paths = torch.empty(1, 0, dtype=torch.long)
        for step in range(length):
            # <unk> is never a continuation, as in sampling (so --beam 1 is --greedy)
            log_probs = F.log_softmax(without_unk(logits).cpu().double(), -1)
            candidates = (scores[:, None] + log_probs).reshape(-1)
            best = torch.sort(candidates, descending=True, stable=True).indices[:beam]
            parents, chars = best // vocab, best % vocab
            scores = candidates[best]
            paths = torch.cat([paths[parents], chars[:, None]], 1)
            if step == length - 1:
                break
            rows = parents.to(device)
            logits, state = model(chars[:, None].to(device),
                                  map_state(lambda s: s.index_select(1, rows), state))
            logits = logits[:, -1]
        return [Hypothesis(ids, lp, lp / length)
                for ids, lp in zip(paths.tolist(), scores.tolist())]
    finally:
        model.train(was_training)
