"""The docs cannot go stale: generated parts equal what the generator gives now, examples run, links resolve.

Everything generated is rewritten by one command, ``python -m simmerge_bandit.docgen``; a failure here names the
file that is out of date.
"""

from __future__ import annotations

import re
from pathlib import Path

import click
import pytest

from simmerge_bandit import docgen

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
REGENERATE = "out of date: run `python -m simmerge_bandit.docgen` and commit the result"


def _markdown_files() -> list[Path]:
    return [README, ROOT / "benchmarks" / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


# ---------------------------------------------------------------------------------------------------------------
# README


def test_quick_start_has_the_two_commands():
    # .ci/run runs the second line of this block: it is the project's test command
    section = README.read_text().split("\n## Quick start\n", 1)[1]
    block = re.search(r"```[a-z]*\n(.*?)```", section, re.S).group(1)
    lines = [ln for ln in block.splitlines() if ln.strip()]
    assert lines == ["pip install -e . && simmerge demo", "pip install -e '.[test]' && python -m pytest -q -n 2"]


def test_readme_stays_a_five_minute_read():
    n = len(README.read_text().splitlines())
    assert n <= 220, f"README.md has {n} lines; reference material belongs in docs/"


def test_readme_headline_figures_are_generated_from_the_committed_results():
    block = docgen.read_block(README.read_text(), "headline")
    assert block is not None, "README.md has no '<!-- table: headline -->' block"
    assert block == docgen.headline_markdown(), f"README.md headline table {REGENERATE}"


# ---------------------------------------------------------------------------------------------------------------
# the CLI reference


def test_cli_reference_is_generated_from_the_commands():
    assert (ROOT / "docs" / "cli.md").read_text() == docgen.cli_markdown() + "\n", f"docs/cli.md {REGENERATE}"


def test_cli_reference_has_every_command():
    # a check of the generator itself: every command of the click tree, nested groups included, has a section
    from simmerge_bandit.cli import cli

    def walk(group: click.Group, path: str):
        for name, cmd in group.commands.items():
            if not cmd.hidden:
                yield f"{path} {name}"
                if isinstance(cmd, click.Group):
                    yield from walk(cmd, f"{path} {name}")

    text = docgen.cli_markdown()
    headings = set(re.findall(r"^#+ (simmerge.*)$", text, re.M))
    commands = list(walk(cli, "simmerge"))
    assert len(commands) > 20
    assert not [c for c in commands if c not in headings]


# ---------------------------------------------------------------------------------------------------------------
# tables from committed results


@pytest.mark.parametrize("table", docgen.BENCH_TABLES, ids=lambda t: t.name)
def test_benchmark_table_equals_what_its_script_prints_from_the_committed_json(table):
    committed = docgen.read_block(docgen.BENCH_README.read_text(), table.name)
    assert committed is not None, f"benchmarks/README.md has no '<!-- table: {table.name} -->' block"
    assert committed == table.render(), f"benchmarks/README.md table {table.name} {REGENERATE}"


def test_every_table_block_of_the_benchmark_page_is_generated():
    names = re.findall(r"<!-- table: (\S+) -->", docgen.BENCH_README.read_text())
    assert sorted(names) == sorted(t.name for t in docgen.BENCH_TABLES)


@pytest.mark.parametrize("block", docgen.DOC_BLOCKS, ids=lambda b: f"{b.path.name}:{b.name}")
def test_generated_blocks_of_the_docs_are_current(block):
    committed = docgen.read_block(block.path.read_text(), block.name)
    assert committed is not None, f"{block.path.name} has no '<!-- table: {block.name} -->' block"
    assert committed == block.render(), f"{block.path.relative_to(ROOT)} block {block.name} {REGENERATE}"


def test_replace_block_keeps_the_prose_around_it():
    text = "intro\n<!-- table: t -->\nold\n<!-- /table -->\noutro\n"
    want = "intro\n<!-- table: t -->\nnew\nrows\n<!-- /table -->\noutro\n"
    assert docgen.replace_block(text, "t", "new\nrows") == want
    assert docgen.read_block(text, "t") == "old"
    with pytest.raises(KeyError):
        docgen.replace_block(text, "other", "x")


# ---------------------------------------------------------------------------------------------------------------
# links, docstrings, examples


def _headings_anchors(path: Path) -> set[str]:
    out = set()
    in_code = False
    for line in path.read_text().splitlines():
        if line.startswith("```"):
            in_code = not in_code
        elif not in_code and (m := re.match(r"#+ (.*)", line)):
            out.add(docgen._anchor(m.group(1).strip()))
    return out


#: Pages being written as this suite is (each by its own change): links to them may resolve later. An entry must go
#: once its page exists, so that this list never hides a page that was removed.
PLANNED_PAGES: set[str] = set()


def test_planned_pages_are_still_planned():
    assert not [p for p in PLANNED_PAGES if (ROOT / p).exists()], "remove pages that exist from PLANNED_PAGES"


@pytest.mark.parametrize("md", _markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(md):
    text = re.sub(r"```.*?```", "", md.read_text(), flags=re.S)
    bad = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):
            continue                                           # http:, https:, mailto:
        path, _, anchor = target.partition("#")
        dest = (md.parent / path).resolve() if path else md
        if not dest.exists():
            if str(dest.relative_to(ROOT)) not in PLANNED_PAGES:
                bad.append(target)
        elif anchor and dest.suffix == ".md" and anchor not in _headings_anchors(dest):
            bad.append(target)
    assert not bad, f"{md.relative_to(ROOT)}: broken links {bad}"


def test_every_public_function_of_the_python_api_has_a_docstring():
    # constructors excepted: the class's docstring says what it is
    missing = [qual for module, name in docgen.PYTHON_API for qual, fn in docgen.public_callables(module, name)
               if qual != name and not (fn.__doc__ or "").strip()]
    assert not missing, f"public functions without a docstring: {missing}"


EXAMPLES = ["docs/python.md", "docs/extending/policy.md", "docs/extending/evaluator.md"]


@pytest.mark.parametrize("page", EXAMPLES)
def test_doc_examples_run(page, unit_zoo_dir, tmp_path, monkeypatch):
    """Every ```python block of the page, in order, in one namespace; the unit zoo the examples build is the
    session's (a cache hit), and what they register is unregistered afterwards."""
    from simmerge_bandit.evaluators import REGISTRY as EVALUATORS
    from simmerge_bandit.policies import REGISTRY as POLICIES

    blocks = re.findall(r"```python\n(.*?)```", (ROOT / page).read_text(), re.S)
    assert blocks, f"{page} has no python example"
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "zoo-unit-seed0").symlink_to(unit_zoo_dir, target_is_directory=True)
    monkeypatch.setenv("SIMMERGE_CACHE", str(cache))
    saved = dict(POLICIES), dict(EVALUATORS)
    namespace: dict = {"__name__": "__doc_example__"}
    try:
        for i, code in enumerate(blocks):
            exec(compile(code, f"{page}[python block {i + 1}]", "exec"), namespace)
    finally:
        for registry, before in zip((POLICIES, EVALUATORS), saved):
            registry.clear()
            registry.update(before)
