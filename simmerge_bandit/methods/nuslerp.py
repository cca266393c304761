"""NuSLERP: SLERP with per-model weights, of task vectors when a base model is given (mergekit's ``nuslerp``).

``t = w_1 / (w_0 + w_1)`` (0.5 when the weights sum to ~0). With ``nuslerp_flatten`` (default) each tensor is one
vector; otherwise vectors run along the last dimension (rows), or along the first with ``nuslerp_row_wise``.
Vectors are normalized with a norm floor of 1e-7; exactly (anti)parallel vectors are interpolated linearly.
"""

import math

import torch

from .base import MethodSpec, ParamSpec, weight

EPS = 1e-8


def _slerp_rows(t: float, v0: torch.Tensor, v1: torch.Tensor) -> torch.Tensor:
    """mergekit's nuslerp along the last dimension (float32, same operations)."""
    def unit(x):
        return x / torch.norm(x, dim=-1, keepdim=True).clamp(min=1e-7)

    cos = torch.sum(unit(v0) * unit(v1), dim=-1, keepdim=True).clamp(-1, 1)
    colinear = (1 - cos.square()) <= EPS ** 2
    theta = torch.acos(torch.where(colinear, 0, cos))
    sin = torch.sin(theta)
    res = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / sin
    return torch.where(colinear, (1 - t) * v0 + t * v1, res)


def merge(spec: MethodSpec, job) -> None:
    w0, w1 = (mp["weight"] for mp in job.model_params)
    total = w0 + w1
    t = 0.5 if abs(total) < 1e-6 else w1 / total
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
    if not flatten and (row_wise and len(job.shape) != 2):
        # Vectors along dim 0 of a tensor that is not a matrix: take it whole, as mergekit does.
        (lo, hi), = job.chunks(whole=True)
        base, a, b = vectors(lo, hi)
        a, b = a.view(job.shape).transpose(0, -1), b.view(job.shape).transpose(0, -1)
        emit(lo, hi, base, _slerp_rows(t, a, b).transpose(0, -1).reshape(hi - lo, job.row_len))
        return
    # Statistics over the whole tensor (flatten) or per column of a matrix (row_wise): sums of squares and
    # the dot product, then a second pass that applies per-vector coefficients.
    chunks = job.chunks()
    if flatten:
        aa = bb = ab = 0.0
        for lo, hi in chunks:
            _, a, b = vectors(lo, hi)
            a, b = a.reshape(-1), b.reshape(-1)
            aa += float(torch.dot(a, a))
            bb += float(torch.dot(b, b))
            ab += float(torch.dot(a, b))
        na, nb = max(math.sqrt(aa), 1e-7), max(math.sqrt(bb), 1e-7)
        cos = max(-1.0, min(1.0, ab / (na * nb)))
        if 1 - cos * cos <= EPS ** 2:
            ca, cb = 1 - t, t
        else:
            theta = math.acos(cos)
            s = math.sin(theta)
            ca, cb = math.sin((1 - t) * theta) / s, math.sin(t * theta) / s
        for lo, hi in chunks:
            base, a, b = vectors(lo, hi)
            emit(lo, hi, base, ca * a + cb * b)
        return
    cols = job.row_len
    aa = torch.zeros(cols, dtype=torch.float64, device=job.device)
    bb, ab = aa.clone(), aa.clone()
    for lo, hi in chunks:
        _, a, b = vectors(lo, hi)
        aa += (a * a).sum(dim=0, dtype=torch.float64)
        bb += (b * b).sum(dim=0, dtype=torch.float64)
        ab += (a * b).sum(dim=0, dtype=torch.float64)
    na, nb = aa.sqrt().clamp(min=1e-7), bb.sqrt().clamp(min=1e-7)
    cos = (ab / (na * nb)).clamp(-1, 1)
    colinear = (1 - cos.square()) <= EPS ** 2
    theta = torch.acos(torch.where(colinear, 0, cos))
    s = torch.sin(theta)
    ca = torch.where(colinear, 1 - t, torch.sin((1 - t) * theta) / s).to(torch.float32)
    cb = torch.where(colinear, t, torch.sin(t * theta) / s).to(torch.float32)
    for lo, hi in chunks:
        base, a, b = vectors(lo, hi)
        emit(lo, hi, base, ca * a + cb * b)


SPEC = MethodSpec(
    name="nuslerp", family="nuslerp", needs_base=False, min_models=2, max_models=2, base_role="optional",
    params=(weight(),
            ParamSpec("nuslerp_flatten", "bool", True, help="treat each tensor as one flat vector"),
            ParamSpec("nuslerp_row_wise", "bool", False,
                      help="without flattening: vectors along the first dimension instead of the last")),
    description="weighted spherical interpolation (of task vectors when a base is given)",
    merge=merge,
)
