"""The docs stay whole: every command charlm has is shown in the README, and every link to a
section (`[text](#anchor)`, `[text](FILE.md#anchor)`) in README.md and docs/ names a heading that
exists. (A merge once dropped the README's "Sharing a model" section, export's only user
documentation, and left a link to it that led nowhere.)"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import typer

from charlm.cli.app import app

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]*?)#([^)\s]+)\)")


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lowercased, punctuation but '-' and '_' dropped, spaces
    as '-'."""
    text = re.sub(r"[`*]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", path.read_text(encoding="utf-8"), flags=re.S)
    return {slug(m) for m in re.findall(r"^#{1,6} (.+)$", text, flags=re.M)}


def commands() -> list[str]:
    found = []

    def walk(group, words: list[str]) -> None:
        for name, command in group.commands.items():
            if hasattr(command, "commands"):  # a group (typer's own click)
                walk(command, [*words, name])
            else:
                found.append(" ".join([*words, name]))

    walk(typer.main.get_command(app), [])
    return sorted(found)


def test_the_slug_is_githubs():
    assert slug("Preprocessing, vocabulary and splits") == "preprocessing-vocabulary-and-splits"
    assert slug("Implementations (`--impl`)") == "implementations---impl"
    assert slug("GPU (`scripts/gpu_check.sh`, issue 15)") == "gpu-scriptsgpu_checksh-issue-15"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_section_link_names_a_heading(doc):
    broken = []
    for target, anchor in LINK.findall(doc.read_text(encoding="utf-8")):
        if target.startswith("http"):
            continue
        where = (doc.parent / target) if target else doc
        if anchor not in anchors(where):
            broken.append(f"{target}#{anchor}")
    assert broken == []


def test_the_readme_shows_every_command():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    listed = commands()
    assert {"train", "generate", "eval perplexity", "export", "plot"} <= set(listed)
    assert [c for c in listed if f"charlm {c}" not in readme] == []


def test_the_readme_says_once_where_files_go_as_the_code_puts_them(monkeypatch, tmp_path):
    """One table says where the caches and runs are; the code puts them there, and no other
    line of the README gives a cache's path another way."""
    from charlm.artifacts.rundir import runs_root
    from charlm.data.corpus import cache_dir
    from charlm.model.ckernel import kernel_dir

    readme = (REPO / "README.md").read_text(encoding="utf-8")
    rows = {
        "corpora (downloaded, added, unpacked)": "`--data-dir`, else `$CHARLM_DATA_DIR`, else "
        "`$XDG_CACHE_HOME/charlm`, else `~/.cache/charlm`",
        "the fast GRU's compiled C loops": "`$CHARLM_KERNEL_DIR`, else "
        "`$XDG_CACHE_HOME/charlm/kernels`, else `~/.cache/charlm/kernels`",
        "runs (and `latest`)": "`--out`, else a new folder in `$CHARLM_RUNS_DIR`, else in `./runs`",
    }
    for what, where in rows.items():
        assert f"\n| {what} | {where} |\n" in readme, what
    elsewhere = [line for line in readme.splitlines() if re.search(r"XDG_CACHE_HOME|~/\.cache", line)
                 and not line.startswith(("| corpora", "| the fast", "| `--data-dir`"))]
    assert elsewhere == []  # (`--data-dir` is the options table's row, made from the code)
    home = Path.home()
    for name in ("CHARLM_DATA_DIR", "CHARLM_KERNEL_DIR", "CHARLM_RUNS_DIR", "XDG_CACHE_HOME"):
        monkeypatch.delenv(name, raising=False)
    assert (cache_dir(), kernel_dir(), runs_root()) == (
        home / ".cache" / "charlm", home / ".cache" / "charlm" / "kernels", Path("runs"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert (cache_dir(), kernel_dir()) == (tmp_path / "xdg" / "charlm",
                                           tmp_path / "xdg" / "charlm" / "kernels")
    for name in ("CHARLM_DATA_DIR", "CHARLM_KERNEL_DIR", "CHARLM_RUNS_DIR"):
        monkeypatch.setenv(name, str(tmp_path / name))
    assert (cache_dir(), kernel_dir(), runs_root()) == (
        tmp_path / "CHARLM_DATA_DIR", tmp_path / "CHARLM_KERNEL_DIR", tmp_path / "CHARLM_RUNS_DIR")
    assert cache_dir(tmp_path / "given") == tmp_path / "given"


def test_the_char_rnn_and_d2l_table_names_real_options():
    """Every charlm option the 'Coming from char-rnn or d2l' table names is one that charlm's
    train, generate or eval perplexity takes."""
    import click

    readme = (REPO / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Coming from char-rnn or d2l", 1)[1].split("\n## ", 1)[0]
    named = set()
    for row in section.splitlines():
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", row)[1:-1]]  # `a\|b` is one cell
        if len(cells) == 4 and cells[2] not in ("charlm", "---"):
            named |= set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*|-[a-z])\b", cells[2]))
    root = typer.main.get_command(app)
    ctx = click.Context(root)
    taken = set()
    for path in (["train"], ["generate"], ["eval", "perplexity"]):
        command = root
        for word in path:
            command = command.get_command(ctx, word)
        for param in command.params:
            taken |= {o.split("/")[0] for o in (*param.opts, *param.secondary_opts)}
    assert len(named) >= 20
    assert sorted(named - taken) == []
