"""The decision engine on real tiny checkpoints, real signals and a real DuckDB file."""

import json
import os

import numpy as np
import pytest
from click.testing import CliRunner

from simmerge_bandit.catalog import Catalog
from simmerge_bandit.cli import cli
from simmerge_bandit.engine import Engine, EngineConfig
from simmerge_bandit.errors import Conflict, InvalidInput, NotFound
from simmerge_bandit.store import Store

from conftest import write_jsonl

FIELDS = {"id", "models", "operator", "predicted", "uncertainty", "propensity", "evaluate", "explanation"}


@pytest.fixture
def setup(simmerge_home, tiny_models, tmp_path):
    store = Store.open(simmerge_home)
    cat = Catalog(store)
    cat.add_model(tiny_models["base"], name="base")
    for key in ("ft_a", "ft_b", "ft_sharded"):
        cat.add_model(tiny_models[key], name=key, base="base")
    rows = [{"prompt": f"{i}+{i}=", "answer": str(2 * i)} for i in range(12)]
    cat.add_task("double", write_jsonl(tmp_path / "d.jsonl", rows))
    cat.add_operator("lin", "linear")
    cat.add_operator("ties5", "ties", {"density": 0.5})
    cat.add_operator("slerp", "slerp", {"t": 0.5})
    yield store
    store.close()


def test_suggest_returns_logged_decisions(setup):
    eng = Engine(setup, EngineConfig(eval_budget=100))
    rows = eng.suggest("double", top=4)
    assert len(rows) == 4 and len({r["id"] for r in rows}) == 4
    for r in rows:
        assert FIELDS <= set(r)
        assert 0 < r["propensity"] <= 1
        assert r["models"][0] != r["models"][1] and r["operator"] in {"lin", "ties5", "slerp"}
        assert isinstance(r["explanation"], list)
    assert [r["evaluate"] for r in rows][1:] == [False, False, False]
    n = setup.fetchone("SELECT count(*) FROM decisions")[0]
    assert n == 4
    ctx = setup.fetchone("SELECT context, propensity, policy FROM decisions WHERE rank = 0")
    assert len(ctx[0]) > 5 and ctx[1] == rows[0]["propensity"] and ctx[2] == "linucb-hybrid"
    # 3 fine-tunes -> 6 ordered pairs x 3 operators
    assert len(eng.candidates("double")) == 18


def test_feedback_rules(setup):
    eng = Engine(setup)
    rid = eng.suggest("double", top=2)[0]["id"]
    assert eng.feedback(rid, 0.8)["status"] == "recorded"
    assert eng.feedback(rid, 0.8)["status"] == "unchanged"
    with pytest.raises(Conflict):
        eng.feedback(rid, 0.7)
    with pytest.raises(NotFound):
        eng.feedback("nope", 0.5)
    other = eng.suggest("double", top=1)[0]["id"]
    for bad in (float("nan"), float("inf"), -0.1, 2.5, "abc"):
        with pytest.raises(InvalidInput):
            eng.feedback(other, bad)
    assert setup.fetchall("SELECT decision_id, reward FROM rewards") == [(rid, 0.8)]
    assert eng.policy().n_updates == 1


def test_late_reward_is_learned_with_logged_propensity(setup):
    eng = Engine(setup)
    first = eng.suggest("double", top=1)[0]
    for _ in range(3):
        eng.suggest("double", top=1)
    before = eng.policy().n_updates
    eng.feedback(first["id"], 1.1)
    assert eng.policy().n_updates == before + 1
    assert setup.fetchone("SELECT propensity FROM decisions WHERE id = ?", [first["id"]])[0] == first["propensity"]


def _arrays(pol):
    arrays, _ = pol.snapshot()
    return {k: v for k, v in arrays.items() if "rng" not in k}


def test_rebuild_equals_live_and_restart_resumes(setup, simmerge_home):
    eng = Engine(setup, EngineConfig(snapshot_every=3))
    rng = np.random.default_rng(0)
    for _ in range(7):
        for r in eng.suggest("double", top=2):
            eng.feedback(r["id"], float(rng.uniform(0, 1.2)))
    live = _arrays(eng.policy())
    # A new engine (as after a restart) restores the snapshot and replays the log tail.
    again = Engine(setup, EngineConfig(snapshot_every=3))
    restored = _arrays(again.policy())
    rebuilt = _arrays(Engine(setup).rebuild())
    assert live.keys() == rebuilt.keys() == restored.keys()
    for k in live:
        np.testing.assert_allclose(live[k], rebuilt[k], rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(live[k], restored[k], rtol=1e-10, atol=1e-12)


def test_snapshots_deferred_writes_one_snapshot_when_the_block_ends_and_a_crash_inside_loses_nothing(setup):
    def saved():
        row = setup.fetchone("SELECT last_seq FROM policy_state WHERE policy = 'linucb-hybrid'")
        return None if row is None else row[0]

    eng = Engine(setup)  # a snapshot per reward outside the block
    eng.feedback(eng.suggest("double", top=1)[0]["id"], 0.5)
    first = saved()
    assert first is not None
    rng = np.random.default_rng(1)
    with eng.snapshots_deferred():
        for _ in range(4):
            eng.feedback(eng.suggest("double", top=1)[0]["id"], float(rng.uniform(0, 1.2)))
        assert saved() == first and eng.policy().n_updates == 5  # learned from each, saved none
        # a process that dies here left the snapshot behind; the next one replays the log's tail (this one
        # writes no snapshot of its own)
        after_crash = _arrays(Engine(setup, EngineConfig(snapshot_every=10**9)).policy())
        assert saved() == first
        live = _arrays(eng.policy())
        for k in live:
            np.testing.assert_allclose(after_crash[k], live[k], rtol=1e-10, atol=1e-12)
    last = setup.fetchone("SELECT max(seq) FROM rewards")[0]
    assert saved() == last > first  # one snapshot, when the block ended
    restored = _arrays(Engine(setup).policy())
    for k in live:
        np.testing.assert_allclose(restored[k], live[k], rtol=1e-10, atol=1e-12)


def test_a_new_feature_schema_starts_learning_again_and_keeps_the_old_log(setup):
    """Contexts of another feature schema do not fit: after an upgrade the policies ignore those rewards and any
    snapshot learned on them, while the log itself (decisions and rewards, for replay) stays untouched."""
    eng = Engine(setup)
    for _ in range(3):
        for r in eng.suggest("double", top=2):
            eng.feedback(r["id"], 0.5)
    assert eng.policy().n_updates == 6
    # pretend all of that was logged and learned under schema 1
    setup.execute("UPDATE decision_log SET feature_schema = '1'")
    for name, meta in setup.fetchall("SELECT policy, meta FROM policy_state"):
        setup.execute("UPDATE policy_state SET meta = ? WHERE policy = ?",
                      [json.dumps({**json.loads(meta), "feature_schema": "1"}), name])
    fresh = Engine(setup)
    assert fresh.policy().n_updates == 0
    [s] = fresh.suggest("double", top=1)
    fresh.feedback(s["id"], 1.0)
    assert fresh.policy().n_updates == 1
    assert setup.fetchone("SELECT count(*) FROM rewards")[0] == 7
    live, rebuilt = _arrays(fresh.policy()), _arrays(Engine(setup).rebuild())
    assert live.keys() == rebuilt.keys()
    for k in live:
        np.testing.assert_allclose(live[k], rebuilt[k], rtol=1e-10, atol=1e-12)


def test_operators_and_tasks_join_online(setup, tmp_path):
    eng = Engine(setup)
    eng.suggest("double", top=1)
    cat = Catalog(setup)
    cat.add_operator("della5", "della", {"density": 0.5})
    cat.retire_operator("slerp")
    arms = {r["operator"] for r in eng.suggest("double", top=100)}
    assert "della5" in arms and "slerp" not in arms
    cat.add_task("copy", write_jsonl(tmp_path / "c.jsonl", [{"prompt": "ab>", "answer": "ab"}] * 3))
    assert eng.suggest("copy", top=1)[0]["models"]
    assert cat.operator("slerp")["status"] == "retired"
    assert setup.fetchone("SELECT count(*) FROM decisions WHERE operator LIKE '%slerp%'")[0] >= 0


def test_evaluation_budget_and_queue(setup):
    eng = Engine(setup, EngineConfig(eval_budget=2))
    flags = [eng.suggest("double", top=1)[0]["evaluate"] for _ in range(4)]
    assert flags == [True, True, False, False]
    assert setup.fetchone("SELECT count(*) FROM eval_queue WHERE state = 'queued'")[0] == 2
    assert eng.status()["budget"]["used"] == 2


def test_chain_suggestions(setup):
    eng = Engine(setup)
    rows = eng.suggest("double", top=2, chain=3)
    for r in rows:
        assert len(r["models"]) == 3 and len(set(r["models"])) == 3
        assert isinstance(r["operator"], list) and len(r["operator"]) == 2
        assert 0 < r["propensity"] <= 1


def test_chain_features_are_computed_on_the_actual_intermediate_merge(setup, tmp_path):
    """The logged context of a chain's last step equals the features of (merge of the first two, third model)
    computed from scratch on an independently made merge registered as an ordinary model."""
    from simmerge_bandit import executor
    from simmerge_bandit.chains import intermediates_dir, materialize
    from simmerge_bandit.engine import contexts
    from simmerge_bandit import signals

    eng = Engine(setup)
    [r] = eng.suggest("double", top=1, chain=3)
    a, b, c = r["models"]
    op1 = Catalog(setup).operator(r["operator"][0])
    made = sorted(intermediates_dir(setup).iterdir())
    assert len(made) == 1
    ref = tmp_path / "ref"
    cat = Catalog(setup)
    executor.merge_chain_pairs([cat.model(a)["path"], cat.model(b)["path"]], [(op1["method"], op1["params"])], ref,
                               base=cat.model("base")["path"], seed=eng.config.seed)
    cat.add_model(ref, name="ref-merge", base="base")
    X, _ = signals.feature_matrix(setup, [("ref-merge", c)], "double")
    logged = np.array(setup.fetchone("SELECT context FROM decisions WHERE id = ?", [r["id"]])[0])
    np.testing.assert_allclose(logged, contexts(X, "double")[0], rtol=1e-6, atol=1e-9)
    # the intermediate is merged once and reused
    stamp = made[0].stat().st_mtime_ns
    assert materialize(eng, [a, b], [op1["name"]]) == (made[0], "base")
    assert made[0].stat().st_mtime_ns == stamp and sorted(intermediates_dir(setup).iterdir()) == made


def test_cli_suggest_feedback_status(setup):
    setup.close()
    runner = CliRunner()
    out = runner.invoke(cli, ["suggest", "--task", "double", "--top", "3", "--json"], catch_exceptions=False)
    assert out.exit_code == 0, out.output
    rows = json.loads(out.output)
    assert len(rows) == 3 and FIELDS <= set(rows[0])
    fb = runner.invoke(cli, ["feedback", rows[0]["id"], "0.9", "--json"], catch_exceptions=False)
    assert json.loads(fb.output)["status"] == "recorded"
    bad = runner.invoke(cli, ["feedback", rows[1]["id"], "nan"])
    assert bad.exit_code != 0 and "finite number" in bad.output and "Traceback" not in bad.output
    st = json.loads(runner.invoke(cli, ["status", "--json"], catch_exceptions=False).output)
    assert st["counts"] == {"models": 4, "tasks": 1, "operators": 3, "decisions": 3, "rewards": 1}
    human = runner.invoke(cli, ["suggest", "--task", "double"], catch_exceptions=False).output
    assert "operator" in human and "propensity" in human
    assert runner.invoke(cli, ["suggest", "--task", "nope"]).exit_code != 0
    rebuilt = runner.invoke(cli, ["policy", "rebuild", "--json"], catch_exceptions=False)
    assert json.loads(rebuilt.output)["n_updates"] == 1


def test_predictor_fit_from_log_and_table_then_warm_start(setup, tmp_path):
    import pandas as pd

    eng = Engine(setup)
    with pytest.raises(InvalidInput, match="no rewarded decisions"):
        eng.fit_predictor()
    with pytest.raises(InvalidInput, match="no fitted predictor"):
        eng.suggest("double", policy="linucb@predictor")
    rows = []
    for a, b in eng.pairs("double"):
        for op, score in (("lin", 0.9), ("ties5", 0.5), ("slerp", 0.7)):
            rows.append({"model_a": a, "model_b": b, "operator": op, "task": "double", "normalized_score": score})
    table = tmp_path / "t.parquet"
    pd.DataFrame(rows).to_parquet(table)
    summary = eng.fit_predictor(str(table))
    assert summary["n"] == len(rows) and summary["rmse"] < 0.05
    top = eng.suggest("double", top=3, policy="predictor")
    assert top[0]["predicted"] == pytest.approx(0.9, abs=0.05)
    warm = eng.suggest("double", top=18, policy="linucb@predictor")
    assert warm[1]["operator"] == "lin" and warm[1]["predicted"] == pytest.approx(0.9, abs=0.05)
    eng.feedback(warm[0]["id"], 0.4)
    assert eng.fit_predictor()["n"] == 1
    bad = tmp_path / "bad.csv"
    bad.write_text("model_a,task\nx,y\n")
    with pytest.raises(InvalidInput, match="missing column"):
        eng.fit_predictor(str(bad))


def _merge_table(eng, tmp_path):
    """A complete merge table for the fixture's task: lin 0.9, ties5 0.5, slerp 0.7 on every pair."""
    import pandas as pd

    rows = [{"model_a": a, "model_b": b, "operator": op, "task": "double", "normalized_score": score}
            for a, b in eng.pairs("double") for op, score in (("lin", 0.9), ("ties5", 0.5), ("slerp", 0.7))]
    table = tmp_path / "t.parquet"
    pd.DataFrame(rows).to_parquet(table)
    return table


def test_predictor_online_weight_is_kept_across_restarts_rebuilds_and_warm_starts(setup, tmp_path):
    eng = Engine(setup)
    table = _merge_table(eng, tmp_path)
    assert eng.fit_predictor(str(table), online_weight=8)["online_weight"] == 8
    [s] = eng.suggest("double", top=1, policy="predictor")
    eng.feedback(s["id"], 0.1)
    assert eng.policy("predictor").online_weight == 8
    again = Engine(setup)                                   # a restart: snapshot + log tail
    assert again.policy("predictor").online_weight == 8
    np.testing.assert_allclose(_arrays(again.policy("predictor"))["beta"], _arrays(eng.policy("predictor"))["beta"])
    assert again.rebuild("predictor").online_weight == 8
    assert again.policy("linucb@predictor").prior.online_weight == 8
    assert again.fit_predictor(str(table))["online_weight"] == 8    # a refit keeps it unless told otherwise
    with pytest.raises(InvalidInput, match="online_weight"):
        again.fit_predictor(str(table), online_weight=0)


def test_task_tags_restrict_pairs(setup, tiny_models):
    cat = Catalog(setup)
    cat.add_model(tiny_models["ft_b"], name="tagged", base="base", tasks=["double"], allow_duplicate=True)
    pairs = Engine(setup).pairs("double")
    assert pairs and all("tagged" in p for p in pairs)
    assert len(pairs) == 6  # tagged x 3 others, both orders


def test_feedback_numbers_rewards_in_order_across_engines_and_restarts(setup, simmerge_home):
    """The engine numbers rewards itself; a decision it logged is checked from memory, any other from the log."""
    eng = Engine(setup)
    ids = [eng.suggest("double", top=1)[0]["id"] for _ in range(3)]
    eng.feedback(ids[0], 0.5)
    other = Engine(setup)  # did not log ids[0]: reads its reward from the store
    assert other.feedback(ids[0], 0.5)["status"] == "unchanged"
    with pytest.raises(Conflict):
        other.feedback(ids[0], 0.6)
    other.feedback(ids[1], 0.7)
    setup.close()
    store = Store.open(simmerge_home)
    eng = Engine(store)
    eng.feedback(ids[2], 0.9)
    assert store.fetchall("SELECT decision_id, seq FROM rewards ORDER BY seq") == list(zip(ids, [1, 2, 3]))
    live = eng.policy()
    assert live.n_updates == 3
    np.testing.assert_allclose(live.snapshot()[0]["A0inv"], eng.rebuild().snapshot()[0]["A0inv"])
    store.close()


def test_repeated_suggestions_reuse_scores_until_the_policy_learns(setup):
    eng = Engine(setup)
    pol = eng.policy()
    calls = []
    score = pol._score
    pol._score = lambda cands: calls.append(1) or score(cands)
    first = eng.suggest("double", top=3)
    second = eng.suggest("double", top=3)
    assert len(calls) == 1
    assert [r["predicted"] for r in first[1:]] == [r["predicted"] for r in second[1:]]
    assert first[0]["explanation"] == second[0]["explanation"] or first[0]["models"] != second[0]["models"]
    eng.feedback(first[0]["id"], 1.5)
    third = eng.suggest("double", top=3)
    assert len(calls) == 2 and third[0]["predicted"] is not None


def test_engine_log_replays_with_the_operator_propensity_given_the_pair(setup):
    """The engine draws (pair, operator); replay's targets pick the operator for the logged pair, so the log's
    propensity must be the operator's given the pair: 1/3 under a uniform policy over 6 pairs x 3 operators (the
    joint 1/18 would make IPS six times too large)."""
    from simmerge_bandit import replay as rp

    eng = Engine(setup)
    score = {"lin": 0.9, "ties5": 0.5, "slerp": 0.7}
    for _ in range(90):
        first = eng.suggest("double", top=2, policy="random")[0]
        eng.feedback(first["id"], score[first["operator"]])
    pp = setup.fetchall("SELECT propensity, pair_propensity FROM decisions WHERE rank = 0")
    assert all(p == pytest.approx(1 / 18) and q == pytest.approx(3 / 18) for p, q in pp)
    log = rp.load_engine_log(setup)
    np.testing.assert_allclose(log.propensities, 1 / 3)
    res = {r["estimator"]: r for r in rp.evaluate(log, ["fixed:lin"], ["ips", "snips"]).results()}
    assert res["snips"]["value"] == pytest.approx(0.9)
    assert res["ips"]["ci_low"] < 0.9 < res["ips"]["ci_high"] and res["ips"]["value"] < 1.5


def test_predictor_model_is_chosen_at_fit_and_kept_by_refits(setup, tmp_path):
    eng = Engine(setup)
    table = _merge_table(eng, tmp_path)
    assert eng.fit_predictor(str(table))["model"] == "mlp"                  # the default
    assert eng.fit_predictor(str(table), model="linear")["model"] == "linear"
    assert eng.fit_predictor(str(table))["model"] == "linear"               # a refit keeps it
    assert Engine(setup).policy("predictor").model == "linear"              # and a restart
    with pytest.raises(InvalidInput, match="model must be"):
        eng.fit_predictor(str(table), model="forest")
    setup.close()
    runner = CliRunner()
    out = runner.invoke(cli, ["predictor", "fit", "--table", str(table), "--model", "mlp", "--json"],
                        catch_exceptions=False)
    assert out.exit_code == 0, out.output
    assert json.loads(out.output)["model"] == "mlp"
    bad = runner.invoke(cli, ["predictor", "fit", "--table", str(table), "--model", "forest"])
    assert bad.exit_code == 2 and "forest" in bad.output and "Traceback" not in bad.output


def test_predictor_model_auto_needs_a_table_and_records_what_it_chose(setup, tmp_path):
    eng = Engine(setup)
    table = _merge_table(eng, tmp_path)
    with pytest.raises(InvalidInput, match="give a table"):
        eng.fit_predictor(model="auto")
    res = eng.fit_predictor(str(table), model="auto")     # one task: nothing to hold out, the first of the grid
    assert res["model"] == "anchored" and res["model_cv"] == {} and res["l2"] == 1e8
    assert eng.fit_predictor(str(table))["l2"] == 1e8      # a refit keeps the choice
    setup.close()
    out = CliRunner().invoke(cli, ["predictor", "fit", "--model", "auto"])
    assert out.exit_code != 0 and "give a table" in out.output and "Traceback" not in out.output


def test_predictor_init_seed_gives_independent_replicates_of_a_fit(setup, tmp_path):
    eng = Engine(setup)
    table = _merge_table(eng, tmp_path)
    assert eng.fit_predictor(str(table))["init_seed"] == 0                  # the default
    first = eng.policy("predictor")
    rows = (first._mu_x + np.random.default_rng(0).normal(size=(4, first._mu_x.size)),
            np.tile(first._mu_z, (4, 1)))
    p0 = first.predict(*rows)
    assert eng.fit_predictor(str(table), init_seed=3)["init_seed"] == 3
    p3 = eng.policy("predictor").predict(*rows)
    assert not np.allclose(p0, p3)                                          # another network
    assert eng.fit_predictor(str(table))["init_seed"] == 3                  # a refit keeps it
    np.testing.assert_allclose(eng.policy("predictor").predict(*rows), p3)  # and the fit is deterministic
    setup.close()
    runner = CliRunner()
    out = runner.invoke(cli, ["predictor", "fit", "--table", str(table), "--init-seed", "0", "--json"],
                        catch_exceptions=False)
    assert out.exit_code == 0, out.output
    assert json.loads(out.output)["init_seed"] == 0
    bad = runner.invoke(cli, ["predictor", "fit", "--table", str(table), "--init-seed", "-1"])
    assert bad.exit_code == 2 and "Traceback" not in bad.output


def assert_is_the_log_fold(store, live) -> None:
    """``live`` (hybrid LinUCB) equals a fresh one updated with the reward log one reward at a time."""
    from simmerge_bandit.policies import make_policy

    ref = make_policy("linucb-hybrid", seed=0)
    for x, op, z, r, prop in store.fetchall(
            "SELECT d.context, d.operator, d.arm, r.reward, d.propensity FROM rewards r "
            "JOIN decisions d ON d.id = r.decision_id ORDER BY r.seq"):
        ref.update(np.asarray(x), json.loads(op)[-1], np.asarray(z), r, prop)
    for key, want in ref.snapshot()[0].items():
        np.testing.assert_allclose(live.snapshot()[0][key], want, rtol=1e-9, atol=1e-12, err_msg=key)


def test_deferred_learning_folds_a_batch_of_rewards_like_one_at_a_time(setup):
    """The daemon's engine learns a batch's rewards together, before the next use of a policy; the state is the
    one-reward-at-a-time fold of the log."""
    eng = Engine(setup)
    eng.defer_learning = True
    live = eng.policy()
    for round_ in range(3):
        ids = [eng.suggest("double", top=1)[0]["id"] for _ in range(5)]
        for k, did in enumerate(ids):
            eng.feedback(did, 0.2 * k + 0.1 * round_)
        assert live.n_updates == 5 * round_          # nothing folded until a policy is used
    assert eng.policy() is live and live.n_updates == 15
    assert_is_the_log_fold(setup, live)


def test_a_learn_interval_holds_rewards_until_due_or_until_a_chunk_waits(setup, monkeypatch):
    """With ``learn_interval_s`` (the daemon's --learn-interval-ms), suggestions rank without the rewards of the
    last interval; the rewards are folded once it has passed, once LEARN_MAX_PENDING wait, or on flush, and the
    state is still the one-at-a-time fold of the log."""
    from simmerge_bandit import engine as engine_mod

    clock = {"t": 1000.0}
    monkeypatch.setattr(engine_mod.time, "monotonic", lambda: clock["t"])
    monkeypatch.setattr(Engine, "LEARN_MAX_PENDING", 6)
    eng = Engine(setup)
    eng.defer_learning, eng.learn_interval_s = True, 0.1
    live = eng.policy()
    ids = [eng.suggest("double", top=1)[0]["id"] for _ in range(9)]
    for k, did in enumerate(ids[:3]):
        eng.feedback(did, 0.1 * k)
    clock["t"] += 0.05
    eng.suggest("double", top=1)
    assert live.n_updates == 0                  # 3 wait, for 50 ms: not due
    clock["t"] += 0.06
    eng.suggest("double", top=1)
    assert live.n_updates == 3                  # the oldest waited 110 ms
    for k, did in enumerate(ids[3:9]):
        eng.feedback(did, 0.5 + 0.05 * k)
    eng.policy()
    assert live.n_updates == 9                  # 6 waited: a chunk's worth, due at once
    eng.feedback(eng.suggest("double", top=1)[0]["id"], 0.9)
    eng.flush()
    assert live.n_updates == 10                 # flush folds what waits
    assert_is_the_log_fold(setup, live)


def test_decision_ids_stay_unique_across_entropy_refills_and_forks(setup, monkeypatch):
    eng = Engine(setup, EngineConfig(eval_budget=0))
    reads = []
    real = os.urandom
    monkeypatch.setattr(os, "urandom", lambda n: reads.append(n) or real(n))
    ids = [r["id"] for _ in range(120) for r in eng.suggest("double", top=4)]  # 120 x 48 bytes: two refills
    assert len(set(ids)) == len(ids) == 480 and all(len(i) == 16 for i in ids)
    assert len(reads) == 2
    assert setup.fetchone("SELECT count(DISTINCT batch) FROM decisions")[0] == 120
    # a forked child (another pid) reads its own bytes instead of reusing the parent's
    monkeypatch.setattr(os, "getpid", lambda: -1)
    eng.suggest("double", top=1)
    assert len(reads) == 3
