"""What the catalog already knows about a candidate's sources, as context features.

Signals say how two models relate; they cannot say which of them a team tagged as the expert for a task, nor
how well each one is already known to score. A user choosing a merge by hand looks at exactly that, so the
engine's context carries it too, and every policy (and the predictor, replay and simulate) sees it like any
other feature. For a target ``T`` (tasks with weights summing to 1) and each side ``s`` of an ordered pair:

- ``tag_share_s``: the share of the target's weight that ``s`` is tagged with (fine-tuned for);
- ``n_tags_s``: how many tasks ``s`` is tagged with in all (a generalist or a specialist);
- ``known_share_s``: the share of the target's weight on which ``s`` has a known score (an evaluation exists);
- ``known_score_s``: ``s``'s known raw score, weighted mean over those tasks (absent when none is known);
- ``known_diff``: ``known_score_a - known_score_b`` over the tasks both are known on (absent when none).

Absent values are NaN with a reason (:func:`absence_reasons`); the engine's context maps them to 0, and the
``known_share`` features tell a policy that they were absent. The names and order are part of the context schema
(:data:`CONTEXT_SCHEMA_VERSION`): changing them bumps it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np

from ..target import Target
from .schema import FeatureSpec

#: Version of the engine's context: the signal features of :data:`FEATURE_SCHEMA_VERSION`, then the metadata
#: features below, then the target's task buckets. Stored with every decision and policy snapshot; decisions
#: logged under another version are skipped by policies of this one (they keep their own).
METADATA_VERSION = 1
CONTEXT_SCHEMA_VERSION = 3

_M = "metadata"

METADATA_FEATURES: tuple[FeatureSpec, ...] = (
    *(spec for side in "ab" for spec in (
        FeatureSpec(f"tag_share_{side}", _M, f"share of the target's weight that {side} is tagged with "
                    "(the tasks it was fine-tuned for)", (0.0, 1.0), f"swap:tag_share_{'ba'[side == 'b']}"),
        FeatureSpec(f"n_tags_{side}", _M, f"how many tasks {side} is tagged with in all", None,
                    f"swap:n_tags_{'ba'[side == 'b']}"),
        FeatureSpec(f"known_share_{side}", _M, f"share of the target's weight on which {side} has a known score "
                    "(an evaluation of it on that task exists)", (0.0, 1.0),
                    f"swap:known_share_{'ba'[side == 'b']}"),
        FeatureSpec(f"known_score_{side}", _M, f"{side}'s known raw score on the target's tasks, weighted mean "
                    "over the tasks where it is known", None, f"swap:known_score_{'ba'[side == 'b']}"),
    )),
    FeatureSpec("known_diff", _M, "known_score_a - known_score_b over the target's tasks where both are known",
                None, "negated"),
)
METADATA_NAMES: tuple[str, ...] = tuple(f.name for f in METADATA_FEATURES)


@dataclass(frozen=True)
class SourceMeta:
    """What the catalog knows of one model: its tags and its known raw scores per task."""

    tags: tuple[str, ...] = ()
    known: Mapping[str, float] = field(default_factory=dict)


def _side(target: Target, meta: SourceMeta) -> tuple[float, float, float, float]:
    tags = set(meta.tags)
    tag_share = sum(w for t, w in target.items if t in tags)
    known = [(w, float(meta.known[t])) for t, w in target.items
             if t in meta.known and meta.known[t] is not None and math.isfinite(meta.known[t])]
    share = sum(w for w, _ in known)
    score = sum(w * s for w, s in known) / share if share > 0 else math.nan
    return tag_share, float(len(tags)), share, score


def metadata_vector(target: Target, a: SourceMeta, b: SourceMeta) -> np.ndarray:
    """The metadata features of the ordered pair (a, b) for ``target``, in :data:`METADATA_NAMES` order."""
    ta, na, sa, ka = _side(target, a)
    tb, nb, sb, kb = _side(target, b)
    both = [(w, float(a.known[t]) - float(b.known[t])) for t, w in target.items
            if a.known.get(t) is not None and b.known.get(t) is not None
            and math.isfinite(a.known[t]) and math.isfinite(b.known[t])]
    wsum = sum(w for w, _ in both)
    diff = sum(w * d for w, d in both) / wsum if wsum > 0 else math.nan
    return np.array([ta, na, sa, ka, tb, nb, sb, kb, diff], dtype=np.float64)


def metadata_matrix(target: Target, pairs: Sequence[tuple[str, str]],
                    meta: Mapping[str, SourceMeta]) -> np.ndarray:
    """:func:`metadata_vector` of every ordered pair, as an array ``[n_pairs, len(METADATA_NAMES)]``."""
    out = np.empty((len(pairs), len(METADATA_NAMES)))
    empty = SourceMeta()
    for i, (a, b) in enumerate(pairs):
        out[i] = metadata_vector(target, meta.get(a, empty), meta.get(b, empty))
    return out


def absence_reasons(vector: np.ndarray) -> dict[str, str]:
    """Why each absent (NaN) metadata feature of a vector is absent."""
    reasons = {}
    for name, v in zip(METADATA_NAMES, vector):
        if not math.isnan(v):
            continue
        if name == "known_diff":
            reasons[name] = "no task of the target has a known score of both models"
        else:
            reasons[name] = f"no evaluation of model {name[-1]} on the target's tasks"
    return reasons

