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

import torch

from . import sparsify
from .base import MethodSpec
from .job import TensorJob


def kernel(spec: MethodSpec, job: TensorJob) -> None:
    """Merge one tensor with the task-arithmetic family member ``spec``."""
    m = len(job.models)
    glob = job.params
    sps = [sparsify.make(spec.sparsification, job, i, mp, glob["rescale"])
           for i, mp in enumerate(job.model_params)]
    chunks = job.chunks(whole=any(s.whole for s in sps))

    def deltas_pass(fn, which):
        for s in which:
            s.begin_pass()
        for ci, (lo, hi) in enumerate(chunks):
            b = job.base_rows(lo, hi)
            for s in which:
                fn(s, ci, lo, hi, job.model_rows(s.model, lo, hi) - b)

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

    cd = job.dtype
    weights = torch.tensor([mp["weight"] for mp in job.model_params], dtype=cd, device=job.device)
    w = weights.view(m, 1, 1)
    plain_divisor = weights.sum()
    if plain_divisor.abs() < 1e-8:
        plain_divisor = torch.ones((), dtype=cd, device=job.device)
    lam = glob["lambda"]
    for ci, (lo, hi) in enumerate(chunks):
        b = job.base_rows(lo, hi)
        d = torch.empty((m, hi - lo, job.row_len), dtype=cd, device=job.device)
        for i, s in enumerate(sps):
            torch.sub(job.model_rows(i, lo, hi), b, out=d[i])
            s.apply(ci, lo, hi, d[i])
        d.mul_(w)
        if spec.consensus == "sum":
            # sign(d) == majority  <=>  d * majority > 0 (majority is +-1, so the product is exact; 0 drops).
            # (torch.where with scalars is several times slower on the CPU than these in-place forms.)
            majority = (d.sum(dim=0) >= 0).to(cd).mul_(2).sub_(1)
            keep = (d * majority) > 0
            mixed = d.mul_(keep).sum(dim=0)
            divisor = (w * keep).sum(dim=0)
            divisor.masked_fill_(divisor == 0, 1)
        else:
            mixed = d.sum(dim=0)
            divisor = plain_divisor
        del d
        if glob["normalize"]:
            mixed /= divisor
        if lam != 1:
            mixed *= lam
        job.write(lo, hi, b + mixed)
