"""The daemon's log: one line per event (text, or one JSON object with ``--log-json``), written to stderr."""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

log = logging.getLogger("simmerge.daemon")


class _EventFormatter(logging.Formatter):
    """One line per event; a record from :func:`events` carries several (one per item)."""

    def format(self, record: logging.LogRecord) -> str:
        items = getattr(record, "items", None)
        if items is None:
            return self.line(record, record.getMessage(), getattr(record, "fields", {}))
        return "\n".join(self.line(record, msg, fields) for msg, fields in items)

    def line(self, record: logging.LogRecord, msg: str, fields: dict) -> str:
        raise NotImplementedError


class _JsonFormatter(_EventFormatter):
    def line(self, record: logging.LogRecord, msg: str, fields: dict) -> str:
        return json.dumps({"ts": round(record.created, 3), "level": record.levelname.lower(), "msg": msg,
                           **fields}, default=str)


class _TextFormatter(_EventFormatter):
    def format(self, record: logging.LogRecord) -> str:
        record.clock = time.strftime("%H:%M:%S", time.localtime(record.created))  # once for a record's lines
        return super().format(record)

    def line(self, record: logging.LogRecord, msg: str, fields: dict) -> str:
        text = " ".join([f"{k}={v}" for k, v in fields.items()])
        return f"{record.clock} {msg} {text}".rstrip()


def event(msg: str, **fields: Any) -> None:
    log.info(msg, extra={"fields": fields})


def events(items: list[tuple[str, dict]]) -> None:
    """``event(msg, **fields)`` for each ``(msg, fields)`` of ``items``, through one log record (the lines of one
    batch: a record costs ~40 us of logging machinery, under the GIL)."""
    if items:
        log.info("%d events", len(items), extra={"items": items})


def setup(as_json: bool) -> None:
    """Send the daemon's events to stderr, as text lines or JSON objects."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_JsonFormatter() if as_json else _TextFormatter())
    log.handlers[:] = [handler]
    log.setLevel(logging.INFO)
    log.propagate = False
