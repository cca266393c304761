"""Registry of merge methods.

Each method is one small module of this package that defines ``SPEC`` (a :class:`~.base.MethodSpec`) with its
kernel; every such module is found and registered on import, so adding a method is adding its file (see
docs/extending/merge-method.md). The task-arithmetic family (task_arithmetic, ties, dare_*, breadcrumbs*, della*)
is one generic engine (:mod:`.generalized`) configured per module. The registry is what ``operator add`` validates
against, what the merge executor runs and what the arm descriptor (:mod:`simmerge_bandit.descriptor`) is built
from; :func:`merge_tensors` runs the same kernels on in-memory tensors. :func:`register` adds a method defined
elsewhere (a plugin, a notebook) while the process runs.
"""

from __future__ import annotations

import pkgutil
from importlib import import_module

from ..errors import InvalidInput
from .base import MethodSpec, ParamSpec

#: The built-in methods in the order they are listed (mergekit's order of introduction); modules found beside
#: them are listed after, by name.
_MODULES = (
    "linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "breadcrumbs", "breadcrumbs_ties",
    "della", "della_linear", "slerp", "nuslerp", "model_stock",
)
#: Modules of this package that hold machinery, not a method.
_HELPERS = frozenset({"base", "job", "generalized", "fused", "sparsify"})

REGISTRY: dict[str, MethodSpec] = {}


def method_modules() -> list[str]:
    """The modules of this package that are expected to define a method: all but helpers and ``_private`` ones
    (a test checks that each of them does)."""
    found = sorted(m.name for m in pkgutil.iter_modules(__path__)
                   if m.name not in _HELPERS and not m.name.startswith("_"))
    return [*(m for m in _MODULES if m in found), *(m for m in found if m not in _MODULES)]


def _discover() -> None:
    for name in method_modules():
        spec = getattr(import_module(f"{__name__}.{name}"), "SPEC", None)
        if isinstance(spec, MethodSpec):
            _check(spec)
            REGISTRY[spec.name] = spec


def _check(spec: MethodSpec) -> None:
    if not spec.name or not spec.name.replace("_", "").isalnum() or spec.name != spec.name.lower():
        raise InvalidInput(f"method name {spec.name!r}: lower-case letters, digits and '_' only")
    if spec.merge is None:
        raise InvalidInput(f"method {spec.name!r} has no kernel (MethodSpec.merge)")
    if spec.name in REGISTRY and REGISTRY[spec.name] is not spec:
        raise InvalidInput(f"a merge method named {spec.name!r} is registered already")


def register(spec: MethodSpec) -> MethodSpec:
    """Add a merge method while the process runs (a method module of this package needs no call).

    The arm descriptor gains the method's coordinates, so policy snapshots made before are mapped or rebuilt
    from the decision log when next loaded (see :mod:`simmerge_bandit.descriptor`). Refused when the name is
    taken or the method's describing parameters disagree with another method's on their span.
    """
    from ..descriptor import check_registry

    if not isinstance(spec, MethodSpec):
        raise InvalidInput(f"register() takes a MethodSpec, got {type(spec).__name__}")
    _check(spec)
    check_registry({**REGISTRY, spec.name: spec})
    REGISTRY[spec.name] = spec
    return spec


def unregister(name: str) -> MethodSpec:
    """Remove a method added with :func:`register` (operators of it stay in the catalog but cannot merge)."""
    return REGISTRY.pop(get_method(name).name)


def method_names() -> list[str]:
    """Names of the registered merge methods, in registry order."""
    return list(REGISTRY)


def get_method(name: str) -> MethodSpec:
    """Return the method called ``name`` or raise :class:`InvalidInput` listing the known ones."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise InvalidInput(f"unknown merge method {name!r}; known: {', '.join(REGISTRY)}") from None


_discover()

from .job import bind_params, merge_tensors, pair_roles  # noqa: E402  (needs REGISTRY above)

__all__ = ["MethodSpec", "ParamSpec", "REGISTRY", "get_method", "method_names", "merge_tensors", "pair_roles",
           "bind_params", "register", "unregister"]
