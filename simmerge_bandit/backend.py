"""One road to a home's state: every operation the CLI and library callers do to it, here or through the daemon.

:class:`Backend` is the interface (catalog, suggest, feedback, status, jobs, search, policies, the predictor,
signatures and features, the decision log for replay); :class:`LocalBackend` runs the operations on the store
(:class:`~.catalog.Catalog`, :class:`~.engine.Engine`, :mod:`.signals`); :class:`RemoteBackend` sends them to the
running daemon. :func:`open_backend` chooses once per caller: the daemon when one holds the home, else the store.
Either way an operation gives the same answer.

:data:`.api.OPERATIONS` is the one table of operations: name, HTTP method and path, whether it goes through the
daemon's group commit, whether it changes the catalog. The daemon builds its routes from it (a route calls the local
implementation, ``LocalBackend.op_<name>``, with the JSON body checked against that method's signature), and the
remote backend finds its routes in it, so a route's path is written there only.

>>> be = open_backend("~/.simmerge")                    # doctest: +SKIP
>>> be.add_operator("ties_d0.5", "ties", {"density": 0.5})  # doctest: +SKIP
>>> be.suggest(["add"], top=3)[0]["operator"]           # doctest: +SKIP
'ties_d0.5'

Why one module of this size: the interface, the local implementation and the remote one are one contract,
operation by operation (each :class:`Backend` method, its ``op_`` twin, and a remote override where files travel),
read side by side; the table of operations is :mod:`.api`, the JSON checks :mod:`.jsonargs`.
"""

from __future__ import annotations

import inspect
import json
import os
import time
from pathlib import Path
from typing import Annotated, Any, Callable

from .api import OPERATIONS, Operation, api_markdown, api_reference  # noqa: F401 (re-exported)
from .errors import InvalidInput, NotFound, SimmergeError
from .jsonargs import parse_body, query_body  # noqa: F401 (re-exported)

#: Marks an argument that names a local file or directory: the remote backend sends it as an absolute path (the
#: daemon does not run in the caller's directory).
PATH = "path"
PathArg = Annotated[str, PATH]


class SearchFailed(SimmergeError):
    """A search that the daemon ran as a job failed."""


def public_model(m: dict) -> dict:
    """A model row as the API lists it: without its tensor table and config (``model`` gives them)."""
    return {k: v for k, v in m.items() if k not in ("tensors", "config")}


def _abs(path: str | os.PathLike | None) -> str | None:
    return None if path is None else str(Path(path).expanduser().resolve())


class Backend:
    """Everything callers do to a home's state. Each method is one operation of :data:`OPERATIONS`; the two
    implementations answer alike."""

    def _do(self, op: str, /, **args: Any) -> Any:
        """Run operation ``op`` with ``args`` (each implementation's one entry point)."""
        raise NotImplementedError

    def close(self) -> None:
        """Release what the backend holds (the store it opened)."""

    # ---- catalog ----
    def models(self) -> list[dict]:
        """Every registered model, oldest first, without tensors and config."""
        return self._do("models")

    def model(self, name: str) -> dict:
        """One model with its tensor table and config (:class:`NotFound` if none)."""
        return self._do("model", name=name)

    def add_model(self, path: str | os.PathLike, name: str | None = None, base: str | None = None,
                  tasks: list[str] | None = None, allow_duplicate: bool = False) -> dict:
        """Register a checkpoint directory (see :meth:`.Catalog.add_model`); the new model as :meth:`models`
        lists it."""
        return self._do("add_model", path=_abs(path), name=name, base=base, tasks=list(tasks or []),
                        allow_duplicate=bool(allow_duplicate))

    def remove_model(self, name: str) -> dict:
        """Forget a model (its files stay): ``{"name", "removed": true}``."""
        return self._do("remove_model", name=name)

    def tasks(self) -> list[dict]:
        """Every registered task, oldest first."""
        return self._do("tasks")

    def task(self, name: str) -> dict:
        """One task (:class:`NotFound` if none)."""
        return self._do("task", name=name)

    def add_task(self, name: str, data: str | os.PathLike, probes: str | None = None, metric: str = "exact_match",
                 eval_command: str | None = None, metric_path: str | None = None,
                 eval_options: dict | None = None) -> dict:
        """Register a task (see :meth:`.Catalog.add_task`); ``probes`` is a file or a probe set's name."""
        if probes is not None and Path(str(probes)).expanduser().exists():
            probes = _abs(probes)
        return self._do("add_task", name=name, data=_abs(data), probes=probes, metric=metric,
                        eval_command=eval_command, metric_path=metric_path, eval_options=eval_options)

    def probe_sets(self) -> list[dict]:
        """Every named probe set, oldest first."""
        return self._do("probe_sets")

    def add_probe_set(self, name: str, file: str | os.PathLike) -> dict:
        """Register a probe set from a file of prompts."""
        return self._do("add_probe_set", name=name, file=_abs(file))

    def operators(self, all: bool = False) -> list[dict]:  # noqa: A002 (the API's field name)
        """Every operator, oldest first; retired ones only with ``all``."""
        return self._do("operators", all=bool(all))

    def operator(self, name: str) -> dict:
        """One operator (:class:`NotFound` if none)."""
        return self._do("operator", name=name)

    def add_operator(self, name: str, method: str, params: dict | None = None, ranges: dict | None = None) -> dict:
        """Add an operator: a registered method with parameters (with ``ranges``, a family)."""
        return self._do("add_operator", name=name, method=method, params=dict(params or {}),
                        ranges=dict(ranges) if ranges else None)

    def retire_operator(self, name: str) -> dict:
        """Stop suggesting an operator; its history stays."""
        return self._do("retire_operator", name=name)

    def record_score(self, model: str, task: str, score: float, replace: bool = True) -> dict:
        """Record a known raw score of a catalog model on a task (its current data and metric); with
        ``replace=False`` a score known already is kept. ``{"recorded": false}`` when nothing changed."""
        return self._do("record_score", model=model, task=task, score=score, replace=replace)

    # ---- engine ----
    def suggest(self, tasks: str | list[str], top: int = 5, policy: str | None = None, chain: int | None = None,
                weights: dict | None = None) -> list[dict]:
        """Rank candidate merges for a target and log each as a decision (see :meth:`.Engine.suggest`)."""
        return self._do("suggest", tasks=[tasks] if isinstance(tasks, str) else list(tasks), top=top,
                        policy=policy, chain=chain, weights=weights or None)

    def feedback(self, id: str, reward: Any) -> dict:  # noqa: A002 (the API's field name)
        """Record the reward of decision ``id`` (see :meth:`.Engine.feedback`)."""
        return self._do("feedback", id=id, reward=reward)

    def status(self) -> dict:
        """Catalog and log counts, the evaluation queue, the budget, the last decision (a daemon adds its own)."""
        return self._do("status")

    def jobs(self) -> list[dict]:
        """Evaluation jobs, then searches."""
        return self._do("jobs")

    def search(self, tasks: list[str], budget: int, weights: dict | None = None, policy: str | None = None,
               limit: int | None = None, device: str = "auto",
               progress: Callable[[dict], None] | None = None) -> dict:
        """The best merge for a target within ``budget`` evaluations (see :func:`.search.run_search`); ``progress``
        is called with the search so far after each evaluation. Through a daemon the search runs there as a job
        (on the daemon's device) and this follows it."""
        raise NotImplementedError

    def search_report(self, tasks: list[str], weights: dict | None = None, policy: str | None = None) -> dict:
        """A recorded search, as :meth:`search` returns it (an interrupted one, to be resumed)."""
        return self._do("search_report", tasks=list(tasks), weights=weights or None, policy=policy)

    def rebuild_policy(self, name: str | None = None) -> dict:
        """Rebuild a policy from the decision log and replace its snapshot: ``{"name", "n_updates", "version"}``."""
        return self._do("rebuild_policy", name=name)

    def fit_predictor(self, table: str | os.PathLike | None = None, online_weight: float | None = None,
                      model: str | None = None, objective: str | None = None,
                      init_seed: int | None = None) -> dict:
        """Fit the SimMerge predictor (see :meth:`.Engine.fit_predictor`)."""
        return self._do("fit_predictor", table=_abs(table), online_weight=online_weight, model=model,
                        objective=objective, init_seed=init_seed)

    def replay_log(self) -> dict:
        """The engine's rewarded choices as replay columns (:func:`.replay.engine_log_frame`; timestamps as ISO
        text), checked to hold at least one."""
        return self._do("replay_log")

    def store_merge_table(self, table, zoo_key: str) -> dict:
        """Write a merge table (a DataFrame as :func:`.zoo.build_table` makes it) into the state's ``merge_table``,
        replacing the rows of the same zoo build (``zoo_key``): ``{"zoo_key", "rows"}``. It travels as JSON
        columns and rows (NaN as null), within the daemon's request size."""
        columns = [str(c) for c in table.columns]
        values = [[None if isinstance(v, float) and v != v else v for v in table[c].tolist()] for c in columns]
        return self._do("store_merge_table", zoo_key=zoo_key, columns=columns, rows=[list(r) for r in zip(*values)])

    def dashboard(self) -> dict:
        """What the dashboard page shows: status, targets with their best merge, the latest decisions with their
        rewards, the cumulative reward curve, jobs, operators, models and the policy (:func:`.dashboard.snapshot`)."""
        return self._do("dashboard")

    def ui_login(self) -> dict:
        """A one-time login URL for the running daemon's dashboard: ``{"url", "expires_s"}`` (only through a
        daemon)."""
        return self._do("ui_login")

    # ---- signals ----
    def compute_signatures(self, tasks: list[str] | None = None, models: list[str] | None = None,
                           device: str | None = None, threads: int | None = None, progress: bool = False) -> dict:
        """Compute the missing or stale signatures of ``models`` (default: all) for ``tasks`` (default: all):
        ``{"tasks", "models", "loaded"}``."""
        return self._do("compute_signatures", tasks=tasks, models=models, device=device, threads=threads)

    def signatures(self) -> list[dict]:
        """Every stored signature's row."""
        return self._do("signatures")

    def features(self, model_a: str, model_b: str, task: str, exact: bool = False,
                 device: str | None = None) -> dict:
        """The similarity features of the ordered pair for a task (:meth:`.PairFeatures.to_json`)."""
        return self._do("features", model_a=model_a, model_b=model_b, task=task, exact=exact, device=device)


class LocalBackend(Backend):
    """The operations on a store in this process. ``engine`` (and its lock) is made on first use unless given."""

    def __init__(self, store, engine=None, owns_store: bool = False):
        from .catalog import Catalog

        self.store = store
        self.catalog = Catalog(store)
        self._engine = engine
        self._owns_store = owns_store

    @property
    def engine(self):
        if self._engine is None:
            from .engine import Engine

            self._engine = Engine(self.store)
        return self._engine

    def close(self) -> None:
        if self._owns_store:
            self.store.close()

    def _do(self, op: str, /, **args: Any) -> Any:
        return getattr(self, f"op_{op}")(**args)

    def compute_signatures(self, tasks: list[str] | None = None, models: list[str] | None = None,
                           device: str | None = None, threads: int | None = None, progress: bool = False) -> dict:
        return self.op_compute_signatures(tasks, models, device, threads, progress=progress)

    def serve(self, name: str, body: dict) -> Any:
        """Answer operation ``name`` for a JSON body (a daemon's route): the body is checked against the
        operation's signature first (:class:`InvalidInput` for a missing or mistyped field)."""
        op = OPERATIONS[name]
        fn = getattr(LocalBackend, f"op_{name}")  # the contract: the local implementation's signature
        if "task" in body and "tasks" in inspect.signature(fn).parameters:  # the API's first form: one target key
            if body.get("tasks") is not None:
                raise InvalidInput("give 'task' or 'tasks', not both")
            body = {**body, "tasks": body["task"]}
        args = parse_body(fn, body)
        if op.locked and self._engine is not None:
            with self._engine.lock:
                return self._do(name, **args)
        return self._do(name, **args)

    # ---- catalog ----
    def op_models(self) -> list[dict]:
        return [public_model(m) for m in self.catalog.models()]

    def op_model(self, name: str) -> dict:
        return self.catalog.model(name)

    def op_add_model(self, path: PathArg, name: str | None = None, base: str | None = None,
                     tasks: list[str] | None = None, allow_duplicate: bool = False) -> dict:
        return public_model(self.catalog.add_model(path, name=name, base=base, tasks=tasks or None,
                                                   allow_duplicate=allow_duplicate))

    def op_remove_model(self, name: str) -> dict:
        self.catalog.remove_model(name)
        return {"name": name, "removed": True}

    def op_tasks(self) -> list[dict]:
        return self.catalog.tasks()

    def op_task(self, name: str) -> dict:
        return self.catalog.task(name)

    def op_add_task(self, name: str, data: PathArg | None = None, probes: str | None = None,
                    metric: str | None = None, eval_command: str | None = None, metric_path: str | None = None,
                    data_content: str | None = None, probes_content: str | None = None,
                    eval_options: dict | None = None) -> dict:
        from .taskfiles import Upload

        if (data is None) == (data_content is None):
            raise InvalidInput("give the task's data as 'data' (a file) or as 'data_content' (its text), once")
        if probes is not None and probes_content is not None:
            raise InvalidInput("give 'probes' or 'probes_content', not both")
        metric = metric or "exact_match"
        self.catalog.check_new_task(name, metric, eval_command, metric_path, eval_options)
        # The rows are streamed into the home first, outside the engine's lock: a large file does not hold up
        # suggestions; only recording the task (which changes the candidates) takes the lock.
        staged = self.catalog.stage_task_data(Upload(data_content, "data_content") if data is None else data)
        with self._engine_lock():
            return self.catalog.add_task(name, staged,
                                         probes=probes if probes_content is None else Upload(probes_content,
                                                                                             "probes_content"),
                                         metric=metric, eval_command=eval_command, metric_path=metric_path,
                                         eval_options=eval_options)

    def _engine_lock(self):
        """The engine's lock when an engine exists (a daemon's), else nothing to wait for."""
        import contextlib

        return self._engine.lock if self._engine is not None else contextlib.nullcontext()

    def op_probe_sets(self) -> list[dict]:
        return self.catalog.probe_sets()

    def op_add_probe_set(self, name: str, file: PathArg | None = None, content: str | None = None) -> dict:
        from .taskfiles import Upload

        if (file is None) == (content is None):
            raise InvalidInput("give the prompts as 'file' (a file) or as 'content' (its text), once")
        return self.catalog.add_probe_set(name, file if content is None else Upload(content, "content"))

    def op_operators(self, all: bool = False) -> list[dict]:  # noqa: A002
        return self.catalog.operators(active_only=not all)

    def op_operator(self, name: str) -> dict:
        return self.catalog.operator(name)

    def op_add_operator(self, name: str, method: str, params: dict | None = None,
                        ranges: dict | None = None) -> dict:
        return self.catalog.add_operator(name, method, params or {}, ranges=ranges or None)

    def op_retire_operator(self, name: str) -> dict:
        return self.catalog.retire_operator(name)

    def op_record_score(self, model: str, task: str, score: Any, replace: bool = True) -> dict:
        m, t = self.catalog.model(model), self.catalog.task(task)
        row = self.store.fetchone("SELECT score FROM evaluations WHERE fingerprint = ? AND task = ? AND data_hash = ? "
                                  "AND metric = ?", [m["fingerprint"], task, t["data_hash"], t["metric"]])
        if row is not None and (not replace or (isinstance(score, (int, float)) and row[0] == float(score))):
            return {"model": model, "task": task, "score": row[0], "recorded": False}
        self.catalog.record_score(model, task, score)
        return {"model": model, "task": task, "score": float(score), "recorded": True}

    # ---- engine ----
    def op_suggest(self, tasks: str | list[str], top: int = 5, policy: str | None = None,
                   chain: int | None = None, weights: dict | None = None) -> list[dict]:
        return self.engine.suggest(tasks, top=top, policy=policy, chain=chain, weights=weights)

    def op_feedback(self, id: str, reward: Any) -> dict:  # noqa: A002
        return self.engine.feedback(id, reward)

    def op_status(self) -> dict:
        return self.engine.status()

    def op_jobs(self) -> list[dict]:
        from . import evalqueue
        from .search import searches

        return [*(dict(r, kind="evaluation") for r in evalqueue.jobs(self.store)),
                *(dict(r, kind="search") for r in searches(self.store))]

    def search(self, tasks: list[str], budget: int, weights: dict | None = None, policy: str | None = None,
               limit: int | None = None, device: str = "auto",
               progress: Callable[[dict], None] | None = None) -> dict:
        from .search import run_search

        check_budget(budget, limit)
        target = self.engine.target(tasks, weights or None)
        return run_search(self.engine, target, budget, policy=policy, device=device, limit=limit, progress=progress)

    def op_search(self, tasks: str | list[str], budget: Any, weights: dict | None = None, policy: str | None = None,
                  limit: Any = None) -> dict:
        return self.search(tasks, budget, weights=weights, policy=policy, limit=limit)

    def op_search_report(self, tasks: str | list[str], weights: dict | None = None, policy: str | None = None) -> dict:
        from .search import default_policy, describe, search_id

        target = self.engine.target(tasks, weights or None)
        return describe(self.engine, search_id(target, policy or default_policy(self.engine)))

    def op_rebuild_policy(self, name: str | None = None) -> dict:
        eng = self.engine
        pol = eng.rebuild(name)
        return {"name": name or eng.config.default_policy, "n_updates": pol.n_updates, "version": str(pol.version)}

    def op_fit_predictor(self, table: PathArg | None = None, online_weight: float | None = None,
                         model: str | None = None, objective: str | None = None,
                         init_seed: int | None = None) -> dict:
        return self.engine.fit_predictor(table, online_weight=online_weight, model=model, objective=objective,
                                         init_seed=init_seed)

    def op_replay_log(self) -> dict:
        from . import replay

        replay.load_engine_log(self.store)  # the checks (a log, a rewarded choice), with their messages
        frame = replay.engine_log_frame(self.store)
        frame[replay.TIMESTAMP] = [t.isoformat(timespec="microseconds") if hasattr(t, "isoformat") else t
                                   for t in frame[replay.TIMESTAMP]]
        return frame

    def op_store_merge_table(self, zoo_key: str, columns: list[str], rows: list[list[Any]]) -> dict:
        from .zoo import TABLE_COLUMNS, store_table

        missing = [c for c in TABLE_COLUMNS if c not in columns]
        if missing:
            raise InvalidInput(f"not a merge table: no column {', '.join(missing)}")
        if any(len(r) != len(columns) for r in rows):
            raise InvalidInput(f"every row of a merge table must have {len(columns)} values, one per column")
        try:
            import pandas as pd
        except ImportError:
            raise InvalidInput("writing a merge table needs pandas: pip install pandas") from None
        return {"zoo_key": zoo_key, "rows": store_table(self.store, pd.DataFrame(rows, columns=columns), zoo_key)}

    def op_dashboard(self) -> dict:
        from .dashboard import snapshot

        return snapshot(self, policy=self.engine.config.default_policy)

    def op_ui_login(self) -> dict:
        raise InvalidInput("the dashboard is served by the daemon, and none runs for this home: start "
                           "`simmerge daemon`, then run `simmerge ui`")

    # ---- signals ----
    def op_compute_signatures(self, tasks: list[str] | None = None, models: list[str] | None = None,
                              device: str | None = None, threads: int | None = None, *,
                              progress: bool = False) -> dict:
        from .signals import ensure_signatures

        task_names = [t["name"] for t in self.catalog.tasks()] if tasks is None else list(dict.fromkeys(tasks))
        if not task_names:
            raise InvalidInput("no tasks in the catalog: add one with `simmerge task add`")
        for t in task_names:
            self.catalog.task(t)
        names = list(dict.fromkeys(models or [])) or [m["name"] for m in self.catalog.models()]
        if not names:
            raise InvalidInput("no models in the catalog: add one with `simmerge model add`")
        loads = ensure_signatures(self.store, names, task_names, progress=progress, device=device, threads=threads)
        return {"tasks": task_names, "models": len(names), "loaded": loads}

    def op_signatures(self) -> list[dict]:
        from .signals import list_signatures

        return list_signatures(self.store)

    def op_features(self, model_a: str, model_b: str, task: str, exact: bool = False,
                    device: str | None = None) -> dict:
        from .signals import pair_features

        return pair_features(self.store, model_a, model_b, task, exact=exact, device=device).to_json()


def check_budget(budget: Any, limit: Any) -> None:
    """A search's budget and evaluation limit: positive integers (the limit may be absent)."""
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
        raise InvalidInput("field 'budget' must be a positive integer")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise InvalidInput("field 'limit' must be a positive integer")


class RemoteBackend(Backend):
    """The operations through the running daemon's API (see :class:`~.client.Client`)."""

    #: How often a search that runs in the daemon is looked at.
    POLL_S = 1.0

    def __init__(self, client):
        self.client = client

    def _do(self, op: str, /, **args: Any) -> Any:
        route = OPERATIONS[op]
        if route.method == "GET":
            from urllib.parse import urlencode

            query = urlencode({k: json.dumps(v) for k, v in args.items() if v is not None})
            return self.client.call("GET", route.path + (f"?{query}" if query else ""))
        return self.client.call(route.method, route.path, args)

    def add_task(self, name: str, data: str | os.PathLike, probes: str | None = None, metric: str = "exact_match",
                 eval_command: str | None = None, metric_path: str | None = None,
                 eval_options: dict | None = None) -> dict:
        """As :meth:`Backend.add_task`; the files go to the daemon as their text (checked here first, so errors
        name the local file), or as paths when they lie in a directory the daemon serves (``--serve-dir``)."""
        from .taskfiles import read_jsonl, read_prompts

        args = {"name": name, "metric": metric, "eval_command": eval_command, "metric_path": metric_path,
                "eval_options": eval_options}
        args.update(self._send_file(data, "data", "data_content", lambda p: read_jsonl(p, need=("prompt", "answer"))))
        if probes is not None and Path(str(probes)).expanduser().exists():
            args.update(self._send_file(probes, "probes", "probes_content", read_prompts))
        else:
            args["probes"] = probes
        return self._do("add_task", **args)

    def add_probe_set(self, name: str, file: str | os.PathLike) -> dict:
        from .taskfiles import read_prompts

        return self._do("add_probe_set", name=name, **self._send_file(file, "file", "content", read_prompts))

    def _send_file(self, path: str | os.PathLike, field: str, content_field: str,
                   check: Callable[[str], Any]) -> dict:
        """``{field: path}`` when the daemon serves the file's directory (it reads and checks the file there), else
        ``{content_field: its text}``, checked here first (errors name the local file) and within the daemon's
        request size limit."""
        from .api import MAX_BODY
        from .taskfiles import existing_file

        real = Path(os.path.realpath(existing_file(path)))
        if any(real.is_relative_to(d) for d in self.client.serve_dirs):
            return {field: str(real)}
        too_large = InvalidInput(f"{path}: too large to send to the daemon (its requests hold at most "
                                 f"{MAX_BODY >> 20} MiB); start it with --serve-dir {real.parent} to let it read the "
                                 f"file there, or stop it and run this command without a daemon")
        if real.stat().st_size > MAX_BODY:
            raise too_large
        check(str(path))
        text = real.read_text(encoding="utf-8")
        if len(json.dumps(text).encode()) > MAX_BODY - (64 << 10):
            raise too_large
        return {content_field: text}

    def search(self, tasks: list[str], budget: int, weights: dict | None = None, policy: str | None = None,
               limit: int | None = None, device: str = "auto",
               progress: Callable[[dict], None] | None = None) -> dict:
        args = {"tasks": list(tasks), "weights": weights or None, "budget": budget, "policy": policy, "limit": limit}
        res = self._do("search", **args)
        seen = -1
        while res.get("state") == "running":
            if progress is not None and len(res["evaluations"]) != seen:
                seen = len(res["evaluations"])
                progress(res)
            time.sleep(self.POLL_S)
            res = self._do("search", **args)
        if res.get("state") == "failed":
            raise SearchFailed(f"search {res['id']} failed: {res.get('error') or 'see the daemon log'}")
        res.pop("error", None)
        return res


def open_backend(home: str | os.PathLike | None = None) -> Backend:
    """The backend of a state home: through its daemon when one runs, else on its store (opened now)."""
    from .client import Client
    from .paths import resolve_home

    home = resolve_home(home)
    client = Client.find(home)
    if client is not None:
        return RemoteBackend(client)
    from .store import Store

    return LocalBackend(Store.open(home), owns_store=True)


def as_backend(target) -> Backend:
    """``target`` as a backend: a backend as it is; a :class:`~.store.Store` (or a catalog's or an engine's) on
    that store."""
    if isinstance(target, Backend):
        return target
    from .store import Store

    if isinstance(target, Store):
        return LocalBackend(target)
    if isinstance(getattr(target, "store", None), Store):  # a Catalog, an Engine
        return LocalBackend(target.store)
    raise TypeError(f"expected a Backend or a Store, got {type(target).__name__}")


__all__ = ["Backend", "LocalBackend", "NotFound", "OPERATIONS", "Operation", "RemoteBackend", "SearchFailed",
           "api_markdown", "api_reference", "as_backend", "open_backend", "parse_body", "public_model",
           "query_body"]
