"""Linear (model soup): weighted average of the models' weights."""
from .base import MethodSpec, normalize, weight

SPEC = MethodSpec(
    name="linear", family="linear", needs_base=False, max_models=None,
    params=(weight(), normalize(True)),
    description="weighted average of the weights",
)
