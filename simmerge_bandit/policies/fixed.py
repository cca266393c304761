"""The ``fixed:OPERATOR`` baseline: always the same operator, uniformly over its candidates (pairs).

The operator's candidates come first in the order; the exploration ``floor`` is spread over all candidates. When
none of the candidates uses the operator (retired, or not offered), the choice is uniform over all of them.
``predicted`` is each operator's running mean reward.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from .base import require
from .random_policy import RandomPolicy


class FixedPolicy(RandomPolicy):
    """Always ``operator``; made by ``make_policy("fixed:OPERATOR")``. Learns running means as ``random`` does."""

    name: ClassVar[str] = "fixed"
    _param_names = ("operator", "floor", "seed")

    def __init__(self, operator: str, floor: float = 0.01, seed: int = 0):
        super().__init__(floor=floor, seed=seed)
        require(isinstance(operator, str) and operator.strip() != "",
                f"fixed policy needs an operator name (fixed:OPERATOR), got {operator!r}")
        self.operator = operator

    def _score(self, cands):
        n = len(cands)
        mine = np.zeros(n)
        for arm, idx in cands.groups:
            if arm == self.operator:
                mine[idx] = 1.0
        dist = mine / mine.sum() if mine.any() else np.full(n, 1.0 / n)
        return mine, self._means.of(cands), np.zeros(n), dist


POLICY = FixedPolicy
