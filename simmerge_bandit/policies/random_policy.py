"""The ``random`` baseline: every candidate equally likely, whatever was learned.

``predicted`` is each operator's running mean reward, so a report can still show what it has seen.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from ._means import ArmMeans
from .base import Policy


class RandomPolicy(Policy):
    """Uniform choice over all candidates."""

    name: ClassVar[str] = "random"

    def __init__(self, floor: float = 0.01, seed: int = 0):
        super().__init__(floor=floor, seed=seed)
        self._means = ArmMeans()

    def _score(self, cands):
        n = len(cands)
        predicted = self._means.of(cands)
        return predicted, predicted, np.zeros(n), np.full(n, 1.0 / n)

    def _learn(self, x, arm, z, reward, propensity) -> None:
        self._means.add(arm, reward)

    def explain(self, x, arm, z) -> dict:
        mean = self._means.mean(str(arm))
        return {"predicted": mean, "baseline": mean, "contributions": np.zeros(np.size(x)), "method": "none"}

    def _state(self):
        return {}, {"means": self._means.to_json()}

    def _load_state(self, arrays, meta) -> None:
        self._means = ArmMeans.from_json(meta["means"])


POLICY = RandomPolicy
