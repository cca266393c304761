"""HTTP layer benchmark: the daemon's HTTP/1.1 server (llhttp) against its old hand-written parser, h11 and uvicorn.

Issue 20 (item 4) asked whether the hand-written parser of ``simmerge_bandit/httpserver.py`` earned its keep against
a maintained one. One run, on loopback, serves the same request handling (the bearer token checked, the JSON body
parsed, a small JSON answer) from:

- ``ours``: ``httpserver._HttpServer`` as the daemon runs it (requests parsed by llhttp through httptools, since
  this benchmark's first results);
- ``hand-written``: the same server with the hand-written parser it had before (:class:`HandWrittenConnection`);
- ``h11``: the same server with every request parsed and every answer framed by h11 (:class:`H11Connection`);
- ``uvicorn-h11`` and ``uvicorn-httptools``: uvicorn serving a minimal ASGI app that does the same.

The variants of the daemon's server change only how a connection parses and frames (its connection class, swapped
in the server's process); the connection cap, timeouts and token check before the body are the same. Each server
is a process of its own; the clients are one asyncio process that writes raw requests (cheaper than
``http.client``, so that the servers, not the client, set the pace). Scenarios: keep-alive calls from 1 and 8
concurrent connections, 16 requests pipelined per write, and one authenticated client while 3,000 idle and
half-sent connections are held open. Then the real daemon (suggest top 5 + feedback on 1,320 candidates) with
``ours``, ``hand-written`` and ``h11``. Servers run in turns within each round, so that a change of the machine's
load falls on all of them; the figures are compared as ratios to ``ours`` from the same run, and each server's CPU
time per request (from ``/proc``) is recorded beside its requests per second: on a shared 2-core machine CPU time
is the steadier figure.

    python benchmarks/bench_http.py [--seconds 3] [--rounds 3] [--flood 3000]
    python benchmarks/bench_http.py --table     # docs/daemon.md's table from the committed results
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import json
import multiprocessing
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))

try:  # the servers compared need them; --table does not
    import h11
except ImportError:
    h11 = None

from simmerge_bandit.httpserver import _PHRASES, _BadRequest, _HttpConnection, _HttpServer  # noqa: E402

OUT = ROOT / "results" / "http.json"
TOKEN = "bench-token-0123456789"
MICRO = ("ours", "hand-written", "h11", "uvicorn-h11", "uvicorn-httptools")
DAEMONS = ("ours", "hand-written", "h11")
#: The decision rule of issue 20 item 4, fixed before the run: port to h11 when it costs less than this share of
#: the real daemon's suggest + feedback throughput (8 clients), whose cost is the policy and DuckDB work.
PORT_IF_COST_BELOW = 0.25


# ---------------------------------------------------------------------------------------------------------------
# the servers


class H11Connection(_HttpConnection):
    """``_HttpConnection`` with h11 parsing each request and framing each answer; connection management (cap,
    timeouts, order of answers, pausing a pipelining client) is the base class's, unchanged."""

    def __init__(self, server: _HttpServer):
        super().__init__(server)
        self.h = h11.Connection(h11.SERVER, max_incomplete_event_size=server.MAX_LINE)
        self.req: tuple | None = None
        self.body = bytearray()

    def _parse(self):
        h, srv = self.h, self.server
        if self.buf:
            h.receive_data(bytes(self.buf))
            self.buf.clear()
        try:
            while True:
                if h.our_state is h11.DONE and h.their_state is h11.DONE:
                    h.start_next_cycle()
                ev = h.next_event()
                if ev is h11.NEED_DATA or ev is h11.PAUSED or isinstance(ev, h11.ConnectionClosed):
                    return None
                if isinstance(ev, h11.Request):
                    if len(ev.headers) > srv.MAX_HEADERS:
                        raise _BadRequest(431, "too many header lines")
                    headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in ev.headers}
                    length = int(headers.get("content-length") or 0)
                    if length > srv.MAX_BODY:
                        raise _BadRequest(413, f"request body must be at most {srv.MAX_BODY} bytes")
                    waiting = length > len(h.trailing_data[0]) or "transfer-encoding" in headers
                    if waiting and srv.authorize is not None and not srv.authorize(headers):
                        raise _BadRequest(401, "missing or wrong bearer token (see daemon.json)")
                    if waiting and h.they_are_waiting_for_100_continue:
                        self.transport.write(h.send(h11.InformationalResponse(status_code=100, headers=[])))
                    conn = headers.get("connection", "").lower()
                    keep = ev.http_version == b"1.1" and "close" not in conn
                    self.req = (ev.method.decode(), ev.target.decode("latin-1"), headers, keep)
                    self.body = bytearray()
                elif isinstance(ev, h11.Data):
                    self.body += ev.data
                    if len(self.body) > srv.MAX_BODY:
                        raise _BadRequest(413, f"request body must be at most {srv.MAX_BODY} bytes")
                elif isinstance(ev, h11.EndOfMessage):
                    method, target, headers, keep = self.req
                    return method, target, headers, bytes(self.body), keep
        except h11.RemoteProtocolError as e:
            raise _BadRequest(e.error_status_hint, str(e)) from None

    def _write(self, status: int, payload) -> None:
        if self.closed:
            return
        body = json.dumps(payload, default=str).encode()
        headers = [("Server", "simmerge"), ("Content-Type", "application/json"), ("Content-Length", str(len(body)))]
        if not self.keep:
            headers.append(("Connection", "close"))
        h = self.h
        self.transport.write(h.send(h11.Response(status_code=status, headers=headers,
                                                 reason=_PHRASES.get(status, "").encode()))
                             + h.send(h11.Data(data=body)) + h.send(h11.EndOfMessage()))
        self.busy = False
        self.last_seen = time.monotonic()
        if not self.keep or h.our_state is h11.MUST_CLOSE:
            self.transport.close()
            self.closed = True


class HandWrittenConnection(_HttpConnection):
    """The connection as it was before llhttp (httpserver.py up to commit 04f1f68): the hand-written parser below,
    kept here as the baseline; everything else is the server's own."""

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
        if len(buf) < start + length and not self.authorized and srv.authorize is not None:
            # the token before the body: a caller without it cannot make the daemon wait for or hold 16 MiB
            if not srv.authorize(headers):
                raise _BadRequest(401, "missing or wrong bearer token (see daemon.json)")
            self.authorized = True
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


def use_h11() -> None:
    """Make every ``_HttpServer`` of this process take its connections as :class:`H11Connection`."""
    import simmerge_bandit.httpserver as hs

    hs._HttpConnection = H11Connection


def use_hand_written() -> None:
    """Make every ``_HttpServer`` of this process take its connections as :class:`HandWrittenConnection`."""
    import simmerge_bandit.httpserver as hs

    hs._HttpConnection = HandWrittenConnection


def _authorized(headers: dict[str, str]) -> bool:
    return hmac.compare_digest(headers.get("authorization", "").encode(), f"Bearer {TOKEN}".encode())


def _answer(auth_ok: bool, body: bytes) -> tuple[int, dict]:
    """The handling every server does: the token, the JSON body, a small JSON answer."""
    if not auth_ok:
        return 401, {"error": "missing or wrong bearer token"}
    try:
        req = json.loads(body) if body else {}
    except ValueError as e:
        return 400, {"error": f"invalid JSON body: {e}"}
    return 200, {"task": req.get("task"), "top": req.get("top"), "ok": True}


async def asgi_app(scope, receive, send):
    auth = b""
    for k, v in scope["headers"]:
        if k == b"authorization":
            auth = v
    body = b""
    while True:
        msg = await receive()
        body += msg.get("body", b"")
        if not msg.get("more_body"):
            break
    status, payload = _answer(hmac.compare_digest(auth, f"Bearer {TOKEN}".encode()), body)
    data = json.dumps(payload).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]})
    await send({"type": "http.response.body", "body": data})


def serve(kind: str) -> None:
    """Run one server (this process), print its port, and serve until stdin closes."""
    sock_port = None
    if kind in ("ours", "h11", "hand-written"):
        if kind == "h11":
            use_h11()
        elif kind == "hand-written":
            use_hand_written()
        srv = _HttpServer("127.0.0.1", 0, lambda m, t, headers, body: _answer(_authorized(headers), body),
                          authorize=_authorized)
        srv.start()
        sock_port = srv.port
        print(sock_port, flush=True)
        sys.stdin.read()
        return
    import uvicorn

    # proto IPPROTO_TCP: asyncio then sets TCP_NODELAY on each accepted socket (uvicorn's own bind leaves proto 0,
    # and its answer's head and body, written apart, then wait 40 ms for a delayed ACK: not what is compared here)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(1024)
    cfg = uvicorn.Config(asgi_app, http=kind.split("-", 1)[1], lifespan="off", log_level="error", access_log=False,
                         loop="asyncio", backlog=1024)
    server = uvicorn.Server(cfg)
    print(sock.getsockname()[1], flush=True)
    import threading

    threading.Thread(target=lambda: (sys.stdin.read(), setattr(server, "should_exit", True)), daemon=True).start()
    server.run(sockets=[sock])


def serve_daemon(kind: str, home: str) -> None:
    """The real daemon (``simmerge daemon``) in this process, with h11 connections when ``kind`` is h11."""
    if kind == "h11":
        use_h11()
    elif kind == "hand-written":
        use_hand_written()
    from simmerge_bandit.cli import main

    sys.argv = ["simmerge", "--home", home, "daemon", "--port", "0", "--eval-budget", "0"]
    main()


class Server:
    """A server process of this script."""

    def __init__(self, kind: str, daemon_home: Path | None = None):
        self.kind = kind
        args = ["--serve-daemon", kind, str(daemon_home)] if daemon_home else ["--serve", kind]
        self.proc = subprocess.Popen([sys.executable, __file__, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=open(Path(tempfile.gettempdir()) / f"bench-http-{kind}.log", "wb"))
        if daemon_home is None:
            self.port, self.token = int(self.proc.stdout.readline()), TOKEN
        else:
            deadline = time.time() + 120
            while not (daemon_home / "daemon.json").exists():
                if self.proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"daemon {kind} did not start")
                time.sleep(0.1)
            info = json.loads((daemon_home / "daemon.json").read_text())
            self.port, self.token = info["port"], info["token"]

    def cpu_s(self) -> float:
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def rss_kb(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        return 0

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.stdin.close()
        try:
            return self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


# ---------------------------------------------------------------------------------------------------------------
# the client


def request(path: str, body: dict, token: str) -> bytes:
    data = json.dumps(body).encode()
    return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n").encode() + data


async def read_response(r: asyncio.StreamReader) -> tuple[int, bytes]:
    head = await r.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    low = head.lower()
    i = low.find(b"content-length:")
    n = int(low[i + 15:low.find(b"\r\n", i)])
    return status, await r.readexactly(n)


async def _micro(port: int, conns: int, seconds: float, depth: int) -> dict:
    """``conns`` keep-alive connections, each writing ``depth`` requests at a time and reading their answers."""
    req = request("/v1/suggest", {"task": "double", "top": 5}, TOKEN) * depth
    lat: list[float] = []
    bad = 0
    start = time.perf_counter()
    stop = start + seconds

    async def one():
        nonlocal bad
        r, w = await asyncio.open_connection("127.0.0.1", port)
        while time.perf_counter() < stop:
            t = time.perf_counter()
            w.write(req)
            for _ in range(depth):
                status, _ = await read_response(r)
                bad += status != 200
            lat.append(time.perf_counter() - t)
        w.close()

    await asyncio.gather(*(one() for _ in range(conns)))
    elapsed = time.perf_counter() - start
    return {"requests": len(lat) * depth, "seconds": elapsed, "latencies": lat, "errors": bad}


async def _daemon_load(port: int, token: str, conns: int, seconds: float) -> dict:
    """Each connection: suggest top 5, then feedback on the first suggestion, as fast as answered."""
    lat: list[float] = []
    bad = 0
    start = time.perf_counter()
    stop = start + seconds

    async def one(k: int):
        nonlocal bad
        rng = np.random.default_rng(k)
        r, w = await asyncio.open_connection("127.0.0.1", port)
        sug = request("/v1/suggest", {"task": "double", "top": 5}, token)
        while time.perf_counter() < stop:
            t = time.perf_counter()
            w.write(sug)
            status, body = await read_response(r)
            lat.append(time.perf_counter() - t)
            if status != 200:
                bad += 1
                continue
            t = time.perf_counter()
            w.write(request("/v1/feedback", {"id": json.loads(body)[0]["id"], "reward": float(rng.uniform(0, 1))},
                            token))
            status, _ = await read_response(r)
            lat.append(time.perf_counter() - t)
            bad += status != 200
        w.close()

    await asyncio.gather(*(one(k) for k in range(conns)))
    elapsed = time.perf_counter() - start
    return {"requests": len(lat), "seconds": elapsed, "latencies": lat, "errors": bad}


def measure(server: Server, fn, *args) -> dict:
    c0 = server.cpu_s()
    res = asyncio.run(fn(*args))
    res["server_cpu_s"] = server.cpu_s() - c0
    return res


def summarize(parts: list[dict], depth: int = 1) -> dict:
    n = sum(p["requests"] for p in parts)
    secs = sum(p["seconds"] for p in parts)
    lat = np.concatenate([p["latencies"] for p in parts]) * 1000.0
    cpu = sum(p["server_cpu_s"] for p in parts)
    return {"requests": n, "rps": n / secs, "p50_ms": float(np.percentile(lat, 50)),
            "p99_ms": float(np.percentile(lat, 99)), "server_cpu_us_per_request": 1e6 * cpu / max(n, 1),
            "errors": sum(p["errors"] for p in parts), **({"pipeline_depth": depth} if depth > 1 else {})}


def flood(server: Server, n: int, seconds: float) -> dict:
    """Hold ``n`` connections (half silent, half with a request half sent) while one authenticated keep-alive
    client calls; then count how many of the flood the server still holds and how a new connection fares."""
    socks, refused = [], 0
    t0 = time.perf_counter()
    for i in range(n):
        try:
            s = socket.create_connection(("127.0.0.1", server.port), timeout=5)
            if i % 2:
                s.sendall(b"POST /v1/suggest HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Len")
            socks.append(s)
        except OSError:
            refused += 1
    opened = time.perf_counter() - t0
    time.sleep(1.0)
    rss = server.rss_kb()
    res = measure(server, _micro, server.port, 1, seconds, 1)
    fresh = []
    for _ in range(20):  # a new client's first call (connect + request) during the flood
        t = time.perf_counter()
        with socket.create_connection(("127.0.0.1", server.port), timeout=30) as s:
            s.sendall(request("/v1/suggest", {"task": "double", "top": 5}, TOKEN))
            got = s.recv(100)
        fresh.append(time.perf_counter() - t)
        if not got.startswith(b"HTTP/1.1 200"):
            res["errors"] += 1
    held = 0
    for s in socks:
        s.setblocking(False)
        try:
            held += s.recv(1) != b""  # b"" or an error: the server closed it
        except BlockingIOError:
            held += 1
        except OSError:
            pass
        s.close()
    out = summarize([res])
    return {**out, "connections": n, "refused": refused, "open_s": opened, "held_after": held,
            "held_after_s": time.perf_counter() - t0, "server_rss_kb": rss,
            "new_connection_p50_ms": 1000 * float(np.median(fresh)), "new_connection_max_ms": 1000 * max(fresh)}


# ---------------------------------------------------------------------------------------------------------------
# the run


def _build_catalog(home: str, work: str) -> None:
    sys.path.insert(0, str(ROOT))
    from bench_daemon import make_catalog

    make_catalog(Path(home), Path(work))


def run(args) -> dict:
    load_before = os.getloadavg()
    res: dict = {"benchmark": "http", "seconds_per_turn": args.seconds, "rounds": args.rounds,
                 "daemon_rounds": args.daemon_rounds,
                 "versions": {"h11": h11.__version__}}
    try:
        import uvicorn

        res["versions"]["uvicorn"] = uvicorn.__version__
        import httptools

        res["versions"]["httptools"] = httptools.__version__
        kinds = MICRO
    except ImportError:
        kinds = MICRO[:3]
    dkinds = DAEMONS
    scenarios = {"keepalive_1": (1, 1), "keepalive_8": (8, 1), "pipelined_16": (1, 16)}
    servers = {k: Server(k) for k in kinds}
    parts: dict = {s: {k: [] for k in kinds} for s in scenarios}
    try:
        for k in kinds:  # warm-up
            measure(servers[k], _micro, servers[k].port, 2, 0.3, 1)
        for r in range(args.rounds):
            for s, (conns, depth) in scenarios.items():
                for k in kinds[r % len(kinds):] + kinds[:r % len(kinds)]:
                    parts[s][k].append(measure(servers[k], _micro, servers[k].port, conns, args.seconds, depth))
        micro = {s: {k: summarize(parts[s][k], scenarios[s][1]) for k in kinds} for s in scenarios}
        res["micro"] = micro
        res["flood"] = {k: flood(servers[k], args.flood, args.seconds) for k in kinds}
    finally:
        for srv in servers.values():
            srv.stop()

    tmp = Path(tempfile.mkdtemp(prefix="simmerge-bench-http-"))
    try:
        work, base_home = tmp / "models", tmp / "home"
        work.mkdir()
        p = multiprocessing.get_context("spawn").Process(target=_build_catalog, args=(str(base_home), str(work)))
        p.start()
        p.join()
        homes = {}
        for k in dkinds:
            homes[k] = tmp / f"home-{k}"
            shutil.copytree(base_home, homes[k])
        daemons = {k: Server(k, homes[k]) for k in dkinds}
        dparts: dict = {c: {k: [] for k in dkinds} for c in (1, 8)}
        try:
            for k in dkinds:  # warm-up: the first suggest computes signatures and features
                measure(daemons[k], _daemon_load, daemons[k].port, daemons[k].token, 1, 2.0)
            for r in range(args.daemon_rounds):
                for c in (1, 8):
                    for k in dkinds[r % len(dkinds):] + dkinds[:r % len(dkinds)]:
                        dparts[c][k].append(measure(daemons[k], _daemon_load, daemons[k].port, daemons[k].token,
                                                    c, args.seconds))
        finally:
            codes = {k: d.stop() for k, d in daemons.items()}
        res["daemon"] = {f"suggest_feedback_{c}": {k: summarize(dparts[c][k]) for k in dkinds} for c in (1, 8)}
        res["daemon_exit_codes"] = codes
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    res["ratios_to_ours"] = ratios(res)
    res["decision"] = decide(res)
    res["machine"] = {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                      "load_avg_before": load_before, "load_avg_after": os.getloadavg()}
    return res


def decide(res: dict) -> dict:
    """Issue 20 item 4's rule, from the figures: a maintained parser is used when it costs the real daemon under
    :data:`PORT_IF_COST_BELOW` of the hand-written parser's throughput (8 clients); of those within the rule, the
    one with the least HTTP-layer CPU per request (8 keep-alive clients: the daemon-level figures move by tens of
    percent from one round to the next on a shared machine, the CPU per request much less). The hand-written parser
    is ``hand-written`` in a run since the port, ``ours`` in the run that decided it (commit 04f1f68)."""
    base = "hand-written" if "hand-written" in res["daemon"]["suggest_feedback_8"] else "ours"
    d8, m8 = res["daemon"]["suggest_feedback_8"], res["micro"]["keepalive_8"]
    cost = {k: 1 - d8[k]["rps"] / d8[base]["rps"] for k in d8 if k != base}
    within = [k for k, c in cost.items() if c < PORT_IF_COST_BELOW]
    cpu = {k: m8[k]["server_cpu_us_per_request"] / m8[base]["server_cpu_us_per_request"] for k in within}
    return {"rule": f"use a maintained parser when it costs the real daemon under {PORT_IF_COST_BELOW:.0%} of the "
                    "hand-written parser's suggest + feedback throughput (8 clients); of those, the one with the "
                    "least HTTP-layer CPU per request",
            "baseline": base, "daemon_throughput_cost": cost, "within_rule": within,
            "http_cpu_per_request_vs_baseline": cpu, "choice": min(cpu, key=cpu.get) if cpu else base}


def ratios(res: dict) -> dict:
    """Each server's figures over ours from the same run (requests/s: above 1 is faster; latency and CPU per
    request: above 1 is slower)."""
    keys = ("rps", "p50_ms", "p99_ms", "server_cpu_us_per_request")
    out: dict = {"micro": {}, "daemon": {}, "flood": {}}
    for group in ("micro", "daemon"):
        for s, by in res[group].items():
            out[group][s] = {k: {q: v[q] / by["ours"][q] for q in keys} for k, v in by.items() if k != "ours"}
    fl = res["flood"]
    out["flood"] = {k: {q: v[q] / fl["ours"][q] for q in ("rps", "p50_ms", "p99_ms")} for k, v in fl.items()
                    if k != "ours"}
    return out


# ---------------------------------------------------------------------------------------------------------------
# the table


def markdown_table(res: dict) -> str:
    micro, daemon, fl = res["micro"], res["daemon"], res["flood"]
    kinds = list(micro["keepalive_1"])
    rows = ["| scenario | " + " | ".join(f"`{k}`" for k in kinds) + " |", "|---|" + "---|" * len(kinds)]

    def line(label: str, by: dict, fmt) -> str:
        return f"| {label} | " + " | ".join(fmt(by[k], by["ours"]) if k in by else "" for k in kinds) + " |"

    def rps(v, o):
        return f"{v['rps']:,.0f}" + ("" if v is o else f" ({v['rps'] / o['rps']:.2f}x)")

    def lat(v, o):
        return f"{v['p50_ms']:.2f} / {v['p99_ms']:.2f}"

    def cpu(v, o):
        us, base = v["server_cpu_us_per_request"], o["server_cpu_us_per_request"]
        return f"{us:.0f}" + ("" if v is o else f" ({us / base:.2f}x)")

    names = {"keepalive_1": "1 keep-alive client", "keepalive_8": "8 keep-alive clients",
             "pipelined_16": "1 client, 16 requests pipelined per write"}
    for s, label in names.items():
        rows += [line(f"{label}: requests/s", micro[s], rps), line(f"{label}: p50 / p99 ms", micro[s], lat),
                 line(f"{label}: server CPU µs per request", micro[s], cpu)]
    n = next(iter(fl.values()))["connections"]
    rows += [line(f"{n:,} idle and half-sent connections held: 1 client's requests/s", fl, rps),
             line("same: p50 / p99 ms", fl, lat),
             line("same: a new connection's first answer, median / max ms", fl,
                  lambda v, o: f"{v['new_connection_p50_ms']:.1f} / {v['new_connection_max_ms']:.0f}"),
             line("same: flood connections the server still held after", fl,
                  lambda v, o: f"{v['held_after']:,} of {v['connections']:,} ({v['held_after_s']:.0f} s)"),
             line("same: server RSS MiB", fl, lambda v, o: f"{v['server_rss_kb'] / 1024:.0f}")]
    dk = list(daemon["suggest_feedback_1"])
    rows += ["", "The real daemon (suggest top 5 of 1,320 candidates, then feedback; each call counted):", "",
             "| scenario | " + " | ".join(f"`{k}`" for k in dk) + " |", "|---|" + "---|" * len(dk)]
    for c in (1, 8):
        by, who = daemon[f"suggest_feedback_{c}"], f"{c} client{'s' if c > 1 else ''}"
        for label, fmt in (("calls/s", rps), ("p50 / p99 ms", lat), ("daemon CPU µs per call", cpu)):
            rows.append(f"| {who}: {label} | " + " | ".join(fmt(by[k], by["ours"]) for k in dk) + " |")
    d, m = decide(res), res["machine"]
    costs = ", ".join(f"`{k}` {c:.0%}" for k, c in d["daemon_throughput_cost"].items())
    rows += ["", f"Rule: {d['rule']}. Measured cost against `{d['baseline']}`: {costs}; choice: `{d['choice']}`"
             + (" (llhttp)" if d["choice"] == "ours" else "") + ". "
             f"{res['rounds']} rounds of {res['seconds_per_turn']:g} s per server and scenario "
             f"({res['daemon_rounds']} for the daemon), servers in turns; h11 {res['versions']['h11']}"
             + (f", uvicorn {res['versions']['uvicorn']}, httptools {res['versions']['httptools']}"
                if "uvicorn" in res["versions"] else "")
             + f". Machine: {m['cpus']} CPU cores shared with other jobs, load average {m['load_avg_before'][0]:.1f}"
             f" before and {m['load_avg_after'][0]:.1f} after; Python {m['python']}."]
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=3.0, help="seconds per server, scenario and round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--daemon-rounds", type=int, default=5, help="rounds of the real daemon's turns")
    ap.add_argument("--flood", type=int, default=3000, help="connections held open in the flood scenario")
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("--table", action="store_true", help="print the docs table from --out and exit")
    ap.add_argument("--serve", help=argparse.SUPPRESS)
    ap.add_argument("--serve-daemon", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.table:
        print(markdown_table(json.loads(Path(args.out).read_text())))
        return
    if args.serve:
        serve(args.serve)
        return
    if args.serve_daemon:
        serve_daemon(*args.serve_daemon)
        return
    res = run(args)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2))
    print(markdown_table(res))


if __name__ == "__main__":
    main()
