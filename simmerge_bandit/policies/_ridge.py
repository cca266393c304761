"""Machinery shared by the ridge-regression policies (LinUCB, linear Thompson sampling, epsilon-greedy).

:class:`PerArmRidge` keeps, for each arm, the inverse of ``A = l2 * I + sum x x^T`` and ``theta = A^-1 b``,
updated by Sherman-Morrison in O(p^2) per reward: no matrix is ever inverted or refactorized on an event.

:class:`LinearPolicy` adds the optional ``prior``: a fitted :class:`~.predictor.SimMergePredictor` whose
prediction is the starting point. The bandit then learns the *residual* ``reward - prior(x, z)``, so with no
rewards it ranks exactly like the predictor and every reward corrects it; its exploration width is the ridge
width of the residual model. The prior is never updated by the bandit.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy.linalg.blas import daxpy, dgemv

from ..errors import InvalidInput
from .base import Candidates, Policy, is_number, padded, require, sherman_morrison, with_intercept


class PerArmRidge:
    """One ridge regression per arm over ``p`` features, grown as arms appear."""

    def __init__(self, p: int, l2: float):
        self.p = p
        self.l2 = l2
        self.index: dict[str, int] = {}
        self._Ainv = np.empty((0, p, p))
        self._b = np.empty((0, p))
        self._theta = np.empty((0, p))
        self._count = np.empty(0, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.index)

    def row(self, arm: str) -> int:
        """The row of ``arm``, adding a fresh (prior-only) one the first time."""
        i = self.index.get(arm)
        if i is not None:
            return i
        i = len(self.index)
        if i == self._Ainv.shape[0]:
            cap = max(4, 2 * i)
            self._Ainv = _grow(self._Ainv, cap)
            self._b = _grow(self._b, cap)
            self._theta = _grow(self._theta, cap)
            self._count = _grow(self._count, cap)
        self._Ainv[i] = np.eye(self.p) / self.l2
        self._b[i] = 0.0
        self._theta[i] = 0.0
        self._count[i] = 0
        self.index[arm] = i
        return i

    def update(self, i: int, xt: np.ndarray, r: float) -> None:
        """Add observation ``(xt, r)`` to arm row ``i`` (Sherman-Morrison on the inverse)."""
        sherman_morrison(self._Ainv[i], xt)
        b = self._b[i] = daxpy(xt, self._b[i], a=r)  # in place for a contiguous row; the store keeps it certain
        self._theta[i] = dgemv(1.0, self._Ainv[i].T, b)  # A^-1 b (symmetric A^-1: its transpose is BLAS order)
        self._count[i] += 1

    def arm(self, arm: str) -> tuple[np.ndarray, np.ndarray]:
        """``(A^-1, theta)`` of ``arm`` (the prior values for an arm never seen)."""
        i = self.index.get(arm)
        if i is None:
            return np.eye(self.p) / self.l2, np.zeros(self.p)
        return self._Ainv[i], self._theta[i]

    def stack(self, arms: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """``(A^-1, theta)`` stacked for ``arms``, with the prior values where an arm was never seen."""
        rows = [self.index.get(a, -1) for a in arms]
        if rows == list(range(len(rows))) and rows:  # the usual case, every operator in order: views, no copy
            return self._Ainv[: len(rows)], self._theta[: len(rows)]
        if len(self.index) and -1 not in rows:
            return self._Ainv[rows], self._theta[rows]
        known = np.array(rows) >= 0
        Ainv = np.empty((len(arms), self.p, self.p))
        theta = np.empty((len(arms), self.p))
        Ainv[known] = self._Ainv[np.array(rows)[known]]
        theta[known] = self._theta[np.array(rows)[known]]
        Ainv[~known] = np.eye(self.p) / self.l2
        theta[~known] = 0.0
        return Ainv, theta

    def mean_width(self, cands: Candidates, Xt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Posterior mean ``x^T theta`` and width ``sqrt(x^T A^-1 x)`` of every candidate, all arms batched."""
        n = Xt.shape[0]
        Xp = padded(Xt) if cands.needs_padding else Xt
        mean = np.empty(n + 1)
        var = np.empty(n + 1)
        for arms, grid in cands.batches:
            Ainv, theta = self.stack(arms)
            Xb = Xp[grid]                                   # (K, w, p)
            mean[grid] = (Xb @ theta[:, :, None])[..., 0]
            var[grid] = np.einsum("kwp,kwp->kw", Xb @ Ainv, Xb)
        return mean[:n], np.sqrt(np.maximum(var[:n], 0.0))

    def arrays(self) -> dict[str, np.ndarray]:
        K = len(self.index)
        return {"Ainv": self._Ainv[:K].copy(), "b": self._b[:K].copy(), "theta": self._theta[:K].copy(),
                "count": self._count[:K].copy()}

    def load(self, arms: list[str], arrays: dict[str, np.ndarray]) -> None:
        self.index = {a: i for i, a in enumerate(arms)}
        self._Ainv = np.array(arrays["Ainv"], dtype=np.float64, order="C").reshape(len(arms), self.p, self.p)
        self._b = np.array(arrays["b"], dtype=np.float64, order="C").reshape(len(arms), self.p)
        self._theta = np.array(arrays["theta"], dtype=np.float64, order="C").reshape(len(arms), self.p)
        self._count = np.array(arrays["count"], dtype=np.int64, order="C").reshape(len(arms))


def _grow(a: np.ndarray, cap: int) -> np.ndarray:
    out = np.empty((cap,) + a.shape[1:], dtype=a.dtype)
    out[: a.shape[0]] = a
    return out


class LinearPolicy(Policy):
    """Base of the policies that keep ridge models: the ``l2`` and ``prior`` parameters and prior handling."""

    _param_names = ("l2", "prior", "floor", "seed")

    def __init__(self, *, l2: float = 1.0, prior: Any = None, floor: float = 0.01, seed: int = 0):
        super().__init__(floor=floor, seed=seed)
        require(is_number(l2) and l2 > 0, f"l2 must be a positive number, got {l2!r}")
        require(prior is None or (isinstance(prior, Policy) and hasattr(prior, "predict")),
                "prior must be a fitted SimMerge predictor (make_policy('predictor').fit(...)) or None")
        self.l2 = float(l2)
        self.prior = prior

    # The residual target and the prior part of predictions.
    def _prior_mean(self, cands: Candidates) -> np.ndarray | None:
        return None if self.prior is None else self.prior.predict(cands.X, cands.Z)

    def _residual(self, x: np.ndarray, z: np.ndarray, reward: float) -> float:
        if self.prior is None:
            return reward
        return reward - float(self.prior.predict(x[None, :], z[None, :])[0])

    def _explain_linear(self, x: np.ndarray, arm: str, z: np.ndarray, w: np.ndarray) -> dict:
        """Explanation of ``prior + [1, x] @ w``: the bias and each feature's ``x_j * w_j`` (plus the prior's)."""
        x = np.asarray(x, dtype=np.float64).reshape(-1)
        contrib = x * w[1:]
        base = float(w[0])
        if self.prior is not None:
            pe = self.prior.explain(x, arm, z)
            contrib = contrib + pe["contributions"]
            base += pe["baseline"]
        return {"predicted": base + float(contrib.sum()), "baseline": base, "contributions": contrib,
                "method": "linear"}

    def _prior_state(self, arrays: dict[str, np.ndarray], meta: dict) -> None:
        if self.prior is not None:
            p_arrays, p_meta = self.prior.snapshot()
            arrays.update({f"prior/{k}": v for k, v in p_arrays.items()})
            meta["prior"] = p_meta

    def _load_prior(self, arrays: dict[str, np.ndarray], meta: dict) -> None:
        if "prior" not in meta:
            if self.prior is not None:
                raise InvalidInput(f"snapshot of {self.name} has no prior, but this policy has one")
            return
        from . import from_snapshot

        p_arrays = {k[len("prior/"):]: v for k, v in arrays.items() if k.startswith("prior/")}
        self.prior = from_snapshot(p_arrays, meta["prior"])


class DisjointLinearPolicy(LinearPolicy):
    """One ridge model per operator over ``[1, x]`` (the operator descriptor is not used)."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self._ridge: PerArmRidge | None = None

    def _mean_width(self, cands: Candidates) -> tuple[np.ndarray, np.ndarray]:
        Xt = with_intercept(cands.X)
        mean, width = self._model(Xt.shape[1]).mean_width(cands, Xt)
        prior = self._prior_mean(cands)
        return (mean if prior is None else mean + prior), width

    def _learn(self, x, arm, z, reward, propensity) -> None:
        if self._ridge is None:
            self._ridge = PerArmRidge(x.shape[0] + 1, self.l2)
        xt = np.concatenate(([1.0], x))
        self._ridge.update(self._ridge.row(arm), xt, self._residual(x, z, reward))

    def explain(self, x, arm, z) -> dict:
        x = np.asarray(x, dtype=np.float64).reshape(-1)
        return self._explain_linear(x, arm, z, self._model(x.shape[0] + 1).arm(str(arm))[1])

    def _model(self, p: int) -> PerArmRidge:
        """The fitted per-arm models, or empty ones (prior only) before the first update."""
        return self._ridge if self._ridge is not None else PerArmRidge(p, self.l2)

    def _state(self):
        arrays: dict[str, np.ndarray] = {}
        meta: dict = {"arms": []}
        if self._ridge is not None:
            arrays.update(self._ridge.arrays())
            meta["arms"] = list(self._ridge.index)
        self._prior_state(arrays, meta)
        return arrays, meta

    def _load_state(self, arrays, meta) -> None:
        self._load_prior(arrays, meta)
        if "Ainv" in arrays:
            p = int(np.asarray(arrays["Ainv"]).shape[-1])
            self._ridge = PerArmRidge(p, self.l2)
            self._ridge.load(list(meta["arms"]), arrays)
        else:
            self._ridge = None
