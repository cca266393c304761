"""Where state lives: ``--home``, else ``$SIMMERGE_HOME``, else ``~/.simmerge``."""

from __future__ import annotations

import os
from pathlib import Path

ENV_HOME = "SIMMERGE_HOME"
STATE_FILE = "state.duckdb"
DAEMON_FILE = "daemon.json"


def resolve_home(home: str | os.PathLike | None = None) -> Path:
    """Return the state home directory (not created)."""
    if home:
        return Path(home).expanduser().resolve()
    env = os.environ.get(ENV_HOME)
    if env:
        return Path(env).expanduser().resolve()
    return (Path.home() / ".simmerge").resolve()


def state_path(home: Path) -> Path:
    return home / STATE_FILE


def artifacts_dir(home: Path) -> Path:
    return home / "artifacts"


def daemon_file(home: Path) -> Path:
    return home / DAEMON_FILE


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists and has not exited (a zombie counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True
