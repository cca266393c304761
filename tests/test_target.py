"""Targets (a set of tasks with weights), the catalog's metadata in the context, and the engine's multi-task path."""

import json
import math

import numpy as np
import pytest
from click.testing import CliRunner

from simmerge_bandit import pipeline
from simmerge_bandit.catalog import Catalog
from simmerge_bandit.cli import cli
from simmerge_bandit.context import context_names, contexts, scaled
from simmerge_bandit.engine import Engine, EngineConfig
from simmerge_bandit.errors import InvalidInput, NotFound
from simmerge_bandit.signals.metadata import METADATA_NAMES, SourceMeta, absence_reasons, metadata_vector
from simmerge_bandit.store import Store
from simmerge_bandit.target import Target, parse_weights

from conftest import write_jsonl


# ---- Target ----

def test_target_normalizes_weights_and_round_trips():
    t = Target.of(["rev", "add"], {"add": 3})
    assert t.tasks == ("add", "rev")
    assert t.weights == {"add": 0.75, "rev": 0.25}
    assert t.key == "add=0.75,rev=0.25"
    assert Target.parse(t.key) == t
    # the same target whatever the scale of its weights
    assert Target.of(["add", "rev"], {"add": 6, "rev": 2}) == t
    one = Target.of(["add"])
    assert one.key == "add" and Target.parse("add") == one and one.weights == {"add": 1.0}


def test_target_aggregate_is_the_weighted_mean_and_never_fills_a_missing_task():
    t = Target.of(["a", "b"], {"a": 1, "b": 3})
    assert t.aggregate({"a": 0.2, "b": 1.0}) == pytest.approx(0.25 * 0.2 + 0.75 * 1.0)
    assert t.aggregate({"a": 0.2}) is None
    assert t.aggregate({"a": 0.2, "b": float("nan")}) is None


@pytest.mark.parametrize("tasks,weights,msg", [
    ([], None, "at least one task"),
    (["a", "a"], None, "twice"),
    (["a"], {"b": 1}, "not a task of the target"),
    (["a", "b"], {"a": 0}, "positive finite"),
    (["a", "b"], {"a": -1}, "positive finite"),
    (["a", "b"], {"a": "nan"}, "positive finite"),
    (["a", "b"], {"a": float("inf")}, "positive finite"),
    (["a", "b"], {"a": "x"}, "positive finite"),
    (["a", "b"], {"a": True}, "positive finite"),
    (["a,b"], None, "invalid task name"),
])
def test_target_refuses_bad_input(tasks, weights, msg):
    with pytest.raises(InvalidInput, match=msg):
        Target.of(tasks, weights)


def test_default_target_is_the_union_of_the_sources_tags():
    assert Target.default_for([["rev"], ["add", "rev"]]) == Target.of(["add", "rev"])
    assert Target.default_for([None, []]) is None


def test_parse_weights():
    assert parse_weights(["a=2", "b=0.5"]) == {"a": "2", "b": "0.5"}
    for bad in (["a"], ["=2"], ["a=1", "a=2"]):
        with pytest.raises(InvalidInput):
            parse_weights(bad)


# ---- metadata features (hand-computed) ----

def test_metadata_vector_by_hand():
    t = Target.of(["x", "y"], {"x": 3, "y": 1})          # weights 0.75 / 0.25
    a = SourceMeta(("x",), {"x": 0.8, "y": 0.4})
    b = SourceMeta(("y", "z"), {"y": 0.6})
    v = dict(zip(METADATA_NAMES, metadata_vector(t, a, b)))
    assert v["tag_share_a"] == 0.75 and v["tag_share_b"] == 0.25
    assert v["n_tags_a"] == 1 and v["n_tags_b"] == 2
    assert v["known_share_a"] == 1.0 and v["known_share_b"] == 0.25
    assert v["known_score_a"] == pytest.approx(0.75 * 0.8 + 0.25 * 0.4)
    assert v["known_score_b"] == pytest.approx(0.6)
    assert v["known_diff"] == pytest.approx(0.4 - 0.6)  # only y is known on both sides


def test_metadata_absent_values_have_reasons():
    t = Target.of(["x"])
    v = metadata_vector(t, SourceMeta(("x",), {}), SourceMeta((), {}))
    assert math.isnan(v[METADATA_NAMES.index("known_score_a")])
    reasons = absence_reasons(v)
    assert set(reasons) == {"known_score_a", "known_score_b", "known_diff"}
    assert "model a" in reasons["known_score_a"]


def test_contexts_single_task_equals_the_old_transform_and_multi_task_is_the_weighted_mean():
    f1 = np.array([[0.5, np.nan, -3.0]])
    f2 = np.array([[1.5, 2.0, np.nan]])
    single = contexts(f1, "t1")
    d = f1.shape[1]
    np.testing.assert_allclose(single[0, :d], scaled(f1)[0])
    t = Target.of(["t1", "t2"], {"t1": 1, "t2": 3})
    x = contexts({"t1": f1, "t2": f2}, t)
    # present in both: weighted mean; present in one: that one's value
    assert x[0, 0] == pytest.approx(0.25 * np.log1p(0.5) + 0.75 * np.log1p(1.5))
    assert x[0, 1] == pytest.approx(np.log1p(2.0))
    assert x[0, 2] == pytest.approx(-np.log1p(3.0))
    names = context_names(["f0", "f1", "f2"])
    assert len(names) == x.shape[1]
    buckets = x[0, [i for i, n in enumerate(names) if n.startswith("task_bucket_")]]
    assert buckets.sum() == pytest.approx(1.0)


# ---- the engine with targets ----

@pytest.fixture
def home(simmerge_home, tiny_models, tmp_path):
    store = Store.open(simmerge_home)
    cat = Catalog(store)
    cat.add_model(tiny_models["base"], name="base")
    cat.add_model(tiny_models["ft_a"], name="ft_a", base="base", tasks=["double"])
    cat.add_model(tiny_models["ft_b"], name="ft_b", base="base", tasks=["triple"])
    cat.add_model(tiny_models["ft_sharded"], name="ft_c", base="base")
    cat.add_task("double", write_jsonl(tmp_path / "d.jsonl",
                                       [{"prompt": f"{i}+{i}=", "answer": str(2 * i)} for i in range(8)]))
    cat.add_task("triple", write_jsonl(tmp_path / "t.jsonl",
                                       [{"prompt": f"3*{i}=", "answer": str(3 * i)} for i in range(8)]))
    cat.add_operator("lin", "linear")
    cat.add_operator("slerp", "slerp", {"t": 0.5})
    yield store
    store.close()


def test_suggest_for_a_two_task_target_logs_its_key_and_context(home):
    eng = Engine(home, EngineConfig(eval_budget=100))
    rows = eng.suggest(["double", "triple"], top=3, weights={"double": 2})
    assert rows[0]["task"] == "double=0.666667,triple=0.333333"
    assert rows[0]["target"] == {"tasks": {"double": pytest.approx(2 / 3), "triple": pytest.approx(1 / 3)}}
    logged = home.fetchone("SELECT task, feature_schema FROM decisions WHERE id = ?", [rows[0]["id"]])
    assert logged == (rows[0]["task"], "3")
    cs = eng.candidates(rows[0]["task"])
    # the pairs whose tags cover the whole target: the double expert with the triple expert
    assert sorted(cs.pairs) == [("ft_a", "ft_b"), ("ft_b", "ft_a")]
    # one task: every pair with its expert; no pair covers {double, quadruple}: pairs with a tagged model
    assert sorted(eng.pairs("double")) == [("ft_a", "ft_b"), ("ft_a", "ft_c"), ("ft_b", "ft_a"), ("ft_c", "ft_a")]
    names = cs.names
    i = cs.pairs.index(("ft_a", "ft_b")) * len(cs.operators)
    x = dict(zip(names, cs.X[i]))
    assert x["tag_share_a"] == pytest.approx(np.log1p(2 / 3))
    assert x["tag_share_b"] == pytest.approx(np.log1p(1 / 3))
    assert x["known_share_a"] == 0.0  # nothing evaluated yet


def test_unknown_task_or_bad_weight_logs_nothing(home):
    eng = Engine(home)
    with pytest.raises(NotFound):
        eng.suggest(["double", "nope"])
    with pytest.raises(InvalidInput):
        eng.suggest(["double", "triple"], weights={"double": -1})
    assert home.fetchone("SELECT count(*) FROM decisions")[0] == 0


def test_cli_suggest_target_and_one_line_errors(home):
    home.close()
    r = CliRunner().invoke(cli, ["suggest", "--task", "double", "--task", "triple", "--weight", "triple=3",
                                 "--top", "2", "--json"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    assert out[0]["task"] == "double=0.25,triple=0.75"
    for args in (["--task", "double", "--weight", "double=0"], ["--task", "nope"],
                 ["--task", "double", "--weight", "triple=1"], ["--task", "double", "--task", "double"]):
        r = CliRunner().invoke(cli, ["suggest", *args])
        assert r.exit_code != 0 and "Traceback" not in r.output and r.output.count("\n") <= 2, r.output
    s = Store.open()
    try:
        assert s.fetchone("SELECT count(*) FROM decisions")[0] == 2
    finally:
        s.close()


def test_evaluation_of_a_target_scores_every_task_and_stores_them(home):
    eng = Engine(home, EngineConfig(eval_budget=100))
    d = eng.suggest(["double", "triple"], top=1, weights={"double": 3})[0]
    spec = pipeline.job_spec(eng, d["id"])
    assert [t["name"] for t in spec["tasks"]] == ["double", "triple"]
    res = pipeline.run_spec(spec, device="cpu", limit=4)
    assert set(res["scores"]) == {"double", "triple"}
    expect = 0.75 * res["normalized"]["double"] + 0.25 * res["normalized"]["triple"]
    assert res["reward"] == pytest.approx(expect)
    pipeline.record(eng, spec, res)
    reward, scores = home.fetchone("SELECT reward, scores FROM rewards WHERE decision_id = ?", [d["id"]])
    assert reward == pytest.approx(expect)
    assert json.loads(scores) == pytest.approx(res["scores"])
    # the sources' scores are now known, and the next candidate set's metadata shows them
    cs = eng.candidates(d["task"])
    a, b = d["models"]
    i = cs.pairs.index((a, b)) * len(cs.operators)
    x = dict(zip(cs.names, cs.X[i]))
    assert x["known_share_a"] == pytest.approx(np.log1p(1.0)) and x["known_share_b"] == pytest.approx(np.log1p(1.0))


def test_feedback_closes_the_queued_job(home):
    eng = Engine(home, EngineConfig(eval_budget=100))
    d = eng.suggest("double", top=1)[0]
    assert d["evaluate"]
    assert eng.status()["queue"]["queued"] == 1
    eng.feedback(d["id"], 0.5)
    st = eng.status()["queue"]
    assert st["queued"] == 0 and st["done"] == 1


def test_a_registered_zoo_knows_its_models_scores(unit_zoo, simmerge_home):
    from simmerge_bandit.context import catalog_meta
    from simmerge_bandit.zoo import register_zoo

    zoo_dir, manifest = unit_zoo
    with Store.open(simmerge_home) as store:
        register_zoo(store, zoo_dir)
        task = manifest["tasks"][0]["name"]
        meta = catalog_meta(store, [m["name"] for m in manifest["models"]], [task])
        for m in manifest["models"]:
            assert meta[m["name"]].known == {task: pytest.approx(m["scores"][task])}
        register_zoo(store, zoo_dir)  # idempotent
        assert store.fetchone("SELECT count(*) FROM evaluations")[0] == \
            sum(len(m["scores"]) for m in manifest["models"])
