"""The code examples of docs/ and the README, for the tests that run them."""

from __future__ import annotations

import re
from pathlib import Path

from tests.helpers import ROOT

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w*)\n(.*?)^```$", re.S | re.M)


def blocks(language: str) -> list[tuple[Path, str]]:
    """Every fenced block of `language` in the docs, with its file."""
    return [(doc, m.group(2)) for doc in DOCS for m in FENCE.finditer(doc.read_text()) if m.group(1) == language]


def example(doc: str, marker: str) -> str:
    """The one Python block of `doc` that contains `marker`."""
    found = [code for path, code in blocks("python") if path.name == doc and marker in code]
    assert len(found) == 1, f"{doc}: {len(found)} Python blocks contain {marker!r}"
    return found[0]
