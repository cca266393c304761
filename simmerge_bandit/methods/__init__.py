"""Registry of merge methods.

Each method is one small module that defines ``SPEC`` (a :class:`~.base.MethodSpec`) with its kernel. The
task-arithmetic family (task_arithmetic, ties, dare_*, breadcrumbs*, della*) is one generic engine
(:mod:`.generalized`) configured per module. The registry is what ``operator add`` validates against and what the
merge executor runs; :func:`merge_tensors` runs the same kernels on in-memory tensors.
"""

from __future__ import annotations

from importlib import import_module

from ..errors import InvalidInput
from .base import MethodSpec, ParamSpec

_MODULES = (
    "linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "breadcrumbs", "breadcrumbs_ties",
    "della", "della_linear", "slerp", "nuslerp", "model_stock",
)

REGISTRY: dict[str, MethodSpec] = {}
for _m in _MODULES:
    _spec = import_module(f"{__name__}.{_m}").SPEC
    REGISTRY[_spec.name] = _spec


def method_names() -> list[str]:
    """Names of the registered merge methods, in registry order."""
    return list(REGISTRY)


def get_method(name: str) -> MethodSpec:
    """Return the method called ``name`` or raise :class:`InvalidInput` listing the known ones."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise InvalidInput(f"unknown merge method {name!r}; known: {', '.join(REGISTRY)}") from None


from .job import bind_params, merge_tensors, pair_roles  # noqa: E402  (needs REGISTRY above)

__all__ = ["MethodSpec", "ParamSpec", "REGISTRY", "get_method", "method_names", "merge_tensors", "pair_roles",
           "bind_params"]
