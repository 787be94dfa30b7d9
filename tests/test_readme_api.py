"""The README's "Using charlm from Python" runs as written: its python blocks, executed in order
in one namespace, in a temporary folder (runs and cache there too), train, load, generate, score
and export a model, and what they print is what the text says it is."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SECTION = "## Using charlm from Python"


def section_blocks() -> list[str]:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    start = text.index(f"\n{SECTION}\n")
    end = text.index("\n## ", start + 1)
    return re.findall(r"```python\n(.*?)```", text[start:end], flags=re.S)


def test_the_section_has_the_notebook_steps():
    code = "\n".join(section_blocks())
    for call in ("charlm.train(", "run.load()", ".generate(", ".stream(", ".perplexity(",
                 ".save_pretrained(", "charlm.load("):
        assert call in code, call


@pytest.mark.usefixtures("one_thread")
def test_the_readme_python_blocks_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CHARLM_RUNS_DIR", str(tmp_path / "runs"))
    monkeypatch.setenv("CHARLM_DATA_DIR", str(tmp_path / "cache"))
    namespace: dict = {"__name__": "__readme__"}
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        for block in section_blocks():
            exec(compile(block, "README.md", "exec"), namespace)
    run, model, rows = namespace["run"], namespace["model"], namespace["rows"]
    assert run.run_dir.parent == tmp_path / "runs"
    assert [r["kind"] for r in rows].count("train") == 3 and rows == [
        r for r in run.metrics() if r["kind"] != "summary"]
    result = model.perplexity(split="val")
    assert out.getvalue() == "\n".join([
        f"{run.run_dir} 30 {round(run.summary['val_ppl'], 2)}",
        repr(model),
        model.generate("the ", length=80, temperature=0.8, seed=1),
        model.generate("for ", length=40, seed=1),
        f"{result.perplexity} {result.bits_per_char} {result.characters}",
        str(model.perplexity("the quick brown fox").to_dict()), ""])
    assert (tmp_path / "share" / "python-docs" / "model.safetensors").is_file()
