"""The evaluation queue's life cycle on a real DuckDB file."""

from simmerge_bandit import evalqueue
from simmerge_bandit.store import Store


def _reward(store, did, seq):
    store.insert_rows("rewards", ("decision_id", "seq", "reward", "source"), [[did, seq, 0.5, "feedback"]])


def test_claim_done_fail_retry_and_close_by_feedback(simmerge_home):
    with Store.open(simmerge_home) as store:
        with store.transaction():
            store.insert_rows("eval_queue", evalqueue.COLUMNS, evalqueue.enqueue_rows(["d1", "d2", "d3"]))
        _reward(store, "d1", 1)  # rewarded by feedback before any worker looked: its job is closed, never run
        assert evalqueue.counts(store) == {"queued": 2, "running": 0, "done": 1, "failed": 0}
        assert evalqueue.claim(store) == "d2"
        assert store.fetchone("SELECT state, result FROM eval_queue WHERE decision_id = 'd1'") == \
            ("done", '{"closed_by": "feedback"}')
        assert evalqueue.counts(store)["running"] == 1
        evalqueue.done(store, "d2", {"reward": 0.7})
        assert evalqueue.claim(store) == "d3"
        final, attempts = evalqueue.fail(store, "d3", "boom", max_attempts=2, backoff_s=3600)
        assert (final, attempts) == (False, 1)
        assert evalqueue.claim(store) is None            # backing off: not due yet
        store.execute("UPDATE eval_queue SET not_before = NULL WHERE decision_id = 'd3'")
        assert evalqueue.claim(store) == "d3"            # the second attempt
        assert evalqueue.fail(store, "d3", "boom again", max_attempts=2, backoff_s=0) == (True, 2)
        assert evalqueue.claim(store) is None
        assert evalqueue.counts(store) == {"queued": 0, "running": 0, "done": 2, "failed": 1}
        assert store.fetchone("SELECT last_error FROM eval_queue WHERE decision_id = 'd3'")[0] == "boom again"


def test_requeue_after_a_crash(simmerge_home):
    with Store.open(simmerge_home) as store:
        with store.transaction():
            store.insert_rows("eval_queue", evalqueue.COLUMNS, evalqueue.enqueue_rows(["a", "b"]))
        assert evalqueue.claim(store) == "a"
        assert evalqueue.requeue_running(store) == 1
        assert evalqueue.requeue_running(store) == 0
        assert evalqueue.claim(store) == "a"
