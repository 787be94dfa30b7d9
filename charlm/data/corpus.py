"""Corpora by name, by local file or by URL, and the cache that holds the downloaded ones.

The cache is one flat folder (see `cache_dir`):

    <cache>/timemachine.txt            named corpora, under the registry's `filename`
    <cache>/tinyshakespeare.txt
    <cache>/enwik8                     taken out of enwik8.zip (charlm.data.archive)
    <cache>/urls/<sha256(url)[:16]>-<basename>   --url downloads (the URL less any user:password@,
                                                 the basename cut to 100 characters)
    <cache>/<filename>.part            an unfinished download, resumed by the next one

`locate_corpus` says where a corpus's text is without reading it (a `CorpusSource`, streamed by
charlm.data.stream: nothing holds a 100 MB corpus whole); `load_corpus` reads it into a string.
"""

from __future__ import annotations

import codecs
import functools
import hashlib
import os
import re
import stat
import tomllib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path, PurePosixPath
from urllib.parse import unquote, urlparse

from charlm.checks import Rule
from charlm.data import archive, stream
from charlm.data.download import (DownloadError, checksum_mismatch, download, exclusive, install,
                                  mirror_urls)
from charlm.data.text import read_text
from charlm.data.transfer import public_url
from charlm.errors import CharlmError, UsageError, warn

DEFAULT_CORPUS = "timemachine"
FALLBACK_CORPUS = "python-docs"

# Extra keyword arguments for every download started here (tests shorten timeouts and back-off).
DOWNLOAD_OPTIONS: dict = {}


@dataclass(frozen=True)
class CorpusText:
    name: str  # "timemachine", "python-docs", file stem(s), or URL basename
    text: str
    preprocessing: str  # default preprocessing: "d2l" for timemachine, "raw" elsewhere
    sample_prefix: str  # default prompt for samples ("time traveller" for timemachine)
    source: str  # path(s) or URL, for messages and the saved run config


@dataclass(frozen=True)
class Entry:
    """One named corpus of charlm/data/corpora.toml."""

    name: str
    description: str
    preprocessing: str
    sample_prefix: str
    urls: tuple[str, ...] = ()
    sha1: str | None = None
    sha256: str | None = None
    md5: str | None = None
    size: int | None = None  # bytes
    filename: str | None = None
    archive: str | None = None  # the urls give this zip, which holds `filename`
    builtin: bool = False  # made from the standard library, never downloaded
    val_fraction: float = 0.1  # the corpus's own split: --val-fraction / --test-fraction
    test_fraction: float = 0.0

    @property
    def hashes(self) -> dict[str, str | None]:
        return {"md5": self.md5, "sha1": self.sha1, "sha256": self.sha256}


@functools.cache
def registry() -> dict[str, Entry]:
    """The named corpora of charlm/data/corpora.toml, by name."""
    table = tomllib.loads(resources.files("charlm.data").joinpath("corpora.toml").read_text("utf-8"))
    entries = {}
    for name, fields in table.items():
        hashes = fields.pop("hashes", {})
        fields["urls"] = tuple(fields.get("urls", ()))
        entries[name] = Entry(name=name, sha1=hashes.get("sha1"), sha256=hashes.get("sha256"),
                              md5=hashes.get("md5"), **fields)
    return entries


def corpus_names() -> list[str]:
    return sorted(registry())


def entry(name: str, otherwise: str = "or give a text file or URL") -> Entry:
    """The registry entry `name`, or a UsageError that lists the known names and, `otherwise`,
    what else the command takes."""
    try:
        return registry()[name]
    except KeyError:
        raise UsageError(
            f"unknown corpus {name!r}: choose one of {', '.join(corpus_names())}"
            + (f", {otherwise}" if otherwise else "") + Rule(choices=tuple(corpus_names())).hint(name)
        ) from None


def cache_dir(data_dir: Path | None = None) -> Path:
    """`data_dir`, else $CHARLM_DATA_DIR, else $XDG_CACHE_HOME/charlm, else ~/.cache/charlm."""
    if data_dir is not None:
        return Path(data_dir).expanduser()
    if os.environ.get("CHARLM_DATA_DIR"):
        return Path(os.environ["CHARLM_DATA_DIR"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "charlm"


def cached_path(e: Entry, data_dir: Path | None = None) -> Path:
    """Where the cache holds (or would hold) the file of a downloadable corpus."""
    return cache_dir(data_dir) / e.filename


def is_cached(e: Entry, data_dir: Path | None = None) -> bool:
    """True when the corpus's file is in the cache and matches its pinned size and checksums."""
    path = cached_path(e, data_dir)
    return (path.is_file() and (e.size is None or path.stat().st_size == e.size)
            and checksum_mismatch(path, **e.hashes) is None)


def _fetch(e: Entry, data_dir: Path | None, progress: bool, network: dict | None = None) -> Path:
    if is_cached(e, data_dir):
        return cached_path(e, data_dir)
    try:
        if e.archive:
            return _fetch_archive(e, data_dir, progress, network)
        return download(
            [*mirror_urls(e.filename), *e.urls], cached_path(e, data_dir),
            sha1=e.sha1, sha256=e.sha256, size=e.size, progress=progress,
            **{**DOWNLOAD_OPTIONS, **(network or {})},
        )
    except DownloadError as exc:
        mirror = os.environ.get("CHARLM_MIRROR", "").strip()
        where = (f"check that CHARLM_MIRROR ({mirror}) holds {e.archive or e.filename}" if mirror
                 else "set CHARLM_MIRROR to a mirror URL or directory")
        raise DownloadError(
            f"{exc}; {where}, or add a copy you have with 'charlm data add {e.name} FILE'"
        ) from None


def _fetch_archive(e: Entry, data_dir: Path | None, progress: bool,
                   network: dict | None = None) -> Path:
    """Download the corpus's zip (unless an earlier run left it whole), then take the file out;
    the zip goes once the file is in place, or when it turns out damaged.

    The whole of it holds the lock on the corpus's file: a second process waits, then finds the
    file in place, instead of unpacking the zip while the first one unpacks (and deletes) it."""
    dest, zipped = cached_path(e, data_dir), cache_dir(data_dir) / e.archive
    with exclusive(dest):
        if is_cached(e, data_dir):
            return dest  # another process fetched it while this one waited
        if not zipped.is_file():
            download([*mirror_urls(e.archive), *e.urls], zipped, progress=progress,
                     **{**DOWNLOAD_OPTIONS, **(network or {})})
        try:
            path = archive.extract(zipped, e.filename, dest, size=e.size, **e.hashes)
        except CharlmError as exc:
            if not str(exc).startswith("cannot write"):  # a full disk is not the archive's fault
                zipped.unlink(missing_ok=True)
            raise
        zipped.unlink(missing_ok=True)
        return path


def fetch(name: str, data_dir: Path | None = None, progress: bool = True) -> Path:
    """The verified cached file of a named corpus, downloaded first (CHARLM_MIRROR first) if needed."""
    e = entry(name, "")
    if e.builtin:
        raise UsageError(f"{name} is built into Python; there is nothing to download")
    return _fetch(e, data_dir, progress)


def add(name: str, file: Path, data_dir: Path | None = None) -> Path:
    """Put a copy of a named corpus's file into the cache, if it matches the pinned checksums."""
    e = entry(name, "")
    if e.builtin:
        raise UsageError(f"{name} is built into Python; there is nothing to add")
    file = Path(file)
    if not file.is_file():
        what = f"{e.archive} or {e.filename}" if e.archive else e.filename
        raise CharlmError(f"{file} is not a file; give the path of your copy of {what}")
    if e.archive:
        return archive.install(file, e.filename, cached_path(e, data_dir), size=e.size, **e.hashes)
    return install(file, cached_path(e, data_dir), sha1=e.sha1, sha256=e.sha256)


def python_docs_text() -> str:
    """The standard library's pydoc topics, one blank line between topics: offline, ~465K chars."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key].rstrip("\n") for key in sorted(topics)) + "\n"


def _first_word(text: str) -> str:
    """A sample prompt for a corpus without one: its first word, which the vocabulary surely has."""
    words = text.split(maxsplit=1)
    return words[0][:20] if words else text[:1]


def _first_word_of(files: tuple[Path, ...]) -> str:
    """`_first_word` of the files' text, reading no more of it than needed (at most 1 MiB).

    The bytes need not be UTF-8: --preprocessing bytes takes any byte but NUL, so the word ends
    before a byte that does not decode (it stays a prefix of the text). The modes that read text
    refuse such a file when they read it, wherever its first bad byte is."""
    decoder = codecs.getincrementaldecoder("utf-8")("replace")
    head = ""
    for piece in stream.byte_chunks(files, block=1 << 16):
        head += decoder.decode(piece)
        if len(head.split(maxsplit=1)) > 1 or len(head) >= 1 << 20:  # the first word is whole
            break
    return _first_word(head).partition("\ufffd")[0]


@dataclass(frozen=True)
class CorpusSource:
    """Where a corpus's text is, unread (files to stream, or a built-in text), and its defaults."""

    name: str
    preprocessing: str
    sample_prefix: str
    source: str  # path(s) or URL, for messages and the saved run config
    files: tuple[Path, ...] = ()
    text: str | None = None  # a built-in corpus's text
    val_fraction: float = 0.1
    test_fraction: float = 0.0

    def chunks(self, mode: str, block: int = stream.BLOCK):
        """The preprocessed text in pieces (charlm.data.stream.chunks)."""
        return stream.chunks(mode, self.files, self.text, block=block)

    def capacity(self) -> int:
        """An upper bound on its tokens in any preprocessing mode."""
        return stream.capacity(self.files, self.text)

    def read(self) -> CorpusText:
        """The whole text in memory (small corpora, tests)."""
        text = self.text if self.text is not None else "\n".join(read_text(p) for p in self.files)
        return CorpusText(self.name, text, self.preprocessing, self.sample_prefix, self.source)


def _from_entry(e: Entry, data_dir: Path | None, progress: bool,
                network: dict | None = None) -> CorpusSource:
    splits = {"val_fraction": e.val_fraction, "test_fraction": e.test_fraction}
    if e.builtin:
        return CorpusSource(e.name, e.preprocessing, e.sample_prefix, "pydoc_data.topics",
                            text=python_docs_text(), **splits)
    path = _fetch(e, data_dir, progress, network)
    return CorpusSource(e.name, e.preprocessing, e.sample_prefix, str(path), (path,), **splits)


def _from_files(paths: list[Path]) -> CorpusSource:
    files = tuple(Path(p) for p in paths)
    name, source = "+".join(p.stem for p in files), ", ".join(str(p) for p in paths)
    if not all(_is_regular(p) for p in files):  # a pipe or a device: read now, whole but capped
        text = "\n".join(read_text(p) for p in files)  # (read_text's STREAM_LIMIT), NUL refused
        return CorpusSource(name, "raw", _first_word(text), source, text=text)
    for path in files:
        stream.check_file(path)
    return CorpusSource(name, "raw", _first_word_of(files), source, files)


def _is_regular(path: Path) -> bool:
    """A regular file, or a path `stream.check_file` will explain (missing, a folder...)."""
    try:
        mode = path.stat().st_mode
    except OSError:
        return True
    return stat.S_ISREG(mode) or stat.S_ISDIR(mode)


def _from_url(url: str, sha256: str | None, data_dir: Path | None, progress: bool,
              network: dict | None = None, preprocessing: str | None = None) -> CorpusSource:
    shown = public_url(url)  # what messages, configs and checkpoints hold: no user:password@
    try:
        parsed = urlparse(url)
    except ValueError:
        parsed = None
    if parsed is None or parsed.scheme not in ("http", "https", "file"):
        raise UsageError(f"--url takes an http, https or file URL, not {shown!r}")
    basename = re.sub(r"[^\w.-]", "_", PurePosixPath(unquote(parsed.path)).name)[:100] or "download"
    key = hashlib.sha256(shown.encode("utf-8", "surrogateescape")).hexdigest()[:16]
    path = cache_dir(data_dir) / "urls" / f"{key}-{basename}"
    if not (path.is_file() and checksum_mismatch(path, sha256=sha256) is None):
        download([url], path, sha256=sha256, progress=progress, name=basename,
                 **{**DOWNLOAD_OPTIONS, **(network or {})})
    # all of it UTF-8 text (or, for --preprocessing bytes, free of NUL)? streamed, nothing kept
    reader = stream.byte_chunks if preprocessing == "bytes" else stream.raw_chunks
    try:
        for _ in reader((path,)):
            pass
    except CharlmError as exc:
        path.unlink()  # not text: do not keep it in the cache
        raise CharlmError(f"the file at {shown} is unusable: {exc}") from None
    return CorpusSource(basename, "raw", _first_word_of((path,)), shown, (path,))


def check_source(name: str | None, texts, url: str | None, sha256: str | None) -> None:
    """At most one source of text, a corpus name that is registered, and --sha256 only with
    --url."""
    given = [what for what, value in (("a corpus name", name), ("--text", texts), ("--url", url)) if value]
    if len(given) > 1:
        raise UsageError(f"give one corpus source, not {' and '.join(given)}")
    if name:
        entry(name)
    if sha256 and not url:
        raise UsageError("--sha256 checks a --url download; give --url too")
    if sha256 and not re.fullmatch(r"[0-9A-Fa-f]{64}", sha256):
        raise UsageError(f"--sha256 must be 64 hexadecimal digits (as sha256sum prints them), "
                         f"got {sha256!r}")


def locate_corpus(
    name: str | None = None,
    *,
    texts: list[Path] | None = None,
    url: str | None = None,
    sha256: str | None = None,
    data_dir: Path | None = None,
    progress: bool = True,
    network: dict | None = None,
    preprocessing: str | None = None,
) -> CorpusSource:
    """Where the text to train on is: a named corpus, local UTF-8 files (joined by newlines), or a
    URL; downloaded first if need be, but not read.

    With none of them, `timemachine`; if that is neither cached nor downloadable, the built-in
    `python-docs`, with one warning line on stderr. A corpus named explicitly never falls back.
    `network`: keywords for `download` (deadline, min_rate). `preprocessing` "bytes" keeps a
    URL's file that is not UTF-8 (any byte but NUL is taken); other modes refuse it.
    """
    check_source(name, texts, url, sha256)
    if texts:
        return _from_files(list(texts))
    if url:
        return _from_url(url, sha256, data_dir, progress, network, preprocessing)
    if name:
        return _from_entry(entry(name), data_dir, progress, network)
    try:
        return _from_entry(entry(DEFAULT_CORPUS), data_dir, progress, network)
    except DownloadError as exc:
        warn(
            f"{DEFAULT_CORPUS} is not cached and cannot be downloaded, so the built-in "
            f"{FALLBACK_CORPUS} corpus is used instead: a model trained on it writes Python's "
            "documentation, not The Time Machine, whatever the prompt ('time traveller' too) "
            f"({exc})"
        )
        return _from_entry(entry(FALLBACK_CORPUS), data_dir, progress)


def load_corpus(name: str | None = None, **where) -> CorpusText:
    """`locate_corpus(...)`, read into memory whole."""
    return locate_corpus(name, **where).read()


def default_fractions(name: str | None, texts=None, url: str | None = None) -> tuple[float, float]:
    """(val_fraction, test_fraction) a corpus gets when the run does not set them: a named
    corpus's own (enwik8, text8: the standard 90/5/5 split), else 0.1 and 0."""
    if name and not texts and not url and name in registry():
        e = registry()[name]
        return e.val_fraction, e.test_fraction
    return 0.1, 0.0
