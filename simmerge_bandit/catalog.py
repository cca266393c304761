"""The catalog: models, tasks, probe sets and operators, persisted in the store.

>>> from simmerge_bandit.store import Store                      # doctest: +SKIP
>>> cat = Catalog(Store.open("/tmp/home"))                        # doctest: +SKIP
>>> cat.add_operator("ties_d0.5", "ties", {"density": 0.5})      # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from .checkpoint import check_compatible, read_checkpoint
from .errors import AlreadyExists, InvalidInput, NotFound
from .methods import get_method
from .store import Store
# the file readers are used here and re-exported (callers import read_jsonl and read_prompts from this module)
from .taskfiles import ProbeSetName, Upload, existing_file, iter_jsonl, read_jsonl, read_prompts  # noqa: F401

#: The built-in metrics (add_task checks the evaluator registry, which may hold more).
METRICS = ("exact_match", "loglik", "external", "lm-eval")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@+-]{0,127}$")
#: Without --probes, a task's probe set is made of the first prompts of its data file (answers dropped).
DEFAULT_PROBES = 64
#: The largest task data file (docs/daemon.md, limits). Its rows are streamed into the home's copy, never held
#: in memory together, but the copy and its parse take disk and time in proportion.
MAX_DATA_BYTES = 1 << 30


def check_name(kind: str, name: str) -> str:
    """``name`` if it is a valid catalog name for ``kind`` (1-128 of letters, digits and ``. _ - : @ +``, starting
    with a letter or digit), else :class:`InvalidInput`."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise InvalidInput(f"invalid {kind} name {name!r}: use 1-128 letters, digits and . _ - : @ +, "
                           f"starting with a letter or digit")
    return name


def _hash_prompts(prompts: list[str]) -> str:
    return hashlib.blake2b(json.dumps(prompts).encode(), digest_size=16).hexdigest()


def _private_dirs(d: Path) -> None:
    """Make ``d`` and its missing parents, each 0700."""
    for p in reversed([p for p in (d, *d.parents) if not p.exists()]):
        p.mkdir(mode=0o700, exist_ok=True)


@dataclass
class StagedData:
    """A task's rows copied into the home (a hidden file of ``artifacts/tasks``), before the task is recorded."""

    path: Path
    n_rows: int
    data_hash: str
    prompts: list[str]  # the first DEFAULT_PROBES prompts (the default probe set)

    def discard(self) -> None:
        self.path.unlink(missing_ok=True)


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    """Write a copy into the home: mode 0600 whatever the source's (a private file stays private), in folders
    made 0700."""
    _private_dirs(path.parent)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        os.fchmod(fd, 0o600)  # an earlier .tmp left with another mode
        fh.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    tmp.replace(path)


class Catalog:
    """CRUD over models, tasks, probe sets and operators. Every mutation is one transaction."""

    def __init__(self, store: Store):
        self.store = store

    # ---- models ----
    def add_model(self, path: str | Path, name: str | None = None, base: str | None = None,
                  tasks: list[str] | None = None, allow_duplicate: bool = False) -> dict:
        """Register a checkpoint directory; with ``base``, its tensors must match the base's.

        ``tasks`` names the tasks the model was fine-tuned for (need not be registered yet); suggestions for a task
        then pair at least one of its experts. A directory already registered under another name is refused unless
        ``allow_duplicate`` (two names for one model would be suggested as a pair that merges a model with itself).
        """
        ck = read_checkpoint(path)
        name = check_name("model", name or ck.path.name)
        for t in tasks or []:
            check_name("task", t)
        if self._exists("models", name):
            raise AlreadyExists(f"model {name!r} already exists")
        other = self.store.fetchone("SELECT name FROM models WHERE path = ? ORDER BY added_at LIMIT 1",
                                    [str(ck.path)])
        if other is not None and not allow_duplicate:
            raise AlreadyExists(f"{ck.path} is already registered as model {other[0]!r}; pass --allow-duplicate "
                                f"to register it again as {name!r}")
        shapes = ck.shapes()
        if base is not None:
            b = self.model(base)
            check_compatible(b["tensors"], shapes, base, name)
        fingerprint = ck.fingerprint()
        with self.store.transaction():
            self._bump()
            self.store.execute(
                "INSERT INTO models (name, path, base, architecture, model_type, dtype, n_params, n_tensors, "
                "size_bytes, fingerprint, tensors, config, tasks) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                [name, str(ck.path), base, ck.architecture, ck.model_type, ck.dtype, ck.n_params, len(ck.tensors),
                 ck.size_bytes, fingerprint, json.dumps(shapes), json.dumps(ck.config),
                 json.dumps(sorted(set(tasks))) if tasks else None])
        return self.model(name)

    def models(self) -> list[dict]:
        """Every registered model, oldest first."""
        return [self._model_row(r) for r in self.store.fetchdicts("SELECT * FROM models ORDER BY added_at, name")]

    def model(self, name: str) -> dict:
        """The model called ``name`` (:class:`NotFound` if none)."""
        rows = self.store.fetchdicts("SELECT * FROM models WHERE name = ?", [name])
        if not rows:
            raise NotFound(f"no model named {name!r}")
        return self._model_row(rows[0])

    def remove_model(self, name: str) -> None:
        """Forget a model (its files are not touched); a base with registered fine-tunes is kept until they go."""
        self.model(name)
        children = [r[0] for r in self.store.fetchall("SELECT name FROM models WHERE base = ?", [name])]
        if children:
            raise InvalidInput(f"model {name!r} is the base of {', '.join(children)}; remove those first")
        with self.store.transaction():
            self._bump()
            self.store.execute("DELETE FROM models WHERE name = ?", [name])

    def refresh_model(self, name: str) -> dict:
        """Re-read a model's checkpoint (after its weights changed) and update its fingerprint and shapes."""
        m = self.model(name)
        ck = read_checkpoint(m["path"])
        with self.store.transaction():
            self._bump()
            self.store.execute(
                "UPDATE models SET fingerprint = ?, tensors = ?, config = ?, dtype = ?, n_params = ?, "
                "size_bytes = ? WHERE name = ?",
                [ck.fingerprint(), json.dumps(ck.shapes()), json.dumps(ck.config), ck.dtype, ck.n_params,
                 ck.size_bytes, name])
        return self.model(name)

    @staticmethod
    def _model_row(r: dict) -> dict:
        r = dict(r)
        r["tensors"] = json.loads(r["tensors"])
        r["config"] = json.loads(r["config"])
        r["tasks"] = json.loads(r["tasks"]) if r.get("tasks") else []
        return r

    # ---- probe sets ----
    def add_probe_set(self, name: str, path: str | Path | Upload) -> dict:
        """Register a named probe set from a file of prompts (one per line, or JSON lines with ``prompt``)."""
        check_name("probe set", name)
        if self._exists("probe_sets", name):
            raise AlreadyExists(f"probe set {name!r} already exists")
        return self._store_probes(name, read_prompts(path))

    def _store_probes(self, name: str, prompts: list[str]) -> dict:
        dest = self.store.artifacts / "probes" / f"{name}.jsonl"
        _write_jsonl(dest, [{"prompt": p} for p in prompts])
        with self.store.transaction():
            self._bump()
            self.store.execute("INSERT INTO probe_sets (name, hash, path, n_prompts) VALUES (?,?,?,?)",
                               [name, _hash_prompts(prompts), str(dest), len(prompts)])
        return self.probe_set(name)

    def probe_sets(self) -> list[dict]:
        """Every named probe set, oldest first."""
        return self.store.fetchdicts("SELECT * FROM probe_sets ORDER BY added_at, name")

    def probe_set(self, name: str) -> dict:
        """The probe set called ``name`` (:class:`NotFound` if none)."""
        rows = self.store.fetchdicts("SELECT * FROM probe_sets WHERE name = ?", [name])
        if not rows:
            raise NotFound(f"no probe set named {name!r}")
        return rows[0]

    def probe_prompts(self, name: str) -> list[str]:
        """The prompts of the probe set called ``name``."""
        return read_prompts(self.probe_set(name)["path"])

    # ---- tasks ----
    def check_new_task(self, name: str, metric: str = "exact_match", eval_command: str | None = None,
                       metric_path: str | None = None, eval_options: Mapping[str, Any] | None = None
                       ) -> dict[str, Any] | None:
        """The checks of :meth:`add_task` that need no file: a valid new name, a known metric, the evaluator's
        options (lm-eval: a known task and metric). Returns the options as they are recorded."""
        check_name("task", name)
        if self._exists("tasks", name):
            raise AlreadyExists(f"task {name!r} already exists")
        from .evaluators import evaluator_names

        if metric not in (known := evaluator_names()):  # the registry: an evaluator added at run time is known
            raise InvalidInput(f"unknown metric {metric!r}; known: {', '.join(known)}")
        if metric == "external" and not (eval_command and metric_path):
            raise InvalidInput("metric 'external' needs an eval command and a metric path")
        if metric == "lm-eval":
            from .evaluators.lm_eval import check_options

            return check_options(eval_options)  # cached: a second check of the same options is free
        if eval_options:
            raise InvalidInput(f"metric {metric!r} takes no evaluator options (lm-eval's flags are for --metric "
                               f"lm-eval)")
        return None

    def stage_task_data(self, data: str | Path | Upload) -> StagedData:
        """Stream a task's data file (or :class:`Upload`) into a hidden copy in the home, checking every row: the
        slow part of :meth:`add_task`, which needs no lock (the daemon runs it outside its engine's lock)."""
        import uuid

        if not isinstance(data, Upload):
            p = existing_file(data)
            if p.stat().st_size > MAX_DATA_BYTES:
                raise InvalidInput(f"{p}: {p.stat().st_size:,} bytes; a task's data file may hold at most "
                                   f"{MAX_DATA_BYTES:,} bytes ({MAX_DATA_BYTES >> 20} MiB; evaluate on a sample of "
                                   f"it)")
        folder = self.store.artifacts / "tasks"
        _private_dirs(folder)
        from .paths import pid_alive

        for old in folder.glob(".data.tmp-*"):  # left by a process killed while copying
            pid = old.name.split("-")[1]
            if pid.isdigit() and not pid_alive(int(pid)):
                old.unlink(missing_ok=True)
        tmp = folder / f".data.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}.jsonl"
        digest, n, prompts = hashlib.blake2b(digest_size=16), 0, []
        try:
            with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w", encoding="utf-8") as fh:
                for r in iter_jsonl(data, need=("prompt", "answer")):
                    line = json.dumps({"prompt": r["prompt"], "answer": r["answer"]}, ensure_ascii=False) + "\n"
                    fh.write(line)
                    digest.update(line.encode("utf-8"))
                    n += 1
                    if len(prompts) < DEFAULT_PROBES:
                        prompts.append(r["prompt"])
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return StagedData(tmp, n, digest.hexdigest(), prompts)

    def add_task(self, name: str, data: str | Path | Upload | StagedData, probes: str | Path | Upload | None = None,
                 metric: str = "exact_match", eval_command: str | None = None, metric_path: str | None = None,
                 eval_options: Mapping[str, Any] | None = None) -> dict:
        """Register a task from a JSON-lines file of {"prompt", "answer"} and an optional probe file.

        ``probes`` may be a file or the name of an existing probe set (a :class:`ProbeSetName` is always a name);
        ``data`` and ``probes`` may be :class:`Upload` content instead of files, and ``data`` what
        :meth:`stage_task_data` made of it (moved into place here). Without probes the task's probe set is the
        first prompts of the data (answers are never used as probes). The data's rows are streamed, never held in
        memory together; a file over :data:`MAX_DATA_BYTES` is refused. ``eval_options``: the evaluator's own
        settings (``metric="lm-eval"``: see :func:`.evaluators.lm_eval.task_options`), stored as JSON.
        """
        try:
            eval_options = self.check_new_task(name, metric, eval_command, metric_path, eval_options)
            staged = data if isinstance(data, StagedData) else self.stage_task_data(data)
        except BaseException:
            if isinstance(data, StagedData):
                data.discard()
            raise
        try:
            return self._add_task(name, staged, probes, metric, eval_command, metric_path, eval_options)
        finally:
            staged.discard()  # moved into place, unless the task could not be added

    def _add_task(self, name: str, staged: StagedData, probes, metric, eval_command, metric_path,
                  eval_options=None) -> dict:
        if isinstance(probes, ProbeSetName):
            probe_name, prompts = str(self.probe_set(probes)["name"]), None
        elif (isinstance(probes, str) and not isinstance(probes, Upload) and not Path(probes).expanduser().exists()
              and self._exists("probe_sets", probes)):
            probe_name, prompts = str(probes), None
        else:
            probe_name = f"{name}.probes"
            prompts = read_prompts(probes) if probes is not None else staged.prompts
            if self._exists("probe_sets", probe_name):
                raise AlreadyExists(f"probe set {probe_name!r} already exists")
        dest = self.store.artifacts / "tasks" / name / "data.jsonl"
        _private_dirs(dest.parent)
        os.replace(staged.path, dest)
        data_hash, n_rows = staged.data_hash, staged.n_rows
        with self.store.transaction():
            self._bump()
            if prompts is not None:
                self._store_probes(probe_name, prompts)
            self.store.execute(
                "INSERT INTO tasks (name, data_path, data_hash, n_examples, probe_set, metric, eval_command, "
                "metric_path, eval_options) VALUES (?,?,?,?,?,?,?,?,?)",
                [name, str(dest), data_hash, n_rows, probe_name, metric, eval_command, metric_path,
                 json.dumps(eval_options) if eval_options else None])
        return self.task(name)

    def tasks(self) -> list[dict]:
        """Every registered task, oldest first."""
        return self.store.fetchdicts("SELECT * FROM tasks ORDER BY added_at, name")

    def task(self, name: str) -> dict:
        """The task called ``name`` (:class:`NotFound` if none)."""
        rows = self.store.fetchdicts("SELECT * FROM tasks WHERE name = ?", [name])
        if not rows:
            raise NotFound(f"no task named {name!r}")
        return rows[0]

    def task_examples(self, name: str) -> list[dict]:
        """The task's evaluation examples, ``{"prompt", "answer"}`` each."""
        return read_jsonl(self.task(name)["data_path"], need=("prompt", "answer"))

    # ---- operators ----
    def add_operator(self, name: str, method: str, params: Mapping[str, Any] | None = None,
                     ranges: Mapping[str, Any] | None = None) -> dict:
        """Add an operator: a registered merge method plus validated parameters (defaults filled in).

        With ``ranges`` (``{param: [min, max]}``) it is a family: the engine chooses those parameters' values
        inside their ranges per suggestion (:mod:`.families`)."""
        check_name("operator", name)
        spec = get_method(method)
        if params is not None and not isinstance(params, Mapping):
            raise InvalidInput(f"operator parameters must be a mapping of name to value, got a "
                               f"{type(params).__name__}")
        full = spec.validate(params or {})  # every value within its method's bounds (docs/methods.md)
        box = None
        if ranges:
            from .families import check_ranges

            box = check_ranges(method, params or {}, ranges)
        if self._exists("operators", name):
            raise AlreadyExists(f"operator {name!r} already exists")
        with self.store.transaction():
            self._bump()
            self.store.execute("INSERT INTO operators (name, method, params, ranges) VALUES (?,?,?,?)",
                               [name, method, json.dumps(full, sort_keys=True),
                                None if box is None else json.dumps(box, sort_keys=True)])
        return self.operator(name)

    def operators(self, active_only: bool = False) -> list[dict]:
        """Every operator, oldest first; only those not retired with ``active_only``."""
        sql = "SELECT * FROM operators" + (" WHERE status = 'active'" if active_only else "")
        return [self._op_row(r) for r in self.store.fetchdicts(sql + " ORDER BY added_at, name")]

    def operator(self, name: str) -> dict:
        """The operator called ``name`` (:class:`NotFound` if none)."""
        rows = self.store.fetchdicts("SELECT * FROM operators WHERE name = ?", [name])
        if not rows:
            raise NotFound(f"no operator named {name!r}")
        return self._op_row(rows[0])

    def retire_operator(self, name: str) -> dict:
        """Stop suggesting an operator; it stays in the history (retiring a retired one changes nothing)."""
        op = self.operator(name)
        if op["status"] == "retired":
            return op
        with self.store.transaction():
            self._bump()
            self.store.execute("UPDATE operators SET status = 'retired', retired_at = current_timestamp "
                               "WHERE name = ?", [name])
        return self.operator(name)

    @staticmethod
    def _op_row(r: dict) -> dict:
        r = dict(r)
        r["params"] = json.loads(r["params"])
        if r.get("ranges"):
            r["ranges"] = json.loads(r["ranges"])
        else:
            r.pop("ranges", None)  # a grid operator reads as it always did
        return r

    def record_score(self, model: str, task: str, score: float) -> None:
        """Record a known raw score of a catalog model on a task (its current data and metric), as an evaluation
        of it would: the reward's denominator, and the ``known_score`` metadata of every candidate it is in."""
        import math

        m, t = self.model(model), self.task(task)
        try:
            value = float(score)
        except (TypeError, ValueError):
            raise InvalidInput(f"score of {model} on {task} must be a number, got {score!r}") from None
        if not math.isfinite(value):
            raise InvalidInput(f"score of {model} on {task} must be finite, got {score!r}")
        with self.store.transaction():
            self.store.execute("INSERT OR REPLACE INTO evaluations (fingerprint, task, data_hash, metric, score) "
                               "VALUES (?,?,?,?,?)", [m["fingerprint"], task, t["data_hash"], t["metric"], value])
            self._bump()

    def bump(self) -> None:
        """Move the catalog's version: for a change outside the catalog's own methods that candidates depend on
        (a newly known source score)."""
        self._bump()

    def _bump(self) -> None:
        # Every catalog change moves the version, so caches keyed on it (the engine's candidate sets) refresh.
        self.store.execute("UPDATE meta SET value = value + 1 WHERE key = 'catalog_version'")
        self.store.catalog_version = None

    def version(self) -> int:
        """The catalog's version, read once per store: this process is the only writer, and every change comes
        through :meth:`_bump` (the daemon asks on every batch of suggestions; a query costs ~0.2 ms)."""
        v = self.store.catalog_version
        if v is None:
            v = self.store.catalog_version = int(
                self.store.fetchone("SELECT value FROM meta WHERE key = 'catalog_version'")[0])
        return v

    def _exists(self, table: str, name: str) -> bool:
        return self.store.fetchone(f"SELECT 1 FROM {table} WHERE name = ?", [name]) is not None
