"""Candidates: every (target, ordered pair, operator) the engine may suggest, with its context and arm descriptor.

A candidate's context ``x`` is the pair's similarity features on the target's probe sets plus metadata
(:mod:`.context`); its arm descriptor ``z`` describes the operator (:mod:`.descriptor`). A candidate set is built
once per target and cached while the catalog, the weights on disk and the arm schema stay the same.
:class:`CandidateIndex` is the part of :class:`~.engine.Engine` that builds and caches them.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
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
    """One target's candidates, pair-major (every pair with every operator setting, in order): contexts ``X``,
    descriptors ``Z``, arm names, and which pair and operator each row is."""

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

    def __post_init__(self):
        if self.op_index is None:
            self.op_index = np.tile(np.arange(len(self.operators)), len(self.pairs))

    def __len__(self) -> int:
        return len(self.arms)

    def params(self, i: int) -> dict:
        """The concrete parameters of candidate ``i``."""
        return self.operators[self.op_index[i]]["params"]

    def without(self, exclude: set[tuple]) -> "CandidateSet":
        """The candidates not in ``exclude`` (``(models, operator name, params key)`` with
        :func:`params_key`), as a new set."""
        keys = [(o["name"], params_key(o["params"])) for o in self.operators]
        keep = [i for i in range(len(self.arms))
                if (tuple(self.pairs[self.pair_index[i]]), *keys[self.op_index[i]]) not in exclude]
        if not keep:
            raise InvalidInput(f"every candidate merge for target {self.task} has been tried")
        idx = np.array(keep)
        return CandidateSet(self.task, self.pairs, self.operators, self.X[idx], self.Z[idx],
                            [self.arms[i] for i in keep], self.pair_index[idx], self.names, self.feature_schema,
                            self.target, self.op_index[idx])

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
        ops = self._expand(ops)
        n_p, n_o = len(pairs), len(ops)
        X = np.repeat(x_pairs, n_o, axis=0)
        zs = np.stack([operator_descriptor(o) for o in ops])
        Z = np.tile(zs, (n_p, 1))
        from .families import arm_name

        arms = [arm_name(o, o["params"]) for o in ops] * n_p
        return CandidateSet(target.key, pairs, ops, X, Z, arms, np.repeat(np.arange(n_p), n_o), names, _schema(),
                            target)

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
