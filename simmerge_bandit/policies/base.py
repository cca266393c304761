"""The interface every policy implements, and the pieces they share.

A policy ranks :class:`Candidates` (one row per (pair, operator) candidate, each with its own context) and learns
from ``update`` calls with the reward of one candidate. :meth:`Policy.rank` turns the policy's scores into a
:class:`Ranking` whose ``choice`` is drawn from ``propensity`` with the policy's own seeded generator. Every
policy mixes an exploration floor into that distribution, so each candidate has a probability > 0 of being
chosen and logged decisions support off-policy evaluation.
"""

from __future__ import annotations

import abc
import hashlib
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


def padded(A: np.ndarray) -> np.ndarray:
    """``A`` with one extra zero row at index ``n``, so ``padded(A)[grid]`` gathers a batch grid."""
    out = np.zeros((A.shape[0] + 1,) + A.shape[1:])
    out[:-1] = A
    return out


@dataclass
class Ranking:
    """A policy's answer for one set of candidates.

    ``choice`` is the candidate index drawn from ``propensity``; ``order`` lists every index, the choice first
    and then by ``scores`` descending. ``predicted`` is the expected reward, ``uncertainty`` its posterior
    standard deviation (in units of the reward noise for the ridge policies; 0 where a policy has none).
    """

    choice: int
    order: np.ndarray
    scores: np.ndarray
    predicted: np.ndarray
    uncertainty: np.ndarray
    propensity: np.ndarray


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

    def rank(self, cands: Candidates) -> Ranking:
        """Score every candidate, draw a choice from the propensities and order the rest by score."""
        if not isinstance(cands, Candidates):
            raise InvalidInput("rank() takes a Candidates object")
        self._check_widths(cands.X.shape[1], cands.Z.shape[1])
        scores, predicted, uncertainty, dist = self._score(cands)
        n = len(cands)
        propensity = (1.0 - self.floor) * dist + self.floor / n
        cdf = np.cumsum(propensity)
        choice = int(min(np.searchsorted(cdf, self._rng.random() * cdf[-1], side="right"), n - 1))
        rest = np.argsort(-scores, kind="stable")
        order = np.concatenate(([choice], rest[rest != choice]))
        return Ranking(choice, order, scores, predicted, uncertainty, propensity)

    def update(self, x: np.ndarray, arm: str, z: np.ndarray, reward: float, propensity: float = 1.0) -> None:
        """Learn from the reward of candidate ``(x, arm, z)``, chosen with probability ``propensity``."""
        x = np.asarray(x, dtype=np.float64).reshape(-1)
        z = np.asarray(z, dtype=np.float64).reshape(-1)
        reward = float(reward)
        propensity = float(propensity)
        if not (_all_finite(x) and _all_finite(z)):
            raise InvalidInput("update(): context and descriptor must be finite")
        if not math.isfinite(reward):
            raise InvalidInput(f"update(): reward must be finite, got {reward!r}")
        if not 0.0 < propensity <= 1.0:
            raise InvalidInput(f"update(): propensity must be in (0, 1], got {propensity!r}")
        self._check_widths(x.shape[0], z.shape[0])
        if self._d is None:
            self._d, self._k = x.shape[0], z.shape[0]
        self._learn(x, str(arm), z, reward, propensity)
        self.n_updates += 1

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
        if mine != theirs:
            diff = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
            raise InvalidInput(f"snapshot of {self.name} has different parameters: {', '.join(diff)}")
        self._load_state(arrays, meta["state"])
        self.n_updates = int(meta["n_updates"])
        self._d, self._k = meta["d"], meta["k"]
        self._rng = _rng_from_json(meta["rng"])

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
        key = json.dumps([self.name, self.params()], sort_keys=True)
        digest = hashlib.sha1(key.encode()).hexdigest()[:8]
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

    Returns ``(A^-1 v, 1 + v^T A^-1 v)`` for the old ``A``. Direct BLAS calls: at these sizes numpy's dispatch
    costs more than the arithmetic. The transpose of a C-ordered symmetric matrix is the same buffer in the
    Fortran order BLAS wants, so the rank-one update happens where the matrix lives.
    """
    At = Ainv.T
    Av = dgemv(1.0, At, v)
    c = 1.0 + ddot(v, Av)
    if Ainv.flags.c_contiguous:
        dger(-1.0 / c, Av, Av, a=At, overwrite_a=True)
    else:
        Ainv -= np.outer(Av, Av) / c
    return Av, c


def with_intercept(X: np.ndarray) -> np.ndarray:
    """``[1, x]`` rows, so the ridge policies learn a bias per operator."""
    out = np.empty((X.shape[0], X.shape[1] + 1))
    out[:, 0] = 1.0
    out[:, 1:] = X
    return out
