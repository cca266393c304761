"""Multi-way merges: the features of a chain's intermediate merge are computed on the actual merge.

A chain ``((a op1 b) op2 c) ...`` is built greedily: the first pair comes from the 2-way ranking, then each step
ranks (merge so far, next model, operator). The merge so far is not a catalog model, so nothing about it is
stored yet; rather than guess its similarity to the next model from its members' (no signal of a non-linear
network is linear in its weights), the engine merges it for real, with the streaming executor, into
``$SIMMERGE_HOME/artifacts/intermediates/<key>``, and gives it a signature like any model: one forward pass over
the task's probes and one pass over its weights. The key covers the members' fingerprints in order, the operators
and their parameters, the base and the seed, so an intermediate is merged once and reused by every later suggestion (and
removed by deleting the folder; it is a cache). Randomised operators (DARE, DELLA) use the engine's seed here, so the
intermediate is one draw of that merge; the merge that is finally evaluated uses its decision's own seed.

>>> feats = intermediate_features(engine, ["a", "b"], ["ties_d0.5"], ["c", "d"], "task")   # doctest: +SKIP
>>> feats.shape                                                                          # doctest: +SKIP
(2, 34)
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Sequence

import numpy as np

from .errors import InvalidInput


def intermediates_dir(store) -> Path:
    """Where intermediate merges are kept (under the state home's artifacts)."""
    d = store.artifacts / "intermediates"
    d.mkdir(parents=True, exist_ok=True)
    return d


def materialize(engine, models: Sequence[str], operators: Sequence[str]) -> tuple[Path, str]:
    """The merge ``((m0 op0 m1) op1 m2) ...`` on disk (merged now unless already there) and its base's name."""
    from .recipe import build

    if len(operators) != len(models) - 1:
        raise InvalidInput(f"{len(models)} models need {len(models) - 1} operators, got {len(operators)}")
    try:
        r = build(engine.catalog, models, operators)
    except InvalidInput:
        r = None
    if r is None or r.base is None:
        raise InvalidInput(f"a chain's models must share one base; {', '.join(models)} do not")
    seed = int(engine.config.seed)
    steps = [[s["method"], s["params"]] for s in r.steps]
    key = hashlib.blake2b(json.dumps([[m["fingerprint"] for m in r.models], steps, r.base["fingerprint"], seed],
                                     sort_keys=True).encode(), digest_size=10).hexdigest()
    out = intermediates_dir(engine.store) / key
    if not out.is_dir():            # the executor renames a finished merge into place, so a folder is complete
        r.merge(out, seed=seed, force=True)
    return out, r.base["name"]


def intermediate_features(engine, models: Sequence[str], operators: Sequence[str], others: Sequence[str],
                          task: str) -> np.ndarray:
    """Raw features (len(others), n_features) of (merge of ``models`` by ``operators``, other) for each other."""
    from . import signals

    path, base = materialize(engine, models, operators)
    label = "(" + " ".join(f"{m} {o}" for m, o in zip(models, operators)) + f" {models[-1]})"
    return signals.api.features_against(engine.store, path, base, list(others), task, label=label)
