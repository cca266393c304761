"""`simmerge demo`: the engine choosing merges for tasks it has never been evaluated on, against every fixed
operator, the catalog-metadata rules and the oracle; a few minutes on 2 CPU cores, no downloads.

1. Builds (or reuses) the ``realistic`` micro-zoo: a base that half-knows six tasks and experts fine-tuned from
   it, in the regime of real LLM merging where a merge of two experts keeps most of both skills.
2. Registers it in a fresh state home (models with their tags and measured scores, tasks, the preset's operators).
3. Holds out a third of the tasks. Fits the SimMerge predictor on merges of experts of the other tasks only (their
   full merge table, cached beside the zoo), scored on the target objective: the mean of a merge's normalized
   scores over the union of its sources' tasks; its model (``predictor fit --model auto``) is the one whose
   choices on a training task left out of its fit are best.
4. For a number of rounds, asks the engine (:data:`POLICY`: GP-UCB on the predictor's residual) for the best merge
   for a held-out target (each held-out task, alone and with each training task): it picks the pair and the
   operator. Its merge is made and evaluated on every target task the way a user's would be (the streaming
   executor writes a checkpoint, the evaluator scores it), and the engine learns from that reward. Every operator
   is also merged and evaluated on the same pair (in memory, with the executor's kernels: the same arithmetic;
   in worker processes while the rounds go on, when there are several cores), so the engine's choice is
   compared with always using one operator, with the metadata rules (fitted on the training merges) and with the
   best operator of the round (the oracle), all scored the same way. A round is printed once its comparison is
   scored.
5. Prints the comparison and writes a PNG of cumulative regret against the oracle.

Nothing is tuned to the demo: it shows what the code does on that seed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Callable

#: The policy the demo runs: the GP-UCB kernel bandit learning the residual of the predictor fitted on training
#: tasks (the search's default, :func:`.search.default_policy`).
POLICY = "gp-ucb@predictor"


def cache_dir() -> Path:
    """Where built zoos are kept between runs: ``$SIMMERGE_CACHE``, else ``~/.cache/simmerge``."""
    return Path(os.environ.get("SIMMERGE_CACHE") or Path.home() / ".cache" / "simmerge").expanduser()


def split_tasks(tasks: list[str], seed: int) -> tuple[list[str], list[str]]:
    """(training, held-out): every third task is held out, starting at ``seed % 3``."""
    held = tasks[seed % 3::3]
    return [t for t in tasks if t not in held], held


def held_out_targets(held: list[str], train: list[str]) -> list:
    """The targets the demo asks for: each held-out task alone, then with each training task (a merge that must
    keep a skill the engine has seen merged and one it has not)."""
    from .target import Target

    return [Target.of([h]) for h in held] + [Target.of([h, t]) for h in held for t in train]


def _write_parquet(rows: list[dict], path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    pq.write_table(pa.Table.from_pylist(rows), tmp)
    tmp.replace(path)


def training_table(zoo_dir: Path, manifest: dict, train: list[str], operators: list[dict], *,
                   echo: Callable[[str], None], jobs: int = 1, pool=None) -> Path:
    """The full merge table of every ordered pair of experts tagged only with training tasks (cached)."""
    from .zoo import build_table, expert_names

    by = {m["name"]: m for m in manifest["models"]}
    experts = [n for n in expert_names(manifest) if set(by[n]["tasks"]) <= set(train)]
    cases = [(a, b) for a in experts for b in experts if a != b]
    key = hashlib.blake2b(json.dumps([manifest["key"], train, [o["name"] for o in operators], cases])
                          .encode(), digest_size=8).hexdigest()
    path = zoo_dir / ".cache" / f"demo-train-{key}.parquet"
    if not path.is_file():
        echo(f"scoring {len(cases)} training pairs x {len(operators)} operators for the predictor (once, cached)")
        _write_parquet(build_table(zoo_dir, operators=operators, cases=cases, frame=False, progress=True,
                                   jobs=jobs, pool=pool), path)
    return path


def _rule_case(target, models: list[str], by_name: dict):
    from .rules import Case

    return Case(sources=tuple(models), tags=tuple(frozenset(by_name[m]["tasks"]) for m in models),
                scores=tuple({t: by_name[m]["scores"].get(t) for t in target} for m in models),
                target=dict(target))


def fitted_rules(table_path: Path, by_name: dict, operators: list[dict]) -> dict:
    """Every metadata rule (:mod:`.rules`) fitted on the training table, target objective."""
    import numpy as np
    import pyarrow.parquet as pq

    from .rules import RULES, fit_rule
    from .target import Target

    rows = pq.read_table(table_path).to_pylist()
    per: dict[tuple, dict[str, dict[str, float]]] = {}
    for r in rows:
        if r["normalized_score"] is not None:
            per.setdefault((r["model_a"], r["model_b"]), {}).setdefault(r["operator"], {})[r["task"]] = \
                r["normalized_score"]
    names = [o["name"] for o in operators]
    cases, R = [], []
    for (a, b), by_op in sorted(per.items()):
        target = Target.default_for([by_name[a]["tasks"], by_name[b]["tasks"]])
        vals = [target.aggregate(by_op.get(n, {})) for n in names]
        if any(v is None for v in vals):
            continue
        cases.append(_rule_case(target.weights, [a, b], by_name))
        R.append(vals)
    return {name: fit_rule(name, cases, np.array(R), operators) for name in RULES}


class _Comparisons:
    """Every operator merged and scored on the rounds' (pair, target)s, on the target objective. With a ``pool``
    (:func:`.zoo.worker_pool`), its workers score them while this process runs the engine's own rounds, and this
    process scores those no worker has started once its rounds are done; the scores are the same either way (a
    merge's seed depends only on its case and operator)."""

    def __init__(self, zoo_dir: Path, operators: list[dict], by_name: dict, pool=None):
        self.zoo_dir, self.operators, self.by_name, self.pool = zoo_dir, operators, by_name, pool
        self.scored: dict[tuple, dict[str, float]] = {}
        self.pending: dict[tuple, tuple] = {}

    def _values(self, rows: list[dict], pair: tuple, target) -> dict[str, float]:
        from .evaluators.normalize import normalize_score

        per: dict[str, dict[str, float | None]] = {}
        for row in rows:
            norm = normalize_score(row["score"], [self.by_name[m]["scores"].get(row["task"]) for m in pair])
            per.setdefault(row["operator"], {})[row["task"]] = norm
        return {op: target.aggregate(v) or 0.0 for op, v in per.items()}

    def _score_here(self, pair: tuple, target) -> None:
        rows = _pair_table(self.zoo_dir, self.operators, pair, target.tasks)
        self.scored[pair, target.key] = self._values(rows, pair, target)

    def ask(self, pair: tuple, target) -> None:
        key = (pair, target.key)
        if key in self.scored or key in self.pending:
            return
        if self.pool is None:
            self._score_here(pair, target)
        else:
            self.pending[key] = (self.pool.submit(_pair_table, str(self.zoo_dir), self.operators, pair,
                                                  list(target.tasks)), target)

    def values(self, pair: tuple, target, *, wait: bool) -> dict[str, float] | None:
        """The operators' aggregate scores on ``pair`` for ``target`` (None when not scored yet and not ``wait``)."""
        key = (pair, target.key)
        if key not in self.scored:
            fut, _ = self.pending[key]
            if not wait and not fut.done():
                return None
            self.scored[key] = self._values(fut.result(), pair, target)
            del self.pending[key]
        return self.scored[key]

    def finish(self) -> None:
        """Score here what no worker has started (the last asked first, while the workers go on from the first)."""
        for (pair, _), (fut, target) in reversed(list(self.pending.items())):
            if fut.cancel():
                self._score_here(pair, target)
                del self.pending[pair, target.key]


def _pair_table(zoo_dir, operators: list[dict], pair: tuple, tasks) -> list[dict]:
    """Every operator merged on ``pair`` and scored on ``tasks`` (rows of the zoo's merge table)."""
    from .zoo import build_table

    return build_table(zoo_dir, operators=operators, cases=[pair], frame=False, progress=False,
                       eval_tasks=list(tasks))


def run_demo(home: str | os.PathLike | None = None, *, rounds: int = 12, seed: int = 0, zoo_dir=None,
             policy: str = POLICY, preset: str = "realistic", plot: str | os.PathLike | None = None,
             eval_limit: int | None = None, jobs: int = 1, echo: Callable[[str], None] = print) -> dict:
    """Run the demo; return its rounds and summary (also printed through ``echo``). ``eval_limit`` caps the
    examples per task of the engine's own evaluations (default: all). ``jobs``: processes that build the zoo and
    score the training merges on a first run, and that score every operator on the rounds' pairs (the same
    results for any count; ``simmerge demo`` uses :func:`.zoo.default_jobs`). More than one starts worker
    processes, so a script that calls this with ``jobs`` > 1 needs the usual ``if __name__ == "__main__":``
    guard."""
    from . import pipeline
    from .catalog import Catalog
    from .engine import Engine, EngineConfig
    from .store import Store
    from .threads import torch_threads
    from .zoo import build_zoo, expert_names, register_zoo, worker_pool

    t0 = time.time()
    with contextlib.ExitStack() as stack:
        # one set of workers for every phase (each spends seconds on its imports, started now): the zoo, the
        # training merges, the rounds' comparisons
        pool = None
        if jobs > 1:
            pool = worker_pool(jobs - 1)
            stack.callback(pool.shutdown, cancel_futures=True)
        # torch on one thread here, as in every worker and in the zoo's training: the figures are the same on
        # any number of cores, and this process does not fight the workers for theirs
        stack.enter_context(torch_threads(1))
        timings: dict[str, float] = {}
        zoo_dir = Path(zoo_dir) if zoo_dir else cache_dir() / f"zoo-{preset}-seed{seed}"
        echo(f"micro-zoo ({preset}): {zoo_dir} (built once, then cached)")
        manifest = build_zoo(zoo_dir, preset, seed, jobs=jobs, pool=pool)
        timings["zoo"] = time.time() - t0
        by_name = {m["name"]: m for m in manifest["models"]}
        home = Path(home) if home else Path(tempfile.mkdtemp(prefix="simmerge-demo-"))
        echo(f"state home: {home}")
        store = Store.open(home)
        stack.callback(store.close)
        register_zoo(store, zoo_dir)
        cat = Catalog(store)
        operators = [{"name": o["name"], "method": o["method"], "params": o["params"]} for o in cat.operators()]
        # tasks some expert is tagged with (a task no expert is tuned for is no merge target)
        experts = [by_name[n] for n in expert_names(manifest)]
        tasks = [t["name"] for t in manifest["tasks"] if any(t["name"] in m["tasks"] for m in experts)]
        train, held = split_tasks(tasks, seed)
        echo(f"registered {len(cat.models())} models, {len(cat.tasks())} tasks ({len(tasks)} with experts), "
             f"{len(operators)} operators; held out: {', '.join(held)} (the engine has never seen a merge scored "
             f"on {'it' if len(held) == 1 else 'them'})")
        t1 = time.time()
        table = training_table(zoo_dir, manifest, train, operators, echo=echo, jobs=jobs, pool=pool)
        timings["training_table"] = time.time() - t1
        comparisons = _Comparisons(zoo_dir, operators, by_name, pool)
        t1 = time.time()
        engine = Engine(store, EngineConfig(default_policy=policy, eval_budget=rounds, seed=seed))
        fit = engine.fit_predictor(table=str(table), objective="target", model="auto")
        timings["predictor"] = time.time() - t1
        t1 = time.time()
        cv = ", ".join(f"{k} {v:.0%}" for k, v in (fit.get("model_cv") or {}).items())
        echo(f"predictor fitted on {fit.get('n')} training merges (target objective): {fit['model']} model, "
             f"chosen by leaving each training task out{f' ({cv} of the gap closed)' if cv else ''}")
        rules = fitted_rules(table, by_name, operators)
        targets = held_out_targets(held, train)
        # one process learns from every round: its policies are snapshotted once, when the demo ends (a
        # snapshot per reward cost a fifth of the rounds' time)
        stack.enter_context(engine.snapshots_deferred())
        made: list[tuple] = []          # (target, pair, suggestion), in round order
        out_rounds: list[dict] = []

        def report(wait: bool) -> None:
            # each round in order, once every operator has been scored on its pair
            while len(out_rounds) < len(made):
                target, pair, s = made[len(out_rounds)]
                values = comparisons.values(pair, target, wait=wait)
                if values is None:
                    return
                reward = values[s["operator"]]
                case = _rule_case(target.weights, list(pair), by_name)
                best = max(values, key=values.get)
                out_rounds.append({
                    "round": len(out_rounds) + 1, "target": target.key, "pair": list(pair),
                    "chosen": s["operator"], "reward": reward, "merged_reward": s["merged_reward"],
                    "best": best, "oracle": values[best], "fixed": values,
                    "rules": {n: values[rule.choose(case, operators)] for n, rule in rules.items()}})
                echo(f"round {len(out_rounds):2d}  {target.key:26s} {' + '.join(pair):22s} "
                     f"{s['operator']:22s} reward {reward:.3f}   (best: {best} {values[best]:.3f})")

        for r in range(rounds):
            target = targets[r % len(targets)]
            # the demo compares operators on the pair the engine chose, so it asks for pairs (not a target's
            # group)
            s = engine.suggest(target, top=1, policy=policy, within=set(engine.candidates(target).pairs))[0]
            pair = tuple(s["models"])
            comparisons.ask(pair, target)
            spec = pipeline.job_spec(engine, s["id"])            # the loop a user runs: merge, evaluate, learn
            own = pipeline.run_spec(spec, device="cpu", limit=eval_limit)
            pipeline.record(engine, spec, own)
            made.append((target, pair, dict(s, merged_reward=own["reward"])))
            report(wait=False)
        comparisons.finish()
        report(wait=True)
        timings["rounds"] = time.time() - t1
        summary = _summary(out_rounds, rules["fixed"].fitted().get("operator") if "fixed" in rules else None)
        summary["policy"] = policy
        _print_summary(summary, echo)
        png = Path(plot) if plot else home / "demo_regret.png"
        try:
            _plot(out_rounds, summary, png)
            echo(f"cumulative regret plot: {png}")
        except ImportError:
            png = None
            echo("(no plot: matplotlib is not installed)")
        echo(f"done in {time.time() - t0:.0f}s; state in {home} (try: simmerge --home {home} status)")
        return {"home": str(home), "held_out": held, "rounds": out_rounds, "summary": summary,
                "plot": None if png is None else str(png), "seconds": time.time() - t0,
                "timings": {k: round(v, 2) for k, v in timings.items()}, "jobs": jobs}


def _summary(rows: list[dict], best_fixed: str | None) -> dict:
    import numpy as np

    ops = sorted({k for r in rows for k in r["fixed"]})
    fixed = {op: float(np.mean([r["fixed"][op] for r in rows])) for op in ops}
    rules = {n: float(np.mean([r["rules"][n] for r in rows])) for n in rows[0]["rules"]} if rows else {}
    return {"engine": float(np.mean([r["reward"] for r in rows])),
            "oracle": float(np.mean([r["oracle"] for r in rows])),
            "fixed": fixed, "best_fixed_on_training": best_fixed, "rules": rules, "rounds": len(rows)}


def _print_summary(s: dict, echo) -> None:
    echo("")
    echo("held-out targets, same pairs (the engine's), mean normalized score on the target:")
    echo(f"{'':34s} {'score':>7s}")
    echo(f"{'engine (' + s.get('policy', POLICY) + ')':34s} {s['engine']:7.3f}")
    for n, v in sorted(s["rules"].items(), key=lambda kv: -kv[1]):
        label = f"rule: {n}" + (" (best fixed op on training)" if n == "fixed" else "")
        echo(f"{label:34s} {v:7.3f}")
    for op, v in sorted(s["fixed"].items(), key=lambda kv: -kv[1])[:5]:
        echo(f"{'fixed: ' + op:34s} {v:7.3f}")
    echo(f"{'... and ' + str(max(0, len(s['fixed']) - 5)) + ' more fixed operators':34s}")
    echo(f"{'oracle (best operator per round)':34s} {s['oracle']:7.3f}")
    fx = max(s["fixed"].values()) if s["fixed"] else 0.0
    echo(f"(the best fixed operator in hindsight scores {fx:.3f}; it was not known before these rounds)")


def _plot(rows: list[dict], s: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    t = np.arange(1, len(rows) + 1)
    oracle = np.array([r["oracle"] for r in rows])
    fig, ax = plt.subplots(figsize=(7, 4.2))
    ax.plot(t, np.cumsum(oracle - np.array([r["reward"] for r in rows])), label="engine", lw=2.2)
    for n in sorted(s["rules"]):
        ax.plot(t, np.cumsum(oracle - np.array([r["rules"][n] for r in rows])), label=f"rule: {n}", lw=1, ls="--")
    ax.set_xlabel("round (held-out targets)")
    ax.set_ylabel("cumulative regret vs oracle")
    ax.set_title("simmerge demo: engine vs catalog-metadata rules")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
