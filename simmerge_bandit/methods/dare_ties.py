"""DARE + TIES sign consensus."""
from .base import MethodSpec, task_arithmetic_params
from .generalized import kernel

SPEC = MethodSpec(
    name="dare_ties", family="task_arithmetic", needs_base=True, min_models=1, random=True,
    sparsification="random", consensus="sum",
    params=task_arithmetic_params(normalize_default=False, rescale_default=True, sparsify="random"),
    description="DARE + TIES sign consensus.",
    merge=kernel,
)
