"""Task arithmetic: base + lambda * sum of weighted task vectors."""
from .base import MethodSpec, task_arithmetic_params
from .generalized import kernel

SPEC = MethodSpec(
    name="task_arithmetic", family="task_arithmetic", needs_base=True, min_models=1, random=False,
    sparsification=None, consensus=None,
    params=task_arithmetic_params(normalize_default=False, rescale_default=False, sparsify=None),
    description="Task arithmetic: base + lambda * sum of weighted task vectors.",
    merge=kernel,
)
