"""The evaluation queue: one owner for an evaluation job's life cycle.

A job is a decision the engine asked to have evaluated. States::

    queued --claim--> running --done--> done
       ^                 |
       +----retry--------+--fail (attempts left)
                         +--fail (no attempts left)--> failed

- :func:`enqueue` rows are written by the engine together with the decisions they belong to (one transaction).
- A reward closes its decision's job: :func:`claim` never hands out a job whose decision has a reward (it marks
  it ``done``, closed by feedback), and :func:`counts` reports such a job as done. So a decision rewarded by
  ``simmerge feedback`` is never merged and evaluated again.
- :func:`claim` moves one due job to ``running`` and counts the attempt; :func:`fail` puts it back with an
  exponential back-off until its attempts are spent; :func:`requeue_running` gives the jobs of a crashed process
  back to the queue. A job is never run twice at once: only ``queued`` jobs are claimed, by one worker thread.
"""

from __future__ import annotations

import json
from typing import Any, Sequence

STATES = ("queued", "running", "done", "failed")
COLUMNS = ("decision_id",)


def enqueue_rows(decision_ids: Sequence[str]) -> list[list[str]]:
    """Rows of ``eval_queue`` for new jobs (the caller inserts them in the transaction that logs the decisions)."""
    return [[d] for d in decision_ids]


def claim(store) -> str | None:
    """The oldest due queued job, now ``running`` (its attempt counted); None when there is none. A job whose
    decision was rewarded meanwhile is closed instead of claimed."""
    store.drain()  # not under the lock (see Store.drain)
    with store.lock:
        while True:
            row = store.fetchone(
                "SELECT q.decision_id, r.decision_id IS NOT NULL FROM eval_queue q LEFT JOIN rewards r "
                "ON r.decision_id = q.decision_id WHERE q.state = 'queued' AND (q.not_before IS NULL OR "
                "q.not_before <= current_timestamp) ORDER BY q.created_at LIMIT 1")
            if row is None:
                return None
            did, rewarded = row
            with store.transaction():
                if rewarded:
                    store.execute("UPDATE eval_queue SET state = 'done', result = ?, updated_at = current_timestamp "
                                  "WHERE decision_id = ?", [json.dumps({"closed_by": "feedback"}), did])
                    continue
                store.execute("UPDATE eval_queue SET state = 'running', attempts = attempts + 1, "
                              "updated_at = current_timestamp WHERE decision_id = ?", [did])
            return did


def done(store, decision_id: str, result: dict[str, Any]) -> None:
    with store.transaction():
        store.execute("UPDATE eval_queue SET state = 'done', result = ?, last_error = NULL, "
                      "updated_at = current_timestamp WHERE decision_id = ?", [json.dumps(result), decision_id])


def fail(store, decision_id: str, reason: str, *, max_attempts: int, backoff_s: float) -> tuple[bool, int]:
    """Record a failed attempt: back to the queue after ``backoff_s * 2**(attempts-1)`` seconds, or ``failed``
    once ``max_attempts`` are spent. Returns ``(final, attempts)``."""
    attempts = store.fetchone("SELECT attempts FROM eval_queue WHERE decision_id = ?", [decision_id])[0]
    final = attempts >= max_attempts
    delay = backoff_s * (2 ** (attempts - 1))
    with store.transaction():
        store.execute(
            "UPDATE eval_queue SET state = ?, last_error = ?, updated_at = current_timestamp, not_before = "
            "current_timestamp::TIMESTAMP + to_seconds(?) WHERE decision_id = ?",
            ["failed" if final else "queued", reason[:2000], float(delay), decision_id])
    return final, attempts


def requeue_running(store) -> int:
    """After a crash: jobs left ``running`` go back to the queue; returns how many."""
    n = store.fetchone("SELECT count(*) FROM eval_queue WHERE state = 'running'")[0]
    if n:
        with store.transaction():
            store.execute("UPDATE eval_queue SET state = 'queued', updated_at = current_timestamp "
                          "WHERE state = 'running'")
    return int(n)


def counts(store) -> dict[str, int]:
    """Jobs per state; a queued job whose decision has a reward counts as done (the reward closed it)."""
    out = {s: 0 for s in STATES}
    for state, n in store.fetchall(
            "SELECT CASE WHEN q.state = 'queued' AND r.decision_id IS NOT NULL THEN 'done' ELSE q.state END, "
            "count(*) FROM eval_queue q LEFT JOIN rewards r ON r.decision_id = q.decision_id GROUP BY 1"):
        out[state] = int(n)
    return out


def jobs(store) -> list[dict]:
    """Every evaluation job, oldest first."""
    return store.fetchdicts("SELECT * FROM eval_queue ORDER BY created_at")
