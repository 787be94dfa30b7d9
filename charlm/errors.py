"""Errors a user can fix. The CLI prints them as one line and exits non-zero, no traceback."""


class CharlmError(Exception):
    """A problem with the user's input, files or environment: message says what and what to do."""

    exit_code = 1


class UsageError(CharlmError):
    """A bad option value or combination (exit code 2, like a command-line usage error)."""

    exit_code = 2
