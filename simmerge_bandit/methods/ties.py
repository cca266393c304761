"""TIES: magnitude pruning, sign election, disjoint merge."""
from .base import MethodSpec, task_arithmetic_params
from .generalized import kernel

SPEC = MethodSpec(
    name="ties", family="task_arithmetic", needs_base=True, min_models=1, random=False,
    sparsification="magnitude", consensus="sum",
    params=task_arithmetic_params(normalize_default=True, rescale_default=False, sparsify="magnitude"),
    description="TIES: magnitude pruning, sign election, disjoint merge.",
    merge=kernel,
)
