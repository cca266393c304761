"""One evaluation job: merge the candidate of a decision, evaluate it, normalize, and report the reward.

Split in two so that the work can run anywhere (a thread, a Ray worker) while the state has one writer:
:func:`job_spec` reads what the job needs from the store; :func:`run_spec` is pure (paths and parameters in, scores
out); :func:`record` writes the outcome (source scores, reward) back through the engine.
"""

from __future__ import annotations

import os
import shutil
import socket
import time
from pathlib import Path
from typing import Any

from .errors import EvaluationFailed


def merges_dir(store) -> Path:
    """The home's folder for evaluated merges (``artifacts/merges``), created if missing."""
    d = store.artifacts / "merges"
    d.mkdir(parents=True, exist_ok=True)
    return d


def job_spec(engine, decision_id: str, *, catalog_reference: bool = False) -> dict[str, Any]:
    """Everything :func:`run_spec` needs, as plain data: the decision's merge and every task of its target (with
    its weight), and the source scores already known per task.

    ``catalog_reference``: also ``reference`` per task, the best known score of any catalog model on it (same data
    and metric). A merge is then normalized against the better of that and its own sources, so merges of
    different pairs are on one scale for the target (what a search compares); without it, against its own
    sources only (the engine's reward: how much of its sources' skills a merge keeps)."""
    from .recipe import build
    from .target import Target

    d = engine.decision(decision_id)
    cat = engine.catalog
    target = Target.parse(d["task"])
    # a family's steps merge with the values the engine chose for this decision
    r = build(cat, d["models"], d["operator"], d.get("params"))
    models = [cat.model(m) for m in d["models"]]
    tasks, known, reference = [], {}, {}
    for name, weight in target.items:
        task = cat.task(name)
        tasks.append({**{k: task[k] for k in ("name", "data_path", "data_hash", "metric", "eval_command",
                                              "metric_path", "eval_options")}, "weight": weight})
        known[name] = {}
        for m in models:
            row = engine.store.fetchone(
                "SELECT score FROM evaluations WHERE fingerprint = ? AND task = ? AND data_hash = ? AND metric = ?",
                [m["fingerprint"], task["name"], task["data_hash"], task["metric"]])
            if row is not None:
                known[name][m["name"]] = row[0]
        if catalog_reference:
            row = engine.store.fetchone(
                "SELECT max(e.score) FROM evaluations e JOIN models m ON m.fingerprint = e.fingerprint "
                "WHERE e.task = ? AND e.data_hash = ? AND e.metric = ? AND isfinite(e.score)",
                [task["name"], task["data_hash"], task["metric"]])
            if row[0] is not None:
                reference[name] = float(row[0])
    return {
        "decision": decision_id,
        "target": target.key,
        **r.as_json(),
        "tasks": tasks,
        "source_scores": known,
        "out": str(merges_dir(engine.store) / decision_id),
        "seed": int(decision_id[:8], 16) % (2**31),
        **({"reference": reference} if catalog_reference else {}),
    }


def merge_spec(spec: dict[str, Any], *, device: str = "auto") -> Path:
    """Run the merge (or chain) of a job spec into ``spec["out"]`` (atomic; replaces a leftover)."""
    from .recipe import Recipe

    out = Path(spec["out"])
    Recipe.from_json(spec).merge(out, device=device, seed=spec["seed"], force=True)
    return out


def score_merge(spec: dict[str, Any], out: Path, *, limit: int | None = None, device: str = "auto"
                ) -> dict[str, Any]:
    """Evaluate the merged checkpoint ``out`` on every task of the spec's target (and each source whose score on
    a task is unknown), normalize per task (against the best source, or the spec's catalog ``reference`` where it
    is higher) and aggregate with the target's weights. An lm-eval evaluation's results JSON is kept in the
    outcome's ``lm_eval`` (per task)."""
    from .evaluators import evaluate, normalize_score

    scores, normalized, sources, lm_eval = {}, {}, {}, {}
    for task in spec["tasks"]:
        name = task["name"]
        res = evaluate(out, task, limit=limit, device=device)
        if "lm_eval" in res.details:
            lm_eval[name] = res.details["lm_eval"]
        if not res.ok:
            raise EvaluationFailed(f"evaluation of the merge on {name} failed: {res.reason}")
        src = dict(spec["source_scores"].get(name, {}))
        for m in spec["models"]:
            if m["name"] not in src:
                r = evaluate(m["path"], task, limit=limit, device=device)
                if not r.ok:
                    raise EvaluationFailed(f"evaluation of source {m['name']} on {name} failed: {r.reason}")
                src[m["name"]] = r.score
        ref = spec.get("reference", {}).get(name)
        norm = normalize_score(res.score, [*src.values(), *([ref] if ref is not None else [])])
        if norm is None:
            raise EvaluationFailed(f"no usable source scores on {name} to normalize against")
        scores[name], normalized[name], sources[name] = res.score, norm, src
    weights = {t["name"]: t["weight"] for t in spec["tasks"]}
    reward = sum(weights[t] * normalized[t] for t in weights)
    raw = sum(weights[t] * scores[t] for t in weights)
    return {"score": raw, "reward": min(max(reward, 0.0), 2.0), "scores": scores, "normalized": normalized,
            "source_scores": sources, **({"lm_eval": lm_eval} if lm_eval else {})}


def run_spec(spec: dict[str, Any], *, device: str = "auto", limit: int | None = None,
             keep_merge: bool = False) -> dict[str, Any]:
    """Merge, evaluate the merge on every task of the target (and any source whose score is unknown), and
    normalize. Raises :class:`EvaluationFailed` with the reason when a step fails."""
    t0 = time.time()
    try:
        out = merge_spec(spec, device=device)
    except Exception as e:  # a merge failure is a job failure with its reason, never a daemon crash
        raise EvaluationFailed(f"merge failed: {e}") from None
    try:
        res = score_merge(spec, out, limit=limit, device=device)
    finally:
        if not keep_merge:
            shutil.rmtree(out, ignore_errors=True)
    return {"decision": spec["decision"], **res, "seconds": time.time() - t0,
            "merged": str(out) if keep_merge else None,
            "host": socket.gethostname(), "pid": os.getpid()}   # where it ran (a Ray worker, or this process)


def record(engine, spec: dict[str, Any], result: dict[str, Any]) -> dict:
    """Store new source scores, then the reward with its per-task raw scores (idempotent: a job re-run after a
    crash records nothing twice)."""
    from .catalog import Catalog

    fp = {m["name"]: m["fingerprint"] for m in spec["models"]}
    tasks = {t["name"]: t for t in spec["tasks"]}
    with engine.store.transaction():
        new = False
        for tname, src in result["source_scores"].items():
            task = tasks[tname]
            for name, score in src.items():
                if name not in spec["source_scores"].get(tname, {}) and name in fp:
                    engine.store.execute(
                        "INSERT OR REPLACE INTO evaluations (fingerprint, task, data_hash, metric, score) "
                        "VALUES (?,?,?,?,?)", [fp[name], tname, task["data_hash"], task["metric"], score])
                    new = True
        if new:  # known scores are part of candidates' contexts: cached candidate sets must be rebuilt
            Catalog(engine.store).bump()
    return engine.feedback(spec["decision"], result["reward"], raw_score=result["score"], source="evaluator",
                           scores=result.get("scores"))


def evaluate_decision(engine, decision_id: str, *, device: str = "auto", limit: int | None = None) -> dict:
    """Merge, evaluate and record one decision in this process (used by the demo and the daemon's local
    executor)."""
    spec = job_spec(engine, decision_id)
    result = run_spec(spec, device=device, limit=limit)
    record(engine, spec, result)
    return result
