"""SLERP: spherical interpolation between the base model (t=0) and the other model (t=1), per tensor.

As mergekit 0.1.5: each tensor is one flat vector; norms at or below 1e-8 count as 1; when the normalized dot
product has magnitude above 0.9995 (near-parallel or antiparallel) it falls back to linear interpolation;
otherwise ``sin((1-t) theta) / sin(theta) * v0 + sin(t theta) / sin(theta) * v1``. The dot product and norms
are accumulated in float64 over chunks (mergekit: float32 over the whole tensor); results agree to ~1e-7.
"""

import math

import torch

from .base import MethodSpec, ParamSpec

DOT_THRESHOLD = 0.9995
NORM_EPS = 1e-8


def coefficients(t: float, dot: float, norm_a: float, norm_b: float) -> tuple[float, float]:
    """(coefficient of v0, coefficient of v1) for the raw, unnormalized vectors."""
    norm_a = norm_a if norm_a > NORM_EPS else 1.0
    norm_b = norm_b if norm_b > NORM_EPS else 1.0
    cos = max(-1.0, min(1.0, dot / (norm_a * norm_b)))
    if abs(cos) > DOT_THRESHOLD:
        return 1 - t, t
    theta = math.acos(cos)
    s = math.sin(theta)
    return math.sin((1 - t) * theta) / s, math.sin(t * theta) / s


def merge(spec: MethodSpec, job) -> None:
    t = job.params["t"]
    chunks = job.chunks()
    aa = bb = ab = 0.0
    for lo, hi in chunks:
        a, b = job.base_rows(lo, hi), job.model_rows(0, lo, hi)
        aa += float(torch.dot(a.reshape(-1), a.reshape(-1)))
        bb += float(torch.dot(b.reshape(-1), b.reshape(-1)))
        ab += float(torch.dot(a.reshape(-1), b.reshape(-1)))
    ca, cb = coefficients(t, ab, math.sqrt(aa), math.sqrt(bb))
    for lo, hi in chunks:
        a, b = job.base_rows(lo, hi), job.model_rows(0, lo, hi)
        job.write(lo, hi, ca * a + cb * b)


SPEC = MethodSpec(
    name="slerp", family="slerp", needs_base=True, min_models=2, max_models=2, base_role="input",
    params=(ParamSpec("t", "float", 0.5, low=0.0, high=1.0,
                      help="interpolation factor (0 = the base model; mergekit requires it, default here 0.5)"),),
    description="spherical linear interpolation of two models",
    merge=merge,
)
