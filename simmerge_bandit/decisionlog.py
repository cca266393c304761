"""The decision log: every suggestion the engine makes is a row of ``decision_log`` (its context and descriptor go
to ``vectors``, content-addressed, once), with the evaluation it asks for queued beside it; the evaluation budget is
counted from it.
"""

from __future__ import annotations

import bisect
import json
import math
import os
import time

import numpy as np

from . import descriptor, evalqueue
from .candidates import CandidateSet
from .errors import NotFound
from .vectors import vector_key

#: What the engine writes of a decision to ``decision_log`` (its context and descriptor go to ``vectors``, once).
DECISION_COLUMNS = ("id", "batch", "rank", "task", "models", "operator", "policy", "policy_version", "feature_schema",
                    "context_key", "arm_key", "predicted", "uncertainty", "propensity", "evaluate", "pair_propensity",
                    "arm_schema", "params")
#: What feedback reads of its decision (from the ``decisions`` view), and how many of its latest decisions the
#: engine keeps at hand for it (about 2 KB each).
FEEDBACK_FIELDS = ("context", "operator", "arm", "propensity", "feature_schema", "params")
RECENT_DECISIONS = 1024


def _finite(v: float) -> float | None:
    return float(v) if v is not None and math.isfinite(v) else None


class DecisionLog:
    """Logging decisions and reading them back, and the evaluation budget (a part of :class:`~.engine.Engine`: it
    uses the engine's ``store``, ``config``, ``lock``, ``descriptors`` and the caches set up in
    ``Engine.__init__``)."""

    def budget_used(self) -> int:
        """Evaluations requested in the current window (kept in memory after one read of the log)."""
        with self.lock:
            now = time.time()
            if self._eval_times is None:
                rows = self.store.fetchall(
                    "SELECT epoch(created_at) FROM decision_log WHERE evaluate AND created_at >= "
                    "current_timestamp::TIMESTAMP - to_seconds(?)", [float(self.config.eval_window_s)])
                # created_at is local wall time stored without zone; epoch() reads it as UTC.
                offset = time.mktime(time.localtime(now)) - time.mktime(time.gmtime(now))
                self._eval_times = sorted(float(r[0]) - offset for r in rows)
            cutoff = now - self.config.eval_window_s
            del self._eval_times[:bisect.bisect_left(self._eval_times, cutoff)]  # kept sorted: appended in time
            return len(self._eval_times)

    def _log(self, entries: list[dict], cs: CandidateSet, policy: str, pol, queue: bool = True) -> None:
        ids = self._random_hex(8 * len(entries) + 16)  # the batch id, then every decision id
        batch = ids[:32]
        version = str(pol.version)
        arm = descriptor.current()  # the schema of the candidates' descriptors (their cache key holds its version)
        rows, queued, recent, vectors = [], [], [], []
        for rank, e in enumerate(entries):
            did = ids[32 + 16 * rank: 48 + 16 * rank]
            # copies: a candidate's x is a row of the cached candidate matrix, which the log must not pin
            x, z = np.array(e["x"], dtype=float), np.array(e["z"], dtype=float)
            rows.append([did, batch, rank, cs.task, cs.names_json(tuple(e["models"])),
                         cs.names_json(tuple(e["operator"])), policy,
                         version, cs.feature_schema, self._vector(x, vectors), self._vector(z, vectors),
                         _finite(e["predicted"]), _finite(e["uncertainty"]), e["propensity"], e["evaluate"],
                         e["pair_propensity"], arm.version, self._params_json(cs, e)])
            recent.append((did, (x, rows[-1][5], z, e["propensity"], cs.feature_schema, rows[-1][-1])))
            if e["evaluate"]:
                if queue:
                    queued.append(did)
                if self._eval_times is not None:
                    self._eval_times.append(time.time())
            e["public"] = {
                "id": did, "task": cs.task, "target": cs.target.as_json(), "models": e["models"],
                "operator": e["operator"][0] if len(e["operator"]) == 1 else e["operator"],
                "predicted": _finite(e["predicted"]), "uncertainty": _finite(e["uncertainty"]),
                "propensity": e["propensity"], "evaluate": e["evaluate"], "explanation": e["explanation"],
                "policy": policy, "params": e["params"][0] if len(e["params"]) == 1 else e["params"]}
        with self.store.transaction():
            self.store.insert_rows("arm_schemas", ("version", "coordinates"), self.descriptors.unrecorded(arm))
            self.store.insert_rows("vectors", ("key", "v"), vectors)
            self.store.insert_rows("decision_log", DECISION_COLUMNS, rows)
            self.store.insert_rows("eval_queue", evalqueue.COLUMNS, evalqueue.enqueue_rows(queued))
        for key, _ in vectors:
            self._vectors[key] = None  # stored (a transaction that fails after this resets the engine)
        for did, fields in recent:
            self._recent[did] = fields
        while len(self._recent) > RECENT_DECISIONS:
            old = next(iter(self._recent))
            del self._recent[old]
            self._rewarded.pop(old, None)

    @staticmethod
    def _params_json(cs: CandidateSet, e: dict) -> str | None:
        """The concrete parameters of a decision's steps as JSON when a step is of a family or the decision merges
        more than two models (a group's weights are scaled, :func:`.candidates.group_operator`; a chain's are the
        catalog's, recorded too); the catalog's own parameters otherwise: NULL."""
        if not any(o.get("ranges") for o in cs.operators) and len(e["models"]) <= 2:
            return None
        return json.dumps(e["params"], sort_keys=True)

    def _vector(self, v: np.ndarray, new: list) -> int:
        """The key of ``v`` in ``vectors``; ``[key, v]`` is appended to ``new`` when the store does not hold it."""
        key = vector_key(v)
        known = self._vectors
        if known is None:
            known = self._vectors = dict.fromkeys(r[0] for r in self.store.fetchall("SELECT key FROM vectors"))
        if key not in known and all(key != k for k, _ in new):
            new.append([key, v])
        return key

    def _random_hex(self, n: int) -> str:
        """``os.urandom(n).hex()``, from 4 KiB read at a time: a system call releases the GIL, and in the daemon
        getting it back can take milliseconds."""
        buf, pid = self._entropy
        if len(buf) < n or pid != os.getpid():  # (a forked child must not reuse its parent's bytes)
            buf, pid = os.urandom(max(4096, n)), os.getpid()
        self._entropy = buf[n:], pid
        return buf[:n].hex()

    def decision(self, decision_id: str) -> dict:
        """One logged decision as a dict (models, operator and params decoded); :class:`NotFound` if unknown."""
        rows = self.store.fetchdicts("SELECT * EXCLUDE (context_key, arm_key) FROM decision_log WHERE id = ?",
                                     [decision_id])
        if not rows:
            raise NotFound(f"no decision with id {decision_id!r}")
        d = rows[0]
        d["models"], d["operator"] = json.loads(d["models"]), json.loads(d["operator"])
        d["params"] = json.loads(d["params"]) if d.get("params") else None
        return d
