"""Registry of contextual-bandit policies over merge candidates.

Each policy is one module that defines ``POLICY`` (a :class:`~.base.Policy` subclass with a ``name``), all behind
one interface: ``rank(Candidates) -> Ranking``, ``update(x, arm, z, reward, propensity)``, ``snapshot()`` /
``restore()``, ``clone()``, ``explain()``. Build one by name with :func:`make_policy`; rebuild a saved one with
:func:`from_snapshot`.
"""

from __future__ import annotations

import inspect
from importlib import import_module
from typing import Any

from ..errors import InvalidInput
from .base import Candidates, Policy, Ranking

_MODULES = ("linucb", "linucb_hybrid", "lints", "egreedy", "vw", "predictor", "random_policy", "fixed")

REGISTRY: dict[str, type[Policy]] = {}
for _m in _MODULES:
    _cls = import_module(f"{__name__}.{_m}").POLICY
    REGISTRY[_cls.name] = _cls


def policy_names() -> list[str]:
    """Registered policy names; ``fixed`` is used as ``fixed:OPERATOR``."""
    return list(REGISTRY)


def make_policy(name: str, **params: Any) -> Policy:
    """Build the policy called ``name`` with its constructor ``params``.

    ``fixed:OPERATOR`` is the fixed baseline for that operator. Unknown names and bad parameters raise
    :class:`InvalidInput` in one line.

    >>> make_policy("linucb", alpha=0.5).alpha
    0.5
    >>> make_policy("fixed:ties-0.5").operator
    'ties-0.5'
    """
    base, sep, arg = str(name).partition(":")
    if base not in REGISTRY:
        known = ", ".join(n + (":OPERATOR" if n == "fixed" else "") for n in REGISTRY)
        raise InvalidInput(f"unknown policy {name!r}; known: {known}")
    if sep:
        if base != "fixed":
            raise InvalidInput(f"policy {base!r} takes no ':' argument (got {name!r}); pass parameters instead")
        if "operator" in params:
            raise InvalidInput(f"{name!r} names the operator already; drop operator=")
        params["operator"] = arg
    cls = REGISTRY[base]
    accepted = inspect.signature(cls.__init__).parameters
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        known = ", ".join(p for p in accepted if p != "self")
        raise InvalidInput(f"policy {base!r} has no parameter {', '.join(unknown)}; known: {known}")
    try:
        return cls(**params)
    except TypeError as e:
        raise InvalidInput(f"policy {name!r}: {e}") from None


def from_snapshot(arrays: dict, meta: dict) -> Policy:
    """Rebuild a policy (and its prior, if it has one) from :meth:`Policy.snapshot` output."""
    name = meta.get("policy")
    if name not in REGISTRY:
        raise InvalidInput(f"snapshot is of unknown policy {name!r}")
    params = {k: v for k, v in dict(meta.get("params", {})).items() if k != "prior"}
    policy = make_policy(name, **params)
    policy.restore(arrays, meta)
    return policy


__all__ = ["Candidates", "Policy", "Ranking", "REGISTRY", "from_snapshot", "make_policy", "policy_names"]
