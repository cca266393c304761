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
            if cached is not None and cached[0] == ridge.count(i):
                out[r] = cached[1]
            else:
                stale.append((r, arm, i))
        if stale:
            Ls = np.linalg.cholesky(ridge.inverses[[i for _, _, i in stale]])
            for (r, arm, i), L in zip(stale, Ls):
                self._chol[arm] = (ridge.count(i), L)
                out[r] = L
        return out

    def _score(self, cands):
        p = cands.X.shape[1] + 1
        ridge = self._model(p)
        mean, width = ridge.mean_width(cands)
        prior = self._prior_mean(cands)
        if prior is not None:
            mean = mean + prior
        S = self._draw_scores(cands, ridge, p)  # (M, n): every candidate's reward under each draw
        if prior is not None:
            S += prior
        wins = np.bincount(S.argmax(axis=1), minlength=S.shape[1]) / self.n_samples
        return S[0].copy(), mean, self.v * width, wins

    def _draws(self, ridge, arms: list[str], p: int) -> np.ndarray:
        """``n_samples`` parameter vectors per arm, ``(K, M, p)`` in scratch memory, from ``N(theta_a, v^2 A_a^-1)``."""
        _, theta = ridge.stack(arms)
        shape = (len(arms), self.n_samples, p)
        E = self._rng.standard_normal(out=ridge.scratch.get("normals", shape))
        W = np.matmul(E, self._factors(arms, p).transpose(0, 2, 1), out=ridge.scratch.get("params", shape))
        W *= self.v
        W += theta[:, None, :]
        return W

    def _draw_scores(self, cands, ridge, p: int) -> np.ndarray:
        """``(M, n)`` in scratch memory (64 draws of thousands of candidates would be fresh pages every time)."""
        M, n = self.n_samples, len(cands)
        g = cands.grid
        if g is not None:  # the P pair contexts times each draw's K parameter vectors: (M, P, K), candidate order
            W = self._draws(ridge, g.arms, p)
            S = ridge.scratch.get("draws", (M, n // len(g.arms), len(g.arms)))
            return np.matmul(with_intercept(g.X), W.transpose(1, 2, 0), out=S).reshape(M, n)
        Xp = padded(with_intercept(cands.X))
        S = ridge.scratch.get("draws", (M, n + 1))
        for arms, grid in cands.batches:
            S[:, grid] = (self._draws(ridge, arms, p) @ Xp[grid].transpose(0, 2, 1)).transpose(1, 0, 2)
        return S[:, :n]

    def _load_state(self, arrays, meta) -> None:
        super()._load_state(arrays, meta)
        self._chol = {}


POLICY = LinTS
