"""TIES on the CPU as compiled loops (numba): two passes over the data instead of thirty.

:mod:`.generalized` runs TIES as about thirty torch and numpy operations per chunk, each a pass over memory.
Here the same arithmetic runs in two compiled passes (:mod:`._fused_loops`): one counts each model's task-vector
magnitudes (a histogram of their keys, from which every model's exact cut follows), the other masks, weighs,
elects the sign, mixes and adds the base, block by block, writing each output chunk. It covers what published
TIES configs use: ``ties`` (magnitude sparsification, ``sum`` consensus, no rescaling) computed in bfloat16 or
float32 on the CPU, every model stored in one of those two dtypes, without ``exact_ties``, tensors of at least
:data:`MIN_ELEMENTS`. Anything else runs the generic kernel.

The results are the generic kernel's, bit for bit (tests compare the two paths): every operation is done in
float32 and rounded to the compute dtype where the generic kernel rounds (bfloat16 rounding is done on the float32
bits, to nearest even, as torch does), sums run in the same order, and each model keeps the same entries: its
``k`` largest magnitudes, among equal magnitudes at the cut the last ones in index order (a stable sort's choice).
That choice needs the position of one tied entry per model, found by one scan of the part of the tensor that holds
it. NaN or Inf in an input is refused, as everywhere.

Keys: a magnitude's key is the value's bits without the sign (an integer that orders as the magnitude does). A
bfloat16 key has 15 bits, so one histogram of 2^15 counts gives the cut exactly; a float32 key has 31, so its
histogram counts the top 15 bits and a second count, over the bucket that holds the cut, the low 16.

Threads: torch's intra-op thread count (the executor's ``threads``) sets how many threads count the parts of a
tensor and merge the pieces of a chunk; the loops release the GIL. numba compiles the loops on first use (tens of
seconds, once: the machine code is cached beside the package) and a process loads them on its first TIES tensor.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from ..lazy import torch

from ..errors import InvalidInput
from .base import MethodSpec
from .job import TensorJob

#: Switch for tests and debugging: False runs the generic kernel for everything.
ENABLED = True
#: Smaller tensors run the generic kernel: they gain nothing here, and a process that merges only small tensors
#: (the micro-zoo's) then never loads numba.
MIN_ELEMENTS = 1 << 18
#: Elements per part of the counting pass (one histogram per part and model; finding where a model's kept entries at
#: its cut begin reads one part), at most MAX_PARTS parts per tensor.
PART_ELEMENTS = 1 << 20
MAX_PARTS = 64
#: How each supported dtype is stored in the loops' arrays, by torch's name (torch is imported on first use).
_STORE = {"bfloat16": np.uint16, "float32": np.float32}


def _stored(dtype) -> type | None:
    """The numpy storage of torch ``dtype`` in the loops, or None when they do not take it."""
    return _STORE.get(str(dtype).removeprefix("torch."))

_kernels = None
_pool: ThreadPoolExecutor | None = None
_pool_size = 0
_lock = threading.Lock()


def applies(spec: MethodSpec, job: TensorJob) -> bool:
    """Whether this tensor's merge runs here (else the generic kernel runs it)."""
    if not ENABLED or job.numel < MIN_ELEMENTS or spec.sparsification != "magnitude" or spec.consensus != "sum":
        return False
    if job.device.type != "cpu" or _stored(job.dtype) is None or job.exact_ties or job.params.get("rescale"):
        return False
    if job.base is None or not job.models:
        return False
    dtypes = {s.data.dtype for s in [*job.models, job.base]}
    if len(dtypes) != 1 or _stored(next(iter(dtypes))) is None:
        return False
    return all(s.data.device.type == "cpu" and s.data.is_contiguous() for s in [*job.models, job.base])


def ties(spec: MethodSpec, job: TensorJob) -> bool:
    """Merge ``job`` here when :func:`applies`; returns whether it did."""
    if not applies(spec, job):
        return False
    k = _compiled()
    cd, row_len = job.dtype, job.row_len
    xs = k.models([_array(s.data) for s in job.models])
    base = _array(job.base.data)
    o = np.empty(0, dtype=_stored(cd))  # selects the compute dtype in the compiled code
    workers = max(1, torch.get_num_threads())
    cuts, ties_from = _cuts(k, job, base, xs, o, workers)
    weights = torch.tensor([mp["weight"] for mp in job.model_params], dtype=cd)
    unit = np.array([float(w) == 1.0 for w in weights], dtype=np.bool_)
    positive = bool(all(float(w) > 0 for w in weights))
    ws = weights.float().numpy()
    lam = float(job.params["lambda"])
    normalize = bool(job.params["normalize"])

    def apply(piece):
        out, lo, hi, at = piece
        return k.ties(base, xs, out[at:at + hi - lo], lo, hi, cuts, ties_from, ws, unit, normalize, positive,
                      np.float32(lam), lam != 1)

    for lo, hi in job.chunks():
        out = torch.empty((hi - lo) * row_len, dtype=cd)
        a, e = lo * row_len, hi * row_len
        step = max(1 << 16, -(-(e - a) // workers))  # the chunk split among the threads
        arr = _array(out)
        pieces = [(arr, p, min(p + step, e), p - a) for p in range(a, e, step)]
        for bad in _map(apply, pieces, workers):
            if bad:
                _refuse(job, bad)
        job.write(lo, hi, out.view(hi - lo, row_len))
    return True


def _cuts(k, job: TensorJob, base, xs, o, workers: int) -> tuple[np.ndarray, np.ndarray]:
    """Each model's cut key and the flat index from which its entries at the cut are kept (both 0: it keeps
    every entry). TIES keeps a model's ``k = max(1, int(density * n))`` largest magnitudes: ranks from
    ``r = n - k`` up in ascending order, so the cut is the key at rank ``r``, the entries above it are kept,
    and of those at it (in index order) all but the first ``r - (entries below it)``."""
    n = job.numel
    m = len(xs)
    cuts = np.zeros(m, dtype=np.int64)
    ties_from = np.zeros(m, dtype=np.int64)
    stats = []
    for i, mp in enumerate(job.model_params):
        r = n - max(1, int(mp["density"] * n))
        if mp["density"] < 1 and r > 0:
            stats.append((i, r))
    if not stats:
        return cuts, ties_from
    size = max(1 << 16, min(PART_ELEMENTS, -(-n // workers)), -(-n // MAX_PARTS))
    parts = [(lo, min(lo + size, n)) for lo in range(0, n, size)]
    sx = k.models([xs[i] for i, _ in stats])
    bf16 = job.dtype == torch.bfloat16
    hist = np.zeros((len(parts), len(stats), 1 << 15), dtype=np.int32)

    def count(pi):
        bad = k.count(base, sx, o, parts[pi][0], parts[pi][1], 0 if bf16 else 16, hist[pi])
        return 2 + stats[bad - 2][0] if bad >= 2 else bad

    for bad in _map(count, range(len(parts)), workers):
        if bad:
            _refuse(job, bad)
    # bfloat16 keys have 15 bits: the histogram holds them whole. float32 keys have 31: it holds their top 15
    # bits, and a second count the low 16 of those in the bucket that holds rank r.
    below, per_part, tops = [], [], np.zeros(len(stats), dtype=np.int64)
    for si, (i, r) in enumerate(stats):
        cum = np.cumsum(hist[:, si].sum(axis=0, dtype=np.int64))
        top = int(np.searchsorted(cum, r, side="right"))  # the first key with more than r entries up to it
        below.append(int(cum[top - 1]) if top else 0)
        cuts[i], tops[si] = top, top
        per_part.append(hist[:, si, top].astype(np.int64))
    if not bf16:
        low_hist = np.zeros((len(parts), len(stats), 1 << 16), dtype=np.int32)
        _map_all(lambda pi: k.count_low(base, sx, o, parts[pi][0], parts[pi][1], tops, low_hist[pi]),
                 range(len(parts)), workers)
        for si, (i, r) in enumerate(stats):
            cum = np.cumsum(low_hist[:, si].sum(axis=0, dtype=np.int64))
            low = int(np.searchsorted(cum, r - below[si], side="right"))
            below[si] += int(cum[low - 1]) if low else 0
            cuts[i] = (int(tops[si]) << 16) | low
            per_part[si] = low_hist[:, si, low].astype(np.int64)
    for si, (i, r) in enumerate(stats):
        drop = r - below[si]  # entries at the cut that are dropped, the first ones in index order
        seen = np.cumsum(per_part[si])
        pi = int(np.searchsorted(seen, drop, side="right"))  # the part holding the first one kept
        t = drop - (int(seen[pi - 1]) if pi else 0)
        pos = k.nth(base, xs[i], o, parts[pi][0], parts[pi][1], int(cuts[i]), t)
        if pos < 0:  # pragma: no cover - the counts say the entry is there
            raise RuntimeError(f"tensor {job.name!r}: the entry at the cut was not found")
        ties_from[i] = pos
    return cuts, ties_from


def warm_up(cases=None) -> float:
    """Compile the loops (or load them from numba's cache) for each (stored dtype, compute dtype) in ``cases``
    (default: every pair of bfloat16 and float32) by merging a small tensor; returns the seconds it took. The
    first TIES merge does this itself; benchmarks call it to time merges, not compilers."""
    import time

    if cases is None:
        cases = [(getattr(torch, a), getattr(torch, b)) for a in _STORE for b in _STORE]

    from .job import merge_tensors

    global MIN_ELEMENTS
    t = time.perf_counter()
    old, MIN_ELEMENTS = MIN_ELEMENTS, 0
    try:
        g = torch.Generator().manual_seed(0)
        for stored, compute in cases:
            base = torch.randn(64, 64, generator=g).to(stored)
            models = [(base.float() + 0.01 * torch.randn(64, 64, generator=g)).to(stored) for _ in range(2)]
            merge_tensors("ties", models, base, {"density": 0.5, "weight": [1.0, 0.5]}, compute_dtype=compute)
    finally:
        MIN_ELEMENTS = old
    return time.perf_counter() - t


def _array(t: torch.Tensor) -> np.ndarray:
    """A tensor's memory as numpy (bfloat16 as its uint16 bits)."""
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(np.uint16)
    return t.numpy()


def _refuse(job: TensorJob, code: int):
    """Raise for a non-finite input: ``code`` 1 is the base, ``2 + i`` model ``i``."""
    who = job.base.label if code == 1 else job.models[code - 2].label
    raise InvalidInput(f"tensor {job.name!r} of {who} contains NaN or Inf values")


def _map(fn, items, workers: int):
    """``map`` in order, over ``workers`` threads when more than one."""
    if workers <= 1:
        return map(fn, items)
    return _executor(workers).map(fn, items)


def _map_all(fn, items, workers: int) -> None:
    for _ in _map(fn, items, workers):
        pass


def _executor(workers: int) -> ThreadPoolExecutor:
    global _pool, _pool_size
    with _lock:
        if _pool is None or _pool_size != workers:
            if _pool is not None:
                _pool.shutdown(wait=False)
            _pool, _pool_size = ThreadPoolExecutor(workers, thread_name_prefix="simmerge-ties"), workers
        return _pool


def _compiled():
    """The compiled loops (numba is imported, and its cached machine code loaded, on first use)."""
    global _kernels
    if _kernels is None:
        with _lock:
            if _kernels is None:
                from . import _fused_loops

                _kernels = _fused_loops
    return _kernels
