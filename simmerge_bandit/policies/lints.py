"""Linear Thompson sampling (Agrawal & Goyal 2013) with one ridge posterior per operator.

Each :meth:`rank` draws ``n_samples`` parameter vectors per operator from ``N(theta_a, v^2 A_a^-1)`` and counts
how often each candidate is the best under a draw. Those frequencies are the policy's exact choice distribution
given the draws (choosing by one uniformly picked draw is Thompson sampling), so the logged propensity is the
probability actually used, not an estimate of it; the exploration ``floor`` is mixed in on top.
``scores`` are the rewards under the first draw.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from ._ridge import DisjointLinearPolicy
from .base import is_number, padded, require, with_intercept


class LinTS(DisjointLinearPolicy):
    """Linear Thompson sampling. ``v`` scales the posterior; ``n_samples`` draws per ranking."""

    name: ClassVar[str] = "lints"
    _param_names = ("v", "n_samples", "l2", "prior", "floor", "seed")

    def __init__(self, v: float = 0.5, n_samples: int = 64, l2: float = 1.0, prior=None, floor: float = 0.01,
                 seed: int = 0):
        super().__init__(l2=l2, prior=prior, floor=floor, seed=seed)
        require(is_number(v) and v >= 0, f"v must be a non-negative number, got {v!r}")
        require(isinstance(n_samples, (int, np.integer)) and not isinstance(n_samples, bool) and n_samples >= 1,
                f"n_samples must be a positive integer, got {n_samples!r}")
        self.v = float(v)
        self.n_samples = int(n_samples)
        self._chol: dict[str, tuple[int, np.ndarray]] = {}  # arm -> (its update count, cholesky of A^-1)

    def _factors(self, arms: list[str], p: int) -> np.ndarray:
        """Cholesky factors of each arm's A^-1, stacked; recomputed only for arms updated since the last call."""
        ridge = self._ridge
        out = np.empty((len(arms), p, p))
        stale = []
        for r, arm in enumerate(arms):
            i = None if ridge is None else ridge.index.get(arm)
            if i is None:  # never updated: A^-1 = I / l2
                out[r] = np.eye(p) / np.sqrt(self.l2)
                continue
            cached = self._chol.get(arm)
            if cached is not None and cached[0] == ridge._count[i]:
                out[r] = cached[1]
            else:
                stale.append((r, arm, i))
        if stale:
            Ls = np.linalg.cholesky(ridge._Ainv[[i for _, _, i in stale]])
            for (r, arm, i), L in zip(stale, Ls):
                self._chol[arm] = (int(ridge._count[i]), L)
                out[r] = L
        return out

    def _score(self, cands):
        Xt = with_intercept(cands.X)
        ridge = self._model(Xt.shape[1])
        mean, width = ridge.mean_width(cands, Xt)
        prior = self._prior_mean(cands)
        if prior is not None:
            mean = mean + prior
        M, n, p = self.n_samples, Xt.shape[0], Xt.shape[1]
        Xp = padded(Xt)
        S = np.empty((M, n + 1))
        for arms, grid in cands.batches:
            _, theta = ridge.stack(arms)
            L = self._factors(arms, p)
            E = self._rng.standard_normal((len(arms), M, p))
            draws = theta[:, None, :] + self.v * (E @ L.transpose(0, 2, 1))  # (K, M, p) ~ N(theta, v^2 A^-1)
            S[:, grid] = (draws @ Xp[grid].transpose(0, 2, 1)).transpose(1, 0, 2)
        S = S[:, :n]
        if prior is not None:
            S += prior
        wins = np.bincount(S.argmax(axis=1), minlength=n) / M
        return S[0].copy(), mean, self.v * width, wins

    def _load_state(self, arrays, meta) -> None:
        super()._load_state(arrays, meta)
        self._chol = {}


POLICY = LinTS
