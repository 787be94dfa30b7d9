"""Errors a user can fix, and warnings a user should see.

The CLI prints an error as one line (`charlm: error: ...`) and exits non-zero, no traceback; a
warning is one line on stderr (`charlm: warning: ...`) and the command goes on.
"""

import sys

from charlm.text_safety import one_line


class CharlmError(Exception):
    """A problem with the user's input, files or environment: message says what and what to do."""

    exit_code = 1


class UsageError(CharlmError):
    """A bad option value or combination (exit code 2, like a command-line usage error)."""

    exit_code = 2


def warn(message: str) -> None:
    """One warning line on stderr, printed literally (no markup, no wrapping)."""
    message = one_line(message)  # control characters a file or a peer put there, escaped
    sys.stderr.write(f"charlm: warning: {message}\n")
    sys.stderr.flush()
