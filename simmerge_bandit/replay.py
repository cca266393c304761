"""Offline replay: how would another policy have done on the decisions we logged?

A log is a table of events with the columns

- ``action``: the action the logging policy took (any type; the action set is its distinct values unless given),
- ``reward``: the reward observed for it (a finite number),
- ``propensity``: the probability the logging policy had of taking it, in (0, 1],
- ``timestamp`` (optional): the time order; events are replayed sorted by it (file order otherwise),
- ``a_*`` (optional): action features, e.g. ``a_density``. They describe the logged action, so every row of one
  action must carry the same values; without any ``a_`` column each action is described by its one-hot vector,
- every other column: the context. Numbers (and booleans, dates) are used as they are; strings are one-hot
  encoded when they take at most ``max_onehot`` distinct values and ordinal-encoded (sorted order) otherwise.

:func:`load_log` reads CSV or Parquet through DuckDB; :func:`log_from_frame` takes a ready DataFrame or a dict of
arrays (the engine's own decision log plugs in there). :func:`evaluate` runs target policies through the log and
returns one :class:`~simmerge_bandit.estimators.Estimate` per (policy, estimator).

Target policies by name: ``fixed:ACTION`` and ``uniform`` are evaluated directly from their action
probabilities; every learned policy (``linucb``, ``linucb-hybrid``, ``lints``, ``egreedy``, ``vw``,
``predictor``; parameters as ``linucb:alpha=0.5,l2=2``) is run through the log in time order and updated only on
the events where it chose the logged action (Li et al. 2011), since only there do we know what it would have seen.

Why one module of this size: reading a log, running target policies through it and estimating their value are one
pipeline over one validated :class:`BanditLog` (its arms, contexts and descriptors); the estimators are
:mod:`.estimators`, the policy specs :mod:`.policyspec`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from . import estimators as est
from .errors import InvalidInput, NotFound
from .policyspec import DIRECT_POLICIES, PolicySpec, parse_policy  # noqa: F401 (the one parser; re-exported)

ACTION, REWARD, PROPENSITY, TIMESTAMP = "action", "reward", "propensity", "timestamp"
REQUIRED = (ACTION, REWARD, PROPENSITY)
#: columns whose name starts with this describe the logged action rather than the context
ARM_FEATURE_PREFIX = "a_"


# ---- the log ----

@dataclass
class BanditLog:
    """A validated bandit log in replay order, with its context encoded as numbers.

    ``arms[k]`` is action ``k`` as a string (how policies name arms); ``actions[i]`` the index of event ``i``'s
    logged action; ``X[i]`` its context; ``Z[k]`` action ``k``'s descriptor; ``rows[i]`` its 1-based row in the
    source (so messages can point at the file).
    """

    source: str
    arms: list[str]
    actions: np.ndarray
    rewards: np.ndarray
    propensities: np.ndarray
    X: np.ndarray
    Z: np.ndarray
    context_names: list[str]
    arm_feature_names: list[str]
    rows: np.ndarray
    timestamps: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.actions.shape[0])

    @property
    def is_uniform(self) -> bool:
        """Whether every propensity is 1/K, the condition under which replay is unbiased."""
        return bool(np.allclose(self.propensities, 1.0 / len(self.arms), rtol=1e-6, atol=1e-9))

    def candidates(self, i: int):
        """The event's choice as policies see it: the same context for every action, one row per action."""
        from .policies import Candidates

        K = len(self.arms)
        return Candidates(np.repeat(self.X[i:i + 1], K, axis=0), np.array(self.arms, dtype=object), self.Z)


def _source_name(path: Path) -> str:
    return path.name


def read_columns(path: str | Path, what: str, *, csv_suffixes: tuple[str, ...] = (".csv", ".csv.gz")
                 ) -> tuple[list[str], dict[str, np.ndarray]]:
    """Read a CSV or Parquet file through DuckDB as (column names, numpy columns).

    ``what`` names the file in errors ("log x.csv", "merge table t.parquet"); every failure is one
    :class:`InvalidInput` (or :class:`NotFound`) line.
    """
    import duckdb

    p = Path(path)
    if not p.is_file():
        raise NotFound(f"{what} file {p} does not exist")
    name = f"{what} {_source_name(p)}"
    suffixes = "".join(p.suffixes).lower()
    if p.stat().st_size == 0:
        raise InvalidInput(f"{name} is empty (0 bytes)")
    con = duckdb.connect()
    try:
        if suffixes.endswith((".parquet", ".pq")):
            rel = con.read_parquet(str(p))
        elif suffixes.endswith(csv_suffixes):
            rel = con.read_csv(str(p))
        else:
            raise InvalidInput(f"{name}: unknown format; use a .csv or .parquet file")
        return list(rel.columns), rel.fetchnumpy()
    except duckdb.Error as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InvalidInput(f"{name} could not be read: {first}") from None
    finally:
        con.close()


def load_log(path: str | Path, *, actions: Sequence[Any] | None = None, max_onehot: int = 16) -> BanditLog:
    """Read and validate a CSV or Parquet log (see the module docstring for its columns).

    Raises :class:`InvalidInput` naming the row and column of the first problem: a missing column, a
    propensity outside (0, 1], a missing or non-finite reward, an empty file.
    """
    name = _source_name(Path(path))
    columns, data = read_columns(path, "log", csv_suffixes=(".csv", ".csv.gz", ".tsv", ".txt"))
    return _build(data, columns, name, actions=actions, max_onehot=max_onehot)


def log_from_frame(data: Any, *, source: str = "log", actions: Sequence[Any] | None = None,
                   max_onehot: int = 16) -> BanditLog:
    """Validate and encode a log given as a pandas DataFrame or a mapping of column name -> array.

    The engine's decision log comes in this way: build a frame with the columns of the module docstring.

    >>> log = log_from_frame({"action": [1, 2], "reward": [1.0, 0.0], "propensity": [0.5, 0.5], "x": [0.1, 0.2]})
    >>> log.arms, log.X.shape
    (['1', '2'], (2, 1))
    """
    if hasattr(data, "columns") and hasattr(data, "__getitem__") and not isinstance(data, Mapping):
        columns = [str(c) for c in data.columns]
        cols = {str(c): data[c].to_numpy() for c in data.columns}
    elif isinstance(data, Mapping):
        columns = [str(c) for c in data.keys()]
        cols = {str(k): v for k, v in data.items()}
    else:
        raise InvalidInput("a log must be a DataFrame or a mapping of column name -> values")
    return _build(cols, columns, source, actions=actions, max_onehot=max_onehot)


def column_kind(values: Any) -> tuple[str, np.ndarray]:
    """Classify a column as numeric / string / time and return it with missing values as NaN / None / NaT."""
    if isinstance(values, np.ma.MaskedArray):
        mask = np.ma.getmaskarray(values)
        if values.dtype.kind in "biuf":
            arr = values.astype(float).filled(np.nan)
        elif values.dtype.kind == "M":
            arr = values.filled(np.datetime64("NaT"))
        else:
            arr = np.array([None if m else v for v, m in zip(values.data, mask)], dtype=object)
    else:
        arr = np.asarray(values)
    kind = arr.dtype.kind
    if kind == "b":
        return "numeric", arr.astype(float)
    if kind in "iuf":
        return "numeric", arr.astype(float)
    if kind == "M":
        return "time", arr
    if kind in "US":
        return "string", arr.astype(object)
    if kind == "O":
        present = [v for v in arr if v is not None and not (isinstance(v, float) and math.isnan(v))]
        if all(isinstance(v, str) for v in present):
            return "string", np.array([v if isinstance(v, str) else None for v in arr], dtype=object)
        if all(isinstance(v, (int, float, bool, np.number, np.bool_)) for v in present):
            return "numeric", np.array([np.nan if v is None else float(v) for v in arr], dtype=float)
        if all(isinstance(v, (np.datetime64,)) or hasattr(v, "timestamp") for v in present):
            return "time", np.array([np.datetime64("NaT") if v is None else np.datetime64(v, "us") for v in arr])
        return "other", arr
    return "other", arr


def missing_mask(kind: str, arr: np.ndarray) -> np.ndarray:
    """Where a column from :func:`column_kind` of that ``kind`` is missing (NaN, None or NaT)."""
    if kind == "numeric":
        return np.isnan(arr)
    if kind == "time":
        return np.isnat(arr)
    return np.array([v is None or (isinstance(v, float) and math.isnan(v)) for v in arr], dtype=bool)


def _as_seconds(arr: np.ndarray) -> np.ndarray:
    return arr.astype("datetime64[us]").astype(np.int64).astype(float) / 1e6


def _build(cols: Mapping[str, Any], columns: list[str], source: str, *, actions: Sequence[Any] | None,
           max_onehot: int) -> BanditLog:
    missing = [c for c in REQUIRED if c not in cols]
    if missing:
        raise InvalidInput(f"log {source} has no column {missing[0]!r} (it has: {', '.join(columns) or 'none'}); "
                           f"a log needs {', '.join(REQUIRED)}")
    n = len(np.asarray(cols[ACTION]))
    if n == 0:
        raise InvalidInput(f"log {source} is empty (no rows)")
    norm = {c: column_kind(cols[c]) for c in columns}
    for c, (kind, arr) in norm.items():
        if arr.shape[0] != n:
            raise InvalidInput(f"log {source}: column {c!r} has {arr.shape[0]} values, expected {n}")

    def fail(row: int, col: str, what: str):
        raise InvalidInput(f"log {source}, row {row + 1}, column {col!r}: {what}")

    def check_present(c: str) -> None:
        kind, arr = norm[c]
        bad = np.flatnonzero(missing_mask(kind, arr))
        if bad.size:
            fail(int(bad[0]), c, "value is missing or NaN" if kind == "numeric" else "value is missing")

    for c in (ACTION, REWARD, PROPENSITY):
        check_present(c)
    for c in (REWARD, PROPENSITY):
        kind, arr = norm[c]
        if kind != "numeric":
            i = next((j for j, v in enumerate(arr) if not _is_number(v)), 0)
            fail(i, c, f"{arr[i]!r} is not a number")
    rewards = norm[REWARD][1]
    bad = np.flatnonzero(~np.isfinite(rewards))
    if bad.size:
        fail(int(bad[0]), REWARD, f"{rewards[bad[0]]} is not a finite number")
    props = norm[PROPENSITY][1]
    bad = np.flatnonzero(~((props > 0) & (props <= 1)))
    if bad.size:
        fail(int(bad[0]), PROPENSITY, f"{props[bad[0]]:g} is outside (0, 1]")

    akind, avals = norm[ACTION]
    if akind == "other":
        fail(0, ACTION, "actions must be numbers or strings")
    names = [_action_name(v) for v in avals]
    if actions is None:
        arms = _sorted_arms(set(names), numeric=akind == "numeric")
    else:
        arms = [_action_name(v) for v in actions]
        if len(set(arms)) != len(arms):
            raise InvalidInput("the given action set has duplicates")
        known = set(arms)
        for i, a in enumerate(names):
            if a not in known:
                fail(i, ACTION, f"action {a} is not in the given action set")
    if len(arms) < 2:
        raise InvalidInput(f"log {source} has a single action ({arms[0]}); there is nothing to choose between")
    index = {a: k for k, a in enumerate(arms)}
    action_idx = np.array([index[a] for a in names], dtype=np.int64)

    order = np.arange(n)
    timestamps = None
    if TIMESTAMP in cols:
        check_present(TIMESTAMP)
        tkind, tvals = norm[TIMESTAMP]
        if tkind not in ("numeric", "time", "string"):
            fail(0, TIMESTAMP, "timestamps must be numbers, dates or strings")
        order = np.argsort(tvals, kind="stable")
        timestamps = tvals[order]

    feat_cols = [c for c in columns if c.startswith(ARM_FEATURE_PREFIX)]
    ctx_cols = [c for c in columns if c not in REQUIRED and c != TIMESTAMP and c not in feat_cols]

    Z, z_names = _arm_features(norm, feat_cols, action_idx, arms, fail)
    X_parts, x_names = [], []
    for c in ctx_cols:
        kind, arr = norm[c]
        check_present(c)
        if kind == "numeric":
            bad = np.flatnonzero(~np.isfinite(arr))
            if bad.size:
                fail(int(bad[0]), c, f"{arr[bad[0]]} is not a finite number")
            X_parts.append(arr[:, None])
            x_names.append(c)
        elif kind == "time":
            X_parts.append(_as_seconds(arr)[:, None])
            x_names.append(c)
        elif kind == "string":
            levels = sorted(set(arr))
            if len(levels) <= max_onehot:
                X_parts.append(np.stack([(arr == lv).astype(float) for lv in levels], axis=1))
                x_names.extend(f"{c}={lv}" for lv in levels)
            else:
                code = {lv: float(k) for k, lv in enumerate(levels)}
                X_parts.append(np.array([code[v] for v in arr])[:, None])
                x_names.append(c)
        else:
            fail(0, c, "unsupported column type (use numbers, booleans, dates or strings)")
    X = np.hstack(X_parts) if X_parts else np.zeros((n, 0))
    return BanditLog(source=source, arms=arms, actions=action_idx[order], rewards=rewards[order].astype(float),
                     propensities=props[order].astype(float), X=X[order], Z=Z, context_names=x_names,
                     arm_feature_names=z_names, rows=order + 1, timestamps=timestamps)


def _is_number(v: Any) -> bool:
    try:
        float(v)
    except (TypeError, ValueError):
        return False
    return True


def _action_name(v: Any) -> str:
    """How an action is written: integers without a trailing '.0', so ``fixed:17`` matches a BIGINT column."""
    if isinstance(v, (float, np.floating)) and float(v).is_integer():
        return str(int(v))
    if isinstance(v, (np.integer,)):
        return str(int(v))
    return str(v)


def _sorted_arms(names: set[str], numeric: bool) -> list[str]:
    if numeric:
        return sorted(names, key=lambda s: float(s))
    return sorted(names)


def _arm_features(norm, feat_cols, action_idx, arms, fail) -> tuple[np.ndarray, list[str]]:
    """One descriptor per action from the ``a_*`` columns (checked constant per action), else one-hot."""
    K = len(arms)
    if not feat_cols:
        return np.eye(K), [f"action={a}" for a in arms]
    Z = np.full((K, len(feat_cols)), np.nan)
    for j, c in enumerate(feat_cols):
        kind, arr = norm[c]
        if kind == "time":
            arr = _as_seconds(arr)
        elif kind != "numeric":
            fail(0, c, "action features must be numeric")
        bad = np.flatnonzero(~np.isfinite(arr))
        if bad.size:
            fail(int(bad[0]), c, "action feature is missing or not finite")
        for i, (k, v) in enumerate(zip(action_idx, arr)):
            if np.isnan(Z[k, j]):
                Z[k, j] = v
            elif Z[k, j] != v:
                fail(i, c, f"action {arms[k]} has {v:g} here but {Z[k, j]:g} on an earlier row; "
                           "action features must be the same on every row of an action")
    unseen = [arms[k] for k in range(K) if np.isnan(Z[k]).any()]
    if unseen:
        raise InvalidInput(f"no action features for action {unseen[0]}: it never appears in the log")
    return Z, list(feat_cols)


# ---- target policies ----

def make_learned_policy(spec: PolicySpec, *, seed: int | None = 0):
    """Build a learned policy by name through the policies registry (``seed`` unless the spec sets one)."""
    from .policies import make_policy

    params = dict(spec.params)
    if seed is not None:
        params.setdefault("seed", int(seed))
    return make_policy(spec.name, **params)


@dataclass
class PolicyRun:
    """What a target policy did on the log: its probability of each action per event, and where it matched."""

    policy: str
    probs: np.ndarray      # (n, K): its action distribution per event (Ranking.propensity for learned ones)
    matched: np.ndarray    # (n,): replay match weight of the logged action
    direct: bool


def run_policy(log: BanditLog, spec: PolicySpec | str, *, seed: int | None = 0, policy: Any = None) -> PolicyRun:
    """Run one target policy through the log.

    Direct policies give their action probabilities per event. A learned policy (``policy`` if given, else built
    from ``spec``) ranks the actions of each event in time order; where its choice equals the logged action it is
    updated with the logged reward, as if it had chosen it itself (so with its own propensity). Elsewhere it learns
    nothing, because the log does not say what its choice would have earned.
    """
    if isinstance(spec, str):
        spec = parse_policy(spec)
    n, K = len(log), len(log.arms)
    rows = np.arange(n)
    if spec.direct and policy is None:
        if spec.name == "uniform":
            probs = np.full((n, K), 1.0 / K)
        else:
            if spec.action not in log.arms:
                raise InvalidInput(f"{spec.text}: action {spec.action} is not in the log's action set "
                                   f"({', '.join(log.arms[:20])}{', ...' if K > 20 else ''})")
            probs = np.zeros((n, K))
            probs[:, log.arms.index(spec.action)] = 1.0
        return PolicyRun(spec.text, probs, probs[rows, log.actions], True)
    if policy is None:
        policy = make_learned_policy(spec, seed=seed)
    probs = np.zeros((n, K))
    matched = np.zeros(n)
    arm_index = {a: k for k, a in enumerate(log.arms)}
    for i in range(n):
        ranking = policy.rank(log.candidates(i))
        k = _choice_index(ranking.choice, arm_index, K)
        dist = _distribution(ranking, K)
        # with the policy's whole distribution IPS/DR use its exact probability of the logged action; a policy
        # that reports none is represented by its sampled choice, an unbiased but noisier stand-in
        probs[i] = dist if dist is not None else np.eye(K)[k]
        if k == log.actions[i]:
            matched[i] = 1.0
            own = float(dist[k]) if dist is not None else 1.0
            policy.update(log.X[i], log.arms[k], log.Z[k], float(log.rewards[i]), own)
    return PolicyRun(spec.text, probs, matched, False)


def _choice_index(choice: Any, arm_index: dict[str, int], K: int) -> int:
    """Policies may report their choice as a row index into the candidates or as the arm's name."""
    if isinstance(choice, (int, np.integer)) and not isinstance(choice, bool):
        if not 0 <= int(choice) < K:
            raise InvalidInput(f"policy chose candidate {choice}, outside 0..{K - 1}")
        return int(choice)
    name = str(choice)
    if name not in arm_index:
        raise InvalidInput(f"policy chose unknown action {name!r}")
    return arm_index[name]


def _distribution(ranking: Any, K: int) -> np.ndarray | None:
    """The policy's distribution over the candidates (``Ranking.propensity``), or None when it has none."""
    probs = getattr(ranking, "propensity", None)
    if probs is None:
        return None
    p = np.asarray(probs, dtype=float)
    if p.shape != (K,) or not np.isclose(p.sum(), 1.0) or np.any(p < 0):
        return None
    return p


# ---- evaluation ----

@dataclass
class Evaluation:
    """All estimates for all policies on one log, plus the per-prefix curves for plots."""

    log: BanditLog
    estimates: list[tuple[str, est.Estimate]]
    curves: dict[tuple[str, str], est.Running]

    def results(self) -> list[dict]:
        """The JSON rows: policy, estimator, value, ci_low, ci_high, n, ess, notes."""
        return [{"policy": p, **e.as_dict()} for p, e in self.estimates]


def evaluate(log: BanditLog, policies: Iterable[str | PolicySpec], estimators: Iterable[str] = ("ips",), *,
             alpha: float = 0.05, ci: str = "normal", n_boot: int = 1000, seed: int | None = 0,
             folds: int = 5, l2: float = 1.0, policy_objects: Mapping[str, Any] | None = None) -> Evaluation:
    """Estimate every policy's mean reward per event with every estimator.

    ``policy_objects`` maps a policy label to a ready policy object (anything with ``rank``/``update``), for
    policies that are not registered by name. The DR reward model is fitted once per log (cross-fitted, seeded)
    and shared by all policies.
    """
    estimators = list(dict.fromkeys(estimators))
    for e in estimators:
        if e not in est.ESTIMATORS:
            raise InvalidInput(f"unknown estimator {e!r}; use one of {', '.join(est.ESTIMATORS)}")
    specs = [parse_policy(p) if isinstance(p, str) else p for p in policies]
    objects = dict(policy_objects or {})
    if not specs and not objects:
        raise InvalidInput("no policy to evaluate; pass at least one --policy")
    q_hat = None
    if "dr" in estimators:
        q_hat = est.fit_reward_model(log.X, log.actions, log.rewards, log.Z, folds=folds, l2=l2, seed=seed)
    runs = [run_policy(log, s, seed=seed) for s in specs]
    runs += [run_policy(log, PolicySpec(label, label), seed=seed, policy=obj) for label, obj in objects.items()]
    out: list[tuple[str, est.Estimate]] = []
    curves: dict[tuple[str, str], est.Running] = {}
    n = len(log)
    rows = np.arange(n)
    kw = dict(alpha=alpha, ci=ci, n_boot=n_boot, seed=seed)
    for run in runs:
        target = run.probs[rows, log.actions]
        for e in estimators:
            terms = None
            if e == "replay":
                res = est.replay(log.rewards, run.matched, propensities=log.propensities, **kw)
            elif e == "ips":
                res = est.ips(log.rewards, log.propensities, target, **kw)
            elif e == "snips":
                res = est.snips(log.rewards, log.propensities, target, **kw)
            else:
                res = est.dr(log.rewards, log.propensities, log.actions, run.probs, q_hat, **kw)
                terms = (np.sum(run.probs * q_hat, axis=1)
                         + target / log.propensities * (log.rewards - q_hat[rows, log.actions]))
            out.append((run.policy, res))
            curves[(run.policy, e)] = est.running(e, log.rewards, log.propensities, target,
                                                  matched=run.matched, terms=terms, alpha=alpha)
    return Evaluation(log, out, curves)


def evaluate_frame(data: Any, policies: Iterable[str | PolicySpec], estimators: Iterable[str] = ("ips",),
                   *, source: str = "log", actions: Sequence[Any] | None = None, **kwargs) -> Evaluation:
    """:func:`evaluate` on a log given as a DataFrame or dict of arrays (see :func:`log_from_frame`)."""
    return evaluate(log_from_frame(data, source=source, actions=actions), policies, estimators, **kwargs)


def load_engine_log(store) -> BanditLog:
    """The engine's own decision log as a :class:`BanditLog` (see :func:`engine_log_frame`).

    Raises :class:`InvalidInput` when the store has no decision log or no rewarded choice yet.
    """
    tables = {r[0] for r in store.fetchall("SELECT table_name FROM information_schema.tables")}
    if "decisions" not in tables or "rewards" not in tables:
        raise InvalidInput(f"the state in {store.home} has no decision log yet; pass a LOG file "
                           "(CSV or Parquet with action, reward, propensity columns)")
    frame = engine_log_frame(store)
    if not frame[ACTION]:
        raise InvalidInput(f"the decision log in {store.home} has no rewarded choice yet (only the first-ranked "
                           "suggestion of each suggest call is a draw from the policy and can be replayed)")
    return log_from_frame(frame, source="engine decision log")


def engine_log_frame(store) -> dict[str, list]:
    """The engine's rewarded choices as replay columns: action = arm (the operator, or a family's setting),
    context = x, ``a_*`` = z.

    Only rank-0 decisions enter: they are the ones drawn from the policy's distribution, so their ``propensity``
    is a real selection probability (lower ranks are listed, not drawn). Chains (several operators) are left
    out, and so are decisions from another feature schema than the latest decision's, whose contexts would not line
    up.

    Every decision's descriptor ``z`` is that of its operator (with the values a family's decision chose) in the
    current arm schema (:class:`~.descriptor.Descriptors`), as the engine learns from the log, whatever schema
    version it was logged in: a home whose log spans several versions (a method or parameter added since) replays
    all of its decisions. A decision whose operator cannot be described any more (its method is not registered) is
    left out, with a warning.

    The engine draws a (pair, operator) candidate while a target policy here picks the operator for the logged
    pair, so the propensity is the operator's given its pair: the candidate's propensity over the pair's
    (``pair_propensity``, the sum over its operators). The estimates are then of the target's mean reward on the
    pairs as the engine chose them. Decisions logged before ``pair_propensity`` existed keep the joint
    propensity, which makes IPS and DR on them too large by about the number of candidate pairs (SNIPS is not
    affected when all rows are of that kind).
    """
    import logging

    from .catalog import Catalog
    from .descriptor import Descriptors

    rows = store.fetchall(
        "SELECT d.operator, d.context, d.params, least(1.0, d.propensity / coalesce(d.pair_propensity, 1.0)), "
        "r.reward, d.created_at, d.feature_schema "
        "FROM decisions d JOIN rewards r ON r.decision_id = d.id WHERE d.rank = 0 ORDER BY d.created_at, d.id")
    newest = rows[-1][6] if rows else None     # the schema the engine writes now
    describe = Descriptors(store, Catalog(store))
    frame: dict[str, list] = {ACTION: [], REWARD: [], PROPENSITY: [], TIMESTAMP: []}
    width = None
    lost: dict[str, int] = {}
    for op, x, params, prop, reward, created, schema in rows:
        ops = json.loads(op) if isinstance(op, str) else list(op)
        if len(ops) != 1 or schema != newest:
            continue
        steps = json.loads(params) if isinstance(params, str) else params
        arm, z = describe.arm(ops[0], steps[-1] if steps else None)
        if z is None:
            lost[ops[0]] = lost.get(ops[0], 0) + 1
            continue
        if width is None:
            width = (len(x), len(z))
            frame.update({f"x{j}": [] for j in range(width[0])})
            frame.update({f"{ARM_FEATURE_PREFIX}{j}": [] for j in range(width[1])})
        if len(x) != width[0]:  # (one feature schema gives one width; a log edited by hand may not)
            continue
        frame[ACTION].append(arm)
        frame[REWARD].append(reward)
        frame[PROPENSITY].append(prop)
        frame[TIMESTAMP].append(created)
        for j, v in enumerate(x):
            frame[f"x{j}"].append(v)
        for j, v in enumerate(z):
            frame[f"{ARM_FEATURE_PREFIX}{j}"].append(float(v))
    if lost:
        logging.getLogger(__name__).warning(
            "replay leaves out %d decision(s) whose operator cannot be described now: %s", sum(lost.values()),
            ", ".join(f"{k} ({n})" for k, n in sorted(lost.items())))
    return frame


# ---- plots ----

def plot(evaluation: Evaluation, path: str | Path) -> Path:
    """Cumulative estimated reward against logged events, one panel per estimator, with the confidence band.

    The cumulative reward after ``t`` events is ``t`` times the estimate from the first ``t`` events, so the
    curves of all estimators share one scale: the reward the policy would have collected on that many events.
    """
    try:
        import matplotlib
    except ImportError:
        raise InvalidInput("plots need matplotlib: pip install matplotlib") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    estimators = list(dict.fromkeys(e for _, e in evaluation.curves))
    policies = list(dict.fromkeys(p for p, _ in evaluation.curves))
    ncols = min(len(estimators), 2)
    nrows = -(-len(estimators) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(6 * ncols, 4 * nrows), squeeze=False)
    for ax in axes.ravel()[len(estimators):]:
        ax.set_visible(False)
    t = np.arange(1, len(evaluation.log) + 1)
    for ax, e in zip(axes.ravel(), estimators):
        for p in policies:
            c = evaluation.curves.get((p, e))
            if c is None:
                continue
            line, = ax.plot(t, t * c.value, label=p, lw=1.5)
            ax.fill_between(t, t * c.ci_low, t * c.ci_high, color=line.get_color(), alpha=0.2, lw=0)
        ax.set_title(e)
        ax.set_xlabel("logged events")
        ax.set_ylabel("cumulative estimated reward")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"replay of {evaluation.log.source} ({len(evaluation.log)} events)")
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
