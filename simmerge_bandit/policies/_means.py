"""Running mean reward per operator: the 'predicted' value of the baseline policies."""

from __future__ import annotations

import numpy as np

from .base import Candidates


class ArmMeans:
    """Counts and reward sums per operator, in O(1) per reward."""

    def __init__(self) -> None:
        self.n: dict[str, int] = {}
        self.total: dict[str, float] = {}

    def add(self, arm: str, reward: float) -> None:
        self.n[arm] = self.n.get(arm, 0) + 1
        self.total[arm] = self.total.get(arm, 0.0) + reward

    def mean(self, arm: str) -> float:
        n = self.n.get(arm, 0)
        return self.total[arm] / n if n else 0.0

    def of(self, cands: Candidates) -> np.ndarray:
        out = np.zeros(len(cands))
        for arm, idx in cands.groups:
            out[idx] = self.mean(arm)
        return out

    def to_json(self) -> dict:
        return {"n": dict(self.n), "total": dict(self.total)}

    @classmethod
    def from_json(cls, js: dict) -> "ArmMeans":
        out = cls()
        out.n = {k: int(v) for k, v in js.get("n", {}).items()}
        out.total = {k: float(v) for k, v in js.get("total", {}).items()}
        return out
