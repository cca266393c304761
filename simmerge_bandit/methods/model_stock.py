"""Model Stock (Jang et al. 2024): move from the base toward the fine-tuned average by the models' angle.

As mergekit 0.1.5: offsets ``o_i = w_i - w_0``; ``cos`` = mean over pairs of ``<o_i, o_j> / max(|o_i| |o_j|,
1e-6)`` (each clamped to [-1, 1]); ``t = N cos / (1 + (N - 1) cos)`` with ``t = 0`` (keep the base) where
``|1 + (N - 1) cos| < 1e-6``; result ``t * mean(w_i) + (1 - t) w_0``. Per tensor, or per row with
``filter_wise`` (a 1-D tensor is one row).
"""

import torch

from .base import MethodSpec, ParamSpec


def _t_from_cos(cos: torch.Tensor, count: int) -> torch.Tensor:
    denominator = 1 + (count - 1) * cos
    singular = denominator.abs() < 1e-6
    safe = torch.where(singular, torch.ones_like(denominator), denominator)
    return torch.where(singular, torch.zeros_like(cos), count * cos / safe)


def merge(spec: MethodSpec, job) -> None:
    n = len(job.models)
    pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
    chunks = job.chunks()

    def load(lo, hi):
        w0 = job.base_rows(lo, hi)
        ws = [job.model_rows(i, lo, hi) for i in range(n)]
        return w0, ws

    if job.params["filter_wise"]:
        for lo, hi in chunks:
            w0, ws = load(lo, hi)
            offs = [w - w0 for w in ws]
            norms = [o.norm(dim=-1) for o in offs]
            cos = torch.stack([((offs[i] * offs[j]).sum(dim=-1) / (norms[i] * norms[j]).clamp(min=1e-6))
                               .clamp(-1, 1) for i, j in pairs]).mean(dim=0).unsqueeze(-1)
            t = _t_from_cos(cos, n)
            job.write(lo, hi, t * (sum(ws) / n) + (1 - t) * w0)
        return
    sq = [0.0] * n
    dots = {p: 0.0 for p in pairs}
    for lo, hi in chunks:
        w0, ws = load(lo, hi)
        offs = [(w - w0).reshape(-1) for w in ws]
        for i in range(n):
            sq[i] += float(torch.dot(offs[i], offs[i]))
        for i, j in pairs:
            dots[(i, j)] += float(torch.dot(offs[i], offs[j]))
    norms = [v ** 0.5 for v in sq]
    cos = sum(max(-1.0, min(1.0, dots[(i, j)] / max(norms[i] * norms[j], 1e-6))) for i, j in pairs) / len(pairs)
    t = float(_t_from_cos(torch.tensor(cos, dtype=torch.float64), n))
    for lo, hi in chunks:
        w0, ws = load(lo, hi)
        job.write(lo, hi, t * (sum(ws) / n) + (1 - t) * w0)


SPEC = MethodSpec(
    name="model_stock", family="model_stock", needs_base=True, min_models=2,
    params=(ParamSpec("filter_wise", "bool", False, help="compute the angle per row instead of per tensor"),),
    description="angle-based interpolation between the fine-tuned average and the base",
    merge=merge,
)
