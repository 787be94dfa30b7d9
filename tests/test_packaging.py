"""The distribution's name is one fact: pip knows charlm as `charlm-rnn` (`charlm` on PyPI is an
unrelated library), so nothing may tell a user to `pip install 'charlm[...]'`; the README's
wheel is the one `python -m build` makes of this version (scripts/smoke.sh builds and installs
it)."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from charlm.about import __version__
from charlm.about import DISTRIBUTION, install_extra

REPO = Path(__file__).resolve().parents[1]


def test_the_distribution_name_is_pyprojects():
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    assert (project["name"], project["version"]) == (DISTRIBUTION, __version__) == (
        "charlm-rnn", __version__)
    assert install_extra("plot") == "pip install 'charlm-rnn[plot]'"


def test_nothing_tells_a_user_to_install_the_other_charlm():
    texts = [REPO / "README.md", *(REPO / "docs").glob("*.md"), *(REPO / "charlm").rglob("*.py"),
             *(REPO / "scripts").glob("*.*")]
    wrong = {str(p.relative_to(REPO)) for p in texts
             if re.search(r"install[^\n]{0,40}\bcharlm\[", p.read_text(encoding="utf-8"))}
    assert wrong == set()


def test_the_readme_installs_the_wheel_of_this_version():
    wheel = f"dist/{DISTRIBUTION.replace('-', '_')}-{__version__}-py3-none-any.whl"
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert f"python3 -m pip install {wheel}" in readme
