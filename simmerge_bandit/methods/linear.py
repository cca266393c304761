"""Linear (model soup): ``sum_i w_i x_i``, divided by ``sum_i w_i`` when ``normalize`` (mergekit's ``linear``).

mergekit accumulates ``result.addcmul_(x_i, w_i)`` in float32 (float64 for float64 inputs) in input order, divides,
and rounds the result to the compute dtype; so does this kernel, so the results are equal in every compute dtype.
A zero weight sum with ``normalize`` is refused (mergekit would write inf/NaN).
"""

from __future__ import annotations

from ..lazy import torch

from ..errors import InvalidInput
from .base import MethodSpec, normalize, weight


def merge(spec: MethodSpec, job) -> None:
    acc = torch.float64 if job.dtype == torch.float64 else torch.float32
    weights = torch.tensor([mp["weight"] for mp in job.model_params], dtype=acc, device=job.device)
    denominator = weights.sum()
    if job.params["normalize"] and float(denominator) == 0:
        raise InvalidInput("linear: the weights sum to 0, so they cannot be normalized (set normalize=false or "
                           "change the weights)")
    coefficients = [w.reshape(1, 1) for w in weights.unbind(0)]
    for lo, hi in job.chunks():
        # mergekit starts from zeros: 0 + x * c is x * c (an exact zero's sign aside), one pass fewer. Inputs are
        # converted to the accumulation dtype first: the same values as mixed-dtype ops, which are slower.
        x = job.model_rows(0, lo, hi)
        result = x.to(acc).mul_(coefficients[0]) if x.dtype != acc else x * coefficients[0]
        for i, c in enumerate(coefficients[1:], 1):
            result.addcmul_(job.model_rows(i, lo, hi).to(acc), c)
        if job.params["normalize"]:
            result.div_(denominator)
        job.write(lo, hi, result if job.dtype == acc else result.to(job.dtype))


SPEC = MethodSpec(
    name="linear", family="linear", needs_base=False, min_models=1, max_models=None, base_role="none",
    params=(weight(), normalize(True)),
    description="weighted average of the weights",
    merge=merge,
)
