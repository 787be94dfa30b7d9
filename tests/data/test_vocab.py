import collections
import json
import re

import pytest
import torch

from charlm.errors import CharlmError, UsageError
from charlm.data.text import PREPROCESSING, preprocess, readable
from charlm.data.vocab import Vocab
import charlm.data.vocab as vocab_module

from helpers import SHARED_DATA


def shared_text(name: str) -> str:
    path = SHARED_DATA / name
    if not path.is_file():
        pytest.skip(f"reference corpus {path} is absent")
    return path.read_text(encoding="utf-8")


def naive_vocab(text: str, min_freq: int = 1, max_size: int | None = None) -> list[str]:
    """Reference: Counter, sort by (-count, char), truncate."""
    ranked = sorted(collections.Counter(text).items(), key=lambda kv: (-kv[1], kv[0]))
    ranked = [c for c, n in ranked if n >= min_freq]
    if max_size is not None:
        ranked = ranked[:max_size]
    return ["<unk>"] + ranked


def naive_encode(tokens: list[str], text: str) -> list[int]:
    index = {t: i for i, t in enumerate(tokens)}
    return [index.get(c, 0) if c != "<unk>" else 0 for c in text]


def test_preprocess_modes():
    text = "The Time-Machine,\n by H. G. Wells [1898]\n\nÄbc"
    assert preprocess(text, "d2l") == re.sub("[^A-Za-z]+", " ", text).lower()
    assert preprocess(text, "d2l") == "the time machine by h g wells bc"
    assert preprocess(text, "lower") == text.lower()
    assert preprocess(text, "raw") is text
    # bytes: one U+0000..U+00FF character per UTF-8 byte, so "Ä" is two symbols
    assert preprocess(text, "bytes") == text.encode("utf-8").decode("latin-1")
    assert [ord(c) for c in preprocess("Äb", "bytes")] == [0xC3, 0x84, 0x62]
    assert readable(preprocess(text, "bytes"), "bytes") == text
    assert readable(preprocess("Ä", "bytes")[:1], "bytes") == "\ufffd"  # a cut-off sequence
    assert readable("Ä", "raw") == "Ä"
    assert PREPROCESSING == ("d2l", "lower", "raw", "bytes")


def test_preprocess_unknown_mode():
    with pytest.raises(UsageError) as err:
        preprocess("abc", "upper")
    assert str(err.value) == "unknown preprocessing 'upper'; choose one of: d2l, lower, raw, bytes"
    assert err.value.exit_code == 2


def test_time_machine_d2l_has_28_tokens():
    text = preprocess(shared_text("timemachine.txt"), "d2l")
    vocab = Vocab.build(text)
    assert len(vocab) == 28
    assert vocab.tokens[0] == "<unk>"
    assert sorted(vocab.tokens[1:]) == [" "] + [chr(c) for c in range(ord("a"), ord("z") + 1)]
    assert vocab.tokens == naive_vocab(text)
    # d2l's book lists the most frequent tokens as space, e, t, a, i, n, o, s, h, r
    assert vocab.tokens[1:11] == [" ", "e", "t", "a", "i", "n", "o", "s", "h", "r"]
    assert vocab.counts[1:3] == [text.count(" "), text.count("e")]
    assert vocab.encode(text).tolist() == naive_encode(vocab.tokens, text)


def test_build_matches_reference_and_orders_ties_by_character():
    text = "bbaacc\nzz \tÄÄé😀😀😀"
    vocab = Vocab.build(text)
    assert vocab.tokens == naive_vocab(text)
    assert vocab.tokens[:2] == ["<unk>", "😀"]
    assert vocab.tokens[2:7] == ["a", "b", "c", "z", "Ä"]  # count-2 ties, by code point
    assert vocab.tokens[7:] == ["\t", "\n", " ", "é"]  # count-1 ties, by code point
    assert vocab.counts == [0] + [text.count(t) for t in vocab.tokens[1:]]


@pytest.mark.parametrize("min_freq,max_size", [(1, None), (2, None), (3, None), (1, 2), (2, 1), (1, 100)])
def test_min_freq_and_max_size(min_freq, max_size):
    text = "aaaabbbccd  ééé" * 3 + "xy"
    vocab = Vocab.build(text, min_freq=min_freq, max_size=max_size)
    assert vocab.tokens == naive_vocab(text, min_freq, max_size)
    assert vocab.encode(text).tolist() == naive_encode(vocab.tokens, text)
    assert vocab.counts[0] == sum(1 for c in text if c not in vocab.tokens[1:])
    assert sum(vocab.counts) == len(text)


def test_build_rejects_bad_limits():
    with pytest.raises(UsageError, match=r"^min_freq must be >= 1, got 0$"):
        Vocab.build("abc", min_freq=0)
    with pytest.raises(UsageError, match=r"^max_size must be >= 1 \(or None for no limit\), got 0$"):
        Vocab.build("abc", max_size=0)


def test_encode_decode_round_trip_with_unknowns():
    vocab = Vocab.build("hello world")
    ids = vocab.encode("hello, wörld!\n")
    assert ids.dtype == torch.int32 and ids.dim() == 1
    assert ids.tolist() == naive_encode(vocab.tokens, "hello, wörld!\n")
    assert vocab.decode(ids) == "hello<unk> w<unk>rld<unk><unk>"
    assert vocab.decode(ids.tolist()) == vocab.decode(ids)
    assert vocab.decode(ids.long().view(2, 7)) == vocab.decode(ids)
    known = "lol drew"
    assert vocab.decode(vocab.encode(known)) == known
    # A literal "<" in the text is a character, not the <unk> token.
    assert vocab.encode("<unk>").tolist() == [0, 0, vocab.index("n"), 0, 0]


def test_encode_empty_and_empty_vocab():
    vocab = Vocab.build("abc")
    assert vocab.encode("").tolist() == []
    assert vocab.decode([]) == ""
    empty = Vocab.build("")
    assert empty.tokens == ["<unk>"] and len(empty) == 1
    assert empty.encode("xyz").tolist() == [0, 0, 0]


def test_code_points_above_vocabulary_map_to_unk():
    vocab = Vocab.build("ab")
    assert vocab.encode("b\U0010FFFFa\x00c").tolist() == [2, 0, 1, 0, 0]


def test_encode_across_chunks(monkeypatch):
    monkeypatch.setattr(vocab_module, "CHUNK_CHARS", 7)
    text = "the quick brown fox jumps over the lazy dog ÄÖ 😀" * 3
    vocab = Vocab.build(text, max_size=20)
    assert vocab.tokens == naive_vocab(text, 1, 20)
    assert vocab.counts[0] == len(text) - sum(vocab.counts[1:])
    assert vocab.encode(text).tolist() == naive_encode(vocab.tokens, text)


def test_decode_rejects_ids_outside_vocabulary():
    vocab = Vocab.build("ab")
    with pytest.raises(CharlmError) as err:
        vocab.decode([1, 3])
    assert str(err.value) == (
        "id 3 is outside this vocabulary of 3 tokens; was the text encoded with another vocabulary?"
    )
    with pytest.raises(CharlmError, match="id -1 is outside"):
        vocab.decode(torch.tensor([-1]))


def test_to_dict_from_dict_round_trip():
    vocab = Vocab.build("mississippi 😀", max_size=3)
    d = json.loads(json.dumps(vocab.to_dict()))
    again = Vocab.from_dict(d)
    assert again.tokens == vocab.tokens and again.counts == vocab.counts
    assert again == vocab
    assert again.encode("mississippi 😀").tolist() == vocab.encode("mississippi 😀").tolist()
    assert Vocab.from_dict({"tokens": vocab.tokens}).counts == []


@pytest.mark.parametrize(
    "bad,message",
    [
        (["<unk>", "a"], "invalid vocabulary: expected a dict with a 'tokens' list"),
        ({"tokens": "ab"}, "invalid vocabulary: expected a dict with a 'tokens' list"),
        ({"tokens": []}, "invalid vocabulary: the first token must be '<unk>'"),
        ({"tokens": ["a", "<unk>"]}, "invalid vocabulary: the first token must be '<unk>'"),
        ({"tokens": ["<unk>", "ab"]}, "invalid vocabulary: token 'ab' is not a single character"),
        ({"tokens": ["<unk>", 7]}, "invalid vocabulary: token 7 is not a single character"),
        ({"tokens": ["<unk>", "a", "a"]}, "invalid vocabulary: tokens are not unique"),
        (
            {"tokens": ["<unk>", "a"], "counts": [1]},
            "invalid vocabulary: 'counts' must be one count >= 0 per token",
        ),
        (
            {"tokens": ["<unk>", "a"], "counts": [0, -1]},
            "invalid vocabulary: 'counts' must be one count >= 0 per token",
        ),
    ],
)
def test_from_dict_rejects_malformed(bad, message):
    with pytest.raises(CharlmError) as err:
        Vocab.from_dict(bad)
    assert str(err.value) == message


def test_a_byte_level_vocabulary_holds_every_byte_so_none_is_unk(tmp_path):
    """The README promises no <unk> in bytes mode, yet a byte the training text lacked (the
    first byte of "€" in an ASCII text) encoded as <unk>: the vocabulary held only the bytes
    seen. Now it holds every byte a text can hold (1..255; NUL is refused), the seen ones
    first by frequency, in one byte per token."""
    from charlm.data.dataset import load_dataset

    text = tmp_path / "ascii.txt"
    text.write_text("abracadabra " * 50, encoding="utf-8")
    data = load_dataset(text=[str(text)], preprocessing="bytes", progress=False)
    vocab = data.vocab
    assert len(vocab) == 256 and data.train.dtype == torch.uint8
    assert vocab.tokens[:6] == ["<unk>", "a", "b", "r", " ", "c"]  # by count, then by byte
    assert vocab.counts[:7] == [0, 250, 100, 100, 50, 50, 50]
    assert sorted(ord(t) for t in vocab.tokens[1:]) == list(range(1, 256))
    unseen = vocab.encode(preprocess("€ 東京", "bytes"))
    assert (unseen != 0).all() and unseen.numel() == 10
    assert readable(vocab.decode(unseen), "bytes") == "€ 東京"
    assert torch.equal(data.train[:4].long(), vocab.encode("abra").long())


def test_min_freq_and_max_vocab_do_not_apply_to_bytes(tmp_path):
    from helpers import run_main

    text = tmp_path / "t.txt"
    text.write_text("abc " * 100, encoding="utf-8")
    for option, value in (("--max-vocab", "10"), ("--min-freq", "2")):
        code, out, err = run_main(["train", "--text", str(text), "--preprocessing", "bytes",
                                   option, value, "--out", str(tmp_path / "run")])
        assert (code, out, err) == (2, "", (
            f"charlm: error: {option} does not apply to --preprocessing bytes, whose vocabulary "
            "is every byte (no <unk>); drop it, or choose another --preprocessing\n"))
