"""Process tuning for the long-running daemon: glibc's malloc arenas, and the resident memory it reports."""

from __future__ import annotations

import sys


def limit_malloc_arenas(n: int = 2) -> None:
    """Let glibc's malloc keep at most ``n`` arenas for the daemon's threads (it makes one per thread, up to 8 per
    core, and each keeps the memory its thread freed). Measured under load: RSS +5.3-5.8% above the start instead
    of +6.4-10.7%. Elsewhere (not glibc) a no-op."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        libc = ctypes.CDLL(None)
        libc.mallopt(-8, n)  # M_ARENA_MAX
    except (OSError, AttributeError):  # musl and others: no mallopt
        pass


def rss_kb() -> int | None:
    try:
        with open("/proc/self/status") as fh:
            return next(int(line.split()[1]) for line in fh if line.startswith("VmRSS:"))
    except (OSError, StopIteration, ValueError):  # not Linux
        return None
