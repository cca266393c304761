"""``$SIMMERGE_HOME/daemon.json``: how callers find the running daemon (pid, port, token, host; mode 0600)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from .paths import daemon_file, pid_alive


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
