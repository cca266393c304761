"""The generic task-arithmetic engine that task_arithmetic, ties, dare_*, breadcrumbs* and della* configure.

Per tensor, as mergekit's ``GeneralizedTaskArithmeticMerge`` (0.1.5), every operation in the compute dtype
(the weights too are rounded to it), in mergekit's order, so that each element gets mergekit's value bit for bit:

1. task vectors ``d_i = x_i - base``, each sparsified (:mod:`.sparsify`) with its model's density / gamma /
   epsilon, rescaled to its L1 norm when ``rescale``;
2. weighted: ``d_i *= weight_i``;
3. with sign consensus (``sum``, TIES): the majority sign is the sign of ``sum_i d_i`` (0 counts as +), entries
   that disagree with it are dropped, and the divisor is the sum of the weights of the entries kept (0 -> 1);
   without: the divisor is the sum of all weights (|sum| < 1e-8 -> 1);
4. ``mixed = sum_i d_i``, divided by the divisor when ``normalize``, times ``lambda``;
5. ``base + mixed``.
"""

from __future__ import annotations

from ..lazy import torch

from . import fused, sparsify
from .base import MethodSpec
from .job import TensorJob

#: Largest size (bytes) of one tensor's task vectors kept between passes.
DELTA_CACHE_BYTES = 256 << 20


def kernel(spec: MethodSpec, job: TensorJob) -> None:
    """Merge one tensor with the task-arithmetic family member ``spec``."""
    if fused.ties(spec, job):  # TIES in bf16 / float32 on the CPU: compiled loops, the same bits
        return
    m = len(job.models)
    glob = job.params
    sps = [sparsify.make(spec.sparsification, job, i, mp, glob["rescale"])
           for i, mp in enumerate(job.model_params)]
    chunks = job.chunks(whole=any(s.whole for s in sps))
    # Task vectors computed by the statistics pass are kept for the later passes when they fit the budget (the
    # subtraction is one of the costlier steps in half precision, and the inputs are then read once).
    cache: dict | None = {} if m * job.numel * job.dtype.itemsize <= DELTA_CACHE_BYTES else None

    def delta(i, ci, lo, hi, b):
        if cache is not None and (i, ci) in cache:
            return cache[(i, ci)]
        d = job.model_rows(i, lo, hi) - b
        if cache is not None:
            cache[(i, ci)] = d
        return d

    def deltas_pass(fn, which):
        for s in which:
            s.begin_pass()
        for ci, (lo, hi) in enumerate(chunks):
            b = job.base_rows(lo, hi)
            for s in which:
                fn(s, ci, lo, hi, delta(s.model, ci, lo, hi, b))

    stats = [s for s in sps if s.needs_stats]
    if stats:
        deltas_pass(lambda s, *a: s.observe(*a), stats)
        for s in stats:
            s.finish_stats()
    kept = [s for s in sps if s.needs_kept_pass]
    if kept:
        deltas_pass(lambda s, *a: s.observe_kept(*a), kept)
    for s in sps:
        s.finish_scale()
        s.begin_pass()

    cd, dev = job.dtype, job.device
    acc = torch.float64 if cd == torch.float64 else torch.float32
    weights = torch.tensor([mp["weight"] for mp in job.model_params], dtype=cd, device=dev)
    ws = list(weights.unbind(0))
    unit = [float(x) == 1.0 for x in ws]
    plain_divisor = weights.sum()
    if plain_divisor.abs() < 1e-8:
        plain_divisor = torch.ones((), dtype=cd, device=dev)
    positive = all(float(x) > 0 for x in ws)
    lam = glob["lambda"]
    for ci, (lo, hi) in enumerate(chunks):
        b = job.base_rows(lo, hi)
        ds = []
        for i, s in enumerate(sps):
            d = s.apply(ci, lo, hi, cache.pop((i, ci)) if cache and (i, ci) in cache else job.model_rows(i, lo, hi) - b)
            ds.append(d if unit[i] else d * ws[i])
        if spec.consensus == "sum":
            mixed, divisor = _elect(ds, ws, unit, positive, glob["normalize"], cd, acc)
        else:
            mixed, divisor = _sum(ds, cd, acc), plain_divisor
        del ds
        if glob["normalize"]:
            mixed = mixed / divisor
        if lam != 1:
            mixed *= lam
        job.write(lo, hi, b + mixed)


def _sum(xs: list[torch.Tensor], cd: torch.dtype, acc: torch.dtype) -> torch.Tensor:
    """mergekit's ``stack(xs).sum(dim=0)``: accumulated in float32 (in order) and rounded once to ``cd``. Two
    terms need no accumulator: their sum in ``cd`` is that rounding. (Sums over the first dimension of a stacked
    tensor are several times slower on the CPU than these additions.)"""
    if len(xs) == 1:
        return xs[0].to(cd)
    if len(xs) == 2 and xs[0].dtype == xs[1].dtype:
        return (xs[0] + xs[1]).to(cd)
    total = xs[0].to(acc) + xs[1]
    for x in xs[2:]:
        total += x
    return total.to(cd)


def _elect(ds, ws, unit, positive, normalize, cd, acc):
    """TIES sign election, as mergekit's ``get_mask(..., "sum")``: the majority sign is that of the sum of the
    weighted deltas (0 counts as +); entries of the other sign, and zeros, are dropped; the divisor is the sum of
    the weights of the entries kept (0 -> 1). Returns (mixed, divisor), both in ``cd``.

    Written without boolean masks: with ``maj = copysign(1, sum)``, ``relu(d_i * maj)`` is ``|d_i|`` where
    ``d_i`` is kept and 0 elsewhere, its sign is the keep indicator, and the kept sum is ``maj`` times the sum of
    those magnitudes (exact: multiplying by +-1 and rounding commute).
    """
    if acc.itemsize > cd.itemsize:
        # A half-precision compute dtype: every step up to the kept sum is exact in float32 (the sign of a sum,
        # sign flips, relu), and the kept sum is float32 rounded once to cd, as in cd; so it all runs on
        # float32 copies, in place: one conversion per delta instead of half-precision operations (each an
        # upcast, the operation and a rounding) and a conversion of the keep indicators.
        kept = [d.to(acc) for d in ds]
        maj = torch.copysign(torch.ones((), dtype=acc, device=ds[0].device), _sum_exact_sign(kept, acc))
        for k in kept:
            k.mul_(maj).clamp_(min=0)
        mixed = _sum_exact_sign(kept, acc).mul_(maj).to(cd)
        ind = kept
    else:
        maj = torch.copysign(torch.ones((), dtype=ds[0].dtype, device=ds[0].device), _sum(ds, cd, acc)
                             if len(ds) < 3 else _sum_exact_sign(ds, acc))
        kept = [(d * maj).clamp_(min=0) for d in ds]
        mixed = _sum(kept, cd, acc) * maj.to(cd)
        ind = [k.to(acc) for k in kept]
    if not normalize:
        return mixed, None
    # The keep indicators in the accumulation dtype (sign() of a half-precision tensor is several times slower),
    # weighted by the weights as the compute dtype holds them; their sum rounded to it, as mergekit's.
    ind = [i.sign_() if u else i.sign_().mul_(w) for i, w, u in zip(ind, ws, unit)]
    divisor = _sum(ind, cd, acc)
    if positive:  # a zero divisor comes with a zero sum there: any positive divisor gives mergekit's 0 / 1
        divisor.clamp_(min=torch.finfo(cd).tiny)
    else:
        divisor = torch.where(divisor == 0, torch.ones((), dtype=cd, device=divisor.device), divisor)
    return mixed, divisor


def _sum_exact_sign(ds, acc):
    """The sum of the deltas in the accumulation dtype, in order (a new tensor; its sign is mergekit's majority
    sign, and rounded once to the compute dtype it is mergekit's sum)."""
    if len(ds) == 1:
        return ds[0].to(acc, copy=True)
    total = ds[0].to(acc) + ds[1]
    for d in ds[2:]:
        total += d
    return total
