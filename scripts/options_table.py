"""Print the README's table of `charlm train` options, made from their one declaration
(charlm/config/train.py); `--write` puts it into README.md between its markers.

    python scripts/options_table.py            # print it
    python scripts/options_table.py --write    # update README.md (tests/config/test_config.py checks it)
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from charlm.config.file import options_markdown

README = Path(__file__).resolve().parents[1] / "README.md"
MARKERS = re.compile(r"(<!-- options:start -->\n).*?(<!-- options:end -->)", re.S)


def main(argv: list[str]) -> int:
    table = options_markdown()
    if "--write" not in argv:
        sys.stdout.write(table)
        return 0
    text = README.read_text(encoding="utf-8")
    if not MARKERS.search(text):
        sys.stderr.write(f"{README} has no <!-- options:start --> / <!-- options:end --> markers\n")
        return 1
    README.write_text(MARKERS.sub(lambda m: m[1] + table + m[2], text), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
