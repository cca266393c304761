"""Full-information simulation: on a table that scores every operator on every (task, pair), any policy can be
simulated exactly, because whichever operator it picks, the table knows what that merge scored.

The table has one row per (task, model_a, model_b, operator) with ``normalized_score`` (the reward) and ``score``,
plus the pair's feature columns (every other numeric column that is constant within a (task, pair); columns that
vary between operators of one pair, like timings, are outcomes and are left out) and optional ``op_*`` operator
descriptor columns (constant per operator; one-hot when there are none). Features can also come from elsewhere
(the signals module) through ``features=``.

Two objectives (``objective=``):

- ``task``: a case is (task, model_a, model_b), worth the merge's normalized score on that task;
- ``target``: a case is (target, model_a, model_b) with the pair's default target (:meth:`Target.default_for`:
  the union of the sources' tagged tasks, equal weights), worth the target's aggregate of the merge's per-task
  normalized scores, as the engine rewards a merge. Tags come from the ``tasks_a`` / ``tasks_b`` columns (JSON
  lists, as ``simmerge zoo table`` writes them) or from ``tags=`` (e.g. the zoo manifest). The per-task scores
  stay beside the aggregate (:attr:`MergeTable.task_R`, :attr:`MergeTable.W`), so both objectives can be
  reported on the same choices.

With *engine contexts* (always on the target objective, on request on the task objective) a case's context is
built by :func:`simmerge_bandit.context.contexts`, exactly as the engine builds it: the pair's signal features on
each target task averaged with the target's weights, the catalog's metadata of both sources (tags, and their
known raw scores: the table's ``score_a`` / ``score_b``) and the target's task buckets. The features given or
found per (task, pair) are then the raw signal features (NaN: absent).

One run, for each seed: ``rounds`` contexts are drawn uniformly (with replacement) from the evaluation pool, the
same stream for every policy; each round the policy ranks the operators available then, the merge it picks
scores its table value, and the first ``budget`` rounds are evaluated, i.e. the policy is updated with that score
(later rounds are decisions made without paying for an evaluation). With ``holdout_tasks``, the pool is those
tasks' pairs and every row of the other (training) tasks is first shown to each learned policy, so that a policy
arrives at a new task with what the others taught it.

Reported per policy, mean and interval over seeds: the mean normalized score of its choices, the regret against
the oracle (the best operator of each drawn pair), the share of the best-fixed-operator -> oracle gap it closed
(best fixed = the operator with the highest mean score on the training pairs), and the same numbers for its final
greedy choice on every pool pair after the run (``final_*``).

Why one module of this size: reading a table into a :class:`MergeTable` (which columns are keys, pair features,
operator features, outcomes) and running policies on it are one contract, since the simulation is exact only for
the columns classified as outcomes, and the two are only ever used together (``simmerge simulate``, the decision
benchmark).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
from scipy import stats

from .context import context_names, contexts
from .errors import InvalidInput
from .replay import PolicySpec, column_kind, make_learned_policy, missing_mask, parse_policy, read_columns
from .target import Target
from .zoo import TABLE_COLUMNS as ZOO_COLUMNS  # outcomes and bookkeeping of a zoo table, never features

KEYS = ("task", "model_a", "model_b", "operator")
REWARD = "normalized_score"
OUTCOMES = ("score", REWARD)
#: columns whose name starts with this describe the operator, not the pair
OP_FEATURE_PREFIX = "op_"
#: suffix of a policy warm-started from the SimMerge predictor fitted on the training tasks
WARM = "@predictor"


OBJECTIVES = ("task", "target")


@dataclass
class MergeTable:
    """A complete merge table as arrays: ``R[c, k]`` is operator ``k``'s value on case (context) ``c``.

    ``contexts[c]`` is ``(task, model_a, model_b)`` on the task objective and ``(target key, model_a, model_b)``
    on the target objective. ``task_cases`` / ``task_R`` are the per-task cases and normalized scores they come
    from and ``W`` (C, N) the weights with ``R = W @ task_R`` (on the task objective ``W`` picks one row).
    ``case_tasks[c]`` are the tasks case ``c`` is scored on; ``meta`` the catalog metadata of each model (tags,
    known raw scores) and ``operator_specs`` each operator as ``{name, method, params}``, when the table says.
    """

    source: str
    contexts: list[tuple[str, str, str]]
    operators: list[str]
    R: np.ndarray                             # (C, K)
    X: np.ndarray                             # (C, d)
    Z: np.ndarray                             # (K, k)
    feature_names: list[str]
    operator_feature_names: list[str]
    notes: list[str] = field(default_factory=list)
    objective: str = "task"
    case_tasks: list[tuple[str, ...]] | None = None
    task_cases: list[tuple[str, str, str]] | None = None
    task_R: np.ndarray | None = None          # (N, K)
    W: np.ndarray | None = None               # (C, N)
    meta: dict | None = None                  # model -> SourceMeta
    operator_specs: list[dict] | None = None
    engine_context: bool = False

    @property
    def tasks(self) -> np.ndarray:
        """The first field of each case: its task (task objective) or its target's key (target objective)."""
        return np.array([c[0] for c in self.contexts], dtype=object)

    def tasks_of(self, c: int) -> tuple[str, ...]:
        """The tasks case ``c`` is scored on."""
        return self.case_tasks[c] if self.case_tasks is not None else (self.contexts[c][0],)

    @property
    def all_tasks(self) -> list[str]:
        return sorted({t for c in range(len(self.contexts)) for t in self.tasks_of(c)})

    def touching(self, tasks: Iterable[str]) -> np.ndarray:
        """Which cases are scored on at least one of ``tasks`` (a held-out task's cases)."""
        held = set(tasks)
        return np.array([bool(held.intersection(self.tasks_of(c))) for c in range(len(self.contexts))], dtype=bool)

    def subset(self, rows: Sequence[int]) -> "MergeTable":
        """The table restricted to some cases (e.g. a split's training cases, for cross-validation in them)."""
        rows = np.asarray(rows, dtype=int)
        W = used = None
        task_cases, task_R = self.task_cases, self.task_R
        if self.W is not None:
            used = np.flatnonzero(self.W[rows].any(axis=0))
            W, task_R = self.W[np.ix_(rows, used)], self.task_R[used]
            task_cases = [self.task_cases[i] for i in used]
        return MergeTable(self.source, [self.contexts[i] for i in rows], self.operators, self.R[rows], self.X[rows],
                          self.Z, self.feature_names, self.operator_feature_names, list(self.notes), self.objective,
                          None if self.case_tasks is None else [self.case_tasks[i] for i in rows], task_cases,
                          task_R, W, self.meta, self.operator_specs, self.engine_context)

    def task_scores(self, c: int, k: int) -> dict[str, float]:
        """Operator ``k``'s normalized score on each task of case ``c`` (the parts of ``R[c, k]``)."""
        if self.W is None:
            return {self.contexts[c][0]: float(self.R[c, k])}
        return {self.task_cases[n][0]: float(self.task_R[n, k]) for n in np.flatnonzero(self.W[c])}


def load_table(path: str | Path, *, feature_columns: Sequence[str] | None = None,
               features: Mapping | Callable | None = None, objective: str = "task",
               tags: Mapping[str, Sequence[str]] | None = None, engine_context: bool | None = None) -> MergeTable:
    """Read a merge table (Parquet or CSV) through DuckDB and check that it is complete."""
    p = Path(path)
    columns, data = read_columns(p, "merge table")
    return table_from_frame(data, source=p.name, columns=columns, feature_columns=feature_columns,
                            features=features, objective=objective, tags=tags, engine_context=engine_context)


def table_from_frame(data: Any, *, source: str = "table", columns: Sequence[str] | None = None,
                     feature_columns: Sequence[str] | None = None,
                     features: Mapping | Callable | None = None, objective: str = "task",
                     tags: Mapping[str, Sequence[str]] | None = None,
                     engine_context: bool | None = None) -> MergeTable:
    """Build a :class:`MergeTable` from a DataFrame or a mapping of column -> values.

    Rows of 3-way merges (``model_c`` set) are left out. A row whose ``status`` is not ``ok`` (a failed merge or
    evaluation) scores 0, as in :func:`simmerge_bandit.zoo.table_stats`: a policy that picks a failing operator
    gets nothing. ``features``, when given, replaces the table's feature columns: a mapping ``(task, model_a,
    model_b) -> vector`` or a callable with those three arguments (e.g. backed by the signals module).

    ``objective``: ``task`` or ``target`` (see the module docstring). ``tags``: model -> tagged tasks, where the
    table has no ``tasks_a`` / ``tasks_b`` columns (the columns win where both say). ``engine_context``: build
    the engine's contexts (default: on the target objective only; the task objective then keeps the table's
    features as they are).
    """
    if objective not in OBJECTIVES:
        raise InvalidInput(f"unknown objective {objective!r}; known: {', '.join(OBJECTIVES)}")
    engine = objective == "target" if engine_context is None else bool(engine_context)
    if hasattr(data, "columns") and not isinstance(data, Mapping):
        cols = {str(c): data[c].to_numpy() for c in data.columns}
        columns = [str(c) for c in data.columns]
    elif isinstance(data, Mapping):
        cols = {str(k): v for k, v in data.items()}
        columns = list(columns) if columns is not None else list(cols)
    else:
        raise InvalidInput("a merge table must be a DataFrame or a mapping of column name -> values")
    for c in (*KEYS, REWARD):
        if c not in cols:
            raise InvalidInput(f"merge table {source} has no column {c!r} (it has: {', '.join(columns)})")
    norm = {c: column_kind(cols[c]) for c in columns}
    if norm[REWARD][1].shape[0] == 0:
        raise InvalidInput(f"merge table {source} is empty (no rows)")
    notes: list[str] = []
    keep = np.ones(norm[REWARD][1].shape[0], dtype=bool)
    if "model_c" in norm:
        keep = missing_mask(*norm["model_c"])
        if not keep.all():
            notes.append(f"left out {int((~keep).sum())} rows of 3-way merges (model_c set)")
    src_row = np.flatnonzero(keep)           # row number in the source of each kept row
    norm = {c: (kind, arr[keep]) for c, (kind, arr) in norm.items()}
    if src_row.size == 0:
        raise InvalidInput(f"merge table {source} has no 2-way merge rows")

    def fail(row: int, col: str, what: str):
        raise InvalidInput(f"merge table {source}, row {int(src_row[row]) + 1}, column {col!r}: {what}")

    failed = np.zeros(src_row.size, dtype=bool)
    if "status" in norm:
        failed = np.array([v != "ok" for v in norm["status"][1]])
        if failed.any():
            notes.append(f"{int(failed.sum())} failed merges or evaluations score 0")
    for c in KEYS:
        bad = np.flatnonzero(missing_mask(*norm[c]))
        if bad.size:
            fail(int(bad[0]), c, "value is missing")
    kind, reward = norm[REWARD]
    if kind != "numeric":
        fail(0, REWARD, "must be numeric")
    bad = np.flatnonzero(~np.isfinite(reward) & ~failed)
    if bad.size:
        fail(int(bad[0]), REWARD, "value is missing or NaN" if np.isnan(reward[bad[0]])
             else f"{reward[bad[0]]} is not a finite number")
    reward = np.where(failed, 0.0, reward)
    keyvals = {c: [str(v) for v in norm[c][1]] for c in KEYS}
    ctx_of_row = list(zip(keyvals["task"], keyvals["model_a"], keyvals["model_b"]))
    contexts = list(dict.fromkeys(ctx_of_row))
    operators = sorted(set(keyvals["operator"]))
    if len(operators) < 2:
        raise InvalidInput(f"merge table {source} has a single operator; there is nothing to choose between")
    c_index = {c: i for i, c in enumerate(contexts)}
    k_index = {o: k for k, o in enumerate(operators)}
    ci = np.array([c_index[c] for c in ctx_of_row])
    ki = np.array([k_index[o] for o in keyvals["operator"]])
    R = np.full((len(contexts), len(operators)), np.nan)
    for row, (c, k) in enumerate(zip(ci, ki)):
        if not np.isnan(R[c, k]):
            fail(row, "operator", f"a second row for {operators[k]} on task {contexts[c][0]}, pair "
                                  f"({contexts[c][1]}, {contexts[c][2]})")
        R[c, k] = reward[row]
    holes = np.argwhere(np.isnan(R))
    if holes.size:
        c, k = holes[0]
        raise InvalidInput(f"merge table {source} is not complete: no row for operator {operators[k]} on task "
                           f"{contexts[c][0]}, pair ({contexts[c][1]}, {contexts[c][2]}); a full-information "
                           f"simulation needs every operator on every pair")

    op_cols = [c for c in columns if c.startswith(OP_FEATURE_PREFIX)]
    Z, z_names = _operator_features(norm, op_cols, ki, operators, fail)
    if features is not None:
        try:
            X = np.array([np.asarray(features(*c) if callable(features) else features[c], dtype=float).ravel()
                          for c in contexts])
        except (KeyError, ValueError) as e:
            raise InvalidInput(f"the given features have no vector of the same length for every (task, pair): "
                               f"{e}") from None
        # the engine reads an absent signal (NaN) as 0 in its contexts; raw features must be finite
        if X.ndim != 2 or np.isinf(X).any() or (not engine and np.isnan(X).any()):
            raise InvalidInput("the given features must be one finite vector of the same length per pair")
        x_names = [f"f{j}" for j in range(X.shape[1])]
    else:
        X, x_names = _pair_features(norm, columns, feature_columns, op_cols, ci, len(contexts), fail, notes,
                                    keep_absent=engine)
    specs = _operator_specs(norm, ki, operators)
    if not engine:
        if X.shape[1] == 0:
            X, x_names = np.ones((len(contexts), 1)), ["bias"]
            notes.append("no pair features: the policies only see a constant, so this is a non-contextual bandit")
        return MergeTable(source, contexts, operators, R, X, Z, x_names, z_names, notes, operator_specs=specs)

    meta = _source_meta(norm, keyvals, tags, fail)
    if objective == "task":
        cases = contexts
        targets = [Target.of([t]) for t, _, _ in contexts]
        W = np.eye(len(contexts))
    else:
        cases, targets, W = _target_cases(contexts, meta, source)
    Xc = _engine_contexts(cases, targets, {c: X[i] for i, c in enumerate(contexts)}, X.shape[1], meta)
    return MergeTable(source, [(tg.key, a, b) for tg, (_, a, b) in zip(targets, cases)], operators, W @ R, Xc, Z,
                      context_names(x_names), z_names, notes, objective, [tg.tasks for tg in targets], contexts,
                      R, W, meta, specs, True)


def _operator_specs(norm, ki, operators) -> list[dict] | None:
    """Each operator as ``{name, method, params}`` (what the metadata rules read), when the table has them."""
    if "method" not in norm or "params" not in norm:
        return None
    import json

    out: list[dict | None] = [None] * len(operators)
    for row, k in enumerate(ki):
        if out[k] is None:
            p = norm["params"][1][row]
            try:
                params = json.loads(p) if isinstance(p, str) else dict(p or {})
            except (ValueError, TypeError):
                params = {}
            out[k] = {"name": operators[k], "method": str(norm["method"][1][row]), "params": params}
    return out


def _source_meta(norm, keyvals, tags, fail) -> dict:
    """What the catalog knows of each model: tags (``tasks_a`` / ``tasks_b`` columns, else ``tags``) and known
    raw scores per task (``score_a`` / ``score_b``)."""
    import json

    from .signals.metadata import SourceMeta

    models = sorted(set(keyvals["model_a"]) | set(keyvals["model_b"]))
    tagged: dict[str, tuple[str, ...]] = {m: tuple(tags[m]) for m in models if tags and m in tags}
    known: dict[str, dict[str, float]] = {m: {} for m in models}
    for side in "ab":
        col = f"tasks_{side}"
        if col in norm:
            for row, (m, v) in enumerate(zip(keyvals[f"model_{side}"], norm[col][1])):
                if v is None or (isinstance(v, float) and math.isnan(v)):
                    continue
                try:
                    t = json.loads(v) if isinstance(v, str) else list(v)
                except (ValueError, TypeError):
                    fail(row, col, f"tags must be a JSON list of task names, got {v!r}")
                tagged[m] = tuple(str(x) for x in t)
        col = f"score_{side}"
        if col in norm and norm[col][0] == "numeric":
            for m, task, v in zip(keyvals[f"model_{side}"], keyvals["task"], norm[col][1]):
                if math.isfinite(v):
                    known[m][task] = float(v)
    return {m: SourceMeta(tagged.get(m, ()), known[m]) for m in models}


def _target_cases(task_cases, meta, source):
    """The target objective's cases: one per ordered pair, its default target, and the weights ``W`` (C, N) of
    its per-task cases."""
    by_pair: dict[tuple[str, str], dict[str, int]] = {}
    for n, (t, a, b) in enumerate(task_cases):
        by_pair.setdefault((a, b), {})[t] = n
    cases, targets = [], []
    W = np.zeros((len(by_pair), len(task_cases)))
    for i, ((a, b), rows) in enumerate(by_pair.items()):
        target = Target.default_for([meta[a].tags, meta[b].tags])
        if target is None:
            raise InvalidInput(f"merge table {source}: neither {a} nor {b} is tagged with a task, so the pair has "
                               f"no default target (give tags: tasks_a / tasks_b columns or the zoo manifest)")
        lacking = [t for t in target.tasks if t not in rows]
        if lacking:
            raise InvalidInput(f"merge table {source}: pair ({a}, {b}) has no rows on task {lacking[0]!r} of its "
                               f"target {target.key}")
        for t, w in target.items:
            W[i, rows[t]] = w
        cases.append((target.key, a, b))
        targets.append(target)
    return cases, targets, W


def _engine_contexts(cases, targets, signals: Mapping, d: int, meta) -> np.ndarray:
    """The engine's context of each case (:func:`simmerge_bandit.context.contexts`), one call per target."""
    from .signals.metadata import metadata_matrix

    absent = np.full(d, np.nan)
    groups: dict[str, list[int]] = {}
    for i, tg in enumerate(targets):
        groups.setdefault(tg.key, []).append(i)
    out = None
    for idx in groups.values():
        target = targets[idx[0]]
        pairs = [(cases[i][1], cases[i][2]) for i in idx]
        per_task = {t: np.array([signals.get((t, a, b), absent) for a, b in pairs]).reshape(len(pairs), d)
                    for t in target.tasks}
        x = contexts(per_task, target, metadata_matrix(target, pairs, meta))
        if out is None:
            out = np.empty((len(cases), x.shape[1]))
        out[idx] = x
    return out


def _operator_features(norm, op_cols, ki, operators, fail) -> tuple[np.ndarray, list[str]]:
    """Operator descriptors: ``op_*`` columns; else the engine's descriptor from ``method`` and ``params`` (so a
    simulated policy reads operators as the engine's do); else one-hot. Checked constant per operator."""
    K = len(operators)
    if op_cols:
        per_row = []
        for c in op_cols:
            kind, arr = norm[c]
            if kind != "numeric":
                fail(0, c, "operator features must be numbers")
            bad = np.flatnonzero(~np.isfinite(arr))
            if bad.size:
                fail(int(bad[0]), c, "operator feature is missing or not finite")
            per_row.append(arr)
        rows, names = np.stack(per_row, axis=1), list(op_cols)
    elif "method" in norm and "params" in norm:
        import json

        from .descriptor import current

        schema = current()
        operator_descriptor = schema.describe
        cache: dict[tuple[str, str], np.ndarray] = {}
        rows = np.empty((len(ki), len(schema)))
        for row, (m, p) in enumerate(zip(norm["method"][1], norm["params"][1])):
            key = (str(m), str(p))
            if key not in cache:
                try:
                    params = json.loads(p) if isinstance(p, str) else dict(p or {})
                    cache[key] = operator_descriptor({"method": str(m), "params": params})
                except (InvalidInput, KeyError, ValueError, TypeError) as e:
                    fail(row, "method", f"cannot describe operator {m} {p}: {e}")
            rows[row] = cache[key]
        names = list(schema.names)
    else:
        return np.eye(K), [f"operator={o}" for o in operators]
    Z = np.full((K, rows.shape[1]), np.nan)
    for row, k in enumerate(ki):
        if np.isnan(Z[k, 0]):
            Z[k] = rows[row]
        elif not np.array_equal(Z[k], rows[row]):
            j = int(np.flatnonzero(Z[k] != rows[row])[0])
            fail(row, names[j] if op_cols else "params",
                 f"operator {operators[k]} is described differently here than on an earlier row")
    return Z, names


def _pair_features(norm, columns, feature_columns, op_cols, ci, C, fail, notes, keep_absent: bool = False
                   ) -> tuple[np.ndarray, list[str]]:
    """Numeric columns constant within each (task, pair); explicit ``feature_columns`` must be. A missing value
    reads as 0, or stays NaN (absent) with ``keep_absent`` (the engine's contexts treat absent values)."""
    excluded = set(KEYS) | set(OUTCOMES) | set(op_cols) | set(ZOO_COLUMNS)
    explicit = feature_columns is not None
    if explicit:
        for c in feature_columns:
            if c not in norm:
                raise InvalidInput(f"feature column {c!r} is not in the table")
        candidates = list(feature_columns)
    else:
        candidates = [c for c in columns if c not in excluded and norm[c][0] in ("numeric",)]
    X, names, varying = [], [], []
    missing: dict[str, int] = {}
    for c in candidates:
        kind, arr = norm[c]
        if kind != "numeric":
            fail(0, c, "feature columns must be numeric")
        if np.any(np.isinf(arr)):
            fail(int(np.flatnonzero(np.isinf(arr))[0]), c, "feature value is infinite")
        absent = np.isnan(arr)
        if absent.any() and not keep_absent:
            # the engine reads an absent feature as 0 (engine.contexts); do the same, and say so
            missing[c] = int(absent.sum())
            arr = np.where(absent, 0.0, arr)
        first = np.full(C, np.nan)
        first[ci[::-1]] = arr[::-1]            # the first row of each context wins
        diff = np.flatnonzero((arr != first[ci]) & ~(np.isnan(arr) & np.isnan(first[ci])))
        if diff.size:
            if explicit:
                fail(int(diff[0]), c, "differs between operators of one pair; a pair feature must not")
            varying.append(c)
            continue
        X.append(first)
        names.append(c)
    if missing:
        notes.append("missing feature values read as 0: " + ", ".join(f"{c} ({n})" for c, n in missing.items()))
    if varying:
        notes.append(f"left out columns that vary between operators of one pair (outcomes, not features): "
                     f"{', '.join(varying)}")
    return (np.stack(X, axis=1) if X else np.zeros((C, 0))), names


# ---- running the simulation ----

@dataclass
class SeedRun:
    """One policy on one seed's stream: the score of each round's choice and the oracle's."""

    contexts: np.ndarray      # (T,) row of the table's contexts drawn each round (same for every policy)
    chosen: np.ndarray        # (T,) operator index chosen each round (-1 for uniform, which has no single one)
    reward: np.ndarray        # (T,)
    oracle: np.ndarray        # (T,)
    fixed: np.ndarray         # (T,) best fixed operator's score
    final_reward: float       # mean score of the final greedy choice over the pool
    late: dict[str, int | None]   # late operator -> rounds from its arrival to its first choice where it is best
    late_share: dict[str, float | None]  # late operator -> share of rounds where it is best that it was chosen
    final_chosen: np.ndarray | None = None  # (P,) the final greedy choice on each pool case (-1: uniform)


@dataclass
class Simulation:
    """All runs plus the aggregated rows."""

    table: MergeTable
    best_fixed: str
    rounds: int
    budget: int
    seeds: list[int]
    pool: np.ndarray
    runs: dict[str, list[SeedRun]]
    oracle_final: float
    fixed_final: float
    alpha: float = 0.05

    def results(self) -> list[dict]:
        """One row per policy (the oracle and the best fixed operator first) with intervals over seeds."""
        out = []
        for label, runs in self.runs.items():
            score = np.array([r.reward.mean() for r in runs])
            oracle = np.array([r.oracle.mean() for r in runs])
            fixed = np.array([r.fixed.mean() for r in runs])
            regret = oracle - score
            gap = _gap(score, fixed, oracle)
            final = np.array([r.final_reward for r in runs])
            final_gap = _gap(final, np.full_like(final, self.fixed_final), np.full_like(final, self.oracle_final))
            row = {"policy": label, "rounds": self.rounds, "budget": self.budget, "seeds": len(runs)}
            row.update(_summ("mean_score", score, self.alpha))
            row.update(_summ("regret", regret, self.alpha))
            row["cumulative_regret"] = float(regret.mean() * self.rounds)
            row.update(_summ("gap_closed", gap, self.alpha))
            row.update(_summ("final_score", final, self.alpha))
            row.update(_summ("final_gap_closed", final_gap, self.alpha))
            late_ops = list(runs[0].late) if runs else []
            if late_ops:
                row["late_operators"] = {
                    op: {"rounds_to_first_best_choice": [r.late[op] for r in runs],
                         "chosen_when_best": _mean_or_none([r.late_share[op] for r in runs])}
                    for op in late_ops}
            out.append(row)
        return out

    def summary(self) -> dict:
        """Context numbers for a report: table size, pool size, best fixed operator, oracle and fixed scores."""
        return {"table": self.table.source, "objective": self.table.objective,
                "pairs": len(self.table.contexts), "pool": int(len(self.pool)),
                "operators": self.table.operators, "best_fixed": self.best_fixed, "rounds": self.rounds,
                "budget": self.budget, "seeds": self.seeds, "oracle_final_score": self.oracle_final,
                "fixed_final_score": self.fixed_final, "notes": self.table.notes}


def _gap(score, fixed, oracle) -> np.ndarray:
    den = oracle - fixed
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 1e-12, (score - fixed) / np.where(den > 1e-12, den, 1.0), np.nan)


def _mean_or_none(vals) -> float | None:
    v = [x for x in vals if x is not None]
    return float(np.mean(v)) if v else None


def _summ(name: str, vals: np.ndarray, alpha: float) -> dict:
    """Mean over seeds and a Student-t interval (none with one seed or undefined values)."""
    v = vals[np.isfinite(vals)]
    if v.size == 0:
        return {name: None, f"{name}_ci_low": None, f"{name}_ci_high": None}
    m = float(v.mean())
    if v.size < 2:
        return {name: m, f"{name}_ci_low": None, f"{name}_ci_high": None}
    half = float(stats.t.ppf(1 - alpha / 2, v.size - 1) * v.std(ddof=1) / math.sqrt(v.size))
    return {name: m, f"{name}_ci_low": m - half, f"{name}_ci_high": m + half}


def _candidates(X_row: np.ndarray, ops: np.ndarray, table: MergeTable):
    from .policies import Candidates

    return Candidates(np.repeat(X_row[None, :], len(ops), axis=0),
                      np.array([table.operators[k] for k in ops], dtype=object), table.Z[ops])


def _pick(ranking, ops: np.ndarray, table: MergeTable) -> int:
    """The operator index a ranking chose (choice as a candidate row or as the operator's name)."""
    ch = ranking.choice
    if isinstance(ch, (int, np.integer)) and not isinstance(ch, bool):
        return int(ops[int(ch)])
    name = str(ch)
    try:
        return table.operators.index(name)
    except ValueError:
        raise InvalidInput(f"policy chose unknown operator {name!r}") from None


def _greedy(ranking) -> int:
    """The candidate with the highest predicted reward: what the policy recommends once exploring is over (no
    exploration bonus, no floor). Policies without a prediction fall back to their own scores."""
    pred = getattr(ranking, "predicted", None)
    vals = np.asarray(ranking.scores if pred is None else pred, dtype=float)
    if not np.isfinite(vals).all() or np.ptp(vals) == 0:
        vals = np.asarray(ranking.scores, dtype=float)
    return int(np.argmax(vals))


def _own_propensity(ranking) -> float:
    """The probability the policy had of its own choice (1 when its ranking carries none)."""
    p = getattr(ranking, "propensity", None)
    if p is None:
        return 1.0
    p = np.asarray(p, dtype=float)
    return float(p[int(ranking.choice)]) if p.ndim == 1 else float(p)


def simulate(table: MergeTable, policies: Iterable[str | PolicySpec], *, rounds: int, budget: int | None = None,
             seeds: int | Sequence[int] = 5, holdout_tasks: Sequence[str] | None = None, pretrain: bool = True,
             late_operators: Mapping[str, int] | None = None, standardize: bool | None = None, alpha: float = 0.05,
             seed: int = 0, policy_factory: Callable[[PolicySpec, int], Any] | None = None,
             pretrain_rows: int | None = None, predictor_params: Mapping[str, Any] | None = None,
             progress: Callable[[str], None] | None = None, pretrain_cache: dict | None = None) -> Simulation:
    """Simulate each policy exactly on the table (see the module docstring for the protocol).

    ``seeds`` is a count (seeds ``seed .. seed+S-1``) or an explicit list. ``late_operators`` maps an operator to
    the round it becomes available (before that it is not a candidate, for the policies and the oracle alike).
    ``policy_factory(spec, seed)`` builds learned policies (default: the registry by name). ``pretrain_rows``
    caps the training rows shown one by one to an online policy (a random subset, the same for every policy of a
    seed); a policy with a batch ``fit`` (the predictor) is fitted on all of them at once.
    ``predictor_params`` are the SimMerge predictor's parameters wherever one is built: ``predictor`` policies
    (their own spec parameters win) and the prior of ``NAME@predictor`` warm starts. Each seed is an independent
    replication: a predictor's networks are initialised from the seed (``init_seed``) unless a parameter fixes it.
    ``pretrain_cache``: a dict kept by the caller across calls on the same table, in which each online policy's
    state after the training rows is kept (by policy, seed, training cases and rows) and reused, e.g. by runs of
    several budgets: the same state as pretraining again (restored from its snapshot), without the cost.

    With ``holdout_tasks`` the pool is every case scored on a held-out task and the training cases are the others
    (on the target objective a case whose target mixes training and held-out tasks is in the pool only).
    ``standardize`` scales the contexts by the training cases' mean and std (default: only contexts that are not
    the engine's, which the engine's policies read unscaled).
    """
    if rounds < 1:
        raise InvalidInput(f"rounds must be at least 1, got {rounds}")
    budget = rounds if budget is None else int(budget)
    if not 0 <= budget <= rounds:
        raise InvalidInput(f"budget must be between 0 and rounds ({rounds}), got {budget}")
    seed_list = list(range(seed, seed + int(seeds))) if isinstance(seeds, (int, np.integer)) else list(seeds)
    if not seed_list:
        raise InvalidInput("seeds must be at least 1")
    specs = [parse_policy(p) if isinstance(p, str) else p for p in policies]
    if predictor_params:
        specs = [PolicySpec(s.text, s.name, s.action, {**predictor_params, **s.params}) if s.name == "predictor"
                 else s for s in specs]
    if not specs:
        raise InvalidInput("no policy to simulate; pass at least one --policy")
    K = len(table.operators)
    late = dict(late_operators or {})
    for op, r in late.items():
        if op not in table.operators:
            raise InvalidInput(f"late operator {op!r} is not in the table ({', '.join(table.operators)})")
        if not 0 <= int(r) < rounds:
            raise InvalidInput(f"late operator {op} arrives at round {r}, outside 0..{rounds - 1}")
    arrival = np.zeros(K, dtype=int)
    for op, r in late.items():
        arrival[table.operators.index(op)] = int(r)
    if np.all(arrival > 0):
        raise InvalidInput("at least one operator must be available from round 0")
    for s in specs:
        if s.name.endswith(WARM) and not holdout_tasks:
            raise InvalidInput(f"{s.text}: a warm start is fitted on the training tasks; pass --holdout-tasks")
        if s.name == "fixed" and s.action not in table.operators:
            raise InvalidInput(f"{s.text}: operator {s.action} is not in the table ({', '.join(table.operators)})")

    if holdout_tasks:
        all_tasks = table.all_tasks
        missing = sorted(set(holdout_tasks) - set(all_tasks))
        if missing:
            raise InvalidInput(f"holdout task {missing[0]!r} is not in the table")
        if set(all_tasks) <= set(holdout_tasks):
            raise InvalidInput("every task is held out; keep at least one for training")
        is_pool = table.touching(holdout_tasks)
        if is_pool.all():
            raise InvalidInput("every case is scored on a held-out task; no training case is left")
        pool, train = np.flatnonzero(is_pool), np.flatnonzero(~is_pool)
    else:
        pool = train = np.arange(len(table.contexts))

    X = table.X
    if standardize is None:
        standardize = not table.engine_context
    if standardize:
        mu, sd = X[train].mean(axis=0), X[train].std(axis=0)
        X = (X - mu) / np.where(sd > 0, sd, 1.0)
    start_ops = np.flatnonzero(arrival == 0)
    best_fixed = int(start_ops[np.argmax(table.R[train][:, start_ops].mean(axis=0))])
    oracle_final = float(table.R[pool].max(axis=1).mean())
    fixed_final = float(table.R[pool, best_fixed].mean())
    factory = policy_factory or (lambda spec, s: make_learned_policy(spec, seed=s))

    def seeded(spec: PolicySpec, s: int) -> PolicySpec:
        if spec.name != "predictor" or "init_seed" in spec.params:
            return spec
        return PolicySpec(spec.text, spec.name, spec.action, {**spec.params, "init_seed": int(s)})

    runs: dict[str, list[SeedRun]] = {s.text: [] for s in specs}
    for s_i, s in enumerate(seed_list):
        rng = np.random.default_rng(np.random.SeedSequence([int(seed), int(s)]))
        stream = pool[rng.integers(0, len(pool), size=rounds)]
        order = rng.permutation(len(train) * K)
        avail_at = [np.flatnonzero(arrival <= t) for t in range(rounds)]
        R_stream = table.R[stream]
        oracle = np.array([R_stream[t, avail_at[t]].max() for t in range(rounds)])
        fixed = R_stream[:, best_fixed]
        for spec in specs:
            if progress:
                progress(f"seed {s} · {spec.text}")
            if spec.direct:
                chosen, reward, final, final_chosen = _direct(spec, table, stream, avail_at, R_stream, pool,
                                                              arrival)
            else:
                policy = factory(seeded(spec, s), int(s)) if not spec.name.endswith(WARM) else \
                    _warm_started(spec, int(s), X, table, train,
                                  {"init_seed": int(s), **(predictor_params or {})})
                if holdout_tasks and pretrain and not spec.name.endswith(WARM):  # a warm start is pretrained
                    if callable(getattr(policy, "fit", None)):
                        # A supervised policy (the predictor) is fitted on every training row in one batch solve,
                        # in table order: the same rows as a warm start's prior, so a deterministic fit is reused.
                        cs, ks = np.repeat(train, K), np.tile(np.arange(K), len(train))
                        policy.fit(X[cs], table.Z[ks], [table.operators[k] for k in ks], table.R[cs, ks])
                    else:
                        key = (spec.text, int(s), int(seed), pretrain_rows, len(table.contexts),
                               hash(train.tobytes()), hash(X.tobytes()))
                        kept = None if pretrain_cache is None else pretrain_cache.get(key)
                        if kept is not None:
                            policy = _restored(policy, kept)
                        else:
                            for j in order if pretrain_rows is None else order[:pretrain_rows]:
                                c, k = train[j // K], j % K
                                policy.update(X[c], table.operators[k], table.Z[k], float(table.R[c, k]), 1.0)
                            if pretrain_cache is not None:
                                pretrain_cache[key] = _kept(policy)
                chosen = np.empty(rounds, dtype=int)
                for t in range(rounds):
                    c, ops = stream[t], avail_at[t]
                    ranking = policy.rank(_candidates(X[c], ops, table))
                    k = _pick(ranking, ops, table)
                    chosen[t] = k
                    if t < budget:
                        policy.update(X[c], table.operators[k], table.Z[k], float(table.R[c, k]),
                                      _own_propensity(ranking))
                reward = R_stream[np.arange(rounds), chosen]
                all_ops = np.arange(K)
                final_chosen = np.array([_greedy(policy.rank(_candidates(X[c], all_ops, table))) for c in pool])
                final = float(table.R[pool, final_chosen].mean())
            late_first, late_share = _late_stats(late, table, chosen, R_stream, avail_at, arrival)
            runs[spec.text].append(SeedRun(stream, chosen, reward, oracle, fixed, final, late_first, late_share,
                                           final_chosen))
    return Simulation(table, table.operators[best_fixed], rounds, budget, seed_list, pool, runs,
                      oracle_final, fixed_final, alpha)


def _kept(policy):
    """A pretrained policy's state: its snapshot, or a deep copy for a policy without one (a peer library's)."""
    import copy

    return ("snapshot", policy.snapshot()) if callable(getattr(policy, "snapshot", None)) \
        else ("copy", copy.deepcopy(policy))


def _restored(policy, kept):
    import copy

    how, state = kept
    if how == "copy":
        return copy.deepcopy(state)
    policy.restore({k: v.copy() for k, v in state[0].items()}, state[1])
    return policy


def _warm_started(spec: PolicySpec, seed: int, X: np.ndarray, table: MergeTable, train: np.ndarray,
                  predictor_params: Mapping[str, Any]):
    """``NAME@predictor``: NAME with the SimMerge predictor (``predictor_params``), fitted on every training row,
    as its prior (as the engine's ``NAME@predictor`` after ``simmerge predictor fit``)."""
    from .policies import make_policy

    K = len(table.operators)
    cs, ks = np.repeat(train, K), np.tile(np.arange(K), len(train))   # the table is complete: every row scored
    prior = make_policy("predictor", **{**predictor_params, "seed": seed})
    prior.fit(X[cs], table.Z[ks], [table.operators[k] for k in ks], table.R[cs, ks])
    params = {"seed": seed, **spec.params}
    return make_policy(spec.name[: -len(WARM)], prior=prior, **params)


def _direct(spec: PolicySpec, table: MergeTable, stream, avail_at, R_stream, pool, arrival):
    """Exact scores of ``fixed:OP`` and ``uniform`` (the expectation over its choice, no sampling)."""
    rounds = len(stream)
    if spec.name == "fixed":
        k = table.operators.index(spec.action)
        chosen = np.full(rounds, k)
        return chosen, R_stream[:, k].astype(float), float(table.R[pool, k].mean()), np.full(len(pool), k)
    reward = np.array([R_stream[t, avail_at[t]].mean() for t in range(rounds)])
    return np.full(rounds, -1), reward, float(table.R[pool].mean()), np.full(len(pool), -1)


def _late_stats(late, table, chosen, R_stream, avail_at, arrival):
    first: dict[str, int | None] = {}
    share: dict[str, float | None] = {}
    for op in late:
        k = table.operators.index(op)
        if np.any(chosen < 0):          # uniform: no single choice to count
            first[op] = share[op] = None
            continue
        best_rounds = [t for t in range(arrival[k], len(chosen))
                       if R_stream[t, k] >= R_stream[t, avail_at[t]].max()]
        hits = [t for t in best_rounds if chosen[t] == k]
        first[op] = (hits[0] - int(arrival[k])) if hits else None
        share[op] = (len(hits) / len(best_rounds)) if best_rounds else None
    return first, share


def plot(sim: Simulation, path: str | Path) -> Path:
    """Cumulative regret against rounds, mean over seeds with a Student-t band, one line per policy."""
    try:
        import matplotlib
    except ImportError:
        raise InvalidInput("plots need matplotlib: pip install matplotlib") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    t = np.arange(1, sim.rounds + 1)
    for label, runs in sim.runs.items():
        cum = np.stack([np.cumsum(r.oracle - r.reward) for r in runs])
        m = cum.mean(axis=0)
        line, = ax.plot(t, m, label=label, lw=1.5)
        if len(runs) > 1:
            half = stats.t.ppf(1 - sim.alpha / 2, len(runs) - 1) * cum.std(axis=0, ddof=1) / math.sqrt(len(runs))
            ax.fill_between(t, m - half, m + half, color=line.get_color(), alpha=0.2, lw=0)
    if sim.budget < sim.rounds:
        ax.axvline(sim.budget, color="grey", ls=":", lw=1, label="budget spent")
    ax.set_xlabel("round")
    ax.set_ylabel("cumulative regret vs oracle")
    ax.set_title(f"{sim.table.source}: {len(sim.seeds)} seeds, budget {sim.budget}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
