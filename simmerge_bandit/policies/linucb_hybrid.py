"""Hybrid LinUCB (Li et al. 2010, Algorithm 2): a shared model over operator descriptors plus one per operator.

The expected reward of candidate ``(x, operator a)`` is ``phi^T beta + x~^T theta_a`` with ``x~ = [1, x]``,
``z~ = [1, z_a]`` (the operator's descriptor) and the shared features ``phi = x~ (outer) z~``: a constant, the
context, the descriptor and every context x descriptor interaction. ``beta`` is learned from every operator's
rewards, so a brand-new operator is ranked from its descriptor alone (``x~^T B z~``, ``B = beta`` as a matrix)
and its own ``theta_a`` then corrects what the shared part gets wrong. This is one joint ridge regression with
penalty ``l2`` on ``beta`` and ``arm_l2`` on each ``theta_a``; the algorithm below solves it by block
elimination, exactly (a test checks it against the batch solve). ``arm_l2`` defaults to 10, ten times the
default ``l2``: with equal penalties the solution splits a descriptor effect between ``beta`` and the operators'
own biases (the data cannot tell them apart), and a new operator inherits only part of it; a stiffer
per-operator model makes the shared part explain what it can and the per-operator part only the rest.

Because an operator's descriptor is fixed, every shared row of operator ``a`` is ``phi = P_a x~`` with
``P_a = I (kron) z~_a``. That collapses Li et al.'s ``B_a`` to ``(A_a - m I) P_a^T`` (``m = arm_l2``) and gives:

- width^2 = ``x~^T A_a^-1 x~ + m^2 (A_a^-1 x~)^T H_a (A_a^-1 x~)`` with ``H_a = P_a^T A_0^-1 P_a`` (small, per
  operator, kept up to date by a rank-one correction per reward), so ranking costs O(n d^2) like disjoint
  LinUCB, whatever the number of shared features;
- mean = ``x~^T A_a^-1 (b_a + m B z~_a)``;
- per reward, ``A_0`` changes by a rank-one term ``w w^T`` with ``w = m P_a A_a^-1 x~ / sqrt(1 + x~^T A_a^-1 x~)``
  (the Schur complement update), so ``A_0^-1`` is maintained by Sherman-Morrison too, and
  ``b_0 += m P_a (theta_a' - theta_a)`` with ``theta_a = A_a^-1 b_a``.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from ..errors import InvalidInput
from ._ridge import LinearPolicy, PerArmRidge, _grow
from .base import argmax_distribution, is_number, padded, require, sherman_morrison, with_intercept


class HybridLinUCB(LinearPolicy):
    """Hybrid LinUCB: shared descriptor x context model plus per-operator models; ``alpha`` scales the width."""

    name: ClassVar[str] = "linucb-hybrid"
    _param_names = ("alpha", "l2", "arm_l2", "prior", "floor", "seed")

    def __init__(self, alpha: float = 1.0, l2: float = 1.0, arm_l2: float = 10.0, prior=None, floor: float = 0.01,
                 seed: int = 0):
        super().__init__(l2=l2, prior=prior, floor=floor, seed=seed)
        require(is_number(alpha) and alpha >= 0, f"alpha must be a non-negative number, got {alpha!r}")
        require(is_number(arm_l2) and arm_l2 > 0, f"arm_l2 must be a positive number, got {arm_l2!r}")
        self.alpha = float(alpha)
        self.arm_l2 = float(arm_l2)
        self._ridge: PerArmRidge | None = None  # per-operator A_a^-1, b_a, theta_a = A_a^-1 b_a
        self._zt = np.empty((0, 0))             # z~ of each operator row
        self._H = np.empty((0, 0, 0))           # H_a = P_a^T A_0^-1 P_a per operator row
        self._A0inv = np.empty((0, 0))
        self._b0 = np.empty(0)
        self._beta: np.ndarray | None = None    # A_0^-1 b_0, recomputed after updates

    # ---- shared part ----

    def _init_shared(self, p: int, kt: int) -> None:
        self._ridge = PerArmRidge(p, self.arm_l2)
        self._zt = np.empty((0, kt))
        self._H = np.empty((0, p, p))
        self._A0inv = np.eye(p * kt) / self.l2
        self._b0 = np.zeros(p * kt)
        self._beta = None

    def _project(self, zt: np.ndarray) -> np.ndarray:
        """``P^T A_0^-1 P`` for descriptor ``z~`` (contracting the shared index pairs, O(p^2 k^2))."""
        p, kt = self._ridge.p, zt.shape[0]
        T = self._A0inv.reshape(p, kt, p, kt) @ zt
        return np.einsum("ijl,j->il", T, zt)

    def _shared_beta(self) -> np.ndarray:
        if self._beta is None:
            self._beta = self._A0inv @ self._b0
        return self._beta

    def _arm_row(self, arm: str, zt: np.ndarray) -> int | None:
        """The row of a known operator (checking its descriptor did not change), or None for a new one."""
        i = self._ridge.index.get(arm)
        if i is not None and np.abs(self._zt[i] - zt).max() > 1e-12 * (1.0 + np.abs(zt).max()):
            raise InvalidInput(f"operator {arm!r} came with a different descriptor than before; descriptors "
                               "must stay fixed per operator")
        return i

    # ---- learning ----

    def _learn(self, x, arm, z, reward, propensity) -> None:
        xt = np.concatenate(([1.0], x))
        zt = np.concatenate(([1.0], z))
        if self._ridge is None:
            self._init_shared(xt.shape[0], zt.shape[0])
        r = self._residual(x, z, reward)
        i = self._arm_row(arm, zt)
        if i is None:
            i = self._ridge.row(arm)
            if i == self._zt.shape[0]:
                cap = self._ridge._Ainv.shape[0]
                self._zt, self._H = _grow(self._zt, cap), _grow(self._H, cap)
            self._zt[i] = zt
            self._H[i] = self._project(zt)
        mu = self.arm_l2
        Ax = self._ridge._Ainv[i] @ xt
        w = np.outer(Ax, zt * (mu / np.sqrt(1.0 + xt @ Ax))).ravel()
        theta_old = self._ridge._theta[i].copy()
        self._ridge.update(i, xt, r)
        self._b0 += mu * np.outer(self._ridge._theta[i] - theta_old, zt).ravel()
        u, c = sherman_morrison(self._A0inv, w)
        K = len(self._ridge)
        V = u.reshape(xt.shape[0], zt.shape[0]) @ self._zt[:K].T  # P_a^T u for every operator, (p, K)
        self._H[:K] -= np.einsum("ia,la->ail", V, V) / c
        self._beta = None

    # ---- ranking ----

    def _arm_terms(self, arm: str, zt: np.ndarray, p: int) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
        """``(w, A_a^-1 or None for a new operator, H)`` where the mean is ``x~ @ w``."""
        B = self._shared_beta().reshape(p, zt.shape[0])
        m = B @ zt
        i = self._arm_row(arm, zt)
        if i is None:
            return m, None, self._project(zt)
        Ainv = self._ridge._Ainv[i]
        return self._ridge._theta[i] + self.arm_l2 * (Ainv @ m), Ainv, self._H[i]

    def _score(self, cands):
        Xt = with_intercept(cands.X)
        n, p = Xt.shape
        Zt = with_intercept(cands.Z)
        mu = self.arm_l2
        if self._ridge is None:  # nothing learned: beta = 0, A_0 = l2 I, A_a = arm_l2 I
            sq = np.einsum("ij,ij->i", Xt, Xt)
            mean = np.zeros(n)
            var = sq / mu + sq * np.einsum("ij,ij->i", Zt, Zt) / self.l2
        else:
            B = self._shared_beta().reshape(p, Zt.shape[1])
            Xp, Zp = padded(Xt), padded(Zt)
            mean = np.empty(n + 1)
            var = np.empty(n + 1)
            for arms, grid in cands.batches:
                zt = Zt[grid[:, 0]]                                    # (K, kt): each operator's descriptor
                if ((Zp[grid] != zt[:, None, :]).any(-1) & (grid < n)).any():
                    raise InvalidInput("candidates of one operator carry different descriptors")
                Ainv, theta = self._ridge.stack(arms)          # new operators: I / arm_l2 and 0
                H = np.empty((len(arms), p, p))
                for r, arm in enumerate(arms):
                    i = self._arm_row(arm, zt[r])
                    H[r] = self._project(zt[r]) if i is None else self._H[i]
                m = zt @ B.T                                           # shared part's weights per operator
                w = theta + mu * (Ainv @ m[:, :, None])[..., 0]        # = m for a new operator
                Xb = Xp[grid]
                U = Xb @ Ainv
                mean[grid] = (Xb @ w[:, :, None])[..., 0]
                var[grid] = np.einsum("kwp,kwp->kw", U, Xb) + mu * mu * np.einsum("kwp,kwp->kw", U @ H, U)
            mean, var = mean[:n], var[:n]
        width = np.sqrt(np.maximum(var, 0.0))
        prior = self._prior_mean(cands)
        if prior is not None:
            mean = mean + prior
        scores = mean + self.alpha * width
        return scores, mean, width, argmax_distribution(scores)

    def explain(self, x, arm, z) -> dict:
        x = np.asarray(x, dtype=np.float64).reshape(-1)
        zt = np.concatenate(([1.0], np.asarray(z, dtype=np.float64).reshape(-1)))
        if self._ridge is None:
            w = np.zeros(x.shape[0] + 1)
        else:
            w = self._arm_terms(str(arm), zt, x.shape[0] + 1)[0]
        return self._explain_linear(x, arm, z, w)

    # ---- state ----

    def _state(self):
        arrays: dict[str, np.ndarray] = {}
        meta: dict = {"arms": []}
        if self._ridge is not None:
            K = len(self._ridge)
            arrays.update(self._ridge.arrays())
            arrays.update({"zt": self._zt[:K].copy(), "H": self._H[:K].copy(), "A0inv": self._A0inv.copy(),
                           "b0": self._b0.copy()})
            meta["arms"] = list(self._ridge.index)
        self._prior_state(arrays, meta)
        return arrays, meta

    def _load_state(self, arrays, meta) -> None:
        self._load_prior(arrays, meta)
        if "A0inv" not in arrays:
            self._ridge = None
            return
        zt = np.array(arrays["zt"], dtype=np.float64, order="C")
        H = np.array(arrays["H"], dtype=np.float64, order="C")
        self._init_shared(H.shape[-1], zt.shape[-1])
        self._ridge.load(list(meta["arms"]), arrays)
        self._zt, self._H = zt, H
        self._A0inv = np.array(arrays["A0inv"], dtype=np.float64, order="C")
        self._b0 = np.array(arrays["b0"], dtype=np.float64, order="C")


POLICY = HybridLinUCB
