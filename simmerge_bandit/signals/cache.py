"""Persistence of signatures and pair features in the store, plus an in-process memo of loaded signatures.

Arrays are stored as raw little-endian bytes with their dtype and shape (no pickles), one row per array in
``signature_arrays``; the signature itself is one row of ``signatures`` keyed by
(model fingerprint, part, context, version) where the context is the probe set's content hash for the functional
part and the base model's fingerprint for the structural part. Loading many signatures is two queries joined on
exactly the keys asked for, decoded as zero-copy ``np.frombuffer`` views. (One packed blob per signature was
measured as well: DuckDB scans ~300 KB blobs about twice as slowly as the same bytes in ~100 KB rows, so rows
per array stay.)
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import numpy as np

PARTS = ("functional", "structural")


@dataclass
class Signature:
    """One part of one model's signature. ``status`` is ``ok`` or ``absent`` (then ``reason`` says why)."""

    part: str
    fingerprint: str
    context: str
    version: str
    model: str
    status: str = "ok"
    reason: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def key(self) -> tuple[str, str, str, str]:
        """(fingerprint, part, context, version): what the signature is stored under."""
        return (self.fingerprint, self.part, self.context, self.version)

    @property
    def ok(self) -> bool:
        """Whether it was computed (else ``reason`` says why it is absent)."""
        return self.status == "ok"

    def nbytes(self) -> int:
        """Approximate memory it holds (its arrays plus a fixed overhead), for the in-process memo's bound."""
        return sum(a.nbytes for a in self.arrays.values()) + 512


class _Memo:
    """A bounded LRU of loaded signatures keyed by their content key, each with the stores (state homes) it is
    known to be stored in: a signature loaded from or saved to one home is not taken as stored in another (it
    would then never be saved there)."""

    def __init__(self, max_bytes: int = 2 << 30):
        self.max_bytes = max_bytes
        self._items: OrderedDict[tuple, Signature] = OrderedDict()
        self._where: dict[tuple, set] = {}
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, key: tuple, where: str | None = None) -> Signature | None:
        """The signature with ``key``, if it is stored in ``where`` (None: in any store)."""
        with self._lock:
            sig = self._items.get(key)
            if sig is None or (where is not None and where not in self._where.get(key, ())):
                return None
            self._items.move_to_end(key)
            return sig

    def put(self, sig: Signature, where: str | None = None) -> None:
        """Keep ``sig``, stored in ``where``."""
        with self._lock:
            old = self._items.pop(sig.key, None)
            if old is not None:
                self._bytes -= old.nbytes()
            self._items[sig.key] = sig
            if where is not None:
                self._where.setdefault(sig.key, set()).add(where)
            self._bytes += sig.nbytes()
            while self._bytes > self.max_bytes and len(self._items) > 1:
                k, ev = self._items.popitem(last=False)
                self._where.pop(k, None)
                self._bytes -= ev.nbytes()

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._where.clear()
            self._bytes = 0

    def __len__(self) -> int:
        return len(self._items)


def _where(store) -> str:
    """Which store a memo entry belongs to: its state home."""
    return str(getattr(store, "home", id(store)))


MEMO = _Memo()


def _to_blob(a: np.ndarray) -> tuple[str, str, bytes]:
    a = np.asarray(a, order="C")                   # (ascontiguousarray would make a 0-d array 1-d)
    if a.dtype.byteorder == ">":
        a = a.astype(a.dtype.newbyteorder("<"))
    return a.dtype.str, json.dumps(list(a.shape)), a.tobytes()


def _from_blob(dtype: str, shape: str, data: bytes) -> np.ndarray:
    """A read-only view of the stored bytes (no copy)."""
    return np.frombuffer(data, dtype=np.dtype(dtype)).reshape(json.loads(shape))


def save_signature(store, sig: Signature) -> None:
    """Insert or replace one signature (and its arrays) in one transaction."""
    key = list(sig.key)
    with store.transaction():
        store.execute("DELETE FROM signature_arrays WHERE fingerprint=? AND part=? AND context=? AND version=?", key)
        store.execute("DELETE FROM signatures WHERE fingerprint=? AND part=? AND context=? AND version=?", key)
        store.execute(
            "INSERT INTO signatures (fingerprint, part, context, version, model, status, reason, meta, seconds) "
            "VALUES (?,?,?,?,?,?,?,?,?)",
            [*key, sig.model, sig.status, sig.reason, json.dumps(sig.meta), float(sig.seconds)])
        rows = [[*key, name, *_to_blob(arr)] for name, arr in sorted(sig.arrays.items())]
        store.insert_rows("signature_arrays", ["fingerprint", "part", "context", "version", "name", "dtype", "shape",
                                               "data"], rows)
    MEMO.put(sig, _where(store))


def load_signature(store, key: tuple[str, str, str, str]) -> Signature | None:
    """The stored signature with this key, from the memo when it was loaded before."""
    return load_signatures(store, [key]).get(tuple(key))


#: The keys asked for, as a relation to join with (four lists unnested side by side).
_KEYS = ("(SELECT unnest(?::VARCHAR[]) AS fingerprint, unnest(?::VARCHAR[]) AS part, unnest(?::VARCHAR[]) AS context, "
         "unnest(?::VARCHAR[]) AS version) k")


def load_signatures(store, keys) -> dict[tuple, Signature]:
    """Many signatures at once: two queries (signatures, then their arrays) for all that are not in the memo, each
    joined on exactly these keys (a model's signatures for other probe sets are not read); missing keys are left
    out."""
    keys = list(dict.fromkeys(tuple(k) for k in keys))
    where = _where(store)
    found = {k: MEMO.get(k, where) for k in keys}
    todo = [k for k, v in found.items() if v is None]
    if todo:
        cols = [list(c) for c in zip(*todo)]
        rows = store.fetchall(
            "SELECT s.fingerprint, s.part, s.context, s.version, s.model, s.status, s.reason, s.meta, s.seconds "
            f"FROM signatures s JOIN {_KEYS} USING (fingerprint, part, context, version)", cols)
        arrays: dict[tuple, dict] = {}
        if rows:
            for fp, part, ctx, ver, name, dt, shape, data in store.fetchall(
                    "SELECT a.fingerprint, a.part, a.context, a.version, a.name, a.dtype, a.shape, a.data "
                    f"FROM signature_arrays a JOIN {_KEYS} USING (fingerprint, part, context, version)", cols):
                arrays.setdefault((fp, part, ctx, ver), {})[name] = _from_blob(dt, shape, data)
        for fp, part, ctx, ver, model, status, reason, meta, seconds in rows:
            key = (fp, part, ctx, ver)
            sig = Signature(part=part, fingerprint=fp, context=ctx, version=ver, model=model, status=status,
                            reason=reason, meta=json.loads(meta), arrays=arrays.get(key, {}), seconds=seconds or 0.0)
            MEMO.put(sig, where)
            found[key] = sig
    return {k: v for k, v in found.items() if v is not None}


def list_signatures(store) -> list[dict]:
    """Every stored signature's row (no arrays), by model and part."""
    return store.fetchdicts("SELECT model, part, fingerprint, context, version, status, reason, seconds, computed_at "
                            "FROM signatures ORDER BY model, part, computed_at")


def save_features(store, key: tuple, model_a: str, model_b: str, task: str, values: dict, absent: dict) -> None:
    """Store (replacing) the features of one pair under ``key`` (fingerprints, context, version, mode)."""
    with store.transaction():
        store.execute("DELETE FROM pair_features WHERE fingerprint_a=? AND fingerprint_b=? AND context=? "
                      "AND version=? AND mode=?", list(key))
        store.execute("INSERT INTO pair_features (fingerprint_a, fingerprint_b, context, version, mode, model_a, "
                      "model_b, task, feature_values, absent_reasons) VALUES (?,?,?,?,?,?,?,?,?,?)",
                      [*key, model_a, model_b, task, json.dumps(values), json.dumps(absent)])


def load_features(store, key: tuple) -> tuple[dict, dict] | None:
    """The stored (values, absence reasons) of one pair under ``key``, or None."""
    row = store.fetchone("SELECT feature_values, absent_reasons FROM pair_features WHERE fingerprint_a=? AND "
                         "fingerprint_b=? AND context=? AND version=? AND mode=?", list(key))
    if row is None:
        return None
    return json.loads(row[0]), json.loads(row[1])
