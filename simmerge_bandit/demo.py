"""`simmerge demo`: the whole loop on the micro-zoo, in a few minutes on 2 CPU cores, with no downloads.

Builds (or reuses) the test zoo, registers it in a fresh home, then for a number of rounds: suggest a merge for a
task -> merge it -> evaluate it -> feed the normalized score back. Half-way a new operator joins. For comparison,
every active operator is also applied to the same (pair, task) the engine chose, so the table shows how the
engine's choices compare with always using one fixed operator, and with the oracle.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Callable

#: Operators the demo starts with, and the one that joins half-way (names from the zoo's default set).
START_OPERATORS = ("linear", "task_arithmetic_l1.0", "ties_d0.5", "dare_ties_d0.6", "slerp_t0.5")
LATE_OPERATOR = "breadcrumbs_d0.8"


def cache_dir() -> Path:
    """Where built zoos are kept between runs: ``$SIMMERGE_CACHE``, else ``~/.cache/simmerge``."""
    return Path(os.environ.get("SIMMERGE_CACHE") or Path.home() / ".cache" / "simmerge").expanduser()


def run_demo(home: str | os.PathLike | None = None, *, rounds: int = 24, seed: int = 0, zoo_dir=None,
             eval_limit: int | None = 32, policy: str = "linucb-hybrid", preset: str = "test",
             echo: Callable[[str], None] = print) -> dict:
    """Run the demo loop; return its rounds and summary (also printed through ``echo``)."""
    from . import pipeline
    from .catalog import Catalog
    from .engine import Engine, EngineConfig
    from .store import Store
    from .zoo import build_zoo, default_operators, register_zoo

    t0 = time.time()
    zoo_dir = Path(zoo_dir) if zoo_dir else cache_dir() / f"zoo-{preset}-seed{seed}"
    echo(f"micro-zoo: {zoo_dir} (built once, then cached)")
    build_zoo(zoo_dir, preset, seed)
    home = Path(home) if home else Path(tempfile.mkdtemp(prefix="simmerge-demo-"))
    echo(f"state home: {home}")
    store = Store.open(home)
    try:
        ops = {o["name"]: o for o in default_operators()}
        register_zoo(store, zoo_dir, operators=[ops[n] for n in START_OPERATORS])
        cat = Catalog(store)
        engine = Engine(store, EngineConfig(default_policy=policy, eval_budget=rounds, seed=seed))
        tasks = [t["name"] for t in cat.tasks()]
        echo(f"registered {len(cat.models())} models, {len(tasks)} tasks, {len(cat.operators())} operators "
             f"in {time.time() - t0:.0f}s")
        rows = []
        for r in range(rounds):
            if r == rounds // 2:
                late = ops[LATE_OPERATOR]
                cat.add_operator(late["name"], late["method"], late["params"])
                echo(f"round {r + 1}: new operator {late['name']} joins")
            task = tasks[r % len(tasks)]
            s = engine.suggest(task, top=1)[0]
            spec = pipeline.job_spec(engine, s["id"])
            res = pipeline.run_spec(spec, device="cpu", limit=eval_limit)
            pipeline.record(engine, spec, res)
            fixed = {}
            for op in cat.operators(active_only=True):
                if op["name"] == s["operator"]:
                    fixed[op["name"]] = res["reward"]
                    continue
                alt = dict(spec, steps=[{"method": op["method"], "params": op["params"], "operator": op["name"]}],
                           source_scores=res["source_scores"], out=spec["out"] + f"-{op['name']}")
                fixed[op["name"]] = pipeline.run_spec(alt, device="cpu", limit=eval_limit)["reward"]
            best = max(fixed, key=fixed.get)
            rows.append({"round": r + 1, "task": task, "pair": " + ".join(s["models"]), "chosen": s["operator"],
                         "reward": res["reward"], "best": best, "oracle": fixed[best], "fixed": fixed})
            echo(f"round {r + 1:2d}  {task:10s} {rows[-1]['pair']:28s} {s['operator']:22s} "
                 f"reward {res['reward']:.3f}   (best: {best} {fixed[best]:.3f})")
        summary = _summary(rows)
        _print_summary(summary, echo)
        echo(f"done in {time.time() - t0:.0f}s; state in {home} (try: simmerge --home {home} status)")
        return {"home": str(home), "rounds": rows, "summary": summary}
    finally:
        store.close()


def _summary(rows: list[dict]) -> dict:
    import numpy as np

    ops = sorted({k for r in rows for k in r["fixed"]})
    engine_mean = float(np.mean([r["reward"] for r in rows]))
    oracle_mean = float(np.mean([r["oracle"] for r in rows]))
    fixed = {}
    for op in ops:
        vals = [r["fixed"][op] for r in rows if op in r["fixed"]]
        fixed[op] = {"mean": float(np.mean(vals)), "rounds": len(vals)}
    return {"engine": engine_mean, "oracle": oracle_mean, "fixed": fixed, "rounds": len(rows)}


def _print_summary(s: dict, echo) -> None:
    echo("")
    echo(f"{'policy':26s} {'mean normalized score':>22s} {'rounds':>7s}")
    echo(f"{'engine (learning)':26s} {s['engine']:22.3f} {s['rounds']:7d}")
    for op, v in sorted(s["fixed"].items(), key=lambda kv: -kv[1]["mean"]):
        echo(f"{'fixed: ' + op:26s} {v['mean']:22.3f} {v['rounds']:7d}")
    echo(f"{'oracle (best per round)':26s} {s['oracle']:22.3f} {s['rounds']:7d}")
