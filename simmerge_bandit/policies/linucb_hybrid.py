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

- width^2 = ``x~^T A_a^-1 x~ + m^2 (A_a^-1 x~)^T H_a (A_a^-1 x~) = x~^T M_a x~`` with ``H_a = P_a^T A_0^-1 P_a``
  (small, per operator, kept up to date by a rank-one correction per reward) and
  ``M_a = A_a^-1 + m^2 A_a^-1 H_a A_a^-1`` formed once per operator per ranking, so ranking costs one p x p
  quadratic form per candidate, like disjoint LinUCB, whatever the number of shared features;
- mean = ``x~^T A_a^-1 (b_a + m B z~_a)``;
- per reward, ``A_0`` changes by a rank-one term ``w w^T`` with ``w = m P_a A_a^-1 x~ / sqrt(1 + x~^T A_a^-1 x~)``
  (the Schur complement update), so ``A_0^-1`` is maintained by Sherman-Morrison too, and
  ``b_0 += m P_a (theta_a' - theta_a)`` with ``theta_a = A_a^-1 b_a``. ``beta = A_0^-1 b_0`` follows by the
  same algebra, so an update reads the q x q matrix ``A_0^-1`` twice (``A_0^-1 P_a``, then the rank-one write)
  and a ranking not at all.

Every shared row lies in ``R^p (kron) S``, ``S`` the span of the known operators' ``z~`` (dimension r, at most the
number of operators), and ``A_0`` starts as ``l2 I``: so ``A_0^-1`` is ``I / l2`` outside that subspace and the
algorithm runs in its coordinates. With an orthonormal basis ``Q`` of ``S`` (kt x r), each operator's descriptor
is ``c = Q^T z~`` and ``A_0^-1``, ``b_0``, ``beta`` are stored as p r x p r and p r: exactly the same model
(an orthonormal change of coordinates), and 4-5x less work per reward with 12 operators and kt = 26 (q = 1,118
becomes 516). An operator whose ``z~`` leaves ``S`` extends ``Q`` by one direction (``A_0^-1`` gains an
``I / l2`` block); ranking an operator not learned yet adds its part outside ``S``, ``|z~_perp|^2 / l2 I``,
to ``H``.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
from scipy.linalg.blas import ddot, dgemm, dger

from ..errors import InvalidInput
from ._ridge import LinearPolicy, PerArmRidge, _grow
from .base import argmax_distribution, is_number, padded, quad_forms, require, with_intercept


class HybridLinUCB(LinearPolicy):
    """Hybrid LinUCB: shared descriptor x context model plus per-operator models; ``alpha`` scales the width."""

    name: ClassVar[str] = "linucb-hybrid"
    deterministic_scores: ClassVar[bool] = True
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
        self._ct = np.empty((0, 0))             # c = Q^T z~ of each operator row
        self._Q = np.empty((0, 0))              # orthonormal basis of the span of the operators' z~ (kt x r)
        self._H = np.empty((0, 0, 0))           # H_a = P_a^T A_0^-1 P_a per operator row
        self._A0inv = np.empty((0, 0))          # in the coordinates (p, r), like b_0 and beta
        self._b0 = np.empty(0)
        self._beta = np.empty(0)                # A_0^-1 b_0, updated with them

    # ---- shared part ----

    def _init_shared(self, p: int, kt: int) -> None:
        self._ridge = PerArmRidge(p, self.arm_l2)
        self._zt = np.empty((0, kt))
        self._ct = np.empty((0, 0))
        self._Q = np.empty((kt, 0))
        self._H = np.empty((0, p, p))
        self._A0inv = np.empty((0, 0))
        self._b0 = np.zeros(0)
        self._beta = np.zeros(0)

    def _project(self, zt: np.ndarray) -> np.ndarray:
        """``P^T A_0^-1 P`` for descriptor ``z~`` (contracting the shared index pairs, O(p^2 r^2)), with the part of
        ``z~`` outside the known span, where ``A_0^-1 = I / l2``."""
        p, r = self._ridge.p, self._Q.shape[1]
        c = self._Q.T @ zt
        H = (c @ self._A0inv.reshape(p, r, -1)).reshape(p, p, r) @ c
        outside = float(zt @ zt - c @ c)
        if outside > 1e-12 * float(zt @ zt):
            H += np.eye(p) * (outside / self.l2)
        return H

    def _extend_basis(self, zt: np.ndarray) -> None:
        """Add the direction of ``z~`` outside the known span to the basis, if it has one: ``A_0^-1`` gains the
        block ``I / l2`` (no reward has touched that direction) and the coordinates of the rest gain a zero."""
        Q = self._Q
        resid = zt - Q @ (Q.T @ zt)
        resid -= Q @ (Q.T @ resid)  # a second Gram-Schmidt pass keeps the basis orthonormal to rounding
        norm = float(np.linalg.norm(resid))
        if norm <= 1e-9 * max(1.0, float(np.linalg.norm(zt))):
            return
        p, r = self._ridge.p, Q.shape[1]
        self._Q = np.column_stack([Q, resid / norm])
        A = np.zeros((p, r + 1, p, r + 1))
        A[:, :r, :, :r] = self._A0inv.reshape(p, r, p, r)
        A[:, r, :, r] = np.eye(p) / self.l2
        self._A0inv = A.reshape(p * (r + 1), p * (r + 1))

        def pad(v: np.ndarray) -> np.ndarray:
            return np.concatenate([v.reshape(p, r), np.zeros((p, 1))], axis=1).reshape(-1)

        self._b0, self._beta = pad(self._b0), pad(self._beta)
        self._ct = np.concatenate([self._ct, np.zeros((self._ct.shape[0], 1))], axis=1)

    def _arm_row(self, arm: str, zt: np.ndarray) -> int | None:
        """The row of a known operator (checking its descriptor did not change), or None for a new one."""
        i = self._ridge.index.get(arm)
        if i is not None and (self._zt[i] != zt).any():
            self._check_descriptors(self._zt[i][None], zt[None], [arm])
        return i

    @staticmethod
    def _check_descriptors(known: np.ndarray, given: np.ndarray, arms: list[str]) -> None:
        bad = np.abs(known - given).max(axis=1) > 1e-12 * (1.0 + np.abs(given).max(axis=1))
        if bad.any():
            raise InvalidInput(f"operator {arms[int(np.argmax(bad))]!r} came with a different descriptor than "
                               "before; descriptors must stay fixed per operator")

    # ---- learning ----

    def _arm_step(self, x, arm, z, reward) -> tuple[int, np.ndarray, np.ndarray]:
        """The operator's own ridge step for one reward (its row added the first time); returns its row and the
        shared part's terms: ``s`` with ``w = P_a s`` (A_0's rank-one term) and ``db`` (b_0 grows by ``P_a db``),
        ``P_a`` taken in the basis' coordinates (``c`` for ``z~``)."""
        zt = np.concatenate(([1.0], z))
        if self._ridge is None:
            self._init_shared(x.shape[0] + 1, zt.shape[0])
        ridge = self._ridge
        r = reward if self.prior is None else self._residual(x, z, reward)
        i = self._arm_row(arm, zt)
        if i is None:
            i = ridge.row(arm)
            if i == self._zt.shape[0]:
                cap = ridge.inverses.shape[0]
                self._zt, self._H, self._ct = _grow(self._zt, cap), _grow(self._H, cap), _grow(self._ct, cap)
            self._extend_basis(zt)
            self._zt[i] = zt
            self._ct[i] = self._Q.T @ zt
            self._H[i] = self._project(zt)
        mu = self.arm_l2
        theta_old = ridge.thetas[i].copy()
        Ax, ca = ridge.update(i, ridge.lift(x), r)
        return i, Ax * (mu / np.sqrt(ca)), mu * (ridge.thetas[i] - theta_old)

    def _learn(self, x, arm, z, reward, propensity) -> None:
        i, s, db = self._arm_step(x, arm, z, reward)
        ridge = self._ridge
        zt = self._ct[i]                                      # the descriptor in the basis' coordinates
        p, kt = ridge.p, zt.shape[0]
        # P_a^T A_0^-1 (p, q), read from A_0^-1 once: it gives u = A_0^-1 w and A_0^-1 P_a db without another pass.
        Yt = np.matmul(zt, self._A0inv.reshape(p, kt, -1), out=ridge.scratch.get("A0P", (p, self._b0.shape[0])))
        u = s @ Yt
        c = 1.0 + ddot(s, u.reshape(p, kt) @ zt)             # 1 + w^T A_0^-1 w
        B0 = self._b0.reshape(p, kt)  # a view: b_0 += P_a db in place
        B0 += db[:, None] * zt
        self._beta += db @ Yt
        self._beta -= u * (ddot(u, self._b0) / c)             # (A_0^-1 - u u^T / c) (b_0 + P_a db)
        dger(-1.0 / c, u, u, 1, 1, self._A0inv.T, 0, 0, 1)    # Sherman-Morrison in place (symmetric, C order)
        K = len(ridge)
        Vt = self._ct[:K] @ u.reshape(p, kt).T                # P_b^T u for every operator b, (K, p)
        self._H[:K] -= Vt[:, :, None] * (Vt[:, None, :] / c)

    #: Rewards folded into ``A_0^-1`` per pass (the pass's scratch is q x CHUNK).
    CHUNK = 32

    def _learn_many(self, rows: list[tuple]) -> None:
        """Several rewards with one Woodbury update of the shared part instead of one rank-one step each.

        Each reward's per-operator step depends only on that operator's model, so those run in order as in
        :meth:`_learn`; they give ``A_0``'s rank-one terms ``w_j`` and ``b_0``'s increments, which add up. Then
        ``(A_0 + W W^T)^-1 = A_0^-1 - U C^-1 U^T`` with ``U = A_0^-1 W`` and ``C = I + W^T U``: two passes over the
        q x q matrix for the whole chunk (a product, a rank-k write) instead of two per reward, and ``H_b``,
        ``beta`` follow from ``U`` exactly as from ``u`` in the rank-one case. A new operator's ``H`` is projected
        from ``A_0^-1`` before the chunk's correction, which then brings it up to date with the others.
        """
        for start in range(0, len(rows), self.CHUNK):
            chunk = rows[start:start + self.CHUNK]
            if len(chunk) == 1:
                self._learn(*chunk[0])
            else:
                self._learn_chunk(chunk)

    def _learn_chunk(self, rows: list[tuple]) -> None:
        steps = [self._arm_step(x, arm, z, r) for x, arm, z, r, _ in rows]
        S, Db = np.stack([st[1] for st in steps]), np.stack([st[2] for st in steps])
        Zt = self._ct[[st[0] for st in steps]]  # after every step: in the basis as the chunk left it
        ridge = self._ridge
        p, kt = ridge.p, Zt.shape[1]
        k = len(rows)
        q = p * kt
        M = np.empty((k + 1, q))
        np.multiply(S[:, :, None], Zt[:, None, :], out=M[:k].reshape(k, p, kt))        # rows w_j = P_a s_j
        M[k] = np.einsum("jp,jt->pt", Db, Zt).reshape(q)                             # sum of P_a db_j
        UT = M @ self._A0inv                     # A_0^-1 is symmetric: rows U^T and (A_0^-1 delta b_0)^T
        U, a0db = UT[:k].T, UT[k]
        C = np.eye(k) + M[:k] @ U
        Cinv = np.linalg.inv(C)
        self._b0 += M[k]
        L = U @ Cinv
        self._beta += a0db - L @ (U.T @ self._b0)
        dgemm(-1.0, L, U, 1.0, self._A0inv.T, 0, 1, 1)  # alpha, a, b, beta, c, trans_a, trans_b, overwrite_c
        K = len(ridge)
        V = np.einsum("bt,ptk->bpk", self._ct[:K], U.reshape(p, kt, k))                # P_b^T U per operator
        self._H[:K] -= (V @ Cinv) @ V.transpose(0, 2, 1)

    # ---- ranking ----

    def _arm_terms(self, arms: list[str], Zt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per operator (rows of ``Zt`` = their z~): mean weights ``w_a`` (K, p) and width matrices ``M_a``.

        The mean of ``x~`` under operator a is ``x~ @ w_a`` and its width^2 is ``x~^T M_a x~``. New operators get
        ``A_a^-1 = I / arm_l2``, ``theta_a = 0`` and ``H`` projected from ``A_0^-1`` on the spot.
        """
        ridge, mu = self._ridge, self.arm_l2
        p = ridge.p
        rows = [ridge.index.get(a) for a in arms]
        known = [r for r, i in enumerate(rows) if i is not None]
        idx = [rows[r] for r in known]
        if known and (self._zt[idx] != Zt[known]).any():
            self._check_descriptors(self._zt[idx], Zt[known], [arms[r] for r in known])
        Ainv, theta = ridge.stack(arms)
        if len(known) == len(arms) and idx == list(range(len(arms))):
            H = self._H[: len(arms)]
        else:
            H = np.empty((len(arms), p, p))
            for r, i in enumerate(rows):
                H[r] = self._project(Zt[r]) if i is None else self._H[i]
        m = (Zt @ self._Q) @ self._beta.reshape(p, -1).T       # the shared part's weights per operator, (K, p)
        w = theta + mu * (Ainv @ m[:, :, None])[..., 0]         # = m for a new operator
        return w, Ainv + (mu * mu) * (Ainv @ H @ Ainv)

    def _score(self, cands):
        mu = self.arm_l2
        g = cands.grid
        if self._ridge is None:  # nothing learned: beta = 0, A_0 = l2 I, A_a = arm_l2 I
            Xt, Zt = with_intercept(cands.X), with_intercept(cands.Z)
            sq = np.einsum("ij,ij->i", Xt, Xt)
            mean = np.zeros(Xt.shape[0])
            var = sq / mu + sq * np.einsum("ij,ij->i", Zt, Zt) / self.l2
        elif g is not None and cands.grid_Z is not None:  # per pair and operator
            Xt = with_intercept(g.X)
            w, M = self._arm_terms(g.arms, with_intercept(cands.grid_Z))
            mean = (Xt @ w.T).ravel()
            var = quad_forms(Xt, M, self._ridge.scratch).ravel()
        else:
            mean, var = self._score_batches(cands)
        width = np.sqrt(np.maximum(var, 0.0))
        prior = self._prior_mean(cands)
        if prior is not None:
            mean = mean + prior
        scores = mean + self.alpha * width
        return scores, mean, width, argmax_distribution(scores)

    def _score_batches(self, cands) -> tuple[np.ndarray, np.ndarray]:
        """Mean and width^2 of candidates in any layout, through the per-operator batches."""
        Xt, Zt = with_intercept(cands.X), with_intercept(cands.Z)
        n = Xt.shape[0]
        Xp, Zp = padded(Xt), padded(Zt)
        mean = np.empty(n + 1)
        var = np.empty(n + 1)
        for arms, grid in cands.batches:
            zt = Zt[grid[:, 0]]                                    # (K, kt): each operator's descriptor
            if ((Zp[grid] != zt[:, None, :]).any(-1) & (grid < n)).any():
                raise InvalidInput("candidates of one operator carry different descriptors")
            w, M = self._arm_terms(arms, zt)
            Xb = Xp[grid]
            mean[grid] = (Xb @ w[:, :, None])[..., 0]
            var[grid] = np.einsum("kwp,kwp->kw", Xb @ M, Xb)
        return mean[:n], var[:n]

    def explain(self, x, arm, z) -> dict:
        x = np.asarray(x, dtype=np.float64).reshape(-1)
        zt = np.concatenate(([1.0], np.asarray(z, dtype=np.float64).reshape(-1)))
        if self._ridge is None:
            w = np.zeros(x.shape[0] + 1)
        else:
            w = self._arm_terms([str(arm)], zt[None])[0][0]
        return self._explain_linear(x, arm, z, w)

    # ---- state ----

    def _state(self):
        arrays: dict[str, np.ndarray] = {}
        meta: dict = {"arms": []}
        if self._ridge is not None:
            K = len(self._ridge)
            arrays.update(self._ridge.arrays())
            arrays.update({"zt": self._zt[:K].copy(), "H": self._H[:K].copy(), "A0inv": self._A0inv.copy(),
                           "b0": self._b0.copy(), "beta": self._beta.copy(), "Q": self._Q.copy()})
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
        p, kt = H.shape[-1], zt.shape[-1]
        self._init_shared(p, kt)
        self._ridge.load(list(meta["arms"]), arrays)
        self._zt, self._H = zt, H
        A0inv = np.array(arrays["A0inv"], dtype=np.float64, order="C")
        b0 = np.array(arrays["b0"], dtype=np.float64, order="C")
        # Snapshots from before beta was saved: solve it once here.
        beta = np.array(arrays["beta"] if "beta" in arrays else A0inv @ b0, dtype=np.float64, order="C")
        if "Q" in arrays:
            Q = np.array(arrays["Q"], dtype=np.float64, order="C")
        else:  # a snapshot in the full p kt coordinates: the same basis the updates would have built, and exact
            self._A0inv = np.empty((0, 0))
            for row in zt:
                self._extend_basis(row)
            Q = self._Q
            A0inv = np.einsum("atbu,tr,us->arbs", A0inv.reshape(p, kt, p, kt), Q, Q).reshape(p * Q.shape[1], -1)
            b0, beta = ((v.reshape(p, kt) @ Q).reshape(-1) for v in (b0, beta))
        self._Q, self._A0inv = Q, np.ascontiguousarray(A0inv)
        self._b0, self._beta = np.ascontiguousarray(b0), np.ascontiguousarray(beta)
        self._ct = zt @ Q


POLICY = HybridLinUCB
