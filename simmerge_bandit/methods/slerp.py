"""SLERP: spherical interpolation between two models (t=0 gives the base/first model)."""
from .base import MethodSpec, ParamSpec

SPEC = MethodSpec(
    name="slerp", family="slerp", needs_base=True, min_models=2, max_models=2,
    params=(ParamSpec("t", "float", 0.5, low=0.0, high=1.0, help="interpolation factor (0 = base model)"),),
    description="spherical linear interpolation of two models",
)
