"""Policies: the generic contract every registered policy keeps, and reference checks of the linear ones.

Reference values are computed here from the plain formulas (numpy inverses and batch solves), never by calling the
code under test.
"""

from __future__ import annotations

import json
import pkgutil

import numpy as np
import pytest

import simmerge_bandit.policies as policies
from simmerge_bandit.errors import InvalidInput
from simmerge_bandit.policies import Candidates, from_snapshot, make_policy, policy_names

D, K_DESC = 3, 2
OPS = {"lin": [1.0, 0.0], "ties": [0.0, 1.0], "dare": [0.5, 0.5]}


def cands_for(rng, ops=OPS, pairs=4, d=D) -> Candidates:
    """Every pair x every operator; a pair's context is shared by its operators, as in the engine."""
    Xp = rng.normal(size=(pairs, d))
    names = list(ops)
    X = np.repeat(Xp, len(names), axis=0)
    arms = [names[i % len(names)] for i in range(X.shape[0])]
    Z = np.array([ops[a] for a in arms])
    return Candidates(X, arms, Z)


def reward_of(x, arm) -> float:
    base = {"lin": 0.2, "ties": 0.9, "dare": 0.5, "slerp": 0.7}.get(arm, 0.4)
    return base + 0.1 * float(x[0])


def build(name: str, **kw):
    return make_policy("fixed:ties" if name == "fixed" else name, **kw)


def train(policy, steps: int, seed: int = 1):
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        c = cands_for(rng)
        r = policy.rank(c)
        i = r.choice
        policy.update(c.X[i], c.arms[i], c.Z[i], reward_of(c.X[i], c.arms[i]), r.propensity[i])
    return policy


def same_ranking(a, b) -> bool:
    return (a.choice == b.choice and np.array_equal(a.order, b.order) and np.array_equal(a.scores, b.scores)
            and np.array_equal(a.predicted, b.predicted) and np.array_equal(a.propensity, b.propensity))


ALL = policy_names()


# ---- the registry ----

def test_registered_names_cover_every_module():
    # discovery, not a list of names: every module of the package registers its policy, built-ins first
    assert ALL[:8] == ["linucb", "linucb-hybrid", "lints", "egreedy", "vw", "predictor", "random", "fixed"]
    modules = {m.name for m in pkgutil.iter_modules(policies.__path__)
               if not m.name.startswith("_") and m.name != "base"}
    registered = [cls.__module__.rsplit(".", 1)[1] for cls in policies.REGISTRY.values()]
    assert modules == set(registered) and registered == policies.policy_modules(), \
        "a policy module is not in the registry"


def test_make_policy_rejects_bad_names_and_params():
    with pytest.raises(InvalidInput, match="unknown policy 'nope'.*fixed:OPERATOR"):
        make_policy("nope")
    with pytest.raises(InvalidInput, match="no parameter beta"):
        make_policy("linucb", beta=1)
    with pytest.raises(InvalidInput, match="alpha"):
        make_policy("linucb", alpha=-1)
    with pytest.raises(InvalidInput, match="floor"):
        make_policy("lints", floor=0)
    with pytest.raises(InvalidInput, match="takes no ':'"):
        make_policy("linucb:x")
    with pytest.raises(InvalidInput, match="operator name"):
        make_policy("fixed:")
    with pytest.raises(InvalidInput, match="--cb_explore_adf"):
        make_policy("vw", args="--cb_adf")
    with pytest.raises(InvalidInput, match="vw rejected"):
        make_policy("vw", args="--cb_explore_adf --no_such_option")
    with pytest.raises(InvalidInput, match="-f"):
        make_policy("vw", args="--cb_explore_adf -f model.vw")
    with pytest.raises(InvalidInput, match="prior"):
        make_policy("linucb", prior="predictor")


# ---- the generic contract, for every registered policy ----

@pytest.mark.parametrize("name", ALL)
def test_ranking_is_a_valid_distribution_and_order(name):
    p = train(build(name), 15)
    c = cands_for(np.random.default_rng(7))
    r = p.rank(c)
    n = len(c)
    for arr in (r.scores, r.predicted, r.uncertainty, r.propensity):
        assert arr.shape == (n,) and np.isfinite(arr).all()
    assert (r.propensity > 0).all() and r.propensity.sum() == pytest.approx(1.0, abs=1e-12)
    assert (r.propensity >= p.floor / n * (1 - 1e-12)).all()
    assert (r.uncertainty >= 0).all()
    assert 0 <= r.choice < n and r.order[0] == r.choice
    assert sorted(r.order.tolist()) == list(range(n))
    rest = r.scores[r.order[1:]]
    assert (np.diff(rest) <= 0).all(), "after the choice, candidates must come by score descending"


@pytest.mark.parametrize("name", ALL)
def test_choice_is_drawn_from_the_propensities(name):
    p = train(build(name, floor=0.3), 10)
    c = cands_for(np.random.default_rng(3), pairs=2)
    n, runs = len(c), 2500
    hits, mass = np.zeros(n), np.zeros(n)
    for _ in range(runs):
        r = p.rank(c)
        hits[r.choice] += 1
        mass += r.propensity
    assert np.abs(hits / runs - mass / runs).max() < 0.035


@pytest.mark.parametrize("name", ALL)
def test_clone_is_fresh_with_the_same_parameters(name):
    trained = train(build(name, seed=5), 12)
    fresh = trained.clone()
    assert type(fresh) is type(trained) and fresh.params() == trained.params()
    assert fresh.n_updates == 0 and trained.n_updates == 12
    assert fresh.version != trained.version
    new = build(name, seed=5)
    c = cands_for(np.random.default_rng(2))
    assert same_ranking(fresh.rank(c), new.rank(c))
    f_arrays, f_meta = fresh.snapshot()
    n_arrays, n_meta = new.snapshot()
    assert f_meta == n_meta and f_arrays.keys() == n_arrays.keys()


@pytest.mark.parametrize("name", ALL)
def test_snapshot_restore_round_trip(name):
    p = train(build(name), 20)
    arrays, meta = p.snapshot()
    json.dumps(meta)  # JSON-able
    assert all(isinstance(v, np.ndarray) and v.dtype != object for v in arrays.values())
    q = from_snapshot({k: v.copy() for k, v in arrays.items()}, json.loads(json.dumps(meta)))
    also = build(name)
    also.restore({k: np.asfortranarray(v) for k, v in arrays.items()}, meta)  # any memory layout
    assert q.version == p.version == also.version
    rng = np.random.default_rng(11)
    for _ in range(5):  # identical rankings, and identical after learning the same rewards
        c = cands_for(rng)
        rp, rq, ra = p.rank(c), q.rank(c), also.rank(c)
        assert same_ranking(rp, rq) and same_ranking(rp, ra)
        i = rp.choice
        for pol in (p, q, also):
            pol.update(c.X[i], c.arms[i], c.Z[i], reward_of(c.X[i], c.arms[i]), rp.propensity[i])


@pytest.mark.parametrize("name", ALL)
def test_same_seed_same_choices_other_seed_differs(name):
    runs = {}
    for seed in (3, 3, 4):
        p = build(name, seed=seed, floor=0.5)
        rng = np.random.default_rng(0)
        choices = []
        for _ in range(15):
            c = cands_for(rng)
            r = p.rank(c)
            choices.append(r.choice)
            p.update(c.X[r.choice], c.arms[r.choice], c.Z[r.choice], reward_of(c.X[r.choice], c.arms[r.choice]),
                     r.propensity[r.choice])
        runs.setdefault(seed, []).append(choices)
    assert runs[3][0] == runs[3][1]
    assert runs[3][0] != runs[4][0]


@pytest.mark.parametrize("name", ALL)
def test_new_operator_accepted_at_any_time(name):
    p = train(build(name), 15)
    ops = dict(OPS, slerp=[0.2, 0.8])
    c = cands_for(np.random.default_rng(5), ops=ops)
    r = p.rank(c)
    new = [i for i, a in enumerate(c.arms) if a == "slerp"]
    assert (r.propensity[new] > 0).all() and np.isfinite(r.predicted[new]).all()
    before = p.n_updates
    p.update(c.X[new[0]], "slerp", c.Z[new[0]], 0.7, r.propensity[new[0]])
    assert p.n_updates == before + 1
    r2 = p.rank(c)
    assert r2.propensity.sum() == pytest.approx(1.0)
    if name in {"linucb", "linucb-hybrid", "lints", "egreedy", "predictor", "vw"}:
        assert not np.allclose(r2.predicted[new], r.predicted[new]), "the new operator's reward was not learned"


@pytest.mark.parametrize("name", ALL)
def test_bad_input_is_refused_and_changes_nothing(name):
    p = train(build(name), 8)
    arrays, meta = p.snapshot()
    x, z = np.zeros(D), np.array(OPS["lin"])
    for args in [(x, "lin", z, float("nan")), (x, "lin", z, float("inf")), (x, "lin", z, 0.5, 0.0),
                 (x, "lin", z, 0.5, 1.5), (np.zeros(D + 1), "lin", z, 0.5), (x, "lin", np.zeros(3), 0.5),
                 (np.array([np.nan, 0, 0]), "lin", z, 0.5)]:
        with pytest.raises(InvalidInput):
            p.update(*args)
    with pytest.raises(InvalidInput):
        p.rank(Candidates(np.zeros((2, D + 1)), ["lin", "ties"], np.zeros((2, K_DESC))))
    with pytest.raises(InvalidInput):
        Candidates(np.full((2, D), np.nan), ["lin", "ties"], np.zeros((2, K_DESC)))
    with pytest.raises(InvalidInput):
        Candidates(np.zeros((2, D)), ["lin"], np.zeros((2, K_DESC)))
    after_arrays, after_meta = p.snapshot()
    assert after_meta == meta and all(np.array_equal(arrays[k], after_arrays[k]) for k in arrays)


@pytest.mark.parametrize("name", ALL)
def test_explain_matches_the_prediction(name):
    p = train(build(name), 25)
    c = cands_for(np.random.default_rng(9))
    r = p.rank(c)
    for i in (0, 4):
        e = p.explain(c.X[i], c.arms[i], c.Z[i])
        assert e["contributions"].shape == (D,) and np.isfinite(e["contributions"]).all()
        assert e["predicted"] == pytest.approx(r.predicted[i], abs=1e-6)
        if e["method"] == "linear":
            assert e["baseline"] + e["contributions"].sum() == pytest.approx(e["predicted"], abs=1e-9)


@pytest.mark.parametrize("name", ["linucb", "linucb-hybrid", "lints", "egreedy", "vw", "predictor"])
def test_learning_policies_learn_which_operator_pays(name):
    p = train(build(name, floor=0.2), 150)
    c = cands_for(np.random.default_rng(8))
    pred = p.rank(c).predicted
    arms = np.array(c.arms)
    assert pred[arms == "ties"].mean() > pred[arms == "dare"].mean() > pred[arms == "lin"].mean()


# ---- LinUCB against hand computations ----

def test_linucb_equals_hand_computed_case():
    # Arm "a" saw x = 1 (reward 1) and x = 2 (reward 0.5); with the intercept, x~ = [1, x] and l2 = 1:
    #   A = I + [1,1][1,1]^T + [1,2][1,2]^T = [[3, 3], [3, 6]],  A^-1 = [[6, -3], [-3, 3]] / 9
    #   b = [1, 1] + 0.5 [1, 2] = [1.5, 2],  theta = A^-1 b = [1/3, 1/6]
    # Candidates: (x=1, a): mean 1/2, width^2 = 3/9; (x=0, a): mean 1/3, width^2 = 6/9;
    #             (x=1, b) (never seen): mean 0, width^2 = |[1, 1]|^2 = 2.
    for alpha, expected_choice in ((1.0, 2), (0.1, 0)):
        p = make_policy("linucb", alpha=alpha, l2=1.0, floor=0.03)
        p.update(np.array([1.0]), "a", np.zeros(0), 1.0)
        p.update(np.array([2.0]), "a", np.zeros(0), 0.5)
        r = p.rank(Candidates(np.array([[1.0], [0.0], [1.0]]), ["a", "a", "b"], np.zeros((3, 0))))
        np.testing.assert_allclose(r.predicted, [0.5, 1 / 3, 0.0], atol=1e-12)
        np.testing.assert_allclose(r.uncertainty, np.sqrt([3 / 9, 6 / 9, 2.0]), atol=1e-12)
        np.testing.assert_allclose(r.scores, r.predicted + alpha * r.uncertainty, atol=1e-12)
        expected = np.full(3, 0.01)
        expected[expected_choice] += 0.97
        np.testing.assert_allclose(r.propensity, expected, atol=1e-12)
        assert r.order[1:].tolist() == [i for i in np.argsort(-r.scores, kind="stable") if i != r.choice]
    # alpha = 1: UCBs are 0.5 + 0.5774, 0.3333 + 0.8165 and 1.4142, so the unseen arm's candidate is best.


def test_linucb_equals_matrix_formulas_over_a_stream():
    rng = np.random.default_rng(0)
    alpha, lam, d = 0.7, 2.0, 4
    p = make_policy("linucb", alpha=alpha, l2=lam)
    seen = {"a": [], "b": []}
    for t in range(60):
        arm = "ab"[t % 2]
        x = rng.normal(size=d)
        r = float(rng.normal())
        p.update(x, arm, np.zeros(1), r)
        seen[arm].append((np.concatenate(([1.0], x)), r))
    Xc = rng.normal(size=(5, d))
    c = Candidates(np.vstack([Xc, Xc]), ["a"] * 5 + ["b"] * 5, np.zeros((10, 1)))
    ranking = p.rank(c)
    mean, ucb = [], []
    for arm in "ab":
        Xa = np.array([xt for xt, _ in seen[arm]])
        ya = np.array([r for _, r in seen[arm]])
        A = lam * np.eye(d + 1) + Xa.T @ Xa
        theta = np.linalg.inv(A) @ (Xa.T @ ya)
        for x in Xc:
            xt = np.concatenate(([1.0], x))
            mean.append(xt @ theta)
            ucb.append(xt @ theta + alpha * np.sqrt(xt @ np.linalg.inv(A) @ xt))
    np.testing.assert_allclose(ranking.predicted, mean, atol=1e-9)
    np.testing.assert_allclose(ranking.scores, ucb, atol=1e-9)
    assert ranking.propensity.argmax() == int(np.argmax(ucb))


def test_unbalanced_and_interleaved_candidates_rank_like_the_formulas():
    # Operators with 7, 1, 3 and (never seen) 2 candidates, interleaved: exercises the padded batches.
    rng = np.random.default_rng(5)
    lam, d = 1.5, 3
    p = make_policy("linucb", alpha=0.0, l2=lam)
    data = {a: [] for a in "abc"}
    for t in range(40):
        a = "abc"[t % 3]
        x, r = rng.normal(size=d), float(rng.normal())
        p.update(x, a, np.zeros(0), r)
        data[a].append((np.concatenate(([1.0], x)), r))
    arms = list("aaaaaaabcccdd")
    rng.shuffle(arms)
    c = Candidates(rng.normal(size=(len(arms), d)), arms, np.zeros((len(arms), 0)))
    assert sorted(i for _, grid in c.batches for i in grid.ravel() if i < len(c)) == list(range(len(c)))
    assert sum(grid.size for _, grid in c.batches) <= 2 * len(c)
    r = p.rank(c)
    for i, a in enumerate(arms):
        xt = np.concatenate(([1.0], c.X[i]))
        if a == "d":
            assert r.predicted[i] == 0.0 and r.uncertainty[i] == pytest.approx(np.sqrt(xt @ xt / lam))
            continue
        Xa = np.array([v for v, _ in data[a]])
        A = lam * np.eye(d + 1) + Xa.T @ Xa
        assert r.predicted[i] == pytest.approx(xt @ np.linalg.solve(A, Xa.T @ np.array([y for _, y in data[a]])))
        assert r.uncertainty[i] == pytest.approx(np.sqrt(xt @ np.linalg.inv(A) @ xt))


def test_incremental_updates_equal_a_batch_ridge_solve():
    rng = np.random.default_rng(1)
    lam, d, T = 0.5, 6, 400
    p = make_policy("linucb", l2=lam)
    X = rng.normal(size=(T, d)) * rng.uniform(0.1, 10, size=d)  # badly scaled on purpose
    y = X @ rng.normal(size=d) + 0.1 * rng.normal(size=T)
    for x, r in zip(X, y):
        p.update(x, "only", np.zeros(0), r)
    arrays, _ = p.snapshot()
    Xt = np.hstack([np.ones((T, 1)), X])
    A = lam * np.eye(d + 1) + Xt.T @ Xt
    np.testing.assert_allclose(arrays["Ainv"][0], np.linalg.inv(A), rtol=1e-7, atol=1e-12)
    np.testing.assert_allclose(arrays["theta"][0], np.linalg.solve(A, Xt.T @ y), rtol=1e-7, atol=1e-9)


# ---- hybrid LinUCB ----

def _joint_ridge(obs, ops, lam, mu):
    """Li et al.'s hybrid model as one ridge regression: columns [phi = x~ (outer) z~ | x~ in the arm's block]."""
    arms = sorted({a for _, a, _ in obs})
    p = obs[0][0].shape[0] + 1
    q = p * (len(ops[arms[0]]) + 1)

    def row(x, arm, z):
        xt, zt = np.concatenate(([1.0], x)), np.concatenate(([1.0], z))
        out = np.zeros(q + p * len(arms))
        out[:q] = np.outer(xt, zt).ravel()
        if arm in arms:
            j = arms.index(arm)
            out[q + j * p:q + (j + 1) * p] = xt
        return out

    D_ = np.array([row(x, a, ops[a]) for x, a, _ in obs])
    y = np.array([r for _, _, r in obs])
    penalty = np.diag(np.r_[np.full(q, lam), np.full(D_.shape[1] - q, mu)])
    Minv = np.linalg.inv(penalty + D_.T @ D_)
    coef = Minv @ D_.T @ y

    def predict(x, arm, z):
        v = row(x, arm, z)
        var = v @ Minv @ v
        if arm not in arms:  # the new arm's own block is still at its prior, independent of the rest
            var += (1 + x @ x) / mu
        return v @ coef, np.sqrt(var)

    return predict


def test_hybrid_linucb_equals_the_joint_ridge_solution():
    rng = np.random.default_rng(2)
    lam, mu, alpha = 0.8, 3.0, 0.5
    ops = {"lin": np.array([1.0, 0.0]), "ties": np.array([0.0, 1.0]), "dare": np.array([0.5, 0.7])}
    p = make_policy("linucb-hybrid", alpha=alpha, l2=lam, arm_l2=mu)
    obs = []
    for t in range(90):
        arm = list(ops)[rng.integers(3)]
        x = rng.normal(size=D)
        r = float(ops[arm] @ [0.3, 0.8] + 0.2 * x[0] * ops[arm][1] + 0.05 * rng.normal())
        p.update(x, arm, ops[arm], r)
        obs.append((x, arm, r))
    predict = _joint_ridge(obs, {**ops, "new": np.array([0.1, 0.9])}, lam, mu)
    all_ops = {**ops, "new": np.array([0.1, 0.9])}
    Xc = rng.normal(size=(3, D))
    names = [a for a in all_ops for _ in range(3)]
    c = Candidates(np.vstack([Xc] * 4), names, np.array([all_ops[a] for a in names]))
    r = p.rank(c)
    expected = np.array([predict(x, a, all_ops[a]) for x, a in zip(c.X, names)])
    np.testing.assert_allclose(r.predicted, expected[:, 0], atol=1e-8)
    np.testing.assert_allclose(r.uncertainty, expected[:, 1], atol=1e-8)
    np.testing.assert_allclose(r.scores, expected[:, 0] + alpha * expected[:, 1], atol=1e-8)


def test_hybrid_in_the_span_of_few_operators_equals_the_joint_ridge_solution_and_old_snapshots_load():
    """Three operators with 4-number descriptors span 3 of the 5 shared descriptor dimensions: the policy works in
    that span's coordinates. It must still equal the joint ridge solution, for an operator whose descriptor leaves
    the span too, before and after it is learned (learned within a chunk), and a snapshot in the full
    coordinates (as saved before) must load to the same rankings."""
    rng = np.random.default_rng(7)
    lam, mu, alpha = 0.6, 2.0, 0.7
    ops = {"lin": np.array([1.0, 0.0, 0.2, 0.0]), "ties": np.array([0.0, 1.0, 0.0, 0.3]),
           "dare": np.array([0.5, 0.7, 0.1, 0.1]), "new": np.array([0.2, -0.4, 0.9, 0.5])}
    p = make_policy("linucb-hybrid", alpha=alpha, l2=lam, arm_l2=mu)
    obs, rows = [], []
    for t in range(120):
        arm = list(ops)[rng.integers(3 if t < 80 else 4)]
        x = rng.normal(size=D)
        r = float(ops[arm] @ [0.3, 0.8, -0.2, 0.1] + 0.2 * x[0] * ops[arm][1] + 0.05 * rng.normal())
        if t < 80:
            p.update(x, arm, ops[arm], r)
        else:
            rows.append((x, arm, ops[arm], r, 1.0))
        obs.append((x, arm, r))
        if t == 79:  # "new" not learned yet: ranked from its descriptor, part of it outside the span
            assert p._Q.shape[1] == 3
            _check_against_joint_ridge(p, obs, ops, lam, mu, alpha, rng)
    p.update_many(rows)
    assert p._Q.shape[1] == 4
    _check_against_joint_ridge(p, obs, ops, lam, mu, alpha, rng)
    arrays, meta = p.snapshot()
    Q, (pp, r) = arrays["Q"], (D + 1, arrays["Q"].shape[1])
    kt = Q.shape[0]
    full = np.einsum("arbs,tr,us->atbu", arrays["A0inv"].reshape(pp, r, pp, r), Q, Q)
    full += np.einsum("ab,tu->atbu", np.eye(pp), np.eye(kt) - Q @ Q.T) / lam
    old = {k: v for k, v in arrays.items() if k not in ("Q", "beta")}
    old.update(A0inv=full.reshape(pp * kt, -1), b0=(arrays["b0"].reshape(pp, r) @ Q.T).reshape(-1))
    c = Candidates(rng.normal(size=(8, D)), ["lin", "new", "dare", "ties"] * 2,
                   np.array([ops[a] for a in ["lin", "new", "dare", "ties"] * 2]))
    np.testing.assert_allclose(from_snapshot(old, meta).rank(c).scores, p.rank(c).scores, rtol=1e-9, atol=1e-12)


def _check_against_joint_ridge(p, obs, ops, lam, mu, alpha, rng):
    predict = _joint_ridge(obs, ops, lam, mu)
    names = [a for a in ops for _ in range(3)]
    c = Candidates(rng.normal(size=(len(names), D)), names, np.array([ops[a] for a in names]))
    r = p.rank(c)
    expected = np.array([predict(x, a, ops[a]) for x, a in zip(c.X, names)])
    np.testing.assert_allclose(r.predicted, expected[:, 0], atol=1e-8)
    np.testing.assert_allclose(r.uncertainty, expected[:, 1], atol=1e-8)


def test_hybrid_transfers_to_a_brand_new_operator():
    # Reward is a function of the descriptor (density-like second entry); the new operator was never rewarded.
    rng = np.random.default_rng(4)
    ops = {f"op{i}": np.array([1.0, v]) for i, v in enumerate([0.1, 0.3, 0.5, 0.9])}
    truth = lambda x, z: 0.2 + 0.8 * z[1] + 0.1 * x[0]  # noqa: E731
    hybrid, disjoint = make_policy("linucb-hybrid"), make_policy("linucb")
    equal = make_policy("linucb-hybrid", arm_l2=1.0)  # same penalty on the shared and per-operator parts
    for _ in range(200):
        arm = f"op{rng.integers(4)}"
        x = rng.normal(size=D)
        r = truth(x, ops[arm]) + 0.02 * rng.normal()
        for pol in (hybrid, disjoint, equal):
            pol.update(x, arm, ops[arm], r)
    z_new = np.array([1.0, 0.7])
    X = rng.normal(size=(20, D))
    c = Candidates(X, ["brand-new"] * 20, np.repeat(z_new[None], 20, axis=0))
    want = np.array([truth(x, z_new) for x in X])
    err = {name: np.abs(pol.rank(c).predicted - want).max()
           for name, pol in (("hybrid", hybrid), ("disjoint", disjoint), ("equal", equal))}
    assert err["hybrid"] < 0.08
    assert err["disjoint"] > 0.5  # the disjoint model knows nothing about it
    assert err["equal"] > 2 * err["hybrid"]  # why arm_l2 defaults to 10x l2
    with pytest.raises(InvalidInput, match="different descriptor"):
        hybrid.update(X[0], "op1", np.array([1.0, 0.99]), 0.5)


# ---- the other policies' specifics ----

def test_egreedy_and_fixed_distributions():
    p = make_policy("egreedy", epsilon=0.2, floor=0.1)
    p.update(np.ones(D), "ties", OPS["ties"], 1.0)
    c = cands_for(np.random.default_rng(0), pairs=1)  # one candidate per operator: lin, ties, dare
    r = p.rank(c)
    n = 3
    best = int(np.argmax(r.predicted))
    assert c.arms[best] == "ties"
    expected = 0.9 * (0.8 * np.eye(n)[best] + 0.2 / n) + 0.1 / n
    np.testing.assert_allclose(r.propensity, expected, atol=1e-12)

    f = make_policy("fixed:dare", floor=0.06)
    c = cands_for(np.random.default_rng(0), pairs=2)
    r = f.rank(c)
    is_dare = np.array(c.arms) == "dare"
    np.testing.assert_allclose(r.propensity[is_dare], 0.94 / 2 + 0.01)
    assert set(np.array(c.arms)[r.order[:2]]) == {"dare"}
    absent = make_policy("fixed:gone").rank(c)
    np.testing.assert_allclose(absent.propensity, 1 / 6)


def test_lints_propensity_is_its_sampling_frequency():
    p = train(make_policy("lints", n_samples=16, floor=0.01), 30)
    c = cands_for(np.random.default_rng(1))
    r = p.rank(c)
    raw = (r.propensity - 0.01 / len(c)) / 0.99
    np.testing.assert_allclose(raw * 16, np.round(raw * 16), atol=1e-9)  # multiples of 1/16


def test_lints_draws_from_the_ridge_posterior():
    # scores are one posterior draw: over many rankings their mean is the ridge estimate and their covariance
    # v^2 X A^-1 X^T (computed here from the plain formulas) within one operator, zero across operators.
    rng = np.random.default_rng(12)
    v, lam = 0.7, 2.0
    p = make_policy("lints", v=v, l2=lam, n_samples=1)
    rows = []
    for _ in range(25):
        x, r = rng.normal(size=D), float(rng.normal())
        p.update(x, "ties", OPS["ties"], r)
        rows.append((np.concatenate(([1.0], x)), r))
    c = Candidates(rng.normal(size=(4, D)), ["ties", "ties", "ties", "lin"],
                   np.array([OPS["ties"]] * 3 + [OPS["lin"]]))
    S = np.array([p.rank(c).scores for _ in range(4000)])
    Xa = np.array([x for x, _ in rows])
    A = lam * np.eye(D + 1) + Xa.T @ Xa
    Xc = np.hstack([np.ones((4, 1)), c.X])
    mean = Xc[:3] @ np.linalg.solve(A, Xa.T @ np.array([r for _, r in rows]))
    cov = v * v * Xc[:3] @ np.linalg.inv(A) @ Xc[:3].T
    emp = np.cov(S.T)
    np.testing.assert_allclose(S[:, :3].mean(0), mean, atol=4 * np.sqrt(cov.diagonal().max() / 4000))
    np.testing.assert_allclose(emp[:3, :3], cov, atol=0.1 * cov.diagonal().max())
    assert emp[3, 3] == pytest.approx(v * v * (Xc[3] @ Xc[3]) / lam, rel=0.1)  # never seen: prior
    assert abs(emp[0, 3]) < 0.1 * np.sqrt(emp[0, 0] * emp[3, 3])


def test_predictor_fit_equals_closed_form_and_ranks_with_no_evaluations():
    rng = np.random.default_rng(3)
    m = 120
    X = rng.normal(size=(m, D)) * [1.0, 5.0, 0.1] + [0.0, 2.0, 0.0]
    names = [list(OPS)[i % 3] for i in range(m)]
    Z = np.array([OPS[a] for a in names])
    y = 0.5 + 0.3 * Z[:, 1] * X[:, 0] + 0.01 * rng.normal(size=m)
    pred = make_policy("predictor", l2=0.3, model="linear").fit(X, Z, names, y)
    # Closed form: standardize with the table's statistics, phi = [1, x_std] (outer) [1, z_std], ridge solve.
    xs = (X - X.mean(0)) / X.std(0)
    zs = (Z - Z.mean(0)) / Z.std(0)
    Phi = np.einsum("ij,ik->ijk", np.hstack([np.ones((m, 1)), xs]), np.hstack([np.ones((m, 1)), zs])).reshape(m, -1)
    beta = np.linalg.solve(0.3 * np.eye(Phi.shape[1]) + Phi.T @ Phi, Phi.T @ y)
    c = cands_for(np.random.default_rng(4))
    xs_c = (c.X - X.mean(0)) / X.std(0)
    zs_c = (c.Z - Z.mean(0)) / Z.std(0)
    Phi_c = np.einsum("ij,ik->ijk", np.hstack([np.ones((len(c), 1)), xs_c]),
                      np.hstack([np.ones((len(c), 1)), zs_c])).reshape(len(c), -1)
    r = pred.rank(c)
    np.testing.assert_allclose(r.predicted, Phi_c @ beta, atol=1e-9)
    Ainv = np.linalg.inv(0.3 * np.eye(Phi.shape[1]) + Phi.T @ Phi)
    np.testing.assert_allclose(r.uncertainty, np.sqrt(np.einsum("ij,jk,ik->i", Phi_c, Ainv, Phi_c)), atol=1e-9)
    assert r.propensity.argmax() == int(np.argmax(Phi_c @ beta))
    # Descriptors that vary within one operator's candidates take the general (per-row) path.
    Zj = c.Z + np.random.default_rng(5).normal(scale=0.1, size=c.Z.shape)
    Phi_j = np.einsum("ij,ik->ijk", np.hstack([np.ones((len(c), 1)), xs_c]),
                      np.hstack([np.ones((len(c), 1)), (Zj - Z.mean(0)) / Z.std(0)])).reshape(len(c), -1)
    np.testing.assert_allclose(pred.rank(Candidates(c.X, c.arms, Zj)).uncertainty,
                               np.sqrt(np.einsum("ij,jk,ik->i", Phi_j, Ainv, Phi_j)), atol=1e-9)
    assert pred.summary()["n"] == m and pred.summary()["operators"] == {"lin": 40, "ties": 40, "dare": 40}
    # One more evaluated merge through update() equals refitting the same standardized rows with it added.
    x_new, z_new, y_new = X[0] + 1.0, Z[0], 0.9
    pred.update(x_new, "lin", z_new, y_new)
    phi_new = np.outer(np.concatenate(([1.0], (x_new - X.mean(0)) / X.std(0))),
                       np.concatenate(([1.0], (z_new - Z.mean(0)) / Z.std(0)))).ravel()
    Phi2, y2 = np.vstack([Phi, phi_new]), np.append(y, y_new)
    beta2 = np.linalg.solve(0.3 * np.eye(Phi.shape[1]) + Phi2.T @ Phi2, Phi2.T @ y2)
    np.testing.assert_allclose(pred.rank(c).predicted, Phi_c @ beta2, atol=1e-9)
    with pytest.raises(InvalidInput, match="finite"):
        make_policy("predictor").fit(X, Z, names, np.full(m, np.nan))


def test_predictor_online_weight_counts_a_reward_as_several_fitted_rows():
    """online_weight=w: an online reward enters the ridge solve with weight w (closed form: a weighted refit)."""
    rng = np.random.default_rng(7)
    m = 60
    X = rng.normal(size=(m, D))
    names = [list(OPS)[i % 3] for i in range(m)]
    Z = np.array([OPS[a] for a in names])
    y = 0.4 + 0.2 * X[:, 1] * Z[:, 0] + 0.05 * rng.normal(size=m)
    w = 4.0
    pred = make_policy("predictor", l2=0.5, online_weight=w, model="linear").fit(X, Z, names, y)
    x_new, z_new, y_new = X[1] - 0.5, Z[1], 1.1
    pred.update(x_new, names[1], z_new, y_new)
    xs, zs = (X - X.mean(0)) / X.std(0), (Z - Z.mean(0)) / Z.std(0)
    Phi = np.einsum("ij,ik->ijk", np.hstack([np.ones((m, 1)), xs]), np.hstack([np.ones((m, 1)), zs])).reshape(m, -1)
    phi = np.outer(np.concatenate(([1.0], (x_new - X.mean(0)) / X.std(0))),
                   np.concatenate(([1.0], (z_new - Z.mean(0)) / Z.std(0)))).ravel()
    A = 0.5 * np.eye(Phi.shape[1]) + Phi.T @ Phi + w * np.outer(phi, phi)
    beta = np.linalg.solve(A, Phi.T @ y + w * y_new * phi)
    c = cands_for(np.random.default_rng(8))
    Phi_c = np.einsum("ij,ik->ijk", np.hstack([np.ones((len(c), 1)), (c.X - X.mean(0)) / X.std(0)]),
                      np.hstack([np.ones((len(c), 1)), (c.Z - Z.mean(0)) / Z.std(0)])).reshape(len(c), -1)
    r = pred.rank(c)
    np.testing.assert_allclose(r.predicted, Phi_c @ beta, atol=1e-9)
    np.testing.assert_allclose(r.uncertainty, np.sqrt(np.einsum("ij,jk,ik->i", Phi_c, np.linalg.inv(A), Phi_c)),
                               atol=1e-9)
    with pytest.raises(InvalidInput, match="online_weight"):
        make_policy("predictor", online_weight=0)


def test_a_snapshot_from_before_a_new_parameter_restores_at_its_default():
    pred = make_policy("predictor").fit(np.eye(3), np.eye(3), ["lin", "ties", "dare"], np.array([0.1, 0.2, 0.3]))
    arrays, meta = pred.snapshot()
    del meta["params"]["online_weight"]                    # as written before the parameter existed
    again = make_policy("predictor")
    again.restore(arrays, meta)
    np.testing.assert_allclose(again.predict(np.eye(3), np.eye(3)), pred.predict(np.eye(3), np.eye(3)))
    with pytest.raises(InvalidInput, match="online_weight"):
        make_policy("predictor", online_weight=5).restore(arrays, meta)


@pytest.mark.parametrize("name", ["linucb", "linucb-hybrid", "lints", "egreedy"])
def test_bandits_warm_start_from_the_predictor_as_a_residual(name):
    rng = np.random.default_rng(6)
    m = 90
    X = rng.normal(size=(m, D))
    names = [list(OPS)[i % 3] for i in range(m)]
    Z = np.array([OPS[a] for a in names])
    y = np.array([reward_of(x, a) for x, a in zip(X, names)])
    prior = make_policy("predictor").fit(X, Z, names, y)
    p = make_policy(name, prior=prior, l2=1.0)
    c = cands_for(np.random.default_rng(7))
    np.testing.assert_allclose(p.rank(c).predicted, prior.predict(c.X, c.Z), atol=1e-12)
    assert train(p, 10).n_updates == 10 and prior.n_updates == m  # the prior stays frozen
    arrays, meta = p.snapshot()
    assert meta["params"]["prior"] == "predictor" and any(k.startswith("prior/") for k in arrays)
    q = from_snapshot(arrays, meta)
    assert same_ranking(p.rank(c), q.rank(c))
    assert p.clone().prior is prior
    if name == "linucb":  # residual learning: ridge on reward - prior, checked against the batch solve
        fresh = make_policy("linucb", prior=prior, alpha=0.0)
        rows = []
        for t in range(20):
            x, arm = X[t], names[t]
            fresh.update(x, arm, OPS[arm], 1.0 + x[1])
            rows.append((x, arm, 1.0 + x[1] - prior.predict(x[None], np.array([OPS[arm]]))[0]))
        sel = [(np.concatenate(([1.0], x)), r) for x, a, r in rows if a == "ties"]
        Xa, ya = np.array([s[0] for s in sel]), np.array([s[1] for s in sel])
        theta = np.linalg.solve(np.eye(D + 1) + Xa.T @ Xa, Xa.T @ ya)
        c1 = Candidates(X[:4], ["ties"] * 4, np.array([OPS["ties"]] * 4))
        want = prior.predict(c1.X, c1.Z) + np.hstack([np.ones((4, 1)), X[:4]]) @ theta
        np.testing.assert_allclose(fresh.rank(c1).predicted, want, atol=1e-9)


def test_vw_uses_its_pmf_and_accepts_any_arguments():
    p = make_policy("vw", args="--cb_explore_adf --epsilon 0.2 -q xa", floor=0.05)
    p.update(np.ones(D), "ties", OPS["ties"], 1.0, 0.5)
    c = cands_for(np.random.default_rng(0), pairs=1)
    r = p.rank(c)
    # epsilon-greedy pmf from VW: 0.8 + 0.2/3 on its best action, 0.2/3 elsewhere; then our floor.
    raw = (r.propensity - 0.05 / 3) / 0.95
    np.testing.assert_allclose(np.sort(raw), [0.2 / 3, 0.2 / 3, 0.8 + 0.2 / 3], atol=1e-6)
    assert c.arms[int(np.argmax(raw))] == "ties"
    odd = make_policy("vw")
    odd.update(np.ones(D), "name with spaces|and:colons", np.zeros(K_DESC), 1.0)
    assert np.isfinite(odd.rank(Candidates(np.ones((1, D)), ["name with spaces|and:colons"],
                                           np.zeros((1, K_DESC)))).predicted).all()
