"""Decision-quality benchmark: how good are the engine's merge choices on the bench zoo's full merge table?

The full table scores every operator on every (task, ordered pair), so each policy can be simulated exactly
(`simmerge_bandit.simulate`). Tasks are split into training and held-out; on the held-out tasks we report, with
intervals over seeds:

- the oracle (best operator per pair) and the best fixed operator (chosen on the training tasks);
- random;
- the SimMerge predictor trained on the training tasks with zero evaluations on the held-out ones;
- the bandits (LinUCB disjoint and hybrid, linear TS, VW squarecb, MABWiser's LinUCB as a peer), shown the
  training tasks first, then given an evaluation budget of 10, 25 or 50 on the held-out stream;
- an operator added at the half-way round: after how many rounds it is chosen where it is the best.

Main figure: `final_score`, the mean normalized score of each policy's greedy choice on every held-out pair after
its budget is spent, and the share of the best-fixed -> oracle gap it closes. Context features come from the
signals module (signatures of the zoo's real checkpoints on each task's probes).

    python benchmarks/bench_decision.py [--table benchmarks/results/zoo_bench_table.parquet] [--zoo DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
BANDITS = ("linucb", "linucb-hybrid", "lints", "vw", "mabwiser-linucb")


class MabwiserLinUCB:
    """MABWiser's LinUCB behind our policy interface (the peer). MABWiser learns one model per arm on the
    context only and inverts a matrix per fit; the exploration floor is mixed in as for our policies."""

    name = "mabwiser-linucb"

    def __init__(self, seed: int = 0, alpha: float = 1.0, l2: float = 1.0, floor: float = 0.01):
        self.seed, self.alpha, self.l2, self.floor = seed, alpha, l2, floor
        self._mab = None
        self._rng = np.random.default_rng(seed)
        self.n_updates = 0

    def _ensure(self, arm: str, x, reward) -> bool:
        from mabwiser.mab import MAB, LearningPolicy

        if self._mab is None:
            self._mab = MAB([arm], LearningPolicy.LinUCB(alpha=self.alpha, l2_lambda=self.l2), seed=self.seed)
            self._mab.fit([arm], [reward], [x])
            return True
        if arm not in self._mab.arms:
            self._mab.add_arm(arm)
        return False

    def update(self, x, arm, z, reward, propensity=1.0) -> None:
        x = np.asarray(x, dtype=float)
        if not self._ensure(str(arm), x, float(reward)):
            self._mab.partial_fit([str(arm)], [float(reward)], [x])
        self.n_updates += 1

    def rank(self, cands):
        from simmerge_bandit.policies import Ranking

        n = len(cands)
        arms = [str(a) for a in cands.arms]
        scores = np.zeros(n)
        if self._mab is not None:
            for a in arms:
                if a not in self._mab.arms:
                    self._mab.add_arm(a)
            cache = {}
            for i in range(n):
                key = cands.X[i].tobytes()
                if key not in cache:
                    cache[key] = self._mab.predict_expectations([cands.X[i]])
                    cache[key] = cache[key][0] if isinstance(cache[key], list) else cache[key]
                scores[i] = float(cache[key].get(arms[i], 0.0))
        best = scores >= scores.max() - 1e-12
        prop = (1 - self.floor) * best / best.sum() + self.floor / n
        prop /= prop.sum()
        choice = int(min(np.searchsorted(np.cumsum(prop), self._rng.random()), n - 1))
        rest = np.argsort(-scores, kind="stable")
        order = np.concatenate(([choice], rest[rest != choice]))
        return Ranking(choice, order, scores, scores, np.zeros(n), prop)


def pair_features(table_df, zoo_dir: Path, home: Path) -> dict:
    """Signals features of every (task, model_a, model_b) in the table, from the zoo's real checkpoints."""
    from simmerge_bandit import signals
    from simmerge_bandit.store import Store
    from simmerge_bandit.zoo import register_zoo

    feats = {}
    with Store.open(home) as store:
        register_zoo(store, zoo_dir)
        for task, grp in table_df.groupby("task"):
            pairs = sorted(set(zip(grp["model_a"], grp["model_b"])))
            signals.ensure_signatures(store, sorted({m for p in pairs for m in p}), task)
            X, names = signals.feature_matrix(store, pairs, task)
            for p, row in zip(pairs, X):
                feats[(task, p[0], p[1])] = np.where(np.isfinite(row), row, 0.0)
    return feats


def summarize(sim, label: str, budget: int) -> list[dict]:
    out = []
    for r in sim.results():
        r = dict(r)
        r["setting"], r["budget"] = label, budget
        out.append(r)
    return out


def main() -> None:  # noqa: C901
    ap = argparse.ArgumentParser()
    ap.add_argument("--table", default=str(RESULTS / "zoo_bench_table.parquet"))
    ap.add_argument("--zoo", default=None, help="the bench zoo directory (built, cached, if missing)")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=100)
    ap.add_argument("--budgets", type=int, nargs="+", default=[10, 25, 50])
    ap.add_argument("--pretrain-rows", type=int, default=1500,
                    help="training rows shown one by one to each online bandit (the predictor is fitted on all)")
    ap.add_argument("--holdout", nargs="+", default=None, help="held-out tasks (default: a third of the tasks)")
    ap.add_argument("--home", default=None, help="state home to keep signatures in (default: a fresh temp dir)")
    ap.add_argument("--out", default=str(RESULTS / "decision.json"))
    ap.add_argument("--plot", default=str(RESULTS / "decision.png"))
    args = ap.parse_args()

    import pandas as pd

    from simmerge_bandit import simulate as sim_mod
    from simmerge_bandit.demo import cache_dir
    from simmerge_bandit.replay import parse_policy
    from simmerge_bandit.zoo import build_zoo

    t0 = time.time()
    df = pd.read_parquet(args.table)
    df = df[df["model_c"].isna()] if "model_c" in df else df
    zoo_dir = Path(args.zoo) if args.zoo else cache_dir() / "zoo-bench-seed0"
    if not (zoo_dir / "zoo.json").exists():
        build_zoo(zoo_dir, "bench", 0)
    home = Path(args.home) if args.home else Path(tempfile.mkdtemp(prefix="simmerge-bench-decision-"))
    feats = pair_features(df, zoo_dir, home)
    t_feat = time.time() - t0
    table = sim_mod.table_from_frame(df, source=args.table, features=feats)
    tasks = sorted(set(table.tasks))
    holdout = args.holdout or tasks[:: 3]
    print(f"{len(table.contexts)} (task, pair) contexts, {len(table.operators)} operators, tasks {tasks}, "
          f"held out {holdout}; features in {t_feat:.0f}s")

    def factory(spec, seed):
        if spec.name == "mabwiser-linucb":
            return MabwiserLinUCB(seed=seed)
        return sim_mod.make_learned_policy(spec, seed=seed)

    results = []
    common = dict(rounds=args.rounds, seeds=args.seeds, holdout_tasks=holdout, policy_factory=factory,
                  pretrain_rows=args.pretrain_rows)
    zero = sim_mod.simulate(table, [parse_policy("predictor"), parse_policy("uniform")], budget=0, **common)
    results += summarize(zero, "zero evaluations", 0)
    for b in args.budgets:
        specs = [parse_policy(n) if n != "mabwiser-linucb" else sim_mod.PolicySpec(n, n) for n in BANDITS]
        s = sim_mod.simulate(table, specs, budget=b, **common)
        results += summarize(s, f"budget {b}", b)
        print(f"budget {b}: done ({time.time() - t0:.0f}s)")
    # An operator that joins half-way: how soon is it chosen where it is the best?
    summ = zero.summary()
    late_op = max(table.operators, key=lambda o: float(np.mean(table.R[:, table.operators.index(o)] ==
                                                              table.R.max(axis=1))))
    late = sim_mod.simulate(table, [parse_policy("linucb-hybrid"), parse_policy("linucb")], budget=args.rounds,
                            late_operators={late_op: args.rounds // 2}, **common)
    results += summarize(late, f"late operator {late_op}", args.rounds)

    out = {"benchmark": "decision", "table": args.table, "pretrain_rows": args.pretrain_rows, "contexts": len(table.contexts),
           "operators": table.operators, "tasks": tasks, "holdout": holdout, "rounds": args.rounds,
           "seeds": args.seeds, "late_operator": late_op, "results": results, "summary": summ,
           "seconds": time.time() - t0,
           "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "load_avg_1m": os.getloadavg()[0]}}
    Path(args.out).write_text(json.dumps(out, indent=2, default=float))
    try:
        sim_mod.plot(late, args.plot)
    except Exception as e:  # the plot is a convenience; the JSON is the result
        print("plot skipped:", e)
    print(f"oracle {summ['oracle_final_score']:.4f}  best fixed ({summ['best_fixed']}) {summ['fixed_final_score']:.4f}")
    for r in results:
        print(f"{r['setting']:28s} {r['policy']:18s} final {_f(r['final_score'])} gap closed "
              f"{_f(r['final_gap_closed'])} [{_f(r.get('final_gap_closed_ci_low'))}, "
              f"{_f(r.get('final_gap_closed_ci_high'))}]  online mean {_f(r['mean_score'])}")


def _f(v) -> str:
    return "  n/a " if v is None else f"{v:+.3f}"


if __name__ == "__main__":
    main()
