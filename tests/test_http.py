"""The daemon's HTTP layer on its own (httpserver._HttpServer): what benchmarks/bench_http.py found."""

import socket
import time

import pytest

from simmerge_bandit.httpserver import _HttpServer


@pytest.fixture
def server():
    srv = _HttpServer("127.0.0.1", 0, lambda method, target, headers, body: (200, {"target": target}))
    srv.start()
    yield srv
    srv.close()


def test_answers_to_pipelined_requests_do_not_wait_for_a_delayed_ack(server):
    # asyncio leaves TCP_NODELAY off on sockets accepted from socket.create_server's (proto 0): the second answer
    # of a pipelined batch then waited for the client's delayed ACK, 44 ms a batch on Linux
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        times = []
        for _ in range(7):
            t = time.perf_counter()
            s.sendall(b"GET /x HTTP/1.1\r\nHost: h\r\n\r\n" * 8)
            got = b""
            while got.count(b"HTTP/1.1 200") < 8 or not got.endswith(b"}"):
                got += s.recv(65536)
            times.append(time.perf_counter() - t)
        (conn,) = server._conns
        assert conn.transport.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    assert sorted(times)[3] < 0.030, times  # the median batch: 44 ms every time without TCP_NODELAY


def exchange(port: int, raw: bytes) -> bytes:
    """Send raw bytes and read until the server closes the connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(raw)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
        return out


@pytest.mark.parametrize("raw", [
    # two lengths: a proxy in front (docs/daemon.md suggests one for --allow-remote) and the daemon could each take
    # another one and disagree on where the next request starts (request smuggling)
    b"POST /x HTTP/1.1\r\nHost: h\r\nContent-Length: 2\r\nContent-Length: 40\r\n\r\n{}",
    b"GET /x HTTP/1.1\r\nHost: h\r\nBad Name: 1\r\n\r\n",          # not a header name (a space in it)
    b"GET /x HTTP/1.1\r\nHost: h\r\nContent-Length: -2\r\n\r\n",   # not a length
])
def test_requests_a_maintained_parser_refuses_are_refused(server, raw):
    # the hand-written parser took the last length (and waited for 40 bytes), any text before a colon as a name,
    # and answered 413 to a negative length
    answer = exchange(server.port, raw + b"GET /after HTTP/1.1\r\nHost: h\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 400 ") and b"Connection: close" in answer and b"/after" not in answer


def test_repeated_headers_are_one_list_and_cookies_join_with_semicolons():
    seen = []
    srv = _HttpServer("127.0.0.1", 0, lambda m, t, headers, b: (seen.append(headers), (200, {}))[1])
    srv.start()
    try:
        exchange(srv.port, b"GET /x HTTP/1.1\r\nHost: h\r\nCookie: a=1\r\nX-A: 1\r\ncookie: b=2\r\nX-A: 2\r\n"
                           b"Connection: close\r\n\r\n")
    finally:
        srv.close()
    assert seen[0]["cookie"] == "a=1; b=2" and seen[0]["x-a"] == "1, 2"
