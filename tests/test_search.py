"""Budgeted search: real merges and evaluations of tiny checkpoints, resumed from the log."""

import json
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from simmerge_bandit import pipeline
from simmerge_bandit.catalog import Catalog
from simmerge_bandit.cli import cli
from simmerge_bandit.engine import Engine, EngineConfig
from simmerge_bandit.errors import InvalidInput
from simmerge_bandit.search import describe, run_search, search_id
from simmerge_bandit.store import Store
from simmerge_bandit.target import Target

from conftest import write_jsonl
from test_daemon import call, start_daemon, stop


@pytest.fixture
def home(simmerge_home, tiny_models, tmp_path):
    with Store.open(simmerge_home) as store:
        cat = Catalog(store)
        cat.add_model(tiny_models["base"], name="base")
        cat.add_model(tiny_models["ft_a"], name="ft_a", base="base", tasks=["double"])
        cat.add_model(tiny_models["ft_b"], name="ft_b", base="base", tasks=["triple"])
        cat.add_task("double", write_jsonl(tmp_path / "d.jsonl",
                                           [{"prompt": f"{i}+{i}=", "answer": str(2 * i)} for i in range(6)]))
        cat.add_task("triple", write_jsonl(tmp_path / "t.jsonl",
                                           [{"prompt": f"3*{i}=", "answer": str(3 * i)} for i in range(6)]))
        cat.add_operator("lin", "linear")
        cat.add_operator("slerp", "slerp", {"t": 0.3})
    return simmerge_home


def _counting(limit=3, fail_at=None):
    """The real evaluation (merge on disk, exact match), counting calls; raises Ctrl-C at call ``fail_at``."""
    calls = []

    def evaluate(spec):
        calls.append(spec["decision"])
        if fail_at is not None and len(calls) == fail_at:
            raise KeyboardInterrupt
        return pipeline.run_spec(spec, device="cpu", limit=limit, keep_merge=True)
    return evaluate, calls


def test_search_spends_its_budget_on_distinct_merges_and_keeps_only_the_best(home):
    with Store.open(home) as store:
        eng = Engine(store, EngineConfig(seed=3))
        target = Target.of(["double", "triple"])
        ev, calls = _counting()
        res = run_search(eng, target, 3, policy="linucb", evaluate=ev)
        assert len(res["evaluations"]) == 3 == len(calls)
        tried = [(tuple(e["models"]), e["operator"]) for e in res["evaluations"]]
        assert len(set(tried)) == 3
        for e in res["evaluations"]:
            assert set(e["scores"]) == {"double", "triple"}
            assert 0 <= e["reward"] <= 2 and isinstance(e["params"], dict)
        best = max(res["evaluations"], key=lambda e: e["reward"])
        assert res["best"]["reward"] == best["reward"]
        kept = [p.name for p in (store.artifacts / "searches" / res["id"]).iterdir()]
        assert kept == [res["best"]["id"]] and res["best"]["path"].endswith(res["best"]["id"])
        # every evaluation is a rewarded decision the policy learned from
        assert store.fetchone("SELECT count(*) FROM rewards")[0] == 3
        assert eng.policy("linucb").n_updates == 3


def test_search_resumes_after_an_interrupt_and_with_a_larger_budget(home):
    with Store.open(home) as store:
        eng = Engine(store)
        target = Target.of(["double"])
        ev, calls = _counting(fail_at=2)
        with pytest.raises(KeyboardInterrupt):
            run_search(eng, target, 3, policy="linucb", evaluate=ev)
        sid = search_id(target, "linucb")
        st = describe(eng, sid)
        assert st["state"] == "stopped" and len(st["evaluations"]) == 2
        assert st["evaluations"][1]["reward"] is None          # suggested, never scored
        pending = st["evaluations"][1]["id"]
        ev2, calls2 = _counting()
        res = run_search(eng, target, 3, policy="linucb", evaluate=ev2)
        assert calls2[0] == pending and len(calls2) == 2     # the interrupted step first, then one new
        assert len(res["evaluations"]) == 3 and res["state"] == "done"
        ev3, calls3 = _counting()
        assert len(run_search(eng, target, 3, policy="linucb", evaluate=ev3)["evaluations"]) == 3
        assert calls3 == []                                    # nothing left to spend
        res = run_search(eng, target, 4, policy="linucb", evaluate=ev3)
        assert len(calls3) == 1 and len(res["evaluations"]) == 4


def test_search_stops_when_every_candidate_was_tried(home):
    with Store.open(home) as store:
        eng = Engine(store)
        ev, calls = _counting()
        # 2 ordered pairs x 2 operators: 4 candidates
        res = run_search(eng, Target.of(["double"]), 10, policy="random", evaluate=ev)
        assert len(res["evaluations"]) == 4 == len(calls) and res["state"] == "done"


def test_search_refuses_bad_input(home):
    with Store.open(home) as store:
        eng = Engine(store)
        for bad in (0, -1, 1.5, True):
            with pytest.raises(InvalidInput):
                run_search(eng, Target.of(["double"]), bad)
        assert store.fetchone("SELECT count(*) FROM searches")[0] == 0


def test_cli_search_json_contract(home):
    r = CliRunner().invoke(cli, ["search", "--task", "double", "--task", "triple", "--weight", "double=3",
                                 "--budget", "2", "--limit", "3", "--device", "cpu", "--json"],
                           catch_exceptions=False)
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert "no predictor is fitted" in r.stderr  # the default policy ran without its predictor: said, on stderr
    assert out["target"] == {"tasks": {"double": 0.75, "triple": 0.25}}
    assert len(out["evaluations"]) == 2
    for e in out["evaluations"]:
        assert {"id", "models", "operator", "params", "scores", "reward"} <= set(e)
    best = max(out["evaluations"], key=lambda e: e["reward"])
    assert out["best"]["id"] == best["id"] and out["best"]["path"]
    r = CliRunner().invoke(cli, ["search", "--task", "double", "--budget", "1", "--limit", "3", "--device", "cpu",
                                 "--policy", "gp-ucb", "--json"], catch_exceptions=False)
    assert r.exit_code == 0 and "no predictor" not in r.stderr  # a policy asked for: nothing to say
    for args in (["--budget", "0"], ["--weight", "double=-1", "--budget", "1"]):
        r = CliRunner().invoke(cli, ["search", "--task", "double", *args])
        assert r.exit_code != 0 and "Traceback" not in r.output


def test_daemon_runs_a_search_as_a_job(home):
    proc, info = start_daemon(home, "--eval-limit", "3")
    try:
        body = {"tasks": ["double"], "budget": 2, "policy": "linucb"}
        code, res = call(info, "POST", "/v1/search", body)
        assert code == 200 and res["budget"] == 2
        deadline = time.time() + 120
        while res["state"] == "running" and time.time() < deadline:
            time.sleep(0.5)
            code, res = call(info, "POST", "/v1/search", body)
        assert res["state"] == "done" and len(res["evaluations"]) == 2 and res["best"]["reward"] is not None
        code, jobs = call(info, "GET", "/v1/jobs")
        searches = [j for j in jobs if j["kind"] == "search"]
        assert len(searches) == 1 and searches[0]["spent"] == 2 and searches[0]["state"] == "done"
        assert call(info, "POST", "/v1/search", {"tasks": ["double"], "budget": 0})[0] == 400
        assert call(info, "POST", "/v1/search", {"tasks": ["ghost"], "budget": 1})[0] == 404
    finally:
        assert stop(proc) == 0


def test_search_rewards_share_one_scale_the_best_known_score_in_the_catalog(home):
    """Two merges of different pairs are compared on one scale: each task's score over the best score any catalog
    model has on it (not over the merge's own sources, which would let two weak sources look perfect)."""
    with Store.open(home) as store:
        cat = Catalog(store)
        cat.record_score("ft_a", "double", 0.8)
        cat.record_score("base", "double", 0.2)
        cat.record_score("base", "triple", 0.1)
        cat.record_score("ft_b", "triple", 0.4)
        eng = Engine(store, EngineConfig(seed=0))
        s = eng.suggest(Target.of(["double"]), top=1, policy="random", queue=False)[0]
        plain = pipeline.job_spec(eng, s["id"])
        spec = pipeline.job_spec(eng, s["id"], catalog_reference=True)
        assert "reference" not in plain and spec["reference"] == {"double": pytest.approx(0.8)}
        # a merge scoring 0.3 whose own sources scored 0.2 and 0.3 keeps "all" of them, but 0.3 / 0.8 of the best
        spec["source_scores"] = plain["source_scores"] = {"double": {m["name"]: 0.2 for m in spec["models"]}}
        spec["source_scores"]["double"][spec["models"][0]["name"]] = 0.3
        plain["source_scores"] = json.loads(json.dumps(spec["source_scores"]))

        class Fixed:
            ok, score, reason, details = True, 0.3, None, {}

        import simmerge_bandit.evaluators as evaluators
        real = evaluators.evaluate
        evaluators.evaluate = lambda *a, **k: Fixed()
        try:
            assert pipeline.score_merge(plain, store.home)["reward"] == pytest.approx(1.0)
            assert pipeline.score_merge(spec, store.home)["reward"] == pytest.approx(0.3 / 0.8)
        finally:
            evaluators.evaluate = real


@pytest.fixture
def group_home(home, tiny_models):
    """The search's catalog plus a third fine-tune tagged with a target task: the target has a group."""
    with Store.open(home) as store:
        cat = Catalog(store)
        cat.add_model(tiny_models["ft_sharded"], name="ft_c", base="base", tasks=["double"])
        cat.add_operator("ta", "task_arithmetic", {"lambda": 0.5})
    return home


def test_a_group_is_offered_with_the_operators_that_merge_that_many_models(group_home):
    from simmerge_bandit.context import pair_contexts

    with Store.open(group_home) as store:
        eng = Engine(store)
        target = Target.of(["double", "triple"])
        cs = eng.candidates(target.key)
        assert cs.groups == [("ft_a", "ft_b", "ft_c")]
        rows = [i for i in range(len(cs)) if cs.models_of(i) == ("ft_a", "ft_b", "ft_c")]
        assert [cs.arms[i] for i in rows] == ["lin[weight=0.666667]", "ta[weight=0.666667]"]  # slerp merges two
        # a group's three task vectors weigh what a pair's two do
        assert cs.params(rows[1]) == {**eng.catalog.operator("ta")["params"], "weight": pytest.approx(2 / 3)}
        # a tried group setting is excluded by its scaled parameters, and only it
        from simmerge_bandit.candidates import params_key

        left = cs.without({(("ft_a", "ft_b", "ft_c"), "ta", params_key(cs.params(rows[1])))})
        assert len(left) == len(cs) - 1 and "ta[weight=0.666667]" not in left.arms
        assert len(cs.without({(("ft_a", "ft_b", "ft_c"), "ta", params_key({"lambda": 0.5}))})) == len(cs)
        pair_ta = next(i for i in range(cs.pair_rows) if cs.arms[i] == "ta")
        assert cs.params(pair_ta).get("weight", 1.0) == 1.0
        assert all(len(cs.models_of(i)) == 2 for i in range(cs.pair_rows))
        members = [(a, b) for a in cs.groups[0] for b in cs.groups[0] if a != b]
        want = pair_contexts(store, members, target)[0].mean(axis=0)
        assert cs.X[rows[0]] == pytest.approx(want)
        # a single task's group: the models tagged with it (two here: a pair, no group)
        assert eng.candidates(Target.of(["double"]).key).groups == []
        # a chain starts from a pair (here it cannot grow: (ft_a, ft_c) knows only "double", not a candidate pair)
        for s in eng.suggest(target, top=3, chain=3, policy="linucb"):
            ops = [s["operator"]] if isinstance(s["operator"], str) else s["operator"]
            assert len(ops) == len(s["models"]) - 1


def test_search_merges_the_group_first_then_a_pair_then_near_the_best(group_home):
    with Store.open(group_home) as store:
        eng = Engine(store, EngineConfig(seed=1))
        target = Target.of(["double", "triple"])
        ev, calls = _counting()
        res = run_search(eng, target, 3, policy="linucb", evaluate=ev)
        ev_ = res["evaluations"]
        assert ev_[0]["models"] == ["ft_a", "ft_b", "ft_c"] and ev_[0]["operator"] in ("lin", "ta")
        assert set(ev_[0]["scores"]) == {"double", "triple"} and ev_[0]["reward"] is not None
        assert len(ev_[1]["models"]) == 2
        best = max(ev_[:2], key=lambda e: e["reward"])
        assert ev_[2]["models"] == best["models"]
        tried = [(tuple(e["models"]), e["operator"], json.dumps(e["params"], sort_keys=True)) for e in ev_]
        assert len(set(tried)) == 3  # a group's tried setting (its scaled weight) is excluded like a pair's
        row = store.fetchone("SELECT models FROM decision_log WHERE id = ?", [ev_[0]["id"]])
        assert json.loads(row[0]) == ["ft_a", "ft_b", "ft_c"]
        if ev_[0]["operator"] == "ta":  # the merge used the group's weights
            assert ev_[0]["params"]["weight"] == pytest.approx(2 / 3)


def test_group_sets_hand_worked():
    from simmerge_bandit.candidates import group_sets

    tags = {"a": {"x"}, "a2": {"x"}, "ab": {"x", "y"}, "b": {"y"}, "c": {"z"}}
    # target {x}: the group a, a2, ab (three: no subsets)
    assert group_sets(tags, {"x"}) == [("a", "a2", "ab")]
    # target {x, y}: a, a2, ab, b; any one left out, x and y stay covered (ab knows y without b)
    assert group_sets(tags, {"x", "y"}) == [("a", "a2", "ab", "b"), ("a2", "ab", "b"), ("a", "ab", "b"),
                                             ("a", "a2", "b"), ("a", "a2", "ab")]
    # a subset that loses a task is not offered: without b2, only b knows y
    tags2 = {"a": {"x"}, "a2": {"x"}, "a3": {"x"}, "b": {"y"}}
    assert group_sets(tags2, {"x", "y"}) == [("a", "a2", "a3", "b"), ("a2", "a3", "b"), ("a", "a3", "b"),
                                              ("a", "a2", "b")]
    assert group_sets(tags, {"z"}) == [] and group_sets(tags, {"q"}) == []


@pytest.fixture
def group4_home(group_home, tiny_models):
    """group_home plus a fourth fine-tune tagged with a target task: the group has subsets."""
    with Store.open(group_home) as store:
        Catalog(store).add_model(tiny_models["ft_sharded"], name="ft_d", base="base", tasks=["triple"],
                                 allow_duplicate=True)
    return group_home


def test_a_group_of_four_offers_its_subsets_and_the_search_looks_near_its_best(group4_home):
    from simmerge_bandit.context import pair_contexts

    with Store.open(group4_home) as store:
        eng = Engine(store, EngineConfig(seed=1))
        target = Target.of(["double", "triple"])
        cs = eng.candidates(target.key)
        full = ("ft_a", "ft_b", "ft_c", "ft_d")
        assert cs.groups[0] == full and cs.full_groups == [full]
        assert sorted(cs.groups[1:]) == sorted(tuple(m for m in full if m != d) for d in full)
        sub = ("ft_a", "ft_b", "ft_c")
        rows = [i for i in range(len(cs)) if cs.models_of(i) == sub]
        assert [cs.arms[i] for i in rows] == ["lin[weight=0.666667]", "ta[weight=0.666667]"]
        rows4 = [i for i in range(len(cs)) if cs.models_of(i) == full]
        assert cs.params(rows4[1])["weight"] == pytest.approx(0.5)
        members = [(a, b) for a in sub for b in sub if a != b]
        assert cs.X[rows[0]] == pytest.approx(pair_contexts(store, members, target)[0].mean(axis=0))
        from simmerge_bandit.search import scope

        assert scope(eng, target, 0, None) == {full}
        assert scope(eng, target, 1, None) == set(cs.pairs)
        assert scope(eng, target, 2, {"models": list(full)}) == set(cs.groups)
        assert scope(eng, target, 2, {"models": ["ft_a", "ft_b"]}) == {("ft_a", "ft_b"), sub,
                                                                      ("ft_a", "ft_b", "ft_d")}
        assert scope(eng, target, 3, {"models": list(full)}) is None
        ev, _ = _counting()
        res = run_search(eng, target, 3, policy="linucb", evaluate=ev)
        assert res["evaluations"][0]["models"] == list(full)


def test_group_sets_cap_keeps_the_best_known_models_in_order(monkeypatch):
    from simmerge_bandit import candidates
    from simmerge_bandit.candidates import group_sets

    monkeypatch.setattr(candidates, "MAX_GROUP", 4)
    tags = {m: {"x"} for m in "abcdef"}
    score = {"a": 0.5, "b": 0.9, "c": 0.1, "d": 0.9, "f": 0.7}  # e unknown: below every scored model
    assert group_sets(tags, {"x"}, score)[0] == ("a", "b", "d", "f")
    assert group_sets(tags, {"x"})[0] == ("a", "b", "c", "d")  # nothing known: the first ones added
    assert group_sets(tags, {"x"}, {"e": 0.2})[0] == ("a", "b", "c", "e")  # e scored, ties by order after it


def test_a_group_larger_than_the_cap_is_chosen_by_known_score(group4_home, monkeypatch):
    from simmerge_bandit import candidates

    monkeypatch.setattr(candidates, "MAX_GROUP", 3)
    with Store.open(group4_home) as store:
        cat = Catalog(store)
        # ft_c and ft_d are one checkpoint (one fingerprint): they share their known scores
        for model, (d, t) in {"ft_a": (0.9, 0.2), "ft_b": (0.1, 0.1), "ft_c": (0.5, 0.5)}.items():
            cat.record_score(model, "double", d)
            cat.record_score(model, "triple", t)
        eng = Engine(store)
        target = Target.of(["double", "triple"])
        assert eng.groups(target) == [("ft_a", "ft_c", "ft_d")]  # ft_b's known scores are the lowest
        cat.record_score("ft_b", "triple", 2.0)  # now the best known on triple: (0.1/0.9 + 2.0/2.0) / 2
        assert eng.groups(target) == [("ft_a", "ft_b", "ft_c")]



def _tensors(path) -> dict:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def test_a_group_with_known_scores_is_offered_focused_weights_that_merge_and_rebuild(group_home, tmp_path):
    """Besides its uniform setting, a group whose members have known scores on the target is offered settings
    that weigh each member by exp(focus * (s - max s)); the chosen weights merge per model, are written to the
    mergekit config, and describe the decision again from the log."""
    import numpy as np
    import torch
    import yaml

    from simmerge_bandit.candidates import FOCUS, focused_weights
    from simmerge_bandit.descriptor import current
    from simmerge_bandit.methods import merge_tensors
    from simmerge_bandit.recipe import Recipe

    group = ("ft_a", "ft_b", "ft_c")
    known = {"ft_a": (0.8, 0.2), "ft_b": (0.1, 0.6), "ft_c": (0.4, 0.3)}  # (double, triple)
    with Store.open(group_home) as store:
        cat = Catalog(store)
        for m, (d, t) in known.items():
            cat.record_score(m, "double", d)
            cat.record_score(m, "triple", t)
        eng = Engine(store)
        target = Target.of(["double", "triple"])
        cs = eng.candidates(target.key)
        rows = [i for i in range(len(cs)) if cs.models_of(i) == group]
        # each member's known score over the best member's, per task, averaged as the target weighs them
        s = np.array([(known[m][0] / 0.8 + known[m][1] / 0.6) / 2 for m in group])
        want = ["lin[weight=0.666667]", "ta[weight=0.666667]"]
        for f in FOCUS:
            e = np.exp(f * (s - s.max()))
            ws = [round(float(x), 4) for x in e / e.sum() * 3 * 0.666667]  # the uniform setting's total weight
            assert focused_weights(0.666667, list(s), f) == ws
            text = "/".join(f"{x:g}" for x in ws)
            want += [f"lin[weight={text}]", f"ta[weight={text}]"]
        assert [cs.arms[i] for i in rows] == want
        schema = current()
        ta_rows = [i for i in rows if cs.arms[i].startswith("ta")]
        spread = [cs.Z[i, schema.index["spread:weight"]] for i in ta_rows]
        assert spread[0] == 0 and 0 < spread[1] < spread[2] < 1 - 1 / 3
        mean_weight = cs.Z[ta_rows, schema.index["param:weight"]]
        assert np.allclose(mean_weight, mean_weight[0], atol=1e-4)  # the same total weight, spread otherwise
        # the most focused task-arithmetic setting, suggested and logged, merges with one weight per model
        most = cs.params(ta_rows[-1])["weight"]
        offered = eng.suggest(target, top=len(cs), policy="random", queue=False)
        pick = next(x for x in offered if x["operator"] == "ta" and tuple(x["models"]) == group
                    and x["params"]["weight"] == most)
        spec = pipeline.job_spec(eng, pick["id"])
        assert spec["steps"][0]["params"]["weight"] == most
        out = tmp_path / "merged"
        Recipe.from_json(spec).merge(out, device="cpu", seed=0)
        config = yaml.safe_load((out / "mergekit_config.yml").read_text())
        assert [m["parameters"]["weight"] for m in config["models"]] == pytest.approx(most)
        merged = _tensors(out)
        paths = {m["name"]: m["path"] for m in cat.models()}
        src = {m: _tensors(paths[m]) for m in ("base", *group)}
        for name in [n for n in merged if n.endswith("q_proj.weight")][:1]:
            base, xs = src["base"][name].float(), [src[m][name].float() for m in group]
            hand = base + 0.5 * sum(w * (x - base) for w, x in zip(most, xs))
            assert torch.allclose(merged[name].float(), hand, atol=1e-6)
            assert torch.equal(merged[name], merge_tensors("task_arithmetic", xs, base, {"lambda": 0.5,
                                                                                          "weight": most}))
        # the decision, read back from the log, is described as it was offered
        arm, z = eng.descriptors.arm("ta", pick["params"])
        assert arm == cs.arms[ta_rows[-1]] and np.array_equal(z, cs.Z[ta_rows[-1]])


def test_reweighted_hand_worked():
    from simmerge_bandit.candidates import reweighted

    assert reweighted([1.0, 1.0, 1.0], 2.0, 0) == [1.5, 0.75, 0.75]  # 2,1,1 rescaled to the total 3
    assert reweighted([0.6, 0.3, 0.1], 0.5, 1) == [0.7059, 0.1765, 0.1176]  # 0.6,0.15,0.1 times 1/0.85
    assert sum(reweighted([1.02, 0.46, 0.02], 2.0, 2)) == pytest.approx(1.5, abs=2e-4)


def test_search_moves_one_members_weight_around_its_best_merge(group_home):
    """On every fourth step the search ranks only the best merge's moves: one member's weight doubled or halved,
    the total kept. With a reward that grows with ft_a's share of the weight, the moves find better merges than
    every catalog setting, and each logged move merges with the weights it names."""
    from simmerge_bandit.search import moves

    group = ["ft_a", "ft_b", "ft_c"]
    with Store.open(group_home) as store:
        eng = Engine(store, EngineConfig(seed=1))
        target = Target.of(["double", "triple"])

        # hand-computed moves of the uniform task-arithmetic group (each member at 2/3 of lambda's weight)
        best = {"models": group, "operator": ["ta"], "params": [{"lambda": 0.5, "weight": 0.666667}]}
        got = moves(eng, best)
        assert [m[1]["params"]["weight"] for m in got] == [
            [1.0, 0.5, 0.5], [0.4, 0.8, 0.8], [0.5, 1.0, 0.5], [0.8, 0.4, 0.8], [0.5, 0.5, 1.0], [0.8, 0.8, 0.4]]
        assert all(m[0] == tuple(group) and m[1]["params"]["lambda"] == 0.5 for m in got)
        assert got[0][2] == "ta[weight=1/0.5/0.5]"
        assert moves(eng, {"models": ["ft_a", "ft_b"], "operator": ["slerp"], "params": [{"t": 0.3}]}) == []
        assert moves(eng, None) == []

        def share_of_a(spec):
            names = eng.decision(spec["decision"])["models"]
            w = spec["steps"][0]["params"].get("weight", 1.0)
            ws = w if isinstance(w, list) else [w] * len(names)
            share = ws[0] / sum(ws) if names[0] == "ft_a" and len(ws) == 3 else 0.0
            return {"scores": {"double": share, "triple": share}, "reward": share, "score": share,
                    "source_scores": {}}

        res = run_search(eng, target, 9, policy="linucb", evaluate=share_of_a, keep_best=False)
        ev_ = res["evaluations"]
        at4 = ev_[4]
        assert at4["models"] == group and isinstance(at4["params"]["weight"], list)
        best_before = max(ev_[:4], key=lambda e: e["reward"])
        assert at4["operator"] == best_before["operator"]
        offered = moves(eng, {"models": best_before["models"], "operator": [best_before["operator"]],
                              "params": [best_before["params"]]})
        assert at4["params"]["weight"] in [m[1]["params"]["weight"] for m in offered]
        assert sum(at4["params"]["weight"]) == pytest.approx(3 * best_before["params"]["weight"], abs=5e-4)
        # the catalog's settings give ft_a at most a third of the weight (uniform) or its focus, which needs
        # known scores (none here); the moves pass that
        assert res["best"]["reward"] > 1 / 3 + 0.05
        assert ev_[8]["params"]["weight"][0] / sum(ev_[8]["params"]["weight"]) > 1 / 3
        # each move step took one of the moves the steps before it favoured
        from simmerge_bandit.search import favoured

        internal = [{"models": e["models"], "operator": [e["operator"]], "params": [e["params"]],
                     "reward": e["reward"]} for e in ev_]
        for n in (4, 8):
            before = internal[:n]
            best_n = max(before, key=lambda s: s["reward"])
            picked = favoured([m for m in moves(eng, best_n) if all(m[1]["params"] != s["params"][0] for s in before)],
                              best_n, before, eng)
            assert ev_[n]["params"]["weight"] in [m[1]["params"]["weight"] for m in picked]
        # a logged move is read back with its weights: its job spec merges them
        spec = pipeline.job_spec(eng, at4["id"])
        assert spec["steps"][0]["params"]["weight"] == at4["params"]["weight"]


def test_favoured_moves_follow_momentum_then_leave_one_out(group_home):
    """Which member a move step moves, from the steps already scored (hand-worked): the same move again when the
    best merge was a move; else halve the member whose removal cost least / double the one whose removal cost most;
    every move when nothing tells them apart."""
    from simmerge_bandit.search import favoured, moves

    group = ["ft_a", "ft_b", "ft_c"]
    with Store.open(group_home) as store:
        eng = Engine(store)

        def step(models, reward, weight=None, op="ta"):
            params = {"lambda": 0.5, **({} if weight is None else {"weight": weight})}
            return {"models": models, "operator": [op], "params": [params], "reward": reward}

        def weights_of(mv):
            return [m[1]["params"]["weight"] for m in mv]

        uniform = step(group, 0.8, 0.666667)
        # leave one out: removing ft_a cost 0.01, ft_b 0.3, ft_c 0.2 (mean 0.17): halve ft_a (score 0.16) before
        # doubling ft_b (0.13)
        subsets = [step(["ft_b", "ft_c"], 0.79), step(["ft_a", "ft_c"], 0.5), step(["ft_a", "ft_b"], 0.6, op="lin")]
        mv = moves(eng, uniform)
        assert weights_of(favoured(mv, uniform, [uniform, *subsets], eng)) == [[0.4, 0.8, 0.8]]
        # without ft_a's subset: ft_b 0.3, ft_c 0.2, mean 0.25: doubling ft_b and halving ft_c score 0.05 each
        assert weights_of(favoured(mv, uniform, [uniform, *subsets[1:]], eng)) == [[0.5, 1.0, 0.5], [0.8, 0.8, 0.4]]
        # one subset alone tells nothing; no steps tell nothing
        assert favoured(mv, uniform, [uniform, subsets[1]], eng) == mv
        assert favoured(mv, uniform, [uniform], eng) == mv
        # momentum: the best came from the uniform setting with ft_a doubled; double ft_a again, whatever the
        # subsets say
        moved = step(group, 0.85, [1.0, 0.5, 0.5])
        mv = moves(eng, moved)
        assert weights_of(favoured(mv, moved, [uniform, moved, *subsets], eng)) == [[1.3333, 0.3333, 0.3333]]
        # a step with another setting of the same models is no momentum
        other = step(group, 0.7, 0.666667, op="lin")
        assert favoured(mv, moved, [other, moved], eng) == mv
