"""The package's layout (STYLE.md, issue 17): a module over MAX_LINES lines says at its top why it is one module.

The convention: a paragraph of the module docstring that starts with ``Why one module`` (e.g. "Why one module of
this size: ..."), saying what holds the module together. Otherwise it is split by concern.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "simmerge_bandit"
MAX_LINES = 500
MARKER = "Why one module"


def has_reason(source: str) -> bool:
    """Whether a module's docstring holds a paragraph that starts with :data:`MARKER` and says something."""
    doc = ast.get_docstring(ast.parse(source)) or ""
    return any(p.strip().startswith(MARKER) and len(p.strip()) > len(MARKER) + 20 for p in doc.split("\n\n"))


def long_modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if len(p.read_text().splitlines()) > MAX_LINES)


def test_every_module_over_the_limit_says_why_it_is_one_module():
    missing = [str(p.relative_to(PACKAGE.parent)) for p in long_modules() if not has_reason(p.read_text())]
    assert not missing, (f"modules over {MAX_LINES} lines without a '{MARKER} ...' paragraph at the top of their "
                         f"docstring (say why, or split them by concern): {', '.join(missing)}")


@pytest.mark.parametrize("source, ok", [
    ('"""A module.\n\nWhy one module of this size: its parts share one invariant and one buffer."""\n', True),
    ('"""A module.\n\nWhy one module"""\n', False),                                 # a marker that says nothing
    ('"""A module that mentions why one module of this size: mid-paragraph."""\n', False),
    ('# Why one module of this size: a comment is not the docstring.\n"""A module."""\n', False),
    ("x = 1\n", False),
])
def test_the_reason_is_a_docstring_paragraph(source, ok):
    assert has_reason(source) is ok


def test_the_check_sees_the_long_modules():
    names = {p.name for p in long_modules()}
    assert {"cli.py", "zoo.py", "executor.py"} <= names        # the walk reaches them (and subpackages)
    assert any(p.parent.name != "simmerge_bandit" for p in long_modules())
