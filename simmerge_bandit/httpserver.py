"""The HTTP/1.1 layer of the daemon's JSON API: one asyncio loop, in a thread of its own, for every connection."""

from __future__ import annotations

import asyncio
import collections
import http
import json
import socket
import threading
import time
from typing import Any, Awaitable, Callable, NamedTuple

import httptools

from .api import MAX_BODY
from .errors import SimmergeError
from .eventlog import event


def _status_of(err: Exception, where: str) -> tuple[int, dict]:
    """The HTTP answer for an error: a user's error with its own status, anything else 500 (and a log line)."""
    if isinstance(err, SimmergeError):
        return err.http_status, {"error": str(err)}
    event("internal error", route=where, reason=f"{type(err).__name__}: {err}")
    return 500, {"error": f"internal error: {type(err).__name__}: {err}"}


_PHRASES = {s.value: s.phrase for s in http.HTTPStatus}


class RawBody(NamedTuple):
    """An answer that is not JSON (a page, a script, a redirect): its bytes, content type and extra header lines
    (``Location``, ``Set-Cookie``, ...; the handler's own text, never a caller's), given as the payload of
    ``(status, payload)``."""

    body: bytes
    content_type: str
    headers: tuple[tuple[str, str], ...] = ()


class _BadRequest(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class _HttpServer:
    """A small HTTP/1.1 server for the JSON API: one asyncio loop, in its own thread, for every connection.

    Why not ``http.server``: ThreadingHTTPServer spends a thread per connection and parses headers through
    ``email.parser`` (about 0.6 ms of CPU a request, under the GIL, as much as ranking 1,320 candidates); here one
    thread reads every connection and calls ``handle(method, target, headers, body)``, which returns
    ``(status, payload)``, an :class:`asyncio.Future` of it (answered from the future's callback: no task per
    request) or a coroutine. Each connection is a plain :class:`asyncio.Protocol` that parses the bytes as they
    arrive (a stream reader's await per header line cost the loop thread about a fifth of the daemon's CPU under
    load). Requests are parsed by llhttp (Node.js's parser, through httptools, uvicorn's), not by hand: it costs
    about what the hand-written parser did, and h11 three to four times as much of this thread's CPU a request
    (``benchmarks/bench_http.py``, docs/daemon.md).
    """

    MAX_BODY = MAX_BODY
    MAX_HEADERS = 100
    MAX_LINE = 64 << 10  # the request line and headers together
    #: A request whose bytes have started to arrive must be complete within this many seconds (else 408).
    REQUEST_S = 30.0
    #: A connection with no request in progress is closed after this many seconds (a keep-alive client between
    #: calls; long, for benchmark clients that wait through a run).
    IDLE_S = 600.0
    #: Accept errors (out of file descriptors) are logged at most once per this many seconds, with their count.
    ACCEPT_LOG_S = 10.0

    def __init__(self, host: str, port: int, handle: Callable[..., Any], *, max_connections: int | None = None,
                 authorize: Callable[[dict[str, str]], bool] | None = None):
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        self.sock = socket.create_server((host, port), family=family, backlog=1024)
        self.port = self.sock.getsockname()[1]
        self.handle = handle
        #: Checked as soon as a request's headers are in, before its body is awaited.
        self.authorize = authorize
        # Open connections beyond this make room by closing the one idle the longest (never one being answered):
        # idle connections by the thousand cannot starve a caller of file descriptors or of the loop.
        self.max_connections = max_connections or default_max_connections()
        self.loop = asyncio.new_event_loop()
        self.loop.set_exception_handler(self._loop_error)
        self._accept_errors, self._accept_logged = 0, 0.0
        self._conns: dict[_HttpConnection, None] = {}  # oldest first (a dict keeps insertion order)
        self._server: asyncio.base_events.Server | None = None
        self._thread = threading.Thread(target=self._run, name="http", daemon=True)

    def start(self) -> None:
        self._server = self.loop.run_until_complete(
            self.loop.create_server(lambda: _HttpConnection(self), sock=self.sock, backlog=1024))
        self.loop.call_soon(self._sweep)
        self._thread.start()

    def _loop_error(self, loop, context: dict) -> None:
        """The loop's errors, logged without a traceback each; accept errors (EMFILE under a flood of
        connections) once per :attr:`ACCEPT_LOG_S` with their count (each used to log a traceback)."""
        msg = context.get("message", "")
        if "accept" in msg:
            self._accept_errors += 1
            now = time.monotonic()
            if now - self._accept_logged >= self.ACCEPT_LOG_S:
                exc = context.get("exception")
                event("accept failing", count=self._accept_errors, reason=f"{msg}: {exc}",
                      connections=len(self._conns))
                self._accept_logged, self._accept_errors = now, 0
            return
        exc = context.get("exception")
        event("event loop error", reason=f"{msg}: {type(exc).__name__}: {exc}" if exc else msg)

    def _admit(self, conn: "_HttpConnection") -> None:
        """Take a new connection; beyond :attr:`max_connections` close the oldest that never sent a byte, else
        the one idle the longest, else (every one is being answered) the new one."""
        self._conns[conn] = None
        if len(self._conns) <= self.max_connections:
            return
        idle = None
        for c in self._conns:  # oldest first: a flood of silent connections is found at the front
            if c is conn or c.busy:
                continue
            if not c.spoke:
                c.abort()
                return
            if idle is None or c.last_seen < idle.last_seen:
                idle = c
        (idle or conn).abort()

    def _sweep(self) -> None:
        """Once a second: close connections whose request is incomplete after :attr:`REQUEST_S` (408) and idle
        ones after :attr:`IDLE_S`."""
        now = time.monotonic()
        for c in list(self._conns):
            if c.busy or c.closed:
                continue
            if c.request_started is not None and now - c.request_started > self.REQUEST_S:
                c.refuse(408, f"request not complete within {self.REQUEST_S:g} s")
            elif c.request_started is None and now - c.last_seen > self.IDLE_S:
                c.abort()
        if self._server is not None and self._server.is_serving():
            self.loop.call_later(1.0, self._sweep)

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
        extra = "" if keep else "Connection: close\r\n"
        if isinstance(payload, RawBody):
            body, ctype = payload.body, payload.content_type
            extra += "".join(f"{k}: {v}\r\n" for k, v in payload.headers)
        else:
            body, ctype = json.dumps(payload, default=str).encode(), "application/json"
        head = (f"HTTP/1.1 {status} {_PHRASES.get(status, '')}\r\nServer: simmerge\r\n"
                f"Content-Type: {ctype}\r\nContent-Length: {len(body)}\r\n{extra}\r\n")
        return head.encode("latin-1") + body


class _HttpConnection(asyncio.Protocol):
    """One client connection: requests are parsed from the bytes received and answered in order, one at a time
    (a pipelined request waits, parsed or in the buffer, until the one before it is answered).

    llhttp calls the ``on_*`` methods as it parses; what this API refuses is decided there and after each read:
    a chunked body (501), a body over :attr:`_HttpServer.MAX_BODY` (413), a head over ``MAX_LINE`` bytes or
    ``MAX_HEADERS`` lines (431), a wrong token once a request's headers are in and its body is still to come
    (401), anything llhttp cannot parse (400). Requests complete before the refused one are answered first."""

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
        self.last_seen = time.monotonic()   # when bytes last arrived or an answer was written
        self.request_started: float | None = None  # when the first byte of an incomplete request arrived
        self.authorized = False  # the incomplete request's headers passed the token check
        self.spoke = False       # has sent a byte
        self.parser = httptools.HttpRequestParser(self)
        self.ready: collections.deque = collections.deque()  # parsed requests waiting for their turn
        self.error: _BadRequest | None = None  # the refusal of the request being parsed
        self.began = False       # a request began in the read being parsed
        self._reset()

    def _reset(self) -> None:
        """Forget the request being parsed (it is complete)."""
        self.url, self.headers, self.body = b"", {}, []
        self.head_bytes = self.pending = 0  # its head's size as the callbacks saw it / as whole reads of it
        self.parsing = self.in_body = self.continued = False

    def connection_made(self, transport) -> None:
        self.transport = transport
        # asyncio sets TCP_NODELAY only on sockets whose proto is IPPROTO_TCP, and socket.create_server's (so every
        # accepted one's) is 0: without it the second of two answers written back to back (pipelined requests)
        # waited for the client's delayed ACK, 44 ms a batch on Linux (benchmarks/bench_http.py found it).
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.server._admit(self)

    def connection_lost(self, exc) -> None:
        self.closed = True
        self.server._conns.pop(self, None)

    def abort(self) -> None:
        """Drop the connection now (nothing is being answered on it)."""
        self.closed = True
        self.transport.abort()
        self.server._conns.pop(self, None)

    def refuse(self, status: int, message: str) -> None:
        """Answer ``status`` with ``message`` and close."""
        self.transport.write(_HttpServer.response(status, {"error": message}, keep=False))
        self.transport.close()
        self.closed = True

    def data_received(self, data: bytes) -> None:
        self.buf += data
        self.spoke = True
        self.last_seen = time.monotonic()
        if self.request_started is None:
            self.request_started = self.last_seen
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
                self.refuse(e.status, str(e))
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
            # a pipelined one is under way
            self.request_started = time.monotonic() if self.buf or self.ready or self.parsing else None
            self.authorized = False
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
        self.last_seen = time.monotonic()
        if not self.keep:
            self.transport.close()
            self.closed = True

    # ---- llhttp's callbacks (an exception raised in one stops the parser) ----
    def _refuse_request(self, status: int, message: str) -> None:
        self.error = _BadRequest(status, message)
        raise self.error

    def _head(self, n: int) -> None:
        self.head_bytes += n
        if self.head_bytes > self.server.MAX_LINE:
            self._refuse_request(431, "request line or header too long")

    def on_message_begin(self) -> None:
        self.parsing = self.began = True

    def on_url(self, url: bytes) -> None:
        self.url += url
        self._head(len(url))

    def on_header(self, name: bytes, value: bytes) -> None:
        if len(self.headers) >= self.server.MAX_HEADERS:
            self._refuse_request(431, "too many header lines")
        self._head(len(name) + len(value) + 4)
        key, text = name.decode("latin-1").lower(), value.decode("latin-1")
        if key in self.headers:  # a repeated header is one list (RFC 9110 5.3); cookies join with "; "
            text = self.headers[key] + ("; " if key == "cookie" else ", ") + text
        self.headers[key] = text

    def on_headers_complete(self) -> None:
        srv = self.server
        if "transfer-encoding" in self.headers:
            self._refuse_request(501, "chunked request bodies are not supported; send Content-Length")
        if int(self.headers.get("content-length") or 0) > srv.MAX_BODY:
            self._refuse_request(413, f"request body must be at most {srv.MAX_BODY} bytes")
        self.in_body = True

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        p = self.parser
        conn = self.headers.get("connection", "").lower()
        keep = conn != "close" if p.get_http_version() == "1.1" else conn == "keep-alive"
        self.ready.append((p.get_method().decode("latin-1"), self.url.decode("latin-1"), self.headers,
                           b"".join(self.body), keep))
        self._reset()

    def _parse(self):
        """The next request as ``(method, target, headers, body, keep_alive)``, None while it is incomplete."""
        srv = self.server
        if not self.ready and self.buf and self.error is None:
            data = bytes(self.buf)
            self.buf.clear()
            in_head, self.began = self.parsing and not self.in_body, False
            try:
                self.parser.feed_data(data)
            except httptools.HttpParserCallbackError:
                pass  # self.error says why
            except httptools.HttpParserError as e:
                if self.error is None:
                    self.error = _BadRequest(400, f"malformed request: {e}")
            if self.error is None and in_head and self.parsing and not self.in_body and not self.began:
                self.pending += len(data)  # a whole read inside a head that is still incomplete (llhttp holds it)
                if max(self.pending, self.head_bytes) > srv.MAX_LINE:
                    self.error = _BadRequest(431, "request line or header too long")
        if self.ready:
            return self.ready.popleft()
        if self.error is not None:
            raise self.error
        if self.in_body:  # the next request's body is still to come (and no earlier one waits for its answer)
            if not self.authorized and srv.authorize is not None:
                # the token before the body: a caller without it cannot make the daemon wait for or hold 16 MiB
                if not srv.authorize(self.headers):
                    raise _BadRequest(401, "missing or wrong bearer token (see daemon.json)")
                self.authorized = True
            if (not self.continued and int(self.headers.get("content-length") or 0)
                    and self.headers.get("expect", "").lower() == "100-continue"):
                self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")  # curl asks before large bodies
                self.continued = True
        return None


def default_max_connections() -> int:
    """Half the file descriptors the process may open (the rest are the state's, the models', the journal's),
    at most 4096."""
    import resource

    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return max(16, min(4096, (soft if soft != resource.RLIM_INFINITY else 8192) // 2))


def settle(fut: asyncio.Future, value: Any) -> None:
    """Answer ``fut`` with ``value`` unless it is answered already (its connection may have closed at shutdown)."""
    if not fut.done():
        fut.set_result(value)
