"""Registry of contextual-bandit policies over merge candidates.

Each policy is one module of this package that defines ``POLICY`` (a :class:`~.base.Policy` subclass with a
``name``), all behind one interface: ``rank(Candidates) -> Ranking``, ``update(x, arm, z, reward, propensity)``,
``snapshot()`` / ``restore()``, ``clone()``, ``explain()``. Every such module is found and registered on import, so
adding a policy is adding its file (see docs/extending/policy.md); :func:`register` adds a policy defined elsewhere
(a plugin, a notebook) while the process runs. Build one by name with :func:`make_policy`; rebuild a saved one with
:func:`from_snapshot`.
"""

from __future__ import annotations

import inspect
import pkgutil
import re
from importlib import import_module
from typing import Any

from ..errors import InvalidInput
from .base import Candidates, Policy, Ranking

_MODULES = ("linucb", "linucb_hybrid", "lints", "egreedy", "vw", "predictor", "random_policy", "fixed", "gp_ucb")
#: Modules of this package that hold machinery, not a policy (``_private`` ones are skipped too).
_HELPERS = frozenset({"base"})

REGISTRY: dict[str, type[Policy]] = {}


def policy_modules() -> list[str]:
    """The modules of this package expected to define a policy, built-ins first in their listed order, then the
    others by name (a test checks that each of them registers one)."""
    found = sorted(m.name for m in pkgutil.iter_modules(__path__)
                   if m.name not in _HELPERS and not m.name.startswith("_"))
    return [*(m for m in _MODULES if m in found), *(m for m in found if m not in _MODULES)]


def _check(cls: type) -> None:
    if not (isinstance(cls, type) and issubclass(cls, Policy)):
        raise InvalidInput(f"a policy is a Policy subclass, got {cls!r}")
    name = getattr(cls, "name", None)
    # ':' and '@' mean something in a policy spec (parameters, a warm start); 'uniform' is replay's baseline
    if not isinstance(name, str) or not re.fullmatch(r"[a-z][a-z0-9_.-]*", name) or name == "uniform":
        raise InvalidInput(f"policy name {name!r}: lower-case letters, digits, '_', '.', '-', starting with a "
                           "letter (and not 'uniform')")
    if name in REGISTRY and REGISTRY[name] is not cls:
        raise InvalidInput(f"a policy named {name!r} is registered already")


def _discover() -> None:
    for module in policy_modules():
        cls = getattr(import_module(f"{__name__}.{module}"), "POLICY", None)
        if cls is not None:
            _check(cls)
            REGISTRY[cls.name] = cls


def register(cls: type[Policy]) -> type[Policy]:
    """Add a policy class while the process runs (a policy module of this package needs no call); usable as a
    class decorator. Refused when the name is malformed or taken by another class."""
    _check(cls)
    REGISTRY[cls.name] = cls
    return cls


def unregister(name: str) -> type[Policy]:
    """Remove a policy added with :func:`register` (its snapshots stay in the store, unusable until it is back)."""
    if name not in REGISTRY:
        raise InvalidInput(f"unknown policy {name!r}")
    return REGISTRY.pop(name)


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


_discover()

__all__ = ["Candidates", "Policy", "Ranking", "REGISTRY", "from_snapshot", "make_policy", "policy_modules",
           "policy_names", "register", "unregister"]
