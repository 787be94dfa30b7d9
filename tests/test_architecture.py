"""The layout holds: imports flow one way (the import-linter contracts in pyproject.toml), no
module grows much past 400 lines, and `--help` stays quick (no torch)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_imports_flow_one_way(tmp_path):
    """`lint-imports` checks the layers of pyproject.toml's [tool.importlinter] contracts (its
    cache in tmp_path: by default it writes .import_linter_cache into the current folder)."""
    from importlinter.cli import lint_imports

    assert lint_imports(config_filename=str(REPO / "pyproject.toml"), cache_dir=str(tmp_path)) == 0


def test_no_module_is_much_over_400_lines():
    sizes = {p.relative_to(REPO): len(p.read_text(encoding="utf-8").splitlines())
             for p in (REPO / "charlm").rglob("*.py")}
    assert {p: n for p, n in sizes.items() if n > 420} == {}


def test_help_does_not_import_torch():
    """`charlm --help` and the commands' --help answer at once (torch takes seconds to import)."""
    code = ("import sys\nfrom charlm.cli.app import main\n"
            "for args in (['--help'], ['generate', '--help'], ['train', '--help'],\n"
            "             ['eval', 'perplexity', '--help'], ['data', 'list', '--help'],\n"
            "             ['export', '--help']):\n"
            "    try:\n        main(args)\n    except SystemExit:\n        pass\n"
            "print('torch' in sys.modules, file=sys.stderr)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=REPO)
    assert done.stderr.strip().splitlines()[-1] == "False", done.stderr
