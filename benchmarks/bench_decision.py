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

Main figure: `final_score`, the mean normalized score of each policy's greedy recommendation (highest predicted
reward, no exploration bonus) on every held-out pair after its budget is spent, and the share of the best-fixed ->
oracle gap it closes. With nine tasks one split is noisy, so the tasks are split three ways and every task is held
out exactly once; scores are pooled over all held-out pairs per seed, intervals are over seeds. Bandits come cold
(shown 1,500 training rows one by one) and warm (``NAME@predictor``: starting from the predictor fitted on the
training tasks). Diagnostics: the zero-evaluation predictor per feature family and its in-sample ceiling, for the
network and the linear model. Context features come from the signals module (signatures of the zoo's real
checkpoints on each task's probes).

Honest choices: the predictor's network size (``PREDICTOR_GRID``) and, per budget, its ``online_weight``
(``ONLINE_WEIGHTS``) and the ridge penalty ``l2`` of each warm-started bandit's residual model (``WARM_L2``) are
chosen on each split by leave-one-task-out cross-validation *inside its training tasks* (each training task held
out in turn, the policies trained on the other five); the held-out tasks are never used to choose anything.

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


ZERO = ("predictor", "uniform")
#: the predictor with its online_weight chosen by cross-validation on the training tasks (per split and budget)
PREDICTOR_CV = "predictor:online_weight=cv"
WARM = ("predictor", PREDICTOR_CV, "linucb@predictor", "linucb-hybrid@predictor", "lints@predictor")
FAMILIES = ("distribution", "activation", "task_vector", "shift")
#: network sizes the zero-evaluation predictor chooses among, per split, by cross-validation on training tasks
PREDICTOR_GRID = ({"hidden": 16}, {"hidden": 32}, {"hidden": 64})
#: weights of an online evaluation (in fitted rows) the online predictor chooses among the same way
ONLINE_WEIGHTS = (1, 3, 10, 30, 100)
#: ridge penalties of the residual corrections the warm-started bandits choose among the same way
WARM_L2 = (1, 30, 1000)


def subtable(table, keep_tasks):
    """The merge table restricted to some tasks (for cross-validation inside a split's training tasks)."""
    from simmerge_bandit.simulate import MergeTable

    rows = np.flatnonzero(np.isin(table.tasks, list(keep_tasks)))
    return MergeTable(table.source, [table.contexts[i] for i in rows], table.operators, table.R[rows],
                      table.X[rows], table.Z, table.feature_names, table.operator_feature_names)


def task_cv(table, train_tasks, specs, **kw) -> dict[str, float]:
    """Leave-one-task-out inside ``train_tasks``: each is held out in turn and the policies (``specs``) learn
    from the others; returns each policy's pooled share of the best-fixed -> oracle gap of its final choice."""
    from simmerge_bandit import simulate as sim_mod

    sub = subtable(table, train_tasks)
    num = {s.text: 0.0 for s in specs}
    den = 0.0
    for t in train_tasks:
        sim = sim_mod.simulate(sub, specs, holdout_tasks=[t], **kw)
        w = len(sim.pool)
        den += w * (sim.oracle_final - sim.fixed_final)
        for s in specs:
            num[s.text] += w * (np.mean([r.final_reward for r in sim.runs[s.text]]) - sim.fixed_final)
    return {k: float(v / den) for k, v in num.items()}


def choose_by_task_cv(table, train_tasks, budgets, rounds, seeds) -> dict:
    """The predictor's network size (zero evaluations) and, per budget, its online_weight and each warm-started
    bandit's l2, each the best of its grid by :func:`task_cv` on the training tasks; returns the choices and
    every cross-validated score."""
    from simmerge_bandit.replay import PolicySpec

    zero = {json.dumps(g): task_cv(table, train_tasks, [PolicySpec("predictor", "predictor")], rounds=1,
                                   budget=0, seeds=1, predictor_params=g)["predictor"] for g in PREDICTOR_GRID}
    params = json.loads(max(zero, key=zero.get))
    weights, l2s, cv = {}, {}, {}
    warm = [n for n in WARM if n.endswith("@predictor")]
    for b in budgets:
        w_specs = [PolicySpec(f"predictor:online_weight={w}", "predictor", params={"online_weight": w})
                   for w in ONLINE_WEIGHTS]
        l2_specs = {n: [PolicySpec(f"{n}:l2={v}", n, params={"l2": v}) for v in WARM_L2] for n in warm}
        scores = task_cv(table, train_tasks, w_specs + [s for v in l2_specs.values() for s in v], rounds=rounds,
                         budget=b, seeds=seeds, predictor_params=params)
        cv[b] = scores
        weights[b] = ONLINE_WEIGHTS[int(np.argmax([scores[s.text] for s in w_specs]))]
        l2s[b] = {n: WARM_L2[int(np.argmax([scores[s.text] for s in v]))] for n, v in l2_specs.items()}
    return {"params": params, "online_weight": weights, "warm_l2": l2s, "cv_zero": zero, "cv_budget": cv}


def splits_of(tasks: list[str], k: int) -> list[list[str]]:
    """k held-out sets that together hold out every task exactly once."""
    return [tasks[i::k] for i in range(k)]


def pooled(sims: list, label: str, budget: int, alpha: float = 0.05) -> dict:
    """One policy over all splits: per seed, the final (and online) scores pooled over every held-out pair (each
    task is held out once), the same for the oracle and the best fixed operator of each split; then the mean and a
    Student-t interval over seeds."""
    from scipy import stats

    n_seeds = len(sims[0].seeds)
    w = np.array([len(s.pool) for s in sims], dtype=float)
    final = np.array([[s.runs[label][i].final_reward for s in sims] for i in range(n_seeds)]) @ w / w.sum()
    orf = np.array([s.oracle_final for s in sims]) @ w / w.sum()
    fxf = np.array([s.fixed_final for s in sims]) @ w / w.sum()
    online = np.array([[s.runs[label][i].reward.mean() for s in sims] for i in range(n_seeds)]).mean(1)
    on_or = np.array([[s.runs[label][i].oracle.mean() for s in sims] for i in range(n_seeds)]).mean(1)
    on_fx = np.array([[s.runs[label][i].fixed.mean() for s in sims] for i in range(n_seeds)]).mean(1)

    def summ(name, v):
        m = float(np.mean(v))
        if len(v) < 2:
            return {name: m, f"{name}_ci_low": None, f"{name}_ci_high": None}
        half = float(stats.t.ppf(1 - alpha / 2, len(v) - 1) * np.std(v, ddof=1) / np.sqrt(len(v)))
        return {name: m, f"{name}_ci_low": m - half, f"{name}_ci_high": m + half}

    row = {"policy": label, "budget": budget, "seeds": n_seeds, "splits": len(sims)}
    row.update(summ("final_score", final))
    row.update(summ("final_gap_closed", (final - fxf) / (orf - fxf)))
    row.update(summ("mean_score", online))
    row.update(summ("gap_closed", (online - on_fx) / (on_or - on_fx)))
    row["per_split_final_gap_closed"] = [
        float(np.mean([(s.runs[label][i].final_reward - s.fixed_final) / (s.oracle_final - s.fixed_final)
                       for i in range(n_seeds)])) for s in sims]
    return row


def diagnostics(df, feats, names, tasks, holdouts, split_params) -> dict:
    """What limits the predictor: the same zero-evaluation predictor (each split's chosen ``split_params``) on
    each feature family alone and on all but one, and its in-sample ceiling (fitted on every task, held-out ones
    included, then scored on them); the same two headline numbers for the linear model."""
    from simmerge_bandit import simulate as sim_mod
    from simmerge_bandit.policies import make_policy
    from simmerge_bandit.replay import parse_policy
    from simmerge_bandit.signals.schema import FEATURES_BY_KIND

    def gap_for(cols, in_sample=False, linear=False):
        sub = {k: v[cols] for k, v in feats.items()}
        table = sim_mod.table_from_frame(df, source="diagnostics", features=sub)
        num = den = 0.0
        for hold, chosen in zip(holdouts, split_params):
            params = {"model": "linear"} if linear else chosen
            pool = np.flatnonzero(np.isin(table.tasks, hold))
            train = np.flatnonzero(~np.isin(table.tasks, hold))
            K = len(table.operators)
            best = int(np.argmax(table.R[train].mean(0)))
            oracle, fixed = table.R[pool].max(1).mean(), table.R[pool, best].mean()
            if in_sample:
                X = table.X
                X = (X - X.mean(0)) / np.where(X.std(0) > 0, X.std(0), 1.0)
                rows = np.arange(len(table.contexts))
                cs, ks = np.repeat(rows, K), np.tile(np.arange(K), len(rows))
                p = make_policy("predictor", **params).fit(X[cs], table.Z[ks], [table.operators[k] for k in ks],
                                                 table.R[cs, ks])
                score = np.mean([table.R[c, int(np.argmax(p.predict(np.repeat(X[c:c + 1], K, 0), table.Z)))]
                                 for c in pool])
            else:
                s = sim_mod.simulate(table, [parse_policy("predictor")], rounds=1, budget=0, seeds=1,
                                     holdout_tasks=hold, predictor_params=params)
                score = s.runs["predictor"][0].final_reward
            num += len(pool) * (score - fixed)
            den += len(pool) * (oracle - fixed)
        return float(num / den)

    idx = {n: i for i, n in enumerate(names)}
    fam = {k: [idx[n] for n in FEATURES_BY_KIND[k]] for k in FAMILIES}
    every = list(range(len(names)))
    out = {"all_features": gap_for(every), "in_sample_ceiling_all_features": gap_for(every, in_sample=True),
           "linear_all_features": gap_for(every, linear=True),
           "linear_in_sample_ceiling_all_features": gap_for(every, in_sample=True, linear=True)}
    for k in FAMILIES:
        out[f"only_{k}"] = gap_for(fam[k])
        out[f"without_{k}"] = gap_for([i for f in FAMILIES if f != k for i in fam[f]])
    return out


def main() -> None:  # noqa: C901
    ap = argparse.ArgumentParser()
    ap.add_argument("--table", default=str(RESULTS / "zoo_bench_table.parquet"))
    ap.add_argument("--zoo", default=None, help="the bench zoo directory (built, cached, if missing)")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=100)
    ap.add_argument("--budgets", type=int, nargs="+", default=[10, 25, 50])
    ap.add_argument("--splits", type=int, default=3, help="task splits; each task is held out in exactly one")
    ap.add_argument("--pretrain-rows", type=int, default=1500,
                    help="training rows shown one by one to each cold bandit (the predictor is fitted on all, and "
                         "NAME@predictor starts from it)")
    ap.add_argument("--home", default=None, help="state home to keep signatures in (default: a fresh temp dir)")
    ap.add_argument("--out", default=str(RESULTS / "decision.json"))
    ap.add_argument("--plot", default=str(RESULTS / "decision.png"))
    args = ap.parse_args()

    import pandas as pd

    from simmerge_bandit import simulate as sim_mod
    from simmerge_bandit.demo import cache_dir
    from simmerge_bandit.replay import parse_policy
    from simmerge_bandit.signals import FEATURE_NAMES
    from simmerge_bandit.zoo import build_zoo

    t0 = time.time()
    load_before = os.getloadavg()
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
    holdouts = splits_of(tasks, args.splits)
    print(f"{len(table.contexts)} (task, pair) contexts, {len(table.operators)} operators, tasks {tasks}, "
          f"splits {holdouts}; features in {t_feat:.0f}s", flush=True)

    def factory(spec, seed):
        if spec.name == "mabwiser-linucb":
            return MabwiserLinUCB(seed=seed)
        return sim_mod.make_learned_policy(spec, seed=seed)

    choices = []
    for hold in holdouts:
        choices.append(choose_by_task_cv(table, [t for t in tasks if t not in hold], args.budgets, args.rounds,
                                         args.seeds))
        print(f"held out {hold}: chose {choices[-1]['params']}, online_weight {choices[-1]['online_weight']}, "
              f"warm l2 {choices[-1]['warm_l2']} ({time.time() - t0:.0f}s)", flush=True)

    def specs(names, choice, budget):
        def one(n):
            if n == "mabwiser-linucb":
                return sim_mod.PolicySpec(n, n)
            if n == PREDICTOR_CV:
                return sim_mod.PolicySpec(n, "predictor", params={"online_weight": choice["online_weight"][budget]})
            if n.endswith("@predictor") and budget in choice["warm_l2"]:
                return sim_mod.PolicySpec(n, n, params={"l2": choice["warm_l2"][budget][n]})
            return parse_policy(n)
        return [one(n) for n in names]

    def run(names, budget, **kw):
        return [sim_mod.simulate(table, specs(names, choice, budget), budget=budget, rounds=args.rounds,
                                 seeds=args.seeds, holdout_tasks=hold, policy_factory=factory,
                                 pretrain_rows=args.pretrain_rows, predictor_params=choice["params"], **kw)
                for hold, choice in zip(holdouts, choices)]

    results, per_split = [], []
    zero = run(ZERO, 0)
    results += [dict(pooled(zero, n, 0), setting="zero evaluations") for n in ZERO]
    per_split += [s.summary() for s in zero]
    for b in args.budgets:
        sims = run(BANDITS + WARM, b)
        results += [dict(pooled(sims, n, b), setting=f"budget {b}") for n in BANDITS + WARM]
        print(f"budget {b}: done ({time.time() - t0:.0f}s)", flush=True)
    # An operator that joins half-way (on the first split): how soon is it chosen where it is the best?
    late_op = max(table.operators, key=lambda o: float(np.mean(table.R[:, table.operators.index(o)] ==
                                                              table.R.max(axis=1))))
    late_names = ("linucb-hybrid", "linucb", "linucb-hybrid@predictor")
    late = sim_mod.simulate(table, specs(late_names, choices[0], None), budget=args.rounds, rounds=args.rounds,
                            seeds=args.seeds, holdout_tasks=holdouts[0], policy_factory=factory,
                            pretrain_rows=args.pretrain_rows, late_operators={late_op: args.rounds // 2},
                            predictor_params=choices[0]["params"])
    late_rows = [dict(r, setting=f"late operator {late_op} (split 1)") for r in late.results()]
    diag = diagnostics(df, feats, list(FEATURE_NAMES), tasks, holdouts, [c["params"] for c in choices])

    orf = sum(len(s.pool) * s.oracle_final for s in zero) / sum(len(s.pool) for s in zero)
    fxf = sum(len(s.pool) * s.fixed_final for s in zero) / sum(len(s.pool) for s in zero)
    out = {"benchmark": "decision", "table": args.table, "pretrain_rows": args.pretrain_rows,
           "contexts": len(table.contexts), "operators": table.operators, "tasks": tasks, "holdout_splits": holdouts,
           "rounds": args.rounds, "seeds": args.seeds, "oracle_final_score": orf, "fixed_final_score": fxf,
           "best_fixed_per_split": [s.best_fixed for s in zero],
           "choices_by_training_task_cv": choices, "results": results, "late_operator": late_op,
           "late": late_rows, "diagnostics_predictor_gap_closed": diag, "splits": per_split,
           "seconds": time.time() - t0,
           "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "load_before": load_before,
                       "load_after": os.getloadavg()}}
    Path(args.out).write_text(json.dumps(out, indent=2, default=float))
    try:
        sim_mod.plot(late, args.plot)
    except Exception as e:  # the plot is a convenience; the JSON is the result
        print("plot skipped:", e)
    print(f"pooled over {len(holdouts)} splits: oracle {orf:.4f}  best fixed {fxf:.4f} "
          f"({', '.join(s.best_fixed for s in zero)})")
    for r in results:
        print(f"{r['setting']:18s} {r['policy']:26s} final {_f(r['final_score'])} gap closed "
              f"{_f(r['final_gap_closed'])} [{_f(r.get('final_gap_closed_ci_low'))}, "
              f"{_f(r.get('final_gap_closed_ci_high'))}]  per split "
              f"{' '.join(_f(v) for v in r['per_split_final_gap_closed'])}  online gap {_f(r['gap_closed'])}")
    for r in late_rows:
        print(r["setting"], r["policy"], r.get("late_operators"))
    print("predictor diagnostics (share of the gap closed, pooled):", json.dumps(diag, indent=1))


def _f(v) -> str:
    return "  n/a " if v is None else f"{v:+.3f}"


if __name__ == "__main__":
    main()
