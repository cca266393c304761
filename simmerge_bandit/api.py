"""The daemon's API as one table of operations: each operation's name (its :class:`~.backend.Backend` method), HTTP
method and path, and how the daemon serves it. The daemon builds its routes from this table and the remote backend
finds them here, so a route's path is written in this module only; :func:`api_markdown` documents them."""

from __future__ import annotations

import inspect
from dataclasses import dataclass


@dataclass(frozen=True)
class Operation:
    """One operation on the state: its :class:`Backend` method, and how the daemon serves it."""

    name: str
    method: str              # HTTP method of its route
    path: str                # its route
    batched: bool = False    # through the daemon's group commit (it appends to the decision log)
    order: int = 0           # within a batch (feedback before suggest: a batch ranks with its own rewards)
    locked: bool = False     # changes what candidates depend on: runs under the engine's lock in the daemon
    #: How long a client waits for the answer (after connecting, which waits CONNECT_S at most): seconds for
    #: status, tens of seconds for suggest and feedback; operations that read checkpoints or replay the log get
    #: minutes. A search is a job, polled with short calls.
    timeout_s: float = 30.0


#: How long a client waits to connect to the daemon.
CONNECT_S = 3.0
#: The read timeout of operations that read weights, run forward passes or replay the whole log.
LONG_S = 600.0
#: The largest request body the daemon reads (413 beyond it); a task's file sent as its text counts.
MAX_BODY = 16 << 20


OPERATIONS: dict[str, Operation] = {op.name: op for op in (
    # catalog
    Operation("models", "GET", "/v1/models"),
    Operation("model", "GET", "/v1/model"),
    Operation("add_model", "POST", "/v1/models", locked=True, timeout_s=LONG_S),
    Operation("remove_model", "POST", "/v1/models/remove", locked=True),
    Operation("tasks", "GET", "/v1/tasks"),
    Operation("task", "GET", "/v1/task"),
    Operation("add_task", "POST", "/v1/tasks", timeout_s=120.0),  # takes the lock to record it (LocalBackend)
    Operation("probe_sets", "GET", "/v1/probes"),
    Operation("add_probe_set", "POST", "/v1/probes", locked=True, timeout_s=120.0),
    Operation("operators", "GET", "/v1/operators"),
    Operation("operator", "GET", "/v1/operator"),
    Operation("add_operator", "POST", "/v1/operators", locked=True),
    Operation("retire_operator", "POST", "/v1/operators/retire", locked=True),
    Operation("record_score", "POST", "/v1/scores", locked=True),
    # engine
    Operation("suggest", "POST", "/v1/suggest", batched=True, order=1, timeout_s=60.0),
    Operation("feedback", "POST", "/v1/feedback", batched=True, order=0),
    Operation("status", "GET", "/v1/status", timeout_s=10.0),
    Operation("jobs", "GET", "/v1/jobs"),
    Operation("search", "POST", "/v1/search"),
    Operation("search_report", "POST", "/v1/search/report"),
    Operation("rebuild_policy", "POST", "/v1/policies/rebuild", locked=True, timeout_s=LONG_S),
    Operation("fit_predictor", "POST", "/v1/predictor/fit", locked=True, timeout_s=LONG_S),
    Operation("replay_log", "GET", "/v1/replay/log", timeout_s=LONG_S),
    Operation("store_merge_table", "POST", "/v1/merge-table", locked=True, timeout_s=120.0),
    # the dashboard (dashboard.py): its data, and a one-time login URL for `simmerge ui`
    Operation("dashboard", "GET", "/v1/dashboard"),
    Operation("ui_login", "POST", "/v1/ui/login", timeout_s=10.0),
    # signals
    Operation("compute_signatures", "POST", "/v1/signatures", locked=True, timeout_s=LONG_S),
    Operation("signatures", "GET", "/v1/signatures"),
    Operation("features", "POST", "/v1/features", locked=True, timeout_s=LONG_S),
)}


def api_reference() -> list[dict]:
    """The daemon's routes as the operation table gives them: ``{"method", "path", "operation", "fields",
    "batched"}``, each field ``{"name", "type", "required"}`` from the local implementation's signature (GET fields
    go in the query, each value JSON text). For docs/daemon.md, which cannot then go stale."""
    from .backend import LocalBackend

    out = []
    for op in OPERATIONS.values():
        fn = getattr(LocalBackend, f"op_{op.name}")
        fields = [{"name": p.name, "type": str(p.annotation).replace("PathArg", "path"),
                   "required": p.default is inspect.Parameter.empty}
                  for p in list(inspect.signature(fn).parameters.values())[1:] if p.kind is not p.KEYWORD_ONLY]
        out.append({"method": op.method, "path": op.path, "operation": op.name, "fields": fields,
                    "batched": op.batched})
    return out


def api_markdown() -> str:
    """:func:`api_reference` as a Markdown table."""
    rows = ["| route | operation | fields |", "|---|---|---|"]
    for r in api_reference():
        fields = ", ".join(f"`{f['name']}`" + ("" if f["required"] else "?") for f in r["fields"]) or "-"
        rows.append(f"| `{r['method']} {r['path']}` | `{r['operation']}`{' (group commit)' if r['batched'] else ''} "
                    f"| {fields} |")
    return "\n".join(rows)
