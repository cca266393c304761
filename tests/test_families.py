"""Operator families: parameters the engine chooses inside ranges, reported, logged, merged and searched."""

import json

import pytest
import yaml
from click.testing import CliRunner

from simmerge_bandit import pipeline
from simmerge_bandit.catalog import Catalog
from simmerge_bandit.cli import cli
from simmerge_bandit.engine import Engine, EngineConfig
from simmerge_bandit.errors import InvalidInput
from simmerge_bandit.families import DRAWS, check_ranges, draws, parse_range
from simmerge_bandit.search import run_search
from simmerge_bandit.store import Store
from simmerge_bandit.target import Target

from conftest import write_jsonl


@pytest.mark.parametrize("method,params,ranges,msg", [
    ("ties", {}, {"nope": [0.1, 0.2]}, "nope"),
    ("ties", {}, {"density": [0.9, 0.2]}, "min 0.9 > max 0.2"),
    ("ties", {}, {"density": [0.2, float("nan")]}, "not a finite number"),
    ("ties", {}, {"density": [float("-inf"), 0.5]}, "not a finite number"),
    ("ties", {}, {"density": [0.2, 1.5]}, "density"),
    ("ties", {}, {"density": ["a", 0.5]}, "not a number"),
    ("ties", {"density": 0.5}, {"density": [0.2, 0.9]}, "both a value and a range"),
    ("ties", {}, {"normalize": [0, 1]}, "true or false"),
    ("della", {"epsilon": 0.15}, {"density": [0.1, 0.9]}, "epsilon"),
    ("ties", {}, {"density": 0.5}, "\\[min, max\\]"),
])
def test_bad_ranges_are_refused_in_one_line(method, params, ranges, msg):
    with pytest.raises(InvalidInput, match=msg):
        check_ranges(method, params, ranges)


def test_parse_range():
    assert parse_range("density=0.2:0.9") == ("density", 0.2, 0.9)
    for bad in ("density", "density=0.2", "=0.1:0.2", "density=a:0.2", "density=0.1:inf"):
        with pytest.raises(InvalidInput):
            parse_range(bad)


def test_draws_are_deterministic_distinct_and_inside_the_box():
    op = {"name": "fam", "method": "ties", "params": {"density": 1.0, "weight": 1.0, "normalize": True,
                                                        "int8_mask": False},
          "ranges": check_ranges("ties", {}, {"density": [0.2, 0.9], "weight": [0.1, 1.0]})}
    ps = draws(op)
    assert ps == draws(op) and len(ps) == DRAWS
    assert len({(p["density"], p["weight"]) for p in ps}) == DRAWS
    assert all(0.2 <= p["density"] <= 0.9 and 0.1 <= p["weight"] <= 1.0 for p in ps)
    assert all(p["normalize"] is True for p in ps)
    # spread over the box, not bunched in a corner
    assert min(p["density"] for p in ps) < 0.35 and max(p["density"] for p in ps) > 0.75
    other = draws(dict(op, name="fam2"))
    assert other != ps


@pytest.fixture
def home(simmerge_home, tiny_models, tmp_path):
    with Store.open(simmerge_home) as store:
        cat = Catalog(store)
        cat.add_model(tiny_models["base"], name="base")
        cat.add_model(tiny_models["ft_a"], name="ft_a", base="base", tasks=["double"])
        cat.add_model(tiny_models["ft_b"], name="ft_b", base="base")
        cat.add_task("double", write_jsonl(tmp_path / "d.jsonl",
                                           [{"prompt": f"{i}+{i}=", "answer": str(2 * i)} for i in range(6)]))
        cat.add_operator("lin", "linear")
        cat.add_operator("ta_fam", "task_arithmetic", ranges={"lambda": [0.3, 1.0]})
    return simmerge_home


def test_a_family_suggests_concrete_values_that_the_log_and_the_merge_use(home):
    with Store.open(home) as store:
        eng = Engine(store, EngineConfig(eval_budget=100))
        op = eng.catalog.operator("ta_fam")
        assert op["ranges"] == {"lambda": [0.3, 1.0]} and "ranges" not in eng.catalog.operator("lin")
        cs = eng.candidates("double")
        assert len(cs) == len(cs.pairs) * (1 + DRAWS)
        rows = eng.suggest("double", top=len(cs))
        fam = [r for r in rows if r["operator"] == "ta_fam"]
        assert len(fam) == len(cs.pairs) * DRAWS
        assert all(0.3 <= r["params"]["lambda"] <= 1.0 for r in fam)
        assert len({r["params"]["lambda"] for r in fam}) == DRAWS
        # the descriptor holds the concrete value: two settings of the family are two different arms
        fam_idx = [i for i in range(len(cs)) if cs.operators[cs.op_index[i]]["name"] == "ta_fam"]
        assert len({tuple(cs.Z[i]) for i in fam_idx}) == DRAWS
        assert len({cs.arms[i] for i in fam_idx}) == DRAWS and cs.arms[fam_idx[0]].startswith("ta_fam[lambda=")
        r = fam[0]
        logged = eng.decision(r["id"])
        assert logged["params"] == [r["params"]]
        spec = pipeline.job_spec(eng, r["id"])
        assert spec["steps"][0]["params"]["lambda"] == r["params"]["lambda"]
        res = pipeline.run_spec(spec, device="cpu", limit=2, keep_merge=True)
        cfg = yaml.safe_load(open(f"{res['merged']}/mergekit_config.yml"))
        assert json.dumps(cfg).count(repr(r["params"]["lambda"])) >= 1
        # a grid operator's decision keeps its catalog parameters
        lin = next(x for x in rows if x["operator"] == "lin")
        assert pipeline.job_spec(eng, lin["id"])["steps"][0]["params"] == eng.catalog.operator("lin")["params"]


def test_feedback_on_family_decisions_is_learned_and_rebuilt_alike(home):
    with Store.open(home) as store:
        eng = Engine(store, EngineConfig(eval_budget=100))
        rows = eng.suggest("double", top=6, policy="linucb-hybrid")
        for i, r in enumerate(rows):
            eng.feedback(r["id"], 0.1 * i)
        live = eng.policy("linucb-hybrid")
        scores_live = live.rank(eng.candidates("double").ranked).scores
        rebuilt = eng.rebuild("linucb-hybrid")
        assert rebuilt.n_updates == 6
        assert rebuilt.rank(eng.candidates("double").ranked).scores == pytest.approx(scores_live)


def test_search_tries_several_values_of_one_family(home):
    with Store.open(home) as store:
        eng = Engine(store)
        calls = []

        def evaluate(spec):
            calls.append(spec["steps"][0]["params"])
            return pipeline.run_spec(spec, device="cpu", limit=2, keep_merge=True)

        res = run_search(eng, Target.of(["double"]), 6, policy="random", evaluate=evaluate)
        keys = [(tuple(e["models"]), e["operator"], json.dumps(e["params"], sort_keys=True))
                for e in res["evaluations"]]
        assert len(set(keys)) == 6 == len(calls)


def test_cli_operator_add_range(home):
    r = CliRunner().invoke(cli, ["operator", "add", "ties_fam", "--method", "ties", "--range", "density=0.2:0.9",
                                 "--range", "weight=0.1:1", "--json"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    op = json.loads(r.output)[0]
    assert op["ranges"] == {"density": [0.2, 0.9], "weight": [0.1, 1.0]}
    for args in (["--range", "density=0.9:0.2"], ["--range", "density=nan:0.5"], ["--range", "density=0.2"],
                 ["--range", "density=0.2:0.3", "--range", "density=0.4:0.5"],
                 ["--param", "density=0.5", "--range", "density=0.2:0.9"]):
        r = CliRunner().invoke(cli, ["operator", "add", "bad", "--method", "ties", *args])
        lines = r.output.strip().splitlines()
        assert r.exit_code != 0 and "Traceback" not in r.output and lines[-1].startswith("Error:"), r.output
        assert sum(ln.startswith("Error") for ln in lines) == 1
    with Store.open(home) as store:
        assert [o["name"] for o in Catalog(store).operators()] == ["lin", "ta_fam", "ties_fam"]


def test_merge_by_catalog_names_refuses_a_family(home, tmp_path):
    r = CliRunner().invoke(cli, ["merge", "--models", "ft_a,ft_b", "--operator", "ta_fam", "--out",
                                 str(tmp_path / "m")])
    assert r.exit_code != 0 and "is a family" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "m").exists()
