"""The ``simmerge`` command line: parse, call the library, print.

Library code raises :mod:`~simmerge_bandit.errors`; this module is the only place they become click errors
(one line, no traceback, non-zero exit). Every command reaches the state through one backend
(:meth:`Ctx.backend`: the daemon's API when a daemon runs, else the store), so it answers the same either way.

Why one module of this size: it is every command's options, help text and printing, and nothing else (each
command's work is one call into the library); one file keeps the whole command tree and its conventions in view.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Callable

import click

from .errors import SimmergeError
from .paths import resolve_home
from .zoo import PRESETS as ZOO_PRESETS


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
    """Per-invocation state: the home, and the road to its state (:meth:`backend`), chosen on first use."""

    def __init__(self, home: str | None):
        self.home = resolve_home(home)
        self._store = None
        self._backend = None

    def store(self):
        if self._store is None:
            from .store import Store

            self._store = Store.open(self.home)
        return self._store

    def client(self):
        """The running daemon's API client, or None (then commands open the state directly)."""
        from .client import Client

        return Client.find(self.home)

    def backend(self):
        """The state's operations for this invocation (:mod:`.backend`): through the daemon when one runs for the
        home, else on the store. Chosen once, so every command answers the same either way."""
        if self._backend is None:
            from .backend import LocalBackend, RemoteBackend

            cl = self.client()
            self._backend = RemoteBackend(cl) if cl else LocalBackend(self.store())
        return self._backend

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


# ---- registries: the names a choice or a help text lists come from them, read when click first needs them (a
# registry's import may pull in torch; starting the CLI must not) ----

def _metric_names() -> list[str]:
    from .evaluators import evaluator_names

    return evaluator_names()


def _method_names() -> list[str]:
    from .methods import method_names

    return method_names()


def _policy_names() -> list[str]:
    from .policies import policy_names

    return [f"{n}:OPERATOR" if n == "fixed" else n for n in policy_names()]


def _estimator_names() -> list[str]:
    from .estimators import ESTIMATORS

    return list(ESTIMATORS)


_REGISTRIES: dict[str, Callable[[], list[str]]] = {"metrics": _metric_names, "methods": _method_names,
                                                   "policies": _policy_names, "estimators": _estimator_names}


class RegistryChoice(click.Choice):
    """A choice among a registry's names (``metrics``, ``methods``, ``policies``, ``estimators``), read when click
    first needs them, so a method or policy registered at run time is a valid choice."""

    def __init__(self, registry: str):
        self.registry = registry
        self.case_sensitive = True

    @property
    def choices(self) -> tuple[str, ...]:  # type: ignore[override]
        return tuple(_REGISTRIES[self.registry]())


class RegistryOption(click.Option):
    """An option whose help names a registry's entries: ``{policies}`` in the help text becomes the registered
    policies when the help is shown."""

    def get_help_record(self, ctx: click.Context):
        template = self.help
        if template:
            text = template
            for key, names in _REGISTRIES.items():
                if "{" + key + "}" in text:
                    text = text.replace("{" + key + "}", ", ".join(names()))
            self.help = text
        try:
            return super().get_help_record(ctx)
        finally:
            self.help = template


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

def _interactive(no_input: bool) -> bool:
    """Prompting is allowed only on a terminal and without --no-input."""
    return not no_input and sys.stdin.isatty()


no_input_option = click.option("--no-input", is_flag=True,
                               help="Never prompt; fail with a message when an argument is missing.")


def _model_summary(m: dict) -> dict:
    return {k: m[k] for k in ("name", "path", "base", "tasks", "architecture", "dtype", "n_params", "n_tensors",
                              "size_bytes", "fingerprint", "added_at")}


@cli.group(cls=_Group)
def model() -> None:
    """Register and inspect checkpoints (Hugging Face directories with safetensors)."""


@model.command("add")
@click.argument("path", type=click.Path())
@click.option("--name", help="Catalog name (default: the directory name).")
@click.option("--base", help="Name of the registered base model this one was fine-tuned from.")
@click.option("--task", "tasks", multiple=True, help="A task this model was fine-tuned for; repeatable. "
                                                      "Suggestions for a task pair at least one of its experts, "
                                                      "and merge all of them at once (the target's group).")
@click.option("--allow-duplicate", is_flag=True,
              help="Register PATH even if it is already registered under another name.")
@json_option
@pass_ctx
def model_add(c: Ctx, path: str, name: str | None, base: str | None, tasks: tuple[str, ...], allow_duplicate: bool,
              as_json: bool) -> None:
    """Register the checkpoint directory PATH (config.json + *.safetensors, sharded or not).

    Headers are read without loading tensors; a content fingerprint is stored. With --base, every tensor name
    and shape must match the base model. A directory already registered under another name is refused unless
    --allow-duplicate.
    """
    m = _model_summary(c.backend().add_model(path, name=name, base=base, tasks=list(tasks),
                                             allow_duplicate=allow_duplicate))
    emit([m], as_json, lambda d: click.echo(f"added model {m['name']} ({m['architecture']}, {m['dtype']}, "
                                              f"{m['n_params']:,} parameters)"))


@model.command("list")
@json_option
@pass_ctx
def model_list(c: Ctx, as_json: bool) -> None:
    """List registered models."""
    rows = [_model_summary(m) for m in c.backend().models()]
    emit(rows, as_json, lambda d: table(d, ["name", "base", "architecture", "dtype", "n_params"]))


@model.command("show")
@click.argument("name")
@json_option
@pass_ctx
def model_show(c: Ctx, name: str, as_json: bool) -> None:
    """Show one model, with its tensors and config."""
    m = c.backend().model(name)

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
    res = c.backend().remove_model(name)
    emit([res], as_json, lambda d: click.echo(f"removed model {name}"))


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
@click.option("--metric", type=RegistryChoice("metrics"), default="exact_match", show_default=True,
              help="How merges are scored on this task.")
@click.option("--eval-command", help="External evaluator command template (with --metric external).")
@click.option("--metric-path", help="Dotted path of the score in the external evaluator's JSON output.")
@click.option("--lm-eval-task", metavar="TASK", help="lm-evaluation-harness task or group (with --metric lm-eval; "
                                                     "see docs/lm-eval.md).")
@click.option("--lm-eval-metric", metavar="METRIC", help="Its metric that is the score: acc, exact_match, "
                                                         "NAME,FILTER, ... (default: the task's first).")
@click.option("--lm-eval-include", type=click.Path(file_okay=False), metavar="DIR",
              help="Folder of lm-eval custom task YAML where the task is found (instead of lm-eval's own).")
@click.option("--lm-eval-args", metavar="K=V,...", help="num_fewshot, batch_size, dtype, ...: simple_evaluate's "
                                                        "arguments and lm-eval's HF model arguments.")
@no_input_option
@json_option
@pass_ctx
def task_add(c: Ctx, name, data, probes, metric, eval_command, metric_path, lm_eval_task, lm_eval_metric,
             lm_eval_include, lm_eval_args, no_input, as_json) -> None:
    """Add task NAME. In a terminal, missing arguments are asked for.

    With --metric lm-eval, merges are scored by lm-evaluation-harness (pip install 'simmerge-bandit[lm-eval]'):
    --lm-eval-task names the task, --data is still the task's examples (its probes, and what `simmerge zoo
    export-lm-eval` writes as a custom task). Nothing is downloaded: a task must find its data on this machine.
    """
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
    flags = {"task": lm_eval_task, "metric": lm_eval_metric, "include": lm_eval_include, "args": lm_eval_args}
    eval_options = None
    if metric == "lm-eval":
        from .evaluators.lm_eval import task_options

        eval_options = task_options(**flags)
    elif any(v is not None for v in flags.values()):
        raise click.UsageError("the --lm-eval-* options go with --metric lm-eval")
    t = c.backend().add_task(name, data, probes=probes, metric=metric, eval_command=eval_command,
                             metric_path=metric_path, eval_options=eval_options)
    emit([t], as_json, lambda d: click.echo(f"added task {t['name']} ({t['n_examples']} examples, probe set "
                                              f"{t['probe_set']})"))


@task.command("list")
@json_option
@pass_ctx
def task_list(c: Ctx, as_json: bool) -> None:
    """List tasks."""
    emit(c.backend().tasks(), as_json, lambda d: table(d, ["name", "n_examples", "probe_set", "metric"]))


@task.command("show")
@click.argument("name")
@json_option
@pass_ctx
def task_show(c: Ctx, name: str, as_json: bool) -> None:
    """Show one task."""
    t = c.backend().task(name)
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
    p = c.backend().add_probe_set(name, file)
    emit([p], as_json, lambda d: click.echo(f"added probe set {name} ({p['n_prompts']} prompts)"))


@probe.command("list")
@json_option
@pass_ctx
def probe_list(c: Ctx, as_json: bool) -> None:
    """List probe sets."""
    emit(c.backend().probe_sets(), as_json, lambda d: table(d, ["name", "n_prompts", "hash"]))


@cli.group(cls=_Group)
def operator() -> None:
    """Merge operators: a registered method plus parameters. Operators are the bandit's arms."""


def _parse_params(pairs: tuple[str, ...]) -> dict[str, str]:
    out = {}
    for p in pairs:
        if "=" not in p:
            raise click.BadParameter(f"expected KEY=VALUE, got {p!r}", param_hint="--param")
        k, v = p.split("=", 1)
        if k.strip() in out:  # silently keeping the last of two values hides a typo (issue 20)
            raise click.BadParameter(f"{k.strip()} is given twice ({out[k.strip()]} and {v.strip()}); give it once",
                                     param_hint="--param")
        out[k.strip()] = v.strip()
    return out


def _ask_params(spec) -> tuple[dict, dict]:
    """Ask for each parameter: a value, or (numbers) MIN:MAX for a range the engine chooses in."""
    from .families import check_ranges, parse_range

    values, ranges = {}, {}
    for p in spec.params:
        while True:
            hint = "; or MIN:MAX to let the engine choose" if p.kind != "bool" else ""
            raw = click.prompt(f"{p.name} ({p.range_text()}{'; ' + p.help if p.help else ''}{hint})",
                               default=str(p.default).lower() if p.kind == "bool" else str(p.default))
            try:
                if p.kind != "bool" and ":" in raw:
                    _, lo, hi = parse_range(f"{p.name}={raw}")
                    check_ranges(spec.name, {}, {p.name: [lo, hi]})
                    ranges[p.name] = [lo, hi]
                else:
                    values[p.name] = p.coerce(raw)
                break
            except SimmergeError as e:
                click.echo(f"  {e}", err=True)
    return values, ranges


def _parse_ranges(texts: tuple[str, ...]) -> dict[str, list[float]]:
    from .families import parse_range

    out: dict[str, list[float]] = {}
    for t in texts:
        name, lo, hi = parse_range(t)
        if name in out:
            raise click.BadParameter(f"{name} is given twice; give it once", param_hint="--range")
        out[name] = [lo, hi]
    return out


@operator.command("add")
@click.argument("name", required=False)
@click.option("--method", cls=RegistryOption,
              help="Merge method: {methods} (parameters: `simmerge operator methods`).")
@click.option("--param", "params", multiple=True, metavar="KEY=VALUE", help="A method parameter; repeatable.")
@click.option("--range", "ranges", multiple=True, metavar="KEY=MIN:MAX",
              help="A parameter the engine chooses inside [MIN, MAX] per suggestion (the operator is then a "
                   "family); repeatable.")
@no_input_option
@json_option
@pass_ctx
def operator_add(c: Ctx, name, method, params, ranges, no_input, as_json) -> None:
    """Add operator NAME = METHOD with parameters. In a terminal, missing arguments are asked for.

    With --range the operator is a family: the engine chooses those parameters' values inside their ranges for
    each suggestion, and reports (and logs) the values it chose.

    \b
    Examples:
      simmerge operator add ties_d0.5 --method ties --param density=0.5
      simmerge operator add ties_fam --method ties --range density=0.2:0.9 --range weight=0.1:1
    """
    from .methods import get_method, method_names

    missing = [flag for flag, v in (("NAME", name), ("--method", method)) if not v]
    if missing and not _interactive(no_input):
        raise click.UsageError(f"missing {' and '.join(missing)} (pass them, or run in a terminal to be asked)")
    parsed = _parse_params(params)
    box = _parse_ranges(ranges)
    if not name:
        name = click.prompt("Operator name")
    if not method:
        method = click.prompt("Method", type=click.Choice(method_names()))
        asked, asked_ranges = _ask_params(get_method(method))
        parsed = {**{k: v for k, v in asked.items() if k not in box}, **parsed}
        box = {**{k: v for k, v in asked_ranges.items() if k not in parsed}, **box}
    op = c.backend().add_operator(name, method, parsed, ranges=box or None)

    def human(_):
        fixed = ", ".join(f"{k}={v}" for k, v in op["params"].items() if k not in op.get("ranges", {}))
        free = ", ".join(f"{k} in [{lo:g}, {hi:g}]" for k, (lo, hi) in op.get("ranges", {}).items())
        click.echo(f"added operator {op['name']} = {op['method']}({fixed}{'; ' + free if free else ''})")

    emit([op], as_json, human)


@operator.command("list")
@click.option("--all", "show_all", is_flag=True, help="Include retired operators.")
@json_option
@pass_ctx
def operator_list(c: Ctx, show_all: bool, as_json: bool) -> None:
    """List operators (active ones unless --all)."""
    rows = c.backend().operators(all=show_all)
    emit(rows, as_json, lambda d: table(d, ["name", "method", "params", "status"]))


@operator.command("show")
@click.argument("name")
@json_option
@pass_ctx
def operator_show(c: Ctx, name: str, as_json: bool) -> None:
    """Show one operator."""
    op = c.backend().operator(name)
    emit([op], as_json, lambda d: [click.echo(f"{k:10} {v}") for k, v in op.items()])


@operator.command("retire")
@click.argument("name")
@json_option
@pass_ctx
def operator_retire(c: Ctx, name: str, as_json: bool) -> None:
    """Stop suggesting operator NAME; its history stays."""
    op = c.backend().retire_operator(name)
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

def _parse_size(text: str) -> int:
    import re as _re

    m = _re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)?\s*", text, _re.I)
    if not m:
        raise click.BadParameter(f"{text!r} is not a size (e.g. 5GB, 500MB, 2000000)", param_hint="--shard-size")
    unit = (m.group(2) or "").upper().rstrip("B")
    mult = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "KI": 2**10, "MI": 2**20, "GI": 2**30,
            "TI": 2**40}[unit]
    return int(float(m.group(1)) * mult)


@cli.command("merge")
@click.argument("config", required=False, type=click.Path(dir_okay=False))
@click.option("--out", "out", required=True, type=click.Path(file_okay=False),
              help="Output checkpoint directory (written to a temporary folder beside it, then renamed).")
@click.option("--models", help="Catalog model names, comma-separated, instead of CONFIG (e.g. A,B or A,B,C).")
@click.option("--operator", "operators",
              help="Catalog operator name with --models; several, comma-separated, chain the merges: "
                   "--models A,B,C --operator ties_d0.5,slerp_t0.3 gives ((A ties B) slerp C).")
@click.option("--device", default="auto", show_default=True, help="auto (a GPU when present), cpu or cuda[:N].")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of random methods (DARE, DELLA).")
@click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]), default=None,
              help="Output dtype (default: the config's out_dtype/dtype, else the base or first model's).")
@click.option("--compute-dtype", type=click.Choice(["float32", "float16", "bfloat16"]), default=None,
              help="dtype the arithmetic runs in (default: a CONFIG's `dtype`, as mergekit; float32 for "
                   "--models). float32 over a bf16 config is more precise than mergekit; the written "
                   "mergekit_config.yml and provenance.json record it.")
@click.option("--shard-size", default="5GB", show_default=True, help="Largest output shard (e.g. 2GB, 500MB).")
@click.option("--vocab", type=click.Choice(["refuse", "truncate"]), default="refuse", show_default=True,
              help="Models with different vocabulary sizes: refuse, or keep the rows of the smallest.")
@click.option("--exact-ties", is_flag=True,
              help="Break ties among equal magnitudes (TIES, breadcrumbs) as mergekit does: same tensors as "
                   "mergekit even in bf16, at mergekit's speed (a full sort per tensor).")
@click.option("--force", is_flag=True,
              help="Replace OUT if it exists, once the new model is complete (atomically where the file system "
                   "can; else the next merge into OUT repairs an interrupted replacement).")
@click.option("--fsync", is_flag=True,
              help="fsync every file written, the new directory and its parent before returning (durable on "
                   "power loss).")
@click.option("--threads", default=1, show_default=True, type=click.IntRange(min=1),
              help="CPU threads that merge: torch's intra-op threads, and the compiled TIES loops' (1 is fastest "
                   "on small or busy machines).")
@json_option
@pass_ctx
def merge_cmd(c: Ctx, config, out, models, operators, device, seed, dtype, compute_dtype, shard_size, vocab,
              exact_ties, force, fsync, threads, as_json) -> None:
    """Merge models into a new checkpoint: from a mergekit CONFIG.yml, or catalog --models with --operator.

    Streams tensor by tensor on the CPU or a GPU, computing as mergekit does in the config's dtype (float32 for
    catalog merges), and writes sharded safetensors plus config, tokenizer, mergekit_config.yml and
    provenance.json. Examples:

      simmerge merge recipe.yml --out merged/

      simmerge merge --models math-ft,code-ft --operator ties_d0.5 --out merged/
    """
    from . import executor

    size = _parse_size(shard_size)
    common = dict(device=device, seed=seed, force=force, shard_size=size, exact_ties=exact_ties, vocab=vocab,
                  progress=not as_json, fsync=fsync, threads=threads, compute_dtype=compute_dtype)
    if config and (models or operators):
        raise click.UsageError("give either CONFIG or --models with --operator, not both")
    if config:
        res = executor.merge_config(config, out, dtype=dtype, **common)
    elif models and operators:
        from . import recipe

        r = recipe.build(c.backend(), models.split(","), operators.split(","))
        if r.families:
            family = r.families[0]
            raise click.UsageError(f"operator {family['name']} is a family (the engine chooses its "
                                   f"{', '.join(sorted(family['ranges']))} per suggestion): merge a suggestion's "
                                   f"values with a grid operator (`operator add NAME --method {family['method']} "
                                   f"--param ...`) or a mergekit config")
        res = r.merge(out, dtype=dtype, **common)
    else:
        raise click.UsageError("give a mergekit CONFIG.yml, or --models A,B with --operator NAME")
    data = {"out": str(res.out), **res.stats}
    emit(data, as_json, lambda d: click.echo(
        f"merged into {d['out']}: {d['n_tensors']} tensors, {d['bytes_written'] / 1e9:.3g} GB in {d['seconds']:.3g} s "
        f"({d['gb_per_s']:.3g} GB/s on {d['device']}, peak RSS {d['peak_rss_bytes'] / 1e9:.3g} GB)"))


# ---- zoo and evaluate ----

@cli.group(cls=_Group)
def zoo() -> None:
    """The micro-zoo: tiny Llama experts trained here on synthetic tasks (no downloads)."""


@zoo.command("build")
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--preset", type=click.Choice(list(ZOO_PRESETS)), default="test", show_default=True,
              help="unit: seconds, for unit tests; test: base + 8 experts (about a minute); bench: the "
                   "decision-quality testbed (several minutes); realistic: merges that keep most of their "
                   "sources' skills, as real LLM merges do (about 5 minutes; docs/zoo.md).")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True,
              help="Seed of data and weights; the same seed on the same machine gives identical weights.")
@click.option("--force", is_flag=True, help="Retrain everything even if a cached build matches.")
@click.option("--jobs", type=click.IntRange(min=1), default=None,
              help="Processes that train models at once (the experts of one base), one thread each; the weights "
                   "are the same bytes for any count. Default: one per CPU core, at most 8.")
@json_option
def zoo_build(directory: str, preset: str, seed: int, force: bool, jobs: int | None, as_json: bool) -> None:
    """Build a micro-zoo in DIRECTORY: a base, experts, and per task train/eval/probe files.

    A second build with the same arguments returns at once (the manifest zoo.json records a hash of them
    and of the code).
    """
    import time

    from .zoo import build_zoo, default_jobs

    t0 = time.perf_counter()
    m = build_zoo(directory, preset, seed, progress=not as_json, force=force, jobs=jobs or default_jobs())
    took = time.perf_counter() - t0
    summary = {"directory": str(Path(directory).resolve()), "preset": m["preset"], "seed": m["seed"],
               "models": len(m["models"]), "tasks": len(m["tasks"]), "seconds": round(took, 2),
               "build_seconds": m["build_seconds"], "cached": took < m["build_seconds"] / 2}

    def human(_):
        click.echo(f"zoo {m['preset']} (seed {m['seed']}) in {summary['directory']}: {len(m['models'])} models, "
                   f"{len(m['tasks'])} tasks" + (" (cached)" if summary["cached"] else f", built in {took:.0f}s"))
        table([{"model": x["name"], "base": x["base"], "tasks": ",".join(x["tasks"]),
                "own-task score": min((x["scores"][t] for t in x["tasks"]), default=None)
                if x["base"] else None} for x in m["models"]], ["model", "base", "tasks", "own-task score"])

    emit(summary, as_json, human)


@zoo.command("register")
@click.argument("directory", type=click.Path(file_okay=False))
@json_option
@pass_ctx
def zoo_register(c: Ctx, directory: str, as_json: bool) -> None:
    """Register a built zoo in the current home: models (base first), tasks and the default operators.

    Tasks use eval.jsonl as data, probes.jsonl as probe set and exact_match as metric. Running it again
    skips what is already there.
    """
    from .zoo import register_zoo

    res = register_zoo(c.backend(), directory)

    def human(r):
        for kind in ("models", "tasks", "operators"):
            click.echo(f"{kind}: {len(r[kind]['added'])} added, {len(r[kind]['skipped'])} already there")

    emit(res, as_json, human)


@zoo.command("export-lm-eval")
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--task", "tasks", multiple=True, metavar="NAME", help="Export this task only; repeatable "
                                                                    "(default: every task in the home).")
@click.option("--tokenizer", type=click.Path(file_okay=False, exists=True), metavar="DIR",
              help="Checkpoint whose tokenizer counts the answers' tokens for the generation budget (default: "
                   "characters, as the micro-zoo's tokenizer has one token per character).")
@json_option
@pass_ctx
def zoo_export_lm_eval(c: Ctx, directory: str, tasks: tuple[str, ...], tokenizer: str | None, as_json: bool) -> None:
    """Write the home's tasks as lm-evaluation-harness custom tasks: DIRECTORY/NAME.yaml for each, a task of the
    same name over the task's local data file, scored as exact_match scores it (greedy generation cut at the
    first newline, stripped, exact match). Use DIRECTORY with --lm-eval-include, or with `lm-eval run
    --include_path`.
    """
    from .evaluators.lm_eval import export_tasks

    be = c.backend()
    rows = [be.task(t) for t in tasks] if tasks else be.tasks()
    if not rows:
        raise click.ClickException("no tasks in this home to export (register a zoo first: simmerge zoo register)")
    written = export_tasks(rows, directory, tokenizer_path=tokenizer)
    emit(written, as_json, lambda w: click.echo(f"wrote {len(w)} lm-eval task(s) to {Path(directory).resolve()}: "
                                                + ", ".join(x["task"] for x in w)))


@zoo.command("table")
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--out", required=True, type=click.Path(dir_okay=False),
              help="Parquet file to write (one row per model_a, model_b, operator, task).")
@click.option("--operators", "operator_names", multiple=True, metavar="NAMES",
              help="Operators to use, comma-separated or repeated (catalog names or the zoo's default set; "
                   "default: the whole default set).")
@click.option("--triples", type=click.IntRange(min=0), default=0, show_default=True,
              help="Also merge this many random triples of experts (methods that take 3 models).")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True,
              help="Seed of the random merge masks and of the choice of triples.")
@click.option("--stats", "stats_out", type=click.Path(dir_okay=False),
              help="Also write the table's statistics on both objectives (target first) as JSON.")
@click.option("--objective", type=click.Choice(["target", "task"]), default="target", show_default=True,
              help="Which statistics to print. target: a case is one merge, worth the mean of its normalized "
                   "scores over all tasks of its sources; task: a case is one merge on one task.")
@json_option
@pass_ctx
def zoo_table(c: Ctx, directory: str, out: str, operator_names: tuple[str, ...], triples: int, seed: int,
              stats_out: str | None, objective: str, as_json: bool) -> None:
    """Merge every ordered pair of the zoo's experts with every operator and evaluate each merge.

    Writes the full table to --out and into the state store (table merge_table): the ground truth for replay
    and the decision-quality benchmark. Prints whether the zoo is worth benchmarking on. Without --operators,
    the zoo's preset's default operator set is used.
    """
    import time

    from .zoo import build_table, load_manifest, table_stats

    if not out.endswith(".parquet"):
        raise click.BadParameter("the table is written as Parquet; give a path ending in .parquet",
                                 param_hint="--out")
    names = [n.strip() for part in operator_names for n in part.split(",") if n.strip()]
    be = c.backend()
    manifest = load_manifest(directory)
    ops = _zoo_operators(be, names, manifest.get("preset"))
    t0 = time.perf_counter()
    df = build_table(directory, operators=ops, n_triples=triples, seed=seed, progress=not as_json)
    took = time.perf_counter() - t0
    Path(out).expanduser().parent.mkdir(parents=True, exist_ok=True)
    df.to_parquet(out, index=False)
    n = be.store_merge_table(df, manifest["key"])["rows"]
    both = {o: table_stats(df, manifest, objective=o) for o in ("target", "task")}
    stats = {**both[objective], "seconds": round(took, 1)}
    if stats_out:
        Path(stats_out).write_text(json.dumps({**both, "seconds": round(took, 1)}, indent=2, default=str))

    def human(s):
        click.echo(f"{n} rows ({s['two_way']['n_cases']} 2-way cases x {s['two_way']['n_operators']} operators"
                   f"{', plus triples' if s['three_way'] else ''}) in {took:.0f}s -> {out}")
        _print_zoo_stats(s)

    emit(stats, as_json, human)


def _zoo_operators(be, names: list[str], preset: str | None) -> list[dict]:
    """The operators named (each from the catalog when it is there, else from the zoo's default set), or the
    preset's default set; the catalog is read through the backend, so this works with a daemon running."""
    from .errors import NotFound
    from .zoo import resolve_operators

    out = []
    for n in names:
        try:
            op = be.operator(n)
        except NotFound:
            out += resolve_operators([n], None, preset=preset)
            continue
        out.append({"name": op["name"], "method": op["method"], "params": op["params"]})
    return out or resolve_operators(None, None, preset=preset)


def _print_zoo_stats(s: dict) -> None:
    th, two = s["thresholds"], s["two_way"]

    def need(key, op):
        if key not in th:
            return ""
        limit = f"{th[key]:.0%}" if key.endswith("share") else f"{th[key]}"
        return f" (need {op} {limit}) " + ("ok" if s["checks"].get(key) else "NOT MET")

    click.echo(f"objective: {s['objective']} ("
               + ("one case = a merge over all its sources' tasks" if s["objective"] == "target"
                  else "one case = a merge on one task") + ")")
    if "expert_margin" in s:
        em = s["expert_margin"]
        click.echo(f"expert - base on own task: min {em['min']:.2f}{need('min_expert_margin', '>=')}, median "
                   f"{em['median']:.2f}{need('median_expert_margin', '>=')}")
        if "off_task_max_drop" in em:
            click.echo(f"largest drop below the base elsewhere: {em['off_task_max_drop']:.2f}"
                       f"{need('max_off_task_drop', '<=')}")
    click.echo(f"median best-minus-worst spread: {two['median_spread']:.3f}{need('median_spread', '>=')}")
    click.echo(f"most frequent best operator: {two['max_best_share_operator']} in {two['max_best_share']:.0%} of "
               f"cases{need('max_best_share', '<=')}")
    click.echo(f"oracle {two['oracle_mean']:.3f}{need('oracle_mean', '>=')} vs best fixed operator "
               f"{two['best_fixed_operator']} {two['best_fixed_mean']:.3f}: gap {two['oracle_gap']:.3f}"
               f"{need('oracle_gap', '>=')}")
    if "oracle_gap_nc" in two:
        click.echo(f"noise-corrected (chosen on one half of the examples, scored on the other): oracle "
                   f"{two['oracle_mean_nc']:.3f} vs {two['best_fixed_mean_nc']:.3f}: gap {two['oracle_gap_nc']:.3f}"
                   f"{need('oracle_gap_nc', '>=')}")
    if "best_rule" in two:
        click.echo(f"best metadata rule: {two['best_rule']} closes {two['best_rule_share']:.0%} of the gap"
                   f"{need('max_rule_share', '<=')}")
    if s["three_way"]:
        t3 = s["three_way"]
        click.echo(f"3-way: oracle {t3['oracle_mean']:.3f} vs best fixed operator {t3['best_fixed_operator']} "
                   f"{t3['best_fixed_mean']:.3f}: gap {t3['oracle_gap']:.3f} over {t3['n_cases']} cases")


@cli.command("evaluate")
@click.argument("model")
@click.option("--task", "task_name", required=True, help="Name of a registered task.")
@click.option("--metric", type=RegistryChoice("metrics"), help="Override the task's metric.")
@click.option("--limit", type=click.IntRange(min=1), help="Evaluate only the first N examples.")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=3600.0, show_default=True,
              help="Time limit in seconds for an external evaluation command or an lm-eval run.")
@json_option
@pass_ctx
def evaluate_cmd(c: Ctx, model: str, task_name: str, metric: str | None, limit: int | None, timeout: float,
                 as_json: bool) -> None:
    """Evaluate MODEL (a catalog name or a checkpoint directory) on a registered task.

    Built-in metrics: exact_match (greedy generation) and loglik (geometric-mean probability of the answer
    tokens); external runs the task's command template; lm-eval runs the task's lm-evaluation-harness task (its
    results JSON is in the --json output). A failed evaluation is reported with its reason and exits non-zero.
    """
    from .evaluators import evaluate_named

    res, what = evaluate_named(c.backend(), model, task_name, metric=metric, limit=limit, timeout=timeout)
    out = {**what, **res.to_dict()}

    def human(r):
        if res.ok:
            click.echo(f"{r['model']} on {r['task']}: {r['metric']} = {res.score:.4f} ({res.n_examples} examples, "
                       f"{res.seconds:.1f}s)")
        else:
            click.echo(f"{r['model']} on {r['task']}: evaluation failed: {res.reason}")

    emit(out, as_json, human)
    if not res.ok:
        sys.exit(1)


# ---- signals ----

@cli.group(cls=_Group)
def signatures() -> None:
    """Per-model signatures, from which pairwise similarity features are computed.

    A signature is what a model leaves behind after one forward pass over a task's probe prompts (next-token
    distributions, hidden-state summaries) and one streaming pass over its weights relative to its base (task-vector
    norms and sketches). It is cached by model fingerprint, probe set content and signature version.
    """


@signatures.command("compute")
@click.option("--task", "tasks", multiple=True, metavar="NAME", help="Compute for this task's probe set; repeatable.")
@click.option("--all", "all_tasks", is_flag=True, help="Compute for every task in the catalog.")
@click.option("--model", "models", multiple=True, metavar="NAME",
              help="Only this model; repeatable (default: every model in the catalog).")
@click.option("--device", help="torch device, e.g. cpu or cuda:0 (default: cuda when available, else cpu).")
@click.option("--threads", type=click.IntRange(min=1), help="torch CPU threads (default: torch's own choice; "
                                                             "1 is often faster on a busy machine).")
@click.option("--no-progress", is_flag=True, help="Do not show the progress bar.")
@json_option
@pass_ctx
def signatures_compute(c: Ctx, tasks: tuple[str, ...], all_tasks: bool, models: tuple[str, ...],
                       device: str | None, threads: int | None, no_progress: bool, as_json: bool) -> None:
    """Compute and cache the signatures that are missing or stale.

    Models are processed one at a time and each is loaded once, whatever the number of tasks; signatures already
    cached for the same weights, probes and signature version are reused, so a second run loads nothing. A model
    whose files changed on disk is re-fingerprinted first. Example: simmerge signatures compute --task copy
    """
    if not tasks and not all_tasks:
        raise click.UsageError("say which tasks: --task NAME (repeatable) or --all")
    row = c.backend().compute_signatures(None if all_tasks else list(tasks), list(models) or None, device=device,
                                         threads=threads, progress=not no_progress and not as_json)
    emit(row, as_json, lambda d: click.echo(f"signatures up to date for {d['models']} models x {len(d['tasks'])} "
                                            f"task(s); {d['loaded']} model(s) loaded"))


@signatures.command("list")
@json_option
@pass_ctx
def signatures_list(c: Ctx, as_json: bool) -> None:
    """List cached signatures (model, part, status, why absent, seconds it took)."""
    rows = c.backend().signatures()
    for r in rows:
        r["fingerprint"] = r["fingerprint"][:12]
        r["context"] = r["context"][:12]
    emit(rows, as_json, lambda d: table(d, ["model", "part", "status", "reason", "context", "version", "seconds"]))


@signatures.command("schema")
@json_option
def signatures_schema(as_json: bool) -> None:
    """Show the pairwise feature schema: names in order, what each means, bounds and symmetry."""
    from .signals import FEATURE_SCHEMA_VERSION, feature_schema

    rows = feature_schema()

    def human(d):
        click.echo(f"feature schema version {FEATURE_SCHEMA_VERSION}")
        table(rows, ["index", "name", "kind", "bounds", "swap", "description"])

    emit({"schema_version": FEATURE_SCHEMA_VERSION, "features": rows}, as_json, human)


@cli.command("features")
@click.argument("model_a")
@click.argument("model_b")
@click.option("--task", required=True, metavar="NAME", help="Task whose probe set the functional features use.")
@click.option("--exact", is_flag=True, help="Compute from full distributions, token states and tensors instead of "
                                            "the stored sketches (loads both models; slow).")
@click.option("--device", help="torch device, e.g. cpu or cuda:0 (default: cuda when available, else cpu).")
@json_option
@pass_ctx
def features_cmd(c: Ctx, model_a: str, model_b: str, task: str, exact: bool, device: str | None,
                 as_json: bool) -> None:
    """Similarity features of the ordered pair MODEL_A, MODEL_B for a task.

    Computed from the two models' signatures (computed first if missing) and cached. A feature that cannot be
    computed (no tokenizer, different vocabularies, no base) is listed as absent with the reason.
    Example: simmerge features copy upper --task copy --json
    """
    data = c.backend().features(model_a, model_b, task, exact=exact, device=device)

    def human(d):
        click.echo(f"features of ({model_a}, {model_b}) for task {task} ({d['mode']}, schema "
                   f"v{d['schema_version']})")
        table([{"feature": k, "value": v} for k, v in d["features"].items()], ["feature", "value"])
        if d["absent"]:
            click.echo("absent:")
            for k, why in d["absent"].items():
                click.echo(f"  {k}: {why}")

    emit(data, as_json, human)


# ---- engine: suggest, feedback, policy, predictor, status ----

def _number(value: str):
    """Parse a CLI number, passing the text through when it is not one (the engine refuses it clearly)."""
    try:
        return float(value)
    except ValueError:
        return value


def _print_suggestions(rows: list[dict]) -> None:
    table([{"#": i, "id": r["id"], "models": " + ".join(r["models"]),
            "operator": r["operator"] if isinstance(r["operator"], str) else " > ".join(r["operator"]),
            "predicted": r["predicted"], "uncertainty": r["uncertainty"], "propensity": r["propensity"],
            "evaluate": "yes" if r["evaluate"] else "", "because": ", ".join(e["feature"] for e in r["explanation"])}
           for i, r in enumerate(rows)],
          ["#", "id", "models", "operator", "predicted", "uncertainty", "propensity", "evaluate", "because"])


@cli.command()
@click.option("--task", "tasks", required=True, multiple=True,
              help="Task to merge for; repeat it for a target of several tasks (the merge should keep them all).")
@click.option("--weight", "weights", multiple=True, metavar="TASK=W",
              help="Relative weight of a target task (default 1 each); repeatable.")
@click.option("--top", default=5, show_default=True, help="How many suggestions to return.")
@click.option("--policy", default=None, cls=RegistryOption,
              help="Policy (default: linucb-hybrid): {policies}; NAME@predictor warm-starts NAME from the fitted "
                   "predictor; NAME:key=value,... sets parameters.")
@click.option("--chain", type=int, default=None, help="Suggest chains of N models ((a op1 b) op2 c ...).")
@json_option
@pass_ctx
def suggest(c: Ctx, tasks: tuple[str, ...], weights: tuple[str, ...], top: int, policy: str | None,
            chain: int | None, as_json: bool) -> None:
    """Rank candidate merges for a target: one task, or several (--task A --task B [--weight A=2]). The first
    entry is the policy's choice.

    A merge's reward is the weighted mean of its normalized scores (merged score / best source's score) over the
    target's tasks. Each suggestion is logged as a decision with its own id; report how the merge scored with
    `simmerge feedback ID VALUE`. Entries marked evaluate are the ones the engine asks to have evaluated.
    """
    from .target import Target, parse_weights

    w = parse_weights(weights)
    Target.of(list(tasks), w)  # refuse a malformed target here, before any call
    rows = c.backend().suggest(list(tasks), top=top, policy=policy, chain=chain, weights=w or None)
    emit(rows, as_json, _print_suggestions)


@cli.command(context_settings={"ignore_unknown_options": True})  # VALUE may be -0.1: a value, refused by range
@click.argument("decision_id")
@click.argument("value", type=str)
@json_option
@pass_ctx
def feedback(c: Ctx, decision_id: str, value: str, as_json: bool) -> None:
    """Record VALUE, the normalized score of the merge suggested as DECISION_ID, and learn from it.

    VALUE is the merged model's score divided by the best source model's score on the task, in [0, 2].
    Sending the same value again is a no-op; a different value for the same id is refused.
    """
    res = c.backend().feedback(decision_id, _number(value))
    emit(res, as_json, lambda r: click.echo(f"{r['status']}: reward {r['reward']:g} for {r['id']}"))


def _print_best(res: dict) -> None:
    b = res.get("best")
    spent = len(res["evaluations"])
    if b is None:
        click.echo(f"[{spent}/{res['budget']}] no merge scored yet")
        return
    ops = b["operator"] if isinstance(b["operator"], str) else " > ".join(b["operator"])
    params = json.dumps(b["params"], sort_keys=True)
    scores = "  ".join(f"{t} {v:.3f}" for t, v in sorted((b["scores"] or {}).items()))
    click.echo(f"[{spent}/{res['budget']}] best: {' + '.join(b['models'])} {ops} {params}  reward {b['reward']:.3f}"
               f"  ({scores})  {b.get('path') or ''}")


@cli.command("search")
@click.option("--task", "tasks", required=True, multiple=True,
              help="A task of the target; repeat it for a target of several tasks.")
@click.option("--weight", "weights", multiple=True, metavar="TASK=W",
              help="Relative weight of a target task (default 1 each); repeatable.")
@click.option("--budget", type=click.IntRange(min=1), required=True,
              help="How many merge-and-evaluate runs to spend (those of an earlier run of the same search count).")
@click.option("--policy", default=None,
              cls=RegistryOption,
              help="Policy that chooses each merge (default: gp-ucb@predictor when a predictor is fitted, "
                   "else gp-ucb): {policies}, or NAME@predictor.")
@click.option("--device", default="auto", show_default=True, help="Device for merges and evaluations.")
@click.option("--limit", type=click.IntRange(min=1), default=None,
              help="Evaluate on the first N examples of each task only (faster, noisier).")
@json_option
@pass_ctx
def search_cmd(c: Ctx, tasks, weights, budget, policy, device, limit, as_json) -> None:
    """Find the best merge for a target within a budget of evaluations.

    Runs the loop suggest -> merge -> evaluate on every target task -> feedback until --budget evaluations are
    spent (or Ctrl-C), printing the best merge so far after each one. Only the best merged checkpoint is kept
    (its path is printed). Rerun with the same tasks and policy, it resumes from the log. With a daemon running
    the search runs there as a job (see `GET /v1/jobs`), and this command follows it.
    """
    from .target import Target, parse_weights

    w = parse_weights(weights)
    Target.of(list(tasks), w)
    from tqdm.auto import tqdm

    be = c.backend()
    bar = tqdm(total=budget, desc="search", unit="eval", disable=as_json, leave=False)

    def progress(res: dict) -> None:
        bar.n = len(res["evaluations"])
        bar.refresh()
        if not as_json:
            bar.clear()
            _print_best(res)

    try:
        res = be.search(list(tasks), budget, weights=w or None, policy=policy, limit=limit, device=device,
                        progress=progress)
    except KeyboardInterrupt:
        bar.close()
        res = be.search_report(list(tasks), weights=w or None, policy=policy)
        click.echo("interrupted; rerun the same command to resume", err=True)
        emit(res, as_json, _print_best)
        raise SystemExit(130) from None
    bar.close()
    if policy is None and res.get("policy") == "gp-ucb":
        click.echo("note: no predictor is fitted, so this search started cold; `simmerge predictor fit --table "
                   "FILE` fits one from earlier merges of other tasks", err=True)
    emit(res, as_json, _print_best)


@cli.command()
@json_option
@pass_ctx
def status(c: Ctx, as_json: bool) -> None:
    """Counts of models, tasks, operators, decisions and rewards; evaluation queue and budget."""
    st = c.backend().status()

    def human(s):
        click.echo("  ".join(f"{k}: {v}" for k, v in s["counts"].items()))
        click.echo("queue: " + "  ".join(f"{k}: {v}" for k, v in s["queue"].items()))
        click.echo(f"evaluation budget: {s['budget']['used']}/{s['budget']['limit']} per {s['budget']['window_s']:g}s")
        if s["last_decision"]:
            d = s["last_decision"]
            click.echo(f"last decision: {d['id']} {d['task']} {d['models']} {d['operator']} ({d['policy']})")

    emit(st, as_json, human)


@cli.group(cls=_Group)
def policy() -> None:
    """Bandit policies: list them, rebuild one from the decision log."""


@policy.command("list")
@json_option
def policy_list(as_json: bool) -> None:
    """List the registered policy names."""
    from .policies import policy_names

    emit([{"name": n} for n in policy_names()], as_json, lambda d: table(d, ["name"]))


@policy.command("rebuild")
@click.option("--policy", "name", default=None, help="Policy to rebuild (default: the default policy).")
@json_option
@pass_ctx
def policy_rebuild(c: Ctx, name: str | None, as_json: bool) -> None:
    """Rebuild a policy's state from the decision log alone and replace its snapshot."""
    res = c.backend().rebuild_policy(name)
    emit(res, as_json, lambda r: click.echo(f"rebuilt {r['name']} from {r['n_updates']} rewards"))

@cli.group(cls=_Group)
def predictor() -> None:
    """The SimMerge predictor: a supervised model of merge scores, the zero-evaluation choice."""


@predictor.command("fit")
@click.option("--table", type=click.Path(exists=True, dir_okay=False),
              help="A merge table (Parquet/CSV: model_a, model_b, operator, task, normalized_score) whose models, "
                   "tasks and operators are in the catalog, e.g. from `simmerge zoo table`. Default: the decision "
                   "log's rewarded decisions.")
@click.option("--model", type=click.Choice(["mlp", "linear", "anchored", "auto"]), default=None,
              help="mlp: small networks with a Bayesian linear head; linear: ridge on features x descriptor; "
                   "anchored: the operators' means and the metadata rules first, ridge on what is left; auto "
                   "(with --table): the one whose choices on held-out tasks of the table are best (leave one task "
                   "out). Default: what the previous fit used, else mlp.")
@click.option("--online-weight", type=float, default=None,
              help="How many fitted rows each later reward counts as (a new task's own evaluations can outweigh "
                   "the other tasks' rows). Default: the previous fit's, else 1.")
@click.option("--objective", type=click.Choice(["target", "task"]), default=None,
              help="With --table: target scores each merge on the union of its models' tagged tasks (the mean of "
                   "its normalized scores on them); task takes each (pair, task) row as its own case. Default: "
                   "target when the catalog's tags allow it, else task.")
@click.option("--init-seed", type=click.IntRange(min=0), default=None,
              help="Seed of the networks' initialisation and batch order; another value gives an independent "
                   "replicate of the fit. Default: the previous fit's, else 0.")
@json_option
@pass_ctx
def predictor_fit(c: Ctx, table: str | None, online_weight: float | None, model: str | None, objective: str | None,
                  init_seed: int | None, as_json: bool) -> None:
    """Fit the predictor (features + operator -> normalized score) and save it as policy `predictor`.

    Use it with `suggest --policy predictor` (zero evaluations), or warm-start a bandit with
    `--policy linucb-hybrid@predictor` (it learns what the predictor gets wrong).
    """
    if objective and not table:
        raise click.BadParameter("--objective applies to a merge table; give --table", param_hint="--objective")
    res = c.backend().fit_predictor(table, online_weight=online_weight, model=model, objective=objective,
                                    init_seed=init_seed)
    def show(r):
        click.echo(f"fitted predictor ({r['model']}) on {r.get('n')} merges from {r['source']} (training rmse "
                   f"{r.get('rmse', float('nan')):.4f})")
        for label, share in (r.get("model_cv") or {}).items():
            click.echo(f"  cross-validation, {label}: {share:.0%} of the best-fixed -> oracle gap on held-out tasks")

    emit(res, as_json, show)


# ---- replay and simulate ----

_POLICY_HELP = ("Target policy; repeat for several. uniform, fixed:ACTION (the action as the log writes it, e.g. "
                "fixed:17), or a learned policy by name ({policies}) with optional parameters, e.g. "
                "linucb:alpha=0.5.")


def _split_list(values: tuple[str, ...]) -> list[str]:
    """Values given as repeated options and/or comma-separated lists."""
    return [v.strip() for item in values for v in item.split(",") if v.strip()]


def _interval(row: dict, key: str) -> str:
    v, lo, hi = row.get(key), row.get(f"{key}_ci_low"), row.get(f"{key}_ci_high")
    if v is None:
        return "-"
    if lo is None or hi is None:
        return f"{v:.4f}"
    return f"{v:.4f} [{lo:.4f}, {hi:.4f}]"


@cli.command("replay")
@click.argument("log", required=False, type=click.Path(dir_okay=False))
@click.option("--policy", "policies", multiple=True, required=True, cls=RegistryOption, help=_POLICY_HELP)
@click.option("--estimator", "estimators", multiple=True, type=RegistryChoice("estimators"),
              help="Estimator; repeat for several (default: all four). replay is unbiased only on uniform logs.")
@click.option("--ci", type=click.Choice(["normal", "bootstrap"]), default="normal", show_default=True,
              help="Confidence interval: analytic normal, or a percentile bootstrap over events.")
@click.option("--n-boot", type=click.IntRange(10), default=1000, show_default=True,
              help="Bootstrap resamples (with --ci bootstrap).")
@click.option("--alpha", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=0.05,
              show_default=True, help="1 - confidence level of the intervals.")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed for learned policies, the bootstrap and the DR reward model's folds.")
@click.option("--actions", "action_set", help="The action set, comma-separated (default: the actions in the log).")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False),
              help="Write a PNG of cumulative estimated reward with its confidence band.")
@json_option
@pass_ctx
def replay_cmd(c: Ctx, log, policies, estimators, ci, n_boot, alpha, seed, action_set, plot_path,
               as_json) -> None:
    """Estimate how other policies would have done on a logged decision stream.

    LOG is a CSV or Parquet file with columns action, reward, propensity (the logging policy's probability of
    the logged action), an optional timestamp (replay order), optional action-feature columns prefixed a_
    (e.g. a_density), and context in every other column (numbers as they are, strings encoded). Without LOG,
    the engine's own decision log in --home is used.

    \b
    Example:
      simmerge replay log.csv --policy uniform --policy fixed:17 --policy linucb --estimator ips --estimator dr
    """
    from . import replay as rp

    actions = [a.strip() for a in action_set.split(",")] if action_set else None
    if log is None:
        data = rp.log_from_frame(c.backend().replay_log(), source="engine decision log")
    else:
        data = rp.load_log(log, actions=actions)
    ev = rp.evaluate(data, list(policies), list(estimators) or ["replay", "ips", "snips", "dr"], alpha=alpha,
                     ci=ci, n_boot=n_boot, seed=seed)
    if plot_path:
        rp.plot(ev, plot_path)
    out = {"log": {"source": data.source, "events": len(data), "actions": data.arms, "uniform": data.is_uniform,
                   "context": data.context_names},
           "results": ev.results()}
    if plot_path:
        out["plot"] = str(plot_path)

    def human(d):
        info = d["log"]
        click.echo(f"{info['source']}: {info['events']} events, {len(info['actions'])} actions"
                   f"{' (uniform log)' if info['uniform'] else ''}, {len(info['context'])} context features")
        table(d["results"], ["policy", "estimator", "value", "ci_low", "ci_high", "n", "ess"])
        notes = sorted({f"{r['estimator']}: {n}" for r in d["results"] for n in r["notes"]})
        for n in notes:
            click.echo(f"note: {n}")
        if plot_path:
            click.echo(f"plot: {plot_path}")

    emit(out, as_json, human)


@cli.command("simulate")
@click.argument("table_path", metavar="TABLE", type=click.Path(dir_okay=False))
@click.option("--policy", "policies", multiple=True, required=True,
              cls=RegistryOption,
              help="Policy; repeat for several. uniform, fixed:OPERATOR, or a learned policy by name ({policies}) "
                   "with optional parameters, e.g. lints:v=0.5.")
@click.option("--objective", type=click.Choice(["task", "target"]), default="task", show_default=True,
              help="task: a case is (task, pair), worth the merge's normalized score on the task. target: a case "
                   "is a pair, worth the mean of its normalized scores over its sources' tagged tasks (tags from "
                   "the table's tasks_a/tasks_b columns or --zoo), with the engine's contexts.")
@click.option("--zoo", "zoo_dir", type=click.Path(file_okay=False, exists=True),
              help="A zoo directory whose manifest tags the table's models (when the table has no tag columns).")
@click.option("--rounds", type=click.IntRange(1), default=100, show_default=True,
              help="Decisions per run: each draws a case from the evaluation pool.")
@click.option("--budget", type=click.IntRange(0), default=None,
              help="Evaluations per run: the first B rounds are scored and learned from (default: all rounds).")
@click.option("--seeds", type=click.IntRange(1), default=5, show_default=True,
              help="Independent runs; intervals are over seeds.")
@click.option("--seed", type=int, default=0, show_default=True, help="First seed.")
@click.option("--holdout-tasks", "holdout", multiple=True,
              help="Tasks to evaluate on (comma-separated or repeated); the others train the policies first "
                   "and choose the best fixed operator.")
@click.option("--no-pretrain", is_flag=True, help="With --holdout-tasks, do not show the training tasks to "
                                                   "the policies first.")
@click.option("--late-operator", "late", multiple=True, metavar="OP@ROUND",
              help="Make an operator available only from that round on (repeatable).")
@click.option("--features", "feature_columns", multiple=True,
              help="Pair feature columns (comma-separated or repeated; default: every numeric column constant "
                   "within a (task, pair)).")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False),
              help="Write a PNG of cumulative regret against the oracle, with bands over seeds.")
@json_option
@pass_ctx
def simulate_cmd(c: Ctx, table_path, policies, objective, zoo_dir, rounds, budget, seeds, seed, holdout,
                 no_pretrain, late, feature_columns, plot_path, as_json) -> None:
    """Simulate policies exactly on a full merge table (every operator scored on every pair).

    TABLE is a Parquet or CSV file with columns task, model_a, model_b, operator, score, normalized_score, pair
    feature columns and optional operator descriptors prefixed op_. Reports, with intervals over seeds, each
    policy's mean normalized score, its regret against the oracle (the best operator of each pair) and the share
    of the gap between the best fixed operator and the oracle that it closed; final_* is its greedy choice on
    every pool pair after the run.

    \b
    Example:
      simmerge simulate table.parquet --policy linucb --policy fixed:ties --budget 25 --rounds 100 --seeds 5
    """
    from tqdm import tqdm

    from . import simulate as sm

    late_ops = {}
    for item in late:
        op, at, r = item.rpartition("@")
        if not at or not op or not r.strip().isdigit():
            raise click.BadParameter(f"{item!r} is not OP@ROUND", param_hint="--late-operator")
        late_ops[op] = int(r)
    tags = None
    if zoo_dir:
        manifest = Path(zoo_dir) / "zoo.json"
        if not manifest.is_file():
            raise click.BadParameter(f"{zoo_dir} has no zoo.json", param_hint="--zoo")
        tags = {m["name"]: list(m["tasks"]) for m in json.loads(manifest.read_text())["models"]}
    tab = sm.load_table(table_path, feature_columns=_split_list(feature_columns) or None, objective=objective,
                        tags=tags)
    with tqdm(total=seeds * len(policies), desc="simulate", disable=None, file=sys.stderr) as bar:
        sim = sm.simulate(tab, list(policies), rounds=rounds, budget=budget, seeds=seeds, seed=seed,
                          holdout_tasks=_split_list(holdout) or None, pretrain=not no_pretrain,
                          late_operators=late_ops, progress=lambda _: bar.update(1))
    if plot_path:
        sm.plot(sim, plot_path)
    out = {"summary": sim.summary(), "results": sim.results()}
    if plot_path:
        out["plot"] = str(plot_path)

    def human(d):
        s = d["summary"]
        click.echo(f"{s['table']}: {s['pool']} of {s['pairs']} {s['objective']} cases in the pool, "
                   f"{len(s['operators'])} operators, {s['rounds']} rounds, budget {s['budget']}, "
                   f"{len(s['seeds'])} seeds")
        click.echo(f"oracle {s['oracle_final_score']:.4f}, best fixed operator {s['best_fixed']} "
                   f"{s['fixed_final_score']:.4f} (mean normalized score over the pool)")
        rows = [{"policy": r["policy"], "mean score": _interval(r, "mean_score"), "regret": _interval(r, "regret"),
                 "gap closed": _interval(r, "gap_closed"), "final score": _interval(r, "final_score"),
                 "final gap closed": _interval(r, "final_gap_closed")} for r in d["results"]]
        table(rows, ["policy", "mean score", "regret", "gap closed", "final score", "final gap closed"])
        for n in s["notes"]:
            click.echo(f"note: {n}")
        if plot_path:
            click.echo(f"plot: {plot_path}")

    emit(out, as_json, human)

@cli.command()
@click.option("--rounds", default=12, show_default=True, type=click.IntRange(min=1),
              help="Suggestions for held-out targets, each merged, evaluated and learned from.")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(min=0),
              help="Seed of the zoo, of the held-out tasks and of the policy.")
@click.option("--policy", default="gp-ucb@predictor", show_default=True,
              help="Policy the engine runs (see `simmerge policy list`).")
@click.option("--preset", default="realistic", show_default=True, help="Zoo preset (see `simmerge zoo build`).")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False),
              help="Where to write the cumulative-regret PNG (default: demo_regret.png in the state home).")
@click.option("--eval-limit", type=click.IntRange(min=1), default=None,
              help="Evaluate the engine's own merges on at most this many examples per task (default: all).")
@click.option("--jobs", type=click.IntRange(min=1), default=None,
              help="Processes that build the zoo and score the training merges (first run only), and that score "
                   "every operator on the rounds' pairs; the results are the same for any count. Default: one per "
                   "CPU core, at most 8.")
@json_option
@click.pass_context
def demo(ctx: click.Context, rounds: int, seed: int, policy: str, preset: str, plot_path: str | None,
         eval_limit: int | None, jobs: int | None, as_json: bool) -> None:
    """The engine on tasks it was never evaluated on, against every fixed operator, the catalog-metadata rules
    and the oracle; a few minutes on 2 CPU cores, no downloads.

    Builds the realistic micro-zoo (cached in $SIMMERGE_CACHE or ~/.cache/simmerge), registers it in a fresh
    state home (or --home), holds out a third of its tasks, fits the predictor on merges of the others, then for
    each round asks for the best merge for a held-out target, merges and evaluates it, learns from it, and scores
    every operator on the same pair for comparison. Ends with a table and a PNG of cumulative regret.
    """
    from .demo import run_demo
    from .zoo import default_jobs

    home = ctx.find_root().params.get("home")
    res = run_demo(home, rounds=rounds, seed=seed, policy=policy, preset=preset, plot=plot_path,
                   eval_limit=eval_limit, jobs=jobs or default_jobs(), echo=(lambda s: None) if as_json else click.echo)
    if as_json:
        emit(res, True)


# ---- daemon ----

@cli.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind (loopback only unless "
                                                                     "--allow-remote).")
@click.option("--port", default=0, show_default=True, help="Port (0 = any free port; see daemon.json).")
@click.option("--watch", multiple=True, type=click.Path(), help="Folder to watch for new checkpoints; repeatable.")
@click.option("--eval-budget", default=10, show_default=True, help="Evaluations the engine may request per window.")
@click.option("--eval-window", default=86400.0, show_default=True, help="Budget window in seconds.")
@click.option("--executor", type=click.Choice(["local", "ray"]), default="local", show_default=True,
              help="Where merge and evaluation jobs run (ray needs the [ray] extra).")
@click.option("--policy", default="linucb-hybrid", show_default=True, cls=RegistryOption,
              help="Default policy for suggestions: {policies}, or NAME@predictor.")
@click.option("--device", default="auto", show_default=True, help="Device for merges and evaluations.")
@click.option("--eval-limit", type=int, default=None, help="Evaluate on at most this many examples per task.")
@click.option("--max-attempts", default=3, show_default=True, help="Tries per job before it is marked failed.")
@click.option("--allow-remote", is_flag=True, help="Allow a non-loopback --host (the API is token-protected, "
                                                   "not encrypted).")
@click.option("--allow-eval-commands", is_flag=True,
              help="Accept tasks with an --eval-command (a shell command the daemon runs) through the API; without "
                   "it only the CLI without a daemon registers them.")
@click.option("--serve-dir", "serve_dirs", multiple=True, type=click.Path(file_okay=False),
              help="A directory whose files the API may name by path (task data, probes, merge tables); "
                   "repeatable. Other files are sent as their text.")
@click.option("--max-connections", type=click.IntRange(min=1), default=None,
              help="Open connections at most (default: half the process's file descriptor limit, at most 4096); "
                   "beyond it the connection idle the longest is closed.")
@click.option("--log-json", is_flag=True, help="Log one JSON object per line.")
@click.option("--memory-limit", default="1GB", show_default=True,
              help="Cap on DuckDB's buffer pool, which otherwise keeps the growing decision log in memory.")
@click.option("--checkpoint-wal", default="8MB", show_default=True,
              help="Write-ahead log size at which DuckDB checkpoints in the middle of traffic (DuckDB's default "
                   "is 16MB); what is not checkpointed stays in memory. The daemon also checkpoints when idle.")
@click.option("--learn-interval-ms", default=100.0, show_default=True, type=click.FloatRange(min=0),
              help="Longest a reward waits before the policies learn it (sooner once 32 wait); suggestions in "
                   "the meantime rank without it. 0: before the next suggestion.")
@pass_ctx
def daemon(c: Ctx, host, port, watch, eval_budget, eval_window, executor, policy, device, eval_limit,
           max_attempts, allow_remote, allow_eval_commands, serve_dirs, max_connections, log_json, memory_limit,
           checkpoint_wal, learn_interval_ms) -> None:
    """Run the long-lived engine: owns the state, serves the JSON API on loopback, watches folders for new
    checkpoints, and runs the evaluations it asks for. Writes daemon.json (pid, port, token; mode 0600).
    Stops cleanly on SIGTERM / SIGINT. Whoever can read daemon.json can do what the API offers: see the
    security model in docs/daemon.md."""
    from .daemon import Daemon

    Daemon(c.home, host=host, port=port, watch=list(watch), eval_budget=eval_budget, eval_window_s=eval_window,
           executor=executor, allow_remote=allow_remote, log_json=log_json, max_attempts=max_attempts,
           device=device, eval_limit=eval_limit, policy=policy, memory_limit=memory_limit,
           checkpoint_wal=checkpoint_wal, learn_interval_s=learn_interval_ms / 1000.0,
           allow_eval_commands=allow_eval_commands, serve_dirs=list(serve_dirs),
           max_connections=max_connections).run()


@cli.command("ui")
@click.option("--open", "open_browser", is_flag=True, help="Also open the URL in this machine's web browser.")
@json_option
@pass_ctx
def ui_cmd(c: Ctx, open_browser: bool, as_json: bool) -> None:
    """Print a one-time login URL for the running daemon's dashboard: targets and their best merges, decisions and
    rewards as they arrive, the cumulative reward, jobs, operators, models and the policy. The link works once,
    within a minute; opening it gives that browser a session cookie (never the token). See docs/dashboard.md."""
    res = c.backend().ui_login()
    emit(res, as_json, lambda r: click.echo(r["url"]))
    if open_browser:
        import webbrowser

        webbrowser.open(res["url"])


def main() -> None:
    cli(prog_name="simmerge")


if __name__ == "__main__":  # pragma: no cover
    main()
