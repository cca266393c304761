"""The demo end to end on the unit zoo: held-out targets, a predictor fitted on the others' merges, the engine's
merges made, evaluated and learned from, compared with every fixed operator, the rules and the oracle."""

import json

from click.testing import CliRunner

from simmerge_bandit.cli import cli
from simmerge_bandit.demo import run_demo, split_tasks
from simmerge_bandit.rules import RULES
from simmerge_bandit.store import Store


def test_split_tasks_holds_out_every_third():
    assert split_tasks(list("abcdef"), 0) == (["b", "c", "e", "f"], ["a", "d"])
    assert split_tasks(list("abcdef"), 4) == (["a", "c", "d", "f"], ["b", "e"])


def test_demo_on_held_out_targets(tmp_path, unit_zoo_dir):
    lines = []
    res = run_demo(tmp_path / "home", rounds=3, preset="unit", zoo_dir=unit_zoo_dir, eval_limit=8, jobs=1,
                   echo=lines.append)
    assert res["held_out"] == ["max"] and len(res["rounds"]) == 3
    # the held-out task alone, then with each training task (sort, dsum)
    assert [r["target"] for r in res["rounds"]] == ["max", "max=0.5,sort=0.5", "dsum=0.5,max=0.5"]
    for r in res["rounds"]:
        assert "max" in r["pair"]  # a pair with the held-out task's expert
        assert 0.0 <= r["reward"] <= 2.0 and r["reward"] == r["fixed"][r["chosen"]]
        assert r["oracle"] == max(r["fixed"].values())
        assert set(r["rules"]) == set(RULES) and all(v in r["fixed"].values() for v in r["rules"].values())
    s = res["summary"]
    assert s["oracle"] >= max(s["fixed"].values()) and s["best_fixed_on_training"] in s["fixed"]
    assert any("oracle" in ln for ln in lines) and any("rule: " in ln for ln in lines)
    assert (tmp_path / "home" / "demo_regret.png").read_bytes()[:4] == b"\x89PNG"
    with Store.open(tmp_path / "home") as store:
        assert store.fetchone("SELECT count(*) FROM rewards")[0] == 3          # learned from its own merges
        assert store.fetchone("SELECT count(*) FROM policy_state WHERE policy = 'predictor'")[0] == 1
    st = CliRunner().invoke(cli, ["--home", str(tmp_path / "home"), "status", "--json"], catch_exceptions=False)
    assert json.loads(st.output)["counts"]["rewards"] == 3


def test_operators_compared_in_a_worker_score_as_in_this_process(unit_zoo):
    # Workers score the rounds' pairs while this process runs the rounds; what no worker started when the rounds
    # end is scored here. Either way every (pair, target) gets the scores of scoring it in this process.
    from simmerge_bandit.demo import _Comparisons
    from simmerge_bandit.target import Target
    from simmerge_bandit.zoo import default_operators, worker_pool

    root, manifest = unit_zoo
    by_name = {m["name"]: m for m in manifest["models"]}
    ops = default_operators("unit")[:4]
    asks = [(("max", "sort"), Target.of(["max"])), (("sort", "dsum"), Target.of(["sort", "dsum"])),
            (("dsum", "max"), Target.of(["max"])), (("max", "sort"), Target.of(["max"]))]
    here = _Comparisons(root, ops, by_name)
    for pair, target in asks:
        here.ask(pair, target)
    expected = {(p, t.key): here.values(p, t, wait=False) for p, t in asks}
    assert all(len(v) == len(ops) for v in expected.values()) and len(expected) == 3
    pool = worker_pool(1)
    try:
        workers = _Comparisons(root, ops, by_name, pool)
        for pair, target in asks:
            workers.ask(pair, target)
        assert len(workers.pending) == 3  # asked once per (pair, target)
        workers.finish()
        got = {(p, t.key): workers.values(p, t, wait=True) for p, t in asks}
    finally:
        pool.shutdown()
    assert got == expected
