"""The README's library example runs as shown and learns."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_example_runs_and_its_loss_falls():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.S)
    assert blocks, "README.md has no python example"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(blocks[0], "README.md", "exec"), {})
    losses = [float(m) for m in re.findall(r"loss (\d+\.\d+)", out.getvalue())]
    assert len(losses) == 5
    assert losses[-1] < 0.1 < 0.5 < losses[0]


def test_readme_sections_and_paragraphs_appear_once():
    """A merge that pastes a block twice leaves repeated headings or paragraphs behind."""
    text = README.read_text(encoding="utf-8")
    headings = re.findall(r"^#+ .+$", text, re.M)
    assert len(headings) == len(set(headings)), sorted(h for h in headings if headings.count(h) > 1)
    paragraphs = [p.strip() for p in re.split(r"\n\s*\n", text) if len(p.strip()) > 200]
    repeated = {p[:80] for p in paragraphs if paragraphs.count(p) > 1}
    assert not repeated, repeated
