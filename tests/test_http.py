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
