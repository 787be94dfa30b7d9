"""The version and the distribution's name, readable from every layer without importing the
package's public API."""

__version__ = "0.1.0"

# What pip calls charlm (pyproject.toml's project.name): `charlm` on PyPI is an unrelated
# library, so a message that names an extra names this distribution, never plain charlm.
DISTRIBUTION = "charlm-rnn"


def install_extra(extra: str) -> str:
    """The command that installs an optional extra, e.g. pip install 'charlm-rnn[plot]'."""
    return f"pip install '{DISTRIBUTION}[{extra}]'"
