"""The SimMerge predictor: a supervised regressor from (pair features, operator descriptor) to normalized score.

Fitted on merges that were actually evaluated (:meth:`SimMergePredictor.fit`), it ranks candidates with zero
evaluations of the task at hand, including operators it never saw, because it reads operators through their
descriptors. Features are standardized with the training table's mean and std. Two models (``model=``):

- ``mlp`` (default): a small ensemble of two-layer ReLU networks on ``[x_std, z_std]`` (see ``_mlp.py``), with a
  Bayesian ridge head on their last hidden layers, ``phi = [1, h_1(x, z), ..., h_M(x, z)]`` (a neural-linear
  model). The networks are trained by :meth:`~SimMergePredictor.fit` and then frozen; the head gives the
  posterior width and learns online. Pair-centred: what a decision needs is which operator is best *for a given
  pair*, so the networks and the head model ``y - (the pair's mean over its evaluated operators)``, and a
  separate ridge model of ``x~`` predicts that mean (the pair's level). Without centring the networks spend
  their capacity on the level, which the ranking within a pair ignores. (A pair is a distinct context row;
  a row whose pair has no other evaluated operator is centred on the overall mean instead.)
- ``linear``: Bayesian ridge regression on ``phi = x~ (outer) z~`` with ``x~ = [1, x_std]`` and
  ``z~ = [1, z_std]``: a constant, each context feature, each descriptor entry and every context x descriptor
  interaction. An ``mlp`` predictor that was never fitted (no network yet) is this model, so it can learn from
  rewards alone. Each block of context coordinates (the constant, signals, metadata, task buckets) may have its
  own penalty (``l2_main``, ``l2_signals``, ``l2_meta``, ``l2_buckets``; default ``l2``).
- ``anchored``: what the metadata rules (:mod:`~simmerge_bandit.rules`) know, fitted first and unshrunk (each
  operator's mean score, and a slerp's lean towards the first source times which side is stronger by known score
  or tagged with more of the target), then the ``linear`` model of what is left. With a few dozen training pairs
  whose best-operator differences are mostly evaluation noise, the network and the linear model fit the noise;
  the anchor starts where the best fixed operator and the rules are, and the penalties (chosen by
  cross-validation on training tasks, as the decision benchmark does) say how far the signals may move it.

Why one module of this size: the three models share one ridge head over ``phi`` (its fit, its Sherman-Morrison
updates, its per-operator Gram cache, its snapshot and its remap to a new arm schema); splitting them would
duplicate that head or spread one state over several files.

As a policy it is greedy on the prediction (with the exploration ``floor``) and keeps learning from rewards by
Sherman-Morrison updates of ``A^-1`` and ``beta`` over ``phi``.

On the bench zoo (new tasks, zero evaluations) the network closes 65% of the best-fixed -> oracle gap, the linear
model 45% (and only 75% even fitted in-sample); see the README's decision-quality section.

Warm start: pass a fitted predictor as ``prior=`` to ``linucb``, ``linucb-hybrid``, ``lints`` or ``egreedy``;
those learn the residual ``reward - prediction`` (see ``_ridge.py``), so they start where the predictor is and
their exploration covers only what it gets wrong. The prior itself stays frozen.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import ClassVar, Sequence

import numpy as np
import scipy.linalg
from scipy.linalg.blas import ddot

from ..errors import InvalidInput
from . import _mlp
from .base import (Candidates, Policy, Scratch, argmax_distribution, is_number, padded, quad_forms, require,
                   sherman_morrison, with_intercept)


#: Descriptors whose G are kept; beyond this many (one-off descriptors) the kept ones are dropped and recomputed.
_MAX_GRAMS = 64


class SimMergePredictor(Policy):
    """Neural-linear (``model="mlp"``) or linear ridge regression of the normalized score; ``l2`` is the ridge
    penalty of the head, ``hidden``, ``epochs`` and ``members`` size the networks.

    >>> pred = SimMergePredictor().fit(X, Z, arms, y)       # doctest: +SKIP
    >>> pred.predict(X_new, Z_new)                          # doctest: +SKIP
    """

    name: ClassVar[str] = "predictor"
    _param_names = ("l2", "floor", "seed", "online_weight", "model", "hidden", "epochs", "members", "init_seed",
                    "l2_main", "l2_signals", "l2_meta", "l2_buckets")
    #: the linear model's blocks of context coordinates, each with its own ridge penalty (see :meth:`penalties`)
    BLOCKS: ClassVar[tuple[str, ...]] = ("main", "signals", "meta", "buckets")
    MODELS: ClassVar[tuple[str, ...]] = ("mlp", "linear", "anchored")

    def __init__(self, l2: float = 1.0, floor: float = 0.01, seed: int = 0, online_weight: float = 1.0,
                 model: str = "mlp", hidden: int = 32, epochs: int = 20, members: int = 3, init_seed: int = 0,
                 l2_main: float | None = None, l2_signals: float | None = None, l2_meta: float | None = None,
                 l2_buckets: float | None = None):
        super().__init__(floor=floor, seed=seed)
        require(is_number(l2) and l2 > 0, f"l2 must be a positive number, got {l2!r}")
        for key, v in (("l2_main", l2_main), ("l2_signals", l2_signals), ("l2_meta", l2_meta),
                       ("l2_buckets", l2_buckets)):
            require(v is None or (is_number(v) and v > 0), f"{key} must be a positive number, got {v!r}")
        require(is_number(online_weight) and online_weight > 0,
                f"online_weight must be a positive number, got {online_weight!r}")
        require(model in self.MODELS, f"model must be one of {', '.join(self.MODELS)}, got {model!r}")
        for key, v in (("hidden", hidden), ("epochs", epochs), ("members", members)):
            require(isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= 1,
                    f"{key} must be a positive integer, got {v!r}")
        require(isinstance(init_seed, (int, np.integer)) and not isinstance(init_seed, bool) and init_seed >= 0,
                f"init_seed must be a non-negative integer, got {init_seed!r}")
        self.l2 = float(l2)
        #: per-block penalties of the linear model (None: ``l2``): a small ``l2_main`` lets the operators' own
        #: effects (x~'s constant times z~) be fitted almost freely while context x operator interactions are
        #: shrunk hard, the regime of a few dozen training pairs, where the best fixed operator is the anchor
        self.l2_main = None if l2_main is None else float(l2_main)
        self.l2_signals = None if l2_signals is None else float(l2_signals)
        self.l2_meta = None if l2_meta is None else float(l2_meta)
        self.l2_buckets = None if l2_buckets is None else float(l2_buckets)
        self.model = str(model)
        self.hidden, self.epochs, self.members = int(hidden), int(epochs), int(members)
        #: Seed of the networks' initialisation and batch order (a fit is a deterministic function of its rows and
        #: this, not of the exploration ``seed``); another value gives an independent replicate of the fit.
        self.init_seed = int(init_seed)
        #: How many fitted rows one reward learned online counts as. The fit holds thousands of rows of other
        #: tasks; weighting a new task's few evaluations up is a crude hierarchical prior (the task's own evidence
        #: matters more to it than the others'). 1 weighs them like fitted rows.
        self.online_weight = float(online_weight)
        self._mu_x = self._sd_x = self._mu_z = self._sd_z = None
        self._Ainv: np.ndarray | None = None
        self._b: np.ndarray | None = None
        self._beta: np.ndarray | None = None
        self._stats: dict = {}
        #: the fitted networks (``model="mlp"`` after a fit); None: the linear features x~ (outer) z~
        self._nets: list[dict] | None = None
        self._level: np.ndarray | None = None  # (d + 1,): ridge of the pair's mean score on x~ (with the networks)
        #: ``anchored``: each fitted operator's mean score (its descriptor, raw, and the mean), and a ridge of those
        #: means on z~ for descriptors the fit never saw; the linear model learns what is left over
        self._off_z: np.ndarray | None = None
        self._off_v: np.ndarray | None = None
        self._off_w: np.ndarray | None = None
        self._gamma: np.ndarray | None = None
        self._off_index: dict[bytes, int] = {}
        self._scratch = Scratch()
        self._reset_grams()

    # ---- features ----

    def _neural_phi(self, X: np.ndarray, Z: np.ndarray) -> np.ndarray:
        """``[1, h(x_std, z_std)]`` per row: the head's features once the networks are fitted."""
        inputs = np.hstack([(X - self._mu_x) / self._sd_x, (Z - self._mu_z) / self._sd_z])
        return with_intercept(_mlp.features(self._nets, inputs))

    def _pair_level(self, X: np.ndarray) -> np.ndarray:
        """The level model's prediction of each context's mean score over operators."""
        return with_intercept((X - self._mu_x) / self._sd_x) @ self._level

    def _fit_level(self, X: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Fit the level model on each pair's mean score and return ``y`` minus it, the within-pair target.

        Pairs are distinct rows of ``X``; a pair seen with one operator only is centred on the overall mean
        (its level is not identified, and centring on its own score would erase what it says about the
        operator)."""
        _, inverse, counts = np.unique(X, axis=0, return_inverse=True, return_counts=True)
        inverse = inverse.reshape(-1)
        means = np.bincount(inverse, weights=y) / counts
        level = np.where(counts[inverse] > 1, means[inverse], y.mean())
        Xt = with_intercept((X - self._mu_x) / self._sd_x)
        A = Xt.T @ Xt
        A[np.diag_indices_from(A)] += self.l2
        A[0, 0] -= self.l2  # the intercept is not shrunk: the mean level is known from the rows themselves
        self._level = scipy.linalg.solve(A, Xt.T @ level, assume_a="pos")
        return y - level

    def _fit_anchor(self, X: np.ndarray, Z: np.ndarray, y: np.ndarray) -> None:
        """``anchored``: what the metadata rules know, fitted first and freely; the linear model then learns what
        is left over, with its own (larger) penalties.

        - each descriptor's mean score in the fit (an operator's own effect, as the best fixed operator knows
          it), and a ridge of those means on ``z~`` (penalty ``l2``) for descriptors the fit never saw;
        - the rules' interactions (:func:`rule_features`): how far a slerp leans towards the first source, times
          which side is stronger by known score and which is tagged with more of the target; one least-squares
          weight each, on what the operators' means leave over.
        """
        self._off_z = self._off_v = self._off_w = self._gamma = None
        self._off_index = {}
        if self.model != "anchored":
            return
        uniq, inverse = np.unique(Z, axis=0, return_inverse=True)
        inverse = inverse.reshape(-1)
        self._off_z = uniq
        self._off_v = np.bincount(inverse, weights=y) / np.bincount(inverse)
        Zt = with_intercept((uniq - self._mu_z) / self._sd_z)
        A = Zt.T @ Zt
        A[np.diag_indices_from(A)] += self.l2
        A[0, 0] -= self.l2
        self._off_w = scipy.linalg.solve(A, Zt.T @ self._off_v, assume_a="sym")
        self._off_index = {z.tobytes(): i for i, z in enumerate(uniq)}
        F = rule_features(X, Z)
        r = y - self._off_v[inverse]
        self._gamma = scipy.linalg.solve(F.T @ F + 1e-6 * np.eye(F.shape[1]), F.T @ r, assume_a="sym")

    def _anchor(self, X: np.ndarray, Z: np.ndarray) -> np.ndarray:
        """The anchor of ``anchored`` per row (X[i], Z[i]) (raw): the operator's own effect plus the rules'
        interactions (0 for other models)."""
        if self._off_v is None:
            return np.zeros(Z.shape[0])
        Z = np.ascontiguousarray(Z, dtype=np.float64)
        idx = np.array([self._off_index.get(z.tobytes(), -1) for z in Z], dtype=np.intp)
        out = with_intercept((Z - self._mu_z) / self._sd_z) @ self._off_w
        seen = idx >= 0
        out[seen] = self._off_v[idx[seen]]
        return out + rule_features(X, Z) @ self._gamma

    def _std(self, X: np.ndarray, Z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if self._mu_x is None:
            return with_intercept(X), with_intercept(Z)
        return with_intercept((X - self._mu_x) / self._sd_x), with_intercept((Z - self._mu_z) / self._sd_z)

    def penalties(self, d: int, k: int) -> np.ndarray:
        """The linear model's ridge penalty of each coefficient of ``phi = x~ (outer) z~`` ((d + 1) * (k + 1)).

        Row blocks of x~: its constant (``main``: the operators' own effects), then the engine's context layout
        ``[signals, metadata, task buckets]`` (:mod:`~simmerge_bandit.context`); a context narrower than the
        metadata and buckets together is all signals. Each block's penalty is its ``l2_<block>``, else ``l2``."""
        from ..context import TASK_BUCKETS
        from ..signals.metadata import METADATA_NAMES

        m = len(METADATA_NAMES)
        rows = np.full(d + 1, self.l2 if self.l2_signals is None else self.l2_signals)
        rows[0] = self.l2 if self.l2_main is None else self.l2_main
        if d >= m + TASK_BUCKETS:
            rows[d + 1 - m - TASK_BUCKETS:d + 1 - TASK_BUCKETS] = self.l2 if self.l2_meta is None else self.l2_meta
            rows[d + 1 - TASK_BUCKETS:] = self.l2 if self.l2_buckets is None else self.l2_buckets
        return np.repeat(rows, k + 1)

    def _ensure(self, d: int, k: int) -> None:
        if self._Ainv is None:
            q = (d + 1) * (k + 1)
            self._Ainv = np.diag(1.0 / self.penalties(d, k))
            self._reset_grams()
            self._b = np.zeros(q)
            self._beta = np.zeros(q)

    # ---- supervised fit ----

    def fit(self, X: np.ndarray, Z: np.ndarray, arms: Sequence[str], y: np.ndarray) -> "SimMergePredictor":
        """Fit on evaluated merges: contexts ``X`` (m, d), descriptors ``Z`` (m, k), operators, scores ``y`` (m,).

        Replaces any previous state: for ``model="mlp"`` the networks are trained (deterministic given the
        rows), then the ridge head is one batch solve over ``phi``, factorized once. ``arms`` are recorded per
        operator in :meth:`summary`; the model itself reads operators only through ``Z``.
        """
        X = np.asarray(X, dtype=np.float64)
        Z = np.asarray(Z, dtype=np.float64)
        y = np.asarray(y, dtype=np.float64).reshape(-1)
        if X.ndim != 2 or X.shape[0] == 0:
            raise InvalidInput(f"predictor fit: X must be a non-empty (m, d) array, got shape {X.shape}")
        m = X.shape[0]
        if Z.ndim == 1 and Z.size == 0:
            Z = Z.reshape(m, 0)
        if Z.ndim != 2 or Z.shape[0] != m or y.shape[0] != m or len(arms) != m:
            raise InvalidInput(f"predictor fit: X has {m} rows but Z has shape {Z.shape}, y {y.shape[0]} values "
                               f"and arms {len(arms)} names")
        if not (np.isfinite(X).all() and np.isfinite(Z).all() and np.isfinite(y).all()):
            raise InvalidInput("predictor fit: X, Z and y must be finite")
        self._mu_x, self._sd_x = X.mean(0), _safe_std(X)
        self._mu_z, self._sd_z = Z.mean(0), _safe_std(Z)
        y_all = y
        if self.model == "mlp":
            y = self._fit_level(X, y)
            inputs = np.hstack([(X - self._mu_x) / self._sd_x, (Z - self._mu_z) / self._sd_z])
            live = np.concatenate([X.std(0), Z.std(0)]) > 1e-12
            if not live.any():  # nothing varies: the networks have nothing to learn from; keep their inputs
                live[:] = True
            nets = _mlp.train(inputs[:, live], y, hidden=self.hidden, epochs=self.epochs, members=self.members,
                              seed=self.init_seed)
            self._nets = _with_dead_inputs(nets, live)
            Phi = self._neural_phi(X, Z)
        else:
            self._nets = self._level = None
            self._fit_anchor(X, Z, y)
            y = y - self._anchor(X, Z)
            Xt, Zt = self._std(X, Z)
            Phi = (Xt[:, :, None] * Zt[:, None, :]).reshape(m, -1)
        A = Phi.T @ Phi
        A[np.diag_indices_from(A)] += self.l2 if self.model == "mlp" else self.penalties(X.shape[1], Z.shape[1])
        factor = scipy.linalg.cho_factor(A)
        Ainv = scipy.linalg.cho_solve(factor, np.eye(A.shape[0]))
        self._Ainv = np.ascontiguousarray((Ainv + Ainv.T) / 2)  # exactly symmetric, C order: updated in place
        self._reset_grams()
        self._b = Phi.T @ y
        self._beta = scipy.linalg.cho_solve(factor, self._b)
        self._d, self._k = X.shape[1], Z.shape[1]
        resid = y_all - self.predict(X, Z)
        self._stats = {"n": m, "rmse": float(np.sqrt(np.mean(resid ** 2))),
                       "operators": dict(Counter(str(a) for a in arms))}
        self.n_updates = m
        return self

    def summary(self) -> dict:
        """What the last fit saw: ``{"n", "rmse" (training), "operators": {name: rows}}`` (empty before fit)."""
        return dict(self._stats)

    # ---- prediction ----

    def predict(self, X: np.ndarray, Z: np.ndarray) -> np.ndarray:
        """Predicted normalized score of each row ``(X[i], Z[i])`` (0 before any fit or update)."""
        X = np.asarray(X, dtype=np.float64)
        Z = np.asarray(Z, dtype=np.float64).reshape(X.shape[0], -1)
        if self._beta is None:
            return np.zeros(X.shape[0])
        self._check_widths(X.shape[1], Z.shape[1])
        if self._nets is not None:
            return self._pair_level(X) + self._neural_phi(X, Z) @ self._beta
        Xt, Zt = self._std(X, Z)
        W = self._beta.reshape(Xt.shape[1], Zt.shape[1])
        return np.einsum("ij,ij->i", Xt @ W, Zt) + self._anchor(X, Z)

    def _reset_grams(self) -> None:
        """Forget the kept G (after a fit, a restore or a fresh ``A^-1``); :meth:`_gram` recomputes them."""
        self._gram_index: dict[bytes, int] = {}
        self._gram_z = np.empty((0, 0))     # (Kc, kt): the standardized descriptors kept
        self._gram_G = np.empty((0, 0, 0))  # (Kc, p, p): their G, as of the current A^-1

    def _gram(self, Zt: np.ndarray) -> np.ndarray:
        """``G_k = P_k^T A^-1 P_k`` (p, p) for each standardized descriptor ``z~_k`` (rows of ``Zt``).

        With ``phi = x~ (outer) z~``, ``phi^T A^-1 phi = x~^T G x~``: one small G per operator. A fresh G reads
        all of ``A^-1`` (q^2 work per descriptor, about 1 ms for 12 operators at the engine's sizes), so the G of
        descriptors already seen are kept and corrected by each update's rank-one term, as hybrid LinUCB keeps
        its H; only descriptors not seen since the last fit or restore are contracted from ``A^-1``.
        """
        keys = [z.tobytes() for z in Zt]
        new = [k for k in dict.fromkeys(keys) if k not in self._gram_index]
        if new:
            if len(self._gram_index) + len(new) > _MAX_GRAMS:  # many one-off descriptors: start over
                self._reset_grams()
                new = list(dict.fromkeys(keys))
            Zn = np.array([np.frombuffer(k) for k in new])
            start = len(self._gram_index)
            self._gram_index.update((k, start + r) for r, k in enumerate(new))
            Gn = self._fresh_grams(Zn)
            self._gram_z = np.concatenate([self._gram_z.reshape(start, Zn.shape[1]), Zn])
            self._gram_G = np.concatenate([self._gram_G.reshape((start,) + Gn.shape[1:]), Gn])
        return self._gram_G[[self._gram_index[k] for k in keys]]

    def _fresh_grams(self, Zt: np.ndarray) -> np.ndarray:
        """:meth:`_gram` computed from ``A^-1``: one broadcast product over it, then a small contraction."""
        K, kt = Zt.shape
        p = self._Ainv.shape[0] // kt
        T = (Zt @ self._Ainv.reshape(p, kt, -1)).reshape(p, K, p, kt)  # (z~_k^T A^-1) by row block l, col (i, m)
        return (T.transpose(1, 0, 2, 3) @ Zt[:, None, :, None])[..., 0]  # contract m with z~_k: (K, p, p)

    def _width(self, cands: Candidates, Xt: np.ndarray, Zt: np.ndarray) -> np.ndarray:
        n, p = Xt.shape
        if self._Ainv is None:
            return np.sqrt(np.einsum("ij,ij->i", Xt, Xt) * np.einsum("ij,ij->i", Zt, Zt) / self.l2)
        Xp, Zp = padded(Xt), padded(Zt)
        var = np.empty(n + 1)
        for _, grid in cands.batches:
            zt = Zt[grid[:, 0]]
            Xb = Xp[grid]
            var[grid] = np.einsum("kwp,kwp->kw", Xb @ self._gram(zt), Xb)
            odd = ((Zp[grid] != zt[:, None, :]).any(-1) & (grid < n))
            if odd.any():  # an operator whose candidates carry different descriptors: the general form
                idx = grid[odd.any(axis=1)]
                idx = idx[idx < n]
                Phi = (Xt[idx][:, :, None] * Zt[idx][:, None, :]).reshape(idx.shape[0], -1)
                var[idx] = np.einsum("ij,ij->i", Phi @ self._Ainv, Phi)
        return np.sqrt(np.maximum(var[:n], 0.0))

    def _score(self, cands):
        if self._nets is not None:
            g, Zg = cands.grid, cands.grid_Z
            if g is not None and Zg is not None:  # per pair and operator: the first layer once per pair
                xs, zs = (g.X - self._mu_x) / self._sd_x, (Zg - self._mu_z) / self._sd_z
                Phi = with_intercept(_mlp.grid_features(self._nets, xs, zs))
                level = np.repeat(self._pair_level(g.X), len(g.arms))
            else:
                Phi = self._neural_phi(cands.X, cands.Z)
                level = self._pair_level(cands.X)
            mean = level + Phi @ self._beta
            width = np.sqrt(np.maximum(np.einsum("ij,ij->i", Phi @ self._Ainv, Phi), 0.0))
            return mean, mean, width, argmax_distribution(mean)
        g, Zg = cands.grid, cands.grid_Z
        if g is not None and Zg is not None:  # per pair and operator
            Xt, Zt = self._std(g.X, Zg)
            if self._beta is None:
                mean = np.zeros(len(cands))
                var = np.outer(np.einsum("ij,ij->i", Xt, Xt), np.einsum("ij,ij->i", Zt, Zt) / self.l2).ravel()
            else:
                mean = (Xt @ self._beta.reshape(Xt.shape[1], Zt.shape[1]) @ Zt.T).ravel()
                if self._off_v is not None:
                    mean += self._anchor(np.repeat(g.X, Zg.shape[0], axis=0), np.tile(Zg, (g.X.shape[0], 1)))
                var = quad_forms(Xt, self._gram(Zt), self._scratch).ravel()
            width = np.sqrt(np.maximum(var, 0.0))
        else:
            Xt, Zt = self._std(cands.X, cands.Z)
            if self._beta is None:
                mean = np.zeros(len(cands))
            else:
                mean = np.einsum("ij,ij->i", Xt @ self._beta.reshape(Xt.shape[1], Zt.shape[1]), Zt) \
                    + self._anchor(cands.X, cands.Z)
            width = self._width(cands, Xt, Zt)
        return mean, mean, width, argmax_distribution(mean)

    def _learn(self, x, arm, z, reward, propensity) -> None:
        # weight w: A += w phi phi^T and b += w r phi, i.e. one ordinary update with sqrt(w) phi and sqrt(w) r
        root_w = math.sqrt(self.online_weight)
        if self._nets is not None:  # the head learns what the (frozen) level model leaves over
            reward = (reward - float(self._pair_level(x[None, :])[0])) * root_w
            phi = self._neural_phi(x[None, :], z[None, :])[0] * root_w
            u, c = sherman_morrison(self._Ainv, phi)
            self._b += reward * phi
            self._beta += u * (reward - ddot(u, self._b) / c)
            return
        self._ensure(x.shape[0], z.shape[0])
        reward = (reward - float(self._anchor(x[None, :], z[None, :])[0])) * root_w
        xt, zt = self._std(x[None, :], z[None, :])
        phi = np.outer(xt[0], zt[0]).ravel() * root_w
        u, c = sherman_morrison(self._Ainv, phi)
        if self._gram_index:  # the kept G_k = P_k^T A^-1 P_k follow A^-1's rank-one change
            Vt = self._gram_z @ u.reshape(xt.shape[1], zt.shape[1]).T
            self._gram_G -= Vt[:, :, None] * (Vt[:, None, :] / c)
        self._b += reward * phi
        # beta = A^-1 b by the same rank-one algebra: (A^-1 - u u^T / c)(b + r phi) = beta + u (r - u^T b' / c),
        # so no pass over the q x q inverse beyond Sherman-Morrison's own.
        self._beta += u * (reward - ddot(u, self._b) / c)

    def explain(self, x, arm, z) -> dict:
        """Contributions of each standardized feature: ``x_std_j * (B z~)_j`` for the linear model, by occlusion
        for the network (the prediction minus the prediction with feature j at its training mean); the baseline
        is the prediction at the mean context."""
        x = np.asarray(x, dtype=np.float64).reshape(-1)
        z = np.asarray(z, dtype=np.float64).reshape(-1)
        if self._nets is not None:
            d = x.shape[0]
            rows = np.vstack([x, np.tile(x, (d, 1)), self._mu_x])
            rows[1 + np.arange(d), np.arange(d)] = self._mu_x
            pred = self.predict(rows, np.tile(z, (d + 2, 1)))
            return {"predicted": float(pred[0]), "baseline": float(pred[-1]), "contributions": pred[0] - pred[1:-1],
                    "method": "occlusion"}
        if self._beta is None:
            return {"predicted": 0.0, "baseline": 0.0, "contributions": np.zeros(x.shape[0]), "method": "linear"}
        xt, zt = self._std(x[None, :], z[None, :])
        v = self._beta.reshape(xt.shape[1], zt.shape[1]) @ zt[0]
        contrib = xt[0, 1:] * v[1:]
        own = float(self._anchor(x[None, :], z[None, :])[0])
        return {"predicted": float(own + v[0] + contrib.sum()), "baseline": float(own + v[0]),
                "contributions": contrib, "method": "linear"}

    def remap_descriptor(self, mapping) -> bool:
        """Read descriptors of the current arm schema (see :class:`~simmerge_bandit.descriptor.DescriptorMap`):
        a fit is not in the decision log, so it is carried over rather than rebuilt.

        Each coordinate both schemas have keeps its weights; the standardization absorbs a change of span
        (``(z_old - mu) / sd == (z_new - mu') / sd'``), so predictions of operators whose values lie within both
        spans do not change. A new coordinate gets zero weight in the networks' first layer, and in the linear
        model the prior (``A^-1`` = I / l2 on its block, nothing learned), as if no row had had it.
        """
        if self._k is None:
            return True
        if mapping.old_width != self._k:
            return False
        src, k, d = mapping.source, mapping.new_width, self._d
        mapped = src >= 0
        if self._mu_z is None:  # raw inputs so far: the same as standardizing with mean 0 and scale 1
            self._mu_x, self._sd_x = np.zeros(d), np.ones(d)
            mu_old, sd_old = np.zeros(self._k), np.ones(self._k)
        else:
            mu_old, sd_old = self._mu_z, self._sd_z
        mu, sd = np.zeros(k), np.ones(k)
        mu[mapped] = (mu_old[src[mapped]] - mapping.offset[mapped]) / mapping.scale[mapped]
        sd[mapped] = sd_old[src[mapped]] / mapping.scale[mapped]
        if self._nets is not None:
            nets = []
            for w in self._nets:  # new dicts: a fit's arrays may be shared with _mlp's cache of fits
                W = w["0_weight"]
                first = np.zeros((W.shape[0], d + k))
                first[:, :d] = W[:, :d]
                first[:, d + np.flatnonzero(mapped)] = W[:, d + src[mapped]]
                nets.append({**w, "0_weight": first})
            self._nets = nets
        elif self._Ainv is not None:  # phi = x~ (outer) z~: remap the z~ index of every (x~, z~) block
            p, kt_old = d + 1, self._k + 1
            keep = np.concatenate(([True], mapped))
            idx = np.concatenate(([0], src + 1))[keep]           # old z~ index of each kept new one
            A = self._Ainv.reshape(p, kt_old, p, kt_old)[:, idx][:, :, :, idx]
            out = np.zeros((p, k + 1, p, k + 1))
            out[np.ix_(range(p), keep, range(p), keep)] = A
            fresh = np.flatnonzero(~keep)
            rows = self.penalties(d, k).reshape(p, k + 1)[:, 0]
            for i in range(p):
                out[i, fresh, i, fresh] = 1.0 / rows[i]
            self._Ainv = np.ascontiguousarray(out.reshape(p * (k + 1), -1))

            def vec(v):
                o = np.zeros((p, k + 1))
                o[:, keep] = v.reshape(p, kt_old)[:, idx]
                return o.reshape(-1)

            self._b, self._beta = vec(self._b), vec(self._beta)
        if self._off_z is not None:  # anchored: the fitted operators' descriptors and the fallback, in the new schema
            z = np.zeros((self._off_z.shape[0], k))
            z[:, mapped] = (self._off_z[:, src[mapped]] - mapping.offset[mapped]) / mapping.scale[mapped]
            w = np.zeros(k + 1)
            w[0], w[1 + np.flatnonzero(mapped)] = self._off_w[0], self._off_w[1 + src[mapped]]
            self._off_z, self._off_w = z, w
            self._off_index = {r.tobytes(): i for i, r in enumerate(z)}
        self._mu_z, self._sd_z = mu, sd
        self._k = k
        self._memo = None
        self._reset_grams()
        return True

    # ---- state ----

    def _state(self):
        arrays: dict[str, np.ndarray] = {}
        if self._Ainv is not None:
            arrays.update({"Ainv": self._Ainv.copy(), "b": self._b.copy(), "beta": self._beta.copy()})
        if self._mu_x is not None:
            arrays.update({"mu_x": self._mu_x, "sd_x": self._sd_x, "mu_z": self._mu_z, "sd_z": self._sd_z})
        if self._nets is not None:
            arrays.update(_mlp.to_arrays(self._nets), level=self._level.copy())
        if self._off_v is not None:
            arrays.update(off_z=self._off_z.copy(), off_v=self._off_v.copy(), off_w=self._off_w.copy(),
                          gamma=self._gamma.copy())
        return arrays, {"stats": self._stats}

    def _load_state(self, arrays, meta) -> None:
        get = lambda k: None if k not in arrays else np.array(arrays[k], dtype=np.float64, order="C")  # noqa: E731
        self._Ainv, self._b, self._beta = get("Ainv"), get("b"), get("beta")
        self._mu_x, self._sd_x, self._mu_z, self._sd_z = get("mu_x"), get("sd_x"), get("mu_z"), get("sd_z")
        self._stats = dict(meta.get("stats", {}))
        self._nets = _mlp.from_arrays(arrays) or None  # a snapshot without networks is a linear model
        self._level = get("level")
        self._off_z, self._off_v, self._off_w, self._gamma = get("off_z"), get("off_v"), get("off_w"), get("gamma")
        self._off_index = {} if self._off_z is None else {z.tobytes(): i for i, z in enumerate(self._off_z)}
        self._reset_grams()


def rule_features(X: np.ndarray, Z: np.ndarray) -> np.ndarray:
    """The metadata rules (:mod:`~simmerge_bandit.rules`) as features of (context, raw descriptor) rows, (m, 2):
    ``lean * sign(known_diff)`` and ``lean * sign(tag_share_a - tag_share_b)``, where
    ``lean = 0.5 - t`` for slerp (how far it leans towards the first source; slerp's ``t`` weighs the
    second) and 0 for other methods. Zero where the context is not the engine's layout ``[signals, metadata,
    task buckets]`` or the descriptors are not today's arm schema (then the anchor is the operators' means)."""
    from .. import descriptor
    from ..context import TASK_BUCKETS
    from ..signals.metadata import METADATA_NAMES

    X = np.asarray(X, dtype=np.float64)
    Z = np.asarray(Z, dtype=np.float64)
    out = np.zeros((X.shape[0], 2))
    names = descriptor.current().names
    m = len(METADATA_NAMES)
    if Z.shape[1] != len(names) or X.shape[1] < m + TASK_BUCKETS:
        return out
    meta = X[:, X.shape[1] - m - TASK_BUCKETS:X.shape[1] - TASK_BUCKETS]
    col = {n: i for i, n in enumerate(METADATA_NAMES)}
    slerp = Z[:, names.index("method:slerp")]
    lean = np.where(slerp > 0, 0.5 - Z[:, names.index("param:t")], 0.0)
    # signs only, as the rules read them: a weight on the size of a known-score difference, fitted on a few
    # dozen pairs, flipped sign between training splits of the realistic zoo
    out[:, 0] = lean * np.sign(meta[:, col["known_diff"]])
    out[:, 1] = lean * np.sign(meta[:, col["tag_share_a"]] - meta[:, col["tag_share_b"]])
    return out


def _with_dead_inputs(nets: list[dict], live: np.ndarray) -> list[dict]:
    """Networks trained on the ``live`` inputs only, as networks of every input: a zero first-layer weight on each
    input no fitted row varied (a context feature or a descriptor coordinate the fit never saw change, such as a
    group's ``spread:weight`` on a table of pairs, or a method absent from the table).

    Such an input carries nothing the fit could learn: left in, its weights would keep their random start and
    shift the prediction of any candidate that has it by a random amount, and merely having it (a method added to
    the registry, a new coordinate) would change the network's random start and so every fit. Left out, a fit
    depends only on what its rows vary, and a candidate with a value there is predicted as the fitted rows are, as
    :meth:`SimMergePredictor.remap_descriptor` does for a coordinate added later."""
    if live.all():
        return nets
    out = []
    for w in nets:
        W = np.zeros((w["0_weight"].shape[0], live.size))
        W[:, live] = w["0_weight"]
        out.append({**w, "0_weight": W})
    return out


def _safe_std(A: np.ndarray) -> np.ndarray:
    # Constant columns (e.g. a method family absent from the table) keep their raw scale instead of dividing by 0.
    sd = A.std(0)
    return np.where(sd > 1e-12, sd, 1.0)


POLICY = SimMergePredictor
