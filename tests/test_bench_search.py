"""benchmarks/bench_search.py: the peers' search spaces, mergekit-evolve's genome and the metric, on fake
evaluators (no merges: fast)."""

import json
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_search as bs  # noqa: E402 (the benchmarks folder is put on the path above)

MANIFEST = {"models": [
    {"name": "base", "base": None, "tasks": ["x", "y", "z"]},
    {"name": "a", "base": "base", "tasks": ["x"]},
    {"name": "b", "base": "base", "tasks": ["y"]},
    {"name": "c", "base": "base", "tasks": ["z"]},
    {"name": "ab", "base": "base", "tasks": ["x", "y"]},
    {"name": "other", "base": "other-base", "tasks": ["x"]},
]}


def test_space_has_the_engines_pairs_ordered_with_a_tagged_model_and_one_base():
    pairs = bs.Space.of(MANIFEST, ["z"]).pairs
    assert sorted(pairs) == sorted([("c", m) for m in ("a", "b", "ab")] + [(m, "c") for m in ("a", "b", "ab")])
    two = bs.Space.of(MANIFEST, ["x", "y"]).pairs
    assert ("c", "a") in two and ("a", "c") in two and ("a", "b") in two
    assert not any("other" in p or "base" in p for p in two)  # another base, or the base itself: never


def test_space_holds_the_engines_group_with_the_methods_that_merge_it():
    import numpy as np
    import optuna

    space = bs.Space.of(MANIFEST, ["x", "y"])
    groups = [p for p in space.pairs if len(p) > 2]
    assert groups == [("a", "b", "ab")]  # tagged with x or y, one base ("other" has its own)
    assert bs.Space.of(MANIFEST, ["z"]).pairs == [p for p in bs.Space.of(MANIFEST, ["z"]).pairs if len(p) == 2]
    rng = np.random.default_rng(1)
    drawn = [c for c in (space.sample(rng) for _ in range(3000)) if len(c.models) == 3]
    assert drawn and {c.method for c in drawn} == set(bs.SPACE_METHODS) - {"slerp", "nuslerp"}
    for c in drawn:
        if c.method in ("task_arithmetic", "ties", "linear"):
            assert c.params["weight"] == pytest.approx(2 / 3, abs=1e-3)  # as the engine merges a group
    c = space.suggest(optuna.trial.FixedTrial({"pair": "a|b|ab", "group_method": "task_arithmetic",
                                               "task_arithmetic.lambda": 0.5}))
    assert (c.models, c.method, c.params["lambda"]) == (("a", "b", "ab"), "task_arithmetic", 0.5)


def test_space_holds_the_groups_subsets_as_the_engine_does():
    manifest = {"models": MANIFEST["models"] + [{"name": "a2", "base": "base", "tasks": ["x"]}]}
    groups = [p for p in bs.Space.of(manifest, ["x", "y"]).pairs if len(p) > 2]
    assert groups == [("a", "b", "ab", "a2"), ("b", "ab", "a2"), ("a", "ab", "a2"), ("a", "b", "a2"),
                      ("a", "b", "ab")]
    c = bs.Space.of(manifest, ["x", "y"]).candidate(("a", "b", "ab", "a2"), "ties", {"density": 0.5})
    assert c.params["weight"] == pytest.approx(0.5)
    # target {x}: a, ab, a2 (three: no subsets)
    assert [p for p in bs.Space.of(manifest, ["x"]).pairs if len(p) > 2] == [("a", "ab", "a2")]
    many = {"models": MANIFEST["models"] + [{"name": f"x{i}", "base": "base", "tasks": ["x"]} for i in range(8)]}
    with pytest.raises(ValueError, match="more than 8 experts"):
        bs.Space.of(many, ["x"])


def test_random_samples_stay_inside_the_families():
    import numpy as np

    space = bs.Space.of(MANIFEST, ["x"])
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(300):
        c = space.sample(rng)
        seen.add(c.method)
        assert c.models in space.pairs
        p = c.params
        for name, (lo, hi) in bs.FAMILIES.get(c.method, {}).items():
            assert lo <= p[name] <= hi
        for name, v in bs.FIXED.get(c.method, {}).items():
            assert p[name] == v
    assert seen == set(bs.SPACE_METHODS)


def test_optuna_encoding_is_categorical_pair_and_method_with_conditional_parameters():
    import optuna

    space = bs.Space.of(MANIFEST, ["x"])
    c = space.suggest(optuna.trial.FixedTrial({"pair": "b|a", "method": "ties", "ties.density": 0.45678}))
    assert (c.models, c.method, c.params["density"]) == (("b", "a"), "ties", 0.457)
    c = space.suggest(optuna.trial.FixedTrial({"pair": "a|ab", "method": "della", "della.density": 0.5}))
    assert c.params["epsilon"] == 0.15  # fixed, not searched
    # a parameterless method asks for nothing more
    trial = optuna.create_study().ask()
    space.suggest(trial)
    method = trial.params["method"]
    assert set(trial.params) == {"pair", "method", *(f"{method}.{p}" for p in bs.FAMILIES.get(method, {}))}


def test_genome_is_mergekit_evolves():
    g = bs.Genome(["a", "b", "c"], "ties")
    assert g.x0() == pytest.approx([1 / 3, 1, 1 / 3, 1, 1 / 3, 1])  # weight 1/n, density 1, model-major
    c = g.decode([-0.5, 1.7, 0.2, -0.3, 0.1, 0.0])
    p = c.params
    assert c.models == ("a", "b", "c") and c.method == "ties"
    assert p["weight"] == [0.5, 0.2, 0.1]                  # |x|
    assert p["density"] == [1.0, 0.3, bs.MIN_DENSITY]      # |x| clipped to [0, 1] (ours must stay above 0)
    assert p["normalize"] is True
    ta = bs.Genome(["a", "b"], "task_arithmetic")
    assert ta.x0() == [0.5, 0.5]
    p = ta.decode([0.5, -2.0]).params
    assert p["weight"] == [0.5, 2.0] and p["normalize"] is False
    with pytest.raises(ValueError):
        ta.decode([0.5])


def test_candidates_round_parameters_and_fill_defaults():
    a = bs.Candidate.of(["a", "b"], "ties", {"density": 0.50004})
    b = bs.Candidate.of(("a", "b"), "ties", {**a.params, "density": 0.5})
    assert a == b and a.merge_seed() == b.merge_seed()
    assert a.params["lambda"] == 1.0 and a.params["normalize"] is True
    assert bs.Candidate.of(["b", "a"], "ties", {"density": 0.5}) != a  # order matters (slerp's base)
    assert bs.Candidate.of(["a", "b"], "ties", {"density": 0.501}) != a


def test_aggregate_uses_one_reference_per_task_and_counts_a_failure_as_zero():
    refs = {"x": 0.9, "y": 0.5}
    assert bs.aggregate({"x": 0.45, "y": 0.5}, {"x": 0.5, "y": 0.5}, refs) == pytest.approx(0.75)
    assert bs.aggregate({"x": 0.45, "y": None}, {"x": 0.5, "y": 0.5}, refs) == pytest.approx(0.25)
    assert bs.aggregate({"x": 2.0}, {"x": 1.0}, refs) == 2.0  # clipped


def test_best_so_far_and_evaluations_to_reach():
    assert bs.best_so_far([0.2, 0.1, 0.5, 0.4]) == [0.2, 0.2, 0.5, 0.5]
    assert bs.evals_to_reach([0.2, 0.2, 0.5, 0.5], 0.5) == 3
    assert bs.evals_to_reach([0.2, 0.2], 0.5) is None


def test_median_counts_a_run_that_never_reached_as_more_than_any_that_did():
    assert bs._median_censored([None, 1, 2]) == 2
    assert bs._median_censored([3, 1]) == 2
    assert bs._median_censored([None, None, 1]) is None and bs._median_censored([]) is None


def test_summary_figures_by_hand():
    per_target = {"t": {"reference": 1.0, "runs": {
        "ours": [[0.5, 0.9, 1.0], [0.95, 0.95, 0.95]],
        "random": [[0.1, 0.2, 0.9], [0.3, 0.3, 0.3]]}}}
    s = bs.summarize(per_target, [1, 3], 3)
    ours, rnd = s["methods"]["ours"], s["methods"]["random"]
    assert ours["ratio"]["1"]["median"] == pytest.approx(0.725)
    assert ours["ratio"]["3"]["median"] == pytest.approx(0.975)
    assert ours["evals_to"]["0.90"]["median_per_target"]["t"] == 1.5   # seeds need 2 and 1
    assert ours["evals_to"]["0.95"]["median_per_target"]["t"] == 2     # 3 and 1
    assert rnd["evals_to"]["0.90"]["median_per_target"]["t"] is None   # 3 and never
    assert rnd["evals_to"]["0.90"]["reached_share"]["t"] == 0.5
    assert ours["curve"]["mean"] == pytest.approx([0.725, 0.925, 0.975])
    sp = s["speedup"]
    assert (sp["best_peer"], sp["peer_evals"], sp["ours_evals"]) == ("random", 3, 1)
    assert sp["level"] == pytest.approx(0.6) and sp["speedup"] == 3.0
    assert s["speedup_per_target"]["t"] == sp and s["speedup_targets_met"] == 1
    g = bs.goals(s)
    assert g["ours_at_10_median"] is None and not g["ours_at_10_met"] and g["speedup_met"]


def test_table_mode_reads_the_results_alone():
    per_target = {"t": {"reference": 1.0, "runs": {
        "ours": [[0.5, 0.9, 1.0], [0.95, 0.95, 0.95]], "optuna": [[0.1, 0.2, 0.5], [0.3, 0.3, 0.5]]}}}
    s = bs.summarize(per_target, [1, 3], 3)
    res = {"summary": s, "goals": bs.goals(s), "budgets": [1, 3], "horizon": 3, "seeds": 2,
           "targets": [{"key": "t", "split": 0, "reference": 1.0, "reference_method": "ours"}],
           "versions": {"optuna": "x", "cma": "y"}, "zoo": {"preset": "p", "seed": 0},
           "evaluations": {"computed": 10, "cached": 2, "failed": 0}, "wall_s": 60,
           "machine": {"cpus": 2, "load_before": [1.0, 1.0, 1.0]}}
    text = bs.markdown_table(res)
    assert "| ours | 0.725 | 0.975 | 1.5 (100% of runs) | 2 (100% of runs) |" in text
    assert "| t | 0 | 1.000 | ours | 0.725 | 0.200 | optuna: 0.500, 3 | 1 | x3.0 |" in text  # B = 1 (no B = 10)
    assert "at B = 10 ours reaches - of the reference (goal >= 0.95: not met)" in text


def _fake_objective(c):
    """A deterministic score of a candidate: best near density/weight 0.8 and t 0.3, different per pair."""
    p = c.params
    v = 0.5 + 0.01 * len("".join(c.models))
    for name, want in (("density", 0.8), ("t", 0.3), ("weight", 0.8)):
        if name in p:
            xs = p[name] if isinstance(p[name], list) else [p[name]]
            v -= sum((x - want) ** 2 for x in xs)
    return v


def test_peers_spend_exactly_their_budget_and_repeat_with_their_seed():
    space = bs.Space.of(MANIFEST, ["x"])
    g = bs.Genome(["a", "ab"], "ties")
    for run in (lambda s: bs.run_random(space, _fake_objective, 12, s),
                lambda s: bs.run_optuna(space, _fake_objective, 12, s),
                lambda s: bs.run_cma(g, _fake_objective, 12, s)):
        r0, r0b, r1 = run(0), run(0), run(1)
        assert len(r0.rewards) == 12 == len(r0.candidates)
        assert r0.rewards == r0b.rewards and r0.rewards != r1.rewards


def test_cma_climbs_from_mergekit_evolves_start():
    g = bs.Genome(["a", "b"], "ties")
    run = bs.run_cma(g, _fake_objective, 120, 0)
    start = _fake_objective(g.decode(g.x0()))  # 0.26 below the optimum
    assert max(run.rewards) > start + 0.2
    best = run.candidates[run.rewards.index(max(run.rewards))].params
    assert all(abs(d - 0.8) < 0.15 for d in best["density"])


def test_targets_hold_out_every_task_once_with_pairs():
    from simmerge_bandit.target import Target

    cases = bs.target_cases(["a", "b", "c", "d", "e", "f"], 3)
    assert [c.key for c in cases] == ["a", "d", "a=0.5,d=0.5", "b", "e", "b=0.5,e=0.5", "c", "f", "c=0.5,f=0.5"]
    assert all(not set(c.weights) & set(c.train_tasks) for c in cases)
    assert all(Target.parse(c.key).weights == pytest.approx(c.weights) for c in cases)
    # one task per split: the pair is the held-out task with the next split's (which that split trains on)
    cases = bs.target_cases(["copy", "shift", "dsum"], 3)
    assert [(c.key, c.train_tasks) for c in cases] == [
        ("copy", ["shift", "dsum"]), ("copy=0.5,shift=0.5", ["shift", "dsum"]),
        ("shift", ["copy", "dsum"]), ("dsum=0.5,shift=0.5", ["copy", "dsum"]),
        ("dsum", ["copy", "shift"]), ("copy=0.5,dsum=0.5", ["copy", "shift"])]
    assert bs.skill_tasks({**MANIFEST, "tasks": [{"name": n} for n in ("w", "z", "x")]}) == ["z", "x"]


def test_committed_page_shows_the_committed_results():
    res_path, page = ROOT / "benchmarks" / "results" / "search.json", ROOT / "docs" / "search.md"
    if not res_path.exists():
        pytest.skip("no committed search results yet")
    table = bs.markdown_table(json.loads(res_path.read_text()))
    assert table in page.read_text(), "docs/search.md: paste `python benchmarks/bench_search.py --table`"
    assert not math.isnan(json.loads(res_path.read_text())["summary"]["methods"]["ours"]["ratio"]["10"]["median"])
