"""Replay / off-policy evaluation on real CSV and Parquet logs read through DuckDB, and the ``replay`` command."""

from __future__ import annotations

import json

import duckdb
import numpy as np
import pytest
from click.testing import CliRunner

from simmerge_bandit import replay as rp
from simmerge_bandit.cli import cli
from simmerge_bandit.errors import InvalidInput, NotFound
from simmerge_bandit.migrations import vector_key

HAND_LOG = """action,reward,propensity,x
1,1,0.5,0.1
2,0,0.5,0.2
1,0,0.5,0.3
2,1,0.5,0.4
1,1,0.5,0.5
2,0,0.5,0.6
"""


def write(path, text):
    path.write_text(text)
    return path


def synthetic_log(path, n=400, seed=0, uniform=True, shuffle=False):
    """A two-action log where action 'good' pays 1 with probability 0.8 when x > 0, else 'bad' pays more."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=n)
    p_good = np.full(n, 0.5) if uniform else np.where(x > 0, 0.3, 0.6)
    good = rng.random(n) < p_good
    best = np.where(x > 0, good, ~good)
    reward = (rng.random(n) < np.where(best, 0.8, 0.2)).astype(float)
    ts = np.arange(n)
    order = rng.permutation(n) if shuffle else np.arange(n)
    lines = ["timestamp,action,reward,propensity,x"]
    for i in order:
        lines.append(f"{ts[i]},{'good' if good[i] else 'bad'},{reward[i]},"
                     f"{p_good[i] if good[i] else 1 - p_good[i]},{x[i]:.6f}")
    path.write_text("\n".join(lines) + "\n")
    return path


# ---- loading ----

def test_csv_log_is_ordered_by_timestamp_and_encoded(tmp_path):
    log = rp.load_log(write(tmp_path / "log.csv", """timestamp,action,reward,propensity,a_density,num,color,user,flag
2024-01-03,17,1.0,0.5,0.3,1.5,red,u1,true
2024-01-01,3,0.0,0.25,0.7,2.5,blue,u2,false
2024-01-02,17,0.5,1.0,0.3,3.5,red,u3,true
"""), max_onehot=2)
    assert log.arms == ["3", "17"]                      # numeric actions in numeric order
    assert list(log.rows) == [2, 3, 1]                  # replay order by timestamp, 1-based source rows
    assert list(log.actions) == [0, 1, 1]
    assert list(log.rewards) == [0.0, 0.5, 1.0]
    assert list(log.propensities) == [0.25, 1.0, 0.5]
    assert log.arm_feature_names == ["a_density"]
    assert log.Z.tolist() == [[0.7], [0.3]]
    # numbers as they are, booleans as 0/1, a 2-level string one-hot, a 3-level string ordinal (max_onehot=2)
    assert log.context_names == ["num", "color=blue", "color=red", "user", "flag"]
    assert log.X.tolist() == [[2.5, 1, 0, 1, 0], [3.5, 0, 1, 2, 1], [1.5, 0, 1, 0, 1]]
    assert not log.is_uniform


def test_parquet_log_reads_like_the_csv(tmp_path):
    csv = write(tmp_path / "log.csv", HAND_LOG)
    pq = tmp_path / "log.parquet"
    con = duckdb.connect()
    con.execute(f"COPY (SELECT * FROM read_csv_auto('{csv}')) TO '{pq}' (FORMAT parquet)")
    con.close()
    a, b = rp.load_log(csv), rp.load_log(pq)
    assert a.arms == b.arms
    for f in ("actions", "rewards", "propensities", "X", "Z"):
        assert np.array_equal(getattr(a, f), getattr(b, f))
    assert a.is_uniform
    assert a.Z.tolist() == [[1, 0], [0, 1]]             # one-hot descriptors without a_ columns


def test_frame_and_dict_inputs():
    import pandas as pd

    d = {"action": ["b", "a", "b"], "reward": [1.0, 0.0, 0.5], "propensity": [0.5, 0.5, 0.5], "x": [1, 2, 3]}
    from_dict = rp.log_from_frame(d)
    from_df = rp.log_from_frame(pd.DataFrame(d))
    assert from_dict.arms == from_df.arms == ["a", "b"]
    assert np.array_equal(from_dict.X, from_df.X)
    given = rp.log_from_frame(d, actions=["a", "b", "c"])
    assert given.arms == ["a", "b", "c"] and given.Z.shape == (3, 3)
    with pytest.raises(InvalidInput, match="row 1, column 'action': action b is not in the given action set"):
        rp.log_from_frame(d, actions=["a", "c"])


@pytest.mark.parametrize("text, message", [
    ("action,reward,x\n1,1.0,0\n2,0.0,1\n", "has no column 'propensity'"),
    ("action,reward,propensity\n1,1.0,0.5\n2,0.0,0\n", "row 2, column 'propensity': 0 is outside (0, 1]"),
    ("action,reward,propensity\n1,1.0,1.5\n2,0.0,0.5\n", "row 1, column 'propensity': 1.5 is outside (0, 1]"),
    ("action,reward,propensity\n1,1.0,0.5\n2,0.0,\n", "row 2, column 'propensity': value is missing or NaN"),
    ("action,reward,propensity\n1,1.0,0.5\n2,0.0,0.5\n1,,0.5\n", "row 3, column 'reward': value is missing or NaN"),
    ("action,reward,propensity\n1,1.0,0.5\n2,NaN,0.5\n", "row 2, column 'reward': value is missing or NaN"),
    ("action,reward,propensity\n1,1.0,0.5\n2,inf,0.5\n", "row 2, column 'reward': inf is not a finite number"),
    ("action,reward,propensity\n1,1.0,0.5\n2,lots,0.5\n", "row 2, column 'reward': 'lots' is not a number"),
    ("action,reward,propensity\n", "is empty (no rows)"),
    ("action,reward,propensity,x\n1,1.0,0.5,0.1\n2,0.0,0.5,\n", "row 2, column 'x': value is missing or NaN"),
    ("action,reward,propensity,a_w\n1,1.0,0.5,0.1\n2,0.0,0.5,0.2\n1,1,0.5,0.3\n",
     "row 3, column 'a_w': action 1 has 0.3 here but 0.1 on an earlier row"),
    ("action,reward,propensity\n1,1.0,0.5\n1,0.0,0.5\n", "has a single action"),
])
def test_bad_logs_are_refused_with_row_and_column(tmp_path, text, message):
    path = write(tmp_path / "bad.csv", text)
    with pytest.raises(InvalidInput) as e:
        rp.load_log(path)
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_empty_unknown_and_missing_files(tmp_path):
    with pytest.raises(InvalidInput, match="empty"):
        rp.load_log(write(tmp_path / "empty.csv", ""))
    with pytest.raises(InvalidInput, match="unknown format"):
        rp.load_log(write(tmp_path / "log.json", "{}"))
    with pytest.raises(NotFound):
        rp.load_log(tmp_path / "nope.csv")
    with pytest.raises(InvalidInput, match="could not be read"):
        rp.load_log(write(tmp_path / "broken.parquet", "not parquet"))


# ---- policies through the log ----

def test_parse_policy():
    assert rp.parse_policy("fixed:17") == rp.PolicySpec("fixed:17", "fixed", action="17")
    spec = rp.parse_policy("linucb:alpha=0.5,prior=none")
    assert spec.name == "linucb" and spec.params == {"alpha": 0.5, "prior": "none"}
    for bad in ("fixed", "uniform:x=1", "linucb:alpha", ":x"):
        with pytest.raises(InvalidInput):
            rp.parse_policy(bad)


def test_replay_and_ips_match_a_hand_computed_uniform_log(tmp_path):
    log = rp.load_log(write(tmp_path / "log.csv", HAND_LOG))
    ev = rp.evaluate(log, ["fixed:1", "fixed:2", "uniform"], ["replay", "ips", "snips"])
    got = {(r["policy"], r["estimator"]): r for r in ev.results()}
    # action 1 earned 1, 0, 1; action 2 earned 0, 1, 0
    assert got["fixed:1", "replay"]["value"] == pytest.approx(2 / 3)
    assert got["fixed:1", "replay"]["n"] == 3
    assert got["fixed:2", "replay"]["value"] == pytest.approx(1 / 3)
    assert got["fixed:1", "ips"]["value"] == pytest.approx((1 + 0 + 1) / 0.5 / 6)
    assert got["fixed:2", "snips"]["value"] == pytest.approx(1 / 3)
    assert got["fixed:1", "ips"]["ess"] == pytest.approx(3.0)
    assert got["uniform", "replay"]["value"] == pytest.approx(0.5)
    assert got["uniform", "ips"]["value"] == pytest.approx(0.5)
    assert got["uniform", "ips"]["n"] == 6
    assert all(r["notes"] == [] for r in ev.results())
    with pytest.raises(InvalidInput, match="action 5 is not in the log's action set"):
        rp.evaluate(log, ["fixed:5"])


def test_replay_notes_a_non_uniform_log(tmp_path):
    log = rp.load_log(synthetic_log(tmp_path / "log.csv", n=50, uniform=False))
    (res,) = rp.evaluate(log, ["fixed:good"], ["replay"]).results()
    assert any("not uniform" in n for n in res["notes"])


def test_learned_policy_is_replayed_in_time_order_and_updated_only_on_matches(tmp_path):
    from simmerge_bandit.policies.linucb import LinUCB

    log = rp.load_log(synthetic_log(tmp_path / "a.csv", n=400))
    shuffled = rp.load_log(synthetic_log(tmp_path / "b.csv", n=400, shuffle=True))
    assert np.array_equal(log.X, shuffled.X)
    pol = LinUCB(alpha=0.5, seed=3)
    run = rp.run_policy(log, "linucb", policy=pol)
    assert pol.n_updates == int(run.matched.sum()) > 0
    again = rp.run_policy(shuffled, "linucb", policy=LinUCB(alpha=0.5, seed=3))
    assert np.array_equal(run.matched, again.matched)
    assert np.allclose(run.probs.sum(axis=1), 1.0)
    # it learns which action pays in which context: well above the 0.5 of a uniform choice, which the best
    # context-blind fixed action cannot beat here
    ev = rp.evaluate(log, ["uniform", "fixed:good"], ["replay"], policy_objects={"linucb": LinUCB(alpha=0.5)})
    values = {r["policy"]: r["value"] for r in ev.results()}
    assert values["linucb"] > 0.65
    assert values["uniform"] == pytest.approx(0.5, abs=0.08)
    assert values["fixed:good"] < 0.6


def test_registered_learned_policies_run_by_name(tmp_path):
    log = rp.load_log(synthetic_log(tmp_path / "log.csv", n=120))
    ev = rp.evaluate(log, ["linucb", "lints:v=0.3", "egreedy"], ["replay", "ips", "snips", "dr"], seed=1)
    rows = ev.results()
    assert len(rows) == 12
    for r in rows:
        assert r["ci_low"] <= r["value"] <= r["ci_high"]
        assert 0 < r["ess"] <= r["n"] <= 120
    again = rp.evaluate(log, ["linucb", "lints:v=0.3", "egreedy"], ["replay", "ips", "snips", "dr"], seed=1)
    assert again.results() == rows


def test_dr_beats_ips_variance_on_a_non_uniform_log(tmp_path):
    log = rp.load_log(synthetic_log(tmp_path / "log.csv", n=600, uniform=False))
    got = {r["estimator"]: r for r in rp.evaluate(log, ["fixed:good"], ["ips", "dr"]).results()}
    assert got["dr"]["ci_high"] - got["dr"]["ci_low"] < got["ips"]["ci_high"] - got["ips"]["ci_low"]
    # both near the truth: 'good' pays 0.8 when x > 0 and 0.2 otherwise, x standard normal
    for r in got.values():
        assert r["ci_low"] - 0.05 <= 0.5 <= r["ci_high"] + 0.05


# ---- the engine's own log ----

def _engine_store():
    from simmerge_bandit.store import Store

    return Store.open()


def test_engine_log_without_rewards_is_refused():
    store = _engine_store()
    try:
        with pytest.raises(InvalidInput, match="no rewarded choice yet"):
            rp.load_engine_log(store)
    finally:
        store.close()


def test_engine_log_rank0_rewarded_choices(tmp_path):
    from simmerge_bandit.catalog import Catalog
    from simmerge_bandit.descriptor import operator_descriptor

    store = _engine_store()
    try:
        cat = Catalog(store)     # the engine logs only catalog operators; replay describes them in today's schema
        ops = {"linear": cat.add_operator("linear", "linear"), "ties": cat.add_operator("ties", "ties")}
        rng = np.random.default_rng(0)
        for i in range(30):
            op = "ties" if i % 2 else "linear"
            z = [1.0, 0.0] if op == "ties" else [0.0, 1.0]     # as logged (an older schema's width)
            for rank in (0, 1):
                did = f"d{i}-{rank}"
                x = [float(rng.normal()), 1.0]
                for v in (x, z):
                    store.execute("INSERT OR IGNORE INTO vectors VALUES (?, ?)", [vector_key(v), v])
                store.execute(
                    "INSERT INTO decision_log (id, batch, rank, task, models, operator, policy, policy_version, "
                    "feature_schema, context_key, arm_key, predicted, uncertainty, propensity, evaluate) "
                    "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                    [did, f"b{i}", rank, "t", json.dumps(["m1", "m2"]), json.dumps([op]), "linucb", "v", "1",
                     vector_key(x), vector_key(z), 0.5, 0.1, 0.25, rank == 0])
                store.execute("INSERT INTO rewards (decision_id, reward) VALUES (?, ?)", [did, float(i % 3)])
        log = rp.load_engine_log(store)
    finally:
        store.close()
    assert len(log) == 30                                # rank 1 rows were listed, not drawn
    assert log.arms == ["linear", "ties"]
    np.testing.assert_array_equal(log.Z, [operator_descriptor(ops["linear"]), operator_descriptor(ops["ties"])])
    assert log.context_names == ["x0", "x1"]
    assert np.all(log.propensities == 0.25)
    (r,) = rp.evaluate(log, ["fixed:ties"], ["snips"]).results()
    assert r["value"] == pytest.approx(np.mean([i % 3 for i in range(30) if i % 2]))


# ---- CLI ----

def test_cli_replay_json_table_and_plot(tmp_path):
    path = write(tmp_path / "log.csv", HAND_LOG)
    runner = CliRunner()
    res = runner.invoke(cli, ["replay", str(path), "--policy", "fixed:1", "--policy", "uniform",
                              "--estimator", "replay", "--estimator", "ips", "--json"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    assert out["log"]["events"] == 6 and out["log"]["uniform"] is True
    rows = {(r["policy"], r["estimator"]): r for r in out["results"]}
    assert set(rows) == {("fixed:1", "replay"), ("fixed:1", "ips"), ("uniform", "replay"), ("uniform", "ips")}
    assert rows["fixed:1", "replay"]["value"] == pytest.approx(2 / 3)
    for r in out["results"]:
        assert {"policy", "estimator", "value", "ci_low", "ci_high", "n", "ess"} <= set(r)

    png = tmp_path / "curve.png"
    res = runner.invoke(cli, ["replay", str(path), "--policy", "fixed:2", "--plot", str(png)],
                        catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert "fixed:2" in res.output and "estimator" in res.output and "ess" in res.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    res = runner.invoke(cli, ["replay", str(path), "--policy", "fixed:1", "--estimator", "ips", "--ci",
                              "bootstrap", "--n-boot", "200", "--json"], catch_exceptions=False)
    (r,) = json.loads(res.output)["results"]
    assert r["ci_low"] < r["value"] < r["ci_high"]


def test_cli_replay_bad_log_is_one_line(tmp_path):
    path = write(tmp_path / "log.csv", "action,reward,propensity\n1,1.0,0.5\n2,0.0,2\n")
    res = CliRunner().invoke(cli, ["replay", str(path), "--policy", "uniform"], catch_exceptions=False)
    assert res.exit_code == 1
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert lines == ["Error: log log.csv, row 2, column 'propensity': 2 is outside (0, 1]"]


def test_cli_replay_without_log_reads_the_engine_log():
    res = CliRunner().invoke(cli, ["replay", "--policy", "uniform"], catch_exceptions=False)
    assert res.exit_code == 1
    assert "no rewarded choice yet" in res.output
