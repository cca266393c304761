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
from scipy.linalg.blas import daxpy, ddot, dgemv, dger

from ..errors import InvalidInput
from .base import Candidates, Policy, Scratch, is_number, padded, quad_forms, require, with_intercept


class PerArmRidge:
    """One ridge regression per arm over ``p`` features, grown as arms appear.

    Each arm's row holds ``[A^-1 | theta]`` as one ``(p, p + 1)`` block, so one matrix-vector product gives
    ``A^-1 x`` and ``theta^T x`` and one rank-one write updates both (see :meth:`update`).
    """

    def __init__(self, p: int, l2: float):
        self.p = p
        self.l2 = l2
        self.index: dict[str, int] = {}
        self._G = np.empty((0, p, p + 1))     # per row: [A^-1 | theta]
        self._b = np.empty((0, p))
        self._count: list[int] = []
        self._rows: list[tuple[np.ndarray, np.ndarray]] = []  # per row: ([A^-1 | theta] in BLAS order, b)
        self._xt = np.ones(p)  # the [1, x] of the update in progress
        self.scratch = Scratch()

    def __len__(self) -> int:
        return len(self.index)

    @property
    def inverses(self) -> np.ndarray:
        """``A^-1`` of every allocated row, ``(capacity, p, p)`` (a view)."""
        return self._G[:, :, : self.p]

    @property
    def thetas(self) -> np.ndarray:
        """``theta = A^-1 b`` of every allocated row, ``(capacity, p)`` (a view)."""
        return self._G[:, :, self.p]

    def count(self, i: int) -> int:
        """How many observations row ``i`` has learned from."""
        return self._count[i]

    def lift(self, x: np.ndarray) -> np.ndarray:
        """``[1, x]`` in a buffer reused by every update (valid until the next call)."""
        self._xt[1:] = x
        return self._xt

    def row(self, arm: str) -> int:
        """The row of ``arm``, adding a fresh (prior-only) one the first time."""
        i = self.index.get(arm)
        if i is not None:
            return i
        i = len(self.index)
        if i == self._G.shape[0]:
            cap = max(4, 2 * i)
            self._G = _grow(self._G, cap)
            self._b = _grow(self._b, cap)
        self._G[i, :, : self.p] = np.eye(self.p) / self.l2
        self._G[i, :, self.p] = 0.0
        self._b[i] = 0.0
        self._count.append(0)
        self.index[arm] = i
        self._views()
        return i

    def _views(self) -> None:
        # Views made once per row (and again when the arrays move), not on every update. The transpose of a
        # C-ordered block is the same buffer in the Fortran order BLAS writes in place.
        self._rows = [(self._G[i].T, self._b[i]) for i in range(len(self.index))]

    def update(self, i: int, xt: np.ndarray, r: float) -> tuple[np.ndarray, float]:
        """Add observation ``(xt, r)`` to arm row ``i``; returns ``(A^-1 xt, 1 + xt^T A^-1 xt)`` before it.

        Sherman-Morrison with ``v = A^-1 xt``, ``c = 1 + xt^T v``: ``A^-1 -= v v^T / c``, and the same rank-one
        term moves ``theta`` to ``A'^-1 (b + r xt) = theta + v (r - theta^T xt) / c``. On the ``[A^-1 | theta]``
        block that is ``G -= v [v; theta^T xt - r]^T / c``: one product, one dot, one rank-one write, and
        ``b += r xt`` for the snapshot. Four BLAS calls, positional arguments (f2py parses keywords several
        times slower than this arithmetic takes), all in place. This is the hot path of every reward.
        """
        Gt, b = self._rows[i]
        g = dgemv(1.0, Gt, xt)                     # [A^-1 xt; theta^T xt]
        v = g[: self.p]
        c = 1.0 + ddot(xt, v)
        g[self.p] -= r
        dger(-1.0 / c, g, v, 1, 1, Gt, 0, 0, 1)    # alpha, x, y, incx, incy, a, overwrite_x, overwrite_y, overwrite_a
        daxpy(xt, b, self.p, r)                    # x, y, n, a
        self._count[i] += 1
        return v, c

    def arm(self, arm: str) -> tuple[np.ndarray, np.ndarray]:
        """``(A^-1, theta)`` of ``arm`` (the prior values for an arm never seen)."""
        i = self.index.get(arm)
        if i is None:
            return np.eye(self.p) / self.l2, np.zeros(self.p)
        return self._G[i, :, : self.p], self._G[i, :, self.p]

    def stack(self, arms: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """``(A^-1, theta)`` stacked for ``arms``, with the prior values where an arm was never seen."""
        rows = [self.index.get(a, -1) for a in arms]
        if rows == list(range(len(rows))) and rows:  # the usual case, every operator in order: views, no copy
            G = self._G[: len(rows)]
        elif len(self.index) and -1 not in rows:
            G = self._G[rows]
        else:
            G = np.empty((len(arms), self.p, self.p + 1))
            known = np.array(rows) >= 0
            G[known] = self._G[np.array(rows)[known]]
            G[~known, :, : self.p] = np.eye(self.p) / self.l2
            G[~known, :, self.p] = 0.0
        return G[:, :, : self.p], G[:, :, self.p]

    def mean_width(self, cands: Candidates) -> tuple[np.ndarray, np.ndarray]:
        """Posterior mean ``x~^T theta`` and width ``sqrt(x~^T A^-1 x~)`` of every candidate, ``x~ = [1, x]``."""
        g = cands.grid
        if g is not None:  # per pair and operator: two matrix products over the P pair contexts
            Xt = with_intercept(g.X)
            Ainv, theta = self.stack(g.arms)
            var = quad_forms(Xt, Ainv, self.scratch)
            return (Xt @ theta.T).ravel(), np.sqrt(np.maximum(var, 0.0, out=var)).ravel()
        Xt = with_intercept(cands.X)
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
        return {"Ainv": self._G[:K, :, : self.p].copy(), "b": self._b[:K].copy(),
                "theta": self._G[:K, :, self.p].copy(), "count": np.array(self._count, dtype=np.int64)}

    def load(self, arms: list[str], arrays: dict[str, np.ndarray]) -> None:
        K, p = len(arms), self.p
        self.index = {a: i for i, a in enumerate(arms)}
        self._G = np.empty((K, p, p + 1))
        self._G[:, :, :p] = np.asarray(arrays["Ainv"], dtype=np.float64).reshape(K, p, p)
        self._G[:, :, p] = np.asarray(arrays["theta"], dtype=np.float64).reshape(K, p)
        self._b = np.array(arrays["b"], dtype=np.float64, order="C").reshape(K, p)
        self._count = [int(c) for c in np.asarray(arrays["count"]).reshape(K)]
        self._views()


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
        mean, width = self._model(cands.X.shape[1] + 1).mean_width(cands)
        prior = self._prior_mean(cands)
        return (mean if prior is None else mean + prior), width

    def _learn(self, x, arm, z, reward, propensity) -> None:
        ridge = self._ridge
        if ridge is None:
            ridge = self._ridge = PerArmRidge(x.shape[0] + 1, self.l2)
        ridge.update(ridge.row(arm), ridge.lift(x), reward if self.prior is None else self._residual(x, z, reward))

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
