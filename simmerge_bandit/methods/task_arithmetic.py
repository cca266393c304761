"""Task arithmetic: base + lambda * sum of weighted task vectors."""
from .base import MethodSpec, task_arithmetic_params

SPEC = MethodSpec(
    name="task_arithmetic", family="task_arithmetic", needs_base=True, random=False,
    sparsification=None, consensus=None,
    params=task_arithmetic_params(normalize_default=False, rescale_default=False, sparsify=None),
    description="Task arithmetic: base + lambda * sum of weighted task vectors.",
)
