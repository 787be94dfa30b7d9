"""The corpus-change check a resume runs (artifacts/fields.corpus_changed), against digests
computed by hand: sha256 of the token ids as little-endian int32."""

from __future__ import annotations

import hashlib
import struct

import torch

from charlm.artifacts.fields import corpus_changed
from charlm.data.dataset import Dataset


def _data(ids: list[int], dtype=torch.int64) -> Dataset:
    t = torch.tensor(ids, dtype=dtype)
    return Dataset(name="t", source="text", preprocessing="none", vocab=None, default_prefix="",
                   num_tokens=len(ids), train=t[:-2], val=t[-2:-1], test=t[-1:])


def _sha(ids: list[int]) -> str:
    return hashlib.sha256(struct.pack(f"<{len(ids)}i", *ids)).hexdigest()


def test_the_digest_is_of_the_ids_whatever_their_dtype():
    ids = [0, 1, 2, 3, 4, 5, 2, 1]
    assert _data(ids).digest == _data(ids, torch.uint8).digest == _data(ids, torch.int32).digest
    assert _data(ids).digest == _sha(ids)
    assert _data(ids).describe() == {
        "name": "t", "source": "text", "num_tokens": 8,
        "splits": {"train": 6, "val": 1, "test": 1}, "sha256": _sha(ids)}


def test_the_same_corpus_has_not_changed():
    ids = [3, 1, 4, 1, 5, 9, 2, 6]
    assert corpus_changed(_data(ids).describe(), _data(ids)) is None


def test_another_length_is_named_first():
    saved = _data([3, 1, 4, 1, 5, 9, 2, 6]).describe()
    assert corpus_changed(saved, _data([3, 1, 4, 1, 5, 9, 2])) == (
        "it has 7 tokens, the text trained on had 8")


def test_the_same_length_and_other_characters_is_named_by_digest():
    saved = _data([3, 1, 4, 1, 5, 9, 2, 6]).describe()
    now = [3, 1, 4, 1, 5, 9, 2, 7]
    assert corpus_changed(saved, _data(now)) == (
        f"its tokens hash to sha256 {_sha(now)}, the text trained on to "
        f"{_sha([3, 1, 4, 1, 5, 9, 2, 6])}")


def test_without_a_digest_only_the_length_is_compared():
    now = _data([7, 7, 7, 7])
    assert corpus_changed({"num_tokens": 4}, now) is None
    assert corpus_changed({"num_tokens": 5}, now) == "it has 4 tokens, the text trained on had 5"
    assert corpus_changed({}, now) is None
    assert corpus_changed(None, now) is None  # no `corpus` entry at all: nothing to compare
