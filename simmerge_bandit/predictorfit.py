"""Fitting the SimMerge predictor from a merge table or the decision log, saved as policy ``predictor``."""

from __future__ import annotations

import json
import math

import numpy as np

from .candidates import _schema
from .context import pair_contexts
from .descriptor import operator_descriptor
from .errors import InvalidInput
from .target import Target


class PredictorFitting:
    """The predictor's fit (a part of :class:`~.engine.Engine`: it uses the engine's ``store``, ``catalog``,
    ``descriptors``, ``lock`` and its policy store)."""

    def fit_predictor(self, table: str | None = None, online_weight: float | None = None,
                      model: str | None = None, objective: str | None = None,
                      init_seed: int | None = None) -> dict:
        """Fit the SimMerge predictor (features + operator -> normalized score) and save it as policy
        ``predictor``; later rewards keep updating it online, each counting as ``online_weight`` fitted rows
        (default: what the previous fit used, else 1). ``model`` is the predictor's ``mlp`` or ``linear`` (default:
        what the previous fit used, else ``mlp``). ``init_seed`` seeds the networks' initialisation and batch order
        (default: the previous fit's, else 0): another value is an independent replicate of the fit (the engine's
        own seed is the policies' exploration seed and does not change the fit).

        With ``table`` (a merge table: CSV or Parquet with ``model_a``, ``model_b``, ``operator``, ``task``,
        ``normalized_score``; models, tasks and operators registered in the catalog), features are computed by
        the signals module. ``objective`` says what a table row's reward is: ``target`` (default) scores each
        merge on its default target, the union of its sources' tagged tasks (the mean of its normalized scores on
        them; pairs whose target tasks are not all in the table are left out), ``task`` takes each (pair, task) row
        as its own case; None (default) is ``target`` when the catalog's tags give some pair a complete target, else
        ``task``. Without a table, the predictor is fitted on the logged decisions that have a reward.
        """
        from .policies import make_policy

        if model == "auto" and table is None:
            raise InvalidInput("model 'auto' chooses by cross-validation over a merge table's tasks; give a table")
        cv = None
        if table is not None:
            X, Z, arms, y, objective, cases = self._table_rows(table, objective)
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
        if init_seed is None:
            init_seed = before.get("init_seed", 0)
        extra: dict = {}
        if model == "auto":
            extra, cv = choose_model(X, Z, y, cases, init_seed)
            model = extra.pop("model")
        elif model == before.get("model") and "l2" in before:
            extra["l2"] = before["l2"]
        with self.lock:
            pred = make_policy("predictor", seed=self.config.seed, online_weight=online_weight,
                               model=model, init_seed=init_seed, **extra).fit(X, Z, arms, y)
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
                   online_weight=pred.online_weight, model=pred.model, init_seed=pred.init_seed, l2=pred.l2)
        if cv is not None:
            out["model_cv"] = cv
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
        X, Z, arms, y, rows_case = [], [], [], [], []
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
                    rows_case.append((key, a, b))
        return np.array(X), np.array(Z), arms, np.array(y), objective, rows_case


#: what ``model="auto"`` chooses among: the anchored model alone (interactions shrunk to nothing), with the linear
#: model of what is left, and the network; the first of equals wins (the simplest)
AUTO_GRID: tuple[dict, ...] = ({"model": "anchored", "l2": 1e8}, {"model": "anchored", "l2": 1e4},
                               {"model": "mlp", "l2": 1.0})


def choose_model(X: np.ndarray, Z: np.ndarray, y: np.ndarray, cases: list[tuple[str, str, str]],
                 init_seed: int = 0, grid: tuple[dict, ...] = AUTO_GRID) -> tuple[dict, dict]:
    """The predictor model of ``grid`` (default :data:`AUTO_GRID`) whose choices on tasks it was not fitted on are
    best: leave one task out (every case whose target includes it), fit on the rest, choose each held-out case's
    operator by the prediction, and score the share of the best-fixed -> oracle gap closed, pooled over the held-out
    tasks. Returns ``(params of the best, {label: share})``; with fewer than two tasks nothing can be held out and the
    first entry is returned."""
    from .policies import make_policy

    keys = [c[0] for c in cases]
    tasks_of = {k: set(Target.parse(k).tasks) for k in set(keys)}
    tasks = sorted(set().union(*tasks_of.values()))
    labels = [",".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in g.items())
              for g in grid]
    if len(tasks) < 2:
        return dict(grid[0]), {}
    case_of = np.array([hash(c) for c in cases])
    num, den = np.zeros(len(grid)), 0.0
    arms = np.array([z.tobytes() for z in Z])
    for t in tasks:
        pool = np.array([t in tasks_of[k] for k in keys])
        if pool.all() or not pool.any():
            continue
        train = ~pool
        ops, inverse = np.unique(arms[train], return_inverse=True)
        fixed = ops[int(np.argmax(np.bincount(inverse, weights=y[train]) / np.bincount(inverse)))]
        groups = [np.flatnonzero(pool & (case_of == c)) for c in np.unique(case_of[pool])]
        fx = [y[g][arms[g] == fixed] for g in groups]
        keep = [g for g, f in zip(groups, fx) if len(f)]
        if not keep:
            continue
        base = sum(float(y[g][arms[g] == fixed][0]) for g in keep)
        den += sum(float(y[g].max()) for g in keep) - base
        for i, g in enumerate(grid):
            pred = make_policy("predictor", init_seed=init_seed, **g).fit(X[train], Z[train], list(arms[train]),
                                                                        y[train])
            p = pred.predict(X[pool], Z[pool])
            at = {r: v for r, v in zip(np.flatnonzero(pool), p)}
            num[i] += sum(float(y[rows][int(np.argmax([at[r] for r in rows]))]) for rows in keep) - base
    shares = num / den if den > 0 else np.zeros(len(grid))
    return dict(grid[int(np.argmax(shares))]), {lab: float(v) for lab, v in zip(labels, shares)}
