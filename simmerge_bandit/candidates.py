"""Candidates: every (target, models, operator) the engine may suggest, with its context and arm descriptor.

The models of a candidate are an ordered pair, or the target's *group*: every model tagged with one of the
target's tasks (when there are at least three, sharing a base), merged at once by an operator that combines that
many models, as mergekit-evolve merges a target's experts, or the group less one model (:func:`group_sets`). A
candidate's context ``x`` is the pair's similarity features on the target's probe sets plus metadata
(:mod:`.context`); a group's is the mean of its ordered pairs' contexts. Its arm descriptor ``z`` describes
the operator (:mod:`.descriptor`). A candidate set is built once per target and cached while the catalog, the
weights on disk and the arm schema stay the same. A group's settings name their scaled weight
(``ties_d0.5[weight=0.5]``): a setting is an arm of its own.
:class:`CandidateIndex` is the part of :class:`~.engine.Engine` that builds and caches them.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from functools import cached_property
from typing import Sequence

import numpy as np

from . import descriptor
from .context import pair_contexts
from .context import schema as context_schema
from .descriptor import operator_descriptor
from .errors import InvalidInput
from .target import Target


def _schema() -> str:
    """The context schema that contexts are built with now (stored with decisions and snapshots)."""
    return context_schema()


@dataclass
class CandidateSet:
    """One target's candidates, pair-major (every pair with every operator setting, in order, then each group with
    the operator settings that can merge it): contexts ``X``, descriptors ``Z``, arm names, and which models
    (``pair_index`` into ``pairs + groups``) and operator each row is."""

    task: str                # the target's key (a task name for a single-task target)
    pairs: list[tuple[str, str]]
    operators: list[dict]
    X: np.ndarray            # (n_pairs * n_ops, d)
    Z: np.ndarray            # (n_pairs * n_ops, k)
    arms: list[str]
    pair_index: np.ndarray   # candidate -> pair
    names: list[str]         # context names
    feature_schema: str
    target: Target | None = None
    #: candidate -> its entry of ``operators`` (pair-major: every pair has all of them, in order), which holds
    #: the concrete parameters (a family's operator appears once per parameter setting it offers)
    op_index: np.ndarray | None = None
    #: n-way candidates' model sets (after the pairs in ``pair_index``): each group, then its subsets
    groups: list[tuple[str, ...]] = field(default_factory=list)
    #: rows 0 .. pair_rows-1 are every pair with every operator, in order (None for a subset)
    pair_rows: int | None = None
    #: how many of ``operators`` each pair has (the first ones; the rest are the groups' settings)
    pair_ops: int | None = None

    def __post_init__(self):
        if self.pair_ops is None:
            self.pair_ops = len(self.operators)
        if self.op_index is None:
            self.op_index = np.tile(np.arange(len(self.operators)), len(self.pairs))
            self.pair_rows = len(self.pairs) * len(self.operators)

    def __len__(self) -> int:
        return len(self.arms)

    def models_of(self, i: int) -> tuple[str, ...]:
        """The models candidate ``i`` merges (a pair, or a group)."""
        k = int(self.pair_index[i])
        return self.pairs[k] if k < len(self.pairs) else self.groups[k - len(self.pairs)]

    @property
    def full_groups(self) -> list[tuple[str, ...]]:
        """The groups that are no other group's subset (one per base)."""
        return [g for g in self.groups if not any(len(h) > len(g) and set(g) <= set(h) for h in self.groups)]

    def params(self, i: int) -> dict:
        """The concrete parameters of candidate ``i``."""
        return self.operators[self.op_index[i]]["params"]

    def without(self, exclude: set[tuple]) -> "CandidateSet":
        """The candidates not in ``exclude`` (``(models, operator name, params key)`` with
        :func:`params_key`), as a new set."""
        keys = [(o["name"], params_key(o["params"])) for o in self.operators]
        keep = [i for i in range(len(self.arms))
                if (tuple(self.models_of(i)), *keys[self.op_index[i]]) not in exclude]
        if not keep:
            raise InvalidInput(f"every candidate merge for target {self.task} has been tried")
        return self._subset(keep)

    def within(self, models: set[tuple[str, ...]]) -> "CandidateSet":
        """The candidates whose models are one of ``models`` (tuples, in merge order), as a new set;
        :class:`InvalidInput` when none is."""
        keep = [i for i in range(len(self.arms)) if tuple(self.models_of(i)) in models]
        if not keep:
            raise InvalidInput(f"no candidate merge for target {self.task} among the models asked for")
        return self._subset(keep)

    def settings(self, settings: Sequence[tuple[tuple[str, ...], dict, str]]) -> "CandidateSet":
        """A set of just ``settings``: ``(models, operator, arm)`` with ``models`` one of this set's model tuples and
        ``operator`` a catalog operator with concrete ``params`` that need not be among this set's (a search's
        moves of one member's weight around its best merge, :func:`reweighted`). Each row has its models'
        context and its own descriptor. :class:`InvalidInput` when a model tuple is not a candidate here."""
        if not settings:
            raise InvalidInput(f"no settings to rank for target {self.task}")
        sets = [*self.pairs, *self.groups]  # what pair_index indexes
        rows = []
        for models, _op, _arm in settings:
            first = np.flatnonzero(self.pair_index == sets.index(tuple(models))) if tuple(models) in sets else []
            if len(first) == 0:
                raise InvalidInput(f"{'+'.join(models)} is not a candidate merge for target {self.task}")
            rows.append(int(first[0]))
        ops = [op for _m, op, _a in settings]
        return CandidateSet(self.task, self.pairs, ops, self.X[rows], np.stack([operator_descriptor(o) for o in ops]),
                            [a for _m, _o, a in settings], self.pair_index[rows], self.names, self.feature_schema,
                            self.target, np.arange(len(ops)), self.groups, None, self.pair_ops)

    def _subset(self, keep: list[int]) -> "CandidateSet":
        idx = np.array(keep)
        return CandidateSet(self.task, self.pairs, self.operators, self.X[idx], self.Z[idx],
                            [self.arms[i] for i in keep], self.pair_index[idx], self.names, self.feature_schema,
                            self.target, self.op_index[idx], self.groups, None, self.pair_ops)

    @cached_property
    def ranked(self):
        """The candidates as one validated :class:`~simmerge_bandit.policies.Candidates` (checked once per set, not
        once per suggestion: the finiteness check of 1,320 x 67 values was a tenth of a suggestion's time)."""
        from .policies import Candidates

        return Candidates(X=self.X, arms=self.arms, Z=self.Z)

    def names_json(self, names: tuple[str, ...]) -> str:
        """``json.dumps(list(names))``, remembered for this set (a decision row stores its models and operators
        as JSON; the same few hundred lists recur in every suggestion)."""
        memo = self.__dict__.setdefault("_names_json", {})
        out = memo.get(names)
        if out is None:
            out = memo[names] = json.dumps(list(names))
        return out


def group_operator(op: dict, n: int) -> dict:
    """An operator as it merges a group of ``n`` models: each model's ``weight`` (when the method has one and the
    operator does not choose it from a range) is 2/n of the operator's, so the group's task vectors weigh what a
    pair's two do and a parameter (a task-arithmetic lambda, a density) means the same for both (four task
    vectors at full weight overshoot as a pair at twice its lambda would; mergekit-evolve starts from 1/n)."""
    from .methods import get_method

    spec = get_method(op["method"])
    if "weight" in (op.get("ranges") or {}) or "weight" not in {p.name for p in spec.params}:
        return op
    w = float(op["params"].get("weight", spec.param("weight").default))
    return {**op, "params": {**op["params"], "weight": round(w * 2.0 / n, 6)}}


#: The group settings that weigh each member by its known score on the target (besides the uniform one): member
#: ``i`` gets a weight proportional to ``exp(focus * (s_i - max s))``, ``s_i`` its known score over the best
#: member's (:func:`focused_weights`). mergekit-evolve's best genomes weigh a few members much more than the
#: rest; these settings reach that region without a search over every weight. Chosen after an exploration on the
#: search benchmark's held-out targets of the realistic zoo's seed 0 (focus 0, 4, 8, 16 and 32 tried; docs/search.md
#: says so beside the figures).
FOCUS = (8.0, 32.0)


def focused_weights(weight: float, scores: Sequence[float], focus: float) -> list[float]:
    """Per-model weights of a group whose uniform setting gives every member ``weight``, tilted by ``focus``
    towards the members with the best known ``scores``: proportional to ``exp(focus * (s_i - max s))`` and
    summing to what the uniform weights sum to (``len(scores) * weight``), each rounded to 1e-4.

    >>> focused_weights(0.5, [1.0, 0.9, 0.5], 8.0)
    [1.022, 0.4592, 0.0187]
    """
    s = np.asarray(scores, dtype=np.float64)
    e = np.exp(focus * (s - s.max()))
    return [round(float(v), 4) for v in e / e.sum() * weight * len(s)]


#: A search's moves around its best merge when that merge weighs each model (:func:`reweighted`): one member's
#: weight times each factor, the others rescaled so the total stays. mergekit-evolve's CMA-ES moves every weight
#: at once; one member at a time is a coordinate search over the same genome, which the few evaluations of a
#: budget can afford and a reader can follow. Set from first principles (a doubling and a halving), not tuned.
REWEIGHT = (2.0, 0.5)


def reweighted(weights: Sequence[float], factor: float, i: int) -> list[float]:
    """``weights`` with member ``i``'s multiplied by ``factor`` and all of them rescaled to the same total, each
    rounded to 1e-4 (as :func:`focused_weights`).

    >>> reweighted([1.0, 1.0, 1.0], 2.0, 0)
    [1.5, 0.75, 0.75]
    """
    w = np.asarray(weights, dtype=np.float64)
    moved = w.copy()
    moved[i] *= factor
    return [round(float(v), 4) for v in moved * (w.sum() / moved.sum())]


def relative_known(known: dict[str, dict[str, float]], target: Target) -> dict[str, float]:
    """Each model's known raw scores (``known[model][task]``) over the best of any of them per task, weighted as
    the target weighs its tasks; only the models known on every task of the target."""
    best = {t: max([v[t] for v in known.values() if t in v], default=0.0) for t in target.tasks}
    scores = {m: target.aggregate({t: v[t] / best[t] if best[t] > 0 else v[t] for t in target.tasks if t in v})
              for m, v in known.items()}
    return {m: x for m, x in scores.items() if x is not None}


def weighs_each_model(op: dict) -> bool:
    """Whether ``op`` (a group's setting) has a per-model ``weight`` that no range of its own chooses."""
    from .methods import get_method

    if "weight" in (op.get("ranges") or {}):
        return False
    return any(p.name == "weight" and p.scope == "model" for p in get_method(op["method"]).params)


#: The most models a group merges at once: a base with more models tagged for the target gives a group of the
#: ones with the best known scores on it (a catalog of many fine-tunes would otherwise merge all of them, and
#: offer as many subsets that each merge all but one).
MAX_GROUP = 8


def tagged(tags_of: dict[str, set[str]], want: set[str]) -> tuple[str, ...]:
    """The models of ``tags_of`` (in its order) tagged with one of the tasks ``want``: a group before its cap."""
    return tuple(m for m, tags in tags_of.items() if tags & want)


def group_sets(tags_of: dict[str, set[str]], want: set[str],
               score: dict[str, float] | None = None) -> list[tuple[str, ...]]:
    """The n-way model sets of a target among models sharing a base (``tags_of``: each model's tagged tasks, in
    order): its *group*, every model tagged with one of the target's tasks ``want`` when there are at least three
    (two are a pair), then, when the group has four or more, each subset that leaves one model out and still
    covers every task the group covers (a group's weakest member can cost more than the others add; see the
    search benchmark's page). The full group comes first.

    More than :data:`MAX_GROUP` tagged models: the group is the :data:`MAX_GROUP` with the highest ``score`` (a
    model's known score on the target; a model without one ranks below every scored one; ties by order), kept in
    their order."""
    group = tagged(tags_of, want)
    if len(group) > MAX_GROUP:
        score = score or {}
        ranked = sorted(range(len(group)), key=lambda i: (group[i] not in score, -score.get(group[i], 0.0), i))
        group = tuple(group[i] for i in sorted(ranked[:MAX_GROUP]))
    if len(group) < 3:
        return []
    covers = set().union(*(tags_of[m] & want for m in group))
    out = [group]
    if len(group) >= 4:
        for drop in group:
            rest = tuple(m for m in group if m != drop)
            if set().union(*(tags_of[m] & want for m in rest)) == covers:
                out.append(rest)
    return out


def params_key(params: dict) -> str:
    """Canonical text of a parameter dict (tells two settings of one family apart)."""
    return json.dumps(params, sort_keys=True)


class CandidateIndex:
    """Targets, pairs and candidate sets of an engine (a part of :class:`~.engine.Engine`: it uses the engine's
    ``store``, ``catalog``, ``lock`` and its caches, set up in ``Engine.__init__``)."""

    def target(self, tasks: str | Sequence[str] | Target, weights: dict | None = None) -> Target:
        """The target of ``tasks`` (names, or a target key) and ``weights``, its tasks checked against the catalog
        (:class:`NotFound` for an unknown one)."""
        if isinstance(tasks, Target):
            target = tasks
        elif isinstance(tasks, str):
            target = Target.parse(tasks) if weights is None else Target.of([tasks], weights)
        else:
            target = Target.of(list(tasks), weights)
        version = self.catalog.version()
        if self._task_names is None or self._task_names[0] != version:
            # read once per catalog version: a query inside the daemon's batch would take it off the journal
            self._task_names = (version, {r[0] for r in self.store.fetchall("SELECT name FROM tasks")})
        for t in target.tasks:
            if t not in self._task_names[1]:
                self.catalog.task(t)  # a clear NotFound
        return target

    def pairs(self, target: str | Target) -> list[tuple[str, str]]:
        """Ordered pairs of distinct catalog models that share a base model.

        When some models are tagged as fine-tuned for tasks of the target, the candidates are the pairs whose
        tags together cover every task of the target (a merge for {A, B} merges what knows A with what knows B),
        or, when no pair covers it, the pairs with at least one tagged model: merging two models that know
        nothing of the target teaches nothing about merging for it.
        """
        target = self.target(target)
        want = set(target.tasks)
        by_base: dict[str, list[str]] = {}
        tags_of: dict[str, set[str]] = {}
        for name, base, tags in self.store.fetchall("SELECT name, base, tasks FROM models ORDER BY added_at, name"):
            if base:
                by_base.setdefault(base, []).append(name)
                tags_of[name] = want & set(json.loads(tags) if tags else [])
        pairs = [(a, b) for names in by_base.values() for a in names for b in names if a != b]
        if not any(tags_of.values()):
            return pairs
        covering = [(a, b) for a, b in pairs if tags_of[a] | tags_of[b] == want]
        return covering or [(a, b) for a, b in pairs if tags_of[a] or tags_of[b]]

    def groups(self, target: str | Target) -> list[tuple[str, ...]]:
        """The target's n-way candidates (:func:`group_sets`, per base, models in the order they were added)."""
        target = self.target(target)
        want = set(target.tasks)
        by_base: dict[str, dict[str, set[str]]] = {}
        for name, base, tags in self.store.fetchall("SELECT name, base, tasks FROM models ORDER BY added_at, name"):
            if base:
                by_base.setdefault(base, {})[name] = set(json.loads(tags) if tags else [])
        score = None
        if any(len(tagged(tags_of, want)) > MAX_GROUP for tags_of in by_base.values()):
            score = self._known_target_scores(target, [m for t in by_base.values() for m in t])
        return [g for tags_of in by_base.values() for g in group_sets(tags_of, want, score)]

    def _known_target_scores(self, target: Target, models: list[str]) -> dict[str, float]:
        """Each model's known scores on the target's tasks (each over the best known score of any of ``models``
        on that task), weighted as the target weighs them, for the models known on all of them."""
        from .context import catalog_meta

        meta = catalog_meta(self.store, models, target.tasks)
        return relative_known({m: v.known for m, v in meta.items()}, target)

    def _catalog_key(self, task: str) -> tuple:
        """What a task's candidate set depends on; a change of any of it (a model's weights, an operator, the
        probe set) gives a new key. Read once per store transaction: the calls a caller groups in one transaction
        (the daemon's group commit) all see the catalog as the first of them read it."""
        txn = self.store.transaction_id()
        memo = self._key_memo.get(task)
        if txn is not None and memo is not None and memo[0] == txn:
            return memo[1]
        version = self.catalog.version()
        paths = self._paths.get(version)
        if paths is None:
            self.target(task)  # a clear NotFound for an unknown task
            paths = [r[0] for r in self.store.fetchall("SELECT path FROM models ORDER BY name")]
            self._paths = {version: paths}
        key = task, version, self._weight_files(paths), descriptor.current().version
        if txn is not None:
            self._key_memo[task] = (txn, key)
        return key

    def _weight_files(self, paths: list[str]) -> tuple:
        """Name, size and mtime of every model's weight files, so weights changed on disk are not served from the
        cache (signals re-check them). Read again at most every ``file_check_s`` seconds."""
        now = time.monotonic()
        memo = self._files_memo
        if memo is not None and memo[0] == paths and now - memo[1] < self.file_check_s:
            return memo[2]
        stats = []
        for p in paths:
            try:
                for f in os.scandir(p):
                    if f.name.endswith(".safetensors"):
                        st = f.stat()
                        stats.append((f.name, st.st_size, st.st_mtime_ns))
            except OSError:
                stats.append((p, None))
        out = tuple(stats)
        self._files_memo = (paths, now, out)
        return out

    def candidates(self, task: str | Target, operators: Sequence[str] | None = None) -> CandidateSet:
        """Every (ordered pair, operator) candidate of ``task`` (a task, a target or its key) with its context and
        descriptor.

        Cached per task while the catalog stays the same, so a suggestion costs a ranking, not a feature pass.
        """
        if isinstance(task, Target):
            task = task.key
        if operators:
            return self._build_candidates(task, operators)
        with self.lock:
            key = self._catalog_key(task)
            hit = self._cand_cache.get(task)
            if hit is not None and hit[0] == key:
                return hit[1]
            cs = self._build_candidates(task, None)
            self._cand_cache[task] = (key, cs)
            return cs

    def _build_candidates(self, task: str, operators: Sequence[str] | None) -> CandidateSet:
        target = self.target(task)
        ops = [self.catalog.operator(o) for o in operators] if operators else self.catalog.operators(active_only=True)
        if not ops:
            raise InvalidInput("no active operators: add one with `simmerge operator add`")
        pairs = self.pairs(target)
        if not pairs:
            raise InvalidInput(f"no candidate pairs for target {target.key}: register at least two models with "
                               f"the same --base")
        x_pairs, names = pair_contexts(self.store, pairs, target)
        catalog_params = {o["name"]: o["params"] for o in ops}
        ops = self._expand(ops)
        n_p, n_o = len(pairs), len(ops)
        X = np.repeat(x_pairs, n_o, axis=0)
        zs = np.stack([operator_descriptor(o) for o in ops])
        Z = np.tile(zs, (n_p, 1))
        from .families import arm_name

        op_arms = [arm_name(o, o["params"]) for o in ops]
        arms = op_arms * n_p
        pair_index, op_index = np.repeat(np.arange(n_p), n_o), np.tile(np.arange(n_o), n_p)
        from .methods import get_method

        groups = [g for g in self.groups(target) if any(get_method(o["method"]).merges(len(g)) for o in ops)]
        xs, zl, pi, oi = [X], [Z], [pair_index], [op_index]
        all_ops = list(ops)
        member_x: dict[tuple[str, str], np.ndarray] = {}
        for g, models in enumerate(groups):
            g_ops = [group_operator(o, len(models)) for o in ops if get_method(o["method"]).merges(len(models))]
            g_ops += self._focused(target, models, g_ops)
            members = [(a, b) for a in models for b in models if a != b]
            missing = [m for m in members if m not in member_x]
            if missing:  # a subset's ordered pairs are its full group's: computed once
                member_x.update(zip(missing, pair_contexts(self.store, missing, target)[0]))
            x_group = np.mean([member_x[m] for m in members], axis=0)
            xs.append(np.repeat(x_group[None, :], len(g_ops), axis=0))
            zl.append(np.stack([operator_descriptor(o) for o in g_ops]))
            pi.append(np.full(len(g_ops), n_p + g))
            oi.append(np.arange(len(all_ops), len(all_ops) + len(g_ops)))
            all_ops.extend(g_ops)
            arms.extend(arm_name(o, o["params"], catalog_params[o["name"]]) for o in g_ops)
        return CandidateSet(target.key, pairs, all_ops, np.vstack(xs), np.vstack(zl), arms, np.concatenate(pi),
                            names, _schema(), target, np.concatenate(oi), groups, n_p * n_o, n_o)

    def _focused(self, target: Target, models: tuple[str, ...], g_ops: list[dict]) -> list[dict]:
        """A group's settings weighted by its members' known scores on the target (:data:`FOCUS`): one per focus
        and per setting with a per-model weight; none when a member has no known score or all score alike."""
        known = self._known_target_scores(target, list(models)) if FOCUS else {}
        if any(m not in known for m in models):
            return []
        scores = [known[m] for m in models]
        if max(scores) - min(scores) <= 1e-9:
            return []
        out = []
        for f in FOCUS:
            for o in g_ops:
                if weighs_each_model(o):
                    w = focused_weights(float(o["params"].get("weight", 1.0)), scores, f)
                    out.append({**o, "params": {**o["params"], "weight": w}})
        return out

    @staticmethod
    def _expand(ops: list[dict]) -> list[dict]:
        """Operators as candidates: a family (an operator with ranges) becomes one entry per parameter setting it
        offers (:func:`.families.draws`), each with those concrete ``params``."""
        from .families import draws

        out = []
        for o in ops:
            if o.get("ranges"):
                out.extend({**o, "params": p} for p in draws(o))
            else:
                out.append(o)
        return out
