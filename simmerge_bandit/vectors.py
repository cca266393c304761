"""The ``vectors`` table's keys: contexts and arm descriptors are stored once, content-addressed, and decisions
refer to them by key."""

from __future__ import annotations

import hashlib

import numpy as np


def vector_key(v) -> int:
    """The key of a float vector in ``vectors``: 64 bits of BLAKE2b over its float64 little-endian bytes.

    Content-addressed, so the same context or descriptor logged a million times is stored once. (Two different
    vectors share a key with probability ~n^2 / 2^65: about 3e-10 for a hundred thousand distinct vectors.)
    """
    raw = np.ascontiguousarray(v, dtype="<f8").tobytes()
    return int.from_bytes(hashlib.blake2b(raw, digest_size=8).digest(), "little", signed=True)


def legacy_decision_batches(columns, rows) -> list[tuple[str, tuple, list]]:
    """Rows for the old ``decisions`` table (contexts and descriptors inline) as rows of ``vectors`` and
    ``decision_log``: a journal written before m0012 is replayed into the new tables."""
    columns = tuple(columns)
    at_x, at_z = columns.index("context"), columns.index("arm")
    vectors: dict[int, object] = {}
    out_rows = []
    for row in rows:
        row = list(row)
        for j in (at_x, at_z):
            v = np.asarray(row[j], dtype=np.float64)
            key = vector_key(v)
            vectors.setdefault(key, v)
            row[j] = key
        out_rows.append(row)
    renamed = tuple({"context": "context_key", "arm": "arm_key"}.get(c, c) for c in columns)
    return [("vectors", ("key", "v"), [[k, v] for k, v in vectors.items()]), ("decision_log", renamed, out_rows)]
