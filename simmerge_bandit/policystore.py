"""Policy state: each policy is restored from its snapshot in ``policy_state`` and caught up with the reward log.

A policy's state is the fold of the rewards in arrival order (``seq``); a snapshot records how far it got
(``last_seq``), the feature schema and the arm schema it learned in. A snapshot of another feature schema is
rebuilt from that schema's log rows; one of another arm schema is mapped (:func:`.descriptor.adapt`) or rebuilt
from the log, which recomputes descriptors. So ``rebuild`` from the log always gives the live state.
:class:`PolicyStore` is the part of :class:`~.engine.Engine` that holds them.
"""

from __future__ import annotations

import io
import json
import logging
from contextlib import contextmanager
from typing import Iterator, Sequence

import numpy as np

from . import descriptor
from .candidates import _schema
from .errors import InvalidInput

log = logging.getLogger("simmerge_bandit.engine")


class PolicyStore:
    """Loaded policies, their snapshots and the fold of the log (a part of :class:`~.engine.Engine`: it uses the
    engine's ``store``, ``config``, ``lock``, ``descriptors`` and the state set up in ``Engine.__init__``)."""

    def _make(self, name: str):
        """A fresh policy of a policy spec (:mod:`.policyspec`: ``NAME``, ``NAME:key=value,...``,
        ``fixed:OPERATOR``). ``NAME@predictor`` is NAME warm-started from the fitted SimMerge predictor: it learns
        the residual ``reward - prediction``, so with no rewards it ranks like the predictor."""
        from .policies import from_snapshot, make_policy
        from .policyspec import parse_policy

        spec = parse_policy(name)
        params = {"seed": self.config.seed, **spec.params}
        if spec.action is not None:
            params["operator"] = spec.action
        if spec.warm:
            stored = self._stored("predictor")
            if stored is None:
                raise InvalidInput(f"{name}: no fitted predictor yet; run `simmerge predictor fit` first")
            prior = from_snapshot(*stored)
            if not descriptor.adapt(prior, stored[1]):
                raise InvalidInput(f"{name}: the fitted predictor reads operators in an arm schema that cannot be "
                                   "mapped to today's (a method or parameter was removed); refit it with "
                                   "`simmerge predictor fit`")
            return make_policy(spec.base, prior=prior, **params)
        if spec.base == "predictor" and (meta := self._stored_meta("predictor")) is not None:
            # the fit chose its parameters (online_weight); a fresh or rebuilt predictor keeps them
            fitted = {k: v for k, v in meta.get("params", {}).items() if k != "prior"}
            return make_policy(spec.base, **{**fitted, **params})
        return make_policy(spec.base, **params)

    def _stored_meta(self, name: str) -> dict | None:
        """The JSON half of a policy's saved snapshot (without reading its arrays), or None."""
        row = self.store.fetchone("SELECT meta FROM policy_state WHERE policy = ?", [name])
        return None if row is None else json.loads(row[0])

    def _stored(self, name: str) -> tuple[dict, dict] | None:
        """The saved snapshot of a policy as (arrays, meta), or None."""
        row = self.store.fetchone("SELECT arrays, meta FROM policy_state WHERE policy = ?", [name])
        if row is None:
            return None
        with np.load(io.BytesIO(row[0]), allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}, json.loads(row[1])

    def policy(self, name: str | None = None):
        """The named policy, restored from its snapshot and caught up with the reward log."""
        name = name or self.config.default_policy
        with self.lock:
            if self._arm_version != (arm_version := descriptor.current().version):
                if self._arm_version is not None:  # a method was (un)registered: reload, mapped or rebuilt
                    self.reset()
                self._arm_version = arm_version
            self._learn_pending(due_only=True)
            if name not in self._policies:
                pol = self._make(name)
                row = self.store.fetchone("SELECT last_seq, arrays, meta FROM policy_state WHERE policy = ?", [name])
                last = 0
                if row is not None and json.loads(row[2]).get("feature_schema") != _schema():
                    # learned on contexts of another feature schema: start again from this schema's log rows
                    log.info("policy %s: snapshot is of another feature schema, rebuilding from the log", name)
                    row = None
                if row is not None:
                    with np.load(io.BytesIO(row[1]), allow_pickle=False) as npz:
                        arrays = {k: npz[k] for k in npz.files}
                    pol.restore(arrays, meta := json.loads(row[2]))
                    last = int(row[0])
                    if not descriptor.adapt(pol, meta):
                        # learned on descriptors of another arm schema: rebuilt from the log, which recomputes them
                        log.info("policy %s: snapshot is of another arm schema, rebuilding from the log", name)
                        pol, last = self._make(name), 0
                self._policies[name], self._last_seq[name], self._since_snapshot[name] = pol, last, 0
            self._catch_up(name)
            return self._policies[name]

    def _catch_up(self, name: str) -> int:
        if self._known_seq is not None and self._last_seq[name] >= self._known_seq:
            return 0
        # decisions logged under an older feature schema stay in the log (replay reads them) but their contexts do
        # not fit this schema's policies
        rows = self.store.fetchall(
            "SELECT r.seq, d.context, d.operator, d.arm, r.reward, d.propensity, d.params FROM rewards r "
            "JOIN decisions d ON d.id = r.decision_id WHERE r.seq > ? AND d.feature_schema = ? ORDER BY r.seq",
            [self._last_seq[name], _schema()])
        self._fold(name, rows)
        self._known_seq = max(self._known_seq or 0, self._last_seq[name])
        return len(rows)

    def _fold(self, name: str, rows: Sequence[tuple]) -> None:
        """Update policy ``name`` with log rows ``(seq, context, operator, arm, reward, propensity)`` in order."""
        pol = self._policies[name]
        pol.update_many(self.descriptors.learnable(rows))
        if rows:
            self._last_seq[name] = rows[-1][0]
            self._since_snapshot[name] += len(rows)
            if self._since_snapshot[name] >= self.config.snapshot_every and not self._snapshots_deferred:
                self._save(name)

    def _save(self, name: str) -> None:
        arrays, meta = self._policies[name].snapshot()
        meta["feature_schema"] = _schema()
        meta.update(descriptor.snapshot_meta())
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        with self.store.transaction():
            self.store.execute("DELETE FROM policy_state WHERE policy = ?", [name])
            self.store.execute("INSERT INTO policy_state (policy, last_seq, arrays, meta) VALUES (?,?,?,?)",
                               [name, self._last_seq[name], buf.getvalue(), json.dumps(meta)])
        self._since_snapshot[name] = 0

    @contextmanager
    def snapshots_deferred(self) -> Iterator[None]:
        """Within the block the policies learn from every reward as usual but write no snapshot per reward; those
        that learned are snapshotted once when it ends. For one process that learns from many rewards in a row (a
        search, the demo): a snapshot of a predictor-backed policy is tens of MB. Nothing is at risk in between: a
        snapshot is a cache of the reward log, and a policy loaded after a crash replays the log's tail."""
        with self.lock:
            self._snapshots_deferred += 1
        try:
            yield
        finally:
            with self.lock:
                self._snapshots_deferred -= 1
                if not self._snapshots_deferred:
                    self.flush()

    def flush(self) -> None:
        """Snapshot every loaded policy that learned something since its snapshot (called on shutdown)."""
        with self.lock:
            self._learn_pending()
            for name in self._policies:
                self._catch_up(name)
                if self._since_snapshot[name]:
                    self._save(name)

    def rebuild(self, name: str | None = None):
        """Rebuild a policy from the decision log alone, replace its snapshot, and return it."""
        name = name or self.config.default_policy
        with self.lock:
            self._learn_pending()
            self._policies[name] = self._make(name)
            self._last_seq[name], self._since_snapshot[name] = 0, 0
            self._catch_up(name)
            self._save(name)
            return self._policies[name]
