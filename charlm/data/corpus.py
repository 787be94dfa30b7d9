"""Corpora by name, by local file or by URL, and the cache that holds the downloaded ones.

The cache is one flat folder (see `cache_dir`):

    <cache>/timemachine.txt            named corpora, under the registry's `filename`
    <cache>/tinyshakespeare.txt
    <cache>/urls/<sha256(url)[:16]>-<basename>   --url downloads
    <cache>/<filename>.part            an unfinished download, resumed by the next one
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import tomllib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path, PurePosixPath
from urllib.parse import unquote, urlparse

from charlm.data.download import DownloadError, checksum_mismatch, download, install, mirror_urls
from charlm.data.text import read_text
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
    size: int | None = None  # bytes
    filename: str | None = None
    builtin: bool = False  # made from the standard library, never downloaded


@functools.cache
def registry() -> dict[str, Entry]:
    """The named corpora of charlm/data/corpora.toml, by name."""
    table = tomllib.loads(resources.files("charlm.data").joinpath("corpora.toml").read_text("utf-8"))
    entries = {}
    for name, fields in table.items():
        hashes = fields.pop("hashes", {})
        fields["urls"] = tuple(fields.get("urls", ()))
        entries[name] = Entry(name=name, sha1=hashes.get("sha1"), sha256=hashes.get("sha256"), **fields)
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
            + (f", {otherwise}" if otherwise else "")
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
    """True when the corpus's file is in the cache and matches its pinned checksums."""
    path = cached_path(e, data_dir)
    return path.is_file() and checksum_mismatch(path, sha1=e.sha1, sha256=e.sha256) is None


def _fetch(e: Entry, data_dir: Path | None, progress: bool) -> Path:
    if is_cached(e, data_dir):
        return cached_path(e, data_dir)
    try:
        return download(
            [*mirror_urls(e.filename), *e.urls], cached_path(e, data_dir),
            sha1=e.sha1, sha256=e.sha256, progress=progress, **DOWNLOAD_OPTIONS,
        )
    except DownloadError as exc:
        mirror = os.environ.get("CHARLM_MIRROR", "").strip()
        where = (f"check that CHARLM_MIRROR ({mirror}) holds {e.filename}" if mirror
                 else "set CHARLM_MIRROR to a mirror URL or directory")
        raise DownloadError(
            f"{exc}; {where}, or add a copy you have with 'charlm data add {e.name} FILE'"
        ) from None


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
        raise CharlmError(f"{file} is not a file; give the path of your copy of {e.filename}")
    return install(file, cached_path(e, data_dir), sha1=e.sha1, sha256=e.sha256)


def python_docs_text() -> str:
    """The standard library's pydoc topics, one blank line between topics: offline, ~465K chars."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key].rstrip("\n") for key in sorted(topics)) + "\n"


def _first_word(text: str) -> str:
    """A sample prompt for a corpus without one: its first word, which the vocabulary surely has."""
    words = text.split(maxsplit=1)
    return words[0][:20] if words else text[:1]


def _from_entry(e: Entry, data_dir: Path | None, progress: bool) -> CorpusText:
    if e.builtin:
        text, source = python_docs_text(), "pydoc_data.topics"
    else:
        path = _fetch(e, data_dir, progress)
        text, source = read_text(path), str(path)
    return CorpusText(e.name, text, e.preprocessing, e.sample_prefix, source)


def _from_files(paths: list[Path]) -> CorpusText:
    text = "\n".join(read_text(p) for p in paths)
    name = "+".join(Path(p).stem for p in paths)
    return CorpusText(name, text, "raw", _first_word(text), ", ".join(str(p) for p in paths))


def _from_url(url: str, sha256: str | None, data_dir: Path | None, progress: bool) -> CorpusText:
    parsed = urlparse(url)
    if parsed.scheme not in ("http", "https", "file"):
        raise UsageError(f"--url takes an http, https or file URL, not {url!r}")
    basename = re.sub(r"[^\w.-]", "_", PurePosixPath(unquote(parsed.path)).name) or "download"
    path = cache_dir(data_dir) / "urls" / f"{hashlib.sha256(url.encode()).hexdigest()[:16]}-{basename}"
    if not (path.is_file() and checksum_mismatch(path, sha256=sha256) is None):
        download([url], path, sha256=sha256, progress=progress, name=basename,
                 **DOWNLOAD_OPTIONS)
    try:
        text = read_text(path)
    except CharlmError as exc:
        path.unlink()  # not text: do not keep it in the cache
        raise CharlmError(f"the file at {url} is unusable: {exc}") from None
    return CorpusText(basename, text, "raw", _first_word(text), url)


def check_source(name: str | None, texts, url: str | None, sha256: str | None) -> None:
    """At most one source of text, and --sha256 only with --url."""
    given = [what for what, value in (("a corpus name", name), ("--text", texts), ("--url", url)) if value]
    if len(given) > 1:
        raise UsageError(f"give one corpus source, not {' and '.join(given)}")
    if sha256 and not url:
        raise UsageError("--sha256 checks a --url download; give --url too")
    if sha256 and not re.fullmatch(r"[0-9A-Fa-f]{64}", sha256):
        raise UsageError(f"--sha256 must be 64 hexadecimal digits (as sha256sum prints them), "
                         f"got {sha256!r}")


def load_corpus(
    name: str | None = None,
    *,
    texts: list[Path] | None = None,
    url: str | None = None,
    sha256: str | None = None,
    data_dir: Path | None = None,
    progress: bool = True,
) -> CorpusText:
    """The text to train on: a named corpus, local UTF-8 files (joined by newlines), or a URL.

    With none of them, `timemachine`; if that is neither cached nor downloadable, the built-in
    `python-docs`, with one warning line on stderr. A corpus named explicitly never falls back.
    """
    check_source(name, texts, url, sha256)
    if texts:
        return _from_files(list(texts))
    if url:
        return _from_url(url, sha256, data_dir, progress)
    if name:
        return _from_entry(entry(name), data_dir, progress)
    try:
        return _from_entry(entry(DEFAULT_CORPUS), data_dir, progress)
    except DownloadError as exc:
        warn(
            f"{DEFAULT_CORPUS} is not cached and cannot be downloaded, so the built-in "
            f"{FALLBACK_CORPUS} corpus is used instead ({exc})"
        )
        return _from_entry(entry(FALLBACK_CORPUS), data_dir, progress)
