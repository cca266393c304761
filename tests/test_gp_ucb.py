"""GP-UCB: the incremental posterior equals the batch Gaussian-process formulas; what one evaluation teaches."""

from __future__ import annotations

import numpy as np
import pytest

from simmerge_bandit.policies import Candidates, make_policy


def kernel(A, B, lx, lz, share, d, k):
    (Xa, Za), (Xb, Zb) = A, B
    dx = ((Xa[:, None, :] - Xb[None, :, :]) ** 2).sum(-1) / (d * lx ** 2)
    dz = ((Za[:, None, :] - Zb[None, :, :]) ** 2).sum(-1) / (k * lz ** 2)
    return np.exp(-dz / 2) * ((1 - share) * np.exp(-dx / 2) + share)


def test_incremental_posterior_equals_the_batch_formulas():
    rng = np.random.default_rng(0)
    d, k, n = 3, 2, 7
    params = dict(alpha=0.7, l2=0.2, lx=0.8, lz=0.6, share=0.3, scale=0.15)
    p = make_policy("gp-ucb", **params)
    X, Z, r = rng.normal(size=(n, d)), rng.random((n, k)), rng.random(n)
    for i in range(n):
        p.update(X[i], f"op{i % 3}", Z[i], r[i])
    Xc, Zc = rng.normal(size=(5, d)), rng.random((5, k))
    ranking = p.rank(Candidates(Xc, [f"op{i}" for i in range(5)], Zc))
    kw = dict(lx=params["lx"], lz=params["lz"], share=params["share"], d=d, k=k)
    A = kernel((X, Z), (X, Z), **kw) + params["l2"] * np.eye(n)
    Ks = kernel((Xc, Zc), (X, Z), **kw)
    mean = Ks @ np.linalg.solve(A, r)
    width = params["scale"] * np.sqrt(1 - np.einsum("ij,ji->i", Ks, np.linalg.solve(A, Ks.T)))
    assert ranking.predicted == pytest.approx(mean, abs=1e-10)
    assert ranking.uncertainty == pytest.approx(width, abs=1e-10)
    assert ranking.scores == pytest.approx(mean + params["alpha"] * width, abs=1e-10)


def test_an_evaluation_informs_the_same_pair_fully_and_others_by_similarity():
    p = make_policy("gp-ucb", l2=0.01, lx=0.5, lz=0.5, share=0.0)
    x, far, z = np.zeros(4), np.full(4, 3.0), np.array([1.0, 0.0])
    p.update(x, "ties", z, 0.8)
    same = p.rank(Candidates(np.array([x, far]), ["ties", "ties"], np.array([z, z])))
    assert same.predicted[0] == pytest.approx(0.8 / 1.01)          # the evaluated pair: its own score
    assert abs(same.predicted[1]) < 1e-3                            # a pair far away: nothing learned
    assert same.uncertainty[0] < 0.2 * same.uncertainty[1]
    shared = make_policy("gp-ucb", l2=0.01, lx=0.5, lz=0.5, share=0.5)
    shared.update(x, "ties", z, 0.8)
    far_op = shared.rank(Candidates(np.array([far]), ["ties"], np.array([z])))
    assert far_op.predicted[0] == pytest.approx(0.5 * 0.8 / 1.01)  # the operator's shared offset reaches it
