"""Off-policy estimators: how well would a target policy have done on events a different policy logged?

Every estimator works on per-event arrays, so it never needs to know what the target policy is:

- ``rewards[i]``, ``propensities[i]``: the logged reward and the probability the *logging* policy had of taking
  the logged action;
- ``target[i]``: the probability the *target* policy gives to the logged action in that context (for a policy
  that samples one choice, the indicator ``choice == logged`` is an unbiased stand-in for it);
- for DR, the target's distribution over every action ``target_all[i, a]`` and a reward model's predictions
  ``q_hat[i, a]`` (see :func:`fit_reward_model`, cross-fitted so no event is predicted by a model that saw it).

Each returns an :class:`Estimate` with a confidence interval (analytic normal or a seeded percentile bootstrap),
the number of events used and the effective sample size.

>>> import numpy as np
>>> est = ips(np.array([1.0, 0.0]), np.array([0.5, 0.5]), np.array([1.0, 0.0]))
>>> est.value
1.0

References: Li, Chu, Langford, Wang, "Unbiased offline evaluation of contextual-bandit-based news article
recommendation algorithms" (WSDM 2011) for replay; Dudík, Langford, Li, "Doubly robust policy evaluation and
learning" (ICML 2011); Swaminathan & Joachims, "The self-normalized estimator for counterfactual learning"
(NeurIPS 2015).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np
from scipy import stats

from .errors import InvalidInput

ESTIMATORS = ("replay", "ips", "snips", "dr")
CI_METHODS = ("normal", "bootstrap")


@dataclass(frozen=True)
class Estimate:
    """One estimate of a target policy's mean reward per event."""

    estimator: str
    value: float
    ci_low: float
    ci_high: float
    #: events that entered the estimate (for replay: the matched ones)
    n: int
    #: Kish effective sample size of the importance (or match) weights: (sum w)^2 / sum w^2
    ess: float
    #: anything a reader should know about the estimate's validity (e.g. replay on a non-uniform log)
    notes: tuple[str, ...] = field(default_factory=tuple)

    def as_dict(self) -> dict:
        d = asdict(self)
        d["notes"] = list(self.notes)
        for k in ("value", "ci_low", "ci_high", "ess"):
            d[k] = None if not np.isfinite(d[k]) else float(d[k])
        return d


@dataclass(frozen=True)
class Running:
    """The estimate after each prefix of the log (for plots): ``value[t]`` uses events ``0..t``."""

    estimator: str
    value: np.ndarray
    ci_low: np.ndarray
    ci_high: np.ndarray


def _z(alpha: float) -> float:
    if not 0.0 < alpha < 1.0:
        raise InvalidInput(f"alpha must be in (0, 1), got {alpha}")
    return float(stats.norm.ppf(1.0 - alpha / 2.0))


def kish_ess(weights: np.ndarray) -> float:
    """Effective sample size (sum w)^2 / sum w^2; 0 when every weight is 0."""
    w = np.asarray(weights, dtype=float)
    s2 = float(np.sum(w * w))
    return float(np.sum(w) ** 2 / s2) if s2 > 0 else 0.0


def _as_1d(name: str, a, n: int | None = None) -> np.ndarray:
    arr = np.asarray(a, dtype=float)
    if arr.ndim != 1:
        raise InvalidInput(f"{name} must be one-dimensional, got shape {arr.shape}")
    if n is not None and arr.shape[0] != n:
        raise InvalidInput(f"{name} has {arr.shape[0]} entries, expected {n}")
    if not np.all(np.isfinite(arr)):
        i = int(np.flatnonzero(~np.isfinite(arr))[0])
        raise InvalidInput(f"{name}[{i}] is not a finite number")
    return arr


def _check_common(rewards, propensities, target) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    r = _as_1d("rewards", rewards)
    n = r.shape[0]
    if n == 0:
        raise InvalidInput("no events to estimate from")
    p = _as_1d("propensities", propensities, n)
    bad = np.flatnonzero((p <= 0) | (p > 1))
    if bad.size:
        raise InvalidInput(f"propensities[{int(bad[0])}] = {p[bad[0]]} is outside (0, 1]")
    t = _as_1d("target probabilities", target, n)
    bad = np.flatnonzero((t < 0) | (t > 1))
    if bad.size:
        raise InvalidInput(f"target probabilities[{int(bad[0])}] = {t[bad[0]]} is outside [0, 1]")
    return r, p, t


def _bootstrap(stat: Callable[[np.ndarray], float], n: int, n_boot: int, alpha: float,
               seed: int | None) -> tuple[float, float]:
    """Percentile interval of ``stat(indices)`` over ``n_boot`` resamples of the events, with replacement."""
    if n_boot < 10:
        raise InvalidInput(f"n_boot must be at least 10, got {n_boot}")
    rng = np.random.default_rng(seed)
    vals = np.empty(n_boot)
    for b in range(n_boot):
        vals[b] = stat(rng.integers(0, n, size=n))
    vals = vals[np.isfinite(vals)]
    if vals.size == 0:
        return float("nan"), float("nan")
    lo, hi = np.quantile(vals, [alpha / 2.0, 1.0 - alpha / 2.0])
    return float(lo), float(hi)


def _mean_ci(terms: np.ndarray, alpha: float) -> tuple[float, float, float]:
    """Mean of i.i.d. per-event terms with a normal interval from their sample standard deviation."""
    n = terms.shape[0]
    v = float(np.mean(terms))
    if n < 2:
        return v, float("nan"), float("nan")
    half = _z(alpha) * float(np.std(terms, ddof=1)) / np.sqrt(n)
    return v, v - half, v + half


def _ratio_ci(w: np.ndarray, r: np.ndarray, alpha: float) -> tuple[float, float, float]:
    """sum(w r) / sum(w) with a delta-method normal interval: se = sqrt(sum w^2 (r - v)^2) / sum w."""
    sw = float(np.sum(w))
    if sw <= 0:
        return float("nan"), float("nan"), float("nan")
    v = float(np.sum(w * r) / sw)
    if np.count_nonzero(w) < 2:
        return v, float("nan"), float("nan")
    # the m/(m-1) factor makes the 0/1-weight case (replay: a plain mean of the matched rewards) agree with the
    # usual interval of a sample mean with ddof=1
    m = np.count_nonzero(w)
    se = float(np.sqrt(np.sum(w * w * (r - v) ** 2) * m / (m - 1))) / sw
    half = _z(alpha) * se
    return v, v - half, v + half


def _finish(name: str, value: float, lo: float, hi: float, n: int, ess: float, notes: list[str], *, ci: str,
            n_boot: int, alpha: float, seed: int | None, n_events: int,
            boot: Callable[[np.ndarray], float]) -> Estimate:
    """Build the Estimate, replacing the analytic interval by a bootstrap one when asked."""
    if ci == "bootstrap":
        lo, hi = _bootstrap(boot, n=n_events, n_boot=n_boot, alpha=alpha, seed=seed)
    elif ci != "normal":
        raise InvalidInput(f"unknown confidence interval method {ci!r}; use one of {', '.join(CI_METHODS)}")
    return Estimate(name, float(value), float(lo), float(hi), int(n), float(ess), tuple(notes))


def replay(rewards, matched, *, propensities=None, alpha: float = 0.05, ci: str = "normal",
           n_boot: int = 1000, seed: int | None = 0) -> Estimate:
    """Rejection replay (Li et al. 2011): the mean reward over the events where the target agreed with the log.

    ``matched[i]`` is 1 where the target policy chose the logged action (0 elsewhere); a fractional value is the
    probability it would have, which gives the same expectation with less noise for policies evaluated directly.
    Unbiased only when the log was collected uniformly at random; with ``propensities`` given and not uniform,
    the estimate carries a note saying so.
    """
    r = _as_1d("rewards", rewards)
    if r.shape[0] == 0:
        raise InvalidInput("no events to estimate from")
    m = _as_1d("match weights", matched, r.shape[0])
    if np.any((m < 0) | (m > 1)):
        raise InvalidInput("match weights must lie in [0, 1]")
    notes = []
    if propensities is not None:
        p = _as_1d("propensities", propensities, r.shape[0])
        if np.ptp(p) > 1e-9:
            notes.append("the log is not uniform (propensities vary), so replay is biased; prefer ips, snips or dr")
    used = int(np.count_nonzero(m))
    if used == 0:
        return Estimate("replay", float("nan"), float("nan"), float("nan"), 0, 0.0,
                        tuple(notes + ["the target policy never agreed with the logged action"]))
    v, lo, hi = _ratio_ci(m, r, alpha)

    def boot(idx):
        s = m[idx].sum()
        return float((m[idx] * r[idx]).sum() / s) if s > 0 else float("nan")

    return _finish("replay", v, lo, hi, used, kish_ess(m), notes, ci=ci, n_boot=n_boot, alpha=alpha, seed=seed,
                   n_events=r.shape[0], boot=boot)


def ips(rewards, propensities, target, *, alpha: float = 0.05, ci: str = "normal", n_boot: int = 1000,
        seed: int | None = 0, clip: float | None = None) -> Estimate:
    """Inverse propensity scoring: mean over all events of ``target / propensity * reward``.

    Unbiased whenever the logging policy gave every action the target can take a non-zero probability. ``clip``
    caps the weights (trading bias for variance); it is off by default.
    """
    r, p, t = _check_common(rewards, propensities, target)
    w = t / p
    if clip is not None:
        w = np.minimum(w, clip)
    terms = w * r
    v, lo, hi = _mean_ci(terms, alpha)
    return _finish("ips", v, lo, hi, r.shape[0], kish_ess(w), [], ci=ci, n_boot=n_boot, alpha=alpha, seed=seed,
                   n_events=r.shape[0], boot=lambda idx: float(terms[idx].mean()))


def snips(rewards, propensities, target, *, alpha: float = 0.05, ci: str = "normal", n_boot: int = 1000,
          seed: int | None = 0) -> Estimate:
    """Self-normalized IPS: ``sum(w r) / sum(w)`` with ``w = target / propensity``.

    Slightly biased, but bounded by the rewards' range and usually far less variable than IPS.
    """
    r, p, t = _check_common(rewards, propensities, target)
    w = t / p
    v, lo, hi = _ratio_ci(w, r, alpha)

    def boot(idx):
        s = w[idx].sum()
        return float((w[idx] * r[idx]).sum() / s) if s > 0 else float("nan")

    notes = [] if np.any(w > 0) else ["the target policy gives every logged action probability 0"]
    return _finish("snips", v, lo, hi, r.shape[0], kish_ess(w), notes, ci=ci, n_boot=n_boot, alpha=alpha,
                   seed=seed, n_events=r.shape[0], boot=boot)


def dr(rewards, propensities, actions, target_all, q_hat, *, alpha: float = 0.05, ci: str = "normal",
       n_boot: int = 1000, seed: int | None = 0) -> Estimate:
    """Doubly robust: the reward model's value under the target, corrected by IPS on its residual.

    ``term_i = sum_a target_all[i, a] q_hat[i, a] + w_i (r_i - q_hat[i, a_i])`` with ``w_i = target_all[i, a_i] /
    propensity_i``; unbiased when either the propensities or the reward model are right.
    """
    r = _as_1d("rewards", rewards)
    n = r.shape[0]
    a = np.asarray(actions)
    if a.shape != (n,) or not np.issubdtype(a.dtype, np.integer):
        raise InvalidInput(f"actions must be {n} integer action indices")
    pi = np.asarray(target_all, dtype=float)
    q = np.asarray(q_hat, dtype=float)
    if pi.ndim != 2 or pi.shape[0] != n or q.shape != pi.shape:
        raise InvalidInput(f"target_all and q_hat must both have shape ({n}, n_actions); got {pi.shape} and {q.shape}")
    if np.any((a < 0) | (a >= pi.shape[1])):
        raise InvalidInput("an action index is outside the action set")
    if not np.all(np.isfinite(q)):
        raise InvalidInput("the reward model predicted a non-finite value")
    t = pi[np.arange(n), a]
    r, p, t = _check_common(r, propensities, t)
    w = t / p
    q_logged = q[np.arange(n), a]
    terms = np.sum(pi * q, axis=1) + w * (r - q_logged)
    v, lo, hi = _mean_ci(terms, alpha)
    return _finish("dr", v, lo, hi, n, kish_ess(w), [], ci=ci, n_boot=n_boot, alpha=alpha, seed=seed,
                   n_events=n, boot=lambda idx: float(terms[idx].mean()))


def running(estimator: str, rewards, propensities, target, *, matched=None, terms=None,
            alpha: float = 0.05) -> Running:
    """Estimate and normal interval after every prefix of the log, in O(n) with cumulative sums.

    ``terms`` are DR's per-event terms; ``matched`` the replay match weights; IPS and SNIPS use ``target``.
    """
    z = _z(alpha)
    r = np.asarray(rewards, dtype=float)
    k = np.arange(1, r.shape[0] + 1, dtype=float)
    if estimator in ("ips", "dr"):
        x = terms if estimator == "dr" else np.asarray(target, float) / np.asarray(propensities, float) * r
        s1, s2 = np.cumsum(x), np.cumsum(x * x)
        mean = s1 / k
        with np.errstate(invalid="ignore", divide="ignore"):
            var = np.maximum(s2 - k * mean * mean, 0.0) / np.maximum(k - 1, 1)
            half = np.where(k > 1, z * np.sqrt(var / k), np.nan)
        return Running(estimator, mean, mean - half, mean + half)
    if estimator in ("snips", "replay"):
        w = np.asarray(matched if estimator == "replay" else
                       np.asarray(target, float) / np.asarray(propensities, float), dtype=float)
        # sum w^2 (r - v)^2 = S(w^2 r^2) - 2 v S(w^2 r) + v^2 S(w^2), all prefix sums
        sw, swr = np.cumsum(w), np.cumsum(w * r)
        sw2, sw2r, sw2r2 = np.cumsum(w * w), np.cumsum(w * w * r), np.cumsum(w * w * r * r)
        m = np.cumsum(w > 0).astype(float)
        with np.errstate(invalid="ignore", divide="ignore"):
            v = np.where(sw > 0, swr / sw, np.nan)
            num = np.maximum(sw2r2 - 2 * v * sw2r + v * v * sw2, 0.0) * m / np.maximum(m - 1, 1)
            half = np.where(m > 1, z * np.sqrt(num) / sw, np.nan)
        return Running(estimator, v, v - half, v + half)
    raise InvalidInput(f"unknown estimator {estimator!r}; use one of {', '.join(ESTIMATORS)}")


# ---- reward model for DR ----

def _design(X: np.ndarray, Z: np.ndarray) -> np.ndarray:
    """Features of (context, action) pairs: intercept, context, action descriptor and their products.

    The products let the linear model give each action its own response to the context; without them a linear
    reward model could only shift actions by a constant, which makes DR no better than IPS on most logs.
    """
    n = X.shape[0]
    inter = (X[:, :, None] * Z[:, None, :]).reshape(n, -1)
    return np.hstack([np.ones((n, 1)), X, Z, inter])


@dataclass
class RidgeRewardModel:
    """Ridge regression of reward on (context, action-descriptor) features; the intercept is not penalized.

    Contexts are standardized with the training folds' means and scales so that ``l2`` means the same on every
    log.
    """

    l2: float = 1.0

    #: rows per block when building the normal equations, so memory stays bounded on long logs
    chunk: int = 8192

    def fit(self, X: np.ndarray, Z: np.ndarray, r: np.ndarray) -> "RidgeRewardModel":
        self._mu = X.mean(axis=0)
        sd = X.std(axis=0)
        self._sd = np.where(sd > 0, sd, 1.0)
        p = 1 + X.shape[1] + Z.shape[1] + X.shape[1] * Z.shape[1]
        G, b = self.l2 * np.eye(p), np.zeros(p)
        G[0, 0] = 0.0
        for s in range(0, X.shape[0], self.chunk):
            D = _design((X[s:s + self.chunk] - self._mu) / self._sd, Z[s:s + self.chunk])
            G += D.T @ D
            b += D.T @ r[s:s + self.chunk]
        self._beta = np.linalg.lstsq(G, b, rcond=None)[0]
        return self

    def predict(self, X: np.ndarray, Z: np.ndarray) -> np.ndarray:
        out = np.empty(X.shape[0])
        for s in range(0, X.shape[0], self.chunk):
            out[s:s + self.chunk] = _design((X[s:s + self.chunk] - self._mu) / self._sd,
                                            Z[s:s + self.chunk]) @ self._beta
        return out


def fit_reward_model(X, actions, rewards, arm_features, *, folds: int = 5, l2: float = 1.0,
                     seed: int | None = 0) -> np.ndarray:
    """Cross-fitted reward predictions ``q_hat[i, a]`` for every event ``i`` and action ``a``.

    ``X`` (n, d) contexts, ``actions`` (n,) logged action indices, ``rewards`` (n,), ``arm_features`` (K, k) one
    descriptor per action. Events are split into ``folds`` random folds (seeded); each fold is predicted by a
    :class:`RidgeRewardModel` fitted on the others, so an event's own reward never leaks into its prediction
    (which would bias DR towards the direct method).
    """
    X = np.asarray(X, dtype=float)
    a = np.asarray(actions)
    r = np.asarray(rewards, dtype=float)
    Z = np.asarray(arm_features, dtype=float)
    n, K = X.shape[0], Z.shape[0]
    if X.ndim != 2 or a.shape != (n,) or r.shape != (n,):
        raise InvalidInput("X must be (n, d) and actions, rewards (n,)")
    folds = int(min(max(folds, 1), n))
    rng = np.random.default_rng(seed)
    fold_of = rng.permutation(np.arange(n) % folds)
    q = np.empty((n, K))
    for f in range(folds):
        test = fold_of == f
        train = ~test if folds > 1 else test
        if not np.any(train):
            train = test
        model = RidgeRewardModel(l2=l2).fit(X[train], Z[a[train]], r[train])
        Xt = X[test]
        for k in range(K):
            q[test, k] = model.predict(Xt, np.repeat(Z[k:k + 1], Xt.shape[0], axis=0))
    return q
