"""The streamed data path: charlm.data.stream (read, decode, preprocess in chunks) and
charlm.data.encode (one pass to narrow token ids), against the whole-text reference
(`read_text`, `preprocess`, `Vocab.build`, `Vocab.encode`)."""

from __future__ import annotations

import random

import pytest
import torch

from charlm.data import encode as encode_module
from charlm.data import stream
from charlm.data.corpus import load_corpus, locate_corpus
from charlm.data.dataset import load_dataset
from charlm.data.encode import SymbolCounter, encode_chunks, token_dtype
from charlm.data.text import PREPROCESSING, preprocess, read_text
from charlm.data.vocab import Vocab
from charlm.errors import CharlmError

# Where chunking could go wrong: multi-byte characters (2, 3, 4 bytes), runs of non-letters
# (d2l), the final sigma and the dotted I (lower), whitespace of every kind.
HOSTILE = "Ab, c!  ΣΑΣ σας İstanbul\n\n\tünï日本語😀 -- x.Σ y\r\nZ" * 7


def joined(pieces) -> str:
    return "".join(p.decode("latin-1") if isinstance(p, bytes) else p for p in pieces)


def write(path, text: str, bom: bool = False):
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + text.encode("utf-8"))
    return path


@pytest.mark.parametrize("mode", PREPROCESSING)
@pytest.mark.parametrize("block", [1, 2, 3, 5, 64, 1 << 20])
def test_chunks_join_to_the_whole_text_preprocessed(tmp_path, mode, block):
    a = write(tmp_path / "a.txt", HOSTILE, bom=True)
    b = write(tmp_path / "b.txt", "second file ΣΣ.\n")
    whole = read_text(a) + "\n" + read_text(b)
    assert joined(stream.chunks(mode, (a, b), block=block)) == preprocess(whole, mode)
    assert joined(stream.chunks(mode, text=whole, block=block)) == preprocess(whole, mode)
    assert stream.capacity((a, b)) >= len(preprocess(whole, mode))


def test_chunks_of_the_reference_corpora_equal_preprocess(shared_data):
    path = shared_data / "timemachine.txt"
    text = read_text(path)
    for mode in PREPROCESSING:
        assert joined(stream.chunks(mode, (path,), block=4099)) == preprocess(text, mode), mode


@pytest.mark.parametrize(
    "content",
    [None, b"", "caf\xe9 cr\xe8me".encode("latin-1"), "hello".encode("utf-16"),
     b"x" * 50 + "é".encode("utf-8")[:1],  # cut off at the very end
     b"y" * 37 + b"\xe9" + b"z" * 40],  # a bad byte in a later block
    ids=["missing", "empty", "latin1", "utf16", "truncated", "later-block"])
def test_a_bad_file_gives_read_texts_error_at_the_same_offset(tmp_path, content):
    p = tmp_path / "bad.txt"
    if content is not None:
        p.write_bytes(content)
    with pytest.raises(CharlmError) as want:
        read_text(p)
    for block in (4, 16, 1 << 16):
        with pytest.raises(CharlmError) as got:
            list(stream.chunks("raw", (p,), block=block))
        assert str(got.value) == str(want.value)


def test_bytes_mode_takes_any_bytes_but_nul(tmp_path):
    p = tmp_path / "latin1.txt"
    p.write_bytes("caf\xe9".encode("latin-1"))
    assert b"".join(stream.chunks("bytes", (p,))) == b"caf\xe9"
    p.write_bytes(b"a\0b")
    with pytest.raises(CharlmError, match="holds NUL bytes"):
        list(stream.chunks("bytes", (p,)))


def reference(text: str, mode: str, min_freq=1, max_size=None, max_tokens=0):
    """What encode_chunks gives; load_dataset's is the same but for "bytes", whose vocabulary
    is every byte (`dataset_reference`)."""
    chars = preprocess(text, mode)
    vocab = Vocab.build(chars, min_freq=min_freq, max_size=max_size)
    ids = vocab.encode(chars)
    return vocab, ids[:max_tokens] if max_tokens else ids


def dataset_reference(text: str, mode: str, max_tokens=0):
    if mode != "bytes":
        return reference(text, mode, max_tokens=max_tokens)
    chars = preprocess(text, mode)
    vocab = Vocab.of_bytes(torch.bincount(torch.tensor([ord(c) for c in chars])))
    ids = vocab.encode(chars)
    return vocab, ids[:max_tokens] if max_tokens else ids


def many_symbols(n: int, length: int, seed: int = 0) -> str:
    """A text of `length` characters over `n` distinct symbols (CJK past the ASCII ones)."""
    rng = random.Random(seed)
    symbols = [chr(c) for c in range(32, 127)] + [chr(0x4E00 + i) for i in range(max(n - 95, 0))]
    return "".join(rng.choice(symbols[:n]) for _ in range(length))


@pytest.mark.slow
@pytest.mark.parametrize("mode", PREPROCESSING)
@pytest.mark.parametrize("options", [{}, {"min_freq": 3}, {"max_vocab": 20}, {"max_tokens": 999},
                                     {"min_freq": 2, "max_vocab": 300, "max_tokens": 5000}])
def test_encode_chunks_equals_build_and_encode(mode, options):
    text = HOSTILE * 5 + many_symbols(400, 20_000)
    want_vocab, want_ids = reference(text, mode, options.get("min_freq", 1),
                                     options.get("max_vocab"), options.get("max_tokens", 0))
    vocab, ids = encode_chunks(stream.chunks(mode, text=text, block=777),
                               stream.capacity(text=text), **options)
    assert vocab == want_vocab and vocab.counts == want_vocab.counts  # counted over all the text
    assert ids.dtype == token_dtype(len(vocab))
    assert torch.equal(ids.long(), want_ids.long())
    # with the vocabulary given (resume, eval), the same ids
    again = encode_chunks(stream.chunks(mode, text=text, block=777), stream.capacity(text=text),
                          vocab, max_tokens=options.get("max_tokens", 0))[1]
    assert torch.equal(again, ids)


def test_token_dtype_is_the_narrowest_that_holds_the_ids():
    assert [token_dtype(n) for n in (1, 256, 257, 32768, 32769)] == [
        torch.uint8, torch.uint8, torch.int16, torch.int16, torch.int32]


@pytest.mark.slow
@pytest.mark.parametrize("symbols, dtype", [(200, torch.uint8), (255, torch.uint8),
                                            (256, torch.int16), (3000, torch.int16)])
def test_ids_widen_as_symbols_appear_and_narrow_back_with_max_vocab(monkeypatch, symbols, dtype):
    monkeypatch.setattr(encode_module, "REMAP_CHUNK", 1000)  # renumber in many pieces
    text = many_symbols(symbols, 60_000, seed=symbols)
    vocab, ids = encode_chunks(stream.chunks("raw", text=text, block=500), len(text))
    assert (len(vocab), ids.dtype) == (len(set(text)) + 1, dtype)
    assert torch.equal(ids.long(), Vocab.build(text).encode(text).long())
    small, narrow = encode_chunks(stream.chunks("raw", text=text, block=500), len(text),
                                  max_vocab=100)
    assert narrow.dtype == torch.uint8
    assert torch.equal(narrow.long(), Vocab.build(text, max_size=100).encode(text).long())


def test_max_tokens_with_a_given_vocabulary_stops_reading(tmp_path, monkeypatch):
    path = write(tmp_path / "big.txt", "abcdefgh" * 10_000)  # 80,000 bytes
    read = []
    real = stream._blocks

    def counting(p, block):
        for data in real(p, block):
            read.append(len(data))
            yield data

    monkeypatch.setattr(stream, "_blocks", counting)
    vocab, ids = encode_chunks(stream.chunks("raw", (path,), block=1000), 80_000, max_tokens=2500)
    assert sum(read) == 80_000  # building the vocabulary counts the whole text, as d2l's does
    assert vocab.counts[1:] == [10_000] * 8 and ids.numel() == 2500
    read.clear()
    _, again = encode_chunks(stream.chunks("raw", (path,), block=1000), 80_000, vocab,
                             max_tokens=2500)
    assert torch.equal(again, ids) and sum(read) <= 3000  # stopped after the third block


def test_symbol_counter_counts_like_build():
    counter = SymbolCounter()
    for piece in stream.chunks("raw", text=HOSTILE, block=9):
        counter.add(piece)
    vocab = counter.vocab()
    assert vocab == Vocab.build(HOSTILE) and vocab.counts == Vocab.build(HOSTILE).counts


def test_load_dataset_streams_files_into_narrow_splits(tmp_path):
    a = write(tmp_path / "a.txt", HOSTILE * 20)
    b = write(tmp_path / "b.txt", "Über alles. " * 200)
    whole = load_corpus(texts=[a, b]).text
    for mode, dtype in (("raw", torch.uint8), ("bytes", torch.uint8), ("d2l", torch.uint8)):
        data = load_dataset(text=[str(a), str(b)], preprocessing=mode, max_tokens=3000,
                            val_fraction=0.2)
        vocab, ids = dataset_reference(whole, mode, max_tokens=3000)
        assert data.vocab == vocab and data.num_tokens == 3000
        assert data.train.dtype == dtype
        assert torch.equal(torch.cat([data.train, data.val, data.test]).long(), ids.long())
        assert (data.train.numel(), data.val.numel(), data.test.numel()) == (2400, 600, 0)
    source = locate_corpus(texts=[a, b])
    assert (source.files, source.text, source.sample_prefix) == ((a, b), None, "Ab,")
