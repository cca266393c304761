"""Metadata rules: operator choices that need no model, only what a catalog already knows about a merge.

A rule sees one ordered case (:class:`Case`): which tasks each source is tagged with, each source's known raw
score on the target's tasks, the base's, the target itself, and the operators on offer (``{name, method,
params}`` dicts). It returns an operator name. Rules are the simple baselines a learned policy has to beat: if
"slerp towards the model tagged with the task" already picks the best operator, similarity signals add nothing.

Rules with a free choice (how far towards the preferred model, which operator per class of cases) are fitted on
training cases whose outcome is known (``R[i, k]``: the value of operator ``k`` on case ``i``, e.g. its
normalized score on the target); fitting picks the choice with the best mean value on those cases, ties to
the earlier candidate. A fitted rule can then be applied to cases it never saw:

>>> rule = fit_rule("weaker", train_cases, R_train, operators)        # doctest: +SKIP
>>> [rule.choose(c, operators) for c in held_out_cases]               # doctest: +SKIP
['slerp_t0.7', 'slerp_t0.3', ...]

Registered rules (:data:`RULES`):

- ``fixed``: one operator everywhere, the one with the best mean on the training cases (the reference every
  other rule is measured against).
- ``tag``: slerp towards the source tagged with more of the target's weight (for a one-task target: the model
  tagged with the task); the distance from it is fitted; no preference gives t = 0.5.
- ``weaker`` / ``stronger``: slerp towards the source with the lower / higher known score on the target
  (weighted mean of its raw scores on the target's tasks); the distance is fitted.
- ``lookup``: the best operator per metadata class, fitted; class = (number of sources, which source is
  strongest by known score, whether each source is tagged with every target task); an unseen class gets the
  fixed rule's operator.

The slerp rules are defined for pairs (slerp merges two models); on other cases they choose like ``fixed``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import numpy as np

from .errors import InvalidInput

#: Differences of known scores below this count as a tie (scores are fractions of a few hundred examples).
EPS = 1e-9


@dataclass(frozen=True)
class Case:
    """What a rule may know about one merge: catalog metadata only, no model.

    ``sources`` are the model names in merge order; ``tags[i]`` the tasks source ``i`` is tagged with;
    ``scores[i]`` its known raw score per target task (missing: unknown); ``target`` maps task -> weight.
    """

    sources: tuple[str, ...]
    tags: tuple[frozenset[str], ...]
    scores: tuple[Mapping[str, float], ...]
    target: Mapping[str, float]
    base_scores: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self):
        n = len(self.sources)
        if n < 2 or len(self.tags) != n or len(self.scores) != n:
            raise InvalidInput(f"a case needs at least two sources, each with tags and scores (got {n} sources, "
                               f"{len(self.tags)} tag sets, {len(self.scores)} score maps)")
        if not self.target or any(w < 0 for w in self.target.values()) or sum(self.target.values()) <= 0:
            raise InvalidInput(f"a target needs tasks with non-negative weights summing above 0, got "
                               f"{dict(self.target)}")

    def tagged_weight(self, i: int) -> float:
        """Share of the target's weight on tasks source ``i`` is tagged with."""
        return sum(w for t, w in self.target.items() if t in self.tags[i]) / sum(self.target.values())

    def known_score(self, i: int) -> float:
        """Weighted mean of source ``i``'s known raw scores on the target's tasks (unknown counts as 0)."""
        return sum(w * (self.scores[i].get(t) or 0.0) for t, w in self.target.items()) / sum(self.target.values())

    def strongest(self) -> int | None:
        """Index of the source with the highest known score, None on a tie at the top."""
        s = [self.known_score(i) for i in range(len(self.sources))]
        top = max(s)
        best = [i for i, x in enumerate(s) if top - x <= EPS]
        return best[0] if len(best) == 1 else None


def _names(operators: Sequence[Mapping]) -> list[str]:
    return [o["name"] for o in operators]


def _check(cases: Sequence[Case], R, operators: Sequence[Mapping]) -> np.ndarray:
    R = np.asarray(R, dtype=float)
    if R.shape != (len(cases), len(operators)) or not len(cases):
        raise InvalidInput(f"fitting needs one row of values per case and one column per operator: got "
                           f"{R.shape} for {len(cases)} cases and {len(operators)} operators")
    if np.isnan(R).any():
        raise InvalidInput("fitting needs a value for every (case, operator); the matrix has missing values")
    return R


class Rule:
    """A metadata rule. ``fit`` returns a fitted copy; ``choose`` names an operator for a case."""

    name = "rule"

    def fit(self, cases: Sequence[Case], R, operators: Sequence[Mapping]) -> "Rule":
        raise NotImplementedError

    def choose(self, case: Case, operators: Sequence[Mapping]) -> str:
        raise NotImplementedError

    def fitted(self) -> dict:
        """What fitting chose, as JSON-ready data."""
        return {}


class Fixed(Rule):
    """One operator everywhere: the best mean on the training cases."""

    name = "fixed"

    def __init__(self, operator: str | None = None):
        self.operator = operator

    def fit(self, cases, R, operators):
        R = _check(cases, R, operators)
        return Fixed(_names(operators)[int(np.argmax(R.mean(0)))])

    def choose(self, case, operators):
        if self.operator is None:
            raise InvalidInput("rule 'fixed' is not fitted")
        if self.operator not in _names(operators):
            raise InvalidInput(f"rule 'fixed' chose {self.operator!r}, which is not among the operators offered")
        return self.operator

    def fitted(self):
        return {"operator": self.operator}


def _slerp_ts(operators: Sequence[Mapping]) -> dict[str, float]:
    return {o["name"]: float(o["params"].get("t", 0.5)) for o in operators if o["method"] == "slerp"}


def _nearest_slerp(operators: Sequence[Mapping], t: float) -> str:
    ts = _slerp_ts(operators)
    if not ts:
        raise InvalidInput("a slerp rule needs at least one slerp operator among those offered")
    # The nearest t; on equal distance the smaller t, then the earlier name (a fixed order, never a coin).
    # Distances rounded, so that 0.3 and 0.7 are equally far from 0.5 in floating point too.
    return min(ts, key=lambda n: (round(abs(ts[n] - t), 9), ts[n], n))


class SlerpTowards(Rule):
    """Slerp towards the source a side function prefers, ``distance`` away from it (fitted).

    slerp takes the first source as its base (t=0 gives it), so towards the first source means t=distance and
    towards the second t=1-distance; no preference means t=0.5. Candidate distances are the offered slerp
    t values up to 0.5.
    """

    def __init__(self, name: str, side: Callable[[Case], int | None], distance: float | None = None,
                 fallback: str | None = None):
        self.name = name
        self.side = side
        self.distance = distance
        self.fallback = fallback

    def _t(self, case: Case, distance: float) -> float:
        s = self.side(case)
        return 0.5 if s is None else distance if s == 0 else 1.0 - distance

    def fit(self, cases, R, operators):
        R = _check(cases, R, operators)
        names = _names(operators)
        fixed = Fixed().fit(cases, R, operators).operator
        pairs = [i for i, c in enumerate(cases) if len(c.sources) == 2]
        candidates = sorted({t for t in _slerp_ts(operators).values() if t <= 0.5})
        if not candidates:
            raise InvalidInput(f"rule {self.name!r} needs a slerp operator with t <= 0.5 among those offered")
        best, best_mean = candidates[0], -np.inf
        for d in candidates:
            mean = np.mean([R[i, names.index(_nearest_slerp(operators, self._t(cases[i], d)))] for i in pairs]) \
                if pairs else 0.0
            if mean > best_mean + EPS:
                best, best_mean = d, mean
        return SlerpTowards(self.name, self.side, best, fixed)

    def choose(self, case, operators):
        if self.distance is None:
            raise InvalidInput(f"rule {self.name!r} is not fitted")
        if len(case.sources) != 2:
            return Fixed(self.fallback).choose(case, operators)
        return _nearest_slerp(operators, self._t(case, self.distance))

    def fitted(self):
        return {"distance": self.distance, "fallback": self.fallback}


def _side_tag(case: Case) -> int | None:
    w = [case.tagged_weight(i) for i in range(2)]
    return None if abs(w[0] - w[1]) <= EPS else int(w[1] > w[0])


def _side_stronger(case: Case) -> int | None:
    s = [case.known_score(i) for i in range(2)]
    return None if abs(s[0] - s[1]) <= EPS else int(s[1] > s[0])


def _side_weaker(case: Case) -> int | None:
    s = _side_stronger(case)
    return None if s is None else 1 - s


def metadata_class(case: Case) -> str:
    """The class ``lookup`` keys on: sources, strongest source by known score, tagged-with-every-target-task."""
    strongest = case.strongest()
    full = "".join("T" if set(case.target) <= case.tags[i] else "-" for i in range(len(case.sources)))
    return f"n{len(case.sources)}|strong={'tie' if strongest is None else strongest}|tags={full}"


class Lookup(Rule):
    """The best operator per :func:`metadata_class`, fitted on training cases; unseen classes get ``fixed``."""

    name = "lookup"

    def __init__(self, table: Mapping[str, str] | None = None, fallback: str | None = None):
        self.table = dict(table or {})
        self.fallback = fallback

    def fit(self, cases, R, operators):
        R = _check(cases, R, operators)
        names = _names(operators)
        classes: dict[str, list[int]] = {}
        for i, c in enumerate(cases):
            classes.setdefault(metadata_class(c), []).append(i)
        table = {k: names[int(np.argmax(R[idx].mean(0)))] for k, idx in sorted(classes.items())}
        return Lookup(table, Fixed().fit(cases, R, operators).operator)

    def choose(self, case, operators):
        if self.fallback is None:
            raise InvalidInput("rule 'lookup' is not fitted")
        op = self.table.get(metadata_class(case), self.fallback)
        if op not in _names(operators):
            op = self.fallback
        return Fixed(op).choose(case, operators)

    def fitted(self):
        return {"classes": dict(self.table), "fallback": self.fallback}


#: name -> factory of an unfitted rule
RULES: dict[str, Callable[[], Rule]] = {
    "fixed": Fixed,
    "tag": lambda: SlerpTowards("tag", _side_tag),
    "weaker": lambda: SlerpTowards("weaker", _side_weaker),
    "stronger": lambda: SlerpTowards("stronger", _side_stronger),
    "lookup": Lookup,
}

#: rules that choose among slerp operators on pairs (they say nothing new about 3-way merges)
PAIR_RULES = ("tag", "weaker", "stronger")


def get_rule(name: str) -> Rule:
    """An unfitted rule by name."""
    try:
        return RULES[name]()
    except KeyError:
        raise InvalidInput(f"unknown rule {name!r}; known: {', '.join(RULES)}") from None


def fit_rule(name: str, cases: Sequence[Case], R, operators: Sequence[Mapping]) -> Rule:
    """Rule ``name`` fitted on ``cases`` with known values ``R`` (cases x operators, in ``operators``' order)."""
    return get_rule(name).fit(cases, R, operators)


def choices(rule: Rule, cases: Sequence[Case], operators: Sequence[Mapping]) -> list[str]:
    """The operator ``rule`` names for each case."""
    return [rule.choose(c, operators) for c in cases]


def rule_values(rule: Rule, cases: Sequence[Case], R, operators: Sequence[Mapping]) -> np.ndarray:
    """Value ``R[i, chosen operator]`` of the rule's choice on each case."""
    R = np.asarray(R, dtype=float)
    names = _names(operators)
    return np.array([R[i, names.index(op)] for i, op in enumerate(choices(rule, cases, operators))])


def case_from_json(d: Mapping) -> Case:
    """A :class:`Case` from plain data (``sources, tags, scores, target[, base_scores]``)."""
    return Case(tuple(d["sources"]), tuple(frozenset(t) for t in d["tags"]), tuple(dict(s) for s in d["scores"]),
                dict(d["target"]), dict(d.get("base_scores") or {}))


def case_to_json(c: Case) -> str:
    return json.dumps({"sources": list(c.sources), "tags": [sorted(t) for t in c.tags],
                       "scores": [dict(s) for s in c.scores], "target": dict(c.target),
                       "base_scores": dict(c.base_scores)}, sort_keys=True)
