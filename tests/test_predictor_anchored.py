"""The SimMerge predictor's ``anchored`` model: the operators' own means and the metadata rules' interactions
fitted first (hand-computed here), a shrunk linear model of what is left, snapshots, online updates, the grid
path and a descriptor remap."""

from __future__ import annotations

import numpy as np
import pytest

from simmerge_bandit.context import TASK_BUCKETS
from simmerge_bandit.descriptor import DescriptorMap, operator_descriptor
from simmerge_bandit.policies import Candidates, from_snapshot, make_policy
from simmerge_bandit.policies.predictor import rule_features
from simmerge_bandit.signals.metadata import METADATA_NAMES

OPS = [{"name": "linear", "method": "linear", "params": {"weight": 1.0}},
       {"name": "ties_d0.5", "method": "ties", "params": {"density": 0.5}},
       {"name": "slerp_t0.3", "method": "slerp", "params": {"t": 0.3}},
       {"name": "slerp_t0.7", "method": "slerp", "params": {"t": 0.7}}]
NAMES = [o["name"] for o in OPS]
Z_OPS = np.array([operator_descriptor(o) for o in OPS])
F = 3  # signal features before the metadata block
META = {n: F + i for i, n in enumerate(METADATA_NAMES)}
WIDTH = F + len(METADATA_NAMES) + TASK_BUCKETS


def contexts(rng, n: int) -> np.ndarray:
    """Engine-layout contexts: random signals, known scores of both sides and their difference, equal tags."""
    X = np.zeros((n, WIDTH))
    X[:, :F] = rng.normal(size=(n, F))
    X[:, META["known_score_a"]] = rng.uniform(0.3, 0.7, n)
    X[:, META["known_score_b"]] = rng.uniform(0.3, 0.7, n)
    X[:, META["known_diff"]] = X[:, META["known_score_a"]] - X[:, META["known_score_b"]]
    X[:, META["tag_share_a"]] = X[:, META["tag_share_b"]] = 0.4
    return X


#: each operator's own mean, and how much leaning a slerp towards the stronger side is worth
MEANS = np.array([0.80, 0.85, 0.83, 0.83])
TOWARDS_STRONGER = 0.25


def rewards(X: np.ndarray) -> np.ndarray:
    """(n, 4): the operator's mean, plus TOWARDS_STRONGER * lean * sign(known_diff) for the slerps."""
    lean = np.array([0.0, 0.0, 0.2, -0.2])
    return MEANS + TOWARDS_STRONGER * np.sign(X[:, META["known_diff"]])[:, None] * lean


def rows(X: np.ndarray):
    n = len(X)
    return np.repeat(X, len(OPS), 0), np.tile(Z_OPS, (n, 1)), NAMES * n


def test_rule_features_by_hand():
    x = np.zeros(WIDTH)
    x[META["known_diff"]] = 0.2
    x[META["tag_share_a"]], x[META["tag_share_b"]] = 0.6, 0.1
    got = rule_features(np.tile(x, (4, 1)), Z_OPS)
    np.testing.assert_allclose(got, [[0, 0], [0, 0], [0.2, 0.2], [-0.2, -0.2]], atol=1e-12)
    # a context that is not the engine's layout carries no rule
    assert not rule_features(np.ones((4, 5)), Z_OPS).any()


def test_anchor_is_the_operators_means_plus_the_least_squares_rule_weights():
    rng = np.random.default_rng(0)
    X = contexts(rng, 30)
    Xr, Zr, names = rows(X)
    R = rewards(X) + rng.normal(scale=0.01, size=(30, 4))
    pred = make_policy("predictor", model="anchored", l2=1e9).fit(Xr, Zr, names, R.ravel())
    # by hand: per-operator means, then least squares of the rest on the rule features
    means = R.mean(0)
    rest = (R - means).ravel()
    Fr = rule_features(Xr, Zr)
    gamma = np.linalg.lstsq(Fr, rest, rcond=None)[0]
    np.testing.assert_allclose(pred._gamma, gamma, atol=1e-4)
    Xn = contexts(np.random.default_rng(1), 12)
    Xnr, Znr, _ = rows(Xn)
    want = np.tile(means, 12) + rule_features(Xnr, Znr) @ gamma
    np.testing.assert_allclose(pred.predict(Xnr, Znr), want, atol=1e-4)
    # and so it picks the slerp towards the stronger source on pairs it never saw
    best = pred.predict(Xnr, Znr).reshape(12, 4).argmax(1)
    np.testing.assert_array_equal(best, np.where(Xn[:, META["known_diff"]] > 0, 2, 3))


def test_an_unseen_operator_falls_back_to_the_descriptor_ridge_of_the_means():
    rng = np.random.default_rng(2)
    X = contexts(rng, 20)
    Xr, Zr, names = rows(X)
    pred = make_policy("predictor", model="anchored", l2=1e9).fit(Xr, Zr, names, rewards(X).ravel())
    z = operator_descriptor({"name": "ties_d0.8", "method": "ties", "params": {"density": 0.8}})
    zt = np.concatenate([[1.0], (z - pred._mu_z) / pred._sd_z])
    got = pred.predict(X[:1], z[None])[0]
    assert got == pytest.approx(float(zt @ pred._off_w), abs=1e-4)
    assert 0.75 < got < 0.9  # a ties variant lands near the operators' means, not at 0


def test_snapshot_online_update_and_grid_path_agree():
    rng = np.random.default_rng(3)
    X = contexts(rng, 25)
    Xr, Zr, names = rows(X)
    pred = make_policy("predictor", model="anchored", l2=100.0, l2_main=1.0).fit(
        Xr, Zr, names, (rewards(X) + rng.normal(scale=0.02, size=(25, 4))).ravel())
    again = from_snapshot(*pred.snapshot())
    Xt, Zt, arms = rows(contexts(rng, 5))
    grid = Candidates(Xt, arms, Zt)
    assert grid.grid is not None
    perm = rng.permutation(len(arms))
    mixed = Candidates(Xt[perm], [arms[i] for i in perm], Zt[perm])
    np.testing.assert_allclose(pred.rank(grid).predicted[perm], pred.rank(mixed).predicted, atol=1e-10)
    np.testing.assert_array_equal(again.rank(grid).predicted, pred.rank(grid).predicted)
    np.testing.assert_allclose(pred.rank(grid).predicted, pred.predict(Xt, Zt), atol=1e-10)
    # an online reward moves the residual model, not the anchor: the row's prediction moves towards it
    before = float(pred.predict(Xt[:1], Zt[:1])[0])
    for p in (pred, again):
        p.update(Xt[0], arms[0], Zt[0], before + 0.3)
    after = float(pred.predict(Xt[:1], Zt[:1])[0])
    assert before < after < before + 0.3
    np.testing.assert_allclose(again.predict(Xt, Zt), pred.predict(Xt, Zt), atol=1e-12)


def test_an_identity_descriptor_remap_keeps_the_predictions():
    rng = np.random.default_rng(4)
    X = contexts(rng, 20)
    Xr, Zr, names = rows(X)
    pred = make_policy("predictor", model="anchored", l2=100.0).fit(Xr, Zr, names, rewards(X).ravel())
    want = pred.predict(Xr, Zr)
    k = Z_OPS.shape[1]
    assert pred.remap_descriptor(DescriptorMap(np.arange(k), np.ones(k), np.zeros(k), k))
    np.testing.assert_allclose(pred.predict(Xr, Zr), want, atol=1e-10)


@pytest.mark.parametrize("bad", [dict(l2_meta=0), dict(l2_main=-1.0), dict(l2_signals=float("nan")),
                                 dict(l2_buckets="big")])
def test_bad_block_penalties_are_refused(bad):
    from simmerge_bandit.errors import InvalidInput

    with pytest.raises(InvalidInput):
        make_policy("predictor", model="anchored", **bad)


def _cv_table(rng, reward):
    """Three tasks x 10 pairs each, every operator on every pair: rows X, Z, y and the rows' cases."""
    X = contexts(rng, 30)
    R = reward(X) + rng.normal(scale=0.005, size=(30, 4))
    Xr, Zr, _ = rows(X)
    cases = [(f"t{i // 10}", f"a{i}", f"b{i}") for i in range(30) for _ in range(4)]
    return Xr, Zr, R.ravel(), cases


#: the auto grid's kinds of model, the network made small (what is tested is the choice, not the network's size)
GRID = ({"model": "anchored", "l2": 1e8}, {"model": "anchored", "l2": 1e4},
        {"model": "mlp", "hidden": 16, "members": 1, "epochs": 60})


def test_auto_chooses_the_anchor_where_the_rules_hold_and_the_network_where_they_do_not():
    from simmerge_bandit.predictorfit import choose_model

    # the rules' world: operator means plus a slerp towards the stronger source
    params, cv = choose_model(*_cv_table(np.random.default_rng(5), rewards), grid=GRID)
    assert params["model"] == "anchored" and cv["model=anchored,l2=1e+08"] > 0.9, cv

    # a world no linear model follows: ties wins when |signal 0| is large, linear when it is small
    def by_abs(X):
        big = np.abs(X[:, 0]) > 0.8
        return np.stack([np.where(big, 0.3, 0.8), np.where(big, 0.8, 0.3), np.full(len(X), 0.5),
                         np.full(len(X), 0.5)], 1)

    params, cv = choose_model(*_cv_table(np.random.default_rng(6), by_abs), grid=GRID)
    assert params["model"] == "mlp", cv
    assert cv["model=mlp,hidden=16,members=1,epochs=60"] > max(v for k, v in cv.items() if "anchored" in k), cv
