"""The policies' fast paths give the answers of the plain ones.

Ranking has two code paths: per pair and operator when candidates are laid out as every pair x every operator
(:attr:`Candidates.grid`, what the engine builds) and per candidate otherwise; both are checked against each other
and against formulas. So are what the fast paths keep between calls: the SimMerge predictor's per-descriptor
matrices, hybrid LinUCB's incrementally updated ``beta``, the per-arm views of the ridge updates, the scratch
memory of rankings, and the partial sort behind :meth:`Ranking.top`.
"""

from __future__ import annotations

import numpy as np
import pytest

from simmerge_bandit.errors import InvalidInput
from simmerge_bandit.policies import Candidates, from_snapshot, make_policy
from simmerge_bandit.policies.base import Ranking

D = 4
OPS = {"lin": [1.0, 0.0, 0.2], "ties": [0.0, 1.0, 0.5], "dare": [0.5, 0.5, 0.9], "slerp": [0.2, 0.3, 0.1]}
LINEAR = ["linucb", "linucb-hybrid", "lints", "egreedy", "predictor"]


def grid_cands(rng, ops=OPS, pairs=5) -> Candidates:
    """Every pair x every operator, pair-major: the engine's layout."""
    Xp = rng.normal(size=(pairs, D))
    names = list(ops)
    arms = names * pairs
    return Candidates(np.repeat(Xp, len(names), axis=0), arms, np.array([ops[a] for a in arms]))


def arm_major(c: Candidates) -> tuple[Candidates, np.ndarray]:
    """The same candidates grouped by operator (not a grid), and where each came from."""
    perm = np.argsort(np.array([list(OPS).index(a) for a in c.arms]), kind="stable")
    return Candidates(c.X[perm], [c.arms[i] for i in perm], c.Z[perm]), perm


def trained(name: str, steps: int = 40, seed: int = 0, **kw):
    p = make_policy(name, **kw)
    rng = np.random.default_rng(seed)
    names = list(OPS)
    for t in range(steps):
        arm = names[t % 3]  # "slerp" stays unseen: new-operator paths are exercised too
        x = rng.normal(size=D)
        p.update(x, arm, np.array(OPS[arm]), 0.3 * names.index(arm) + 0.2 * x[0] + 0.05 * rng.normal())
    return p


# ---- the grid layout ----

def test_grid_is_detected_only_for_every_pair_x_every_operator():
    rng = np.random.default_rng(0)
    c = grid_cands(rng)
    assert c.grid.arms == list(OPS)
    np.testing.assert_array_equal(c.grid.X, c.X[:: len(OPS)])
    np.testing.assert_array_equal(c.grid_Z, np.array(list(OPS.values())))
    assert arm_major(c)[0].grid is None
    as_object = Candidates(c.X, np.array(c.arms, dtype=object), c.Z)  # replay and simulation pass object arrays
    assert as_object.grid is not None and as_object.grid.arms == list(OPS)
    X = c.X.copy()
    X[6, 0] += 1e-9  # one operator of one pair sees another context
    assert Candidates(X, c.arms, c.Z).grid is None
    assert Candidates(c.X[:-1], c.arms[:-1], c.Z[:-1]).grid is None  # the last pair lacks an operator
    twice = list(OPS)[:2] * 2 + list(OPS)[2:]  # an operator repeated inside a "pair"
    assert Candidates(np.zeros((6, D)), twice, np.zeros((6, 3))).grid is None
    one = Candidates(np.ones((1, D)), ["lin"], np.zeros((1, 3)))
    assert one.grid.arms == ["lin"] and one.grid.X.shape == (1, D)
    Z = c.Z.copy()
    Z[5, 1] = 0.7  # one candidate of an operator with another descriptor
    assert Candidates(c.X, c.arms, Z).grid is not None and Candidates(c.X, c.arms, Z).grid_Z is None


@pytest.mark.parametrize("name", LINEAR)
def test_grid_and_per_candidate_paths_rank_alike(name):
    rng = np.random.default_rng(1)
    c = grid_cands(rng)
    other, perm = arm_major(c)
    assert c.grid is not None and other.grid is None
    p = trained(name)
    q = from_snapshot(*p.snapshot())  # same state and generator: LinTS draws the same samples on both paths
    a, b = p.rank(c), q.rank(other)
    for field in ("predicted", "uncertainty", "scores", "propensity"):
        np.testing.assert_allclose(getattr(a, field)[perm], getattr(b, field), rtol=1e-10, atol=1e-12,
                                   err_msg=field)


def test_hybrid_refuses_an_operator_whose_descriptor_changed_on_both_paths():
    p = trained("linucb-hybrid")
    c = grid_cands(np.random.default_rng(2))
    Z = c.Z.copy()
    Z[1::4] = [0.0, 1.0, 0.6]  # "ties" (every pair) now claims another density
    for cands in (Candidates(c.X, c.arms, Z), arm_major(Candidates(c.X, c.arms, Z))[0]):
        with pytest.raises(InvalidInput, match="'ties' came with a different descriptor"):
            p.rank(cands)


# ---- what the fast paths keep ----

def _closed_form_width(arrays: dict, X: np.ndarray, Z: np.ndarray) -> np.ndarray:
    """The predictor's width from its saved state: phi = [1, x_std] (outer) [1, z_std], sqrt(phi^T A^-1 phi)."""
    xs = np.hstack([np.ones((len(X), 1)), (X - arrays["mu_x"]) / arrays["sd_x"]])
    zs = np.hstack([np.ones((len(Z), 1)), (Z - arrays["mu_z"]) / arrays["sd_z"]])
    Phi = np.einsum("ij,ik->ijk", xs, zs).reshape(len(X), -1)
    return np.sqrt(np.einsum("ij,jk,ik->i", Phi, arrays["Ainv"], Phi))


def test_predictor_kept_matrices_equal_fresh_ones():
    rng = np.random.default_rng(3)
    m = 60
    X = rng.normal(size=(m, D))
    names = [list(OPS)[i % 3] for i in range(m)]
    Z = np.array([OPS[a] for a in names])
    pred = make_policy("predictor", model="linear").fit(X, Z, names, rng.uniform(size=m))
    three = {k: OPS[k] for k in ("lin", "ties", "dare")}
    c = grid_cands(rng, ops=three)
    pred.rank(c)  # keeps one matrix per descriptor
    for t in range(25):  # rewards for one operator change A^-1, so every operator's matrix
        pred.update(rng.normal(size=D), "lin", np.array(OPS["lin"]), float(rng.uniform()))
        if t % 10 == 0:
            pred.rank(c)
    arrays, meta = pred.snapshot()
    np.testing.assert_allclose(pred.rank(c).uncertainty, _closed_form_width(arrays, c.X, c.Z), rtol=1e-9)
    restored = from_snapshot(arrays, meta)  # starts with none kept
    np.testing.assert_allclose(restored.rank(c).uncertainty, pred.rank(c).uncertainty, rtol=1e-10)
    four = grid_cands(rng)  # an operator whose descriptor was never seen joins
    pred.update(rng.normal(size=D), "ties", np.array(OPS["ties"]), 0.4)
    arrays, _ = pred.snapshot()
    np.testing.assert_allclose(pred.rank(four).uncertainty, _closed_form_width(arrays, four.X, four.Z), rtol=1e-9)


def test_hybrid_beta_follows_its_shared_matrices_and_old_snapshots_load():
    p = trained("linucb-hybrid", steps=300)
    arrays, meta = p.snapshot()
    np.testing.assert_allclose(arrays["beta"], arrays["A0inv"] @ arrays["b0"], rtol=1e-8, atol=1e-10)
    old = {k: v for k, v in arrays.items() if k != "beta"}  # saved before beta was part of the snapshot
    c = grid_cands(np.random.default_rng(4))
    np.testing.assert_allclose(from_snapshot(old, meta).rank(c).scores, p.rank(c).scores, rtol=1e-9)


def test_ridge_rows_stay_right_as_arms_outgrow_their_storage():
    # Arms join one by one, past the first allocations (4, then 8, then 16 rows); updates keep going to the old
    # ones. Each arm's state must equal its own batch ridge solve.
    rng = np.random.default_rng(5)
    lam, arms = 0.7, [f"op{i}" for i in range(11)]
    p = make_policy("linucb", l2=lam)
    seen: dict[str, list] = {a: [] for a in arms}
    for t in range(200):
        a = arms[min(int(rng.integers(t // 15 + 1)), len(arms) - 1)]
        x, r = rng.normal(size=D), float(rng.normal())
        p.update(x, a, np.zeros(0), r)
        seen[a].append((np.concatenate(([1.0], x)), r))
    arrays, meta = p.snapshot()
    assert meta["state"]["arms"] == arms
    for i, a in enumerate(arms):
        Xa = np.array([v for v, _ in seen[a]])
        A = lam * np.eye(D + 1) + Xa.T @ Xa
        np.testing.assert_allclose(arrays["Ainv"][i], np.linalg.inv(A), rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(arrays["theta"][i], np.linalg.solve(A, Xa.T @ [r for _, r in seen[a]]),
                                   rtol=1e-9, atol=1e-12)
        assert arrays["count"][i] == len(seen[a])


@pytest.mark.parametrize("name", LINEAR)
def test_a_ranking_keeps_its_values_after_the_next_one(name):
    # Rankings work in scratch memory reused from call to call; what they return must not live there.
    p = trained(name)
    rng = np.random.default_rng(6)
    for cands in ((grid_cands(rng), grid_cands(rng)), (arm_major(grid_cands(rng))[0], arm_major(grid_cands(rng))[0])):
        first = p.rank(cands[0])
        kept = {f: getattr(first, f).copy() for f in ("scores", "predicted", "uncertainty", "propensity")}
        p.rank(cands[1])
        for f, v in kept.items():
            np.testing.assert_array_equal(getattr(first, f), v, err_msg=f)


@pytest.mark.parametrize("name", ["linucb", "linucb-hybrid", "predictor"])
def test_update_takes_any_vector_layout(name):
    rng = np.random.default_rng(7)
    M = rng.normal(size=(D, 12))
    a, b = make_policy(name), make_policy(name)
    for j in range(12):
        arm = list(OPS)[j % 4]
        a.update(M[:, j], arm, np.array(OPS[arm]), 0.5 + 0.1 * j)            # a strided column
        b.update(M[:, j].tolist(), arm, tuple(OPS[arm]), 0.5 + 0.1 * j)      # plain Python sequences
    c = grid_cands(rng)
    np.testing.assert_array_equal(a.rank(c).scores, b.rank(c).scores)
    bad = M[:, 0].copy()
    bad[2] = np.nan
    with pytest.raises(InvalidInput, match="finite"):
        a.update(np.repeat(bad, 2)[::2], "lin", np.array(OPS["lin"]), 0.5)  # strided, with a NaN


# ---- Ranking.top ----

def test_top_equals_the_head_of_the_full_order():
    rng = np.random.default_rng(8)
    for trial in range(300):
        n = int(rng.integers(1, 60))
        scores = rng.integers(0, 6, size=n).astype(float)  # many exact ties
        choice = int(rng.integers(n))
        for k in (1, 2, 3, 5, n):
            full = Ranking(choice, None, scores, scores, np.zeros(n), np.full(n, 1 / n))
            rest = np.argsort(-scores, kind="stable")
            expected = np.concatenate(([choice], rest[rest != choice]))[:k]
            np.testing.assert_array_equal(full.top(k), expected)
            np.testing.assert_array_equal(full.order[:k], expected)
            # a ranking given the order by score (shared by the rankings of one memo) agrees
            shared = Ranking(choice, None, scores, scores, np.zeros(n), np.full(n, 1 / n), by_score=rest)
            np.testing.assert_array_equal(shared.top(k), expected)
            np.testing.assert_array_equal(shared.order[:k], expected)
    scores = np.array([0.3, np.nan, 0.9, 0.1, np.nan, 0.5, 0.2, 0.8, 0.4, 0.6, 0.7, 0.0])
    for by in (None, np.argsort(-scores, kind="stable")):
        r = Ranking(3, None, scores, scores, np.zeros(12), np.full(12, 1 / 12), by_score=by)
        np.testing.assert_array_equal(r.top(2), r.order[:2])
        np.testing.assert_array_equal(r.top(12), r.order)
        r = Ranking(1, None, scores, scores, np.zeros(12), np.full(12, 1 / 12), by_score=by)  # a NaN chosen
        np.testing.assert_array_equal(r.top(3), [1, 2, 7])


def test_rank_reuse_keeps_scores_until_an_update_and_draws_afresh():
    from simmerge_bandit.policies import Candidates, make_policy

    rng = np.random.default_rng(3)
    X, Z = rng.normal(size=(40, 5)), np.tile(np.eye(4), (10, 1))
    arms = ["a", "b", "c", "d"] * 10
    cands = Candidates(X=X, arms=arms, Z=Z)
    for name in ("linucb", "linucb-hybrid", "egreedy", "lints"):
        pol = make_policy(name, seed=1)
        for i in range(12):
            pol.update(X[i], arms[i], Z[i], float(rng.uniform()))
        calls = []
        score = pol._score
        pol._score = lambda c, score=score: calls.append(1) or score(c)
        a = pol.rank(cands, reuse=True)
        a_scores = a.scores.copy()
        b = pol.rank(cands, reuse=True)
        want = 1 if pol.deterministic_scores else 2
        assert len(calls) == want, name
        if pol.deterministic_scores:
            np.testing.assert_array_equal(b.scores, a_scores)
        pol.rank(Candidates(X=X[:8], arms=arms[:8], Z=Z[:8]))  # another ranking in between: no stale reuse
        c = pol.rank(cands, reuse=True)
        assert len(calls) == want + 2, name
        np.testing.assert_allclose(c.scores, a_scores) if pol.deterministic_scores else None
        pol.update(X[0], arms[0], Z[0], 2.0)
        d = pol.rank(cands, reuse=True)
        assert len(calls) == want + 3, name
        fresh = make_policy(name, seed=1)
        fresh.restore(*pol.snapshot())
        np.testing.assert_allclose(d.predicted, fresh.rank(cands).predicted)
        assert not np.allclose(d.predicted, a.predicted), name


@pytest.mark.parametrize("name", ["linucb-hybrid", "linucb", "lints"])
def test_update_many_equals_one_update_at_a_time(name):
    """Including operators that first appear inside a chunk, chunks longer than the hybrid's CHUNK, and a prior."""
    from simmerge_bandit.policies import make_policy

    rng = np.random.default_rng(7)
    d, k = 6, 4
    descr = {f"op{i}": rng.normal(size=k) for i in range(6)}
    rows = []
    for i in range(90):
        arm = f"op{i % (2 if i < 20 else 6)}"  # four operators arrive after the first 20 rewards
        rows.append((rng.normal(size=d), arm, descr[arm], float(rng.uniform(0, 2)), float(rng.uniform(0.1, 1))))
    prior = make_policy("predictor", model="linear").fit(np.array([r[0] for r in rows]),
                                                         np.array([r[2] for r in rows]),
                                                         [r[1] for r in rows], np.array([r[3] for r in rows]))
    for kwargs in ({}, {"prior": prior}):
        one, many = make_policy(name, seed=3, **kwargs), make_policy(name, seed=3, **kwargs)
        for r in rows:
            one.update(*r)
        start = 0
        for size in (5, 1, 17, 40, 7, 20):  # the first chunk starts from nothing
            many.update_many(rows[start:start + size])
            start += size
        assert start == len(rows) and many.n_updates == one.n_updates == len(rows)
        a, b = one.snapshot()[0], many.snapshot()[0]
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_allclose(b[key], a[key], rtol=1e-9, atol=1e-12, err_msg=f"{name} {key}")


def test_update_many_with_a_bad_row_changes_nothing():
    from simmerge_bandit.errors import InvalidInput
    from simmerge_bandit.policies import make_policy

    pol = make_policy("linucb-hybrid")
    good = (np.ones(3), "a", np.ones(2), 0.5, 1.0)
    with pytest.raises(InvalidInput, match="reward must be finite"):
        pol.update_many([good, (np.ones(3), "a", np.ones(2), float("nan"), 1.0)])
    assert pol.n_updates == 0 and pol.snapshot()[1]["d"] is None
    pol.update_many([good])
    assert pol.n_updates == 1


def test_rankings_from_the_memo_draw_the_same_choices_and_tops_as_fresh_ones():
    from simmerge_bandit.policies import Candidates, make_policy

    rng = np.random.default_rng(5)
    X, Z = rng.normal(size=(600, 5)), np.tile(np.eye(4), (150, 1))
    arms = ["a", "b", "c", "d"] * 150
    cands = Candidates(X=X, arms=arms, Z=Z)
    for name in ("linucb", "linucb-hybrid"):
        memo, fresh = make_policy(name, seed=4, floor=0.3), make_policy(name, seed=4, floor=0.3)
        for i in range(30):
            for pol in (memo, fresh):
                pol.update(X[i], arms[i], Z[i], float(np.sin(i)))
        for _ in range(200):  # the floor spreads the draws over many candidates
            a, b = memo.rank(cands, reuse=True), fresh.rank(cands)
            assert a.choice == b.choice, name
            np.testing.assert_array_equal(a.top(5), b.top(5))
        assert isinstance(memo._memo[3][4], list)  # the memo's path was taken
