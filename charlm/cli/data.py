"""`charlm data ...`: list, download, add and inspect corpora."""

from __future__ import annotations

import json
import os
from pathlib import Path

import typer
from rich.table import Table

from charlm.data import corpus
from charlm.system.console import console

DataDir = typer.Option(
    None, "--data-dir",
    help="Corpus cache folder (default: $CHARLM_DATA_DIR, else $XDG_CACHE_HOME/charlm or ~/.cache/charlm).",
)
AsJson = typer.Option(False, "--json", help="Print JSON instead of a table.")
Name = typer.Argument(..., help="A corpus name, as 'charlm data list' shows.")


def _print_json(value) -> None:
    typer.echo(json.dumps(value, indent=2, ensure_ascii=False))


def data_list(data_dir: Path | None = DataDir, as_json: bool = AsJson) -> None:
    """List the named corpora, their sizes and whether they are cached.

    Example: charlm data list --json
    """
    rows = []
    for name in corpus.corpus_names():
        e = corpus.entry(name, "")
        if e.builtin:
            size, path, status = len(corpus.python_docs_text().encode()), None, "built in"
        else:
            path = corpus.cached_path(e, data_dir)
            status = "yes" if corpus.is_cached(e, data_dir) else "bad checksum" if path.exists() else "no"
            size = e.size
        rows.append({
            "name": name, "description": e.description, "bytes": size,
            "cached": status in ("yes", "built in"), "status": status, "path": str(path) if path else None,
            "urls": list(e.urls),
        })
    if as_json:
        _print_json({"cache_dir": str(corpus.cache_dir(data_dir)), "corpora": rows})
        return
    table = Table("name", "bytes", "cached", "description")
    for row in rows:
        table.add_row(row["name"], f"{row['bytes']:,}", row["status"], row["description"])
    out = console()
    out.print(table)
    out.print(f"cache: {corpus.cache_dir(data_dir)}")


def data_download(name: str = Name, data_dir: Path | None = DataDir) -> None:
    """Download a named corpus into the cache (from CHARLM_MIRROR first) and verify its checksum.

    Example: charlm data download tinyshakespeare
    """
    e = corpus.entry(name, "")
    if not e.builtin and corpus.is_cached(e, data_dir):
        typer.echo(f"{name} is already cached and verified: {corpus.cached_path(e, data_dir)}")
        return
    path = corpus.fetch(name, data_dir)
    typer.echo(f"downloaded {name} to {path} (checksum verified)")


def data_add(
    name: str = Name,
    file: Path = typer.Argument(..., help="Your copy of the corpus's file."),
    data_dir: Path | None = DataDir,
) -> None:
    """Copy a file you already have into the cache as a named corpus, if its checksum matches.

    Example: charlm data add timemachine ~/Downloads/timemachine.txt
    """
    path = corpus.add(name, file, data_dir)
    typer.echo(f"added {name}: {path} (checksum verified)")


def _load(spec: str | None, data_dir: Path | None) -> corpus.CorpusSource:
    """A name when it is one; a path when it exists or looks like one; else the unknown-name error."""
    if spec is None or spec in corpus.corpus_names():
        return corpus.locate_corpus(spec, data_dir=data_dir)
    if os.sep in spec or Path(spec).suffix or Path(spec).exists():
        return corpus.locate_corpus(texts=[Path(spec)])
    corpus.entry(spec, "or give the path of a text file")  # the error listing the names
    raise AssertionError("unreachable")


def corpus_stats(c: corpus.CorpusSource, top: int = 10) -> dict:
    """Size, most frequent symbols, and vocabulary size (symbols + <unk>) per preprocessing mode,
    counted in one streamed pass (a 1 GB file is never held whole)."""
    from charlm.data.encode import SymbolCounter  # torch: only when needed
    from charlm.data.stream import Preprocessor, raw_chunks
    from charlm.data.text import PREPROCESSING
    from charlm.data.vocab import Vocab

    counters = {mode: SymbolCounter() for mode in PREPROCESSING}
    steps = {mode: Preprocessor(mode) for mode in ("d2l", "lower")}
    characters = 0
    for piece in raw_chunks(c.files, c.text):
        characters += len(piece)
        counters["raw"].add(piece)
        counters["bytes"].add(piece.encode("utf-8", "surrogatepass"))
        for mode, step in steps.items():
            counters[mode].add(step.feed(piece))
    for mode, step in steps.items():
        counters[mode].add(step.flush())
    vocabs = {mode: counter.vocab() for mode, counter in counters.items()}
    vocabs["bytes"] = Vocab.of_bytes(counters["bytes"].counts)  # every byte, seen or not
    raw = vocabs["raw"]  # most frequent first
    return {
        "name": c.name,
        "source": c.source,
        "characters": characters,
        "distinct_symbols": len(raw) - 1,
        "top_symbols": [[s, n] for s, n in zip(raw.tokens[1 : top + 1], raw.counts[1 : top + 1])],
        "vocab_size": {mode: len(v) for mode, v in vocabs.items()},
        "preprocessing": c.preprocessing,
        "sample_prefix": c.sample_prefix,
    }


def data_info(
    spec: str | None = typer.Argument(
        None, metavar="NAME|PATH",
        help="A corpus name or a UTF-8 text file (default: timemachine, else python-docs).",
    ),
    data_dir: Path | None = DataDir,
    as_json: bool = AsJson,
) -> None:
    """Show a corpus's size, its most frequent symbols and its vocabulary size per preprocessing.

    Example: charlm data info tinyshakespeare
    """
    stats = corpus_stats(_load(spec, data_dir))
    if as_json:
        _print_json(stats)
        return
    n = stats["characters"]
    summary = {
        "corpus": stats["name"],
        "source": stats["source"],
        "characters": f"{n:,}",
        "distinct symbols": f"{stats['distinct_symbols']:,}",
        "vocab size": ", ".join(f"{mode} {size}" for mode, size in stats["vocab_size"].items())
        + "  (symbols + <unk>)",
        "defaults": f"preprocessing {stats['preprocessing']}, sample prefix {stats['sample_prefix']!r}",
    }
    for label, value in summary.items():  # plain lines: long paths must not wrap
        typer.echo(f"{label:<18}{value}")
    symbols = Table("symbol", "count", "share", title=f"top {len(stats['top_symbols'])} symbols")
    for symbol, count in stats["top_symbols"]:
        symbols.add_row(repr(symbol), f"{count:,}", f"{count / n:.1%}")
    console().print(symbols)
