"""Modules imported on first use: ``from .lazy import torch`` gives a stand-in that imports torch when one of its
attributes is first read.

Importing torch takes seconds (about 3 s on a 2-core machine), and most commands never touch it: ``simmerge
status``, ``suggest``, ``feedback``, the daemon's start. The merge methods' modules are imported by the catalog
(their registry validates operators), so they refer to torch through this stand-in; only a merge, an evaluation
or a signal computation pays for the import. A stand-in never replaces ``sys.modules["torch"]``: code that does
``import torch`` gets the real module, and the import itself is thread-safe (Python's import lock).
"""

from __future__ import annotations

import importlib
from types import ModuleType


class LazyModule:
    """Stands for module ``name``; every attribute read is the real module's (imported on the first)."""

    __slots__ = ("_name", "_module")

    def __init__(self, name: str):
        self._name = name
        self._module: ModuleType | None = None

    def __getattr__(self, attr: str):
        module = self._module
        if module is None:
            module = self._module = importlib.import_module(self._name)
        return getattr(module, attr)

    def __repr__(self) -> str:
        return f"<lazy module {self._name!r} ({'imported' if self._module is not None else 'not imported yet'})>"


torch = LazyModule("torch")
