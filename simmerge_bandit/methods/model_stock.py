"""Model Stock (Jang et al. 2024): move from the base toward the fine-tuned average by the models' angle.

As mergekit 0.1.5, every operation in the compute dtype: offsets ``o_i = w_i - w_0``; ``cos`` = mean over pairs
of ``<o_i, o_j> / max(|o_i| |o_j|, 1e-6)`` (each clamped to [-1, 1]); ``t = N cos / (1 + (N - 1) cos)`` with ``t = 0``
(keep the base) where ``|1 + (N - 1) cos| < 1e-6``; result ``t * mean(w_i) + (1 - t) w_0``. Per tensor, or per
row with ``filter_wise`` (a 1-D tensor is one row). Per tensor, the norms and dot products are streamed sums
(:func:`.job.total`) rounded to the compute dtype where mergekit's whole-tensor reductions round.
"""

from __future__ import annotations

import math

from ..lazy import torch

from .base import MethodSpec, ParamSpec
from .job import scalar, total


def _t(cos_pairs: list[torch.Tensor], count: int) -> torch.Tensor:
    """mergekit's interpolation factor from the pairwise cosines (tensors of the compute dtype)."""
    cos_theta = torch.stack(cos_pairs).mean(dim=0).unsqueeze(-1)
    denominator = 1 + (count - 1) * cos_theta
    singular = denominator.abs() < 1e-6
    safe = torch.where(singular, torch.ones_like(denominator), denominator)
    return torch.where(singular, torch.zeros_like(cos_theta), (count * cos_theta) / safe)


def _mix(t: torch.Tensor, w0: torch.Tensor, ws: list[torch.Tensor]) -> torch.Tensor:
    average = sum(ws) / len(ws)
    return t * average + (1 - t) * w0


def merge(spec: MethodSpec, job) -> None:
    n = len(job.models)
    pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
    chunks = job.chunks()
    cd, dev = job.dtype, job.device

    def load(lo, hi):
        w0 = job.base_rows(lo, hi)
        ws = [job.model_rows(i, lo, hi) for i in range(n)]
        return w0, ws

    if job.params["filter_wise"]:
        for lo, hi in chunks:
            w0, ws = load(lo, hi)
            offs = [w - w0 for w in ws]
            cos = []
            for i, j in pairs:
                norm_product = torch.norm(offs[i], dim=-1) * torch.norm(offs[j], dim=-1)
                cos.append(((offs[i] * offs[j]).sum(dim=-1) / norm_product.clamp(min=1e-6)).clamp(-1, 1))
            job.write(lo, hi, _mix(_t(cos, n), w0, ws))
        return
    sq = [0.0] * n
    dots = {p: 0.0 for p in pairs}
    for lo, hi in chunks:
        w0, ws = load(lo, hi)
        offs = [w - w0 for w in ws]
        for i in range(n):
            sq[i] += total(offs[i].double().square_()) if cd != torch.float64 else total(offs[i] * offs[i])
        for i, j in pairs:
            dots[(i, j)] += total(offs[i] * offs[j])  # products rounded to the compute dtype, as mergekit's
    norms = [scalar(math.sqrt(v), cd, dev) for v in sq]
    cos = [(scalar(dots[(i, j)], cd, dev) / (norms[i] * norms[j]).clamp(min=1e-6)).clamp(-1, 1) for i, j in pairs]
    t = _t(cos, n)
    for lo, hi in chunks:
        w0, ws = load(lo, hi)
        job.write(lo, hi, _mix(t, w0, ws))


SPEC = MethodSpec(
    name="model_stock", family="model_stock", needs_base=True, min_models=2,
    params=(ParamSpec("filter_wise", "bool", False, help="compute the angle per row instead of per tensor"),),
    description="angle-based interpolation between the fine-tuned average and the base",
    merge=merge,
)
