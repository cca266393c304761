"""The long-running daemon: one process that owns the state and serves a JSON API on loopback.

It answers suggest / feedback / catalog calls, watches checkpoint folders, and runs the evaluation queue (merge,
evaluate, feedback). A reward is acknowledged only after it is committed; the queue's job states are persisted so a
``kill -9`` loses nothing acknowledged, and a restart resumes or retries what was running.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlparse

from .errors import InvalidInput, SimmergeError
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


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return json.dumps({"ts": round(record.created, 3), "level": record.levelname.lower(), "msg": record.getMessage(),
                           **getattr(record, "fields", {})}, default=str)


class _TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        fields = " ".join(f"{k}={v}" for k, v in getattr(record, "fields", {}).items())
        return f"{time.strftime('%H:%M:%S', time.localtime(record.created))} {record.getMessage()} {fields}".rstrip()


def event(msg: str, **fields: Any) -> None:
    log.info(msg, extra={"fields": fields})


class Daemon:
    """The daemon's state and threads. ``run()`` blocks until SIGTERM/SIGINT, then exits cleanly."""

    def __init__(self, home: str | os.PathLike | None = None, host: str = "127.0.0.1", port: int = 0,
                 watch: list[str] | None = None, eval_budget: int = 10, eval_window_s: float = 86400.0,
                 executor: str = "local", allow_remote: bool = False, log_json: bool = False,
                 max_attempts: int = 3, backoff_s: float = 2.0, stable_s: float = 3.0, poll_s: float = 1.0,
                 device: str = "auto", eval_limit: int | None = None, policy: str = "linucb-hybrid",
                 snapshot_every: int = 20):
        self.home = resolve_home(home)
        self.host, self.port = host, port
        self.watch = [Path(w).expanduser().resolve() for w in (watch or [])]
        self.eval_budget, self.eval_window_s = eval_budget, eval_window_s
        self.executor, self.allow_remote, self.log_json = executor, allow_remote, log_json
        self.max_attempts, self.backoff_s = max_attempts, backoff_s
        self.stable_s, self.poll_s = stable_s, poll_s
        self.device, self.eval_limit, self.policy = device, eval_limit, policy
        self.snapshot_every = snapshot_every
        self._stop = threading.Event()
        self._started = time.time()
        self._seen: dict[Path, tuple[Any, float]] = {}
        self._ray = None

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
        other = read_daemon_file(self.home)
        if other and int(other["pid"]) != os.getpid():
            raise InvalidInput(f"a daemon is already running for {self.home} (pid {other['pid']}, port "
                               f"{other['port']})")

    def start(self) -> None:
        from .engine import Engine, EngineConfig
        from .store import Store

        self.check()
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
        self._recover()
        self.server = ThreadingHTTPServer((self.host, self.port), _handler(self))
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.token = secrets.token_urlsafe(32)
        write_daemon_file(self.home, {"pid": os.getpid(), "port": self.port, "host": self.host,
                                      "token": self.token, "started": self._started})
        self._threads = [threading.Thread(target=self._worker, name="worker", daemon=True)]
        if self.watch:
            self._threads.append(threading.Thread(target=self._watcher, name="watcher", daemon=True))
        for t in self._threads:
            t.start()
        event("daemon started", pid=os.getpid(), host=self.host, port=self.port, home=str(self.home))

    def run(self) -> None:
        self.start()
        signal.signal(signal.SIGTERM, lambda *_: self.stop())
        signal.signal(signal.SIGINT, lambda *_: self.stop())
        server_thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.2},
                                         daemon=True)
        server_thread.start()
        while not self._stop.is_set():
            self._stop.wait(0.5)
        self.server.shutdown()
        self.server.server_close()
        for t in self._threads:
            t.join(timeout=120)
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
        n = self.store.fetchone("SELECT count(*) FROM eval_queue WHERE state = 'running'")[0]
        if n:
            with self.store.transaction():
                self.store.execute("UPDATE eval_queue SET state = 'queued', updated_at = current_timestamp "
                                   "WHERE state = 'running'")
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
                  queue_depth=st["queue"]["queued"] + st["queue"]["running"])
        return st

    def suggest(self, body: dict) -> list[dict]:
        task = _need(body, "task", str)
        rows = self.engine.suggest(task, top=int(body.get("top", 5)), policy=body.get("policy"),
                                   chain=body.get("chain"))
        for r in rows:
            event("decision", id=r["id"], task=task, models=",".join(r["models"]), operator=r["operator"],
                  evaluate=r["evaluate"])
        return rows

    def feedback(self, body: dict) -> dict:
        did = _need(body, "id", str)
        if "reward" not in body:
            raise InvalidInput("missing field 'reward'")
        res = self.engine.feedback(did, body["reward"])
        event("reward", id=did, reward=res["reward"], status=res["status"])
        return res

    def jobs(self) -> list[dict]:
        return self.store.fetchdicts("SELECT * FROM eval_queue ORDER BY created_at")

    # ---- evaluation queue ----
    def _next_job(self) -> str | None:
        with self.store.lock:
            row = self.store.fetchone(
                "SELECT decision_id FROM eval_queue WHERE state = 'queued' AND (not_before IS NULL OR not_before "
                "<= current_timestamp) ORDER BY created_at LIMIT 1")
            if row is None:
                return None
            with self.store.transaction():
                self.store.execute("UPDATE eval_queue SET state = 'running', attempts = attempts + 1, "
                                   "updated_at = current_timestamp WHERE decision_id = ?", [row[0]])
            return row[0]

    def _worker(self) -> None:
        from . import pipeline

        while not self._stop.is_set():
            did = self._next_job()
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
                with self.store.transaction():
                    self.store.execute("UPDATE eval_queue SET state = 'done', result = ?, last_error = NULL, "
                                       "updated_at = current_timestamp WHERE decision_id = ?",
                                       [json.dumps(result), did])
                event("job done", id=did, reward=round(result["reward"], 4), seconds=round(result["seconds"], 2))
            except Exception as e:  # a failing job is recorded, never fatal to the daemon
                self._fail(did, e)

    def _fail(self, did: str, err: Exception) -> None:
        reason = str(err) if isinstance(err, SimmergeError) else f"{type(err).__name__}: {err}"
        attempts = self.store.fetchone("SELECT attempts FROM eval_queue WHERE decision_id = ?", [did])[0]
        final = attempts >= self.max_attempts
        delay = self.backoff_s * (2 ** (attempts - 1))
        with self.store.transaction():
            self.store.execute(
                "UPDATE eval_queue SET state = ?, last_error = ?, updated_at = current_timestamp, not_before = "
                "current_timestamp::TIMESTAMP + to_seconds(?) WHERE decision_id = ?",
                ["failed" if final else "queued", reason[:2000], float(delay), did])
        event("job failed" if final else "job will retry", id=did, attempts=attempts, reason=reason[:300])

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


def _need(body: dict, key: str, typ) -> Any:
    v = body.get(key)
    if not isinstance(v, typ):
        raise InvalidInput(f"missing or invalid field {key!r}")
    return v


def _handler(d: Daemon) -> type[BaseHTTPRequestHandler]:
    from .catalog import Catalog

    def cat() -> Catalog:
        return d.engine.catalog

    def locked(fn: Callable) -> Callable:
        def run(*a):
            with d.engine.lock:
                return fn(*a)
        return run

    routes: dict[tuple[str, str], Callable[[dict], Any]] = {
        ("GET", "/v1/status"): lambda b: d.status(),
        ("POST", "/v1/suggest"): d.suggest,
        ("POST", "/v1/feedback"): d.feedback,
        ("GET", "/v1/operators"): lambda b: cat().operators(active_only=not b.get("all")),
        ("POST", "/v1/operators"): locked(lambda b: cat().add_operator(_need(b, "name", str), _need(b, "method", str),
                                                                      b.get("params") or {})),
        ("POST", "/v1/operators/retire"): locked(lambda b: cat().retire_operator(_need(b, "name", str))),
        ("GET", "/v1/tasks"): lambda b: cat().tasks(),
        ("POST", "/v1/tasks"): locked(lambda b: cat().add_task(
            _need(b, "name", str), _need(b, "data", str), probes=b.get("probes"),
            metric=b.get("metric") or "exact_match", eval_command=b.get("eval_command"),
            metric_path=b.get("metric_path"))),
        ("GET", "/v1/models"): lambda b: [{k: v for k, v in m.items() if k not in ("tensors", "config")}
                                         for m in cat().models()],
        ("POST", "/v1/models"): locked(lambda b: {k: v for k, v in cat().add_model(
            _need(b, "path", str), name=b.get("name"), base=b.get("base"), tasks=b.get("tasks")).items() if k not in ("tensors", "config")}),
        ("GET", "/v1/jobs"): lambda b: d.jobs(),
    }

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "simmerge"

        def setup(self) -> None:
            super().setup()
            # Headers and body leave in separate writes; with Nagle on, the body waits for the client's delayed
            # ACK (~40 ms a request on Linux).
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

        def log_message(self, *args) -> None:  # requests are logged as events, not as access lines
            pass

        def _send(self, code: int, payload: Any) -> None:
            body = json.dumps(payload, default=str).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _handle(self, method: str) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            auth = self.headers.get("Authorization", "")
            if not hmac.compare_digest(auth.encode(), f"Bearer {d.token}".encode()):
                return self._send(401, {"error": "missing or wrong bearer token (see daemon.json)"})
            path = urlparse(self.path).path.rstrip("/")
            route = routes.get((method, path))
            if route is None:
                known = any(p == path for _, p in routes)
                return self._send(405 if known else 404, {"error": f"no route {method} {path}"})
            try:
                body = json.loads(raw) if raw else {}
                if not isinstance(body, dict):
                    raise ValueError("expected a JSON object")
            except ValueError as e:
                return self._send(400, {"error": f"invalid JSON body: {e}"})
            if d._stop.is_set():
                return self._send(503, {"error": "daemon is shutting down"})
            try:
                self._send(200, route(body))
            except SimmergeError as e:
                self._send(e.http_status, {"error": str(e)})
            except Exception as e:  # an unexpected error answers 500 and the daemon keeps serving
                event("internal error", route=path, reason=f"{type(e).__name__}: {e}")
                self._send(500, {"error": f"internal error: {type(e).__name__}: {e}"})

        def do_GET(self) -> None:
            self._handle("GET")

        def do_POST(self) -> None:
            self._handle("POST")

    return Handler
