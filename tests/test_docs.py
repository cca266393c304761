"""The README documents every CLI command, and its Quick start holds exactly two commands."""

import re
from pathlib import Path

import click

from simmerge_bandit.cli import cli

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def _commands(group: click.Group, prefix: str):
    for name, cmd in group.commands.items():
        path = f"{prefix} {name}"
        yield path
        if isinstance(cmd, click.Group):
            yield from _commands(cmd, path)


def test_every_cli_command_is_in_the_readme():
    missing = [c for c in _commands(cli, "simmerge") if c not in README]
    assert not missing, f"commands missing from README.md: {missing}"


def test_quick_start_has_two_commands():
    section = README.split("## Quick start", 1)[1]
    block = re.search(r"```[a-z]*\n(.*?)```", section, re.S).group(1)
    lines = [ln for ln in block.splitlines() if ln.strip()]
    assert len(lines) == 2
    assert "pytest" in lines[1]
