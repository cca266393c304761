"""SLERP: spherical interpolation between the base model (t=0) and the other model (t=1), per tensor.

As mergekit 0.1.5, in float32 (float64 for float64 inputs) whatever the compute dtype, the result rounded to it:
each tensor is one flat vector; its norm is the norm of the norms of its 1 M-element pieces, norms at or below
1e-8 count as 1; the dot product of the normalized pieces is summed piece by piece; when its magnitude is above
0.9995 (near-parallel or antiparallel) the result is the linear interpolation; otherwise ``sin((1-t) theta) /
sin(theta) * v0 + sin(t theta) / sin(theta) * v1``. The same torch calls on the same pieces, so the coefficients and
the tensors are mergekit's bit for bit when both run torch with the same thread count.
"""

from __future__ import annotations

from ..lazy import torch

from .base import MethodSpec, ParamSpec

DOT_THRESHOLD = 0.9995
NORM_EPS = 1e-8
#: mergekit's piece size for the norms and the dot product (elements of the flattened tensor).
PIECE = 1 << 20


def coefficients(t: torch.Tensor, pieces) -> tuple[torch.Tensor, torch.Tensor]:
    """(coefficient of v0, coefficient of v1) as ``[1, 1]`` tensors; ``pieces()`` yields (v0, v1) pieces as
    ``[1, n]`` tensors of the working dtype, and is called twice."""
    norms_a, norms_b = [], []
    for x, y in pieces():
        norms_a.append(torch.linalg.vector_norm(x, dim=1, keepdim=True))
        norms_b.append(torch.linalg.vector_norm(y, dim=1, keepdim=True))
    norm_a = torch.linalg.vector_norm(torch.stack(norms_a), dim=0)
    norm_b = torch.linalg.vector_norm(torch.stack(norms_b), dim=0)
    norm_a = torch.where(norm_a > NORM_EPS, norm_a, 1)
    norm_b = torch.where(norm_b > NORM_EPS, norm_b, 1)
    dots = [((x / norm_a) * (y / norm_b)).sum(dim=1, keepdim=True) for x, y in pieces()]
    dot = torch.stack(dots).sum(dim=0).clamp(-1, 1)
    linear = dot.abs() > DOT_THRESHOLD
    theta = torch.acos(torch.where(linear, 0, dot))
    sin_theta = torch.sin(theta)
    coef_a = torch.where(linear, 1 - t, torch.sin((1 - t) * theta) / sin_theta)
    coef_b = torch.where(linear, t, torch.sin(t * theta) / sin_theta)
    return coef_a, coef_b


def merge(spec: MethodSpec, job) -> None:
    acc = torch.float64 if job.dtype == torch.float64 else torch.float32
    t = torch.tensor([job.params["t"]], dtype=acc, device=job.device).reshape(-1, 1)

    def pieces():
        for lo in range(0, job.numel, PIECE):
            hi = min(lo + PIECE, job.numel)
            yield job.base_flat(lo, hi).to(acc).view(1, -1), job.model_flat(0, lo, hi).to(acc).view(1, -1)

    ca, cb = coefficients(t, pieces)
    for lo, hi in job.chunks():
        a, b = job.base_rows(lo, hi).to(acc), job.model_rows(0, lo, hi).to(acc)
        out = ca * a + cb * b
        job.write(lo, hi, out if job.dtype == acc else out.to(job.dtype))


SPEC = MethodSpec(
    name="slerp", family="slerp", needs_base=True, min_models=2, max_models=2, base_role="input",
    params=(ParamSpec("t", "float", 0.5, low=0.0, high=1.0,
                      help="interpolation factor (0 = the base model; mergekit requires it, default here 0.5)"),),
    description="spherical linear interpolation of two models",
    merge=merge,
)
