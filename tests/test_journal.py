"""The write-ahead journal in front of DuckDB (simmerge_bandit/journal.py) and the store's use of it."""

import os
import pickle
import shutil
import subprocess
import sys
import textwrap
import time
import zlib

import numpy as np
import pytest

from simmerge_bandit import journal as jmod
from simmerge_bandit.journal import HEADER, MAGIC, JournalError, read_segment
from simmerge_bandit.store import Store

TABLE = "CREATE TABLE t (id VARCHAR PRIMARY KEY, x DOUBLE[], n INTEGER, created_at TIMESTAMP NOT NULL DEFAULT " \
        "current_timestamp)"


def open_with_table(home, interval_s=0.05):
    store = Store.open(home)
    if store.fetchone("SELECT count(*) FROM information_schema.tables WHERE table_name = 't'")[0] == 0:
        store.execute(TABLE)
    store.enable_journal(interval_s=interval_s)
    return store


def put(store, ids, x=None):
    with store.transaction(batch_inserts=True):
        store.insert_rows("t", ("id", "x", "n"), [[i, np.arange(3.0) if x is None else x, k]
                                                   for k, i in enumerate(ids)])


def segment_files(home):
    return sorted((home / "journal").glob("*.log"))


def test_a_journaled_batch_is_on_disk_when_the_block_exits_and_every_read_sees_it(simmerge_home):
    store = open_with_table(simmerge_home, interval_s=3600)  # the ingest thread waits: only reads drain
    before = time.time()
    put(store, ["a", "b"])
    files = segment_files(simmerge_home)
    assert files, "the batch must be in a journal file when the transaction block exits"
    records = [r for f in files for r in read_segment(f)[0]]
    assert len(records) == 1 and records[0][2][0][0] == "t" and [r[0] for r in records[0][2][0][2]] == ["a", "b"]
    assert store.journal.has_pending()
    time.sleep(1.1)  # created_at must be the append's time, not the read's
    rows = store.fetchall("SELECT id, x, n, epoch(created_at) FROM t ORDER BY id")
    assert [(r[0], list(r[1]), r[2]) for r in rows] == [("a", [0.0, 1.0, 2.0], 0), ("b", [0.0, 1.0, 2.0], 1)]
    offset = time.mktime(time.localtime(before)) - time.mktime(time.gmtime(before))  # stored as local time
    assert all(before - 1 <= r[3] - offset <= before + 1 for r in rows)
    assert not store.journal.has_pending()
    assert store.fetchone("SELECT value FROM meta WHERE key = 'journal_seq'") == (1,)
    store.close()
    assert segment_files(simmerge_home) == []  # everything is in DuckDB: the files go


def test_the_ingest_thread_moves_records_without_any_read(simmerge_home):
    store = open_with_table(simmerge_home, interval_s=0.01)
    put(store, ["a"])
    deadline = time.time() + 10
    while store.journal.has_pending() and time.time() < deadline:
        time.sleep(0.01)
    assert not store.journal.has_pending() and store.journal.ingests >= 1
    store.close()


def test_a_rolled_back_block_appends_nothing(simmerge_home):
    store = open_with_table(simmerge_home)
    with pytest.raises(ValueError):
        with store.transaction(batch_inserts=True):
            store.insert_rows("t", ("id", "x", "n"), [["a", np.zeros(2), 1]])
            raise ValueError
    assert store.journal.appended == 0
    assert store.fetchone("SELECT count(*) FROM t") == (0,)


def test_a_block_that_reads_becomes_a_duckdb_transaction_after_the_earlier_records(simmerge_home):
    store = open_with_table(simmerge_home, interval_s=3600)
    put(store, ["a"])
    with store.transaction(batch_inserts=True):
        store.insert_rows("t", ("id", "x", "n"), [["b", np.zeros(2), 1]])
        assert store.fetchone("SELECT count(*) FROM t") == (2,)  # its own row and the journal's earlier one
    assert store.journal.appended == 1
    assert store.fetchall("SELECT id FROM t ORDER BY id") == [("a",), ("b",)]


def test_a_failed_write_acknowledges_nothing_and_later_appends_follow_the_good_records(simmerge_home,
                                                                                       monkeypatch):
    store = open_with_table(simmerge_home, interval_s=3600)
    put(store, ["a"])
    real_write = os.write

    def short_then_fail(fd, data):  # half the record lands, then the disk is full
        real_write(fd, bytes(data[: len(data) // 2]))
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(jmod.os, "write", short_then_fail)
    with pytest.raises(JournalError, match="No space left"):
        put(store, ["b"])
    monkeypatch.setattr(jmod.os, "write", real_write)
    put(store, ["c"])
    records = [r for f in segment_files(simmerge_home) for r in read_segment(f)[0]]
    assert [[row[0] for row in rec[2][0][2]] for rec in records] == [["a"], ["c"]]
    assert [rec[0] for rec in records] == [1, 2]
    assert store.fetchall("SELECT id FROM t ORDER BY id") == [("a",), ("c",)]


def test_a_failed_fsync_refuses_every_later_record_and_readers_still_see_the_durable_ones(simmerge_home,
                                                                                          monkeypatch):
    store = open_with_table(simmerge_home, interval_s=3600)
    put(store, ["a"])

    def failing_fsync(fd):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(jmod, "_datasync", failing_fsync)
    with pytest.raises(JournalError, match="Input/output error"):
        put(store, ["b"])
    with pytest.raises(JournalError, match="failed an fsync earlier"):
        put(store, ["c"])
    # "a" was durable before the failure: readers still get it; "b" never was, and nobody sees it
    assert store.fetchall("SELECT id FROM t") == [("a",)]


def test_unsynced_records_are_neither_ingested_nor_acknowledged_until_sync(simmerge_home):
    store = open_with_table(simmerge_home, interval_s=0.01)
    with store.transaction(batch_inserts=True, sync=False):
        store.insert_rows("t", ("id", "x", "n"), [["a", np.zeros(2), 0]])
    seq = store.journal_record
    assert seq == 1 and store.journal.has_pending()
    time.sleep(0.2)  # the ingest thread runs every 10 ms but only takes synced records
    assert store.journal.ingests == 0
    store.journal.sync()
    deadline = time.time() + 10
    while store.journal.ingests == 0 and time.time() < deadline:
        time.sleep(0.01)
    assert store.journal.ingests >= 1
    assert store.fetchall("SELECT id FROM t") == [("a",)]
    store.close()


CRASH = textwrap.dedent("""
    import os, sys
    import numpy as np
    from simmerge_bandit.store import Store
    store = Store.open(sys.argv[1])
    store.execute("{table}")
    store.enable_journal(interval_s=3600)
    for k in range(int(sys.argv[2])):
        with store.transaction(batch_inserts=True):
            store.insert_rows("t", ("id", "x", "n"), [[f"r{{k}}", np.full(4, float(k)), k]])
        print(k, flush=True)  # acknowledged
    os.kill(os.getpid(), 9)
""")


def test_records_a_killed_process_acknowledged_are_replayed_when_the_store_opens(simmerge_home):
    proc = subprocess.run([sys.executable, "-c", CRASH.format(table=TABLE), str(simmerge_home), "25"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9
    acked = [int(line) for line in proc.stdout.split()]
    assert acked == list(range(25))
    assert segment_files(simmerge_home)
    store = Store.open(simmerge_home)
    rows = store.fetchall("SELECT id, x, n FROM t ORDER BY n")
    assert [(r[0], r[2]) for r in rows] == [(f"r{k}", k) for k in acked]
    assert all(list(r[1]) == [float(r[2])] * 4 for r in rows)
    assert store.fetchone("SELECT value FROM meta WHERE key = 'journal_seq'") == (25,)
    assert segment_files(simmerge_home) == []
    store.close()


def test_replay_after_a_crash_between_ingest_and_removal_inserts_nothing_twice(simmerge_home, tmp_path):
    store = open_with_table(simmerge_home, interval_s=3600)
    put(store, ["a", "b"])
    put(store, ["c"])
    saved = tmp_path / "saved"
    shutil.copytree(simmerge_home / "journal", saved)
    assert store.fetchone("SELECT count(*) FROM t") == (3,)  # ingested (journal_seq = 2) ...
    store.close()
    shutil.rmtree(simmerge_home / "journal")
    shutil.copytree(saved, simmerge_home / "journal")  # ... but the files survived the "crash"
    store = Store.open(simmerge_home)
    assert store.fetchall("SELECT id FROM t ORDER BY id") == [("a",), ("b",), ("c",)]
    assert segment_files(simmerge_home) == []


def _record(seq: int, payload: bytes) -> bytes:
    return HEADER.pack(MAGIC, len(payload), zlib.crc32(payload), seq, time.time()) + payload


def test_a_torn_tail_is_dropped_and_the_whole_records_before_it_replayed(simmerge_home):
    with Store.open(simmerge_home) as store:
        store.execute(TABLE)
    body = [_record(k + 1, pickle.dumps([("t", ("id", "x", "n"), [[f"r{k}", np.zeros(2), k]])]))
            for k in range(3)]
    (simmerge_home / "journal").mkdir()
    (simmerge_home / "journal" / "000000000001.log").write_bytes(body[0] + body[1] + body[2][:-5])
    store = Store.open(simmerge_home)
    assert store.fetchall("SELECT id FROM t ORDER BY id") == [("r0",), ("r1",)]


def test_a_whole_record_that_would_run_code_is_refused_and_kept(simmerge_home):
    Store.open(simmerge_home).close()

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    (simmerge_home / "journal").mkdir()
    path = simmerge_home / "journal" / "000000000001.log"
    path.write_bytes(_record(1, pickle.dumps([("t", ("id",), [[Evil()]])])))
    with pytest.raises(JournalError, match="posix.system|os.system"):
        Store.open(simmerge_home)
    assert path.exists()  # nothing was dropped


def test_the_journal_refuses_to_start_over_records_not_replayed(simmerge_home):
    store = Store.open(simmerge_home)
    (simmerge_home / "journal").mkdir()
    (simmerge_home / "journal" / "000000000001.log").write_bytes(b"x")
    with pytest.raises(JournalError, match="replay"):
        store.enable_journal()


def test_segments_rotate_and_fully_ingested_ones_are_removed(simmerge_home, monkeypatch):
    monkeypatch.setattr(jmod, "SEGMENT_BYTES", 2000)
    store = open_with_table(simmerge_home, interval_s=3600)
    for k in range(12):
        put(store, [f"r{k}"], x=np.zeros(50))  # ~600 bytes a record: a new segment every few
    assert len(segment_files(simmerge_home)) >= 3
    assert store.fetchone("SELECT count(*) FROM t") == (12,)
    store.journal._prune()
    assert len(segment_files(simmerge_home)) <= 2  # the one being written (and a spare)
    store.close()
    assert segment_files(simmerge_home) == []


def test_trim_drops_duckdbs_cached_blocks_and_restores_the_limit(simmerge_home):
    store = Store.open(simmerge_home)
    store.execute(TABLE)
    store.execute("SET memory_limit = '512MB'")
    limit = store.fetchone("SELECT current_setting('memory_limit')")[0]
    store.enable_journal(interval_s=3600, memory_limit="512MB")
    for k in range(20):  # about 80 MB of vectors: well above what a trim leaves (16 MB)
        put(store, [f"r{k}_{j}" for j in range(1000)], x=np.random.default_rng(k).normal(size=512))
    store.execute("CHECKPOINT")

    def cached():
        return store.fetchone("SELECT coalesce(sum(memory_usage_bytes), 0) FROM duckdb_memory()")[0]

    before = cached()
    store.journal.trim()
    assert store.journal.trims == 1
    assert before > 40e6 and cached() <= 17e6
    assert store.fetchone("SELECT current_setting('memory_limit')")[0] == limit
    assert store.fetchone("SELECT count(*) FROM t") == (20_000,)
    store.close()


def test_a_checkpoint_asked_for_runs_on_the_ingest_thread_after_the_waiting_rows(simmerge_home):
    import threading

    store = open_with_table(simmerge_home, interval_s=3600)  # only the checkpoint request wakes the thread
    put(store, [f"r{i}" for i in range(500)])
    got, done = [], threading.Event()
    store.journal.checkpoint_soon(lambda r: (got.append((r, threading.current_thread().name)), done.set()))
    assert done.wait(30)
    assert isinstance(got[0][0], float) and got[0][1] == "journal-ingest"
    assert not store.journal.has_pending() and store.journal.checkpoints == 1
    assert store.fetchone("SELECT count(*) FROM t") == (500,)
    store.close()
