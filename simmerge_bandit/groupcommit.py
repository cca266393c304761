"""Group commit for the calls that append to the decision log (suggest, feedback): see :class:`_Batcher`."""

from __future__ import annotations

import gc
import queue
import threading
import time
from typing import Any, Callable, NamedTuple

from .errors import SimmergeError
from .eventlog import event
from .httpserver import _status_of


class _Call(NamedTuple):
    op: Callable[[], Any]
    done: Callable[[int, Any], None]
    where: str
    order: int  # calls of a batch run by order, then arrival


class _Batcher:
    """Group commit for the calls that append to the decision log (suggest, feedback).

    Calls are queued; one thread takes every call waiting, runs them inside one transaction (the engine's own
    transactions join it), commits once, and only then answers them. A feedback is still answered only after its
    reward is durable, but N waiting calls cost one commit instead of N, and the calls that arrive while a batch
    runs form the next one: batches grow with the load and nobody waits for a timer. Feedback runs first, so the
    batch's suggestions rank with its rewards and their decisions go to the log in one INSERT.

    The engine updates its policies before the commit; when a batch fails to commit, the engine forgets what it
    holds in memory (it reloads from the store) and each call of the batch is retried alone, so one bad call
    cannot take the others down and nothing unacknowledged is learned.

    With the store's journal, the commit is a write to the journal, and a second thread (the syncer) fsyncs it
    and only then answers the batch's calls, while this thread already runs the next batch: the writer no longer
    sits idle for the fsync (23% of its time under load, measured). One fsync covers every batch written before
    it. If an fsync fails, the calls waiting for it are refused and the engine reloads what is durable.
    """

    IDLE_S = 0.5  # no call for this long: idle, a good moment to checkpoint
    #: A batch this slow took a cold path (candidates built, signatures read, modules imported): what it left
    #: allocated is long-lived, so it joins the objects Python's full collections skip (see Daemon.start).
    COLD_S = 0.25
    SLOW_S = 0.1  # a batch this slow is logged

    def __init__(self, engine, max_batch: int = 64, snapshot_s: float = 60.0,
                 after_batch: Callable[[], None] = lambda: None, idle_checkpoint_s: float = 5.0):
        self.engine = engine
        self.idle_checkpoint_s = idle_checkpoint_s
        self._last_checkpoint = time.monotonic()
        #: Called once after the calls of a batch were answered (the daemon wakes its HTTP loop once per batch,
        #: not once per answer: each wake-up is a write to the loop's self-pipe).
        self.after_batch = after_batch
        self.max_batch = max_batch
        self.snapshot_s = snapshot_s
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="batcher", daemon=True)
        self._synced: queue.SimpleQueue = queue.SimpleQueue()  # (batch, answers, started) waiting for an fsync
        self._syncer = threading.Thread(target=self._sync_run, name="syncer", daemon=True)
        self._last_snapshot = time.monotonic()
        self._closing = threading.Lock()
        self._closed = False
        self.batches = self.calls = 0  # served so far (calls / batches: how much one commit carries)

    def start(self) -> None:
        self._thread.start()
        self._syncer.start()

    def submit(self, call: _Call) -> None:
        """Queue a call; ``call.done(status, payload)`` runs on the syncer thread once its batch is durable."""
        with self._closing:
            if not self._closed:
                self._queue.put(call)
                return
        call.done(503, {"error": "daemon is shutting down"})
        self.after_batch()

    def close(self) -> None:
        """Answer every call queued so far, then stop (later calls are refused)."""
        with self._closing:
            self._closed = True
            self._queue.put(None)
        self._thread.join()
        self._synced.put(None)
        self._syncer.join()

    def _run(self) -> None:
        while True:
            batch, stop = self._take()
            if batch:
                self._serve(batch)
            if stop:
                return
            if time.monotonic() - self._last_snapshot >= self.snapshot_s:
                self._snapshot()
            if not batch and time.monotonic() - self._last_checkpoint >= self.idle_checkpoint_s:
                self._checkpoint()  # nothing came for IDLE_S

    def _checkpoint(self) -> None:
        """Fold DuckDB's write-ahead log into the database file while nobody waits (see Daemon.checkpoint_wal)."""
        self._last_checkpoint = time.monotonic()
        store = self.engine.store
        wal = store.wal_path
        try:
            if wal.stat().st_size < (1 << 20):
                return
        except OSError:
            return  # no log to fold
        if store.journal is not None:  # on the ingest thread: the next call must not wait for it
            store.journal.checkpoint_soon(self._checkpointed)
            return
        t = time.perf_counter()
        try:
            store.execute("CHECKPOINT")
        except Exception as e:  # DuckDB checkpoints on its own later; nothing is lost
            self._checkpointed(e)
            return
        self._checkpointed(time.perf_counter() - t)

    @staticmethod
    def _checkpointed(result: float | Exception) -> None:
        if isinstance(result, Exception):  # DuckDB checkpoints on its own later; nothing is lost
            event("checkpoint failed", reason=f"{type(result).__name__}: {result}")
        else:
            event("checkpoint", ms=round(1000 * result, 1))

    def _snapshot(self) -> None:
        """Snapshots bound the log tail a restart replays; one writes every policy's matrices (megabytes), so it
        happens on a clock between batches rather than every N rewards. A failed one is retried next time."""
        try:
            with self.engine.lock:
                self.engine.flush()
        except Exception as e:  # the log is the truth: a missing snapshot only makes the next start slower
            event("snapshot failed", reason=f"{type(e).__name__}: {e}")
        self._last_snapshot = time.monotonic()

    def _take(self) -> tuple[list[_Call], bool]:
        """The calls waiting now (at least one), ``([], False)`` after IDLE_S without any, and whether to stop."""
        try:
            first = self._queue.get(timeout=self.IDLE_S)
        except queue.Empty:
            return [], False
        if first is None:
            return [], True
        batch = [first]
        while len(batch) < self.max_batch:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is None:
                return batch, True
            batch.append(item)
        return batch, False

    def _serve(self, batch: list[_Call]) -> None:
        self.batches, self.calls = self.batches + 1, self.calls + len(batch)
        t0 = time.perf_counter()
        try:
            answers = self._commit(batch)
            if time.perf_counter() - t0 > self.COLD_S:
                gc.freeze()  # see COLD_S
        except Exception:  # the commit (or one call's SQL) failed: nothing of this batch is durable
            with self.engine.lock:  # no other thread may use what the engine learned from the batch
                self.engine.reset()
                answers = [self._alone(call) for call in batch]
        self._synced.put((batch, answers, t0))

    def _sync_run(self) -> None:
        """Answer batches once what they wrote is durable: one fsync for every batch waiting."""
        while True:
            items = [self._synced.get()]
            items += self._waiting()
            stop = None in items
            self._settle([it for it in items if it is not None])
            if stop:
                return

    def _waiting(self) -> list:
        out = []
        while True:
            try:
                out.append(self._synced.get_nowait())
            except queue.Empty:
                return out

    def serve_now(self, batch: list[_Call]) -> None:
        """Run and answer one batch on the calling thread (for callers without the threads, such as tests)."""
        self._serve(batch)
        self._settle(self._waiting())

    def _settle(self, items: list) -> None:
        if not items:
            return
        journal = self.engine.store.journal
        failed = None
        if journal is not None:
            try:
                journal.sync()
            except Exception as e:  # the disk failed: nothing written since the last good fsync is durable
                failed = e
                with self.engine.lock:
                    self.engine.reset()
                event("journal fsync failed", reason=f"{type(e).__name__}: {e}")
        for batch, answers, t0 in items:
            if failed is not None:
                answers = [(503, {"error": f"the state could not be made durable ({failed}); nothing of this "
                                            "call was kept; restart the daemon"})] * len(batch)
            self._answer(batch, answers)
            took = time.perf_counter() - t0
            if took > self.SLOW_S:
                event("slow batch", ms=round(1000 * took, 1), calls=len(batch),
                      fsync_ms=round(1000 * journal.last_sync_s, 1) if journal else None,
                      ingest_ms=round(1000 * journal.last_ingest_s, 1) if journal else None)
        try:
            self.after_batch()
        except Exception as e:  # the loop is gone (shutdown): nobody is waiting for these answers any more
            event("internal error", route="batch", reason=f"{type(e).__name__}: {e}")

    @staticmethod
    def _answer(batch: list[_Call], answers: list[tuple[int, Any]]) -> None:
        for call, (status, payload) in zip(batch, answers):
            try:
                call.done(status, payload)
            except Exception as e:  # this thread must outlive any one answer (a client gone, a log error)
                event("internal error", route=call.where, reason=f"{type(e).__name__}: {e}")

    def _alone(self, call: _Call) -> tuple[int, Any]:
        try:
            return self._commit([call])[0]
        except Exception as e:  # answered with its reason; the daemon keeps serving
            self.engine.reset()
            return _status_of(e, call.where)

    def _commit(self, batch: list[_Call]) -> list[tuple[int, Any]]:
        answers: list[tuple[int, Any]] = [(500, None)] * len(batch)
        with self.engine.lock, self.engine.store.transaction(batch_inserts=True, sync=False):
            for i in sorted(range(len(batch)), key=lambda i: batch[i].order):
                try:
                    answers[i] = 200, batch[i].op()
                except SimmergeError as e:  # a user's error writes nothing; the batch goes on
                    answers[i] = _status_of(e, batch[i].where)
        return answers
