"""A client for the daemon's API, found through ``$SIMMERGE_HOME/daemon.json``.

While a daemon runs, the CLI's mutating commands go through it, so nobody meets a database lock.
"""

from __future__ import annotations

import http.client
import json
from pathlib import Path
from typing import Any

from .daemonfile import read_daemon_file
from .errors import AlreadyExists, Conflict, InvalidInput, NotFound, SimmergeError, StateLocked

_BY_STATUS = {400: InvalidInput, 404: NotFound, 409: Conflict, 423: StateLocked}


class DaemonError(SimmergeError):
    pass


class Client:
    def __init__(self, info: dict, timeout: float = 600.0):
        self.host = info.get("host", "127.0.0.1")
        if self.host in ("0.0.0.0", "::"):
            self.host = "127.0.0.1"
        self.port, self.token, self.pid, self.timeout = int(info["port"]), info["token"], info["pid"], timeout

    @classmethod
    def find(cls, home: Path) -> "Client | None":
        info = read_daemon_file(home)
        return cls(info) if info else None

    def call(self, method: str, path: str, body: dict | None = None) -> Any:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        try:
            payload = json.dumps(body or {}).encode() if method == "POST" else None
            headers = {"Authorization": f"Bearer {self.token}", "Content-Type": "application/json"}
            conn.request(method, path, body=payload, headers=headers)
            resp = conn.getresponse()
            data = json.loads(resp.read() or b"null")
        except (OSError, ValueError) as e:
            raise DaemonError(f"cannot reach the daemon (pid {self.pid}, port {self.port}): {e}") from None
        finally:
            conn.close()
        if resp.status != 200:
            msg = data.get("error") if isinstance(data, dict) else str(data)
            if resp.status == 409 and "already exists" in str(msg):
                raise AlreadyExists(msg)
            raise _BY_STATUS.get(resp.status, DaemonError)(msg)
        return data
