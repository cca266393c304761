"""Off-policy estimators against values computed by hand, and their statistical behaviour on synthetic logs."""

from __future__ import annotations

import math

import numpy as np
import pytest

from simmerge_bandit import estimators as est
from simmerge_bandit.errors import InvalidInput

Z95 = 1.959963984540054


# ---- closed-form values on tiny logs ----

def test_ips_by_hand():
    # w = target/propensity = [2, 0, 1, 1]; w r = [2, 0, 2, 1]; mean 5/4
    r = [1.0, 0.0, 2.0, 1.0]
    p = [0.5, 0.25, 0.5, 1.0]
    t = [1.0, 0.0, 0.5, 1.0]
    e = est.ips(r, p, t)
    assert e.estimator == "ips"
    assert e.value == pytest.approx(1.25)
    # sample variance of [2, 0, 2, 1] about 1.25: (0.5625 + 1.5625 + 0.5625 + 0.0625) / 3 = 2.75 / 3
    half = Z95 * math.sqrt(2.75 / 3) / 2
    assert (e.ci_low, e.ci_high) == pytest.approx((1.25 - half, 1.25 + half))
    assert e.n == 4
    assert e.ess == pytest.approx(16 / 6)   # (2+0+1+1)^2 / (4+0+1+1)


def test_snips_by_hand():
    # w = [2, 2, 1, 1]; sum w r = 2 + 0 + 2 + 1 = 5; sum w = 6
    r = [1.0, 0.0, 2.0, 1.0]
    p = [0.5, 0.25, 0.5, 1.0]
    t = [1.0, 0.5, 0.5, 1.0]
    e = est.snips(r, p, t)
    assert e.value == pytest.approx(5 / 6)
    assert est.ips(r, p, t).value == pytest.approx(5 / 4)
    # delta method: sum w^2 (r - v)^2 = (4*1 + 4*25 + 49 + 1) / 36 = 154/36, times m/(m-1) = 4/3, sqrt, / sum w
    se = math.sqrt(154 / 36 * 4 / 3) / 6
    assert (e.ci_low, e.ci_high) == pytest.approx((5 / 6 - Z95 * se, 5 / 6 + Z95 * se))
    assert e.ess == pytest.approx(36 / 10)
    assert e.n == 4


def test_dr_by_hand():
    actions = np.array([0, 1, 0])
    r = [1.0, 0.0, 0.5]
    p = [0.5, 0.5, 0.5]
    pi = [[1.0, 0.0], [1.0, 0.0], [0.5, 0.5]]
    q = [[0.8, 0.2], [0.6, 0.4], [0.5, 0.5]]
    # event 0: 0.8 + 2 * (1 - 0.8) = 1.2; event 1: 0.6 + 0 = 0.6; event 2: 0.5 + 1 * (0.5 - 0.5) = 0.5
    e = est.dr(r, p, actions, pi, q)
    assert e.value == pytest.approx(2.3 / 3)
    terms = np.array([1.2, 0.6, 0.5])
    half = Z95 * terms.std(ddof=1) / math.sqrt(3)
    assert (e.ci_low, e.ci_high) == pytest.approx((2.3 / 3 - half, 2.3 / 3 + half))
    assert e.ess == pytest.approx(9 / 5)     # w = [2, 0, 1]
    assert e.n == 3


def test_dr_reduces_to_ips_with_a_zero_model_and_to_the_direct_method_with_zero_weights():
    rng = np.random.default_rng(3)
    n, K = 50, 3
    a = rng.integers(0, K, n)
    r = rng.random(n)
    p = np.full(n, 1 / K)
    pi = rng.dirichlet(np.ones(K), size=n)
    assert est.dr(r, p, a, pi, np.zeros((n, K))).value == pytest.approx(
        est.ips(r, p, pi[np.arange(n), a]).value)
    q = rng.random((n, K))
    pi_other = np.zeros((n, K))
    pi_other[np.arange(n), (a + 1) % K] = 1.0   # never the logged action: only the model speaks
    assert est.dr(r, p, a, pi_other, q).value == pytest.approx(q[np.arange(n), (a + 1) % K].mean())


def test_replay_by_hand():
    # matched events 0, 2, 4 with rewards 1, 1, 0: mean 2/3; sd (ddof 1) of [1, 1, 0] = sqrt(1/3)
    e = est.replay([1.0, 0.0, 1.0, 1.0, 0.0], [1, 0, 1, 0, 1])
    assert e.value == pytest.approx(2 / 3)
    assert e.n == 3
    assert e.ess == pytest.approx(3.0)
    half = Z95 * math.sqrt(1 / 3) / math.sqrt(3)
    assert (e.ci_low, e.ci_high) == pytest.approx((2 / 3 - half, 2 / 3 + half))
    assert e.notes == ()


def test_replay_notes_a_non_uniform_log_and_no_match():
    e = est.replay([1.0, 0.0], [1, 1], propensities=[0.5, 0.2])
    assert any("not uniform" in n for n in e.notes)
    none = est.replay([1.0, 0.0], [0, 0])
    assert none.n == 0 and math.isnan(none.value)
    assert none.as_dict()["value"] is None


# ---- statistical behaviour ----

def _synthetic(rng, n):
    """Two context values, three actions, a context-dependent logging policy and Bernoulli rewards."""
    mu = np.array([[0.2, 0.5, 0.7], [0.6, 0.3, 0.1]])          # mu[x, a]
    log_p = np.array([[0.6, 0.3, 0.1], [0.2, 0.2, 0.6]])       # logging policy favours the worse actions
    x = rng.integers(0, 2, n)
    cdf = np.cumsum(log_p[x], axis=1)
    a = (rng.random(n)[:, None] > cdf).sum(axis=1)
    r = (rng.random(n) < mu[x, a]).astype(float)
    target = np.array([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])      # the best action per context
    return x, a, r, log_p[x, a], target[x], 0.5 * (0.7 + 0.6), mu


def test_ips_is_unbiased_on_a_synthetic_log():
    rng = np.random.default_rng(0)
    vals, covered = [], 0
    S = 300
    for _ in range(S):
        x, a, r, p, pi, truth, _ = _synthetic(rng, 400)
        e = est.ips(r, p, pi[np.arange(len(a)), a])
        vals.append(e.value)
        covered += e.ci_low <= truth <= e.ci_high
    vals = np.array(vals)
    # the mean over seeds falls inside its own 99.9% interval around the truth ...
    assert abs(vals.mean() - truth) < 3.3 * vals.std(ddof=1) / math.sqrt(S)
    # ... and the per-log 95% intervals cover the truth about 95% of the time
    assert 0.90 <= covered / S <= 0.99


def test_dr_stays_unbiased_with_a_wrong_reward_model_and_snips_is_consistent():
    rng = np.random.default_rng(1)
    dr_vals, sn_vals = [], []
    for _ in range(200):
        x, a, r, p, pi, truth, _ = _synthetic(rng, 400)
        q = np.full((len(a), 3), 0.9)                          # badly wrong everywhere
        dr_vals.append(est.dr(r, p, a, pi, q).value)
        sn_vals.append(est.snips(r, p, pi[np.arange(len(a)), a]).value)
    dr_vals, sn_vals = np.array(dr_vals), np.array(sn_vals)
    assert abs(dr_vals.mean() - truth) < 3.3 * dr_vals.std(ddof=1) / math.sqrt(200)
    assert abs(sn_vals.mean() - truth) < 0.02


def test_cross_fitted_reward_model_recovers_action_specific_slopes():
    rng = np.random.default_rng(2)
    n = 600
    X = rng.normal(size=(n, 2))
    a = rng.integers(0, 3, n)
    slopes = np.array([[1.0, 0.0], [-1.0, 0.5], [0.0, 2.0]])
    r = 0.3 + np.einsum("nd,nd->n", X, slopes[a])
    q = est.fit_reward_model(X, a, r, np.eye(3), folds=5, l2=1e-6, seed=0)
    truth = 0.3 + X @ slopes.T
    assert np.abs(q - truth).max() < 1e-3


def test_cross_fitting_keeps_an_events_own_reward_out_of_its_prediction():
    rng = np.random.default_rng(4)
    n = 200
    X = rng.normal(size=(n, 1))
    a = rng.integers(0, 2, n)
    r = np.zeros(n)
    r[7] = 100.0                                               # one outlier
    q = est.fit_reward_model(X, a, r, np.eye(2), folds=5, seed=0)
    q_in = est.fit_reward_model(X, a, r, np.eye(2), folds=1, seed=0)   # in-sample fit for contrast
    assert q_in[7, a[7]] > 2 * q[7, a[7]]


def test_bootstrap_is_seeded_and_brackets_the_value():
    rng = np.random.default_rng(5)
    x, a, r, p, pi, truth, _ = _synthetic(rng, 2000)
    t = pi[np.arange(len(a)), a]
    b1 = est.ips(r, p, t, ci="bootstrap", n_boot=300, seed=11)
    b2 = est.ips(r, p, t, ci="bootstrap", n_boot=300, seed=11)
    b3 = est.ips(r, p, t, ci="bootstrap", n_boot=300, seed=12)
    assert (b1.ci_low, b1.ci_high) == (b2.ci_low, b2.ci_high)
    assert (b1.ci_low, b1.ci_high) != (b3.ci_low, b3.ci_high)
    normal = est.ips(r, p, t)
    assert b1.ci_low < b1.value < b1.ci_high
    # with 2000 events the percentile bootstrap and the normal interval agree closely
    assert b1.ci_high - b1.ci_low == pytest.approx(normal.ci_high - normal.ci_low, rel=0.2)
    for name in ("snips", "replay"):
        fn = getattr(est, name)
        e = fn(r, (a == 2).astype(float), ci="bootstrap", n_boot=200) if name == "replay" else \
            fn(r, p, t, ci="bootstrap", n_boot=200)
        assert e.ci_low <= e.value <= e.ci_high


def test_running_ends_at_the_full_estimate():
    rng = np.random.default_rng(6)
    x, a, r, p, pi, truth, _ = _synthetic(rng, 300)
    n = len(a)
    t = pi[np.arange(n), a]
    q = rng.random((n, 3))
    matched = (a == 2).astype(float)
    terms = np.sum(pi * q, axis=1) + t / p * (r - q[np.arange(n), a])
    full = {"ips": est.ips(r, p, t), "snips": est.snips(r, p, t), "dr": est.dr(r, p, a, pi, q),
            "replay": est.replay(r, matched)}
    for name, e in full.items():
        run = est.running(name, r, p, t, matched=matched, terms=terms)
        assert run.value.shape == (n,)
        assert (run.value[-1], run.ci_low[-1], run.ci_high[-1]) == pytest.approx((e.value, e.ci_low, e.ci_high))
    # a prefix is the estimate on that prefix
    assert est.running("ips", r, p, t).value[99] == pytest.approx(est.ips(r[:100], p[:100], t[:100]).value)


def test_kish_ess():
    assert est.kish_ess([1, 1, 1, 1]) == 4
    assert est.kish_ess([4, 0, 0, 0]) == 1
    assert est.kish_ess([0, 0]) == 0


@pytest.mark.parametrize("call, message", [
    (lambda: est.ips([1.0], [0.0], [1.0]), "outside (0, 1]"),
    (lambda: est.ips([1.0], [1.5], [1.0]), "outside (0, 1]"),
    (lambda: est.ips([float("nan")], [0.5], [1.0]), "rewards[0]"),
    (lambda: est.ips([1.0, 2.0], [0.5], [1.0]), "expected 2"),
    (lambda: est.ips([], [], []), "no events"),
    (lambda: est.snips([1.0], [0.5], [1.2]), "outside [0, 1]"),
    (lambda: est.ips([1.0], [0.5], [1.0], ci="jackknife"), "unknown confidence interval"),
    (lambda: est.dr([1.0], [0.5], np.array([2]), [[1.0, 0.0]], [[0.0, 0.0]]), "outside the action set"),
    (lambda: est.replay([1.0], [2.0]), "[0, 1]"),
])
def test_bad_inputs_are_refused(call, message):
    with pytest.raises(InvalidInput, match=message.replace("(", r"\(").replace(")", r"\)")
                       .replace("[", r"\[").replace("]", r"\]")):
        call()
