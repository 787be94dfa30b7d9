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
