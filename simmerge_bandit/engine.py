"""The decision engine: candidates, suggestions, decisions, rewards and policy state.

A candidate is (task, ordered models, operator). Its context ``x`` is the pair's similarity features on the task's
probe set (signals module) plus task descriptors; its arm descriptor ``z`` describes the operator (method one-hot and
parameters), so that what is learned about one operator informs similar ones.

Every suggestion is logged as a decision (context, candidate, propensity, policy and version). Rewards are appended
to the log; a policy's state is the fold of the rewards in arrival order (``seq``), snapshotted in ``policy_state``
and caught up from the log tail on load, so ``rebuild`` from the log always gives the live state.
"""

from __future__ import annotations

import bisect
import io
import json
import logging
import math
import os
import threading
import time
import weakref
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Sequence

import numpy as np

from . import evalqueue
from .catalog import Catalog
from .context import context_names, contexts, pair_contexts  # noqa: F401 (re-exported)
from .context import schema as context_schema
from .errors import Conflict, InvalidInput, NotFound
from . import descriptor
from .descriptor import LEGACY_PARAMS as OPERATOR_PARAMS, operator_descriptor  # noqa: F401 (re-exported)
from .migrations import vector_key
from .store import Store
from .target import Target

log = logging.getLogger(__name__)

#: Documented reward range: a normalized score (merged score / best source model's score, clipped to [0, 2]).
REWARD_RANGE = (0.0, 2.0)
#: What the engine writes of a decision to ``decision_log`` (its context and descriptor go to ``vectors``, once).
DECISION_COLUMNS = ("id", "batch", "rank", "task", "models", "operator", "policy", "policy_version", "feature_schema",
                    "context_key", "arm_key", "predicted", "uncertainty", "propensity", "evaluate", "pair_propensity",
                    "arm_schema", "params")
#: What feedback reads of its decision (from the ``decisions`` view), and how many of its latest decisions the
#: engine keeps at hand for it (about 2 KB each).
FEEDBACK_FIELDS = ("context", "operator", "arm", "propensity", "feature_schema", "params")
RECENT_DECISIONS = 1024


def __getattr__(name: str):
    # ARM_NAMES follows the method registry (a method may be registered while the process runs)
    if name == "ARM_NAMES":
        return descriptor.arm_names()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _schema() -> str:
    """The context schema that contexts are built with now (stored with decisions and snapshots)."""
    return context_schema()


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


@dataclass
class CandidateSet:
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


class Engine:
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

    # ---- candidates ----
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

        When some models are tagged as fine-tuned for a task of the target, only pairs with at least one of them
        are candidates: merging two models that know nothing of the target teaches nothing about merging for it.
        """
        target = self.target(target)
        want = set(target.tasks)
        by_base: dict[str, list[str]] = {}
        experts = set()
        for name, base, tags in self.store.fetchall("SELECT name, base, tasks FROM models ORDER BY added_at, name"):
            if base:
                by_base.setdefault(base, []).append(name)
                if want & set(json.loads(tags) if tags else []):
                    experts.add(name)
        return [(a, b) for names in by_base.values() for a in names for b in names
                if a != b and (not experts or a in experts or b in experts)]

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

    # ---- policies ----
    def _make(self, name: str):
        """A fresh policy. ``NAME@predictor`` is NAME warm-started from the fitted SimMerge predictor: it learns
        the residual ``reward - prediction``, so with no rewards it ranks like the predictor."""
        from .policies import from_snapshot, make_policy

        if name.endswith("@predictor"):
            stored = self._stored("predictor")
            if stored is None:
                raise InvalidInput(f"{name}: no fitted predictor yet; run `simmerge predictor fit` first")
            prior = from_snapshot(*stored)
            if not descriptor.adapt(prior, stored[1]):
                raise InvalidInput(f"{name}: the fitted predictor reads operators in an arm schema that cannot be "
                                   "mapped to today's (a method or parameter was removed); refit it with "
                                   "`simmerge predictor fit`")
            return make_policy(name[: -len("@predictor")], seed=self.config.seed, prior=prior)
        if name == "predictor" and (meta := self._stored_meta(name)) is not None:
            # the fit chose its parameters (online_weight); a fresh or rebuilt predictor keeps them
            params = {k: v for k, v in meta.get("params", {}).items() if k != "prior"}
            return make_policy(name, **{**params, "seed": self.config.seed})
        return make_policy(name, seed=self.config.seed)

    def _stored_meta(self, name: str) -> dict | None:
        """The JSON half of a policy's saved snapshot (without reading its arrays), or None."""
        row = self.store.fetchone("SELECT meta FROM policy_state WHERE policy = ?", [name])
        return None if row is None else json.loads(row[0])

    def _stored(self, name: str) -> tuple[dict, dict] | None:
        """The saved snapshot of a policy as (arrays, meta), or None."""
        row = self.store.fetchone("SELECT arrays, meta FROM policy_state WHERE policy = ?", [name])
        if row is None:
            return None
        with np.load(io.BytesIO(row[0]), allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}, json.loads(row[1])

    def policy(self, name: str | None = None):
        """The named policy, restored from its snapshot and caught up with the reward log."""
        name = name or self.config.default_policy
        with self.lock:
            if self._arm_version != (arm_version := descriptor.current().version):
                if self._arm_version is not None:  # a method was (un)registered: reload, mapped or rebuilt
                    self.reset()
                self._arm_version = arm_version
            self._learn_pending(due_only=True)
            if name not in self._policies:
                pol = self._make(name)
                row = self.store.fetchone("SELECT last_seq, arrays, meta FROM policy_state WHERE policy = ?", [name])
                last = 0
                if row is not None and json.loads(row[2]).get("feature_schema") != _schema():
                    # learned on contexts of another feature schema: start again from this schema's log rows
                    log.info("policy %s: snapshot is of another feature schema, rebuilding from the log", name)
                    row = None
                if row is not None:
                    with np.load(io.BytesIO(row[1]), allow_pickle=False) as npz:
                        arrays = {k: npz[k] for k in npz.files}
                    pol.restore(arrays, meta := json.loads(row[2]))
                    last = int(row[0])
                    if not descriptor.adapt(pol, meta):
                        # learned on descriptors of another arm schema: rebuilt from the log, which recomputes them
                        log.info("policy %s: snapshot is of another arm schema, rebuilding from the log", name)
                        pol, last = self._make(name), 0
                self._policies[name], self._last_seq[name], self._since_snapshot[name] = pol, last, 0
            self._catch_up(name)
            return self._policies[name]

    def _catch_up(self, name: str) -> int:
        if self._known_seq is not None and self._last_seq[name] >= self._known_seq:
            return 0
        # decisions logged under an older feature schema stay in the log (replay reads them) but their contexts do
        # not fit this schema's policies
        rows = self.store.fetchall(
            "SELECT r.seq, d.context, d.operator, d.arm, r.reward, d.propensity, d.params FROM rewards r "
            "JOIN decisions d ON d.id = r.decision_id WHERE r.seq > ? AND d.feature_schema = ? ORDER BY r.seq",
            [self._last_seq[name], _schema()])
        self._fold(name, rows)
        self._known_seq = max(self._known_seq or 0, self._last_seq[name])
        return len(rows)

    def _fold(self, name: str, rows: Sequence[tuple]) -> None:
        """Update policy ``name`` with log rows ``(seq, context, operator, arm, reward, propensity)`` in order."""
        pol = self._policies[name]
        pol.update_many(self.descriptors.learnable(rows))
        if rows:
            self._last_seq[name] = rows[-1][0]
            self._since_snapshot[name] += len(rows)
            if self._since_snapshot[name] >= self.config.snapshot_every:
                self._save(name)

    def _save(self, name: str) -> None:
        arrays, meta = self._policies[name].snapshot()
        meta["feature_schema"] = _schema()
        meta.update(descriptor.snapshot_meta())
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        with self.store.transaction():
            self.store.execute("DELETE FROM policy_state WHERE policy = ?", [name])
            self.store.execute("INSERT INTO policy_state (policy, last_seq, arrays, meta) VALUES (?,?,?,?)",
                               [name, self._last_seq[name], buf.getvalue(), json.dumps(meta)])
        self._since_snapshot[name] = 0

    def flush(self) -> None:
        """Snapshot every loaded policy that learned something since its snapshot (called on shutdown)."""
        with self.lock:
            self._learn_pending()
            for name in self._policies:
                self._catch_up(name)
                if self._since_snapshot[name]:
                    self._save(name)

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

    def rebuild(self, name: str | None = None):
        """Rebuild a policy from the decision log alone, replace its snapshot, and return it."""
        name = name or self.config.default_policy
        with self.lock:
            self._learn_pending()
            self._policies[name] = self._make(name)
            self._last_seq[name], self._since_snapshot[name] = 0, 0
            self._catch_up(name)
            self._save(name)
            return self._policies[name]

    def fit_predictor(self, table: str | None = None, online_weight: float | None = None,
                      model: str | None = None, objective: str | None = None) -> dict:
        """Fit the SimMerge predictor (features + operator -> normalized score) and save it as policy
        ``predictor``; later rewards keep updating it online, each counting as ``online_weight`` fitted rows
        (default: what the previous fit used, else 1). ``model`` is the predictor's ``mlp`` or ``linear`` (default:
        what the previous fit used, else ``mlp``).

        With ``table`` (a merge table: CSV or Parquet with ``model_a``, ``model_b``, ``operator``, ``task``,
        ``normalized_score``; models, tasks and operators registered in the catalog), features are computed by
        the signals module. ``objective`` says what a table row's reward is: ``target`` (default) scores each
        merge on its default target, the union of its sources' tagged tasks (the mean of its normalized scores on
        them; pairs whose target tasks are not all in the table are left out), ``task`` takes each (pair, task) row
        as its own case; None (default) is ``target`` when the catalog's tags give some pair a complete target, else
        ``task``. Without a table, the predictor is fitted on the logged decisions that have a reward.
        """
        from .policies import make_policy

        if table is not None:
            X, Z, arms, y, objective = self._table_rows(table, objective)
        else:
            rows = self.store.fetchall("SELECT d.context, d.arm, d.operator, r.reward, d.params FROM rewards r JOIN "
                                       "decisions d ON d.id = r.decision_id WHERE d.feature_schema = ? ORDER BY "
                                       "r.seq", [_schema()])
            # descriptors in today's arm schema (rows may be logged in an older one); operators that cannot be
            # described (see Descriptors.vector) are left out
            rows = [(r, a) for r in rows if (a := self.descriptors.arm(
                json.loads(r[2])[-1], json.loads(r[4])[-1] if r[4] else None))[1] is not None]
            if not rows:
                raise InvalidInput("no rewarded decisions to fit on; give --table or record feedback first")
            X = np.array([r[0] for r, _ in rows])
            Z = np.array([a[1] for _, a in rows])
            arms = [a[0] for _, a in rows]
            y = np.array([r[3] for r, _ in rows])
        with self.lock:
            self._learn_pending()  # the refit's log position (max seq) must not count rewards still to be folded
        before = (self._stored_meta("predictor") or {}).get("params", {})
        if online_weight is None:
            online_weight = before.get("online_weight", 1.0)
        if model is None:
            model = before.get("model", "mlp")
        with self.lock:
            pred = make_policy("predictor", seed=self.config.seed, online_weight=online_weight,
                               model=model).fit(X, Z, arms, y)
            last = self.store.fetchone("SELECT coalesce(max(seq), 0) FROM rewards")[0]
            self._policies["predictor"], self._last_seq["predictor"] = pred, int(last)
            self._since_snapshot["predictor"] = 0
            self._save("predictor")
            # Warm-started bandits depend on the predictor: drop their snapshots so they are rebuilt on it.
            self.store.execute("DELETE FROM policy_state WHERE policy LIKE '%@predictor'")
            for n in [n for n in self._policies if n.endswith("@predictor")]:
                del self._policies[n]
        out = pred.summary()
        out.update(source=table or "decision log", feature_schema=_schema(), objective=objective if table else None,
                   online_weight=pred.online_weight, model=pred.model)
        return out

    def _table_rows(self, path: str, objective: str | None = None):
        from .replay import read_columns

        if objective not in ("target", "task", None):
            raise InvalidInput(f"objective must be 'target' or 'task', got {objective!r}")
        p = str(path)
        cols, arrays = read_columns(p, "merge table")
        # tolist(): NULLs (masked entries) become None, numpy scalars plain Python values.
        data = list(zip(*(np.asarray(arrays[c]).tolist() if not np.ma.isMaskedArray(arrays[c])
                          else arrays[c].tolist() for c in cols)))
        need = ("model_a", "model_b", "operator", "task", "normalized_score")
        missing = [c for c in need if c not in cols]
        if missing:
            raise InvalidInput(f"{p}: missing column(s) {', '.join(missing)}")
        idx = {c: cols.index(c) for c in cols}
        rows = [r for r in data if ("model_c" not in idx or r[idx["model_c"]] is None)
                and r[idx["normalized_score"]] is not None and math.isfinite(r[idx["normalized_score"]])]
        if not rows:
            raise InvalidInput(f"{p}: no usable rows (2-way merges with a finite normalized_score)")
        # cases[(target key, a, b)][operator] = reward
        cases: dict[tuple[str, str, str], dict[str, float]] = {}
        if objective != "task":
            per: dict[tuple[str, str, str], dict[str, float]] = {}
            for r in rows:
                per.setdefault((r[idx["model_a"]], r[idx["model_b"]], r[idx["operator"]]), {})[r[idx["task"]]] = \
                    float(r[idx["normalized_score"]])
            tags = {n: json.loads(t) if t else [] for n, t in self.store.fetchall("SELECT name, tasks FROM models")}
            for (a, b, op), scores in per.items():
                target = Target.default_for([tags.get(a), tags.get(b)])
                value = None if target is None else target.aggregate(scores)
                if value is not None:
                    cases.setdefault((target.key, a, b), {})[op] = value
            if not cases and objective == "target":
                raise InvalidInput(f"{p}: no pair has all the tasks of its default target (the union of its models' "
                                   f"tagged tasks) in the table; tag the models (`model add --task`) or use "
                                   f"objective 'task'")
            objective = "target" if cases else "task"
        if objective == "task":
            for r in rows:
                cases.setdefault((r[idx["task"]], r[idx["model_a"]], r[idx["model_b"]]), {})[r[idx["operator"]]] = \
                    float(r[idx["normalized_score"]])
        ops = {}
        X, Z, arms, y = [], [], [], []
        by_target: dict[str, list[tuple[str, str]]] = {}
        for key, a, b in cases:
            by_target.setdefault(key, []).append((a, b))
        for key, pairs in by_target.items():
            x_pairs, _ = pair_contexts(self.store, sorted(set(pairs)), self.target(key))
            x_of = dict(zip(sorted(set(pairs)), x_pairs))
            for a, b in pairs:
                for op, reward in cases[(key, a, b)].items():
                    if op not in ops:
                        ops[op] = operator_descriptor(self.catalog.operator(op))
                    X.append(x_of[(a, b)])
                    Z.append(ops[op])
                    arms.append(op)
                    y.append(reward)
        return np.array(X), np.array(Z), arms, np.array(y), objective

    # ---- suggestions ----
    def suggest(self, task: str | Sequence[str] | Target, top: int = 5, policy: str | None = None,
                chain: int | None = None, weights: dict | None = None, *,
                exclude: set[tuple[tuple[str, ...], str]] | None = None, queue: bool = True) -> list[dict]:
        """Rank candidate merges for a target (a task name, several task names with optional ``weights``, a
        :class:`~simmerge_bandit.target.Target` or its key); log each returned entry as a decision. The first is
        the choice. Each suggestion's reward is the target-weighted mean of the merge's normalized scores.

        ``exclude``: candidates ``(models, operator)`` not to rank (a search's tried merges). ``queue=False``: the
        caller evaluates the suggestions itself (a search), so none goes to the evaluation queue."""
        if top < 1:
            raise InvalidInput("--top must be at least 1")
        if chain is not None and chain < 2:
            raise InvalidInput("--chain must be at least 2 (the number of models in the chain)")
        name = policy or self.config.default_policy
        target = self.target(task, weights)
        with self.lock:
            pol = self.policy(name)
            cs = self.candidates(target.key)
            if exclude:
                cs = cs.without(exclude)
            ranking = pol.rank(cs.ranked, reuse=not exclude)
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
        a, b = cs.pairs[cs.pair_index[i]]
        return {"models": [a, b], "operator": [cs.operators[cs.op_index[i]]["name"]], "params": [cs.params(i)],
                "x": cs.X[i], "z": cs.Z[i],
                "predicted": float(ranking.predicted[i]), "uncertainty": float(ranking.uncertainty[i]),
                "propensity": float(ranking.propensity[i]), "pair_propensity": self._pair_mass(cs, ranking, i),
                "explanation": self._candidate_explanation(pol, cs, i)}

    @staticmethod
    def _pair_mass(cs: CandidateSet, ranking, i: int) -> float:
        """The probability the policy gave candidate ``i``'s pair: its operators' propensities summed (candidates
        are pair-major, the same operators for every pair)."""
        n_ops = len(cs.operators)
        if len(cs) != len(cs.pairs) * n_ops:  # a subset (some candidates excluded)
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
        n_ops = len(cs.operators)
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

    def budget_used(self) -> int:
        """Evaluations requested in the current window (kept in memory after one read of the log)."""
        with self.lock:
            now = time.time()
            if self._eval_times is None:
                rows = self.store.fetchall(
                    "SELECT epoch(created_at) FROM decision_log WHERE evaluate AND created_at >= "
                    "current_timestamp::TIMESTAMP - to_seconds(?)", [float(self.config.eval_window_s)])
                # created_at is local wall time stored without zone; epoch() reads it as UTC.
                offset = time.mktime(time.localtime(now)) - time.mktime(time.gmtime(now))
                self._eval_times = sorted(float(r[0]) - offset for r in rows)
            cutoff = now - self.config.eval_window_s
            del self._eval_times[:bisect.bisect_left(self._eval_times, cutoff)]  # kept sorted: appended in time
            return len(self._eval_times)

    def _log(self, entries: list[dict], cs: CandidateSet, policy: str, pol, queue: bool = True) -> None:
        ids = self._random_hex(8 * len(entries) + 16)  # the batch id, then every decision id
        batch = ids[:32]
        version = str(pol.version)
        arm = descriptor.current()  # the schema of the candidates' descriptors (their cache key holds its version)
        rows, queued, recent, vectors = [], [], [], []
        for rank, e in enumerate(entries):
            did = ids[32 + 16 * rank: 48 + 16 * rank]
            # copies: a candidate's x is a row of the cached candidate matrix, which the log must not pin
            x, z = np.array(e["x"], dtype=float), np.array(e["z"], dtype=float)
            rows.append([did, batch, rank, cs.task, cs.names_json(tuple(e["models"])),
                         cs.names_json(tuple(e["operator"])), policy,
                         version, cs.feature_schema, self._vector(x, vectors), self._vector(z, vectors),
                         _finite(e["predicted"]), _finite(e["uncertainty"]), e["propensity"], e["evaluate"],
                         e["pair_propensity"], arm.version, self._params_json(cs, e)])
            recent.append((did, (x, rows[-1][5], z, e["propensity"], cs.feature_schema, rows[-1][-1])))
            if e["evaluate"]:
                if queue:
                    queued.append(did)
                if self._eval_times is not None:
                    self._eval_times.append(time.time())
            e["public"] = {
                "id": did, "task": cs.task, "target": cs.target.as_json(), "models": e["models"],
                "operator": e["operator"][0] if len(e["operator"]) == 1 else e["operator"],
                "predicted": _finite(e["predicted"]), "uncertainty": _finite(e["uncertainty"]),
                "propensity": e["propensity"], "evaluate": e["evaluate"], "explanation": e["explanation"],
                "policy": policy, "params": e["params"][0] if len(e["params"]) == 1 else e["params"]}
        with self.store.transaction():
            self.store.insert_rows("arm_schemas", ("version", "coordinates"), self.descriptors.unrecorded(arm))
            self.store.insert_rows("vectors", ("key", "v"), vectors)
            self.store.insert_rows("decision_log", DECISION_COLUMNS, rows)
            self.store.insert_rows("eval_queue", evalqueue.COLUMNS, evalqueue.enqueue_rows(queued))
        for key, _ in vectors:
            self._vectors[key] = None  # stored (a transaction that fails after this resets the engine)
        for did, fields in recent:
            self._recent[did] = fields
        while len(self._recent) > RECENT_DECISIONS:
            old = next(iter(self._recent))
            del self._recent[old]
            self._rewarded.pop(old, None)

    @staticmethod
    def _params_json(cs: CandidateSet, e: dict) -> str | None:
        """The concrete parameters of a decision's steps as JSON when a step is of a family (the catalog's own
        parameters otherwise: NULL)."""
        if not any(o.get("ranges") for o in cs.operators):
            return None
        return json.dumps(e["params"], sort_keys=True)

    def _vector(self, v: np.ndarray, new: list) -> int:
        """The key of ``v`` in ``vectors``; ``[key, v]`` is appended to ``new`` when the store does not hold it."""
        key = vector_key(v)
        known = self._vectors
        if known is None:
            known = self._vectors = dict.fromkeys(r[0] for r in self.store.fetchall("SELECT key FROM vectors"))
        if key not in known and all(key != k for k, _ in new):
            new.append([key, v])
        return key

    def _random_hex(self, n: int) -> str:
        """``os.urandom(n).hex()``, from 4 KiB read at a time: a system call releases the GIL, and in the daemon
        getting it back can take milliseconds."""
        buf, pid = self._entropy
        if len(buf) < n or pid != os.getpid():  # (a forked child must not reuse its parent's bytes)
            buf, pid = os.urandom(max(4096, n)), os.getpid()
        self._entropy = buf[n:], pid
        return buf[:n].hex()

    # ---- rewards ----
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

    def decision(self, decision_id: str) -> dict:
        """One logged decision as a dict (models, operator and params decoded); :class:`NotFound` if unknown."""
        rows = self.store.fetchdicts("SELECT * EXCLUDE (context_key, arm_key) FROM decision_log WHERE id = ?",
                                     [decision_id])
        if not rows:
            raise NotFound(f"no decision with id {decision_id!r}")
        d = rows[0]
        d["models"], d["operator"] = json.loads(d["models"]), json.loads(d["operator"])
        d["params"] = json.loads(d["params"]) if d.get("params") else None
        return d

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


def _finite(v: float) -> float | None:
    return float(v) if v is not None and math.isfinite(v) else None
