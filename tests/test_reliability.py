"""Issue 20: bad input never breaks a home, no client hangs, the API is not a shell.

Each test feeds what a hostile but realistic user would (a daemon that never answers, binary files, server paths,
deep JSON, leftovers of a killed merge, a checkpoint registered twice) and checks for a one-line error and no
change."""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from simmerge_bandit import api
from simmerge_bandit.cli import cli


def _one_line(res) -> str:
    out = res.output.strip()
    assert "Traceback" not in out and len(out.splitlines()) == 1, out
    return out


# ---- clients do not hang on a daemon that does not answer ----

@pytest.fixture
def silent_daemon(simmerge_home):
    """A daemon.json naming a live pid (this process) whose port accepts connections and never answers."""
    srv = socket.create_server(("127.0.0.1", 0))
    accepted, stop = [], threading.Event()

    def accept():
        srv.settimeout(0.1)
        while not stop.is_set():
            try:
                accepted.append(srv.accept()[0])  # held open, never read, never answered
            except OSError:
                pass

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    simmerge_home.mkdir(parents=True, exist_ok=True)
    info = {"pid": os.getpid(), "port": srv.getsockname()[1], "token": "t", "host": "127.0.0.1"}
    (simmerge_home / "daemon.json").write_text(json.dumps(info))
    yield info
    stop.set()
    t.join()
    for c in accepted:
        c.close()
    srv.close()


def test_status_on_a_silent_daemon_fails_within_its_timeout_in_one_line(silent_daemon, simmerge_home, monkeypatch):
    # the real timeouts: status answers in seconds, suggest and feedback in tens of seconds, connecting in a few
    assert api.OPERATIONS["status"].timeout_s <= 10 and api.CONNECT_S <= 5
    assert all(api.OPERATIONS[op].timeout_s <= 60 for op in ("suggest", "feedback", "search", "jobs"))
    monkeypatch.setattr("simmerge_bandit.client._READ_S", {k: 0.5 for k in
                                                           __import__("simmerge_bandit.client").client._READ_S})
    t0 = time.monotonic()
    res = CliRunner().invoke(cli, ["status"], catch_exceptions=False)
    took = time.monotonic() - t0
    line = _one_line(res)
    assert res.exit_code != 0 and took < 3, (took, line)
    assert f"pid {silent_daemon['pid']}" in line and f"port {silent_daemon['port']}" in line
    assert "did not answer GET /v1/status within 0.5 s" in line and str(simmerge_home / "daemon.json") in line
    res = CliRunner().invoke(cli, ["feedback", "0123456789abcdef", "0.5"], catch_exceptions=False)
    assert res.exit_code != 0 and "did not answer POST /v1/feedback" in _one_line(res)
