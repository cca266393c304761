"""A candidate's context: what a policy sees of an ordered pair of models merged for a target.

``x = [signals, metadata, target buckets]``:

- *signals*: the pair's similarity features (:mod:`.signals`) on each target task's probe set, signed-log1p
  scaled (absent -> 0), and averaged with the target's weights over the tasks where they are present;
- *metadata*: what the catalog knows of each side (:mod:`.signals.metadata`: tags, known scores), scaled the same
  way;
- *target buckets*: each target task hashed into one of :data:`TASK_BUCKETS` buckets, weighted by its weight, so a
  policy can learn task-level effects without a column per task.

The signed log keeps unbounded features (KL, norm ratios) on the scale of the bounded ones without fitted
statistics, so a context means the same before and after any amount of data. For a single-task target the
signal part is exactly the pair's features on that task.

The layout is versioned by :data:`~simmerge_bandit.signals.metadata.CONTEXT_SCHEMA_VERSION`.
"""

from __future__ import annotations

import json
import zlib
from typing import Mapping, Sequence

import numpy as np

from .signals.metadata import CONTEXT_SCHEMA_VERSION, METADATA_NAMES, SourceMeta, metadata_matrix
from .target import Target

TASK_BUCKETS = 8


def schema() -> str:
    """The context schema that contexts are built with now (stored with decisions and snapshots)."""
    return str(CONTEXT_SCHEMA_VERSION)


def task_bucket(task: str) -> int:
    return zlib.crc32(task.encode()) % TASK_BUCKETS


def context_names(feature_names: Sequence[str]) -> list[str]:
    """Names of the context's coordinates, given the signal features' names."""
    return [*feature_names, *METADATA_NAMES, *(f"task_bucket_{i}" for i in range(TASK_BUCKETS))]


def scaled(values: np.ndarray) -> np.ndarray:
    """Signed log1p, NaN (absent) -> 0."""
    f = np.asarray(values, dtype=np.float64)
    return np.where(np.isfinite(f), np.sign(f) * np.log1p(np.abs(np.where(np.isfinite(f), f, 0.0))), 0.0)


def signal_part(per_task: Mapping[str, np.ndarray], target: Target) -> np.ndarray:
    """Target-weighted mean of the scaled signal features (``per_task[task]``: raw features of the pairs,
    ``[n_pairs, d]``, NaN where absent), over the tasks where each feature is present."""
    first = next(iter(per_task.values()))
    num = np.zeros(first.shape, dtype=np.float64)
    den = np.zeros(first.shape, dtype=np.float64)
    for task, w in target.items:
        f = np.asarray(per_task[task], dtype=np.float64)
        ok = np.isfinite(f)
        num += w * scaled(f)
        den += w * ok
    return np.where(den > 0, num / np.where(den > 0, den, 1.0), 0.0)


def bucket_part(n: int, target: Target) -> np.ndarray:
    out = np.zeros((n, TASK_BUCKETS))
    for task, w in target.items:
        out[:, task_bucket(task)] += w
    return out


def contexts(per_task: Mapping[str, np.ndarray] | np.ndarray, target: Target | str,
             metadata: np.ndarray | None = None) -> np.ndarray:
    """The contexts ``x`` of ``n`` pairs: raw signal features per target task (or one array for a single-task
    target), raw metadata features ``[n, len(METADATA_NAMES)]`` (None: all absent)."""
    target = target if isinstance(target, Target) else Target.parse(target)
    if not isinstance(per_task, Mapping):
        if len(target.items) != 1:
            raise ValueError("features of a multi-task target come per task")
        per_task = {target.tasks[0]: per_task}
    sig = signal_part(per_task, target)
    n = sig.shape[0]
    meta = np.full((n, len(METADATA_NAMES)), np.nan) if metadata is None else np.asarray(metadata, dtype=float)
    return np.hstack([sig, scaled(meta), bucket_part(n, target)])


def catalog_meta(store, models: Sequence[str], tasks: Sequence[str]) -> dict[str, SourceMeta]:
    """Tags and known raw scores (on ``tasks``, from the ``evaluations`` table: the model's fingerprint, the task's
    current data and metric) of each named model."""
    models = list(dict.fromkeys(models))
    if not models:
        return {}
    marks = ",".join("?" * len(models))
    rows = store.fetchall(f"SELECT name, tasks FROM models WHERE name IN ({marks})", models)
    tags = {n: tuple(json.loads(t)) if t else () for n, t in rows}
    known: dict[str, dict[str, float]] = {n: {} for n in models}
    if tasks:
        tmarks = ",".join("?" * len(tasks))
        for name, task, score in store.fetchall(
                f"SELECT m.name, e.task, e.score FROM evaluations e JOIN models m ON m.fingerprint = e.fingerprint "
                f"JOIN tasks t ON t.name = e.task AND t.data_hash = e.data_hash AND t.metric = e.metric "
                f"WHERE m.name IN ({marks}) AND e.task IN ({tmarks})", [*models, *tasks]):
            known[name][task] = float(score)
    return {n: SourceMeta(tags.get(n, ()), known[n]) for n in models}


def pair_contexts(store, pairs: Sequence[tuple[str, str]], target: Target,
                  extra_meta: Mapping[str, SourceMeta] | None = None) -> tuple[np.ndarray, list[str]]:
    """Contexts of ordered catalog pairs for ``target``: signatures computed where missing, features from the
    store, metadata from the catalog. Returns ``(X, names)``."""
    from . import signals

    pairs = list(pairs)
    names = sorted({m for p in pairs for m in p})
    per_task = {}
    fnames: list[str] = []
    for task in target.tasks:
        signals.ensure_signatures(store, names, task)
        per_task[task], fnames = signals.feature_matrix(store, pairs, task)
    meta = catalog_meta(store, names, target.tasks)
    if extra_meta:
        meta.update(extra_meta)
    return contexts(per_task, target, metadata_matrix(target, pairs, meta)), context_names(fnames)
