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
    d = store.artifacts / "merges"
    d.mkdir(parents=True, exist_ok=True)
    return d


def job_spec(engine, decision_id: str) -> dict[str, Any]:
    """Everything :func:`run_spec` needs, as plain data."""
    d = engine.decision(decision_id)
    cat = engine.catalog
    task = cat.task(d["task"])
    models = [cat.model(m) for m in d["models"]]
    bases = {m["base"] for m in models}
    base = cat.model(bases.pop()) if len(bases) == 1 and None not in bases else None
    ops = [cat.operator(o) for o in d["operator"]]
    known = {}
    for m in models:
        row = engine.store.fetchone(
            "SELECT score FROM evaluations WHERE fingerprint = ? AND task = ? AND data_hash = ? AND metric = ?",
            [m["fingerprint"], task["name"], task["data_hash"], task["metric"]])
        if row is not None:
            known[m["name"]] = row[0]
    return {
        "decision": decision_id,
        "models": [{"name": m["name"], "path": m["path"], "fingerprint": m["fingerprint"]} for m in models],
        "base": None if base is None else {"name": base["name"], "path": base["path"]},
        "steps": [{"method": o["method"], "params": o["params"], "operator": o["name"]} for o in ops],
        "task": {k: task[k] for k in ("name", "data_path", "data_hash", "metric", "eval_command", "metric_path")},
        "source_scores": known,
        "out": str(merges_dir(engine.store) / decision_id),
        "seed": int(decision_id[:8], 16) % (2**31),
    }


def merge_spec(spec: dict[str, Any], *, device: str = "auto") -> Path:
    """Run the merge (or chain) of a job spec into ``spec["out"]`` (atomic; replaces a leftover)."""
    from . import executor

    paths = [m["path"] for m in spec["models"]]
    base = spec["base"]["path"] if spec["base"] else None
    steps = spec["steps"]
    out = Path(spec["out"])
    if len(steps) == 1:
        executor.merge_pair(paths, steps[0]["method"], steps[0]["params"], out, base=base, device=device,
                            seed=spec["seed"], force=True)
    else:
        executor.merge_chain_pairs(paths, [(s["method"], s["params"]) for s in steps], out, base=base,
                                   device=device, seed=spec["seed"], force=True)
    return out


def run_spec(spec: dict[str, Any], *, device: str = "auto", limit: int | None = None,
             keep_merge: bool = False) -> dict[str, Any]:
    """Merge, evaluate the merge and any source whose score is unknown, and normalize. Raises
    :class:`EvaluationFailed` with the reason when a step fails."""
    from .evaluators import evaluate, normalize_score

    t0 = time.time()
    task = spec["task"]
    try:
        out = merge_spec(spec, device=device)
    except Exception as e:  # a merge failure is a job failure with its reason, never a daemon crash
        raise EvaluationFailed(f"merge failed: {e}") from None
    try:
        res = evaluate(out, task, limit=limit)
        if not res.ok:
            raise EvaluationFailed(f"evaluation of the merge failed: {res.reason}")
        sources = dict(spec["source_scores"])
        for m in spec["models"]:
            if m["name"] not in sources:
                r = evaluate(m["path"], task, limit=limit)
                if not r.ok:
                    raise EvaluationFailed(f"evaluation of source {m['name']} failed: {r.reason}")
                sources[m["name"]] = r.score
    finally:
        if not keep_merge:
            shutil.rmtree(out, ignore_errors=True)
    reward = normalize_score(res.score, sources.values())
    if reward is None:
        raise EvaluationFailed("no usable source scores to normalize against")
    return {"decision": spec["decision"], "score": res.score, "reward": reward, "source_scores": sources,
            "seconds": time.time() - t0, "merged": str(out) if keep_merge else None,
            "host": socket.gethostname(), "pid": os.getpid()}   # where it ran (a Ray worker, or this process)


def record(engine, spec: dict[str, Any], result: dict[str, Any]) -> dict:
    """Store new source scores and the reward (idempotent: a job re-run after a crash records nothing twice)."""
    task = spec["task"]
    fp = {m["name"]: m["fingerprint"] for m in spec["models"]}
    with engine.store.transaction():
        for name, score in result["source_scores"].items():
            if name not in spec["source_scores"] and name in fp:
                engine.store.execute(
                    "INSERT OR REPLACE INTO evaluations (fingerprint, task, data_hash, metric, score) "
                    "VALUES (?,?,?,?,?)", [fp[name], task["name"], task["data_hash"], task["metric"], score])
    return engine.feedback(spec["decision"], result["reward"], raw_score=result["score"], source="evaluator")


def evaluate_decision(engine, decision_id: str, *, device: str = "auto", limit: int | None = None) -> dict:
    """Merge, evaluate and record one decision in this process (used by the demo and the daemon's local
    executor)."""
    spec = job_spec(engine, decision_id)
    result = run_spec(spec, device=device, limit=limit)
    record(engine, spec, result)
    return result
