"""DELLA: magnitude-ranked drop probabilities, with sign consensus."""
from .base import MethodSpec, task_arithmetic_params
from .generalized import kernel

SPEC = MethodSpec(
    name="della", family="task_arithmetic", needs_base=True, min_models=1, random=True,
    sparsification="della_magprune", consensus="sum",
    params=task_arithmetic_params(normalize_default=True, rescale_default=True, sparsify="della_magprune"),
    description="DELLA: magnitude-ranked drop probabilities, with sign consensus.",
    merge=kernel,
)
