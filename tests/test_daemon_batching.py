"""The daemon's group commit and HTTP layer, in process: a real engine on a real DuckDB file, real sockets."""

import asyncio
import json
import socket
import threading
import time
from pathlib import Path

import duckdb
import numpy as np
import pytest

from simmerge_bandit import journal as jmod
from simmerge_bandit.daemon import _Batcher, _Call, _HttpServer
from simmerge_bandit.engine import Engine, EngineConfig
from simmerge_bandit.errors import NotFound
from simmerge_bandit.paths import state_path
from simmerge_bandit.store import Store

from test_daemon import home  # noqa: F401  (the fixture: a base, two fine-tunes, a task, two operators)


@pytest.fixture
def engine(home):  # noqa: F811
    with Store.open(home) as store:
        yield Engine(store, EngineConfig(eval_budget=0, snapshot_every=10_000))


def collect(batcher: _Batcher, calls: list) -> list[tuple[int, object]]:
    """Queue ``calls`` (op, order) and serve them as one batch, as the batcher thread does."""
    answers: dict[int, tuple[int, object]] = {}
    for i, (op, order) in enumerate(calls):
        batcher.submit(_Call(op, lambda s, p, i=i: answers.__setitem__(i, (s, p)), f"call {i}", order))
    batch, stop = batcher._take()
    assert len(batch) == len(calls) and not stop
    batcher.serve_now(batch)
    return [answers[i] for i in range(len(calls))]


def test_a_batch_is_one_transaction_answered_after_its_commit(engine, home):  # noqa: F811
    ids = [engine.suggest("double", top=1)[0]["id"] for _ in range(3)]
    other = duckdb.connect(str(state_path(home)))  # sees only what is committed
    seen_at_answer = []

    transactions = []

    def feedback(did, reward):
        def op():
            transactions.append(engine.store.transaction_id())
            return engine.feedback(did, reward)
        return op

    batcher = _Batcher(engine)
    calls = [(lambda: engine.suggest("double", top=2), 1)]
    calls += [(feedback(d, 0.1 * (k + 1)), 0) for k, d in enumerate(ids)]
    calls += [(feedback("nope", 0.5), 0)]
    answers = {}
    for i, (op, order) in enumerate(calls):
        def done(s, p, i=i):
            seen_at_answer.append(other.execute("SELECT count(*) FROM rewards").fetchone()[0])
            answers[i] = (s, p)
        batcher.submit(_Call(op, done, f"call {i}", order))
    batch, _ = batcher._take()
    batcher.serve_now(batch)

    assert len(transactions) == 4 and len(set(transactions)) == 1 and None not in transactions  # one transaction
    assert seen_at_answer == [3] * 5           # every answer came after the rewards were committed
    assert [answers[i][0] for i in range(5)] == [200, 200, 200, 200, 404]
    # feedback ran first: the suggestion ranked with all three rewards, and its two decisions are logged
    assert engine.policy().n_updates == 3
    logged = other.execute("SELECT policy_version FROM decisions WHERE id IN (?, ?)",
                           [r["id"] for r in answers[0][1]]).fetchall()
    assert [v for (v,) in logged] == [engine.policy().version] * 2
    other.close()


def test_with_the_journal_answers_wait_for_the_fsync_and_a_failed_fsync_refuses_them(engine, monkeypatch):
    ids = [engine.suggest("double", top=1)[0]["id"] for _ in range(4)]
    engine.feedback(ids[3], 0.2)  # warm (the reward counter is read once): the batches below only write
    engine.store.enable_journal(interval_s=3600)
    events = []
    real_sync = jmod.Journal.sync

    def sync(self):
        events.append(("sync", len(self._unsynced)))
        return real_sync(self)

    monkeypatch.setattr(jmod.Journal, "sync", sync)
    batcher = _Batcher(engine)
    for k, did in enumerate(ids[:2]):
        batcher.submit(_Call(lambda did=did, k=k: engine.feedback(did, 0.1 * (k + 1)),
                             lambda s, p: events.append(("answer", s)), "feedback", 0))
    batch, _ = batcher._take()
    batcher._serve(batch)
    assert events == []                         # written, not yet durable: nobody answered
    assert engine.store.journal.has_pending() and engine.store.journal_record is not None
    batcher.serve_now([])
    assert events == [("sync", 1), ("answer", 200), ("answer", 200)]

    def broken(fd):
        raise OSError(5, "Input/output error")

    events.clear()
    monkeypatch.setattr(jmod, "_datasync", broken)
    batcher.submit(_Call(lambda: engine.feedback(ids[2], 0.7), lambda s, p: events.append(("answer", s, p)),
                         "feedback", 0))
    batch, _ = batcher._take()
    batcher.serve_now(batch)
    assert events[0] == ("sync", 1) and events[1][1] == 503 and "restart" in events[1][2]["error"]
    assert engine.store.fetchone("SELECT count(*) FROM rewards WHERE decision_id = ?", [ids[2]]) == (0,)
    assert engine.store.fetchone("SELECT count(*) FROM rewards WHERE decision_id IN (?, ?)", ids[:2]) == (2,)


def test_a_failing_call_is_retried_alone_and_nothing_unacknowledged_is_learned(engine):
    ids = [engine.suggest("double", top=1)[0]["id"] for _ in range(3)]
    batcher = _Batcher(engine)

    def broken():  # a bug that leaves the batch's transaction unusable
        engine.store.execute("INSERT INTO no_such_table VALUES (1)")

    answers = collect(batcher, [(lambda: engine.feedback(ids[0], 0.3), 0), (broken, 0),
                                (lambda: engine.feedback(ids[1], 0.6), 0)])
    assert [s for s, _ in answers] == [200, 500, 200]
    assert "no_such_table" in answers[1][1]["error"]
    stored = dict(engine.store.fetchall("SELECT decision_id, reward FROM rewards"))
    assert stored == {ids[0]: pytest.approx(0.3), ids[1]: pytest.approx(0.6)}
    live = engine.policy().snapshot()[0]
    rebuilt = Engine(engine.store).rebuild().snapshot()[0]
    assert engine.policy().n_updates == 2
    for k in live:
        if "rng" not in k:
            np.testing.assert_allclose(live[k], rebuilt[k], rtol=1e-9, atol=1e-12)


def test_domain_errors_do_not_roll_back_the_batch(engine):
    did = engine.suggest("double", top=1)[0]["id"]
    batcher = _Batcher(engine)

    def missing():
        raise NotFound("no such thing")

    answers = collect(batcher, [(missing, 0), (lambda: engine.feedback(did, 0.4), 0)])
    assert answers[0] == (404, {"error": "no such thing"}) and answers[1][0] == 200
    assert engine.store.fetchone("SELECT reward FROM rewards WHERE decision_id = ?", [did])[0] == 0.4


@pytest.mark.parametrize("snapshot_s, snapshotted", [(0.0, True), (3600.0, False)])
def test_policy_snapshots_follow_the_clock(engine, snapshot_s, snapshotted):
    ids = [engine.suggest("double", top=1)[0]["id"] for _ in range(2)]
    batcher = _Batcher(engine, snapshot_s=snapshot_s)
    batcher.start()
    answered = threading.Semaphore(0)
    for did in ids:
        batcher.submit(_Call(lambda did=did: engine.feedback(did, 0.5), lambda s, p: answered.release(), "fb", 0))
    for _ in ids:
        assert answered.acquire(timeout=60)
    batcher.close()
    row = engine.store.fetchone("SELECT last_seq FROM policy_state WHERE policy = 'linucb-hybrid'")
    last = engine.store.fetchone("SELECT max(seq) FROM rewards")[0]
    assert ((row[0] if row else 0) == last) is snapshotted


@pytest.mark.parametrize("journaled", [False, True])
def test_the_write_ahead_log_is_checkpointed_when_idle_not_between_busy_batches(engine, home, journaled,  # noqa: F811
                                                                                 monkeypatch):
    wal = Path(str(state_path(home)) + ".wal")
    ran_on = []
    if journaled:  # the daemon's case: the checkpoint runs on the journal's ingest thread, not the batcher's
        engine.store.enable_journal(interval_s=0.05, memory_limit="1GB")
        real = jmod.Journal._checkpoint

        def checkpoint(self, done):
            ran_on.append(threading.current_thread().name)
            return real(self, done)

        monkeypatch.setattr(jmod.Journal, "_checkpoint", checkpoint)
    engine.store.execute("SET checkpoint_threshold = '1GB'")  # DuckDB itself would not checkpoint this soon
    engine.store.execute("CREATE TABLE filler (i BIGINT, x DOUBLE)")
    for k in range(30):  # small appends go to the log (a large one would be written to the file directly)
        engine.store.execute(f"INSERT INTO filler SELECT range, range * 0.5 FROM range({k * 10000}, {(k + 1) * 10000})")
    assert wal.stat().st_size > (1 << 20)
    batcher = _Batcher(engine, idle_checkpoint_s=0.0)
    busy = threading.Event()

    def keep_busy():  # a call every 0.1 s: never idle for _Batcher.IDLE_S
        while not busy.is_set():
            batcher.submit(_Call(lambda: None, lambda s, p: None, "x", 0))
            busy.wait(0.1)

    feeder = threading.Thread(target=keep_busy)
    feeder.start()
    batcher.start()
    time.sleep(1.5)
    assert wal.stat().st_size > (1 << 20)  # busy all along: no checkpoint yet
    busy.set()
    feeder.join()
    deadline = time.time() + 10
    while wal.exists() and wal.stat().st_size > (1 << 20) and time.time() < deadline:
        time.sleep(0.1)
    batcher.close()
    assert not wal.exists() or wal.stat().st_size < (1 << 20)
    assert engine.store.fetchone("SELECT count(*) FROM filler") == (300000,)
    if journaled:
        assert ran_on == ["journal-ingest"] and engine.store.journal.checkpoints == 1


def test_calls_after_close_are_refused(engine):
    batcher = _Batcher(engine)
    batcher.start()
    batcher.close()
    got = []
    batcher.submit(_Call(lambda: 1, lambda s, p: got.append(s), "x", 0))
    assert got == [503]


def test_batch_inserts_merge_and_keep_read_your_writes(home):  # noqa: F811
    with Store.open(home) as store:
        store.execute("CREATE TABLE t (i INTEGER, s VARCHAR)")
        with store.transaction(batch_inserts=True):
            store.insert_rows("t", ("i", "s"), [[1, "a"]])
            store.insert_rows("t", ("i", "s"), [[2, "b"], [3, "c"]])
            assert store.fetchone("SELECT count(*) FROM t")[0] == 3  # sent before the read
            store.insert_rows("t", ("i", "s"), [[4, "d"]])
        assert store.fetchall("SELECT i FROM t ORDER BY i") == [(1,), (2,), (3,), (4,)]
        with pytest.raises(RuntimeError):
            with store.transaction(batch_inserts=True):
                store.insert_rows("t", ("i", "s"), [[5, "e"]])
                raise RuntimeError("rolled back")
        assert store.fetchone("SELECT count(*) FROM t")[0] == 4
        store.insert_rows("t", ("i", "s"), [[6, "f"]])  # outside a batching transaction: sent at once
        assert store.fetchone("SELECT max(i) FROM t")[0] == 6


# ---- the HTTP layer ----

@pytest.fixture
def server():
    seen = []

    def handle(method, target, headers, body):
        """Answers in each of the three ways a handler may: a coroutine, a future (set on a later turn of the
        loop), or ``(status, payload)`` at once."""
        seen.append((method, target, body))
        payload = {"method": method, "target": target, "body": body.decode(), "auth": headers.get("authorization")}
        if target == "/now":
            return 200, payload
        if target.startswith("/fut"):
            fut = srv.loop.create_future()
            if target == "/fut-boom":
                srv.loop.call_soon(fut.set_exception, RuntimeError("future bug"))
            else:
                srv.loop.call_soon(fut.set_result, (200, payload))
            return fut

        async def later():
            if target == "/boom":
                raise RuntimeError("handler bug")
            await asyncio.sleep(0)
            return 200, payload
        return later()

    srv = _HttpServer("127.0.0.1", 0, handle)
    srv.MAX_BODY = 1000
    srv.start()
    yield srv, seen
    srv.close()


def exchange(port: int, raw: bytes, responses: int = 1) -> list[tuple[int, dict, bytes]]:
    """Send raw bytes, read ``responses`` answers (status, headers, body) or until the server closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(raw)
        f = s.makefile("rb")
        out = []
        while len(out) < responses:
            line = f.readline()
            if not line:
                break
            status = int(line.split()[1])
            headers = {}
            while (h := f.readline()) not in (b"\r\n", b""):
                k, _, v = h.decode().partition(":")
                headers[k.strip().lower()] = v.strip()
            if status == 100:
                continue
            out.append((status, headers, f.read(int(headers["content-length"]))))
        out.append(f.read())  # what follows: b"" when the server closed the connection
        return out


def test_keep_alive_pipelining_and_connection_close(server):
    srv, seen = server
    body = b'{"a": 1}'
    req = b"POST /x HTTP/1.1\r\nHost: h\r\nAuthorization: Bearer t\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
    last = b"GET /y HTTP/1.1\r\nConnection: close\r\n\r\n"
    *answers, rest = exchange(srv.port, req + req + last, responses=3)
    assert [a[0] for a in answers] == [200, 200, 200]
    assert json.loads(answers[0][2]) == {"method": "POST", "target": "/x", "body": '{"a": 1}', "auth": "Bearer t"}
    assert answers[2][1]["connection"] == "close" and rest == b""
    assert [s[1] for s in seen] == ["/x", "/x", "/y"]


def test_expect_100_continue(server):
    srv, _ = server
    answers = exchange(srv.port, b"POST /z HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 2\r\n"
                                 b"Connection: close\r\n\r\n{}")
    assert answers[0][0] == 200 and json.loads(answers[0][2])["body"] == "{}"


@pytest.mark.parametrize("raw, status", [
    (b"NONSENSE\r\n\r\n", 400),
    (b"POST /x HTTP/1.1\r\nno colon here\r\n\r\n", 400),
    (b"POST /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n", 501),
    (b"POST /x HTTP/1.1\r\nContent-Length: 5000\r\n\r\n", 413),
    (b"POST /x HTTP/1.1\r\nContent-Length: nope\r\n\r\n", 400),
    (b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\n\r\n", 431),
])
def test_malformed_requests_are_refused_and_the_connection_closed(server, raw, status):
    srv, seen = server
    (code, headers, body), rest = exchange(srv.port, raw)
    assert code == status and "error" in json.loads(body) and headers["connection"] == "close" and rest == b""
    assert seen == []


def test_a_handler_error_answers_500_and_the_connection_survives(server):
    srv, _ = server
    *answers, _ = exchange(srv.port, b"GET /boom HTTP/1.1\r\n\r\nGET /ok HTTP/1.1\r\nConnection: close\r\n\r\n",
                           responses=2)
    assert [a[0] for a in answers] == [500, 200]
    assert "handler bug" in json.loads(answers[0][2])["error"]


def test_feedback_for_a_decision_logged_before_this_engine_started(engine):
    did = engine.suggest("double", top=1)[0]["id"]
    fresh = Engine(engine.store, EngineConfig(eval_budget=0))  # nothing at hand: reads the decision from the log
    assert fresh.feedback(did, 0.7)["status"] == "recorded"
    assert fresh.feedback(did, 0.7)["status"] == "unchanged"
    assert fresh.policy().n_updates == 1
    with pytest.raises(NotFound):
        fresh.feedback("never-logged", 0.7)


def test_answers_now_from_futures_and_from_coroutines_keep_their_order(server):
    srv, seen = server
    reqs = b"".join(b"GET /%s HTTP/1.1\r\n\r\n" % t for t in (b"fut", b"now", b"co", b"fut-boom", b"now"))
    *answers, _ = exchange(srv.port, reqs + b"GET /now HTTP/1.1\r\nConnection: close\r\n\r\n", responses=6)
    assert [a[0] for a in answers] == [200, 200, 200, 500, 200, 200]
    assert [json.loads(a[2]).get("target") for a in answers] == ["/fut", "/now", "/co", None, "/now", "/now"]
    assert "future bug" in json.loads(answers[3][2])["error"]


def test_thousands_of_pipelined_requests_answered_at_once(server):
    srv, _ = server
    n = 3000  # answered in a loop: one recursion per request would overflow Python's stack
    *answers, rest = exchange(srv.port, b"GET /now HTTP/1.1\r\n\r\n" * n + b"GET /now HTTP/1.1\r\nConnection: "
                              b"close\r\n\r\n", responses=n + 1)
    assert len(answers) == n + 1 and {a[0] for a in answers} == {200} and rest == b""
