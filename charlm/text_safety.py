"""Text that a peer or a file controls, made safe to print on one terminal line.

A server's reason phrase, a header, a file name inside an archive, a value read from a config
file: any of them may hold escape sequences (ESC ] 0 ; title BEL sets the terminal's title,
ESC [ 2 J clears the screen) or be megabytes long. `shown` writes every control character
(C0, DEL, C1, and the bidirectional overrides that reorder what a line seems to say) as a
visible escape such as \\x1b, so the terminal prints it instead of obeying it, and cuts what
remains to `limit` characters. `one_line` does the same for a whole message (errors.warn, the
CLI's error line), with a larger limit.

This module is the lowest layer: it imports nothing of charlm.
"""

from __future__ import annotations

import re

LIMIT = 200  # characters of one value a message quotes
LINE_LIMIT = 2000  # characters of a whole message line
ELLIPSIS = "..."

# C0 (tab and newline included: a value is quoted on one line), DEL, C1; the bidirectional
# embeddings, overrides and isolates; and the surrogate-escaped bytes 0x80-0x9f (a file name
# that is not UTF-8, written back as raw bytes a terminal may read as C1 controls)
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069"
                      "\udc80-\udc9f]")


def _escape(match: re.Match) -> str:
    code = ord(match.group())
    if 0xDC80 <= code <= 0xDC9F:
        code -= 0xDC00
    return f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}"


def _text(value: object) -> str:
    if isinstance(value, str):
        return value
    try:
        return str(value)
    except ValueError:  # an int of more than sys.get_int_max_str_digits() digits
        return f"<{type(value).__name__} too large to show>"


def shown(value: object, limit: int = LIMIT) -> str:
    """`value` as text with its control characters escaped, at most `limit` characters (the
    end cut off and marked with '...')."""
    text = _text(value)
    if len(text) > 4 * limit:  # escaping can only lengthen it: cut the megabytes away first
        text = text[: 4 * limit]
        cut = True
    else:
        cut = False
    text = _CONTROL.sub(_escape, text)
    if cut or len(text) > limit:
        text = text[: max(0, limit - len(ELLIPSIS))] + ELLIPSIS
    return text


def one_line(message: object, limit: int = LINE_LIMIT) -> str:
    """A whole message on one line: runs of white space become one space, then `shown`."""
    text = _text(message)
    if len(text) > 4 * limit:
        text = text[: 4 * limit] + ELLIPSIS
    return shown(" ".join(text.split()), limit)


def quoted(value: object, limit: int = LIMIT) -> str:
    """repr(value) (a string in quotes), cut to `limit` characters like `shown`."""
    if isinstance(value, str):
        return shown(repr(value[: 4 * limit]), limit)
    if isinstance(value, (list, tuple, dict, set)) and len(value) > limit:
        return f"<{type(value).__name__} of {len(value):,} items>"
    try:
        return shown(repr(value), limit)
    except (ValueError, RecursionError):
        return f"<{type(value).__name__} too large to show>"
