"""Catalog names to merge steps: which checkpoints, which base, which method with which parameters, in order.

One builder for every caller that merges catalog models: ``simmerge merge --models --operator``, an evaluation
job (:mod:`.pipeline`) and a chain's intermediate merge (:mod:`.chains`). A recipe is plain data (its JSON is the
``models`` / ``base`` / ``steps`` of a job spec), so it can travel to a Ray worker and merge there.

>>> r = build(catalog, ["math-ft", "code-ft"], ["ties_d0.5"])     # doctest: +SKIP
>>> r.merge("merged/", device="cpu")                              # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from .errors import InvalidInput


@dataclass(frozen=True)
class Recipe:
    """``models``: ``{"name", "path", "fingerprint"}`` in merge order; ``base``: ``{"name", "path",
    "fingerprint"}`` of their shared base, or None; ``steps``: ``{"method", "params", "operator"}``. One step
    merges every model at once; several chain them, ((m0 s0 m1) s1 m2) ..."""

    models: list[dict]
    base: dict | None
    steps: list[dict]
    #: the operators' catalog rows (a family's ``ranges`` included), in step order
    operators: tuple[dict, ...] = ()

    @property
    def families(self) -> list[dict]:
        """The steps' operators that are families (their values are chosen per suggestion)."""
        return [o for o in self.operators if o.get("ranges")]

    def as_json(self) -> dict[str, Any]:
        return {"models": self.models, "base": self.base, "steps": self.steps}

    @classmethod
    def from_json(cls, data: dict) -> "Recipe":
        return cls(list(data["models"]), data.get("base"), list(data["steps"]))

    def merge(self, out: str | Path, **kwargs: Any):
        """Run the merge into ``out`` with the streaming executor (``kwargs``: its options: device, seed, dtype,
        force, ...); returns its :class:`~.executor.MergeResult`."""
        from . import executor

        paths = [m["path"] for m in self.models]
        base = self.base["path"] if self.base else None
        names = [s.get("operator") for s in self.steps]
        if len(self.steps) == 1:
            s = self.steps[0]
            params, per_model = per_model_params(s["params"], len(paths))
            return executor.merge_pair(paths, s["method"], params, out, base=base, operator=names[0],
                                       per_model=per_model, **kwargs)
        return executor.merge_chain_pairs(paths, [(s["method"], s["params"]) for s in self.steps], out, base=base,
                                          operators=names, **kwargs)


def per_model_params(params: dict, n: int) -> tuple[dict, list[dict] | None]:
    """A step's parameters as the executor takes them: a value given as a list of ``n`` values (one per model, a
    group's focused weights) becomes each model's own parameter (mergekit's per-model ``parameters``; a list in a
    mergekit config's parameter would be a gradient over layers instead). Returns ``(global params, per_model or
    None)``."""
    listed = {k: v for k, v in params.items() if isinstance(v, (list, tuple))}
    if not listed:
        return params, None
    for k, v in listed.items():
        if len(v) != n:
            raise InvalidInput(f"parameter {k!r} has {len(v)} values for {n} models")
    rest = {k: v for k, v in params.items() if k not in listed}
    return rest, [{k: v[i] for k, v in listed.items()} for i in range(n)]


def build(catalog, models: Sequence[str], operators: Sequence[str],
          params: Sequence[dict] | None = None) -> Recipe:
    """The recipe of catalog ``models`` merged by catalog ``operators`` (one operator: one merge of all the models;
    several: a chain, one fewer than the models). ``params`` replaces each operator's parameters (the values a
    decision chose for a family). ``catalog`` is anything with ``model(name)`` and ``operator(name)``: a
    :class:`~.catalog.Catalog` or a :class:`~.backend.Backend`.

    Raises :class:`~.errors.NotFound` for an unknown name and :class:`InvalidInput` when the models have
    different bases or the counts do not fit."""
    names = [m.strip() for m in models if m and m.strip()]
    op_names = [o.strip() for o in operators if o and o.strip()]
    if not names:
        raise InvalidInput("a merge needs models")
    if not op_names:
        raise InvalidInput("a merge needs an operator")
    if len(op_names) > 1 and len(op_names) != len(names) - 1:
        raise InvalidInput(f"a chain of {len(names)} models needs {len(names) - 1} operators, got {len(op_names)}")
    rows = [catalog.model(n) for n in names]
    ops = [catalog.operator(o) for o in op_names]
    if params is not None:
        if len(params) != len(ops):
            raise InvalidInput(f"{len(ops)} operators need {len(ops)} parameter sets, got {len(params)}")
        ops = [dict(o, params=p) for o, p in zip(ops, params)]
    bases = {r["base"] for r in rows}
    if len(bases) > 1:
        raise InvalidInput(f"the models do not share one base ({', '.join(sorted(map(str, bases)))})")
    base_name = bases.pop()
    base = catalog.model(base_name) if base_name else None
    return Recipe(
        models=[{"name": r["name"], "path": r["path"], "fingerprint": r["fingerprint"]} for r in rows],
        base=None if base is None else {"name": base["name"], "path": base["path"],
                                        "fingerprint": base["fingerprint"]},
        steps=[{"method": o["method"], "params": o["params"], "operator": o["name"]} for o in ops],
        operators=tuple(ops))
