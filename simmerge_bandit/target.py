"""Targets: what a merge is for.

A target is a set of tasks with positive weights. A merge is worth the weighted mean of its normalized scores
(:func:`~simmerge_bandit.evaluators.normalize.normalize_score`, per task) over the target's tasks, because people
merge to get one model that keeps the skills of all its sources, not one of them. One task with weight 1 is the
simplest target and means what a task always meant.

The default target of a merge is the union of its sources' tagged tasks (equal weights).

A target has a canonical text form, its *key*: the task name for a single task, else ``A=w,B=w`` with the tasks
sorted by name and the weights normalized to sum 1 (``=`` and ``,`` cannot occur in catalog names, so a key is
unambiguous). The key is what the decision log stores in its ``task`` column.

>>> t = Target.of(["rev", "add"], {"add": 2})
>>> t.key, t.weight("add")
('add=0.666667,rev=0.333333', 0.6666666666666666)
>>> Target.parse(t.key) == t, Target.parse("add").tasks
(True, ('add',))
>>> t.aggregate({"add": 0.9, "rev": 0.3})
0.7
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Mapping

from .errors import InvalidInput

_SEP, _EQ = ",", "="


def _weight(task: str, value) -> float:
    try:
        w = float(value)
    except (TypeError, ValueError):
        raise InvalidInput(f"weight of task {task!r} must be a positive finite number, got {value!r}") from None
    if isinstance(value, bool) or not math.isfinite(w) or w <= 0:
        raise InvalidInput(f"weight of task {task!r} must be a positive finite number, got {value!r}")
    return w


@dataclass(frozen=True)
class Target:
    """Tasks and their weights (normalized to sum 1), sorted by task name."""

    items: tuple[tuple[str, float], ...]

    @classmethod
    def of(cls, tasks: Iterable[str], weights: Mapping[str, object] | None = None) -> "Target":
        """A target from task names and optional weights (default 1 each; relative, normalized here).

        Raises :class:`InvalidInput` for no task, a repeated task, a weight for a task outside the target, or a
        weight that is not a positive finite number. Whether the tasks exist is the catalog's to check.
        """
        if isinstance(tasks, str):
            tasks = [tasks]
        names = list(tasks)
        if not names:
            raise InvalidInput("a target needs at least one task")
        for t in names:
            if not isinstance(t, str) or not t or _SEP in t or _EQ in t:
                raise InvalidInput(f"invalid task name in target: {t!r}")
        dup = sorted({t for t in names if names.count(t) > 1})
        if dup:
            raise InvalidInput(f"task {dup[0]!r} appears twice in the target")
        weights = dict(weights or {})
        extra = sorted(set(weights) - set(names))
        if extra:
            raise InvalidInput(f"weight given for {extra[0]!r}, which is not a task of the target "
                               f"({', '.join(names)})")
        raw = {t: _weight(t, weights.get(t, 1.0)) for t in names}
        total = sum(raw.values())
        if not math.isfinite(total):
            raise InvalidInput("target weights are too large")
        return cls(tuple(sorted((t, w / total) for t, w in raw.items())))

    @classmethod
    def parse(cls, key: str) -> "Target":
        """The target of a key (a task name, or ``A=w,B=w``)."""
        if not isinstance(key, str) or not key:
            raise InvalidInput(f"invalid target {key!r}")
        if _SEP not in key and _EQ not in key:
            return cls.of([key])
        tasks, weights = [], {}
        for part in key.split(_SEP):
            name, eq, w = part.partition(_EQ)
            if not eq:
                raise InvalidInput(f"invalid target {key!r}: expected TASK=WEIGHT, got {part!r}")
            tasks.append(name)
            weights[name] = w
        return cls.of(tasks, weights)

    @classmethod
    def default_for(cls, tag_lists: Iterable[Iterable[str] | None]) -> "Target | None":
        """The default target of a merge: the union of its sources' tagged tasks, equal weights (None when no
        source is tagged)."""
        tasks = sorted({t for tags in tag_lists for t in (tags or ())})
        return cls.of(tasks) if tasks else None

    @property
    def tasks(self) -> tuple[str, ...]:
        return tuple(t for t, _ in self.items)

    @property
    def weights(self) -> dict[str, float]:
        return dict(self.items)

    def weight(self, task: str) -> float:
        return self.weights.get(task, 0.0)

    @property
    def key(self) -> str:
        if len(self.items) == 1:
            return self.items[0][0]
        return _SEP.join(f"{t}{_EQ}{w:.6g}" for t, w in self.items)

    def aggregate(self, per_task: Mapping[str, float | None]) -> float | None:
        """Weighted mean of per-task values over the target's tasks; None when a task has no value (a failed or
        missing evaluation is never silently a zero)."""
        total = 0.0
        for t, w in self.items:
            v = per_task.get(t)
            if v is None or not math.isfinite(v):
                return None
            total += w * v
        return total

    def as_json(self) -> dict:
        """``{"tasks": {name: weight}}``: the target as the API and ``--json`` outputs show it."""
        return {"tasks": self.weights}

    def __str__(self) -> str:
        return self.key


def parse_weights(pairs: Iterable[str]) -> dict[str, str]:
    """``["A=2", "B=0.5"]`` (the CLI's repeated ``--weight``) as ``{"A": "2", "B": "0.5"}``; values are checked by
    :meth:`Target.of`."""
    out: dict[str, str] = {}
    for p in pairs:
        name, eq, value = str(p).partition(_EQ)
        if not eq or not name:
            raise InvalidInput(f"--weight takes TASK=WEIGHT, got {p!r}")
        if name in out:
            raise InvalidInput(f"--weight for task {name!r} given twice")
        out[name] = value
    return out
