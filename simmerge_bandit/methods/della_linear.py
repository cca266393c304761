"""DELLA without sign consensus."""
from .base import MethodSpec, task_arithmetic_params
from .generalized import kernel

SPEC = MethodSpec(
    name="della_linear", family="task_arithmetic", needs_base=True, min_models=1, random=True,
    sparsification="della_magprune", consensus=None,
    params=task_arithmetic_params(normalize_default=False, rescale_default=True, sparsify="della_magprune"),
    description="DELLA without sign consensus.",
    merge=kernel,
)
