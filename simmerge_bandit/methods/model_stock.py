"""Model Stock: interpolate between the average of fine-tuned models and the base by their angle."""
from .base import MethodSpec, ParamSpec

SPEC = MethodSpec(
    name="model_stock", family="model_stock", needs_base=True, min_models=2,
    params=(ParamSpec("filter_wise", "bool", False, help="compute the angle per row instead of per tensor"),),
    description="angle-based interpolation between the fine-tuned average and the base",
)
