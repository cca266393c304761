"""The SimMerge predictor's network model (``model="mlp"``): pair centring, determinism, what it can represent
that the linear model cannot, its online head against the closed form, explanations and snapshots."""

from __future__ import annotations

import numpy as np
import pytest

from simmerge_bandit.errors import InvalidInput
from simmerge_bandit.policies import Candidates, from_snapshot, make_policy
from simmerge_bandit.policies import _mlp

OPS = {"lin": [1.0, 0.0, 0.0], "ties": [0.0, 1.0, 0.5], "dare": [0.0, 1.0, 0.9]}
NAMES = list(OPS)
SMALL = dict(hidden=16, epochs=150, members=2)  # fast, still enough to learn the cases below


def grid_rows(X: np.ndarray):
    """Every context x every operator, pair-major (as a full merge table): rows X, Z, names."""
    n = len(X)
    names = NAMES * n
    return np.repeat(X, len(NAMES), 0), np.tile(np.array([OPS[a] for a in NAMES]), (n, 1)), names


def best_by_abs(X: np.ndarray) -> np.ndarray:
    """A rule no linear (x ⊗ z) model can follow: ties wins when |x0| is large, lin when it is small."""
    R = np.empty((len(X), 3))
    big = np.abs(X[:, 0]) > 0.8
    R[:, 0] = np.where(big, 0.3, 0.7)
    R[:, 1] = np.where(big, 0.8, 0.2)
    R[:, 2] = 0.4 + 0.05 * X[:, 1]
    return R


def within_pair_differences(pred: np.ndarray) -> np.ndarray:
    P = pred.reshape(-1, len(NAMES))
    return P - P[:, :1]


def test_adding_a_constant_per_pair_leaves_the_ranking_within_each_pair_unchanged():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(60, 4))
    Xr, Zr, names = grid_rows(X)
    y = best_by_abs(X).ravel() + 0.02 * rng.normal(size=len(Xr))
    shift = np.repeat(rng.normal(scale=3.0, size=len(X)), len(NAMES))  # large, different for every pair
    a = make_policy("predictor", **SMALL).fit(Xr, Zr, names, y)
    b = make_policy("predictor", **SMALL).fit(Xr, Zr, names, y + shift)
    Xt, Zt, _ = grid_rows(rng.normal(size=(30, 4)))
    pa, pb = a.predict(Xt, Zt), b.predict(Xt, Zt)
    np.testing.assert_allclose(within_pair_differences(pa), within_pair_differences(pb), atol=1e-6)
    assert not np.allclose(pa, pb)  # the level model did see the shift: predictions stay in reward units


def test_a_pair_seen_with_one_operator_still_teaches_the_operator():
    """Rows whose pair has no other evaluated operator are centred on the overall mean, not on themselves."""
    rng = np.random.default_rng(1)
    m = 90
    X = rng.normal(size=(m, 4))                        # every row its own pair
    names = [NAMES[i % 3] for i in range(m)]
    Z = np.array([OPS[a] for a in names])
    y = np.array([{"lin": 0.2, "ties": 0.8, "dare": 0.5}[a] for a in names])
    pred = make_policy("predictor", **SMALL).fit(X, Z, names, y)
    Xt, Zt, _ = grid_rows(rng.normal(size=(20, 4)))
    P = pred.predict(Xt, Zt).reshape(-1, 3)
    assert (P.argmax(1) == 1).all() and (P[:, 1] - P[:, 0]).mean() > 0.3


def test_the_network_learns_what_the_linear_model_cannot():
    rng = np.random.default_rng(2)
    X = rng.normal(size=(150, 4))
    Xr, Zr, names = grid_rows(X)
    y = best_by_abs(X).ravel()
    Xtest = rng.normal(size=(200, 4))
    Xt, Zt, _ = grid_rows(Xtest)
    truth = best_by_abs(Xtest).argmax(1)

    def accuracy(model):
        p = make_policy("predictor", model=model, **SMALL).fit(Xr, Zr, names, y)
        return float(np.mean(p.predict(Xt, Zt).reshape(-1, 3).argmax(1) == truth))

    assert accuracy("mlp") > 0.9
    assert accuracy("linear") < 0.75


def test_the_fit_is_deterministic_and_does_not_depend_on_the_exploration_seed():
    rng = np.random.default_rng(3)
    X = rng.normal(size=(40, 4))
    Xr, Zr, names = grid_rows(X)
    y = best_by_abs(X).ravel()
    _mlp._FITS.clear()  # a real second training, not the cached one
    a = make_policy("predictor", seed=0, **SMALL).fit(Xr, Zr, names, y)
    _mlp._FITS.clear()
    b = make_policy("predictor", seed=5, **SMALL).fit(Xr, Zr, names, y)
    np.testing.assert_array_equal(a.predict(Xr, Zr), b.predict(Xr, Zr))
    c = make_policy("predictor", seed=0, hidden=8, epochs=150, members=2).fit(Xr, Zr, names, y)
    assert not np.allclose(c.predict(Xr, Zr), a.predict(Xr, Zr))  # the cache keys on the settings


def _head_features(arrays: dict, X: np.ndarray, Z: np.ndarray) -> np.ndarray:
    """``[1, h(x_std, z_std)]`` recomputed from a snapshot with plain numpy (two ReLU layers per member)."""
    inputs = np.hstack([(X - arrays["mu_x"]) / arrays["sd_x"], (Z - arrays["mu_z"]) / arrays["sd_z"]])
    hs = []
    for i in range(SMALL["members"]):
        w = {k: arrays[f"mlp/{i}/{k}"] for k in ("0_weight", "0_bias", "2_weight", "2_bias")}
        h = np.maximum(inputs @ w["0_weight"].T + w["0_bias"], 0)
        hs.append(np.maximum(h @ w["2_weight"].T + w["2_bias"], 0))
    return np.hstack([np.ones((len(X), 1)), *hs])


def test_online_head_update_equals_the_weighted_closed_form():
    rng = np.random.default_rng(4)
    X = rng.normal(size=(40, 4))
    Xr, Zr, names = grid_rows(X)
    y = best_by_abs(X).ravel()
    w, l2 = 6.0, 0.7
    pred = make_policy("predictor", online_weight=w, l2=l2, **SMALL).fit(Xr, Zr, names, y)
    arrays, _ = pred.snapshot()
    Phi = _head_features(arrays, Xr, Zr)

    def level(A):
        return np.hstack([np.ones((len(A), 1)), (A - arrays["mu_x"]) / arrays["sd_x"]]) @ arrays["level"]
    # the fitted head is the ridge solve of the within-pair target on Phi
    yc = y - np.repeat(y.reshape(-1, 3).mean(1), 3)
    A = Phi.T @ Phi + l2 * np.eye(Phi.shape[1])
    np.testing.assert_allclose(arrays["beta"], np.linalg.solve(A, Phi.T @ yc), atol=1e-8)
    x_new, z_new, r_new = rng.normal(size=4), np.array(OPS["ties"]), 0.95
    pred.update(x_new, "ties", z_new, r_new)
    phi = _head_features(arrays, x_new[None], z_new[None])[0]
    A2 = A + w * np.outer(phi, phi)
    beta2 = np.linalg.solve(A2, Phi.T @ yc + w * (r_new - level(x_new[None])[0]) * phi)
    Xt, Zt, _ = grid_rows(rng.normal(size=(5, 4)))
    Pt = _head_features(arrays, Xt, Zt)
    r = pred.rank(Candidates(Xt, NAMES * 5, Zt))
    np.testing.assert_allclose(r.predicted, level(Xt) + Pt @ beta2, atol=1e-8)
    np.testing.assert_allclose(r.uncertainty, np.sqrt(np.einsum("ij,jk,ik->i", Pt, np.linalg.inv(A2), Pt)),
                               atol=1e-8)


def test_snapshot_restores_the_network_and_keeps_learning_alike():
    rng = np.random.default_rng(5)
    X = rng.normal(size=(40, 4))
    Xr, Zr, names = grid_rows(X)
    pred = make_policy("predictor", **SMALL).fit(Xr, Zr, names, best_by_abs(X).ravel())
    again = from_snapshot(*pred.snapshot())
    Xt, Zt, _ = grid_rows(rng.normal(size=(6, 4)))
    c = Candidates(Xt, NAMES * 6, Zt)
    np.testing.assert_array_equal(again.rank(c).predicted, pred.rank(c).predicted)
    for p in (pred, again):
        p.update(Xt[0], "dare", Zt[2], 0.9)
    np.testing.assert_allclose(again.rank(c).predicted, pred.rank(c).predicted, atol=1e-12)


def test_a_linear_snapshot_stays_linear_under_the_network_default():
    """A snapshot without networks (fitted linearly, e.g. before the network existed) restores as linear."""
    rng = np.random.default_rng(6)
    X = rng.normal(size=(20, 4))
    Xr, Zr, names = grid_rows(X)
    lin = make_policy("predictor", model="linear").fit(Xr, Zr, names, best_by_abs(X).ravel())
    arrays, meta = lin.snapshot()
    del meta["params"]["model"]                         # as written before the parameter existed
    restored = make_policy("predictor")
    restored.restore(arrays, meta)
    np.testing.assert_allclose(restored.predict(Xr, Zr), lin.predict(Xr, Zr))


def test_occlusion_explanation_of_the_network():
    rng = np.random.default_rng(7)
    X = rng.normal(size=(50, 4))
    Xr, Zr, names = grid_rows(X)
    pred = make_policy("predictor", **SMALL).fit(Xr, Zr, names, best_by_abs(X).ravel())
    x, z = np.array([1.5, -0.2, 0.3, 0.0]), np.array(OPS["ties"])
    e = pred.explain(x, "ties", z)
    assert e["method"] == "occlusion"
    assert e["predicted"] == pytest.approx(float(pred.predict(x[None], z[None])[0]))
    mu = X.mean(0)
    assert e["baseline"] == pytest.approx(float(pred.predict(mu[None], z[None])[0]))
    for j in range(4):
        xj = x.copy()
        xj[j] = mu[j]
        assert e["contributions"][j] == pytest.approx(e["predicted"] - float(pred.predict(xj[None], z[None])[0]))
    assert abs(e["contributions"][0]) > abs(e["contributions"][3])  # |x0| decides; x3 is noise


@pytest.mark.parametrize("bad", [dict(model="forest"), dict(hidden=0), dict(epochs=1.5), dict(members=True)])
def test_bad_network_parameters_are_refused(bad):
    with pytest.raises(InvalidInput):
        make_policy("predictor", **bad)


def test_ranking_every_pair_x_every_operator_equals_the_general_path():
    rng = np.random.default_rng(8)
    X = rng.normal(size=(40, 4))
    Xr, Zr, names = grid_rows(X)
    pred = make_policy("predictor", **SMALL).fit(Xr, Zr, names, best_by_abs(X).ravel())
    Xt, Zt, arms = grid_rows(rng.normal(size=(7, 4)))
    grid = Candidates(Xt, arms, Zt)
    assert grid.grid is not None and grid.grid_Z is not None          # the fast path applies
    perm = rng.permutation(len(arms))
    mixed = Candidates(Xt[perm], [arms[i] for i in perm], Zt[perm])
    assert mixed.grid is None                                           # the general path
    a, b = pred.rank(grid), pred.rank(mixed)
    np.testing.assert_allclose(a.predicted[perm], b.predicted, atol=1e-10)
    np.testing.assert_allclose(a.uncertainty[perm], b.uncertainty, atol=1e-10)
    np.testing.assert_allclose(a.predicted, pred.predict(Xt, Zt), atol=1e-10)


@pytest.mark.parametrize("model", ["mlp", "linear"])
def test_a_descriptor_coordinate_no_fitted_row_varied_changes_nothing(model):
    """A coordinate constant over the fit (here appended as 0, as a group's ``spread:weight`` is on a table of
    pairs) says nothing the fit could learn: the fit with it predicts exactly as the fit without it, and a
    candidate that has a value there predicts as one that does not."""
    rng = np.random.default_rng(4)
    X = rng.normal(size=(120, 4))
    Xr, Zr, names = grid_rows(X)
    y = best_by_abs(X).ravel()
    wide = np.hstack([Zr, np.zeros((len(Zr), 1))])
    p = make_policy("predictor", model=model, **SMALL).fit(Xr, wide, names, y)
    q = make_policy("predictor", model=model, **SMALL).fit(Xr, Zr, names, y)
    Xt, Zt, _ = grid_rows(rng.normal(size=(30, 4)))
    off = np.hstack([Zt, np.zeros((len(Zt), 1))])
    on = np.hstack([Zt, np.full((len(Zt), 1), 0.6)])
    assert not np.allclose(p.predict(Xt, off), 0)
    assert np.allclose(p.predict(Xt, off), q.predict(Xt, Zt), atol=1e-9)
    assert np.allclose(p.predict(Xt, on), p.predict(Xt, off), atol=1e-9)
