"""A client for the daemon's API, found through ``$SIMMERGE_HOME/daemon.json``.

While a daemon runs, the CLI's mutating commands go through it, so nobody meets a database lock. Every call has a
connect timeout (:data:`.api.CONNECT_S`) and a read timeout that fits its operation (:attr:`.api.Operation.timeout_s`:
seconds for status, tens of seconds for suggest and feedback), so a daemon that is stopped (SIGSTOP), stuck, or a
stale ``daemon.json`` naming a live process that accepts connections but never answers, gives a one-line error
instead of a hang. A timed-out feedback can be sent again: the same reward for the same decision is a no-op.
"""

from __future__ import annotations

import http.client
import json
from pathlib import Path
from typing import Any

from .api import CONNECT_S, OPERATIONS
from .daemonfile import read_daemon_file
from .errors import AlreadyExists, Conflict, Forbidden, InvalidInput, NotFound, SimmergeError, StateLocked
from .paths import daemon_file

_BY_STATUS = {400: InvalidInput, 403: Forbidden, 404: NotFound, 409: Conflict, 423: StateLocked}
#: Each route's read timeout, from the operation table.
_READ_S = {(op.method, op.path): op.timeout_s for op in OPERATIONS.values()}


class DaemonError(SimmergeError):
    pass


class Client:
    """Calls to the daemon of ``info`` (daemon.json's ``{pid, port, token, host}``); ``home`` names its
    daemon.json in error messages."""

    def __init__(self, info: dict, timeout: float | None = None, home: Path | None = None):
        self.host = info.get("host", "127.0.0.1")
        if self.host in ("0.0.0.0", "::"):
            self.host = "127.0.0.1"
        self.port, self.token, self.pid = int(info["port"]), info["token"], info["pid"]
        #: Directories the daemon reads files from (``--serve-dir``): files there are sent as paths, others as text.
        self.serve_dirs = [Path(d) for d in info.get("serve_dirs") or []]
        self.timeout = timeout  # overrides every operation's own read timeout when given
        self.home = home

    @classmethod
    def find(cls, home: Path) -> "Client | None":
        info = read_daemon_file(home)
        return cls(info, home=home) if info else None

    def _who(self) -> str:
        where = f"; {daemon_file(self.home)}" if self.home is not None else ""
        return f"the simmerge daemon (pid {self.pid}, port {self.port}{where})"

    def _advice(self) -> str:
        stale = f"remove {daemon_file(self.home)}" if self.home is not None else "remove its daemon.json"
        return (f"if it is stuck, stop it (kill {self.pid}; kill -CONT {self.pid} first if it was suspended); if pid "
                f"{self.pid} is not a simmerge daemon, {stale}")

    def call(self, method: str, path: str, body: dict | None = None) -> Any:
        """One request, with its route's read timeout (the client's ``timeout`` when given)."""
        read_s = self.timeout or _READ_S.get((method, path.split("?")[0]), 30.0)
        conn = http.client.HTTPConnection(self.host, self.port, timeout=CONNECT_S)
        what = f"{method} {path.split('?')[0]}"
        try:
            try:
                conn.connect()
            except TimeoutError:
                raise DaemonError(f"{self._who()} did not accept a connection within {CONNECT_S:g} s; "
                                  f"{self._advice()}") from None
            conn.sock.settimeout(read_s)
            payload = json.dumps(body or {}).encode() if method == "POST" else None
            headers = {"Authorization": f"Bearer {self.token}", "Content-Type": "application/json"}
            conn.request(method, path, body=payload, headers=headers)
            resp = conn.getresponse()
            data = json.loads(resp.read() or b"null")
        except TimeoutError:
            raise DaemonError(f"{self._who()} did not answer {what} within {read_s:g} s; {self._advice()}") from None
        except (OSError, ValueError, http.client.HTTPException) as e:
            raise DaemonError(f"cannot reach {self._who()}: {e}; {self._advice()}") from None
        finally:
            conn.close()
        if resp.status != 200:
            msg = data.get("error") if isinstance(data, dict) else str(data)
            if resp.status == 409 and "already exists" in str(msg):
                raise AlreadyExists(msg)
            raise _BY_STATUS.get(resp.status, DaemonError)(msg)
        return data
