"""Sparsification of task vectors, streamed over row chunks (mergekit's ``sparsify.py`` semantics).

- ``magnitude`` (TIES): keep the ``k = max(1, int(density * n))`` largest magnitudes.
- ``magnitude_outliers`` (Model Breadcrumbs): sort magnitudes ascending, drop the ``int(gamma * n)`` largest and
  then the smallest, keeping ``int(density * n)`` entries (fewer outliers are dropped when density + gamma > 1).
- ``random`` (DARE): keep each entry with probability ``density``.
- ``della_magprune`` (DELLA): per row, keep an entry with probability ``density - epsilon + 2 * epsilon * r``
  where ``r`` in [0, 1] is its magnitude rank in the row.

With ``density >= 1`` a task vector is left untouched (no rescaling either). With ``rescale`` the kept entries
are multiplied by ``L1(task vector) / L1(kept)`` unless either norm is below 1e-7 (mergekit's RescaleNorm.l1):
both norms rounded to the working dtype and divided in it, as mergekit does. The working dtype is the compute
dtype, except for DARE and DELLA in float16 on the CPU, where mergekit masks and rescales in float32 (torch has no
float16 ``bernoulli`` there) and rounds the result back.

Magnitudes are those of the task vector in the compute dtype: in bf16 a tensor has a few thousand distinct
magnitudes, so ties at the threshold are the rule, not the exception.

Ties among exactly equal magnitudes: mergekit keeps whichever of them ``torch.argsort`` (an unstable sort) puts
first. Here the rule is that of a stable ascending sort of the magnitudes (TIES keeps its top ``k`` ranks, so the
last tied entries in index order; breadcrumbs its middle ranks), which needs no sort: exact order statistics come
from a strided sample, one counting pass and a selection among the few candidates near the threshold (for
16-bit compute dtypes on the CPU: from one histogram of the 2^15 possible magnitudes per chunk).
``exact_ties`` reproduces mergekit's choice by running the same full argsort (and costs as much).

Why one module of this size: the four sparsifiers share one selection engine (:class:`RankSelect`: exact order
statistics without a sort, ties resolved as a stable sort would), and the threshold rule above is correct only as a
whole; keeping them beside it keeps that rule in one place.
"""

from __future__ import annotations

import math

import numpy as np
from ..lazy import torch

from ..errors import InvalidInput
from .job import TensorJob, scalar, total

#: Tensors up to this many elements get exact order statistics from the whole (materialized) magnitudes.
EXACT_SELECT_MAX = 1 << 16
#: Elements sampled (evenly strided) from larger tensors to bracket each order statistic.
SAMPLE_SIZE = 1 << 16
#: More candidates than this inside a bracket means the sample misled: fall back to the materialized path.
MAX_CANDIDATES = 1 << 23
_RESCALE_EPS = 1e-7
#: The integer dtype of each float dtype's width, by torch's names (torch is imported on first use).
_INT_VIEW = {"bfloat16": "int16", "float16": "int16", "float32": "int32", "float64": "int64"}


def _int_view(dtype):
    return getattr(torch, _INT_VIEW[str(dtype).removeprefix("torch.")])


def below(v: float, dtype: torch.dtype) -> float:
    """The largest value of ``dtype`` under ``v`` (>= 0), or -1 for ``v = 0``: ``|x| > below(v)`` is ``|x| >= v``
    for every ``x`` of that dtype, so ``hardshrink(x, below(v))`` keeps the magnitudes from ``v`` up."""
    if v <= 0:
        return -1.0
    t = torch.tensor(v, dtype=dtype)
    if float(t) != v:  # pragma: no cover - thresholds are values of the tensor's own dtype
        raise ValueError(f"{v!r} is not a {dtype} value")
    return float((t.view(_int_view(dtype)) - 1).view(dtype))


def _kept_above(d: torch.Tensor, v: float) -> torch.Tensor:
    """``d`` where ``|d| > v``, else 0 (one elementwise pass; no boolean mask, which costs several times more)."""
    return torch.nn.functional.hardshrink(d, v) if v >= 0 else d


class _Keys:
    """Magnitudes as sortable keys: the bits of the value without the sign, an integer whose order is that of the
    magnitude (IEEE floats of one sign sort as their bits do). On the CPU keys are numpy arrays: numpy masks,
    compares and counts tens of times faster than torch's integer and boolean ops there (measured on torch
    2.13), and a mask is cheaper than a float ``abs``."""

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype
        self.int_dtype = _int_view(dtype)
        self.mask = (1 << (8 * dtype.itemsize - 1)) - 1

    def of(self, d: torch.Tensor):
        bits = d.reshape(-1).view(self.int_dtype)
        if d.device.type == "cpu":
            return np.bitwise_and(bits.numpy(), self.mask)
        return bits & self.mask

    def value(self, key) -> float:
        """The magnitude whose key is ``key``."""
        return float(torch.tensor(int(key), dtype=self.int_dtype).view(self.dtype))


def _host(x) -> np.ndarray:
    return x if isinstance(x, np.ndarray) else x.cpu().numpy()


def _count(mask) -> int:
    return int(np.count_nonzero(mask)) if isinstance(mask, np.ndarray) else int(torch.count_nonzero(mask))


class _Misled(Exception):
    """The sample's brackets caught too many candidates; the selection restarts on the materialized path."""


class RankSelect:
    """Keep the elements whose rank in ascending magnitude order lies in ``[r_lo, r_hi)``, ties in index order.

    Chunks of the (signed) values arrive in index order, once per pass: :meth:`observe` during the statistics
    pass, then :meth:`finish`, then :meth:`select` of chunk ``ci`` in any later pass. The statistics pass counts
    the keys under a bracket of each cut (from ``sample``) and keeps the few inside it, or (no sample) keeps all
    keys. A selected chunk is the chunk with the dropped entries set to 0, computed with ``hardshrink``; in the
    chunk where a group of equal magnitudes is split between kept and dropped, its kept entries are then put back
    by index.
    """

    def __init__(self, n: int, r_lo: int, r_hi: int, sample: torch.Tensor | None, dtype: torch.dtype,
                 histogram: bool = False):
        self.n, self.r_lo, self.r_hi, self.dtype = n, max(0, r_lo), min(n, r_hi), dtype
        self.keys = _Keys(dtype)
        self.none = self.r_lo >= self.r_hi
        self.all = self.r_lo == 0 and self.r_hi == n
        self.targets = [] if (self.none or self.all) else \
            ([self.r_lo] if self.r_lo > 0 else []) + ([self.r_hi - 1] if self.r_hi < n else [])
        #: 16-bit keys on the CPU: one histogram of the 2^15 magnitudes per chunk gives every order statistic
        #: exactly in one counting pass (no sample, no brackets, no candidates kept)
        self._hist = histogram and dtype.itemsize == 2
        self._materialize = sample is None and not self._hist
        self._stored: dict[int, np.ndarray] = {}
        self._brackets = []
        if not self._materialize and not self._hist and self.targets:
            s = _host(self.keys.of(sample.to(dtype)))
            ms = s.size
            bounds = []
            for r in self.targets:
                q = (r + 0.5) / n
                j, spread = q * ms, 6.0 * math.sqrt(ms * q * (1 - q)) + 16
                bounds.append((math.floor(j - spread), math.ceil(j + spread)))
            inner = sorted({i for pair in bounds for i in pair if 0 <= i < ms})
            s = np.partition(s, inner) if inner else s  # the sample's order statistics at the bracket ends
            for lo_i, hi_i in bounds:
                self._brackets.append({"lo": s[lo_i].item() if lo_i >= 0 else None,
                                       "hi": s[hi_i].item() if hi_i < ms else None,
                                       "below": 0, "inside": {}, "n_inside": 0})
        self.groups: list[dict] = []
        self._lo = self._hi = None

    @property
    def needs_stats(self) -> bool:
        return bool(self.targets)

    def observe(self, ci: int, d: torch.Tensor) -> None:
        if not self.targets:
            return
        k = self.keys.of(d)
        if self._hist:
            self._stored[ci] = np.bincount(_host(k), minlength=1 << 15)
            return
        if self._materialize:
            self._stored[ci] = _host(k).copy()
            return
        for b in self._brackets:
            lo, hi = b["lo"], b["hi"]
            if lo is not None:
                b["below"] += _count(k < lo)
            inside = (k >= lo) if lo is not None else None
            if hi is not None:
                inside = (k <= hi) if inside is None else inside & (k <= hi)
            cand = _host(k[inside] if inside is not None else k).copy()
            b["inside"][ci] = cand
            b["n_inside"] += cand.size
            if b["n_inside"] > MAX_CANDIDATES:
                raise _Misled

    def finish(self) -> bool:
        """Compute the order statistics. False when the sample's brackets missed (observe again, materialized)."""
        if not self.targets:
            self._build([], {})
            return True
        if self._hist:
            counts = np.sum(list(self._stored.values()), axis=0)
            cum = np.cumsum(counts)
            stats = []
            for r in self.targets:
                v = int(np.searchsorted(cum, r, side="right"))  # the first key with more than r entries up to it
                stats.append((v, int(cum[v - 1]) if v else 0, int(counts[v])))
            per_chunk = {v: {ci: int(h[v]) for ci, h in self._stored.items()} for v, _, _ in stats}
            self._stored = {}
        elif not self._materialize:
            stats = [self._from_bracket(b, r) for b, r in zip(self._brackets, self.targets)]
            if any(s is None for s in stats):
                return False
            # Per chunk, how many entries hold each cut value (they all lie in the chunk's candidates).
            per_chunk = {v: {ci: _count(c == v) for ci, c in b["inside"].items()}
                         for (v, _, _), b in zip(stats, self._brackets)}
            self._brackets = []
        else:
            keys = np.concatenate([self._stored[ci] for ci in sorted(self._stored)])
            stats = []
            for r in self.targets:
                v = np.partition(keys, r)[r].item()
                stats.append((v, _count(keys < v), _count(keys == v)))
            per_chunk = {v: {ci: _count(c == v) for ci, c in self._stored.items()} for v, _, _ in stats}
            self._stored = {}
        self._build(stats, per_chunk)
        return True

    @staticmethod
    def _from_bracket(b: dict, r: int):
        """(key at rank r, count below it, count equal to it) from the bracket's candidates, or None."""
        cand = np.concatenate(list(b["inside"].values()))
        pos = r - b["below"]
        if pos < 0 or pos >= cand.size:
            return None
        v = np.partition(cand, pos)[pos].item()
        # Every key equal to v lies inside the (inclusive) bracket, so these counts are exact.
        return v, b["below"] + _count(cand < v), _count(cand == v)

    def _build(self, stats: list, per_chunk: dict) -> None:
        """Tie groups: the entries whose key is a cut value, of which those with tie index in [j0, j1) are kept."""
        a = z = None
        it = iter(stats)
        if self.targets and self.targets[0] == self.r_lo and self.r_lo > 0:
            a = next(it)
        if self.r_hi < self.n and not (self.none or self.all):
            z = next(it)
        self._lo = a[0] if a else None   # kept: keys above it (its ties by group)
        self._hi = z[0] if z else None   # kept: keys under it (its ties by group)
        groups = []
        if a and z and a[0] == z[0]:
            groups.append({"v": a[0], "j0": self.r_lo - a[1], "j1": self.r_hi - a[1], "end": "both"})
        else:
            if a:
                groups.append({"v": a[0], "j0": self.r_lo - a[1], "j1": a[2], "end": "lo"})
            if z:
                groups.append({"v": z[0], "j0": 0, "j1": self.r_hi - z[1], "end": "hi"})
        for g in groups:  # tie index of each chunk's first tied entry
            counts = per_chunk.get(g["v"], {})
            g["count"], g["start"], seen = counts, {}, 0
            g["value"] = self.keys.value(g["v"])
            for ci in sorted(counts):
                g["start"][ci] = seen
                seen += counts[ci]
        self.groups = groups

    def select(self, ci: int, d: torch.Tensor) -> torch.Tensor:
        """Chunk ``ci`` of the values with every entry outside the rank range set to 0."""
        if self.all:
            return d
        if self.none:
            return torch.zeros_like(d)
        lo_thr = hi_thr = None
        if self._lo is not None:
            lo_thr = self.keys.value(self._lo)
        if self._hi is not None:
            hi_thr = self.keys.value(self._hi)
        split = []
        for g in self.groups:
            s, c = g["start"].get(ci, 0), g["count"].get(ci, 0)
            if g["j0"] <= s and s + c <= g["j1"]:
                kept = True
            elif s + c <= g["j0"] or s >= g["j1"]:
                kept = False
            else:  # split in this chunk: dropped by the thresholds, its kept entries put back below
                kept = False
                split.append((g, max(g["j0"] - s, 0), min(g["j1"] - s, c)))
            if g["end"] in ("lo", "both"):
                lo_thr = below(g["value"], d.dtype) if kept else g["value"]
            if g["end"] in ("hi", "both"):
                hi_thr = g["value"] if kept else below(g["value"], d.dtype)
        if lo_thr is not None and hi_thr is not None and hi_thr <= lo_thr:
            out = torch.zeros_like(d)
        else:
            out = _kept_above(d, lo_thr) if lo_thr is not None else d
            out = out - _kept_above(d, hi_thr) if hi_thr is not None else out
        if split:
            # The tied entries kept are the a-th to b-th of the chunk's entries of that magnitude (index order):
            # found on the keys (a numpy compare) instead of a boolean mask over the whole chunk.
            k = _host(self.keys.of(d))
            flat_out, flat_d = out.view(-1), d.reshape(-1)
            for g, a, b in split:
                if b > a:
                    idx = torch.from_numpy(np.flatnonzero(k == g["v"])[a:b]).to(d.device)
                    flat_out[idx] = flat_d[idx]
        return out

# ---- per-model sparsifiers -------------------------------------------------------------------------------------

class Sparsifier:
    """One model's sparsification for one tensor. Passes over the chunks, each in index order:

    1. when ``needs_stats``: ``observe`` every chunk, then ``finish_stats``;
    2. when ``needs_kept_pass``: ``observe_kept`` every chunk (the L1 norm of what is kept);
    3. ``finish_scale``, then ``apply`` every chunk: the masked, rescaled task-vector chunk (the input itself
       or a new tensor; the input is not modified).

    Chunks are given as (index, first row, end row, task-vector rows in the compute dtype); ``begin_pass``
    precedes each pass.
    """

    needs_stats = False
    needs_kept_pass = False
    whole = False

    def __init__(self, job: TensorJob, model: int, p: dict, rescale: bool):
        self.job, self.model, self.p, self.rescale = job, model, p, rescale
        self.n = job.numel
        self._l1 = 0.0
        self._kept = 0.0
        self.scale: torch.Tensor | None = None
        self.work = self.work_dtype(job)

    @staticmethod
    def work_dtype(job: TensorJob) -> torch.dtype:
        """The dtype masks are applied and rescaled in (mergekit: the task vector's own)."""
        return job.dtype

    def begin_pass(self) -> None:
        pass

    def observe(self, ci: int, lo: int, hi: int, d: torch.Tensor) -> None:
        pass

    def finish_stats(self) -> None:
        pass

    def observe_kept(self, ci: int, lo: int, hi: int, d: torch.Tensor) -> None:
        self._kept += total(self.masked(ci, lo, hi, d).abs())  # (masked may return d itself: not in place)

    def finish_scale(self) -> None:
        """mergekit's ``rescaled_masked_tensor``: both L1 norms in the working dtype, their quotient in it."""
        if not self.rescale:
            return
        before, after = scalar(self._l1, self.work), scalar(self._kept, self.work)
        if before < _RESCALE_EPS or after < _RESCALE_EPS:
            return
        scale = before / after
        if not bool(torch.isfinite(scale)):
            raise InvalidInput(f"tensor {self.job.name!r}: the L1 norm of a task vector overflows {self.work} "
                               f"(mergekit would write NaN here); compute in float32 (--compute-dtype float32)")
        self.scale = scale.to(self.job.device)

    def apply(self, ci: int, lo: int, hi: int, d: torch.Tensor) -> torch.Tensor:
        x = self.masked(ci, lo, hi, d)
        if self.scale is not None:
            x = x * self.scale
        return x if x.dtype == d.dtype else x.to(d.dtype)

    def masked(self, ci: int, lo: int, hi: int, d: torch.Tensor) -> torch.Tensor:
        """The chunk masked, in the working dtype (a new tensor, or ``d`` itself when nothing is dropped)."""
        raise NotImplementedError


class Identity(Sparsifier):
    """density >= 1: mergekit returns the task vector unchanged (and does not rescale)."""

    def apply(self, ci: int, lo: int, hi: int, d: torch.Tensor) -> torch.Tensor:
        return d


class _Selecting(Sparsifier):
    """Magnitude-rank selection (TIES, breadcrumbs): a statistics pass finds the exact thresholds."""

    needs_stats = True

    def __init__(self, job, model, p, rescale):
        super().__init__(job, model, p, rescale)
        self.needs_kept_pass = rescale
        self.r_lo, self.r_hi = self.rank_range()
        self._full_mask: torch.Tensor | None = None
        self._misled = False
        self.sel: RankSelect | None = None
        if job.exact_ties:
            self._abs: list[torch.Tensor] = []
            return
        sample = None
        histogram = self.n > EXACT_SELECT_MAX and job.dtype.itemsize == 2 and job.device.type == "cpu"
        if self.n > EXACT_SELECT_MAX and not histogram:
            size = max(4096, min(SAMPLE_SIZE, self.n // 32))
            idx = (torch.arange(size, dtype=torch.float64) * (self.n / size)).long()
            sample = job.models[model].gather(idx) - job.base.gather(idx)
        self.sel = RankSelect(self.n, self.r_lo, self.r_hi, sample, job.dtype, histogram=histogram)

    def rank_range(self) -> tuple[int, int]:
        raise NotImplementedError

    def observe(self, ci: int, lo: int, hi: int, d: torch.Tensor) -> None:
        if self.rescale:
            self._l1 += total(d.abs())
        if self.sel is None:
            self._abs.append(d.abs().reshape(-1))
        elif not self._misled:
            try:
                self.sel.observe(ci, d)
            except _Misled:
                self._misled = True

    def finish_stats(self) -> None:
        if self.sel is None:
            w = torch.cat(self._abs)
            self._abs = []
            # mergekit sorts float32 magnitudes on the CPU and the compute dtype's on a GPU.
            self._full_mask = self.mergekit_mask(w.float() if w.device.type == "cpu" else w)
            return
        if self._misled or not self.sel.finish():
            # The strided sample bracketed the wrong values (structured data): redo it exactly.
            job, i = self.job, self.model
            self.sel = RankSelect(self.n, self.r_lo, self.r_hi, None, job.dtype)
            for ci, (lo, hi) in enumerate(job.chunks()):
                self.sel.observe(ci, job.model_rows(i, lo, hi) - job.base_rows(lo, hi))
            self.sel.finish()

    def masked(self, ci: int, lo: int, hi: int, d: torch.Tensor) -> torch.Tensor:
        if self._full_mask is not None:
            rl = self.job.row_len
            return d * self._full_mask[lo * rl:hi * rl].view(d.shape)
        return self.sel.select(ci, d)

    def mergekit_mask(self, w: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class Magnitude(_Selecting):
    """TIES: keep the k = max(1, int(density * n)) largest magnitudes."""

    def rank_range(self) -> tuple[int, int]:
        # The top k of an ascending (stable) order of magnitudes: among equal magnitudes at the threshold the
        # last ones in index order are kept.
        self.k = max(1, int(self.p["density"] * self.n))
        return self.n - self.k, self.n

    def mergekit_mask(self, w: torch.Tensor) -> torch.Tensor:
        mask = torch.zeros(w.numel(), dtype=torch.bool, device=w.device)
        mask[torch.argsort(w, descending=True)[:self.k]] = True
        return mask


class Outliers(_Selecting):
    """Model Breadcrumbs: keep ascending ranks [n_bot, n_bot + int(density * n))."""

    def rank_range(self) -> tuple[int, int]:
        self.target = int(self.p["density"] * self.n)
        top = int(self.p["gamma"] * self.n)
        self.n_bot = max(0, self.n - self.target - top)
        return self.n_bot, self.n_bot + self.target

    def mergekit_mask(self, w: torch.Tensor) -> torch.Tensor:
        mask = torch.zeros(w.numel(), dtype=torch.bool, device=w.device)
        idx = torch.sort(w, descending=False).indices
        mask[idx[self.n_bot:self.n_bot + self.target]] = True
        return mask


class Random(Sparsifier):
    """DARE: keep each entry with probability density (a seeded Bernoulli mask per chunk).

    With rescaling, the statistics pass draws the masks and keeps them (one byte per entry) for the output
    pass, since drawing is the costliest step; the draws are the same either way.
    """

    def __init__(self, job, model, p, rescale):
        super().__init__(job, model, p, rescale)
        self.needs_stats = rescale
        self._saved: dict[int, torch.Tensor] = {}

    @staticmethod
    def work_dtype(job: TensorJob) -> torch.dtype:
        # mergekit: "torch.bernoulli not implemented for float16 on CPU, upcast to float32" (and likewise for
        # every dtype but bf16 on the CPU).
        if job.device.type != "cpu" or job.dtype == torch.bfloat16:
            return job.dtype
        return torch.float32

    def observe(self, ci: int, lo: int, hi: int, d: torch.Tensor) -> None:
        a = d.to(self.work).abs_() if d.dtype != self.work else d.abs()
        m = self._draw(ci, lo, hi, d)
        self._saved[ci] = m
        self._l1 += total(a)
        self._kept += total(a * m)

    def _probs(self, d: torch.Tensor):
        # mergekit draws with probabilities held in the working dtype (density 0.3 is 0.30078125 in bf16).
        return float(scalar(self.p["density"], self.work))

    def _draw(self, ci: int, lo: int, hi: int, d: torch.Tensor) -> torch.Tensor:
        """The keep-mask of chunk ``ci`` (rows ``[lo, hi)``)."""
        u = torch.rand(d.shape, generator=self.job.generator(self.model, ci), device=d.device)
        return u < self._probs(d)

    def masked(self, ci: int, lo: int, hi: int, d: torch.Tensor) -> torch.Tensor:
        m = self._saved.pop(ci, None)
        if m is None:
            m = self._draw(ci, lo, hi, d)
        return (d.to(self.work) if d.dtype != self.work else d) * m


class Della(Random):
    """DELLA: per-row magnitude ranks set each entry's keep probability in [density - eps, density + eps]."""

    def __init__(self, job, model, p, rescale):
        super().__init__(job, model, p, rescale)
        # mergekit ranks along dim 1 of the tensor as it is: for 3-D and larger tensors that is not the row.
        self.whole = len(job.shape) >= 3

    def _probs(self, d: torch.Tensor) -> torch.Tensor:
        dens, eps = self.p["density"], self.p["epsilon"]
        x = d.view(self.job.shape) if self.whole else d
        dim = 1 if self.whole else -1
        length = x.shape[dim]
        if length <= 1:
            # mergekit divides 0 by 0 here (and fails); a lone entry gets the middle probability.
            return torch.full(d.shape, dens, device=d.device)
        # mergekit's ranks, in the working dtype (where bf16 rounds ranks above 256): 1 + the position in an
        # ascending argsort, scaled to [0, 1] by the row's smallest and largest rank.
        ranks = torch.argsort(torch.argsort(x.abs(), dim=dim), dim=dim).to(self.work) + 1
        lo, hi = ranks.min(dim=dim, keepdim=True).values, ranks.max(dim=dim, keepdim=True).values
        rank_norm = ((ranks - lo) / (hi - lo)).clamp(0, 1)
        probs = (dens - eps) + rank_norm * 2 * eps
        return probs.view(d.shape)


SPARSIFIERS = {"magnitude": Magnitude, "magnitude_outliers": Outliers, "random": Random,
               "della_magprune": Della}


def make(kind: str | None, job: TensorJob, model: int, p: dict, rescale: bool) -> Sparsifier:
    """The sparsifier of model ``model`` for this tensor (Identity when there is nothing to drop)."""
    if kind is None or p.get("density", 1.0) >= 1:
        return Identity(job, model, p, rescale)
    return SPARSIFIERS[kind](job, model, p, rescale)
