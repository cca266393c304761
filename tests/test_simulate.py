"""Full-information simulation on a small synthetic merge table, and the ``simulate`` command."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from simmerge_bandit import simulate as sm
from simmerge_bandit.cli import cli
from simmerge_bandit.errors import InvalidInput


def full_table(seed=0, tasks=4, pairs=8, late=False) -> pd.DataFrame:
    """linear wins when f1 > 0, ties when f1 < 0, slerp is a mediocre constant; dare (late) beats all."""
    rng = np.random.default_rng(seed)
    rows = []
    for t in range(tasks):
        for p in range(pairs):
            f1, f2 = rng.normal(), rng.normal()
            scores = {"linear": 0.5 + 0.3 * f1, "ties": 0.5 - 0.3 * f1, "slerp": 0.45}
            if late:
                scores["dare"] = 0.55 + 0.3 * abs(f1)
            for op, s in scores.items():
                rows.append({"task": f"t{t}", "model_a": f"m{p}", "model_b": f"m{p + 1}", "operator": op,
                             "score": 0.8 * s, "normalized_score": s, "f1": f1, "f2": f2,
                             "seconds": float(rng.random())})
    return pd.DataFrame(rows)


@pytest.fixture
def table_path(tmp_path):
    path = tmp_path / "table.parquet"
    full_table().to_parquet(path)
    return path


def test_load_table_finds_pair_features_and_leaves_out_outcomes(table_path):
    tab = sm.load_table(table_path)
    assert tab.operators == ["linear", "slerp", "ties"]
    assert len(tab.contexts) == 32
    assert tab.R.shape == (32, 3)
    assert tab.feature_names == ["f1", "f2"]               # not score, normalized_score nor seconds
    assert any("seconds" in n for n in tab.notes)
    assert tab.Z.tolist() == np.eye(3).tolist()
    df = full_table()
    first = df[(df.task == "t0") & (df.model_a == "m0")]
    assert tab.R[0].tolist() == [first.set_index("operator").normalized_score[o] for o in tab.operators]


def test_operator_descriptors_and_explicit_features():
    df = full_table()
    df["op_density"] = df.operator.map({"linear": 1.0, "ties": 0.5, "slerp": 0.0})
    tab = sm.table_from_frame(df, feature_columns=["f1"])
    assert tab.operator_feature_names == ["op_density"]
    assert tab.Z.ravel().tolist() == [1.0, 0.0, 0.5]
    assert tab.feature_names == ["f1"]
    with pytest.raises(InvalidInput, match="differs between operators of one pair"):
        sm.table_from_frame(df, feature_columns=["seconds"])
    ext = sm.table_from_frame(df, features=lambda task, a, b: [1.0, float(a[1:])])
    assert ext.X.shape == (32, 2)


def test_direct_policies_are_exact(table_path):
    tab = sm.load_table(table_path)
    sim = sm.simulate(tab, ["fixed:linear", "fixed:ties", "fixed:slerp", "uniform"], rounds=60, seeds=3)
    rows = {r["policy"]: r for r in sim.results()}
    best = sim.best_fixed
    assert best == tab.operators[int(np.argmax(tab.R.mean(axis=0)))]
    assert rows[f"fixed:{best}"]["gap_closed"] == pytest.approx(0.0, abs=1e-12)
    assert rows[f"fixed:{best}"]["final_gap_closed"] == pytest.approx(0.0, abs=1e-12)
    for op in tab.operators:
        k = tab.operators.index(op)
        assert rows[f"fixed:{op}"]["final_score"] == pytest.approx(tab.R[:, k].mean())
        for run in sim.runs[f"fixed:{op}"]:
            assert np.all(run.chosen == k)
            assert np.all(run.oracle >= run.reward)
            assert run.reward.mean() + (run.oracle - run.reward).mean() == pytest.approx(run.oracle.mean())
    assert rows["uniform"]["final_score"] == pytest.approx(tab.R.mean())
    # the same stream for every policy: per round, uniform is the mean of the fixed operators
    fixed_mean = np.mean([sim.runs[f"fixed:{op}"][0].reward for op in tab.operators], axis=0)
    assert np.allclose(sim.runs["uniform"][0].reward, fixed_mean)
    u = rows["uniform"]
    assert u["mean_score_ci_low"] <= u["mean_score"] <= u["mean_score_ci_high"]


def test_a_learning_policy_closes_most_of_the_gap_and_runs_are_reproducible(table_path):
    tab = sm.load_table(table_path)
    sim = sm.simulate(tab, ["linucb:alpha=0.3", "uniform"], rounds=120, seeds=3)
    rows = {r["policy"]: r for r in sim.results()}
    assert rows["linucb:alpha=0.3"]["final_gap_closed"] > 0.8
    assert rows["linucb:alpha=0.3"]["gap_closed"] > 0.5
    assert rows["uniform"]["gap_closed"] < 0.2
    again = sm.simulate(tab, ["linucb:alpha=0.3", "uniform"], rounds=120, seeds=3)
    assert again.results() == sim.results()


def test_budget_limits_learning(table_path):
    tab = sm.load_table(table_path)
    sim = sm.simulate(tab, ["linucb:alpha=0.3"], rounds=80, budget=0, seeds=2)
    # without a single evaluation and without training tasks it knows nothing
    pol_rows = sim.results()[0]
    assert pol_rows["final_gap_closed"] < 0.5
    learned = sm.simulate(tab, ["linucb:alpha=0.3"], rounds=80, budget=40, seeds=2).results()[0]
    assert learned["final_gap_closed"] > pol_rows["final_gap_closed"] + 0.3


def test_holdout_tasks_pretrain_and_pick_the_fixed_operator_on_training_tasks(table_path):
    tab = sm.load_table(table_path)
    sim = sm.simulate(tab, ["linucb:alpha=0.3", "predictor"], rounds=40, budget=0, seeds=2, holdout_tasks=["t3"])
    assert set(tab.tasks[sim.pool]) == {"t3"}
    assert sim.best_fixed == tab.operators[int(np.argmax(tab.R[tab.tasks != "t3"].mean(axis=0)))]
    rows = {r["policy"]: r for r in sim.results()}
    # zero evaluations on t3: what the training tasks taught carries over
    assert rows["linucb:alpha=0.3"]["final_gap_closed"] > 0.8
    assert rows["predictor"]["final_gap_closed"] > 0.8
    cold = sm.simulate(tab, ["linucb:alpha=0.3"], rounds=40, budget=0, seeds=2, holdout_tasks=["t3"],
                       pretrain=False).results()[0]
    assert cold["final_gap_closed"] < 0.5


def test_final_choice_is_greedy_on_the_prediction_not_the_exploration_bonus(table_path):
    """After its budget a policy is scored on what it would recommend: the best predicted mean. A huge UCB bonus
    makes LinUCB's own choice chase its least-tried arm, but must not change the final recommendation."""
    tab = sm.load_table(table_path)
    calm = sm.simulate(tab, ["linucb:alpha=0.3"], rounds=120, seeds=2).results()[0]
    wild = sm.simulate(tab, ["linucb:alpha=1000"], rounds=120, seeds=2).results()[0]
    assert wild["gap_closed"] < 0.3                     # the online choices explore
    assert wild["final_gap_closed"] > 0.8               # the recommendation exploits what was learned
    assert wild["final_gap_closed"] == pytest.approx(calm["final_gap_closed"], abs=0.1)


def test_warm_start_from_the_predictor_fitted_on_training_tasks(table_path):
    tab = sm.load_table(table_path)
    kw = dict(rounds=40, budget=0, seeds=2, holdout_tasks=["t3"])
    rows = {r["policy"]: r for r in sm.simulate(tab, ["predictor", "linucb@predictor"], **kw).results()}
    # no evaluation yet: a warm-started bandit recommends exactly what the predictor does
    assert rows["linucb@predictor"]["final_score"] == pytest.approx(rows["predictor"]["final_score"])
    assert rows["linucb@predictor"]["final_gap_closed"] > 0.8
    learned = sm.simulate(tab, ["linucb@predictor:alpha=0.3"], **{**kw, "budget": 40}).results()[0]
    assert learned["final_gap_closed"] > 0.8
    with pytest.raises(InvalidInput, match="holdout"):
        sm.simulate(tab, ["linucb@predictor"], rounds=10, seeds=1)


def test_late_operator_is_not_offered_before_it_arrives_and_is_then_found():
    tab = sm.table_from_frame(full_table(late=True))
    dare = tab.operators.index("dare")
    sim = sm.simulate(tab, ["linucb-hybrid", "fixed:linear"], rounds=120, seeds=2,
                      late_operators={"dare": 40})
    assert sim.best_fixed != "dare"
    # hybrid LinUCB is the policy meant to pick up new operators (a disjoint arm starts from nothing)
    for run in sim.runs["linucb-hybrid"]:
        assert not np.any(run.chosen[:40] == dare)
        # before dare arrives the oracle is the best of the others; after, dare is always best
        others = [k for k in range(len(tab.operators)) if k != dare]
        assert np.allclose(run.oracle[:40], tab.R[run.contexts[:40]][:, others].max(axis=1))
        assert np.allclose(run.oracle[40:], tab.R[run.contexts[40:], dare])
    row = {r["policy"]: r for r in sim.results()}["linucb-hybrid"]
    info = row["late_operators"]["dare"]
    assert all(v is not None and 0 <= v < 80 for v in info["rounds_to_first_best_choice"])
    assert info["chosen_when_best"] > 0.3
    fixed = {r["policy"]: r for r in sim.results()}["fixed:linear"]["late_operators"]["dare"]
    assert fixed["rounds_to_first_best_choice"] == [None, None] and fixed["chosen_when_best"] == 0.0


@pytest.mark.parametrize("mutate, kwargs, message", [
    (lambda df: df.drop(columns=["normalized_score"]), {}, "has no column 'normalized_score'"),
    (lambda df: df.iloc[1:], {}, "is not complete: no row for operator linear on task t0, pair (m0, m1)"),
    (lambda df: pd.concat([df, df.iloc[:1]]), {}, "row 97, column 'operator': a second row for linear"),
    (lambda df: df.assign(normalized_score=df.normalized_score.where(df.index != 5)), {},
     "row 6, column 'normalized_score': value is missing"),
    (lambda df: df, {"holdout_tasks": ["nope"]}, "holdout task 'nope' is not in the table"),
    (lambda df: df, {"holdout_tasks": ["t0", "t1", "t2", "t3"]}, "every task is held out"),
    (lambda df: df, {"budget": 11}, "budget must be between 0 and rounds (10)"),
    (lambda df: df, {"late_operators": {"nope": 3}}, "late operator 'nope' is not in the table"),
    (lambda df: df, {"policies": ["fixed:nope"]}, "operator nope is not in the table"),
    (lambda df: df, {"policies": ["nope"]}, "unknown policy 'nope'"),
    (lambda df: df.iloc[0:0], {}, "is empty"),
])
def test_bad_tables_and_arguments_are_refused(mutate, kwargs, message):
    df = mutate(full_table()).reset_index(drop=True)
    kw = {"policies": ["uniform"], "rounds": 10, "seeds": 1, **kwargs}
    with pytest.raises(InvalidInput) as e:
        sm.simulate(sm.table_from_frame(df), kw.pop("policies"), **kw)
    assert message in str(e.value)


def test_cli_simulate(tmp_path, table_path):
    runner = CliRunner()
    png = tmp_path / "regret.png"
    res = runner.invoke(cli, ["simulate", str(table_path), "--policy", "linucb", "--policy", "fixed:slerp",
                              "--rounds", "30", "--budget", "20", "--seeds", "2", "--holdout-tasks", "t2,t3",
                              "--json", "--plot", str(png)], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    assert out["summary"]["pool"] == 16 and out["summary"]["budget"] == 20
    pols = [r["policy"] for r in out["results"]]
    assert pols == ["linucb", "fixed:slerp"]
    for r in out["results"]:
        assert {"mean_score", "mean_score_ci_low", "mean_score_ci_high", "regret", "gap_closed",
                "final_score", "seeds"} <= set(r)
    assert png.read_bytes()[:4] == b"\x89PNG"

    res = runner.invoke(cli, ["simulate", str(table_path), "--policy", "uniform", "--rounds", "10",
                              "--seeds", "2", "--late-operator", "ties@5"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert "best fixed operator" in res.output and "gap closed" in res.output and "uniform" in res.output

    res = runner.invoke(cli, ["simulate", str(table_path), "--policy", "uniform", "--late-operator", "ties"],
                        catch_exceptions=False)
    assert res.exit_code == 2 and "OP@ROUND" in res.output
    res = runner.invoke(cli, ["simulate", str(table_path), "--policy", "uniform", "--rounds", "5",
                              "--budget", "9"], catch_exceptions=False)
    assert res.exit_code == 1
    assert res.output.strip().splitlines() == ["Error: budget must be between 0 and rounds (5), got 9"]


def test_a_zoo_shaped_table():
    """The zoo's table: 3-way rows, failed merges, method/params, source scores that are not pair features."""
    from simmerge_bandit.engine import operator_descriptor
    from simmerge_bandit.zoo import TABLE_COLUMNS

    ops = {"linear": ("linear", {"weight": 0.5}), "ties": ("ties", {"density": 0.5}),
           "slerp": ("slerp", {"t": 0.5})}
    df = full_table(tasks=2, pairs=4).drop(columns=["seconds"])
    df["method"] = df.operator.map(lambda o: ops[o][0])
    df["params"] = df.operator.map(lambda o: json.dumps(ops[o][1]))
    df["model_c"] = None
    df["score_a"], df["score_c"], df["status"] = 0.6, np.nan, "ok"
    failed = df.index[(df.task == "t1") & (df.model_a == "m2") & (df.operator == "ties")]
    df.loc[failed, ["status", "normalized_score", "score"]] = ["failed", np.nan, np.nan]
    triple = df.iloc[:3].assign(model_c="m7", normalized_score=9.0)
    df = pd.concat([df, triple], ignore_index=True)
    for c in TABLE_COLUMNS:
        if c not in df:
            df[c] = None
    tab = sm.table_from_frame(df)
    assert len(tab.contexts) == 8                          # the triple rows are not pairs
    assert np.nanmax(tab.R) < 9.0
    c = tab.contexts.index(("t1", "m2", "m3"))
    assert tab.R[c, tab.operators.index("ties")] == 0.0    # a failed merge earns nothing
    assert tab.feature_names == ["f1", "f2"]               # not score_a, score_c, ...
    assert np.array_equal(tab.Z[tab.operators.index("ties")],
                          operator_descriptor({"method": "ties", "params": {"density": 0.5}}))
    assert any("3-way" in n for n in tab.notes) and any("failed" in n for n in tab.notes)
    df.loc[0, "f2"] = np.nan
    df.loc[1:2, "f2"] = np.nan                             # f2 of the first pair, on all its rows
    patched = sm.table_from_frame(df)
    assert patched.X[0, 1] == 0.0 and any("read as 0" in n for n in patched.notes)


def abs_rule_table(tasks=4, pairs=40, seed=0) -> pd.DataFrame:
    """linear wins when |f1| is large, ties when it is small: no linear (features x operator) model can say so."""
    rng = np.random.default_rng(seed)
    rows = []
    for t in range(tasks):
        for p in range(pairs):
            f1, f2 = rng.normal(), rng.normal()
            edge = abs(f1) - 0.7
            for op, s in {"linear": 0.5 + 0.3 * edge, "ties": 0.5 - 0.3 * edge, "slerp": 0.45}.items():
                rows.append({"task": f"t{t}", "model_a": f"m{p}", "model_b": f"m{p + 1}", "operator": op,
                             "normalized_score": s, "f1": f1, "f2": f2})
    return pd.DataFrame(rows)


def test_predictor_params_build_the_predictor_and_the_warm_start_prior():
    tab = sm.table_from_frame(abs_rule_table())
    kw = dict(rounds=20, budget=0, seeds=1, holdout_tasks=["t3"])
    runs = {}
    for model in ("linear", "mlp"):
        sim = sm.simulate(tab, ["predictor", "linucb@predictor", "predictor:model=linear"],
                          predictor_params={"model": model, "hidden": 16}, **kw)
        runs[model] = {r["policy"]: r["final_gap_closed"] for r in sim.results()}
    for model, rows in runs.items():  # with no evaluation, the warm start recommends what its prior does
        assert rows["linucb@predictor"] == pytest.approx(rows["predictor"]), model
    assert runs["mlp"]["predictor"] > 0.8 > runs["linear"]["predictor"]
    # a spec's own parameters win over predictor_params
    assert runs["mlp"]["predictor:model=linear"] == pytest.approx(runs["linear"]["predictor"])


def target_table() -> pd.DataFrame:
    """A, C tagged with t1, B with t2. Per (pair, task) normalized scores of operators x and y:

    (A,B) t1: x .8 y .4, t2: x .2 y .5  -> target {t1, t2}: x .50 y .45
    (A,C) t1: x .3 y .9                  -> target {t1}:     x .30 y .90
    (B,C) t1: x .6 y .6, t2: x .6 y .2  -> target {t1, t2}: x .60 y .40
    """
    scores = {("A", "B", "t1"): (0.8, 0.4), ("A", "B", "t2"): (0.2, 0.5), ("A", "C", "t1"): (0.3, 0.9),
              ("B", "C", "t1"): (0.6, 0.6), ("B", "C", "t2"): (0.6, 0.2)}
    known = {("A", "t1"): 0.7, ("A", "t2"): 0.3, ("B", "t1"): 0.2, ("B", "t2"): 0.8, ("C", "t1"): 0.6, ("C", "t2"): 0.1}
    feature = {("A", "B", "t1"): 1.0, ("A", "B", "t2"): 3.0, ("A", "C", "t1"): 2.0, ("B", "C", "t1"): 0.5,
               ("B", "C", "t2"): np.nan}
    tags = {"A": ["t1"], "B": ["t2"], "C": ["t1"]}
    rows = []
    for (a, b, t), vals in scores.items():
        for op, v in zip("xy", vals):
            rows.append({"task": t, "model_a": a, "model_b": b, "operator": op, "normalized_score": v,
                         "score": v / 2, "score_a": known[(a, t)], "score_b": known[(b, t)],
                         "tasks_a": json.dumps(tags[a]), "tasks_b": json.dumps(tags[b]),
                         "f": feature[(a, b, t)]})
    return pd.DataFrame(rows)


def test_target_objective_cases_are_pairs_worth_the_aggregate_of_their_tasks():
    tab = sm.table_from_frame(target_table(), objective="target")
    assert tab.objective == "target" and tab.engine_context
    assert tab.contexts == [("t1=0.5,t2=0.5", "A", "B"), ("t1", "A", "C"), ("t1=0.5,t2=0.5", "B", "C")]
    assert tab.operators == ["x", "y"]
    assert np.allclose(tab.R, [[0.50, 0.45], [0.30, 0.90], [0.60, 0.40]])
    # the per-task scores stay beside the aggregate
    assert tab.task_scores(0, 1) == pytest.approx({"t1": 0.4, "t2": 0.5})
    assert np.allclose(tab.W @ tab.task_R, tab.R)
    assert tab.tasks_of(1) == ("t1",) and tab.all_tasks == ["t1", "t2"]

    sim = sm.simulate(tab, ["fixed:x", "fixed:y", "uniform"], rounds=30, seeds=2)
    assert sim.best_fixed == "y"                                   # means: x .4667, y .5833
    assert sim.oracle_final == pytest.approx((0.5 + 0.9 + 0.6) / 3)
    assert sim.fixed_final == pytest.approx((0.45 + 0.9 + 0.4) / 3)
    rows = {r["policy"]: r for r in sim.results()}
    assert rows["fixed:x"]["final_score"] == pytest.approx(1.4 / 3)
    assert rows["uniform"]["final_score"] == pytest.approx((0.95 + 1.2 + 1.0) / 6)

    # hold out t2: the pool is every pair scored on t2; only (A, C) is left to train on, and it prefers y
    held = sm.simulate(tab, ["fixed:x"], rounds=10, seeds=1, holdout_tasks=["t2"])
    assert [tab.contexts[c][1:] for c in held.pool] == [("A", "B"), ("B", "C")]
    assert held.best_fixed == "y"
    assert held.fixed_final == pytest.approx((0.45 + 0.40) / 2)
    assert held.oracle_final == pytest.approx((0.50 + 0.60) / 2)
    assert held.runs["fixed:x"][0].final_chosen.tolist() == [0, 0]


def test_task_objective_on_the_same_table_and_the_engine_context():
    task = sm.table_from_frame(target_table(), objective="task", engine_context=True)
    assert len(task.contexts) == 5
    sim = sm.simulate(task, ["fixed:x"], rounds=10, seeds=1)
    assert sim.oracle_final == pytest.approx((0.8 + 0.5 + 0.9 + 0.6 + 0.6) / 5)
    assert sim.best_fixed == "y"                                   # means: x .50, y .52

    from simmerge_bandit.context import TASK_BUCKETS, task_bucket
    from simmerge_bandit.signals.metadata import METADATA_NAMES

    tab = sm.table_from_frame(target_table(), objective="target")
    assert tab.feature_names[0] == "f" and len(tab.feature_names) == 1 + len(METADATA_NAMES) + TASK_BUCKETS
    x = dict(zip(tab.feature_names, tab.X[0]))                    # (A, B) on {t1: .5, t2: .5}
    assert x["f"] == pytest.approx((np.log1p(1.0) + np.log1p(3.0)) / 2)   # signed log1p, target-weighted
    assert x["tag_share_a"] == pytest.approx(np.log1p(0.5))
    assert x["known_score_a"] == pytest.approx(np.log1p(0.5))     # A's known raw scores .7 and .3
    assert x["known_diff"] == pytest.approx(0.0)                  # (.7 - .2 + .3 - .8) / 2
    assert x[f"task_bucket_{task_bucket('t1')}"] + x[f"task_bucket_{task_bucket('t2')}"] == pytest.approx(1.0)
    assert dict(zip(tab.feature_names, tab.X[2]))["f"] == pytest.approx(np.log1p(0.5))  # t2's is absent


def test_target_objective_needs_tags_and_every_target_task():
    df = target_table().drop(columns=["tasks_a", "tasks_b"])
    with pytest.raises(InvalidInput, match="no default target"):
        sm.table_from_frame(df, objective="target")
    tab = sm.table_from_frame(df, objective="target", tags={"A": ["t1"], "B": ["t2"], "C": ["t1"]})
    assert np.allclose(tab.R[0], [0.50, 0.45])
    short = target_table()
    short = short[~((short.model_a == "B") & (short.task == "t2"))]
    with pytest.raises(InvalidInput, match=r"pair \(B, C\) has no rows on task 't2'"):
        sm.table_from_frame(short, objective="target")
    with pytest.raises(InvalidInput, match="unknown objective"):
        sm.table_from_frame(target_table(), objective="both")


def test_cli_simulate_target_objective(tmp_path):
    path = tmp_path / "t.parquet"
    target_table().to_parquet(path)
    res = CliRunner().invoke(cli, ["simulate", str(path), "--objective", "target", "--policy", "fixed:x",
                                   "--rounds", "10", "--seeds", "1", "--json"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    assert out["summary"]["pairs"] == 3 and out["summary"]["best_fixed"] == "y"
    assert out["results"][0]["final_score"] == pytest.approx(1.4 / 3)


def test_mabwiser_peer_recommends_by_its_mean_estimate_not_its_bonus():
    """Arm a: one reward 1 at x=1, so beta .5, width sqrt(1/2): UCB 1.207. Arm b: four rewards .9 at x=1, so beta
    3.6/5 = .72, width sqrt(1/5): UCB 1.167. Exploring picks a; the recommendation is b."""
    pytest.importorskip("mabwiser")
    import importlib.util
    from pathlib import Path

    from simmerge_bandit.policies import Candidates

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_decision.py"
    spec = importlib.util.spec_from_file_location("bench_decision", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    peer = bench.MabwiserLinUCB(seed=0, floor=0.0)
    peer.update(np.array([1.0]), "a", None, 1.0)
    for _ in range(4):
        peer.update(np.array([1.0]), "b", None, 0.9)
    ranking = peer.rank(Candidates(np.ones((2, 1)), np.array(["a", "b"], dtype=object), np.eye(2)))
    assert ranking.scores == pytest.approx([0.5 + np.sqrt(0.5), 0.72 + np.sqrt(0.2)])
    assert ranking.predicted == pytest.approx([0.5, 0.72])
    assert ranking.choice == 0
    assert sm._greedy(ranking) == 1
