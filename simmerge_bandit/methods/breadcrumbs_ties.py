"""Model Breadcrumbs with TIES sign consensus."""
from .base import MethodSpec, task_arithmetic_params
from .generalized import kernel

SPEC = MethodSpec(
    name="breadcrumbs_ties", family="task_arithmetic", needs_base=True, min_models=1, random=False,
    sparsification="magnitude_outliers", consensus="sum",
    params=task_arithmetic_params(normalize_default=False, rescale_default=False, sparsify="magnitude_outliers"),
    description="Model Breadcrumbs with TIES sign consensus.",
    merge=kernel,
)
