"""The interface every policy implements, and the pieces they share.

A policy ranks :class:`Candidates` (one row per (pair, operator) candidate, each with its own context) and learns
from ``update`` calls with the reward of one candidate. :meth:`Policy.rank` turns the policy's scores into a
:class:`Ranking` whose ``choice`` is drawn from ``propensity`` with the policy's own seeded generator. Every
policy mixes an exploration floor into that distribution, so each candidate has a probability > 0 of being
chosen and logged decisions support off-policy evaluation.

Why one module of this size: it is the one contract every policy module imports (:class:`Candidates`,
:class:`Ranking`, :class:`Policy` with its exploration floor, snapshot and clone rules) plus the few numerical
kernels several policies share (Sherman-Morrison updates, batched quadratic forms); split, each policy would import
one interface from several places.
"""

from __future__ import annotations

import abc
import bisect
import hashlib
import inspect
import json
import math
from dataclasses import dataclass
from functools import cached_property
from typing import Any, ClassVar, Sequence

import numpy as np
from scipy.linalg.blas import ddot, dgemv, dger

from ..errors import InvalidInput


@dataclass(frozen=True)
class Candidates:
    """What a policy ranks: ``n`` candidates, each with its own context row and its arm (operator).

    ``X`` (n, d): each candidate's context (pair features + task descriptors, NaN already imputed).
    ``arms`` (n,): the operator name of each candidate. ``Z`` (n, k): the descriptor of each candidate's operator
    (method family one-hot + numeric parameters); an operator's descriptor must be the same in every call.
    """

    X: np.ndarray
    arms: Sequence[str]
    Z: np.ndarray

    def __post_init__(self) -> None:
        X = np.ascontiguousarray(self.X, dtype=np.float64)
        Z = np.ascontiguousarray(self.Z, dtype=np.float64)
        if X.ndim != 2 or X.shape[0] == 0:
            raise InvalidInput(f"candidate contexts must be a non-empty (n, d) array, got shape {X.shape}")
        n = X.shape[0]
        if Z.ndim == 1 and Z.size == 0:
            Z = Z.reshape(n, 0)
        if Z.ndim != 2 or Z.shape[0] != n:
            raise InvalidInput(f"operator descriptors must be an (n={n}, k) array, got shape {Z.shape}")
        if len(self.arms) != n:
            raise InvalidInput(f"got {len(self.arms)} operator names for {n} candidates")
        if not (_all_finite(X) and _all_finite(Z)):
            raise InvalidInput("candidate contexts and descriptors must be finite (impute NaN first)")
        object.__setattr__(self, "X", X)
        object.__setattr__(self, "Z", Z)

    def __len__(self) -> int:
        return self.X.shape[0]

    @cached_property
    def _codes(self) -> tuple[list[str], np.ndarray]:
        """Distinct operators in order of first appearance, and each candidate's index into them."""
        first = dict.fromkeys(self.arms)
        index = {a: i for i, a in enumerate(first)}
        codes = np.fromiter(map(index.__getitem__, self.arms), dtype=np.intp, count=len(self.arms))
        return [str(a) for a in first], codes

    @cached_property
    def groups(self) -> list[tuple[str, np.ndarray]]:
        """``[(arm, indices of its candidates), ...]`` in order of first appearance."""
        names, codes = self._codes
        order = np.argsort(codes, kind="stable")
        bounds = np.cumsum(np.bincount(codes, minlength=len(names)))[:-1]
        return list(zip(names, np.split(order, bounds)))

    @cached_property
    def batches(self) -> list[tuple[list[str], np.ndarray]]:
        """The candidates as padded per-operator grids, for one batched matmul over all operators at once.

        Each batch is ``(operators, grid)`` with ``grid`` (len(operators), width) holding candidate indices per
        operator, padded with ``n`` (one past the last candidate; see :func:`padded`). Operators are grouped so
        that padding never more than doubles the work: usually (every pair x every operator) one batch.
        """
        names, codes = self._codes
        n = len(codes)
        counts = np.bincount(codes, minlength=len(names))
        order = np.argsort(codes, kind="stable")
        starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
        if (counts == counts[0]).all():  # every pair x every operator: one batch, no padding
            return [(names, order.reshape(len(names), -1))]
        by_size = np.argsort(-counts, kind="stable")
        out = []
        i = 0
        while i < len(by_size):
            width = int(counts[by_size[i]])
            j, total = i, 0
            while j < len(by_size) and (j - i + 1) * width <= 2 * (total + counts[by_size[j]]):
                total += int(counts[by_size[j]])
                j += 1
            members = by_size[i:j]
            grid = np.full((len(members), width), n, dtype=np.intp)
            for r, a in enumerate(members):
                grid[r, : counts[a]] = order[starts[a]: starts[a] + counts[a]]
            out.append(([names[a] for a in members], grid))
            i = j
        return out

    @cached_property
    def needs_padding(self) -> bool:
        """Whether :attr:`batches` point at the padding row ``n`` (else a plain ``X[grid]`` gathers them)."""
        return any(bool((grid == len(self)).any()) for _, grid in self.batches)

    @cached_property
    def grid(self) -> Grid | None:
        """The candidates as every pair x every operator, when they are laid out that way (else None).

        The engine, replay and simulation all build candidates pair-major (``arms == operators * pairs``) with
        one context per pair; the linear policies then work on the ``P`` pair contexts and the ``K`` operators
        (one matrix product per quantity) instead of gathering ``P * K`` rows. Checking the layout costs one
        list comparison and one pass over ``X``, far less than the per-candidate grouping it replaces.
        """
        arms = self.arms if type(self.arms) is list else (
            self.arms.tolist() if isinstance(self.arms, np.ndarray) else list(self.arms))
        n = len(arms)
        try:
            K = arms.index(arms[0], 1)
        except ValueError:
            K = n
        names = arms[:K]
        if n % K or len(set(names)) != K or (K < n and arms != names * (n // K)):
            return None
        d = self.X.shape[1]
        F = self.X.reshape(n // K, K * d)  # one row per pair: its K contexts side by side
        if K > 1 and not (F[:, d:] == F[:, :-d]).all():  # each context equals the next: long contiguous runs
            return None
        return Grid([str(a) for a in names], F[:, :d])

    @cached_property
    def grid_Z(self) -> np.ndarray | None:
        """``(K, k)``: each operator's descriptor on a :attr:`grid` whose operators keep one descriptor each."""
        g = self.grid
        if g is None:
            return None
        K = len(g.arms)
        Z3 = self.Z.reshape(len(self) // K, K, -1)
        return Z3[0] if (Z3 == Z3[:1]).all() else None


@dataclass(frozen=True)
class Grid:
    """Every pair x every operator, pair-major: a ``(P, K)`` result raveled is in candidate order."""

    arms: list[str]  # the K operators, in their order within each pair
    X: np.ndarray    # (P, d): each pair's context


def padded(A: np.ndarray) -> np.ndarray:
    """``A`` with one extra zero row at index ``n``, so ``padded(A)[grid]`` gathers a batch grid."""
    out = np.zeros((A.shape[0] + 1,) + A.shape[1:])
    out[:-1] = A
    return out


class Ranking:
    """A policy's answer for one set of candidates.

    ``choice`` is the candidate index drawn from ``propensity``; ``order`` lists every index, the choice first
    and then by ``scores`` descending (ties by index). ``predicted`` is the expected reward, ``uncertainty`` its
    posterior standard deviation (in units of the reward noise for the ridge policies; 0 where a policy has none).
    ``order`` may be passed as None: it is then sorted on first use, and :meth:`top` gives its first entries
    without sorting every candidate (a suggestion shows a few of thousands).
    """

    def __init__(self, choice: int, order: np.ndarray | None, scores: np.ndarray, predicted: np.ndarray,
                 uncertainty: np.ndarray, propensity: np.ndarray, by_score: np.ndarray | None = None):
        self.choice = choice
        self._order = order
        self.scores = scores
        self.predicted = predicted
        self.uncertainty = uncertainty
        self.propensity = propensity
        #: every index by score descending, ties by index (``argsort(-scores, kind="stable")``), when the caller
        #: already has it (rankings of the same scores share one)
        self._by_score = by_score

    @property
    def order(self) -> np.ndarray:
        if self._order is None:
            rest = self._by_score if self._by_score is not None else np.argsort(-self.scores, kind="stable")
            self._order = np.concatenate(([self.choice], rest[rest != self.choice]))
        return self._order

    def top(self, k: int) -> np.ndarray:
        """``order[:k]``: partial selection of the best scores, then a stable sort of those few."""
        if self._order is None and self._by_score is not None and k > 0:
            # the k best by score, less the choice: a few Python ints, no pass over the candidates
            best = [i for i in self._by_score[:k].tolist() if i != self.choice][: k - 1]
            return np.array([self.choice, *best], dtype=np.intp)
        neg = -self.scores
        if self._order is not None or k <= 0 or 4 * k >= neg.shape[0]:
            return self.order[:k]
        kth = np.partition(neg, k - 1)[k - 1]
        best = np.flatnonzero(neg <= kth)  # the k best and every tie at the boundary, by index
        best = best[np.argsort(neg[best], kind="stable")]
        best = best[best != self.choice][: k - 1]
        if best.shape[0] < k - 1:  # NaN scores: the full sort decides where they go
            return self.order[:k]
        return np.concatenate(([self.choice], best))

    def __repr__(self) -> str:
        return f"Ranking(choice={self.choice}, n={self.scores.shape[0]})"


def argmax_distribution(scores: np.ndarray) -> np.ndarray:
    """All probability mass on the best score, split evenly between exact ties (up to rounding)."""
    best = scores.max()
    top = scores >= best - 1e-12 * max(1.0, abs(best))
    return top / top.sum()


def require(ok: bool, message: str) -> None:
    """Raise :class:`InvalidInput` with ``message`` unless ``ok`` (parameter validation)."""
    if not ok:
        raise InvalidInput(message)


def is_number(v: Any) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) and math.isfinite(v)


class Policy(abc.ABC):
    """A contextual-bandit policy over merge candidates.

    Subclasses implement :meth:`_score` (scores, predicted reward, uncertainty and the base choice distribution),
    :meth:`_learn`, :meth:`_state` / :meth:`_load_state` and :meth:`explain`. Constructor parameters are stored as
    same-named attributes and are what :meth:`clone` copies; learned state is private. The base class mixes the
    exploration ``floor`` into the distribution, draws the choice, counts updates and snapshots the generator.
    """

    name: ClassVar[str]
    #: Whether :meth:`_score` depends on the learned state alone (no random draws), so that scores can be reused
    #: until the next update (see :meth:`rank`).
    deterministic_scores: ClassVar[bool] = False
    #: Names of the constructor parameters (what ``clone`` and ``params`` use).
    _param_names: ClassVar[tuple[str, ...]] = ("floor", "seed")

    def __init__(self, *, floor: float = 0.01, seed: int = 0):
        require(is_number(floor) and 0.0 < floor <= 1.0, f"floor must be in (0, 1], got {floor!r}")
        require(isinstance(seed, (int, np.integer)) and not isinstance(seed, bool) and seed >= 0,
                f"seed must be a non-negative integer, got {seed!r}")
        self.floor = float(floor)
        self.seed = int(seed)
        self._rng = np.random.default_rng(self.seed)
        self.n_updates = 0
        self._d: int | None = None  # context width, fixed by the first update
        self._memo: tuple | None = None  # the last scores rank(reuse=True) computed, until the state changes
        self._k: int | None = None  # descriptor width, fixed by the first update

    # ---- what subclasses provide ----

    @abc.abstractmethod
    def _score(self, cands: Candidates) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Return ``(scores, predicted, uncertainty, distribution)`` for every candidate (distribution sums to 1)."""

    @abc.abstractmethod
    def _learn(self, x: np.ndarray, arm: str, z: np.ndarray, reward: float, propensity: float) -> None:
        """Incorporate one reward (inputs already validated)."""

    @abc.abstractmethod
    def _state(self) -> tuple[dict[str, np.ndarray], dict]:
        """Learned state as arrays plus JSON-able meta."""

    @abc.abstractmethod
    def _load_state(self, arrays: dict[str, np.ndarray], meta: dict) -> None:
        """Inverse of :meth:`_state`."""

    @abc.abstractmethod
    def explain(self, x: np.ndarray, arm: str, z: np.ndarray) -> dict:
        """Per-feature contributions to the predicted reward of one candidate.

        Returns ``{"predicted": float, "baseline": float, "contributions": ndarray (d,), "method": str}``; for
        the linear policies ``baseline + contributions.sum() == predicted`` (``method == "linear"``).
        """

    # ---- the public interface ----

    def rank(self, cands: Candidates, reuse: bool = False) -> Ranking:
        """Score every candidate, draw a choice from the propensities and order the rest by score.

        ``reuse=True`` promises that ``cands`` holds the same, unmodified arrays as the previous ``reuse`` call
        whenever it passes the same objects: a policy whose scores are a function of its state
        (``deterministic_scores``) that learned nothing since then returns the same scores without computing them
        again (the daemon ranks one task for many clients between two rewards); the choice is drawn afresh.
        """
        if not isinstance(cands, Candidates):
            raise InvalidInput("rank() takes a Candidates object")
        self._check_widths(cands.X.shape[1], cands.Z.shape[1])
        memo = self._memo if reuse else None
        if memo is not None and memo[0] is cands.X and memo[1] is cands.Z and memo[2] is cands.arms:
            scores, predicted, uncertainty, propensity, cdf, by_score = memo[3]
        else:
            scores, predicted, uncertainty, propensity = self._scored(cands)
            cdf, by_score = np.cumsum(propensity), None
            if reuse and self.deterministic_scores:
                # Rankings of these scores until the next update share their cumulative distribution and their
                # order by score: each suggestion then only draws a choice. (Numpy releases the GIL for an
                # operation on more than 500 values; in the daemon each release can wait milliseconds to get it
                # back, so the per-suggestion passes over 1,320 candidates cost far more there than alone.)
                by_score = np.argsort(-scores, kind="stable")
                cdf = cdf.tolist()
                # (any other ranking may overwrite the scratch memory that the remembered scores live in)
                kept = (scores, predicted, uncertainty, propensity, cdf, by_score)
                self._memo = (cands.X, cands.Z, cands.arms, kept)
            else:
                self._memo = None
        n = len(cands)
        u = self._rng.random()
        if isinstance(cdf, list):  # a memo's: bisect keeps the GIL (numpy's searchsorted gives it up)
            choice = min(bisect.bisect_right(cdf, u * cdf[-1]), n - 1)
        else:
            choice = int(min(np.searchsorted(cdf, u * cdf[-1], side="right"), n - 1))
        return Ranking(choice, None, scores, predicted, uncertainty, propensity, by_score)

    def _scored(self, cands: Candidates) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """:meth:`_score` with the exploration floor mixed into its distribution."""
        scores, predicted, uncertainty, dist = self._score(cands)
        n = len(cands)
        propensity = (1.0 - self.floor) * dist
        propensity += self.floor / n
        return scores, predicted, uncertainty, propensity

    def update(self, x: np.ndarray, arm: str, z: np.ndarray, reward: float, propensity: float = 1.0) -> None:
        """Learn from the reward of candidate ``(x, arm, z)``, chosen with probability ``propensity``."""
        x, arm, z, reward, propensity = self._checked(x, arm, z, reward, propensity)
        self._memo = None
        self._learn(x, arm, z, reward, propensity)
        self.n_updates += 1

    def update_many(self, rows: Sequence[tuple]) -> None:
        """:meth:`update` with each ``(x, arm, z, reward, propensity)`` of ``rows`` in order, to the same state
        (up to rounding). Every row is checked before any is learned, so a bad row changes nothing. Policies
        whose update touches a large shared matrix learn several rows in one pass over it (:meth:`_learn_many`)."""
        widths = self._d, self._k
        try:
            checked = [self._checked(*row) for row in rows]
        except InvalidInput:
            self._d, self._k = widths
            raise
        if not checked:
            return
        self._memo = None
        self._learn_many(checked)
        self.n_updates += len(checked)

    def _learn_many(self, rows: list[tuple]) -> None:
        """Incorporate several checked rewards in order (by default one :meth:`_learn` each)."""
        for row in rows:
            self._learn(*row)

    def _checked(self, x, arm, z, reward, propensity) -> tuple[np.ndarray, str, np.ndarray, float, float]:
        """One reward's inputs validated and normalized (and the context widths fixed by the first)."""
        # This runs once per reward, so it sticks to checks that cost well under a microsecond each.
        x, z = _vector(x), _vector(z)
        reward = float(reward)
        propensity = float(propensity)
        if not _finite_vectors(x, z):
            raise InvalidInput("update(): context and descriptor must be finite")
        if not math.isfinite(reward):
            raise InvalidInput(f"update(): reward must be finite, got {reward!r}")
        if not 0.0 < propensity <= 1.0:
            raise InvalidInput(f"update(): propensity must be in (0, 1], got {propensity!r}")
        if self._d is None:
            self._d, self._k = x.shape[0], z.shape[0]
        elif x.shape[0] != self._d or z.shape[0] != self._k:
            self._check_widths(x.shape[0], z.shape[0])
        return x, arm if type(arm) is str else str(arm), z, reward, propensity

    def snapshot(self) -> tuple[dict[str, np.ndarray], dict]:
        """Everything needed to continue exactly where this policy is: arrays and JSON-able meta (no pickles)."""
        arrays, state_meta = self._state()
        meta = {"policy": self.name, "params": self.params(), "n_updates": self.n_updates,
                "d": self._d, "k": self._k, "rng": _rng_to_json(self._rng), "state": state_meta}
        return arrays, meta

    def restore(self, arrays: dict[str, np.ndarray], meta: dict) -> None:
        """Load a :meth:`snapshot` taken from a policy with the same name and parameters."""
        if meta.get("policy") != self.name:
            raise InvalidInput(f"snapshot is of policy {meta.get('policy')!r}, not {self.name!r}")
        # A prior travels inside the snapshot (and replaces this policy's), so it is not compared.
        mine = {k: v for k, v in json.loads(json.dumps(self.params())).items() if k != "prior"}
        theirs = {k: v for k, v in dict(meta.get("params", {})).items() if k != "prior"}
        # a parameter added after the snapshot was taken means the old behaviour at its default value
        defaults = {k: p.default for k, p in inspect.signature(type(self).__init__).parameters.items()
                    if p.default is not inspect.Parameter.empty}
        theirs.update({k: defaults[k] for k in mine.keys() - theirs.keys() if k in defaults})
        if mine != theirs:
            diff = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
            raise InvalidInput(f"snapshot of {self.name} has different parameters: {', '.join(diff)}")
        self._memo = None
        self._load_state(arrays, meta["state"])
        self.n_updates = int(meta["n_updates"])
        self._d, self._k = meta["d"], meta["k"]
        self._rng = _rng_from_json(meta["rng"])

    def remap_descriptor(self, mapping) -> bool:
        """Re-express the learned state for descriptors of another arm schema (a
        :class:`~simmerge_bandit.descriptor.DescriptorMap` from the schema it learned in to the current one);
        return whether it did. By default only a policy that has learned nothing about descriptors can: any
        other is rebuilt from the decision log, which is exact. A policy whose state is not in the log (the
        fitted predictor) overrides this."""
        return self._k is None

    def clone(self) -> "Policy":
        """A fresh, unfitted policy with the same constructor parameters (and so the same seed)."""
        return type(self)(**{p: getattr(self, p) for p in self._param_names})

    def params(self) -> dict[str, Any]:
        """The constructor parameters as JSON-able values (a prior policy is named, not embedded)."""
        out = {}
        for p in self._param_names:
            v = getattr(self, p)
            out[p] = v.name if isinstance(v, Policy) else v
        return out

    @property
    def version(self) -> str:
        """Changes with every update; different parameters give different versions."""
        params = self.params()
        memo = self.__dict__.get("_version_memo")
        try:
            key = (self.name, *sorted(params.items()))
            if memo is not None and memo[0] == key:
                return f"{memo[1]}-{self.n_updates}"
        except TypeError:  # an unhashable parameter value: no memo
            key = None
        digest = hashlib.sha1(json.dumps([self.name, params], sort_keys=True).encode()).hexdigest()[:8]
        if key is not None:  # the daemon logs the version with every decision; the hash is the costly part
            self._version_memo = (key, digest)
        return f"{digest}-{self.n_updates}"

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params().items())
        return f"{type(self).__name__}({args})"

    # ---- helpers ----

    def _check_widths(self, d: int, k: int) -> None:
        if self._d is not None and d != self._d:
            raise InvalidInput(f"{self.name}: context has {d} features, the policy was trained on {self._d}")
        if self._k is not None and k != self._k:
            raise InvalidInput(f"{self.name}: operator descriptor has {k} entries, the policy was trained on "
                               f"{self._k}")


def _vector(v) -> np.ndarray:
    """``v`` as a 1-D float64 array, without a conversion call when it already is one (a candidate row)."""
    if type(v) is np.ndarray and v.ndim == 1 and v.dtype.char == "d":
        return v
    return np.asarray(v, dtype=np.float64).reshape(-1)


def _finite_vectors(x: np.ndarray, z: np.ndarray) -> bool:
    """Whether both vectors of an update are finite, in two BLAS dots on the hot path (see :func:`_all_finite`)."""
    blas_ok = x.size and z.size and x.flags.c_contiguous and z.flags.c_contiguous
    if blas_ok and math.isfinite(ddot(x, x) + ddot(z, z)):
        return True
    return bool(np.isfinite(x).all() and np.isfinite(z).all())


def _all_finite(v: np.ndarray) -> bool:
    # One BLAS dot settles it on the update hot path (NaN and inf propagate); only an overflowing dot (|v| beyond
    # ~1e154) needs the elementwise check.
    flat = v.reshape(-1)
    # Large arrays (a whole candidate set) skip BLAS: a multi-threaded dot can wait milliseconds for its threads
    # on a busy machine, while the elementwise check is a steady ~10 us per 50k values.
    if 0 < flat.size <= 4096 and flat.flags.c_contiguous:
        return math.isfinite(ddot(flat, flat)) or bool(np.isfinite(flat).all())
    return bool(np.isfinite(flat).all())


def _rng_to_json(rng: np.random.Generator) -> dict:
    # PCG64's 128-bit integers go through strings so every JSON reader keeps them exact.
    st = rng.bit_generator.state
    return {"bit_generator": st["bit_generator"], "state": str(st["state"]["state"]),
            "inc": str(st["state"]["inc"]), "has_uint32": st["has_uint32"], "uinteger": st["uinteger"]}


def _rng_from_json(js: dict) -> np.random.Generator:
    rng = np.random.default_rng()
    rng.bit_generator.state = {"bit_generator": js["bit_generator"],
                               "state": {"state": int(js["state"]), "inc": int(js["inc"])},
                               "has_uint32": js["has_uint32"], "uinteger": js["uinteger"]}
    return rng


def sherman_morrison(Ainv: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, float]:
    """Turn ``Ainv = A^-1`` (symmetric) into ``(A + v v^T)^-1`` in place, in O(p^2); never a fresh inverse.

    Returns ``(A^-1 v, 1 + v^T A^-1 v)`` for the old ``A``. Direct BLAS calls with positional arguments: at
    these sizes numpy's dispatch, and f2py's keyword parsing, cost more than the arithmetic. The transpose of a
    C-ordered symmetric matrix is the same buffer in the Fortran order BLAS wants, so the rank-one update happens
    where the matrix lives.
    """
    if not Ainv.flags.c_contiguous:
        Av = Ainv @ v
        c = 1.0 + ddot(v, Av)
        Ainv -= np.outer(Av, Av) / c
        return Av, c
    At = Ainv.T
    Av = dgemv(1.0, At, v)
    c = 1.0 + ddot(v, Av)
    dger(-1.0 / c, Av, Av, 1, 1, At, 0, 0, 1)  # alpha, x, y, incx, incy, a, overwrite_x, overwrite_y, overwrite_a
    return Av, c


def quad_forms(Xt: np.ndarray, M: np.ndarray, scratch: Scratch) -> np.ndarray:
    """``x^T M_k x`` for every row ``x`` of ``Xt`` (P, p) and every ``M_k`` of ``M`` (K, p, p), as (P, K).

    One batched matrix product (K BLAS calls) into scratch memory, then one contraction.
    """
    U = np.matmul(Xt, M, out=scratch.get("quad", (M.shape[0],) + Xt.shape))
    return np.einsum("kjq,jq->jk", U, Xt)


class Scratch:
    """Reusable memory for a policy's large ranking temporaries (never handed to callers; not policy state).

    A ranking's temporaries are a few hundred KB each. glibc gives blocks that large back to the OS when they are
    freed, so a fresh one is fresh pages, each faulted in on first touch: measured at up to 4x the arithmetic of
    a ranking (d = 32, 1,200 candidates).
    """

    def __init__(self) -> None:
        self._bufs: dict[str, np.ndarray] = {}

    def get(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        """An uninitialized float64 array of ``shape``, reusing the memory of the last request for ``name``."""
        size = math.prod(shape)
        buf = self._bufs.get(name)
        if buf is None or buf.size < size:
            buf = self._bufs[name] = np.empty(size)
        return buf[:size].reshape(shape)


def with_intercept(X: np.ndarray) -> np.ndarray:
    """``[1, x]`` rows, so the ridge policies learn a bias per operator."""
    out = np.empty((X.shape[0], X.shape[1] + 1))
    out[:, 0] = 1.0
    out[:, 1:] = X
    return out
