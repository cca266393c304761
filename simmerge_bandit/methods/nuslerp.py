"""NuSLERP: SLERP with per-model weights, optionally of task vectors and row-wise."""
from .base import MethodSpec, ParamSpec, weight

SPEC = MethodSpec(
    name="nuslerp", family="nuslerp", needs_base=False, min_models=2, max_models=2,
    params=(weight(),
            ParamSpec("nuslerp_flatten", "bool", True, help="treat each tensor as one flat vector"),
            ParamSpec("nuslerp_row_wise", "bool", False, help="interpolate rows rather than columns")),
    description="weighted spherical interpolation (of task vectors when a base is given)",
)
