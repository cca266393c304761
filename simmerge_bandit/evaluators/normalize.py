"""Reward normalization, defined once for the whole engine.

A merge is rewarded by how it compares with the models it was made from, on the task that is asked for::

    normalized = clip(score(merge, task) / max(score(source, task) for source in sources), 0, 2)

- 1.0 means the merge does as well as the best of its sources on that task; 0.5 means it keeps half of it.
- Zero denominator: when no source scores above zero (``<= EPS``) the ratio is undefined. Then a merge that
  scores zero as well gets 1.0 (it is as good as the best source), and a merge that scores above zero gets 2.0
  (better than every source: the same value the clip gives a merge scoring more than twice the best source).
- The clip to [0, 2] keeps one lucky merge of weak sources from dominating a mean, and negative metrics
  (possible from external evaluators) from producing negative rewards.
- A failed evaluation has no score and no normalized score (``None``); it is never silently a zero.

Always keep the raw score next to the normalized one: normalization depends on the sources' scores, which may be
re-measured.
"""

from __future__ import annotations

import math
from typing import Iterable

EPS = 1e-9
LOW, HIGH = 0.0, 2.0


def normalize_score(score: float | None, source_scores: Iterable[float | None]) -> float | None:
    """The normalized reward of a merge scoring ``score`` whose sources scored ``source_scores`` on the task.

    >>> normalize_score(0.45, [0.9, 0.3])
    0.5
    >>> normalize_score(0.0, [0.0, 0.0]), normalize_score(0.2, [0.0])
    (1.0, 2.0)
    """
    if score is None or not math.isfinite(score):
        return None
    known = [s for s in source_scores if s is not None and math.isfinite(s)]
    if not known:
        return None
    best = max(known)
    if best <= EPS:
        return 1.0 if score <= EPS else HIGH
    return min(max(score / best, LOW), HIGH)
