"""Merge methods: hand-computed tiny cases, mergekit's edge rules, seeds, and DARE/DELLA statistics."""

from __future__ import annotations

import math

import pytest
import torch

from simmerge_bandit.errors import InvalidInput
from simmerge_bandit.methods import REGISTRY, bind_params, get_method, merge_tensors, pair_roles
from simmerge_bandit.methods import sparsify

T = torch.tensor


def close(a, b, tol=1e-6):
    return torch.allclose(a, T(b, dtype=torch.float32) if not isinstance(b, torch.Tensor) else b, atol=tol)


def test_registry_lists_every_method_module():
    assert list(REGISTRY) == ["linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "breadcrumbs",
                              "breadcrumbs_ties", "della", "della_linear", "slerp", "nuslerp", "model_stock"]
    assert all(spec.merge is not None for spec in REGISTRY.values())


def test_mergekit_defaults():
    d = {name: spec.defaults() for name, spec in REGISTRY.items()}
    # (normalize, rescale) per mergekit's registry
    expect = {"task_arithmetic": (False, False), "ties": (True, False), "dare_ties": (False, True),
              "dare_linear": (False, True), "breadcrumbs": (False, False), "breadcrumbs_ties": (False, False),
              "della": (True, True), "della_linear": (False, True)}
    for name, (norm, resc) in expect.items():
        assert (d[name]["normalize"], d[name]["rescale"]) == (norm, resc), name
        assert d[name]["lambda"] == 1.0 and d[name]["density"] == 1.0 and d[name]["int8_mask"] is False
    assert d["breadcrumbs"]["gamma"] == 0.01 and d["della"]["epsilon"] == 0.15
    assert d["linear"] == {"weight": 1.0, "normalize": True}
    assert d["nuslerp"] == {"weight": 1.0, "nuslerp_flatten": True, "nuslerp_row_wise": False}
    assert d["model_stock"] == {"filter_wise": False} and d["slerp"] == {"t": 0.5}


def test_cross_checks_follow_mergekit():
    # breadcrumbs accepts density + gamma > 1 (mergekit then removes fewer outliers) ...
    get_method("breadcrumbs").validate({"density": 0.995, "gamma": 0.05})
    # ... della needs density +/- epsilon strictly inside (0, 1) unless density is 1
    with pytest.raises(InvalidInput, match="strictly inside"):
        get_method("della").validate({"density": 0.9, "epsilon": 0.1})
    with pytest.raises(InvalidInput, match="strictly inside"):
        get_method("della").validate({"density": 0.15})
    get_method("della").validate({"density": 1.0, "epsilon": 0.5})
    with pytest.raises(InvalidInput, match="out of range"):
        get_method("ties").validate({"density": 0})


def test_linear_hand_computed():
    a, b = T([1.0, 2.0]), T([3.0, 6.0])
    assert close(merge_tensors("linear", [a, b], None, {"weight": [1.0, 3.0]}), [2.5, 5.0])
    assert close(merge_tensors("linear", [a, b], None, {"weight": [1.0, 3.0], "normalize": False}), [10.0, 20.0])
    with pytest.raises(InvalidInput, match="sum to 0"):
        merge_tensors("linear", [a, b], None, {"weight": [1.0, -1.0]})
    with pytest.raises(InvalidInput, match="takes no base"):
        merge_tensors("linear", [a, b], a, {})


def test_task_arithmetic_hand_computed():
    base = T([1.0, 1.0, 1.0])
    a, b = T([2.0, 0.0, 1.5]), T([3.0, 1.0, 0.0])
    # deltas (1,-1,.5) and (2,0,-1); weights .5 and 1; lambda 2 -> base + 2 * (.5 d_a + d_b)
    out = merge_tensors("task_arithmetic", [a, b], base, {"weight": [0.5, 1.0], "lambda": 2.0})
    assert close(out, [1 + 2 * 2.5, 1 + 2 * -0.5, 1 + 2 * -0.75])
    # normalize divides by the weight sum; density is accepted and ignored without sparsification
    out = merge_tensors("task_arithmetic", [a, b], base, {"weight": [0.5, 1.0], "normalize": True,
                                                          "density": 0.3})
    assert close(out, [1 + 2.5 / 1.5, 1 - 0.5 / 1.5, 1 - 0.75 / 1.5])


def test_ties_hand_computed_sign_consensus_and_divisor():
    base = torch.zeros(4)
    a = T([3.0, -1.0, 0.5, -2.0])
    b = T([1.0, 2.0, -4.0, 0.0])
    c = T([-1.0, 2.0, 1.0, -1.0])
    # density 1: no pruning. Sums (3, 3, -2.5, -3) -> majority + + - -. Kept: e0 a,b; e1 b,c; e2 b; e3 a,c.
    out = merge_tensors("ties", [a, b, c], base, {"weight": 1.0})
    assert close(out, [2.0, 2.0, -4.0, -1.5])
    # no normalization: plain sums of the agreeing entries
    out = merge_tensors("ties", [a, b, c], base, {"weight": 1.0, "normalize": False})
    assert close(out, [4.0, 4.0, -4.0, -3.0])
    # density 0.5 keeps the 2 largest magnitudes of each model: a (3, -2), b (2, -4), c (2, 1 or -1: tie)
    out = merge_tensors("ties", [a, b], base, {"density": 0.5})
    # a -> (3, 0, 0, -2); b -> (0, 2, -4, 0): no conflicts, divisor = count of nonzero contributions
    assert close(out, [3.0, 2.0, -4.0, -2.0])
    # all contributions zero at an entry: divisor 0 -> 1 and the base stays
    out = merge_tensors("ties", [torch.zeros(4), torch.zeros(4)], base, {})
    assert close(out, [0.0] * 4)


def test_magnitude_keeps_at_least_one_and_breaks_ties_stably():
    base = torch.zeros(6)
    x = T([1.0, 5.0, 1.0, 1.0, 0.5, 1.0])
    out = merge_tensors("ties", [x], base, {"density": 0.01})  # int(0.06) = 0 -> k = max(1, 0) = 1
    assert close(out, [0, 5.0, 0, 0, 0, 0])
    # k = 3: 5 and two of the four tied 1.0s -- the last ones in index order (stable ascending sort, top ranks)
    out = merge_tensors("ties", [x], base, {"density": 0.5})
    assert close(out, [0, 5.0, 0, 1.0, 0, 1.0])
    # exact_ties picks what mergekit's torch.argsort picks: still 3 entries, 5 among them
    ex = merge_tensors("ties", [x], base, {"density": 0.5}, exact_ties=True)
    assert int((ex != 0).sum()) == 3 and ex[1] == 5.0


def test_breadcrumbs_hand_computed():
    base = torch.zeros(10)
    x = torch.arange(1.0, 11.0)
    # density .5, gamma .2: drop the 2 largest (9, 10) and then the smallest 3 -> keep 4..8
    out = merge_tensors("breadcrumbs", [x], base, {"density": 0.5, "gamma": 0.2})
    assert close(out, [0, 0, 0, 4, 5, 6, 7, 8, 0, 0])
    # density + gamma > 1: fewer outliers dropped so that 9 entries stay
    out = merge_tensors("breadcrumbs", [x], base, {"density": 0.9, "gamma": 0.5})
    assert close(out, [1, 2, 3, 4, 5, 6, 7, 8, 9, 0])
    # density 1 keeps everything even with gamma (mergekit returns the tensor untouched)
    assert close(merge_tensors("breadcrumbs", [x], base, {"density": 1.0, "gamma": 0.5}), x)
    # rescale to the L1 norm: kept (4..8) sum 30 scaled to 55
    out = merge_tensors("breadcrumbs", [x], base, {"density": 0.5, "gamma": 0.2, "rescale": True})
    assert close(out, T([0, 0, 0, 4, 5, 6, 7, 8, 0, 0]) * 55 / 30, 1e-5)


def test_sampled_selection_matches_exact_selection(monkeypatch):
    torch.manual_seed(0)
    base = torch.randn(300, 200)
    xs = [base + 0.1 * torch.randn(300, 200), (base + 0.1 * torch.randn(300, 200)).bfloat16().float()]
    for method, p in (("ties", {"density": 0.3}), ("breadcrumbs", {"density": 0.6, "gamma": 0.05}),
                      ("ties", {"density": 0.7, "rescale": True})):
        exact = merge_tensors(method, xs, base, p)  # 60k entries: exact order statistics
        monkeypatch.setattr(sparsify, "EXACT_SELECT_MAX", 1000)
        monkeypatch.setattr("simmerge_bandit.methods.job.CHUNK_ELEMENTS", 7000)
        sampled = merge_tensors(method, xs, base, p)
        monkeypatch.undo()
        # Same selection; with rescale the L1 sums are accumulated per chunk, so the scale may differ in the last bit.
        assert torch.equal(exact != base, sampled != base), method
        assert torch.allclose(exact, sampled, rtol=1e-6, atol=1e-7), method


def test_rank_select_misled_sample_falls_back():
    keys = torch.cat([torch.ones(5000), torch.arange(1.0, 5001.0)])  # 5001 entries tie at 1
    sample = torch.full((10000,), 7.0)  # a sample that says nothing about the data
    sel = sparsify.RankSelect(keys.numel(), 2000, 9000, sample, torch.float32)
    sel.observe(0, keys)
    assert sel.finish() is False
    ref = torch.zeros(keys.numel(), dtype=torch.bool)
    ref[torch.sort(keys, stable=True).indices[2000:9000]] = True
    for chunk in (10_000, 1_500, 999):  # the tie group split across chunks, and cut inside one
        sel = sparsify.RankSelect(keys.numel(), 2000, 9000, None, torch.float32)
        parts = keys.split(chunk)
        for ci, part in enumerate(parts):
            sel.observe(ci, part)
        assert sel.finish() is True
        got = torch.cat([sel.select(ci, part) for ci, part in enumerate(parts)])
        assert torch.equal(got != 0, ref), chunk
        assert torch.equal(got[ref], keys[ref])


def _select_in_chunks(x, r_lo, r_hi, sample, dtype, histogram, chunk):
    """``x`` selected to ascending-magnitude ranks [r_lo, r_hi) by a RankSelect fed chunks of ``chunk``."""
    sel = sparsify.RankSelect(x.numel(), r_lo, r_hi, sample, dtype, histogram=histogram)
    parts = x.split(chunk)
    for ci, part in enumerate(parts):
        sel.observe(ci, part)
    assert sel.finish()
    return torch.cat([sel.select(ci, part) for ci, part in enumerate(parts)])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_rank_select_chunks_match_a_stable_sort(dtype):
    """Sampled and materialized selection, chunk by chunk, keep exactly the ranks a stable ascending sort of the
    magnitudes gives, for TIES-like (top) and breadcrumbs-like (middle, bottom) rank ranges."""
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(40_000, generator=g) * 0.01).to(dtype)
    x[::7] = 0  # zeros: the smallest magnitude, tied
    mags = x.float().abs()
    order = torch.sort(mags, stable=True).indices
    for r_lo, r_hi in ((26_000, 40_000), (5_000, 39_000), (0, 30_000), (12_345, 12_346), (0, 40_000)):
        ref = torch.zeros(x.numel(), dtype=torch.bool)
        ref[order[r_lo:r_hi]] = True
        for sample, hist in ((None, False), (x[::3], False), (None, True)):
            got = _select_in_chunks(x, r_lo, r_hi, sample, dtype, hist, 3_001)
            kept = got != 0
            assert torch.equal(kept, ref & (x != 0)), (r_lo, r_hi, sample is None, hist)
            assert torch.equal(got[kept], x[kept])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_rank_select_histogram_cuts_on_tie_group_edges(dtype):
    """The histogram path where a cut falls exactly on the edge of a group of equal magnitudes, and inside one:
    the kept ranks are those of a stable ascending sort."""
    g = torch.Generator().manual_seed(5)
    vals = torch.arange(1, 51, dtype=torch.float32).repeat_interleave(100)  # 50 magnitudes, 100 entries each
    x = (vals * torch.where(torch.rand(5000, generator=g) < 0.5, -1.0, 1.0))[torch.randperm(5000, generator=g)]
    x = x.to(dtype)
    order = torch.sort(x.float().abs(), stable=True).indices
    for r_lo, r_hi in ((200, 5000), (2000, 3000), (0, 4900), (150, 5000), (2050, 2950), (199, 201)):
        ref = torch.zeros(x.numel(), dtype=torch.bool)
        ref[order[r_lo:r_hi]] = True
        got = _select_in_chunks(x, r_lo, r_hi, None, dtype, True, 777)
        assert torch.equal(got != 0, ref), (r_lo, r_hi)


def test_slerp_hand_computed_and_parallel_fallback():
    a, b = T([1.0, 0.0]), T([0.0, 1.0])
    out = merge_tensors("slerp", [b], a, {"t": 0.5})
    assert close(out, [math.sqrt(0.5), math.sqrt(0.5)])
    assert close(merge_tensors("slerp", [b], a, {"t": 0.0}), a)
    # slerp's base may also be one of two inputs (the zoo's form)
    assert close(merge_tensors("slerp", [a, b], a, {"t": 1.0}), b)
    # near-parallel: linear interpolation
    assert close(merge_tensors("slerp", [T([2.0, 0.0])], a, {"t": 0.25}), [1.25, 0.0])
    # zero vectors count as norm 1 and do not divide by zero
    assert torch.isfinite(merge_tensors("slerp", [torch.zeros(2)], torch.zeros(2), {"t": 0.3})).all()
    with pytest.raises(InvalidInput, match="one of its two inputs"):
        merge_tensors("slerp", [a, b], torch.zeros(2), {})
    with pytest.raises(InvalidInput, match="exactly 2"):
        merge_tensors("slerp", [a, b, b], a, {})


def test_nuslerp_weights_and_task_vectors():
    a, b = T([1.0, 0.0]), T([0.0, 1.0])
    # t = w_b / (w_a + w_b) = 0.5
    assert close(merge_tensors("nuslerp", [a, b], None, {"weight": [1.0, 1.0]}), [math.sqrt(0.5)] * 2)
    assert close(merge_tensors("nuslerp", [a, b], None, {"weight": [3.0, 0.0]}), a)
    base = T([1.0, 1.0])
    out = merge_tensors("nuslerp", [a + base, b + base], base, {"weight": [1.0, 1.0]})
    assert close(out, base + math.sqrt(0.5))
    # row-wise (vectors along dim 0) and per-row (last dim) agree with a column / row loop
    m0, m1 = torch.randn(4, 3), torch.randn(4, 3)
    rows = merge_tensors("nuslerp", [m0, m1], None, {"nuslerp_flatten": False})
    cols = merge_tensors("nuslerp", [m0, m1], None, {"nuslerp_flatten": False, "nuslerp_row_wise": True})
    for i in range(4):
        assert close(rows[i], merge_tensors("nuslerp", [m0[i], m1[i]], None, {}), 1e-5)
    for j in range(3):
        assert close(cols[:, j], merge_tensors("nuslerp", [m0[:, j], m1[:, j]], None, {}), 1e-5)


def test_model_stock_angle_rule():
    base = torch.zeros(2)
    # orthogonal offsets: cos 0 -> t 0 -> the base
    assert close(merge_tensors("model_stock", [T([1.0, 0.0]), T([0.0, 1.0])], base, {}), [0.0, 0.0])
    # identical offsets: cos 1 -> t = 2 / 2 = 1 -> their average
    assert close(merge_tensors("model_stock", [T([1.0, 2.0]), T([1.0, 2.0])], base, {}), [1.0, 2.0])
    # cos 0.5 with N = 2: t = 1 / 1.5
    x, y = T([1.0, 0.0]), T([0.5, math.sqrt(0.75)])
    assert close(merge_tensors("model_stock", [x, y], base, {}), (x + y) / 2 * (1 / 1.5), 1e-6)
    # opposite offsets: 1 + (N - 1) cos = 0 -> singular -> keep the base
    assert close(merge_tensors("model_stock", [T([1.0, 0.0]), T([-1.0, 0.0])], base, {}), [0.0, 0.0])
    # filter_wise: one angle per row
    out = merge_tensors("model_stock", [T([[1.0, 0.0], [1.0, 2.0]]), T([[0.0, 1.0], [1.0, 2.0]])],
                        torch.zeros(2, 2), {"filter_wise": True})
    assert close(out, [[0.0, 0.0], [1.0, 2.0]])


def test_dare_fraction_norm_and_seed():
    torch.manual_seed(0)
    base = torch.zeros(400, 500)
    x = torch.randn(400, 500)
    out = merge_tensors("dare_linear", [x], base, {"density": 0.3}, seed=7, tensor_name="w")
    kept = out != 0
    assert abs(kept.float().mean().item() - 0.3) < 0.01
    assert torch.allclose(out[kept] / x[kept], torch.full_like(out[kept], out[kept][0] / x[kept][0]))
    assert math.isclose(out.abs().sum().item(), x.abs().sum().item(), rel_tol=1e-4)  # L1 norm kept
    # same seed and name: same tensor; other seed or other tensor name: other mask
    assert torch.equal(out, merge_tensors("dare_linear", [x], base, {"density": 0.3}, seed=7, tensor_name="w"))
    assert not torch.equal(out, merge_tensors("dare_linear", [x], base, {"density": 0.3}, seed=8, tensor_name="w"))
    assert not torch.equal(out, merge_tensors("dare_linear", [x], base, {"density": 0.3}, seed=7, tensor_name="v"))
    # without rescale: the kept entries are untouched
    raw = merge_tensors("dare_linear", [x], base, {"density": 0.3, "rescale": False}, seed=7, tensor_name="w")
    assert torch.equal(raw[raw != 0], x[raw != 0])


def test_dare_ties_masks_models_independently():
    base = torch.zeros(200, 100)
    x = torch.ones(200, 100)
    out = merge_tensors("dare_ties", [x, x], base, {"density": 0.5, "rescale": False, "normalize": False},
                        seed=1)
    # each entry is 0, 1 or 2 depending on the two independent masks
    frac = {v: (out == v).float().mean().item() for v in (0.0, 1.0, 2.0)}
    assert abs(frac[0.0] - 0.25) < 0.03 and abs(frac[1.0] - 0.5) < 0.03 and abs(frac[2.0] - 0.25) < 0.03


def test_della_keeps_large_magnitudes_more_often():
    torch.manual_seed(0)
    base = torch.zeros(2000, 50)
    x = torch.arange(1.0, 51.0).repeat(2000, 1)  # every row ranks the same way
    out = merge_tensors("della_linear", [x], base, {"density": 0.5, "epsilon": 0.4, "rescale": False}, seed=3)
    keep = (out != 0).float().mean(dim=0)
    # keep probability runs linearly from 0.1 (smallest) to 0.9 (largest)
    assert abs(keep[0].item() - 0.1) < 0.03 and abs(keep[-1].item() - 0.9) < 0.03
    assert abs(keep.mean().item() - 0.5) < 0.01
    resc = merge_tensors("della_linear", [x], base, {"density": 0.5, "epsilon": 0.4}, seed=3)
    assert math.isclose(resc.abs().sum().item(), x.abs().sum().item(), rel_tol=1e-4)
    assert torch.equal(resc, merge_tensors("della_linear", [x], base, {"density": 0.5, "epsilon": 0.4}, seed=3))


def test_bf16_inputs_and_output_dtype():
    base = torch.randn(8, 8).bfloat16()
    a = (base.float() + 0.1).bfloat16()
    out = merge_tensors("task_arithmetic", [a], base, {})
    assert out.dtype == torch.bfloat16 and torch.equal(out, a)
    assert merge_tensors("linear", [a, a], None, {}, out_dtype=torch.float32).dtype == torch.float32


def test_bad_inputs_are_refused():
    a = torch.ones(3)
    with pytest.raises(InvalidInput, match="unknown merge method"):
        merge_tensors("nope", [a], a, {})
    with pytest.raises(InvalidInput, match="no parameter 'dens'"):
        merge_tensors("ties", [a], a, {"dens": 0.5})
    with pytest.raises(InvalidInput, match="needs a base"):
        merge_tensors("ties", [a], None, {})
    with pytest.raises(InvalidInput, match="NaN or Inf"):
        merge_tensors("ties", [T([1.0, float("nan"), 0.0])], a, {}, tensor_name="x")
    with pytest.raises(InvalidInput, match="shapes differ"):
        merge_tensors("linear", [a, torch.ones(4)], None, {})
    with pytest.raises(InvalidInput, match="global"):
        bind_params(get_method("ties"), {}, 1, [{"normalize": True}])


def test_pair_roles():
    assert pair_roles("ties", ["a", "b"], "base") == (["a", "b"], "base")
    assert pair_roles("model_stock", ["a", "b"], "base") == (["a", "b"], "base")
    assert pair_roles("slerp", ["a", "b"], "base") == (["b"], "a")
    assert pair_roles("linear", ["a", "b"], "base") == (["a", "b"], None)
    assert pair_roles("nuslerp", ["a", "b"], "base") == (["a", "b"], "base")
    with pytest.raises(InvalidInput):
        pair_roles("ties", ["a", "b"], None)


# ---- compute dtype (mergekit's `dtype`) ---------------------------------------------------------------------

def test_half_precision_compute_rounds_every_operation_as_mergekit():
    torch.manual_seed(0)
    base = torch.randn(64, 48)
    xs = [base + 0.01 * torch.randn(64, 48) for _ in range(2)]
    bf = torch.bfloat16
    out = merge_tensors("task_arithmetic", xs, base, {"weight": [0.7, 0.4], "lambda": 0.8}, compute_dtype=bf,
                        out_dtype=bf)
    # mergekit's sequence in bf16: inputs rounded, d_i = x_i - b, d_i *= w_i (w in bf16), sum, * lambda, b + .
    b = base.to(bf)
    d = torch.stack([x.to(bf) - b for x in xs]) * torch.tensor([0.7, 0.4], dtype=bf).view(2, 1, 1)
    assert torch.equal(out, b + d.sum(dim=0) * 0.8)
    f32 = merge_tensors("task_arithmetic", xs, base, {"weight": [0.7, 0.4], "lambda": 0.8}, out_dtype=bf)
    assert not torch.equal(out, f32)  # computing in float32 and rounding once gives other tensors


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_ties_selects_on_the_compute_dtype_magnitudes(dtype, monkeypatch):
    torch.manual_seed(1)
    base = torch.zeros(300, 200)  # a zero base: the output is the kept task vector itself
    x = 0.01 * torch.randn(300, 200)
    d = x.to(dtype).float().abs().reshape(-1)
    k = int(0.3 * d.numel())
    ref = torch.zeros(d.numel(), dtype=torch.bool)
    ref[torch.sort(d, stable=True).indices[-k:]] = True  # top k, ties: the last ones in index order
    assert int(d.unique().numel()) < d.numel() // 5       # half precision: ties everywhere
    for sampled in (False, True):
        if sampled:  # the streamed order statistics give the same selection as the materialized ones
            monkeypatch.setattr(sparsify, "EXACT_SELECT_MAX", 1000)
            monkeypatch.setattr("simmerge_bandit.methods.job.CHUNK_ELEMENTS", 7000)
        out = merge_tensors("ties", [x], base, {"density": 0.3}, compute_dtype=dtype, out_dtype=dtype)
        assert torch.equal(out.reshape(-1) != 0, ref), sampled
        assert torch.equal(out.reshape(-1)[ref], x.to(dtype).reshape(-1)[ref])


def test_half_precision_rescale_overflow_is_refused():
    base = torch.zeros(300_000)
    x = torch.full((300_000,), 0.5)  # L1 norm 150000 > float16's largest value
    with pytest.raises(InvalidInput, match="overflows"):
        merge_tensors("breadcrumbs", [x], base, {"density": 0.5, "gamma": 0.1, "rescale": True},
                      compute_dtype=torch.float16)
    out = merge_tensors("breadcrumbs", [x], base, {"density": 0.5, "gamma": 0.1, "rescale": True})
    assert torch.isfinite(out).all()


def test_sources_refuse_values_not_finite_in_the_compute_dtype():
    from simmerge_bandit.methods.job import Source

    cpu = torch.device("cpu")

    def read(values, stored, compute):
        return Source(torch.tensor(values, dtype=stored), "m", cpu, compute).flat(0, len(values), "t")

    assert read([1.0, 70000.0], torch.float32, torch.float32).tolist() == [1.0, 70000.0]
    with pytest.raises(InvalidInput, match="NaN or Inf"):   # finite as stored, an infinity in float16
        read([1.0, 70000.0], torch.float32, torch.float16)
    for bad in (float("nan"), float("inf"), -float("inf")):  # checked as stored when the compute dtype is wider
        with pytest.raises(InvalidInput, match="NaN or Inf"):
            read([0.5, bad, 0.25], torch.bfloat16, torch.float32)
