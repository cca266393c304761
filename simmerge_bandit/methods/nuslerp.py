"""NuSLERP: SLERP with per-model weights, of task vectors when a base model is given (mergekit's ``nuslerp``).

``t = w_1 / (w_0 + w_1)`` (0.5 when the weights sum to ~0). With ``nuslerp_flatten`` (default) each tensor is one
vector; otherwise vectors run along the last dimension (rows), or along the first with ``nuslerp_row_wise``.
Vectors are normalized with a norm floor of 1e-7; exactly (anti)parallel vectors are interpolated linearly.
Everything is computed in the compute dtype, as mergekit does: the elementwise steps are its operations; the
flattened norm and dot product are streamed sums (see :func:`.job.total`) rounded to the compute dtype.
"""

from __future__ import annotations

import math

from ..lazy import torch

from .base import MethodSpec, ParamSpec, weight
from .job import scalar, total

EPS = 1e-8
NORM_FLOOR = 1e-7


def _angle(t: float, cos: torch.Tensor):
    """(colinear, sin((1-t) theta), sin(t theta), sin(theta)) from the clamped cosine, as mergekit."""
    colinear = (1 - cos.square()) <= EPS ** 2
    theta = torch.acos(torch.where(colinear, 0, cos))
    return colinear, torch.sin((1 - t) * theta), torch.sin(t * theta), torch.sin(theta)


def _combine(t: float, v0: torch.Tensor, v1: torch.Tensor, angle) -> torch.Tensor:
    colinear, sa, sb, sin_theta = angle
    res = (sa * v0 + sb * v1) / sin_theta
    return torch.where(colinear, (1 - t) * v0 + t * v1, res)


def _slerp_rows(t: float, v0: torch.Tensor, v1: torch.Tensor) -> torch.Tensor:
    """mergekit's nuslerp along the last dimension (same operations, in the inputs' dtype)."""
    def unit(x):
        return x / torch.norm(x, dim=-1, keepdim=True).clamp(min=NORM_FLOOR)

    cos = torch.sum(unit(v0) * unit(v1), dim=-1, keepdim=True).clamp(-1, 1)
    return _combine(t, v0, v1, _angle(t, cos))


def merge(spec: MethodSpec, job) -> None:
    w0, w1 = (mp["weight"] for mp in job.model_params)
    total_w = w0 + w1
    t = 0.5 if abs(total_w) < 1e-6 else w1 / total_w
    flatten, row_wise = job.params["nuslerp_flatten"], job.params["nuslerp_row_wise"]
    has_base = job.base is not None

    def vectors(lo, hi):
        a, b = job.model_rows(0, lo, hi), job.model_rows(1, lo, hi)
        if has_base:
            base = job.base_rows(lo, hi)
            return base, a - base, b - base
        return None, a, b

    def emit(lo, hi, base, out):
        job.write(lo, hi, out if base is None else base + out)

    if not flatten and not row_wise:
        for lo, hi in job.chunks():
            base, a, b = vectors(lo, hi)
            emit(lo, hi, base, _slerp_rows(t, a, b))
        return
    if not flatten:
        # Vectors along dim 0: every vector spans the whole tensor, so take it whole, as mergekit does.
        (lo, hi), = job.chunks(whole=True)
        base, a, b = vectors(lo, hi)
        a, b = a.view(job.shape).transpose(0, -1), b.view(job.shape).transpose(0, -1)
        emit(lo, hi, base, _slerp_rows(t, a, b).transpose(0, -1).reshape(hi - lo, job.row_len))
        return
    # Flattened: the norms, then the cosine of the normalized vectors, accumulated over chunks and rounded to
    # the compute dtype where mergekit's whole-tensor reductions would round; then the elementwise pass.
    chunks = job.chunks()
    cd, dev = job.dtype, job.device
    sq_a = sq_b = 0.0
    for lo, hi in chunks:
        _, a, b = vectors(lo, hi)
        sq_a += total(a.double().square_()) if cd != torch.float64 else total(a * a)
        sq_b += total(b.double().square_()) if cd != torch.float64 else total(b * b)
    na = scalar(math.sqrt(sq_a), cd, dev).clamp(min=NORM_FLOOR)
    nb = scalar(math.sqrt(sq_b), cd, dev).clamp(min=NORM_FLOOR)
    dot = 0.0
    for lo, hi in chunks:
        _, a, b = vectors(lo, hi)
        dot += total((a / na) * (b / nb))
    angle = _angle(t, scalar(dot, cd, dev).clamp(-1, 1))
    for lo, hi in chunks:
        base, a, b = vectors(lo, hi)
        emit(lo, hi, base, _combine(t, a, b, angle))


SPEC = MethodSpec(
    name="nuslerp", family="nuslerp", needs_base=False, min_models=2, max_models=2, base_role="optional",
    params=(weight(),
            ParamSpec("nuslerp_flatten", "bool", True, help="treat each tensor as one flat vector"),
            ParamSpec("nuslerp_row_wise", "bool", False,
                      help="without flattening: vectors along the first dimension instead of the last")),
    description="weighted spherical interpolation (of task vectors when a base is given)",
    merge=merge,
)
