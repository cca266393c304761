"""The ``simmerge`` command line: parse, call the library, print.

Library code raises :mod:`~simmerge_bandit.errors`; this module is the only place they become click errors
(one line, no traceback, non-zero exit).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Callable

import click

from .errors import SimmergeError
from .paths import resolve_home


class _Group(click.Group):
    """A group that turns domain errors into one-line click errors."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except SimmergeError as e:
            raise click.ClickException(str(e)) from None

    def group(self, *args, **kwargs):
        kwargs.setdefault("cls", _Group)
        return super().group(*args, **kwargs)


class Ctx:
    """Per-invocation state: the home, and a store opened on first use."""

    def __init__(self, home: str | None):
        self.home = resolve_home(home)
        self._store = None

    def store(self):
        if self._store is None:
            from .store import Store

            self._store = Store.open(self.home)
        return self._store

    def close(self) -> None:
        if self._store is not None:
            self._store.close()
            self._store = None


pass_ctx = click.make_pass_decorator(Ctx)


def emit(data: Any, as_json: bool, human: Callable[[Any], None] | None = None) -> None:
    """Print ``data`` as JSON (``--json``) or through ``human``."""
    if as_json or human is None:
        click.echo(json.dumps(data, indent=2, default=str))
    else:
        human(data)


def table(rows: list[dict], columns: list[str]) -> None:
    """Print rows as an aligned text table."""
    if not rows:
        click.echo("(none)")
        return
    cells = [[_fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    click.echo("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    click.echo("  ".join("-" * w for w in widths))
    for row in cells:
        click.echo("  ".join(v.ljust(w) for v, w in zip(row, widths)))


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (dict, list)):
        return json.dumps(v, default=str)
    return str(v)


json_option = click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--home", type=click.Path(file_okay=False), default=None,
              help="State directory (default: $SIMMERGE_HOME or ~/.simmerge).")
@click.version_option(package_name="simmerge-bandit")
@click.pass_context
def cli(ctx: click.Context, home: str | None) -> None:
    """simmerge: learn which model merges to make.

    Similarity signals between checkpoints are the context, merge operators are the arms of a contextual
    bandit that suggests merges, asks for an evaluation now and then, and learns from the rewards.
    """
    ctx.obj = Ctx(home)
    ctx.call_on_close(ctx.obj.close)


# ---- catalog: models, tasks, operators, probe sets ----

# ---- merge (executor) ----

# ---- zoo and evaluate ----

# ---- signals ----

# ---- engine: suggest, feedback, policy, predictor, status ----

# ---- replay and simulate ----

# ---- daemon ----


def main() -> None:
    cli(prog_name="simmerge")


if __name__ == "__main__":  # pragma: no cover
    main()
