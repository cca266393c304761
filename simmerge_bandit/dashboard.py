"""The daemon's dashboard: a page to watch a daemon that learns for days, its login, and the data it shows.

- **Login.** ``simmerge ui`` asks the daemon, with the token, for a single-use nonce (operation ``ui_login``) and
  prints ``http://HOST:PORT/ui/login?nonce=N``. Opening it within :data:`NONCE_S` seconds trades the nonce for a
  session secret, set as an ``HttpOnly; SameSite=Strict`` cookie (never the token), and redirects to ``/ui/``.
- **Pages.** The static files of ``simmerge_bandit/ui/`` (no build step, nothing from another host), served only
  to a valid session or to the bearer token; anything else gets a page that says how to log in.
- **Data.** ``GET /v1/dashboard`` (operation ``dashboard``, :func:`snapshot`) is the one JSON route that also
  takes the session cookie; the page polls it.

Sessions live in the daemon's memory: a restart ends them (run ``simmerge ui`` again). Neither the token, a nonce
nor a session secret is ever written to the daemon's log: the login is logged as ``ui login ok=...`` only.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import threading
import time
from importlib import resources

from .eventlog import event
from .httpserver import RawBody

#: Seconds a login URL works (once).
NONCE_S = 60.0
#: Seconds a session lasts after its login.
SESSION_S = 12 * 3600.0
#: Outstanding nonces and live sessions at most (the oldest goes first): a token holder calling ``ui_login`` in a
#: loop cannot grow the daemon's memory.
MAX_NONCES, MAX_SESSIONS = 64, 256
#: The one file served without a session: the stylesheet, which the login page uses too (it holds no data).
PUBLIC = "/ui/style.css"
#: The JSON routes that a session cookie opens (read-only, GET).
COOKIE_ROUTES = frozenset({"/v1/dashboard"})
#: Rows of the decision stream, the job list and the catalog lists the page gets; points of the reward curve.
DECISIONS, JOBS, CATALOG_ROWS, CURVE_POINTS = 50, 30, 200, 200

_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
          ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml"}
# Everything from this origin only; no inline script (the page builds its DOM with textContent: a model or task
# name is never markup).
_SECURITY = (("Content-Security-Policy", "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
                                         "connect-src 'self'; base-uri 'none'; form-action 'self'; "
                                         "frame-ancestors 'none'"),
             ("X-Content-Type-Options", "nosniff"), ("X-Frame-Options", "DENY"), ("Referrer-Policy", "no-referrer"),
             ("Cache-Control", "no-store"))


def _digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode("utf-8", "replace")).digest()


class UiSessions:
    """Nonces and sessions of one daemon; thread-safe (nonces are issued on the API pool, spent on the HTTP loop)."""

    def __init__(self, host: str, port: int):
        self.host, self.port = host, port
        # Per port: cookies are shared by every port of a host, and two daemons on one machine must not log each
        # other out.
        self.cookie = f"simmerge_ui_{port}"
        self._lock = threading.Lock()
        self._nonces: dict[bytes, float] = {}    # digest -> expiry (insertion order: oldest first)
        self._sessions: dict[bytes, float] = {}

    def issue(self) -> dict:
        """A fresh login URL: ``{"url", "expires_s"}``."""
        nonce = secrets.token_urlsafe(32)
        with self._lock:
            self._prune(self._nonces, MAX_NONCES - 1)
            self._nonces[_digest(nonce)] = time.monotonic() + NONCE_S
        host = f"[{self.host}]" if ":" in self.host else self.host
        if host in ("0.0.0.0", "[::]"):
            host = "127.0.0.1"
        return {"url": f"http://{host}:{self.port}/ui/login?nonce={nonce}", "expires_s": NONCE_S}

    def login(self, nonce: str) -> str | None:
        """Spend ``nonce``: a new session secret, or None when the nonce is unknown, spent or expired."""
        with self._lock:
            expiry = self._nonces.pop(_digest(nonce), None)
            if expiry is None or expiry < time.monotonic():
                return None
            secret = secrets.token_urlsafe(32)
            self._prune(self._sessions, MAX_SESSIONS - 1)
            self._sessions[_digest(secret)] = time.monotonic() + SESSION_S
            return secret

    def valid(self, headers: dict[str, str]) -> bool:
        """Whether the request's cookie holds a live session."""
        secret = self._secret(headers)
        if secret is None:
            return False
        with self._lock:
            expiry = self._sessions.get(_digest(secret))
            return expiry is not None and expiry >= time.monotonic()

    def logout(self, headers: dict[str, str]) -> None:
        secret = self._secret(headers)
        if secret is not None:
            with self._lock:
                self._sessions.pop(_digest(secret), None)

    def _secret(self, headers: dict[str, str]) -> str | None:
        for part in headers.get("cookie", "").split(";"):
            name, eq, value = part.strip().partition("=")
            if eq and name == self.cookie and value:
                return value
        return None

    @staticmethod
    def _prune(table: dict[bytes, float], keep: int) -> None:
        now = time.monotonic()
        for k in [k for k, exp in table.items() if exp < now]:
            del table[k]
        while len(table) > keep:
            del table[next(iter(table))]


def _static_files() -> dict[str, tuple[bytes, str]]:
    """``name -> (bytes, content type)`` of the package's ``ui/`` folder, read once."""
    out = {}
    for f in resources.files("simmerge_bandit").joinpath("ui").iterdir():
        suffix = "." + f.name.rsplit(".", 1)[-1]
        if f.is_file() and suffix in _TYPES:
            out[f.name] = (f.read_bytes(), _TYPES[suffix])
    return out


def _page(title: str, text: str) -> RawBody:
    """A plain page with one message (login needed, link spent); uses the dashboard's stylesheet."""
    from html import escape

    body = (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title>'
            f'<link rel="stylesheet" href="/ui/style.css"></head><body><main class="message"><h1>{escape(title)}</h1>'
            f"<p>{escape(text)}</p></main></body></html>")
    return RawBody(body.encode(), _TYPES[".html"], _SECURITY)


LOGIN_NEEDED = ("Log in to the simmerge dashboard",
                "This page needs a login link: run `simmerge ui` where the daemon runs (for the same state home) "
                "and open the URL it prints. Each link works once, within a minute.")


class Dashboard:
    """The ``/ui/`` routes of one daemon: login, logout and the static page."""

    def __init__(self, sessions: UiSessions, authorized):
        self.sessions = sessions
        self._authorized = authorized  # the daemon's bearer-token check
        self.files = _static_files()

    def allows(self, method: str, path: str, headers: dict[str, str]) -> bool:
        """Whether a JSON route may be answered to this session cookie (the token is checked by the daemon)."""
        return method == "GET" and path in COOKIE_ROUTES and self.sessions.valid(headers)

    def handle(self, method: str, path: str, query: str, headers: dict[str, str]) -> tuple[int, RawBody]:
        """Answer a request under ``/ui``; never raises (a request's URL, which may hold a nonce, must not reach
        the log through an error)."""
        try:
            return self._handle(method, path, query, headers)
        except Exception as e:  # noqa: BLE001 (logged without the URL)
            event("internal error", route="/ui", reason=type(e).__name__)
            return 500, _page("Dashboard error", "The dashboard failed to answer; see the daemon's log.")

    def _handle(self, method: str, path: str, query: str, headers: dict[str, str]) -> tuple[int, RawBody]:
        from urllib.parse import parse_qs

        if path == "/ui/login":
            if method != "GET":
                return 405, _page("Method not allowed", f"{method} {path}")
            nonce = (parse_qs(query).get("nonce") or [""])[0]
            secret = self.sessions.login(nonce) if nonce else None
            event("ui login", ok=secret is not None)
            if secret is None:
                return 401, _page("This login link does not work",
                                  "Each link works once, within a minute of `simmerge ui`, and only for the daemon "
                                  "that printed it. Run `simmerge ui` again.")
            cookie = f"{self.sessions.cookie}={secret}; HttpOnly; SameSite=Strict; Path=/; Max-Age={int(SESSION_S)}"
            return 303, RawBody(b"", _TYPES[".html"], (("Location", "/ui/"), ("Set-Cookie", cookie), *_SECURITY))
        if path == "/ui/logout":
            if method != "POST":
                return 405, _page("Method not allowed", f"{method} {path}")
            self.sessions.logout(headers)
            gone = f"{self.sessions.cookie}=; HttpOnly; SameSite=Strict; Path=/; Max-Age=0"
            return 200, RawBody(b"{}", "application/json", (("Set-Cookie", gone), *_SECURITY))
        if path != PUBLIC and not (self.sessions.valid(headers) or self._authorized(headers)):
            return 401, _page(*LOGIN_NEEDED)
        if method != "GET":
            return 405, _page("Method not allowed", f"{method} {path}")
        if path in ("/ui", "/ui/"):
            path = "/ui/index.html"
        name = path[len("/ui/"):]
        if name not in self.files:  # the folder's own names only: no path is ever joined
            return 404, _page("Not found", path)
        data, ctype = self.files[name]
        return 200, RawBody(data, ctype, _SECURITY)


# ---- the data ----

def _json_list(text: str | None) -> list:
    try:
        v = json.loads(text) if text else []
    except ValueError:
        return [text]
    return v if isinstance(v, list) else [v]


def _scores(raw: str | None, target: str, raw_score: float | None) -> dict | None:
    """A reward's raw score per task: as recorded, or for a one-task target its raw score."""
    if raw:
        try:
            return json.loads(raw)
        except ValueError:
            return None
    if raw_score is not None and "," not in target and "=" not in target:
        return {target: raw_score}
    return None


def snapshot(backend, *, policy: str, search_errors: dict[str, str] | None = None,
             decisions: int = DECISIONS) -> dict:
    """What the dashboard shows, read from ``backend``'s store in one call (bounded whatever the log's size):

    ``status`` (as ``simmerge status --json``), ``policy`` (the default one and every snapshot), ``targets`` (each
    target with its counts and best rewarded merge, with per-task scores), ``decisions`` (the latest, with their
    rewards), ``curve`` (cumulative reward against rewards received, at most :data:`CURVE_POINTS` points),
    ``jobs`` (the latest evaluation jobs and every search), ``operators`` and ``models`` (with how often each was
    chosen and its mean reward)."""
    store = backend.store
    status = backend.op_status()
    rows = store.fetchdicts(
        "SELECT d.id, d.task AS target, d.models, d.operator, d.policy, d.rank, d.propensity, d.evaluate, "
        "d.created_at, r.reward, r.raw_score, r.scores, r.source FROM decision_log d "
        "LEFT JOIN rewards r ON r.decision_id = d.id ORDER BY d.created_at DESC, d.rank LIMIT ?", [int(decisions)])
    stream = [{**{k: r[k] for k in ("id", "target", "policy", "rank", "propensity", "evaluate", "created_at",
                                    "reward", "source")},
               "models": _json_list(r["models"]), "operator": _json_list(r["operator"]),
               "scores": _scores(r["scores"], r["target"], r["raw_score"])} for r in rows]

    per_target = {t: {"target": t, "decisions": int(n), "rewards": 0, "best": None, "last_at": at}
                  for t, n, at in store.fetchall("SELECT task, count(*), max(created_at) FROM decision_log "
                                                 "GROUP BY task")}
    best = store.fetchdicts(
        "SELECT d.task AS target, count(*) AS n, max(r.created_at) AS last_reward, arg_max(d.id, r.reward) AS id "
        "FROM rewards r JOIN decision_log d ON d.id = r.decision_id GROUP BY d.task")
    if best:
        ids = [b["id"] for b in best]
        detail = {r["id"]: r for r in store.fetchdicts(
            "SELECT d.id, d.models, d.operator, d.params, r.reward, r.raw_score, r.scores, r.created_at "
            f"FROM decision_log d JOIN rewards r ON r.decision_id = d.id WHERE d.id IN ({', '.join('?' * len(ids))})",
            ids)}
        for b in best:
            t = per_target.setdefault(b["target"], {"target": b["target"], "decisions": 0, "best": None,
                                                    "last_at": b["last_reward"]})
            d = detail[b["id"]]
            t["rewards"] = int(b["n"])
            t["best"] = {"id": d["id"], "models": _json_list(d["models"]), "operator": _json_list(d["operator"]),
                         "params": _json_list(d["params"]) if d["params"] else None, "reward": d["reward"],
                         "scores": _scores(d["scores"], b["target"], d["raw_score"]), "at": d["created_at"]}
    targets = sorted(per_target.values(), key=lambda t: str(t["last_at"]), reverse=True)[:CATALOG_ROWS]

    n_rewards = int(store.fetchone("SELECT count(*) FROM rewards")[0])
    step = max(1, -(-n_rewards // CURVE_POINTS))
    curve, total, seen = [], 0.0, 0
    for _, n, s, at in store.fetchall(
            "SELECT i // ? AS b, count(*), sum(reward), max(created_at) FROM (SELECT reward, created_at, "
            "row_number() OVER (ORDER BY seq) - 1 AS i FROM rewards) GROUP BY b ORDER BY b", [step]):
        seen, total = seen + int(n), total + float(s)
        curve.append({"rewards": seen, "cumulative": total, "mean": float(s) / int(n), "at": at})

    jobs = store.fetchdicts(
        "SELECT q.decision_id AS id, q.state, q.attempts, q.last_error AS error, q.updated_at, d.task AS target, "
        "d.models, d.operator, r.reward FROM eval_queue q LEFT JOIN decision_log d ON d.id = q.decision_id "
        "LEFT JOIN rewards r ON r.decision_id = q.decision_id ORDER BY q.updated_at DESC LIMIT ?", [JOBS])
    for j in jobs:
        j["models"], j["operator"] = _json_list(j["models"]), _json_list(j["operator"])
        if j["state"] == "queued" and j["reward"] is not None:  # the reward closed it (as evalqueue.counts says)
            j["state"] = "done"
    from .search import searches

    found = searches(store)[-JOBS:]
    for s in found:
        if (search_errors or {}).get(s["id"]):
            s["error"] = search_errors[s["id"]]

    use = {ops: (int(n), avg) for ops, n, avg in store.fetchall(  # ops: a JSON list of names, as logged
        "SELECT d.operator, count(*), avg(r.reward) FROM decision_log d LEFT JOIN rewards r ON r.decision_id = d.id "
        "WHERE d.rank = 0 GROUP BY d.operator")}
    operators = [{"name": o["name"], "method": o["method"], "params": o["params"], "ranges": o.get("ranges"),
                  "status": o["status"], "chosen": use.get(json.dumps([o["name"]]), (0, None))[0],
                  "mean_reward": use.get(json.dumps([o["name"]]), (0, None))[1]}
                 for o in backend.op_operators(all=True)][:CATALOG_ROWS]
    models = store.fetchdicts("SELECT name, base, tasks, architecture, n_params, dtype, added_at FROM models "
                              "ORDER BY added_at, name LIMIT ?", [CATALOG_ROWS])  # (not the tensor tables)
    for m in models:
        m["tasks"] = _json_list(m["tasks"]) if m["tasks"] else None
    return {"status": status,
            "policy": {"default": policy, "snapshots": status.get("policies", [])},
            "targets": targets, "decisions": stream, "curve": curve,
            "jobs": {"evaluations": jobs, "searches": found[::-1]},
            "operators": operators, "models": models,
            "shown": {"decisions": decisions, "jobs": JOBS, "rows": CATALOG_ROWS}}
