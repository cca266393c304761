"""Model Breadcrumbs: drop the smallest and the largest-magnitude outliers."""
from .base import MethodSpec, task_arithmetic_params
from .generalized import kernel

SPEC = MethodSpec(
    name="breadcrumbs", family="task_arithmetic", needs_base=True, min_models=1, random=False,
    sparsification="magnitude_outliers", consensus=None,
    params=task_arithmetic_params(normalize_default=False, rescale_default=False, sparsify="magnitude_outliers"),
    description="Model Breadcrumbs: drop the smallest and the largest-magnitude outliers.",
    merge=kernel,
)
