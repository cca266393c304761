"""The long-running daemon: one process that owns the state and serves a JSON API on loopback.

It answers suggest / feedback / catalog calls, watches checkpoint folders, and runs the evaluation queue (merge,
evaluate, feedback). A reward is acknowledged only after it is committed; the queue's job states are persisted so a
``kill -9`` loses nothing acknowledged, and a restart resumes or retries what was running.

Threads: one asyncio loop reads and answers every connection (:class:`_HttpServer`); suggest and feedback calls go
to one batcher thread that runs the calls waiting together in one transaction (:class:`_Batcher`, a group
commit); the other calls run on a small fixed pool; the evaluation worker and the folder watcher have a thread each.
"""

from __future__ import annotations

import asyncio
import collections
import gc
import hmac
import http
import ipaddress
import json
import logging
import os
import queue
import re
import secrets
import shutil
import signal
import socket
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Awaitable, Callable, NamedTuple
from urllib.parse import urlparse

import threadpoolctl

from .errors import InvalidInput, NotFound, SimmergeError
from .paths import daemon_file, pid_alive, resolve_home

log = logging.getLogger("simmerge.daemon")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        try:
            return all(ipaddress.ip_address(a[4][0]).is_loopback for a in socket.getaddrinfo(host, None))
        except OSError:
            return False


def read_daemon_file(home: Path) -> dict | None:
    """The running daemon's {pid, port, token, host}, or None when there is none (a stale file is ignored)."""
    try:
        info = json.loads(daemon_file(home).read_text())
        if pid_alive(int(info["pid"])):
            return info
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return None


def write_daemon_file(home: Path, info: dict) -> None:
    path = daemon_file(home)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(info, fh)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


class _EventFormatter(logging.Formatter):
    """One line per event; a record from :func:`events` carries several (one per item)."""

    def format(self, record: logging.LogRecord) -> str:
        items = getattr(record, "items", None)
        if items is None:
            return self.line(record, record.getMessage(), getattr(record, "fields", {}))
        return "\n".join(self.line(record, msg, fields) for msg, fields in items)

    def line(self, record: logging.LogRecord, msg: str, fields: dict) -> str:
        raise NotImplementedError


class _JsonFormatter(_EventFormatter):
    def line(self, record: logging.LogRecord, msg: str, fields: dict) -> str:
        return json.dumps({"ts": round(record.created, 3), "level": record.levelname.lower(), "msg": msg,
                           **fields}, default=str)


class _TextFormatter(_EventFormatter):
    def format(self, record: logging.LogRecord) -> str:
        record.clock = time.strftime("%H:%M:%S", time.localtime(record.created))  # once for a record's lines
        return super().format(record)

    def line(self, record: logging.LogRecord, msg: str, fields: dict) -> str:
        text = " ".join([f"{k}={v}" for k, v in fields.items()])
        return f"{record.clock} {msg} {text}".rstrip()


def event(msg: str, **fields: Any) -> None:
    log.info(msg, extra={"fields": fields})


def events(items: list[tuple[str, dict]]) -> None:
    """``event(msg, **fields)`` for each ``(msg, fields)`` of ``items``, through one log record (the lines of one
    batch: a record costs ~40 us of logging machinery, under the GIL)."""
    if items:
        log.info("%d events", len(items), extra={"items": items})


def _status_of(err: Exception, where: str) -> tuple[int, dict]:
    """The HTTP answer for an error: a user's error with its own status, anything else 500 (and a log line)."""
    if isinstance(err, SimmergeError):
        return err.http_status, {"error": str(err)}
    event("internal error", route=where, reason=f"{type(err).__name__}: {err}")
    return 500, {"error": f"internal error: {type(err).__name__}: {err}"}


_PHRASES = {s.value: s.phrase for s in http.HTTPStatus}


class _Route(NamedTuple):
    op: Callable[[dict], Any]
    batched: bool = False                     # through the group commit
    log: Callable[[Any], list] | None = None  # the answer's log lines ((msg, fields)), logged once committed
    order: int = 0                            # within a batch


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


class _BadRequest(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class _HttpServer:
    """A small HTTP/1.1 server for the JSON API: one asyncio loop, in its own thread, for every connection.

    Why not ``http.server``: ThreadingHTTPServer spends a thread per connection and parses headers through
    ``email.parser`` (about 0.6 ms of CPU a request, under the GIL, as much as ranking 1,320 candidates); here one
    thread reads every connection, parses the few headers this API needs (Content-Length, Connection,
    Authorization) and calls ``handle(method, target, headers, body)``, which returns ``(status, payload)``, an
    :class:`asyncio.Future` of it (answered from the future's callback: no task per request) or a coroutine.
    Each connection is a plain :class:`asyncio.Protocol` that parses the bytes as they arrive (a stream reader's
    await per header line cost the loop thread about a fifth of the daemon's CPU under load).
    """

    MAX_BODY = 16 << 20
    MAX_HEADERS = 100
    MAX_LINE = 64 << 10  # the request line and headers together

    def __init__(self, host: str, port: int, handle: Callable[..., Any]):
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        self.sock = socket.create_server((host, port), family=family)
        self.port = self.sock.getsockname()[1]
        self.handle = handle
        self.loop = asyncio.new_event_loop()
        self._conns: set[_HttpConnection] = set()
        self._server: asyncio.base_events.Server | None = None
        self._thread = threading.Thread(target=self._run, name="http", daemon=True)

    def start(self) -> None:
        self._server = self.loop.run_until_complete(
            self.loop.create_server(lambda: _HttpConnection(self), sock=self.sock))
        self._thread.start()

    def stop_accepting(self) -> None:
        self.loop.call_soon_threadsafe(self._server.close)

    def close(self) -> None:
        """Flush the answers being written, close every connection and stop the loop."""
        asyncio.run_coroutine_threadsafe(self._close(), self.loop).result(timeout=30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=30)
        self.loop.close()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    async def _close(self) -> None:
        self._server.close()
        conns = list(self._conns)
        for c in conns:
            c.transport.close()  # what is buffered is still written
        deadline = time.monotonic() + 5
        while self._conns and time.monotonic() < deadline:
            await asyncio.sleep(0.01)

    @staticmethod
    def response(status: int, payload: Any, keep: bool) -> bytes:
        body = json.dumps(payload, default=str).encode()
        close = "" if keep else "Connection: close\r\n"
        head = (f"HTTP/1.1 {status} {_PHRASES.get(status, '')}\r\nServer: simmerge\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n{close}\r\n")
        return head.encode("latin-1") + body


class _HttpConnection(asyncio.Protocol):
    """One client connection: requests are parsed from the bytes received and answered in order, one at a time
    (a pipelined request waits in the buffer until the one before it is answered)."""

    PAUSE_AT = 1 << 20  # stop reading while this much waits unparsed behind a request being answered

    def __init__(self, server: _HttpServer):
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.busy = False       # a request is being answered
        self.closed = False
        self.paused = False
        self.continued = False  # "100 Continue" sent for the request whose body is awaited
        self.eof = False        # the client has finished sending
        self.keep = True        # the request being answered: keep the connection open after it
        self.target = ""

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.server._conns.add(self)

    def connection_lost(self, exc) -> None:
        self.closed = True
        self.server._conns.discard(self)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if self.busy:
            if len(self.buf) > self.PAUSE_AT and not self.paused:
                self.transport.pause_reading()
                self.paused = True
            return
        self._next()

    def eof_received(self) -> bool:
        self.eof = True
        return self.busy  # keep the write side open for the answer being made (closed after it)

    def _next(self) -> None:
        """Answer the complete requests in the buffer, in order, until one has to wait for its answer."""
        while not (self.closed or self.busy):
            try:
                request = self._parse()
            except _BadRequest as e:
                self.transport.write(_HttpServer.response(e.status, {"error": str(e)}, keep=False))
                self.transport.close()
                self.closed = True
                return
            if request is None:
                if self.eof:  # nothing more will come: what is left in the buffer is an incomplete request
                    self.transport.close()
                    self.closed = True
                    return
                if self.paused:
                    self.transport.resume_reading()
                    self.paused = False
                return
            self.busy = True
            method, target, headers, body, self.keep = request
            self.target = target
            try:
                answer = self.server.handle(method, target, headers, body)
            except Exception as e:  # answered, and the connection stays usable
                answer = _status_of(e, target)
            if isinstance(answer, tuple):
                self._write(*answer)  # (a loop, not recursion: a client may pipeline thousands of requests)
            elif isinstance(answer, asyncio.Future):  # answered from its callback: no task per request
                answer.add_done_callback(self._done)
            else:
                self.server.loop.create_task(self._await(answer))

    def _done(self, fut: asyncio.Future) -> None:
        try:
            status, payload = fut.result()
        except Exception as e:  # answered, and the connection stays usable
            status, payload = _status_of(e, self.target)
        self._write(status, payload)
        self._next()

    async def _await(self, answer: Awaitable[tuple[int, Any]]) -> None:
        try:
            status, payload = await answer
        except Exception as e:  # answered, and the connection stays usable
            status, payload = _status_of(e, self.target)
        self._write(status, payload)
        self._next()

    def _write(self, status: int, payload: Any) -> None:
        """Write the answer of the request being answered (then close the connection unless kept alive)."""
        if self.closed:
            return
        self.transport.write(_HttpServer.response(status, payload, self.keep))
        self.busy = False
        if not self.keep:
            self.transport.close()
            self.closed = True

    def _parse(self):
        """The next request as ``(method, target, headers, body, keep_alive)``, None while it is incomplete."""
        buf, srv = self.buf, self.server
        end, sep = buf.find(b"\r\n\r\n"), 4
        alt = buf.find(b"\n\n", 0, end if end >= 0 else len(buf))
        if alt >= 0:
            end, sep = alt, 2
        if end < 0:
            if len(buf) > srv.MAX_LINE:
                raise _BadRequest(431, "request line or header too long")
            return None
        if end > srv.MAX_LINE:
            raise _BadRequest(431, "request line or header too long")
        lines = bytes(buf[:end]).decode("latin-1").split("\n")
        parts = lines[0].split()
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            raise _BadRequest(400, "malformed request line")
        method, target, version = parts
        if len(lines) - 1 > srv.MAX_HEADERS:
            raise _BadRequest(431, "too many header lines")
        headers: dict[str, str] = {}
        for h in lines[1:]:
            name, colon, value = h.partition(":")
            if not colon:
                raise _BadRequest(400, "malformed header line")
            headers[name.strip().lower()] = value.strip()
        if "transfer-encoding" in headers:
            raise _BadRequest(501, "chunked request bodies are not supported; send Content-Length")
        try:
            length = int(headers.get("content-length") or 0)
        except ValueError:
            raise _BadRequest(400, "invalid Content-Length") from None
        if not 0 <= length <= srv.MAX_BODY:
            raise _BadRequest(413, f"request body must be at most {srv.MAX_BODY} bytes")
        start = end + sep
        if len(buf) < start + length:
            if length and not self.continued and headers.get("expect", "").lower() == "100-continue":
                self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")  # curl asks before large bodies
                self.continued = True
            return None
        body = bytes(buf[start:start + length])
        del buf[:start + length]
        self.continued = False
        conn = headers.get("connection", "").lower()
        keep = conn != "close" if version == "HTTP/1.1" else conn == "keep-alive"
        return method, target, headers, body, keep


class Daemon:
    """The daemon's state and threads. ``run()`` blocks until SIGTERM/SIGINT, then exits cleanly."""

    #: How long journal records wait before the ingest thread moves them into DuckDB: each move costs a
    #: transaction (~2 ms) whatever its size (measured at 550-680 pairs/s: 1.44-1.52 ms of daemon CPU per pair at
    #: 0.2 s against 1.59-1.87 ms at 0.05 s). Readers drain first, so none sees the delay.
    INGEST_S = 0.2

    def __init__(self, home: str | os.PathLike | None = None, host: str = "127.0.0.1", port: int = 0,
                 watch: list[str] | None = None, eval_budget: int = 10, eval_window_s: float = 86400.0,
                 executor: str = "local", allow_remote: bool = False, log_json: bool = False,
                 max_attempts: int = 3, backoff_s: float = 2.0, stable_s: float = 3.0, poll_s: float = 1.0,
                 device: str = "auto", eval_limit: int | None = None, policy: str = "linucb-hybrid",
                 snapshot_every: int = 10_000, snapshot_s: float = 60.0, pool_threads: int = 4,
                 memory_limit: str = "1GB", checkpoint_wal: str = "8MB", idle_checkpoint_s: float = 5.0,
                 learn_interval_s: float = 0.1):
        self.home = resolve_home(home)
        self.host, self.port = host, port
        self.watch = [Path(w).expanduser().resolve() for w in (watch or [])]
        self.eval_budget, self.eval_window_s = eval_budget, eval_window_s
        self.executor, self.allow_remote, self.log_json = executor, allow_remote, log_json
        self.max_attempts, self.backoff_s = max_attempts, backoff_s
        self.stable_s, self.poll_s = stable_s, poll_s
        self.device, self.eval_limit, self.policy = device, eval_limit, policy
        # Policy snapshots every ``snapshot_s`` seconds (and every ``snapshot_every`` rewards at the latest):
        # a restart replays at most that much of the log tail.
        self.snapshot_every, self.snapshot_s, self.pool_threads = snapshot_every, snapshot_s, pool_threads
        # DuckDB keeps every block it wrote in its buffer pool until memory runs short (by default 80% of RAM):
        # for a process that appends to the decision log for weeks, that is growth without end.
        self.memory_limit = memory_limit
        # DuckDB checkpoints (folds its write-ahead log into the file) inside the commit that crosses
        # ``checkpoint_wal``: the journal's ingest thread waits for it (20-300 ms), and the data not yet checkpointed
        # stays in memory until then. The daemon also checkpoints whenever it is idle, so that a burst of traffic
        # starts with an empty log.
        self.checkpoint_wal, self.idle_checkpoint_s = checkpoint_wal, idle_checkpoint_s
        # Rewards are learned in chunks: hybrid LinUCB folds 32 rewards into its shared matrix (516 x 516 with 12
        # operators) for far less than 32 folds of one reward each (the fold reads and writes the whole matrix
        # whatever its size).
        self.learn_interval_s = learn_interval_s
        self._stop = threading.Event()
        self._started = time.time()
        self._seen: dict[Path, tuple[Any, float]] = {}
        self._ray = None
        self._searches: dict[str, threading.Thread] = {}  # search id -> the thread running it
        self._search_errors: dict[str, str] = {}
        self._search_lock = threading.Lock()

    # ---- lifecycle ----
    def check(self) -> None:
        """Refuse a bad configuration before touching any state."""
        if not is_loopback(self.host) and not self.allow_remote:
            raise InvalidInput(f"refusing to bind {self.host}: not a loopback address (the API would be reachable "
                               f"from the network); pass --allow-remote if you mean it")
        if self.executor not in ("local", "ray"):
            raise InvalidInput(f"unknown executor {self.executor!r}; use local or ray")
        for w in self.watch:
            if not w.is_dir():
                raise InvalidInput(f"--watch {w}: not a directory")
        for flag, size in (("--memory-limit", self.memory_limit), ("--checkpoint-wal", self.checkpoint_wal)):
            if not re.fullmatch(r"\d+(\.\d+)?\s*[KMGT]i?B", size):
                raise InvalidInput(f"{flag} {size!r}: use a size such as 512MB or 2GB")
        other = read_daemon_file(self.home)
        if other and int(other["pid"]) != os.getpid():
            raise InvalidInput(f"a daemon is already running for {self.home} (pid {other['pid']}, port "
                               f"{other['port']})")

    def start(self) -> None:
        from .engine import Engine, EngineConfig
        from .store import Store

        self.check()
        _limit_malloc_arenas()
        if self.executor == "ray":
            try:
                import ray
            except ImportError:
                raise InvalidInput("--executor ray needs Ray: pip install 'simmerge-bandit[ray]'") from None
            if not ray.is_initialized():
                ray.init(include_dashboard=False, ignore_reinit_error=True, log_to_driver=False)
            self._ray = ray
        self._setup_logging()
        self.store = Store.open(self.home)
        self.engine = Engine(self.store, EngineConfig(default_policy=self.policy, eval_budget=self.eval_budget,
                                                      eval_window_s=self.eval_window_s,
                                                      snapshot_every=self.snapshot_every))
        self.engine.defer_learning = True  # a batch's rewards are learned together (see Engine.defer_learning)
        self.engine.learn_interval_s = self.learn_interval_s
        self.engine.file_check_s = 1.0  # weights rewritten in place are noticed within a second
        # Every query here is a point lookup or a small append: DuckDB's worker threads only add scheduling.
        self.store.execute("SET threads = 1")
        # The same for numpy's BLAS: a policy update touches one matrix of ~10 MB, which a second BLAS thread
        # does not speed up, while its spinning takes the core the HTTP thread needs (measured: 2 BLAS threads
        # spent 2.4x the CPU of one on a batch of suggestions and rewards, for no gain in wall time).
        import scipy.linalg  # noqa: F401  (loads scipy's own OpenBLAS now, so that the limit reaches it too)

        threadpoolctl.threadpool_limits(1, user_api="blas")
        self.store.execute(f"SET memory_limit = '{self.memory_limit}'")
        self.store.execute(f"SET checkpoint_threshold = '{self.checkpoint_wal}'")
        self._recover()
        # Batches of decisions and rewards commit to a write-ahead journal (an fsynced append) and reach DuckDB
        # from a background thread: a DuckDB commit on the request path cost 1.3 ms of CPU per batch and its
        # checkpoints stalled whole batches (see journal.py).
        self.store.enable_journal(memory_limit=self.memory_limit, interval_s=self.INGEST_S)
        self._ready: collections.deque = collections.deque()  # (future, answer) of batched calls, see _wake
        self._log_lines: collections.deque = collections.deque()  # (msg, fields) of their log lines
        self._batcher = _Batcher(self.engine, snapshot_s=self.snapshot_s, after_batch=self._wake,
                                 idle_checkpoint_s=self.idle_checkpoint_s)
        self._pool = ThreadPoolExecutor(self.pool_threads, thread_name_prefix="api")
        self._routes = self._make_routes()
        self.server = _HttpServer(self.host, self.port, self._dispatch)
        self.port = self.server.port
        self.token = secrets.token_urlsafe(32)
        write_daemon_file(self.home, {"pid": os.getpid(), "port": self.port, "host": self.host,
                                      "token": self.token, "started": self._started})
        self._threads = [threading.Thread(target=self._worker, name="worker", daemon=True)]
        if self.watch:
            self._threads.append(threading.Thread(target=self._watcher, name="watcher", daemon=True))
        self._batcher.start()
        self.server.start()
        for t in self._threads:
            t.start()
        # Python's full collection walks every tracked object: 120 ms with torch and transformers loaded, a stall
        # for every call waiting at that moment. What exists after start-up lives as long as the process, so it is
        # moved out of the collector's sight (gc.freeze); so is what a cold batch leaves (_Batcher.COLD_S).
        gc.freeze()
        event("daemon started", pid=os.getpid(), host=self.host, port=self.port, home=str(self.home))

    def run(self) -> None:
        self.start()
        signal.signal(signal.SIGTERM, lambda *_: self.stop())
        signal.signal(signal.SIGINT, lambda *_: self.stop())
        while not self._stop.is_set():
            self._stop.wait(0.5)
        # Calls that arrive from now on are refused (503); the ones already taken are answered first.
        self.server.stop_accepting()
        self._batcher.close()
        for t in self._threads:
            t.join(timeout=120)
        self._pool.shutdown(wait=True)
        self.server.close()
        with self.engine.lock:
            self.engine.flush()
        self.store.close()
        try:
            info = json.loads(daemon_file(self.home).read_text())
            if int(info.get("pid", -1)) == os.getpid():
                daemon_file(self.home).unlink()
        except (OSError, ValueError):
            pass
        event("daemon stopped")

    def stop(self) -> None:
        self._stop.set()

    def _setup_logging(self) -> None:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(_JsonFormatter() if self.log_json else _TextFormatter())
        log.handlers[:] = [handler]
        log.setLevel(logging.INFO)
        log.propagate = False

    def _recover(self) -> None:
        """After a crash: running jobs go back to the queue, half-written merges are removed."""
        from . import evalqueue

        n = evalqueue.requeue_running(self.store)
        if n:
            event("requeued interrupted jobs", count=n)
        merges = self.store.artifacts / "merges"
        if merges.is_dir():
            for p in merges.iterdir():
                if p.name.startswith(".") or not (p / "provenance.json").exists():
                    shutil.rmtree(p, ignore_errors=True)

    # ---- API operations (called by the HTTP handler) ----
    def status(self) -> dict:
        st = self.engine.status()
        st.update(pid=os.getpid(), port=self.port, uptime_s=round(time.time() - self._started, 3),
                  queue_depth=st["queue"]["queued"] + st["queue"]["running"],
                  batches={"count": self._batcher.batches, "calls": self._batcher.calls},
                  journal={"records": self.store.journal.appended, "ingests": self.store.journal.ingests,
                           "cache_trims": self.store.journal.trims, "checkpoints": self.store.journal.checkpoints},
                  memory={"rss_kb": _rss_kb(), "duckdb_bytes": int(self.store.fetchone(
                      "SELECT coalesce(sum(memory_usage_bytes), 0) FROM duckdb_memory()")[0])})
        return st

    def suggest(self, body: dict) -> list[dict]:
        top = body.get("top", 5)
        if not isinstance(top, int) or isinstance(top, bool):
            raise InvalidInput("missing or invalid field 'top'")
        chain = body.get("chain")
        if chain is not None and (not isinstance(chain, int) or isinstance(chain, bool)):
            raise InvalidInput("invalid field 'chain'")
        return self.engine.suggest(_target_tasks(body), top=top, policy=body.get("policy"), chain=chain,
                                   weights=_weights(body))

    def feedback(self, body: dict) -> dict:
        did = _need(body, "id", str)
        if "reward" not in body:
            raise InvalidInput("missing field 'reward'")
        return self.engine.feedback(did, body["reward"])

    @staticmethod
    def _log_decisions(rows: list[dict]) -> list[tuple[str, dict]]:
        return [("decision", {"id": r["id"], "task": r["task"], "models": ",".join(r["models"]),
                              "operator": r["operator"], "evaluate": r["evaluate"]}) for r in rows]

    @staticmethod
    def _log_reward(res: dict) -> list[tuple[str, dict]]:
        return [("reward", {"id": res["id"], "reward": res["reward"], "status": res["status"]})]

    def jobs(self) -> list[dict]:
        """Evaluation jobs (``kind: evaluation``), then searches (``kind: search``, with their progress and best
        reward so far)."""
        from .search import searches

        from . import evalqueue

        rows = [dict(r, kind="evaluation") for r in evalqueue.jobs(self.store)]
        for r in searches(self.store):
            if self._search_errors.get(r["id"]):
                r["error"] = self._search_errors[r["id"]]
            rows.append(dict(r, kind="search"))
        return rows

    def search(self, body: dict) -> dict:
        """Start (or resume) a budgeted search as a job, or report on it if it runs: the same body again answers
        its progress (every evaluation so far and the best)."""
        from .search import default_policy, describe, run_search, search_id

        target = self.engine.target(_target_tasks(body), _weights(body))
        budget = body.get("budget")
        if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
            raise InvalidInput("field 'budget' must be a positive integer")
        limit = body.get("limit")
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
            raise InvalidInput("field 'limit' must be a positive integer")
        policy = body.get("policy")
        if policy is not None and not isinstance(policy, str):
            raise InvalidInput("field 'policy' must be a policy name")
        policy = policy or default_policy(self.engine)
        self.engine.policy(policy)  # an unknown policy is refused now, not in the job
        sid = search_id(target, policy)

        def run() -> None:
            event("search started", id=sid, target=target.key, budget=budget, policy=policy)
            try:
                res = run_search(self.engine, target, budget, policy=policy, device=self.device,
                                 limit=limit or self.eval_limit)
                best = res["best"]
                event("search done", id=sid, spent=len(res["evaluations"]),
                      best=None if best is None else round(best["reward"], 4))
            except Exception as e:  # a failing search is recorded, never fatal to the daemon
                self._search_errors[sid] = str(e) if isinstance(e, SimmergeError) else f"{type(e).__name__}: {e}"
                with self.store.transaction():
                    self.store.execute("UPDATE searches SET state = 'failed' WHERE id = ?", [sid])
                event("search failed", id=sid, reason=self._search_errors[sid])

        with self._search_lock:
            t = self._searches.get(sid)
            running = t is not None and t.is_alive()
            if not running:
                row = self.store.fetchone("SELECT budget, state, (SELECT count(*) FROM search_steps WHERE "
                                          "search_id = ?) FROM searches WHERE id = ?", [sid, sid])
                if row is None or row[1] != "done" or row[2] < budget:
                    self._search_errors.pop(sid, None)
                    t = self._searches[sid] = threading.Thread(target=run, name=f"search-{sid}", daemon=True)
                    t.start()
                    running = True
        try:
            res = describe(self.engine, sid)
        except NotFound:  # its thread has not recorded it yet
            res = {"id": sid, "target": target.as_json(), "policy": policy, "budget": budget, "spent": 0,
                   "evaluations": [], "best": None}
        res["state"] = "running" if running and self._searches[sid].is_alive() else res.get("state", "running")
        if self._search_errors.get(sid):
            res["error"] = self._search_errors[sid]
        return res

    # ---- HTTP ----
    def _make_routes(self) -> dict[tuple[str, str], _Route]:
        """``(method, path) -> route``. Suggest and feedback go through the batcher (feedback first within a
        batch) and are logged once committed; the other calls run on the pool, catalog changes under the engine
        lock."""
        cat = self.engine.catalog

        def locked(fn: Callable[[dict], Any]) -> Callable[[dict], Any]:
            def run(b: dict) -> Any:
                with self.engine.lock:
                    return fn(b)
            return run

        def public(m: dict) -> dict:
            return {k: v for k, v in m.items() if k not in ("tensors", "config")}

        return {
            ("GET", "/v1/status"): _Route(lambda b: self.status()),
            ("POST", "/v1/suggest"): _Route(self.suggest, batched=True, log=self._log_decisions, order=1),
            ("POST", "/v1/feedback"): _Route(self.feedback, batched=True, log=self._log_reward, order=0),
            ("GET", "/v1/operators"): _Route(lambda b: cat.operators(active_only=not b.get("all"))),
            ("POST", "/v1/operators"): _Route(locked(lambda b: cat.add_operator(
                _need(b, "name", str), _need(b, "method", str), b.get("params") or {}, ranges=b.get("ranges")))),
            ("POST", "/v1/operators/retire"): _Route(locked(lambda b: cat.retire_operator(_need(b, "name", str)))),
            ("GET", "/v1/tasks"): _Route(lambda b: cat.tasks()),
            ("POST", "/v1/tasks"): _Route(locked(lambda b: cat.add_task(
                _need(b, "name", str), _need(b, "data", str), probes=b.get("probes"),
                metric=b.get("metric") or "exact_match", eval_command=b.get("eval_command"),
                metric_path=b.get("metric_path")))),
            ("GET", "/v1/models"): _Route(lambda b: [public(m) for m in cat.models()]),
            ("POST", "/v1/models"): _Route(locked(lambda b: public(cat.add_model(
                _need(b, "path", str), name=b.get("name"), base=b.get("base"), tasks=b.get("tasks"))))),
            ("GET", "/v1/jobs"): _Route(lambda b: self.jobs()),
            ("POST", "/v1/search"): _Route(self.search),
        }

    def _dispatch(self, method: str, target: str, headers: dict[str, str], raw: bytes):
        """Answer one request: ``(status, JSON payload)`` now, or a future of it. Runs on the server's loop; the
        work runs elsewhere (the batcher, the pool)."""
        auth = headers.get("authorization", "")
        if not hmac.compare_digest(auth.encode(), f"Bearer {self.token}".encode()):
            return 401, {"error": "missing or wrong bearer token (see daemon.json)"}
        path = urlparse(target).path.rstrip("/")
        route = self._routes.get((method, path))
        if route is None:
            known = any(p == path for _, p in self._routes)
            return (405 if known else 404), {"error": f"no route {method} {path}"}
        try:
            body = json.loads(raw) if raw else {}
            if not isinstance(body, dict):
                raise ValueError("expected a JSON object")
        except ValueError as e:
            return 400, {"error": f"invalid JSON body: {e}"}
        shutting_down = 503, {"error": "daemon is shutting down"}
        if self._stop.is_set():
            return shutting_down
        loop = self.server.loop
        if not route.batched:
            try:
                return loop.run_in_executor(self._pool, _answer, route.op, body, path)
            except RuntimeError:  # the pool was shut down between the check above and now
                return shutting_down
        answer = loop.create_future()

        def done(status: int, payload: Any) -> None:  # on the syncer thread, which then calls _wake once
            if status == 200 and route.log is not None:
                self._log_lines.extend(route.log(payload))
            self._ready.append((answer, (status, payload)))

        self._batcher.submit(_Call(lambda: route.op(body), done, path, route.order))
        return answer

    def _wake(self) -> None:
        """After a batch: have the HTTP loop hand out every answer that is ready (one cross-thread wake-up), then
        log the batch's decisions and rewards (one log record)."""
        if self._ready:
            self.server.loop.call_soon_threadsafe(self._settle_ready)
        lines = []
        while self._log_lines:
            lines.append(self._log_lines.popleft())
        events(lines)

    def _settle_ready(self) -> None:
        while self._ready:
            _settle(*self._ready.popleft())

    # ---- evaluation queue ----
    def _worker(self) -> None:
        from . import evalqueue, pipeline

        while not self._stop.is_set():
            did = evalqueue.claim(self.store)
            if did is None:
                self._stop.wait(self.poll_s)
                continue
            event("job started", id=did)
            try:
                spec = pipeline.job_spec(self.engine, did)
                if self._ray is not None:
                    remote = self._ray.remote(pipeline.run_spec)
                    result = self._ray.get(remote.remote(spec, device=self.device, limit=self.eval_limit))
                else:
                    result = pipeline.run_spec(spec, device=self.device, limit=self.eval_limit)
                pipeline.record(self.engine, spec, result)
                evalqueue.done(self.store, did, result)
                event("job done", id=did, reward=round(result["reward"], 4), seconds=round(result["seconds"], 2),
                      executor=self.executor, worker_pid=result.get("pid"))
            except Exception as e:  # a failing job is recorded, never fatal to the daemon
                reason = str(e) if isinstance(e, SimmergeError) else f"{type(e).__name__}: {e}"
                final, attempts = evalqueue.fail(self.store, did, reason, max_attempts=self.max_attempts,
                                                 backoff_s=self.backoff_s)
                event("job failed" if final else "job will retry", id=did, attempts=attempts,
                      reason=reason[:300])

    # ---- watched folders ----
    def _watcher(self) -> None:
        while not self._stop.is_set():
            try:
                self._scan()
            except Exception as e:  # a bad folder must not stop the watcher
                event("watch error", reason=f"{type(e).__name__}: {e}")
            self._stop.wait(self.poll_s)

    def _scan(self) -> None:
        from .catalog import Catalog
        from .checkpoint import read_checkpoint
        from .errors import InvalidCheckpoint

        known = {m["path"] for m in self.engine.catalog.models()}
        now = time.time()
        for root in self.watch:
            for d in sorted(p for p in [root, *root.iterdir()] if p.is_dir()):
                if str(d.resolve()) in known or not (d / "config.json").exists():
                    continue
                state = tuple(sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in d.iterdir()
                                     if f.is_file()))
                prev = self._seen.get(d)
                if prev is None or prev[0] != state:
                    self._seen[d] = (state, now)
                    continue
                if now - prev[1] < self.stable_s:
                    continue
                try:
                    ck = read_checkpoint(d)
                except InvalidCheckpoint:
                    continue  # not complete yet (a shard missing); look again later
                self._register(Catalog(self.store), d, ck)

    def _register(self, cat, d: Path, ck) -> None:
        from .checkpoint import check_compatible
        from .errors import SimmergeError as _E

        shapes = ck.shapes()
        base = None
        for m in cat.models():
            if m["base"] is None:
                try:
                    check_compatible(m["tensors"], shapes, m["name"], d.name)
                    base = m["name"]
                    break
                except _E:
                    pass
        existing = {m["name"] for m in cat.models()}
        name, i = d.name, 2
        while name in existing:
            name, i = f"{d.name}-{i}", i + 1
        with self.engine.lock:
            cat.add_model(d, name=name, base=base)
        event("model registered", name=name, path=str(d), base=base)
        if base is None:
            return
        for t in cat.tasks():
            try:
                with self.engine.lock:
                    self.engine.candidates(t["name"])
                event("suggestions refreshed", task=t["name"], model=name)
            except _E as e:
                event("refresh skipped", task=t["name"], reason=str(e))


def _target_tasks(body: dict) -> str | list[str]:
    """A suggestion's target tasks: ``"tasks": [names]``, or ``"task": name`` (one task, as before)."""
    tasks = body.get("tasks")
    if tasks is None:
        return _need(body, "task", str)
    if "task" in body:
        raise InvalidInput("give 'task' or 'tasks', not both")
    if not isinstance(tasks, list) or not tasks or not all(isinstance(t, str) for t in tasks):
        raise InvalidInput("field 'tasks' must be a non-empty list of task names")
    return tasks


def _weights(body: dict) -> dict | None:
    w = body.get("weights")
    if w is None:
        return None
    if not isinstance(w, dict) or not all(isinstance(k, str) for k in w):
        raise InvalidInput("field 'weights' must be an object {task: weight}")
    return w


def _need(body: dict, key: str, typ) -> Any:
    v = body.get(key)
    if not isinstance(v, typ):
        raise InvalidInput(f"missing or invalid field {key!r}")
    return v


def _answer(op: Callable[[dict], Any], body: dict, where: str) -> tuple[int, Any]:
    try:
        return 200, op(body)
    except Exception as e:  # a user's error answers its status; anything else 500, and the daemon keeps serving
        return _status_of(e, where)


def _limit_malloc_arenas(n: int = 2) -> None:
    """Let glibc's malloc keep at most ``n`` arenas for the daemon's threads (it makes one per thread, up to 8 per
    core, and each keeps the memory its thread freed). Measured under load: RSS +5.3-5.8% above the start instead
    of +6.4-10.7%. Elsewhere (not glibc) a no-op."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        libc = ctypes.CDLL(None)
        libc.mallopt(-8, n)  # M_ARENA_MAX
    except (OSError, AttributeError):  # musl and others: no mallopt
        pass


def _rss_kb() -> int | None:
    try:
        with open("/proc/self/status") as fh:
            return next(int(line.split()[1]) for line in fh if line.startswith("VmRSS:"))
    except (OSError, StopIteration, ValueError):  # not Linux
        return None


def _settle(fut: asyncio.Future, value: Any) -> None:
    if not fut.done():  # its connection may have been closed at shutdown
        fut.set_result(value)
