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
        if init_seed is None:
            init_seed = before.get("init_seed", 0)
        with self.lock:
            pred = make_policy("predictor", seed=self.config.seed, online_weight=online_weight,
                               model=model, init_seed=init_seed).fit(X, Z, arms, y)
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
                   online_weight=pred.online_weight, model=pred.model, init_seed=pred.init_seed)
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
