"""GP-UCB over (context, operator descriptor): a Gaussian-process model of the reward, or of the residual of a
fitted prior (the SimMerge predictor), with an upper-confidence-bound choice.

Why a kernel model: a linear model of the residual learns an operator's offset over every pair at once, so one
evaluation moves the prediction of all pairs alike. On the zoos the predictor's errors are mostly specific to a
pair: what one evaluation says is about that pair and the pairs and operators *like it*. A Gaussian process with
the kernel

    k((x, z), (x', z')) = k_z(z, z') * ((1 - share) * k_x(x, x') + share),
    k_x = exp(-|x - x'|^2 / (2 d lx^2)),   k_z = exp(-|z - z'|^2 / (2 k lz^2))

says exactly that: an evaluation informs the same pair fully (``k_x = 1``) and similar pairs in proportion to how
close their contexts are (``lx``, in units of the context's root mean square spread over its d coordinates), and
the same operator fully and similar operators (a slerp at t = 0.5 after one at t = 0.3) in proportion to their
descriptors (``lz``); ``share`` of the prior variance is an offset per operator shared by every pair. ``l2`` is
the noise-to-signal ratio (kernel ridge regression with penalty ``l2`` gives the posterior mean) and ``scale``
the prior standard deviation of what the model learns, in reward units, so that the width is a standard deviation
of the reward: score = ``prior + mean + alpha * width``.

With ``prior=`` (a fitted predictor) the model learns ``reward - prior(x, z)``; contexts and descriptors are then
measured in the prior's standardized units (its training means and standard deviations), else as they are (the
engine's contexts are signed-log scaled, descriptors lie in [0, 1]).

Each reward extends the inverse Cholesky factor of ``K + l2 I`` by one row (O(n^2), no factorization); ranking
costs one kernel row and one matrix-vector product per candidate (O(n^2)): meant for the tens to a few thousand
evaluations a catalog gets, not for millions.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from ._ridge import LinearPolicy
from .base import argmax_distribution, is_number, require


class GPUCB(LinearPolicy):
    """GP-UCB with a product kernel over contexts and operator descriptors (see the module docstring)."""

    name: ClassVar[str] = "gp-ucb"
    deterministic_scores: ClassVar[bool] = True
    _param_names = ("alpha", "l2", "lx", "lz", "share", "scale", "prior", "floor", "seed")

    def __init__(self, alpha: float = 1.0, l2: float = 0.1, lx: float = 0.5, lz: float = 0.5, share: float = 0.2,
                 scale: float = 0.1, prior=None, floor: float = 0.01, seed: int = 0):
        super().__init__(l2=l2, prior=prior, floor=floor, seed=seed)
        for key, v in (("alpha", alpha), ("share", share)):
            require(is_number(v) and v >= 0, f"{key} must be a non-negative number, got {v!r}")
        require(share <= 1, f"share must be at most 1, got {share!r}")
        for key, v in (("lx", lx), ("lz", lz), ("scale", scale)):
            require(is_number(v) and v > 0, f"{key} must be a positive number, got {v!r}")
        self.alpha, self.lx, self.lz = float(alpha), float(lx), float(lz)
        self.share, self.scale = float(share), float(scale)
        self._reset()

    def _reset(self) -> None:
        self._X = np.empty((0, 0))
        self._Z = np.empty((0, 0))
        self._r = np.empty(0)
        self._Linv = np.empty((0, 0))    # inverse of the lower Cholesky factor L of K + l2 I (lower triangular)
        self._coef = np.empty(0)          # (K + l2 I)^-1 r, in reward units

    # ---- the kernel ----

    def _units(self, X: np.ndarray, Z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Contexts and descriptors in the kernel's units: the prior's standardization, over sqrt(width) * l."""
        p = self.prior
        mu_x = getattr(p, "_mu_x", None)
        if mu_x is not None and getattr(p, "_mu_z", None) is not None:
            X = (X - mu_x) / p._sd_x
            Z = (Z - p._mu_z) / p._sd_z
        return (X / (np.sqrt(max(X.shape[1], 1)) * self.lx), Z / (np.sqrt(max(Z.shape[1], 1)) * self.lz))

    def _kernel(self, Xa, Za, Xb, Zb) -> np.ndarray:
        """``k`` between rows a and rows b (already in kernel units)."""
        kx = np.exp(-0.5 * _sqdist(Xa, Xb))
        kz = np.exp(-0.5 * _sqdist(Za, Zb))
        return kz * ((1.0 - self.share) * kx + self.share)

    # ---- policy ----

    def _score(self, cands):
        n = len(cands)
        prior = self._prior_mean(cands)
        mean = np.zeros(n) if prior is None else np.asarray(prior, dtype=float)
        var = np.ones(n)
        if self._r.size:
            Xc, Zc = self._units(np.asarray(cands.X, float), np.asarray(cands.Z, float))
            Kc = self._kernel(Xc, Zc, self._X, self._Z)                        # (n, m)
            mean = mean + Kc @ self._coef
            V = self._Linv @ Kc.T                                              # L^-1 k_*
            var = np.maximum(1.0 - np.einsum("ij,ij->j", V, V), 0.0)
        width = self.scale * np.sqrt(var)
        scores = mean + self.alpha * width
        return scores, mean, width, argmax_distribution(scores)

    def _learn(self, x, arm, z, reward, propensity) -> None:
        r = self._residual(x, z, reward)
        xu, zu = self._units(x[None, :], z[None, :])
        m = self._r.size
        # L gains the row [l, diag] with l = L^-1 k and diag^2 = k(x, x) + l2 - l.l; its inverse gains the row
        # [-(l L^-1) / diag, 1 / diag]: block forward substitution, one O(m^2) product.
        k = self._kernel(self._X, self._Z, xu, zu)[:, 0] if m else np.empty(0)
        l_row = self._Linv @ k
        diag = np.sqrt(max(1.0 + self.l2 - l_row @ l_row, 1e-12))
        Linv = np.zeros((m + 1, m + 1))
        Linv[:m, :m] = self._Linv
        Linv[m, :m] = -(l_row @ self._Linv) / diag
        Linv[m, m] = 1.0 / diag
        self._Linv = Linv
        self._X = np.vstack([self._X, xu]) if m else xu
        self._Z = np.vstack([self._Z, zu]) if m else zu
        self._r = np.append(self._r, r)
        self._coef = Linv.T @ (Linv @ self._r)

    def explain(self, x, arm, z) -> dict:
        """The prior's explanation plus the kernel part as the baseline shift (a kernel model has no per-feature
        split)."""
        x = np.asarray(x, dtype=np.float64).reshape(-1)
        z = np.asarray(z, dtype=np.float64).reshape(-1)
        kernel_part = 0.0
        if self._r.size:
            xu, zu = self._units(x[None, :], z[None, :])
            kernel_part = float(self._kernel(xu, zu, self._X, self._Z)[0] @ self._coef)
        if self.prior is not None:
            pe = self.prior.explain(x, arm, z)
            return {"predicted": pe["predicted"] + kernel_part, "baseline": pe["baseline"] + kernel_part,
                    "contributions": pe["contributions"], "method": "kernel"}
        return {"predicted": kernel_part, "baseline": kernel_part, "contributions": np.zeros(x.shape[0]),
                "method": "kernel"}

    def _state(self):
        arrays = {"X": self._X.copy(), "Z": self._Z.copy(), "r": self._r.copy(), "Linv": self._Linv.copy(),
                  "coef": self._coef.copy()}
        meta: dict = {}
        self._prior_state(arrays, meta)
        return arrays, meta

    def _load_state(self, arrays, meta) -> None:
        self._load_prior(arrays, meta)
        self._reset()
        if np.asarray(arrays.get("r", np.empty(0))).size:
            self._X = np.array(arrays["X"], dtype=np.float64, order="C")
            self._Z = np.array(arrays["Z"], dtype=np.float64, order="C")
            self._r = np.array(arrays["r"], dtype=np.float64).reshape(-1)
            self._Linv = np.array(arrays["Linv"], dtype=np.float64, order="C")
            self._coef = np.array(arrays["coef"], dtype=np.float64).reshape(-1)


def _sqdist(A: np.ndarray, B: np.ndarray) -> np.ndarray:
    """Squared Euclidean distances between the rows of A and of B."""
    d = (A * A).sum(1)[:, None] + (B * B).sum(1)[None, :] - 2.0 * A @ B.T
    return np.maximum(d, 0.0)


POLICY = GPUCB
