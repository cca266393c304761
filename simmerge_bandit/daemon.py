"""The long-running daemon: one process that owns the state and serves a JSON API on loopback.

It answers suggest / feedback / catalog calls, watches checkpoint folders, and runs the evaluation queue (merge,
evaluate, feedback). A reward is acknowledged only after it is committed; the queue's job states are persisted so a
``kill -9`` loses nothing acknowledged, and a restart resumes or retries what was running.

Threads: one asyncio loop reads and answers every connection (:class:`_HttpServer`); suggest and feedback calls go
to one batcher thread that runs the calls waiting together in one transaction (:class:`_Batcher`, a group
commit); the other calls run on a small fixed pool; the evaluation worker and the folder watcher have a thread each.
"""

from __future__ import annotations

import collections
import functools
import gc
import hmac
import ipaddress
import json
import os
import re
import secrets
import shutil
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, NamedTuple
from urllib.parse import urlparse

import threadpoolctl

from . import eventlog
from .api import OPERATIONS
from .backend import LocalBackend, check_budget, query_body
from .dashboard import Dashboard, UiSessions
from .daemonfile import read_daemon_file, write_daemon_file
from .errors import Forbidden, InvalidInput, NotFound, SimmergeError
from .eventlog import _JsonFormatter, _TextFormatter, event, events, log  # noqa: F401 (re-exported)
from .groupcommit import _Batcher, _Call
from .httpserver import _PHRASES, _BadRequest, _HttpConnection, _HttpServer, _status_of  # noqa: F401
from .httpserver import settle as _settle
from .paths import daemon_file, resolve_home
from .proctune import limit_malloc_arenas as _limit_malloc_arenas
from .proctune import rss_kb as _rss_kb


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


#: Seconds of shutdown after which (and every as many seconds after) the threads' stacks go to daemon.log.
SHUTDOWN_TRACE_S = 20.0

class _Route(NamedTuple):
    op: Callable[[dict], Any]
    batched: bool = False                     # through the group commit
    log: Callable[[Any], list] | None = None  # the answer's log lines ((msg, fields)), logged once committed
    order: int = 0                            # within a batch


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
                 learn_interval_s: float = 0.1, allow_eval_commands: bool = False,
                 serve_dirs: list[str] | None = None, max_connections: int | None = None):
        self.home = resolve_home(home)
        self.host, self.port = host, port
        self.watch = [Path(w).expanduser().resolve() for w in (watch or [])]
        self.eval_budget, self.eval_window_s = eval_budget, eval_window_s
        self.executor, self.allow_remote, self.log_json = executor, allow_remote, log_json
        # What a token holder may not do unless the daemon was started to allow it (docs/daemon.md, "Security
        # model"): register a task whose evaluation is a shell command, and have task files read from server paths
        # (only under these directories; elsewhere files are sent as their text).
        self.allow_eval_commands = allow_eval_commands
        self.serve_dirs = [Path(os.path.realpath(Path(d).expanduser())) for d in (serve_dirs or [])]
        self.max_connections = max_connections  # None: half the process's file descriptors (httpserver)
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
        for d in self.serve_dirs:
            if not d.is_dir():
                raise InvalidInput(f"--serve-dir {d}: not a directory")
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
        # The port first: one taken is a one-line error before any state is touched.
        try:
            self.server = _HttpServer(self.host, self.port, self._dispatch, max_connections=self.max_connections,
                                      authorize=self._authorized)
        except OSError as e:
            raise InvalidInput(f"cannot listen on {self.host}:{self.port}: {e.strerror or e}; choose another --port "
                               f"(0 takes any free port)") from None
        self.port = self.server.port
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
        self.backend = _DaemonBackend(self)
        self._routes = self._make_routes()
        self.token = secrets.token_urlsafe(32)
        self.ui = Dashboard(UiSessions(self.host, self.port), self._authorized)
        write_daemon_file(self.home, {"pid": os.getpid(), "port": self.port, "host": self.host,
                                      "token": self.token, "started": self._started,
                                      "serve_dirs": [str(d) for d in self.serve_dirs]})
        from .watcher import FolderWatcher
        from .worker import EvalWorker

        self._jobs = EvalWorker(self.engine, self._stop, poll_s=self.poll_s, device=self.device,
                                eval_limit=self.eval_limit, max_attempts=self.max_attempts, backoff_s=self.backoff_s,
                                ray=self._ray, executor=self.executor)
        self._threads = [threading.Thread(target=self._jobs.run, name="worker", daemon=True)]
        if self.watch:
            self._watch = FolderWatcher(self.engine, self.watch, self._stop, stable_s=self.stable_s,
                                        poll_s=self.poll_s)
            self._threads.append(threading.Thread(target=self._watch.run, name="watcher", daemon=True))
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
        # A shutdown that takes longer than SHUTDOWN_TRACE_S writes every thread's stack to daemon.log, so a hang
        # on SIGTERM says where it hangs (seen once in CI: no step of the shutdown logged, no answer in 60 s).
        import faulthandler

        trace = open(self.home / "daemon.log", "a")
        faulthandler.dump_traceback_later(SHUTDOWN_TRACE_S, repeat=True, file=trace)
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
        faulthandler.cancel_dump_traceback_later()
        trace.close()
        event("daemon stopped")

    def stop(self) -> None:
        self._stop.set()

    def _setup_logging(self) -> None:
        eventlog.setup(self.log_json)

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
        rows = LocalBackend.op_jobs(self.backend)
        for r in rows:
            if r["kind"] == "search" and self._search_errors.get(r["id"]):
                r["error"] = self._search_errors[r["id"]]
        return rows

    def search(self, tasks: str | list[str], budget: int, weights: dict | None = None, policy: str | None = None,
               limit: int | None = None) -> dict:
        """Start (or resume) a budgeted search as a job, or report on it if it runs: the same call again answers
        its progress (every evaluation so far and the best)."""
        from .search import default_policy, describe, run_search, search_id

        check_budget(budget, limit)
        target = self.engine.target(tasks, weights)
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
        """``(method, path) -> route``, one per operation of the backend's table: suggest and feedback go through
        the batcher (feedback first within a batch) and are logged once committed; the other calls run on the
        pool, catalog changes under the engine lock."""
        log_lines = {"suggest": self._log_decisions, "feedback": self._log_reward}
        return {(op.method, op.path): _Route(functools.partial(self.backend.serve, op.name), batched=op.batched,
                                             log=log_lines.get(op.name), order=op.order)
                for op in OPERATIONS.values()}

    def _authorized(self, headers: dict[str, str]) -> bool:
        return hmac.compare_digest(headers.get("authorization", "").encode("utf-8", "replace"),
                                   f"Bearer {self.token}".encode())

    def _dispatch(self, method: str, target: str, headers: dict[str, str], raw: bytes):
        """Answer one request: ``(status, JSON payload)`` now, or a future of it. Runs on the server's loop; the
        work runs elsewhere (the batcher, the pool)."""
        url = urlparse(target)
        if url.path == "/ui" or url.path.startswith("/ui/"):  # the dashboard's pages check their session themselves
            return self.ui.handle(method, url.path, url.query, headers)
        path = url.path.rstrip("/")
        if not (self._authorized(headers) or self.ui.allows(method, path, headers)):
            return 401, {"error": "missing or wrong bearer token (see daemon.json)"}
        route = self._routes.get((method, path))
        if route is None:
            known = any(p == path for _, p in self._routes)
            return (405 if known else 404), {"error": f"no route {method} {path}"}
        try:
            body = json.loads(raw) if raw else {}
            if not isinstance(body, dict):
                raise ValueError("expected a JSON object")
            if url.query:  # a GET's parameters (each value JSON text)
                body = {**body, **query_body(url.query)}
        except ValueError as e:  # (UnicodeDecodeError too: bytes that are not UTF-8)
            return 400, {"error": f"invalid JSON body: {e}"}
        except RecursionError:
            return 400, {"error": "invalid JSON body: nested too deeply"}
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


def _answer(op: Callable[[dict], Any], body: dict, where: str) -> tuple[int, Any]:
    try:
        return 200, op(body)
    except Exception as e:  # a user's error answers its status; anything else 500, and the daemon keeps serving
        return _status_of(e, where)


class _DaemonBackend(LocalBackend):
    """The operations as the daemon answers them: on its engine and store (catalog changes under the engine's
    lock), status with the daemon's own figures, jobs with the searches' errors, and a search started as a job
    (the same call again reports on it)."""

    def __init__(self, daemon: Daemon):
        super().__init__(daemon.store, engine=daemon.engine)
        self.daemon = daemon

    def op_status(self) -> dict:
        return self.daemon.status()

    def op_jobs(self) -> list[dict]:
        return self.daemon.jobs()

    def op_search(self, tasks, budget, weights=None, policy=None, limit=None) -> dict:
        return self.daemon.search(tasks, budget, weights=weights, policy=policy, limit=limit)

    def op_dashboard(self) -> dict:
        from .dashboard import snapshot

        return snapshot(self, policy=self.daemon.policy, search_errors=self.daemon._search_errors)

    def op_ui_login(self) -> dict:
        return self.daemon.ui.sessions.issue()

    # ---- what a token holder may not do unless the daemon allows it ----
    def op_add_task(self, name, data=None, probes=None, metric=None, eval_command=None, metric_path=None,
                    data_content=None, probes_content=None, eval_options=None) -> dict:
        from .evaluators.lm_eval import runs_code
        from .taskfiles import ProbeSetName

        if eval_command is not None and not self.daemon.allow_eval_commands:
            raise Forbidden("this daemon does not take external evaluation commands through its API (it was not "
                            "started with --allow-eval-commands); restart it with that flag, or stop it and add the "
                            "task with the CLI")
        if runs_code(eval_options) and not self.daemon.allow_eval_commands:  # task YAML can name Python functions
            raise Forbidden("this daemon does not take lm-eval task folders or code-running arguments through its "
                            "API (it was not started with --allow-eval-commands); restart it with that flag, or "
                            "stop it and add the task with the CLI")
        if data is not None:
            data = self._served(data, "data", "send the file's text as 'data_content'")
        if probes is not None:  # a path (the client sends absolute ones), else a probe set's name, never a file
            probes = (self._served(probes, "probes", "send the file's text as 'probes_content'") if "/" in probes
                      else ProbeSetName(probes))
        return super().op_add_task(name, data, probes, metric, eval_command, metric_path, data_content,
                                   probes_content, eval_options)

    def op_add_probe_set(self, name, file=None, content=None) -> dict:
        if file is not None:
            file = self._served(file, "file", "send the file's text as 'content'")
        return super().op_add_probe_set(name, file, content)

    def op_fit_predictor(self, table=None, online_weight=None, model=None, objective=None, init_seed=None) -> dict:
        if table is not None:
            table = self._served(table, "table", "start the daemon with --serve-dir naming the table's directory")
        return super().op_fit_predictor(table, online_weight, model, objective, init_seed)

    def _served(self, value: str, field: str, instead: str) -> str:
        """``value``'s real path when it lies in a directory the daemon serves, else one error that says the same
        whether or not something exists there (a token holder learns nothing about the server's files)."""
        real = Path(os.path.realpath(value)) if os.path.isabs(value) else None
        if real is None or not any(real.is_relative_to(d) for d in self.daemon.serve_dirs):
            raise InvalidInput(f"field {field!r}: this daemon reads files only under the directories it serves "
                               f"(--serve-dir); {instead}")
        return str(real)
