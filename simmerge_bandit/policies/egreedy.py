"""Epsilon-greedy on per-operator ridge estimates.

With probability ``1 - epsilon`` the candidate with the best ridge estimate (ties split), otherwise a uniform
candidate; the exploration ``floor`` is mixed in on top. ``uncertainty`` reports the ridge width, which the
choice itself does not use.
"""

from __future__ import annotations

from typing import ClassVar

from ._ridge import DisjointLinearPolicy
from .base import argmax_distribution, is_number, require


class EpsilonGreedy(DisjointLinearPolicy):
    """Epsilon-greedy over ridge estimates; ``epsilon`` is the share of uniform exploration."""

    name: ClassVar[str] = "egreedy"
    deterministic_scores: ClassVar[bool] = True
    _param_names = ("epsilon", "l2", "prior", "floor", "seed")

    def __init__(self, epsilon: float = 0.1, l2: float = 1.0, prior=None, floor: float = 0.01, seed: int = 0):
        super().__init__(l2=l2, prior=prior, floor=floor, seed=seed)
        require(is_number(epsilon) and 0 <= epsilon <= 1, f"epsilon must be in [0, 1], got {epsilon!r}")
        self.epsilon = float(epsilon)

    def _score(self, cands):
        mean, width = self._mean_width(cands)
        n = mean.shape[0]
        dist = (1.0 - self.epsilon) * argmax_distribution(mean) + self.epsilon / n
        return mean, mean, width, dist


POLICY = EpsilonGreedy
