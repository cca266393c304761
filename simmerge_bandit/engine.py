"""The decision engine: candidates, suggestions, decisions, rewards and policy state.

A candidate is (task, ordered models, operator). Its context ``x`` is the pair's similarity features on the task's
probe set (signals module) plus task descriptors; its arm descriptor ``z`` describes the operator (method one-hot and
parameters), so that what is learned about one operator informs similar ones.

Every suggestion is logged as a decision (context, candidate, propensity, policy and version). Rewards are appended
to the log; a policy's state is the fold of the rewards in arrival order (``seq``), snapshotted in ``policy_state``
and caught up from the log tail on load, so ``rebuild`` from the log always gives the live state.

:class:`Engine` is one object made of parts, one module each: :mod:`.candidates` (targets, pairs, candidate sets),
:mod:`.policystore` (snapshots and the fold of the log), :mod:`.predictorfit` (the SimMerge predictor's fit),
:mod:`.decisionlog` (logging decisions, the evaluation budget); this module holds suggest (and chains), feedback
and status.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
import weakref
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from . import descriptor, evalqueue
from .candidates import CandidateIndex, CandidateSet, _schema, params_key  # noqa: F401 (re-exported)
from .catalog import Catalog
from .context import context_names, contexts, pair_contexts  # noqa: F401 (re-exported)
from .decisionlog import (  # noqa: F401
    DECISION_COLUMNS,
    FEEDBACK_FIELDS,
    RECENT_DECISIONS,
    DecisionLog,
    _finite,
)
from .descriptor import LEGACY_PARAMS as OPERATOR_PARAMS  # noqa: F401 (re-exported)
from .descriptor import operator_descriptor  # noqa: F401 (re-exported)
from .errors import Conflict, InvalidInput, NotFound
from .policystore import PolicyStore
from .predictorfit import PredictorFitting
from .store import Store
from .target import Target
from .vectors import vector_key  # noqa: F401 (re-exported)

log = logging.getLogger(__name__)

#: Documented reward range: a normalized score (merged score / best source model's score, clipped to [0, 2]).
REWARD_RANGE = (0.0, 2.0)


def __getattr__(name: str):
    # ARM_NAMES follows the method registry (a method may be registered while the process runs)
    if name == "ARM_NAMES":
        return descriptor.arm_names()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclass(frozen=True)
class EngineConfig:
    """How the engine decides (validated configuration, separate from learned state)."""

    default_policy: str = "linucb-hybrid"
    #: Real evaluations the engine may request per window.
    eval_budget: int = 10
    eval_window_s: float = 24 * 3600.0
    #: Ask for an evaluation of the choice when its uncertainty is at least this, or the policy has fewer than
    #: ``eval_warmup`` rewards.
    eval_threshold: float = 0.05
    eval_warmup: int = 5
    #: Save a policy snapshot every N updates (the log tail is replayed on load, so nothing is lost in between).
    snapshot_every: int = 1
    seed: int = 0

    def __post_init__(self):
        if self.eval_budget < 0 or self.eval_window_s <= 0 or self.snapshot_every < 1:
            raise InvalidInput("eval budget must be >= 0, window > 0, snapshot_every >= 1")


class Engine(CandidateIndex, PolicyStore, PredictorFitting, DecisionLog):
    """Suggest merges, log decisions, learn from rewards.

    >>> eng = Engine(Store.open())                          # doctest: +SKIP
    >>> best = eng.suggest("arith", top=3)[0]               # doctest: +SKIP
    >>> eng.feedback(best["id"], 0.93)                      # doctest: +SKIP
    """

    def __init__(self, store: Store, config: EngineConfig | None = None):
        self.store = store
        self.config = config or EngineConfig()
        self.catalog = Catalog(store)
        self._policies: dict[str, Any] = {}
        self._last_seq: dict[str, int] = {}
        self._since_snapshot: dict[str, int] = {}
        self._snapshots_deferred = 0
        self._cand_cache: dict[str, tuple[tuple, CandidateSet]] = {}
        self._entropy = (b"", 0)  # random bytes not yet used for ids, and the process they were read in
        self._vectors: dict[int, None] | None = None  # keys of the rows in `vectors` (read once, then kept)
        me = weakref.ref(self)

        def forget_vectors() -> None:  # a failed transaction may have held vectors this engine counted as stored
            eng = me()
            if eng is not None:
                eng._vectors = None

        store.on_rollback(forget_vectors)
        self.descriptors = descriptor.Descriptors(store, self.catalog)
        self._arm_version: str | None = None  # the arm schema the loaded policies read descriptors in
        self._task_names: tuple[int, set[str]] | None = None  # (catalog version, task names)
        self._key_memo: dict[str, tuple[int, tuple]] = {}  # task -> (store transaction id, catalog key)
        #: How stale the weight files' stats in a candidate set's key may be: 0 reads them for every store
        #: transaction; the daemon reads them at most once a second (a scandir and a stat per file of every
        #: model cost 14% of its writer thread's time when read for every batch).
        self.file_check_s = 0.0
        self._files_memo: tuple | None = None
        # The last decisions this engine logged, as feedback reads them (a reward often follows its suggestion
        # closely: the daemon's clients); bounded, a miss reads the log.
        self._recent: dict[str, tuple] = {}
        # Rewards of those decisions recorded since (this engine is the only writer: a decision it logged has a
        # reward exactly when it recorded one), so most feedback reads nothing from the store.
        self._rewarded: dict[str, float] = {}
        self._seq: int | None = None  # the highest reward seq in the store, once read
        self._explained: tuple | None = None  # (policy, its n_updates, candidates, {index: explanation})
        #: With ``defer_learning`` (the daemon's group commit), rewards recorded by :meth:`feedback` are folded into
        #: the policies together, before the next use of a policy: one pass over a large shared matrix for all
        #: the rewards of a batch (``Policy.update_many``) instead of one per reward.
        self.defer_learning = False
        #: With ``defer_learning``: deferred rewards wait up to this long (seconds; or until ``LEARN_MAX_PENDING``
        #: wait) before a use of a policy folds them, so that one fold covers many batches. Suggestions made in
        #: the meantime rank without them. 0: every use of a policy folds what waits.
        self.learn_interval_s = 0.0
        self._unlearned: list[tuple[int, tuple, float]] = []  # (seq, logged fields, reward), in seq order
        self._unlearned_since = 0.0  # time.monotonic() of the oldest of them
        self._paths: dict[int, list[str]] = {}
        self._known_seq: int | None = None  # highest reward seq this engine has seen (it is the only writer)
        self._eval_times: list[float] | None = None
        self.lock = threading.RLock()

    def reset(self) -> None:
        """Forget the learned state held in memory, so it is reloaded from the store on next use: for a caller
        whose transaction around engine calls was rolled back after the policies had learned from it."""
        with self.lock:
            self._policies.clear()
            self._last_seq.clear()
            self._since_snapshot.clear()
            self._known_seq = None
            self._eval_times = None
            self._recent.clear()
            self._rewarded.clear()
            self._seq = None
            self._explained = None
            self._unlearned.clear()
            self._vectors = None

    def suggest(self, task: str | Sequence[str] | Target, top: int = 5, policy: str | None = None,
                chain: int | None = None, weights: dict | None = None, *,
                exclude: set[tuple[tuple[str, ...], str]] | None = None,
                within: set[tuple[str, ...]] | None = None, queue: bool = True,
                moves: Sequence[tuple[tuple[str, ...], dict, str]] | None = None) -> list[dict]:
        """Rank candidate merges for a target (a task name, several task names with optional ``weights``, a
        :class:`~simmerge_bandit.target.Target` or its key); log each returned entry as a decision. The first is
        the choice. Each suggestion's reward is the target-weighted mean of the merge's normalized scores.

        ``exclude``: candidates ``(models, operator)`` not to rank (a search's tried merges); ``within``: rank only
        the candidates that merge one of these model tuples (a pair, or a group of the target's tagged models).
        ``queue=False``: the caller evaluates the suggestions itself (a search), so none goes to the evaluation
        queue. ``moves``: rank these settings ``(models, operator with concrete params, arm name)`` instead of the
        catalog's candidates (a search's moves around its best merge, :meth:`CandidateSet.settings`). A chain
        starts from a pair."""
        if top < 1:
            raise InvalidInput("--top must be at least 1")
        if chain is not None and chain < 2:
            raise InvalidInput("--chain must be at least 2 (the number of models in the chain)")
        name = policy or self.config.default_policy
        target = self.target(task, weights)
        with self.lock:
            pol = self.policy(name)
            cs = self.candidates(target.key)
            if chain and chain > 2 and chain > (n := len({m for p in cs.pairs for m in p})):
                raise InvalidInput(f"--chain {chain}: the candidates for {target.key} hold {n} models, so a chain "
                                   f"has at most {n}")
            if chain and chain > 2 and cs.groups:
                within = set(within or cs.pairs) & set(cs.pairs)
            if moves is not None:
                cs = cs.settings(moves)
            elif within is not None:
                cs = cs.within(within)
            if exclude:
                cs = cs.without(exclude)
            ranking = pol.rank(cs.ranked, reuse=not exclude and within is None and moves is None)
            if chain and chain > 2:
                entries = self._chains(cs, pol, ranking, top, chain)
            else:
                entries = [self._entry(cs, pol, ranking, int(i)) for i in ranking.top(top)]
            self._decide_evaluation(entries, pol)
            if not queue:  # the caller evaluates its choice itself
                entries[0]["evaluate"] = True
            self._log(entries, cs, name, pol, queue=queue)
        return [e["public"] for e in entries]

    def _entry(self, cs: CandidateSet, pol, ranking, i: int) -> dict:
        return {"models": list(cs.models_of(i)), "operator": [cs.operators[cs.op_index[i]]["name"]],
                "params": [cs.params(i)], "x": cs.X[i], "z": cs.Z[i],
                "predicted": float(ranking.predicted[i]), "uncertainty": float(ranking.uncertainty[i]),
                "propensity": float(ranking.propensity[i]), "pair_propensity": self._pair_mass(cs, ranking, i),
                "explanation": self._candidate_explanation(pol, cs, i)}

    @staticmethod
    def _pair_mass(cs: CandidateSet, ranking, i: int) -> float:
        """The probability the policy gave candidate ``i``'s models (its pair, or group): their operators'
        propensities summed (the pairs' rows are pair-major, the same operators for every pair)."""
        n_ops = cs.pair_ops
        if cs.pair_rows is None or i >= cs.pair_rows:  # a subset (some candidates excluded), or a group
            return float(ranking.propensity[cs.pair_index == cs.pair_index[i]].sum())
        start = int(cs.pair_index[i]) * n_ops
        return float(ranking.propensity[start:start + n_ops].sum())

    def _candidate_explanation(self, pol, cs: CandidateSet, i: int) -> list[dict]:
        """:meth:`_explain` of candidate ``i``, remembered until the policy learns or the candidates change (the
        daemon's clients ask for the same top candidates many times between two rewards)."""
        memo = self._explained
        if memo is None or memo[0] is not pol or memo[1] != pol.n_updates or memo[2] is not cs:
            memo = self._explained = (pol, pol.n_updates, cs, {})
        out = memo[3].get(i)
        if out is None:
            out = memo[3][i] = self._explain(pol, cs.X[i], cs.arms[i], cs.Z[i], cs.names)
        return out

    def _explain(self, pol, x, arm, z, names, k: int = 3) -> list[dict]:
        info = pol.explain(x, arm, z)
        contrib = np.asarray(info.get("contributions", []), dtype=float).reshape(-1)
        if contrib.shape != x.shape or not np.any(contrib):
            return []
        idx = list(np.argsort(-np.abs(contrib)))[:k]
        return [{"feature": names[i], "value": float(x[i]), "contribution": float(contrib[i])} for i in idx]

    def _chains(self, cs: CandidateSet, pol, ranking, top: int, length: int) -> list[dict]:
        """Greedy chains ((a op1 b) op2 c) ...: each step ranks (chain so far, next model, operator).

        The chain so far is merged for real and gets its own signature (:mod:`.chains`), so its features against
        the next model are computed like any pair's.
        """
        from .policies import Candidates

        pair_row = {p: i for i, p in enumerate(cs.pairs)}
        n_ops = cs.pair_ops
        entries = []
        for start_rank, first in enumerate(ranking.top(top)):
            e = self._entry(cs, pol, ranking, int(first))
            models = list(e["models"])
            for _ in range(length - 2):
                rest = [m for m in sorted({m for p in cs.pairs for m in p}) if m not in models]
                rest = [m for m in rest if all((u, m) in pair_row for u in models)]
                if not rest:
                    break
                X = np.repeat(self._chain_contexts(cs.target, models, e["operator"], rest), n_ops, axis=0)
                Z = np.tile(cs.Z[:n_ops], (len(rest), 1))
                arms = cs.arms[:n_ops] * len(rest)
                r = pol.rank(Candidates(X=X, arms=arms, Z=Z))
                j = int(r.choice) if start_rank == 0 else int(np.argmax(r.scores))
                models.append(rest[j // n_ops])
                e["operator"].append(cs.operators[j % n_ops]["name"])
                e["params"].append(cs.operators[j % n_ops]["params"])
                e.update(x=X[j], z=Z[j], predicted=float(r.predicted[j]), uncertainty=float(r.uncertainty[j]),
                         propensity=e["propensity"] * float(r.propensity[j]), pair_propensity=None,
                         explanation=self._explain(pol, X[j], arms[j], Z[j], cs.names))
            e["models"] = models
            entries.append(e)
        return entries

    def _chain_contexts(self, target: Target, models: list[str], operators: list[str],
                        rest: list[str]) -> np.ndarray:
        """Contexts of (merge of ``models`` so far, r) for each r in ``rest``: the merge so far is tagged with its
        members' tags and has no known score (it was never evaluated)."""
        from .chains import intermediate_features
        from .context import catalog_meta
        from .signals.metadata import SourceMeta, metadata_matrix

        per_task = {t: intermediate_features(self, models, operators, rest, t) for t in target.tasks}
        meta = catalog_meta(self.store, [*models, *rest], target.tasks)
        merged = SourceMeta(tuple(sorted({t for m in models for t in meta[m].tags})), {})
        meta["(merge so far)"] = merged
        pairs = [("(merge so far)", r) for r in rest]
        return contexts(per_task, target, metadata_matrix(target, pairs, meta))

    def _decide_evaluation(self, entries: list[dict], pol) -> None:
        cfg = self.config
        used = self.budget_used()
        for i, e in enumerate(entries):
            unc = e["uncertainty"]
            informative = (not math.isfinite(unc)) or unc >= cfg.eval_threshold or pol.n_updates < cfg.eval_warmup
            e["evaluate"] = bool(i == 0 and used < cfg.eval_budget and informative)

    def feedback(self, decision_id: str, reward: float, raw_score: float | None = None,
                 source: str = "feedback", scores: dict[str, float] | None = None) -> dict:
        """Record the reward of a decision and update the policies. Durable when this returns.

        ``raw_score`` is the merge's raw score (target-weighted), ``scores`` its raw score per target task; both are
        kept beside the reward (replay and simulate can use either). The same value again is a no-op; a different
        value for the same decision is refused.
        """
        try:
            value = float(reward)
        except (TypeError, ValueError):
            raise InvalidInput(f"reward must be a number, got {reward!r}") from None
        lo, hi = REWARD_RANGE
        if not math.isfinite(value) or not lo <= value <= hi:
            raise InvalidInput(f"reward must be a finite number in [{lo:g}, {hi:g}] (a normalized score), "
                               f"got {reward!r}")
        scores_json = _scores_json(scores)
        with self.lock:
            logged = self._recent.get(decision_id)
            if logged is not None:
                old = self._rewarded.get(decision_id)
            else:
                logged = self.store.fetchone(f"SELECT {', '.join(FEEDBACK_FIELDS)} FROM decisions WHERE id = ?",
                                             [decision_id])
                if logged is None:
                    raise NotFound(f"no decision with id {decision_id!r}")
                old = self.store.fetchone("SELECT reward FROM rewards WHERE decision_id = ?", [decision_id])
                old = None if old is None else old[0]
            if old is not None:
                if abs(old - value) <= 1e-12:
                    return {"id": decision_id, "reward": value, "status": "unchanged"}
                raise Conflict(f"decision {decision_id} already has reward {old:g}; refusing {value:g}")
            if self._seq is None:
                self._seq = int(self.store.fetchone("SELECT coalesce(max(seq), 0) FROM rewards")[0])
            seq = self._seq + 1
            with self.store.transaction():
                self.store.insert_rows("rewards", ("decision_id", "seq", "reward", "raw_score", "source", "scores"),
                                       [[decision_id, seq, value, raw_score, source, scores_json]])
            self._seq = seq
            if decision_id in self._recent:
                self._rewarded[decision_id] = value
            if not self._unlearned:
                self._unlearned_since = time.monotonic()
            self._unlearned.append((seq, logged, value))
            if not self.defer_learning:
                self._learn_pending()
        return {"id": decision_id, "reward": value, "status": "recorded"}

    #: Deferred rewards folded at the latest once this many wait (one Woodbury chunk of hybrid LinUCB).
    LEARN_MAX_PENDING = 32

    def _learn_pending(self, due_only: bool = False) -> None:
        """Fold the rewards recorded since the last call into the loaded policies: in one go into those that had
        seen the whole log (no log read), through a catch-up for any other. With ``due_only``, only once they
        are due (see ``learn_interval_s``)."""
        if not self._unlearned:
            return
        if (due_only and len(self._unlearned) < self.LEARN_MAX_PENDING
                and time.monotonic() - self._unlearned_since < self.learn_interval_s):
            return
        pending, self._unlearned = self._unlearned, []
        # logged under another feature schema: this schema's policies skip them, as _catch_up does
        rows = [(seq, context, operator, arm, reward, propensity, params)
                for seq, (context, operator, arm, propensity, schema, params), reward in pending
                if schema == _schema()]
        if not rows:
            return
        first, last = rows[0][0], rows[-1][0]
        known, self._known_seq = self._known_seq, None
        for name in list(self._policies):
            if known is not None and self._last_seq[name] == known < first:
                self._fold(name, rows)
            else:
                self._catch_up(name)
        if known is not None and known < first:
            self._known_seq = last

    def status(self) -> dict:
        """What ``simmerge status --json`` prints: catalog and log counts, the evaluation queue by state, the
        budget, and the last decision."""
        def count(sql):
            return int(self.store.fetchone(sql)[0])

        queue = evalqueue.counts(self.store)
        last = self.store.fetchdicts(
            "SELECT id, task, models, operator, policy, created_at FROM decision_log ORDER BY created_at DESC, "
            "rank LIMIT 1")
        return {
            "counts": {
                "models": count("SELECT count(*) FROM models"),
                "tasks": count("SELECT count(*) FROM tasks"),
                "operators": count("SELECT count(*) FROM operators WHERE status = 'active'"),
                "decisions": count("SELECT count(*) FROM decision_log"),
                "rewards": count("SELECT count(*) FROM rewards"),
            },
            "queue": queue,
            "budget": {"used": self.budget_used(), "limit": self.config.eval_budget,
                       "window_s": self.config.eval_window_s},
            "last_decision": last[0] if last else None,
            "policies": [{"name": p, "last_seq": int(s)} for p, s in
                         self.store.fetchall("SELECT policy, last_seq FROM policy_state ORDER BY policy")],
        }


def _scores_json(scores: dict | None) -> str | None:
    """Per-task raw scores as JSON (strict: a non-finite score is refused, never stored)."""
    if scores is None:
        return None
    out = {}
    for task, v in scores.items():
        try:
            f = float(v)
        except (TypeError, ValueError):
            raise InvalidInput(f"score of task {task!r} must be a number, got {v!r}") from None
        if not math.isfinite(f):
            raise InvalidInput(f"score of task {task!r} must be finite, got {v!r}")
        out[str(task)] = f
    return json.dumps(out, sort_keys=True)
