"""DARE: random drop with rescale, then linear task arithmetic."""
from .base import MethodSpec, task_arithmetic_params
from .generalized import kernel

SPEC = MethodSpec(
    name="dare_linear", family="task_arithmetic", needs_base=True, min_models=1, random=True,
    sparsification="random", consensus=None,
    params=task_arithmetic_params(normalize_default=False, rescale_default=True, sparsify="random"),
    description="DARE: random drop with rescale, then linear task arithmetic.",
    merge=kernel,
)
