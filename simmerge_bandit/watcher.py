"""The daemon's folder watcher: a checkpoint directory that appears in a watched folder, and stays unchanged for
``stable_s`` seconds, is registered (with the first compatible base) and its tasks' candidates are refreshed."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

from .catalog import Catalog
from .checkpoint import check_compatible, read_checkpoint
from .errors import InvalidCheckpoint, SimmergeError
from .eventlog import event


class FolderWatcher:
    """Scan ``roots`` every ``poll_s`` seconds until ``stop`` is set (``run`` is the thread's target)."""

    def __init__(self, engine, roots: list[Path], stop: threading.Event, *, stable_s: float = 3.0,
                 poll_s: float = 1.0):
        self.engine, self.store, self.roots, self.stop = engine, engine.store, roots, stop
        self.stable_s, self.poll_s = stable_s, poll_s
        self._seen: dict[Path, tuple[Any, float]] = {}

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                self.scan()
            except Exception as e:  # a bad folder must not stop the watcher
                event("watch error", reason=f"{type(e).__name__}: {e}")
            self.stop.wait(self.poll_s)

    def scan(self) -> None:
        known = {m["path"] for m in self.engine.catalog.models()}
        now = time.time()
        for root in self.roots:
            for d in sorted(p for p in [root, *root.iterdir()] if p.is_dir()):
                if str(d.resolve()) in known or not (d / "config.json").exists():
                    continue
                state = tuple(sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in d.iterdir()
                                     if f.is_file()))
                prev = self._seen.get(d)
                if prev is None or prev[0] != state:
                    self._seen[d] = (state, now)
                    continue
                if now - prev[1] < self.stable_s:
                    continue
                try:
                    ck = read_checkpoint(d)
                except InvalidCheckpoint:
                    continue  # not complete yet (a shard missing); look again later
                self.register(Catalog(self.store), d, ck)

    def register(self, cat: Catalog, d: Path, ck) -> None:
        shapes = ck.shapes()
        base = None
        for m in cat.models():
            if m["base"] is None:
                try:
                    check_compatible(m["tensors"], shapes, m["name"], d.name)
                    base = m["name"]
                    break
                except SimmergeError:
                    pass
        existing = {m["name"] for m in cat.models()}
        name, i = d.name, 2
        while name in existing:
            name, i = f"{d.name}-{i}", i + 1
        with self.engine.lock:
            cat.add_model(d, name=name, base=base)
        event("model registered", name=name, path=str(d), base=base)
        if base is None:
            return
        for t in cat.tasks():
            try:
                with self.engine.lock:
                    self.engine.candidates(t["name"])
                event("suggestions refreshed", task=t["name"], model=name)
            except SimmergeError as e:
                event("refresh skipped", task=t["name"], reason=str(e))
