"""Evaluators: turn (model, task) into a score. One module per evaluator, registered by name.

- ``exact_match``: greedy generation, batched, compared with the answers of the task's data file.
- ``loglik``: geometric-mean probability of the answer tokens.
- ``external``: a command template (e.g. an lm-eval-harness call) that writes JSON, plus a metric path.
- ``lm-eval``: an lm-evaluation-harness task and metric, run through lm-eval's Python API (optional extra).

Reward normalization (merged score / best source's score, clipped to [0, 2]) lives in :mod:`.normalize`.

>>> from simmerge_bandit.evaluators import evaluate                    # doctest: +SKIP
>>> evaluate("zoo/experts/add", {"name": "add", "data_path": "zoo/tasks/add/eval.jsonl"}).score  # doctest: +SKIP
0.97
"""

from __future__ import annotations

import os
import pkgutil
from importlib import import_module
from pathlib import Path
from typing import Any, Mapping

from ..errors import InvalidInput
from .base import EvalResult, Evaluator, LoadedModel, TaskData, load_model, read_examples
from .normalize import normalize_score

#: The built-in evaluators in the order they are listed; modules found beside them are listed after, by name.
_MODULES = ("exact_match", "loglik", "external", "lm_eval")
#: Modules of this package that hold machinery, not an evaluator (``_private`` ones are skipped too).
_HELPERS = frozenset({"base", "normalize"})

REGISTRY: dict[str, Evaluator] = {}


def evaluator_modules() -> list[str]:
    """The modules of this package expected to define ``EVALUATOR`` (adding an evaluator is adding its file)."""
    found = sorted(m.name for m in pkgutil.iter_modules(__path__)
                   if m.name not in _HELPERS and not m.name.startswith("_"))
    return [*(m for m in _MODULES if m in found), *(m for m in found if m not in _MODULES)]


for _m in evaluator_modules():
    _ev = getattr(import_module(f"{__name__}.{_m}"), "EVALUATOR", None)
    if _ev is not None:
        REGISTRY[_ev.name] = _ev


def register(evaluator: Evaluator) -> Evaluator:
    """Add an evaluator while the process runs (a module of this package needs no call); refused when its name is
    taken by another one."""
    name = getattr(evaluator, "name", None)
    if not isinstance(name, str) or not name or not callable(getattr(evaluator, "evaluate", None)):
        raise InvalidInput(f"an evaluator has a name and an evaluate() method, got {evaluator!r}")
    if name in REGISTRY and REGISTRY[name] is not evaluator:
        raise InvalidInput(f"an evaluator named {name!r} is registered already")
    REGISTRY[name] = evaluator
    return evaluator


def unregister(name: str) -> Evaluator:
    """Remove an evaluator added with :func:`register`."""
    return REGISTRY.pop(get_evaluator(name).name)


def evaluator_names() -> list[str]:
    return list(REGISTRY)


def get_evaluator(name: str) -> Evaluator:
    """The evaluator called ``name``, or :class:`InvalidInput` listing the known ones."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise InvalidInput(f"unknown metric {name!r}; known: {', '.join(REGISTRY)}") from None


def evaluate(model: LoadedModel | str | os.PathLike, task: Mapping[str, Any] | TaskData, *,
             metric: str | None = None, limit: int | None = None, **options: Any) -> EvalResult:
    """Evaluate ``model`` (a checkpoint directory or a :class:`LoadedModel`) on ``task``.

    ``task`` is a catalog task row (``name``, ``data_path``, ``metric``, ``eval_command``, ``metric_path``,
    ``eval_options``)
    or a :class:`TaskData`; ``metric`` overrides the task's own metric.
    """
    if isinstance(task, TaskData):
        data, name = task, metric or "exact_match"
    else:
        data, name = TaskData.from_mapping(task), metric or task.get("metric") or "exact_match"
    if limit is not None and limit < 1:
        raise InvalidInput(f"limit must be at least 1, got {limit}")
    return get_evaluator(name).evaluate(model, data, limit=limit, **options)


def evaluate_named(catalog, model: str, task: str, *, metric: str | None = None, limit: int | None = None,
                   client=None, **options: Any) -> tuple[EvalResult, dict]:
    """Evaluate a catalog model (by name) or a checkpoint directory on a catalog task (by name).

    ``catalog`` is where the names are looked up: a :class:`~simmerge_bandit.backend.Backend` (the CLI's, through
    the daemon when one holds the state) or a :class:`~simmerge_bandit.store.Store`; ``client`` (the daemon's API
    client) is the older way to say the former. Returns the result and what was evaluated (model label, path,
    task, metric).
    """
    from ..backend import RemoteBackend, as_backend
    from ..errors import NotFound

    be = RemoteBackend(client) if client is not None else as_backend(catalog)
    trow = be.task(task)
    p = Path(model).expanduser()
    if p.is_dir():
        path, label = p.resolve(), str(p)
    else:
        try:
            path, label = Path(be.model(model)["path"]), model
        except NotFound:
            raise NotFound(f"no model named {model!r} in the catalog and no checkpoint directory at that path") \
                from None
    res = evaluate(path, trow, metric=metric, limit=limit, **options)
    return res, {"model": label, "path": str(path), "task": task, "metric": res.metric}


__all__ = ["EvalResult", "Evaluator", "LoadedModel", "REGISTRY", "TaskData", "evaluate", "evaluate_named",
           "evaluator_modules", "evaluator_names", "get_evaluator", "load_model", "normalize_score", "read_examples",
           "register", "unregister"]
