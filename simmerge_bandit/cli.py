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

def _catalog(c: Ctx):
    from .catalog import Catalog

    return Catalog(c.store())


def _interactive(no_input: bool) -> bool:
    """Prompting is allowed only on a terminal and without --no-input."""
    return not no_input and sys.stdin.isatty()


no_input_option = click.option("--no-input", is_flag=True,
                               help="Never prompt; fail with a message when an argument is missing.")


def _model_summary(m: dict) -> dict:
    return {k: m[k] for k in ("name", "path", "base", "architecture", "dtype", "n_params", "n_tensors",
                              "size_bytes", "fingerprint", "added_at")}


@cli.group(cls=_Group)
def model() -> None:
    """Register and inspect checkpoints (Hugging Face directories with safetensors)."""


@model.command("add")
@click.argument("path", type=click.Path())
@click.option("--name", help="Catalog name (default: the directory name).")
@click.option("--base", help="Name of the registered base model this one was fine-tuned from.")
@json_option
@pass_ctx
def model_add(c: Ctx, path: str, name: str | None, base: str | None, as_json: bool) -> None:
    """Register the checkpoint directory PATH (config.json + *.safetensors, sharded or not).

    Headers are read without loading tensors; a content fingerprint is stored. With --base, every tensor name
    and shape must match the base model.
    """
    m = _model_summary(_catalog(c).add_model(path, name=name, base=base))
    emit([m], as_json, lambda d: click.echo(f"added model {m['name']} ({m['architecture']}, {m['dtype']}, "
                                              f"{m['n_params']:,} parameters)"))


@model.command("list")
@json_option
@pass_ctx
def model_list(c: Ctx, as_json: bool) -> None:
    """List registered models."""
    rows = [_model_summary(m) for m in _catalog(c).models()]
    emit(rows, as_json, lambda d: table(d, ["name", "base", "architecture", "dtype", "n_params"]))


@model.command("show")
@click.argument("name")
@json_option
@pass_ctx
def model_show(c: Ctx, name: str, as_json: bool) -> None:
    """Show one model, with its tensors and config."""
    m = _catalog(c).model(name)

    def human(d):
        for k, v in _model_summary(m).items():
            click.echo(f"{k:12} {v}")
        click.echo(f"{'tensors':12} {len(m['tensors'])}")
        for t, (dt, shape) in list(m["tensors"].items())[:20]:
            click.echo(f"  {t}  {dt}  {shape}")
        if len(m["tensors"]) > 20:
            click.echo(f"  ... {len(m['tensors']) - 20} more")

    emit([m], as_json, human)


@model.command("remove")
@click.argument("name")
@json_option
@pass_ctx
def model_remove(c: Ctx, name: str, as_json: bool) -> None:
    """Remove a model from the catalog (its files are not touched)."""
    _catalog(c).remove_model(name)
    emit([{"name": name, "removed": True}], as_json, lambda d: click.echo(f"removed model {name}"))


@cli.group(cls=_Group)
def task() -> None:
    """Register and inspect tasks (evaluation data plus unlabeled probe prompts)."""


def _ask_file(label: str, check, optional: bool = False):
    while True:
        value = click.prompt(label, default="" if optional else None, show_default=False)
        if optional and not value.strip():
            return None
        try:
            check(value)
            return value
        except SimmergeError as e:
            click.echo(f"  {e}", err=True)


@task.command("add")
@click.argument("name", required=False)
@click.option("--data", type=click.Path(), help='JSON lines of {"prompt": ..., "answer": ...}.')
@click.option("--probes", help="Probe prompts (a file of lines or JSON lines with 'prompt', or a probe set name). "
                               "Default: the first 64 prompts of --data.")
@click.option("--metric", type=click.Choice(["exact_match", "loglik", "external"]), default="exact_match",
              show_default=True, help="How merges are scored on this task.")
@click.option("--eval-command", help="External evaluator command template (with --metric external).")
@click.option("--metric-path", help="Dotted path of the score in the external evaluator's JSON output.")
@no_input_option
@json_option
@pass_ctx
def task_add(c: Ctx, name, data, probes, metric, eval_command, metric_path, no_input, as_json) -> None:
    """Add task NAME. In a terminal, missing arguments are asked for."""
    from .catalog import read_jsonl, read_prompts

    missing = [flag for flag, v in (("NAME", name), ("--data", data)) if not v]
    if missing and not _interactive(no_input):
        raise click.UsageError(f"missing {' and '.join(missing)} (pass them, or run in a terminal to be asked)")
    if not name:
        name = click.prompt("Task name")
    if not data:
        data = _ask_file("Data file (JSON lines with prompt and answer)",
                         lambda v: read_jsonl(v, need=("prompt", "answer")))
        if probes is None:
            probes = _ask_file("Probe file (empty: use the data's prompts)", read_prompts, optional=True)
    t = _catalog(c).add_task(name, data, probes=probes, metric=metric, eval_command=eval_command,
                             metric_path=metric_path)
    emit([t], as_json, lambda d: click.echo(f"added task {t['name']} ({t['n_examples']} examples, probe set "
                                              f"{t['probe_set']})"))


@task.command("list")
@json_option
@pass_ctx
def task_list(c: Ctx, as_json: bool) -> None:
    """List tasks."""
    emit(_catalog(c).tasks(), as_json, lambda d: table(d, ["name", "n_examples", "probe_set", "metric"]))


@task.command("show")
@click.argument("name")
@json_option
@pass_ctx
def task_show(c: Ctx, name: str, as_json: bool) -> None:
    """Show one task."""
    t = _catalog(c).task(name)
    emit([t], as_json, lambda d: [click.echo(f"{k:12} {v}") for k, v in t.items()])


@cli.group(cls=_Group)
def probe() -> None:
    """Probe sets: unlabeled prompts on which functional similarity signals are computed."""


@probe.command("add")
@click.argument("name")
@click.argument("file", type=click.Path())
@json_option
@pass_ctx
def probe_add(c: Ctx, name: str, file: str, as_json: bool) -> None:
    """Add probe set NAME from FILE (one prompt per line, or JSON lines with 'prompt')."""
    p = _catalog(c).add_probe_set(name, file)
    emit([p], as_json, lambda d: click.echo(f"added probe set {name} ({p['n_prompts']} prompts)"))


@probe.command("list")
@json_option
@pass_ctx
def probe_list(c: Ctx, as_json: bool) -> None:
    """List probe sets."""
    emit(_catalog(c).probe_sets(), as_json, lambda d: table(d, ["name", "n_prompts", "hash"]))


@cli.group(cls=_Group)
def operator() -> None:
    """Merge operators: a registered method plus parameters. Operators are the bandit's arms."""


def _parse_params(pairs: tuple[str, ...]) -> dict[str, str]:
    out = {}
    for p in pairs:
        if "=" not in p:
            raise click.BadParameter(f"expected KEY=VALUE, got {p!r}", param_hint="--param")
        k, v = p.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def _ask_params(spec) -> dict:
    values = {}
    for p in spec.params:
        while True:
            raw = click.prompt(f"{p.name} ({p.range_text()}{'; ' + p.help if p.help else ''})",
                               default=str(p.default).lower() if p.kind == "bool" else str(p.default))
            try:
                values[p.name] = p.coerce(raw)
                break
            except SimmergeError as e:
                click.echo(f"  {e}", err=True)
    return values


@operator.command("add")
@click.argument("name", required=False)
@click.option("--method", help="Merge method (see `simmerge operator methods`).")
@click.option("--param", "params", multiple=True, metavar="KEY=VALUE", help="A method parameter; repeatable.")
@no_input_option
@json_option
@pass_ctx
def operator_add(c: Ctx, name, method, params, no_input, as_json) -> None:
    """Add operator NAME = METHOD with parameters. In a terminal, missing arguments are asked for.

    Example: simmerge operator add ties_d0.5 --method ties --param density=0.5
    """
    from .methods import get_method, method_names

    missing = [flag for flag, v in (("NAME", name), ("--method", method)) if not v]
    if missing and not _interactive(no_input):
        raise click.UsageError(f"missing {' and '.join(missing)} (pass them, or run in a terminal to be asked)")
    parsed = _parse_params(params)
    if not name:
        name = click.prompt("Operator name")
    if not method:
        method = click.prompt("Method", type=click.Choice(method_names()))
        parsed = {**_ask_params(get_method(method)), **parsed}
    op = _catalog(c).add_operator(name, method, parsed)
    emit([op], as_json, lambda d: click.echo(f"added operator {op['name']} = {op['method']}"
                                               f"({', '.join(f'{k}={v}' for k, v in op['params'].items())})"))


@operator.command("list")
@click.option("--all", "show_all", is_flag=True, help="Include retired operators.")
@json_option
@pass_ctx
def operator_list(c: Ctx, show_all: bool, as_json: bool) -> None:
    """List operators (active ones unless --all)."""
    rows = _catalog(c).operators(active_only=not show_all)
    emit(rows, as_json, lambda d: table(d, ["name", "method", "params", "status"]))


@operator.command("show")
@click.argument("name")
@json_option
@pass_ctx
def operator_show(c: Ctx, name: str, as_json: bool) -> None:
    """Show one operator."""
    op = _catalog(c).operator(name)
    emit([op], as_json, lambda d: [click.echo(f"{k:10} {v}") for k, v in op.items()])


@operator.command("retire")
@click.argument("name")
@json_option
@pass_ctx
def operator_retire(c: Ctx, name: str, as_json: bool) -> None:
    """Stop suggesting operator NAME; its history stays."""
    op = _catalog(c).retire_operator(name)
    emit([op], as_json, lambda d: click.echo(f"retired operator {name}"))


@operator.command("methods")
@json_option
def operator_methods(as_json: bool) -> None:
    """List the registered merge methods and their parameters."""
    from .methods import REGISTRY

    rows = [{"name": m.name, "family": m.family, "needs_base": m.needs_base,
             "params": {p.name: {"default": p.default, "range": p.range_text(), "scope": p.scope}
                        for p in m.params}} for m in REGISTRY.values()]
    emit(rows, as_json, lambda d: table([{"name": r["name"], "family": r["family"],
                                          "params": ", ".join(f"{k}={v['default']}" for k, v in r["params"].items())}
                                         for r in d], ["name", "family", "params"]))

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
