"""simmerge-bandit: learn which model merges to make.

The Python API mirrors the CLI:

>>> from simmerge_bandit import Store, Catalog, Engine            # doctest: +SKIP
>>> store = Store.open("~/.simmerge")                            # doctest: +SKIP
>>> Catalog(store).add_operator("ties_d0.5", "ties", {"density": 0.5})  # doctest: +SKIP
>>> best = Engine(store).suggest("arith", top=3)[0]              # doctest: +SKIP
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("simmerge-bandit")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0"

_LAZY = {"Catalog": "catalog", "Engine": "engine", "EngineConfig": "engine", "Store": "store"}


def __getattr__(name: str):
    # Lazy, so that `simmerge --help` and light commands do not pay for importing torch.
    if name in _LAZY:
        from importlib import import_module

        return getattr(import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(name)


__all__ = ["Catalog", "Engine", "EngineConfig", "Store", "__version__"]
