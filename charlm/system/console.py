"""The consoles every command prints through (rich), with two promises kept in one place:

* What a user gave is printed literally: paths, corpus names, prefixes and samples are never
  read as rich markup, so `--text 'notes[v2].txt'` shows as `notes[v2].txt` and
  `--out '/tmp/exp[/1]'` cannot break a table. (Styles come from rich objects, never from
  markup inside strings.)
* Output that is not a terminal (`charlm train | tee log`, a file, CI) is never wrapped: a line
  is as long as its content, so a path, a sample or "625,564 parameters" stays on one line and
  greps whole. A terminal wraps at its own width, as usual.

A closed pipe (`charlm data list | head -1`) is raised as BrokenPipeError for the command line
to end normally (rich's own answer is a silent exit 1).
"""

from __future__ import annotations

import errno

from rich.console import Console

# Rich lays out for a fixed width; off a terminal, one wide enough that nothing real wraps
# (tables still take only the width their content needs).
UNWRAPPED_WIDTH = 1 << 15


class _Console(Console):
    def on_broken_pipe(self) -> None:
        self.quiet = True  # nothing more to say to a reader that left
        raise BrokenPipeError(errno.EPIPE, "Broken pipe")


def console(stderr: bool = False, file=None) -> Console:
    """A console on stdout (or stderr, or `file`) that prints strings literally and, off a
    terminal, unwrapped."""
    out = _Console(stderr=stderr, file=file, markup=False, highlight=False, soft_wrap=True,
                  emoji=False)
    if not out.is_terminal:
        out.width = UNWRAPPED_WIDTH
    return out
