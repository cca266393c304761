"""LinUCB with disjoint linear models (Li et al. 2010, Algorithm 1): one ridge regression per operator.

Score = ``prior + [1, x] @ theta_a + alpha * sqrt([1, x] A_a^-1 [1, x]^T)``. The choice is the best score (ties
split), with the exploration ``floor`` spread over all candidates. A new operator starts from the prior alone
(zero without one); use ``linucb-hybrid`` to carry what other operators taught over to it.
"""

from __future__ import annotations

from typing import ClassVar

from ._ridge import DisjointLinearPolicy
from .base import argmax_distribution, is_number, require


class LinUCB(DisjointLinearPolicy):
    """Disjoint LinUCB. ``alpha`` scales the confidence width; ``l2`` is the ridge penalty.

    >>> p = LinUCB(alpha=0.5)
    >>> ranking = p.rank(cands); p.update(cands.X[ranking.choice], cands.arms[ranking.choice],
    ...                                   cands.Z[ranking.choice], reward=0.8)  # doctest: +SKIP
    """

    name: ClassVar[str] = "linucb"
    deterministic_scores: ClassVar[bool] = True
    _param_names = ("alpha", "l2", "prior", "floor", "seed")

    def __init__(self, alpha: float = 1.0, l2: float = 1.0, prior=None, floor: float = 0.01, seed: int = 0):
        super().__init__(l2=l2, prior=prior, floor=floor, seed=seed)
        require(is_number(alpha) and alpha >= 0, f"alpha must be a non-negative number, got {alpha!r}")
        self.alpha = float(alpha)

    def _score(self, cands):
        mean, width = self._mean_width(cands)
        scores = mean + self.alpha * width
        return scores, mean, width, argmax_distribution(scores)


POLICY = LinUCB
