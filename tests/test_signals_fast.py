"""The fast paths of the signature passes and of the signature store, checked against plain reference code.

The structural pass scatters into a signed 6k accumulator (bucket and sign in one index), groups rows that share a
row hash on tall tensors, chunks the scatter, reads tensors as views of a memory mapping and caches layouts, hash
tables and per-tensor plans; signatures are read back as views of the stored bytes, by exact key. Each is compared
here with the straightforward computation it replaces, on real tiny checkpoints and a real DuckDB store.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors import safe_open

from simmerge_bandit.checkpoint import read_checkpoint
from simmerge_bandit.signals import SignatureConfig, cache, structural
from simmerge_bandit.signals.cache import Signature
from simmerge_bandit.store import Store

from conftest import make_llama

CFG = SignatureConfig()


def _reference_sketch(t: np.ndarray, name: str, k: int) -> np.ndarray:
    """The count sketch by its definition: entry (i, j) adds sign sr[i] sc[j] times its value to bucket
    (hr[i] + hc[j]) mod k, with the tables decoded from the folded row and column indices."""
    r, c = t.shape
    ur, uc = (x.numpy().astype(np.int64) for x in structural._hash_tables(name, (r, c), k, CFG))
    hr, hc = ur % (2 * k), uc % (2 * k)
    sr, sc = np.where(ur >= 2 * k, -1.0, 1.0), np.where(uc >= 2 * k, -1.0, 1.0)
    assert hr.max() < k and hc.max() < k
    out = np.zeros(k)
    np.add.at(out, ((hr[:, None] + hc[None, :]) % k).ravel(), (sr[:, None] * sc[None, :] * t).ravel())
    return out


@pytest.mark.parametrize("shape, chunk", [((37, 53), 1 << 18), ((37, 53), 100), ((4096 + 5, 3), 1 << 18),
                                          ((9000, 7), 64), ((11,), 1 << 18)])
def test_sketch_matches_the_definition(shape, chunk, monkeypatch):
    # (4096 + 5) x 3 and 9000 x 7 have at least 4k rows for k = 1024: rows sharing a hash are added first
    monkeypatch.setattr(structural, "_CHUNK", chunk)
    k = 1024
    t = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    signed = torch.zeros(6 * k)
    view = structural._view2d(shape)
    structural.sketch_into(t.view(view), *structural._hash_tables("w", view, k, CFG), k, signed)
    got = structural.fold_signed(signed, k).double().numpy()
    want = _reference_sketch(t.double().numpy().reshape(structural._view2d(shape)), "w", k)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    root = tmp_path_factory.mktemp("fast-family")
    base = make_llama(root / "base", seed=20, hidden=48, layers=2)
    return {"base": base, "a": make_llama(root / "a", seed=21, hidden=48, layers=2, perturb_from=base),
            "bf16": make_llama(root / "bf16", seed=22, hidden=48, layers=2, dtype=torch.bfloat16)}


def test_tensor_reader_returns_what_safetensors_reads(family):
    for which in ("a", "bf16"):
        ck = read_checkpoint(family[which])
        reader = structural.TensorReader(ck)
        with safe_open(str(family[which] / ck.files[0]), framework="pt") as f:
            for name in ck.tensors:
                got, want = reader.get(name), f.get_tensor(name)
                assert got.dtype == want.dtype and got.shape == want.shape and torch.equal(got, want), name
        reader.close()


def test_structural_pass_matches_a_plain_float64_pass(family):
    ck, ck0 = read_checkpoint(family["a"]), read_checkpoint(family["base"])
    meta, arrays = structural.compute(ck, ck0, CFG)
    layout = structural.make_layout(ck.shapes(), CFG)
    with safe_open(str(family["a"] / ck.files[0]), framework="pt") as fa, \
            safe_open(str(family["base"] / ck0.files[0]), framework="pt") as f0:
        tau = {n: (fa.get_tensor(n).double() - f0.get_tensor(n).double()).reshape(-1) for n in layout.names}
        base_sq = sum(float(f0.get_tensor(n).double().square().sum()) for n in layout.names)
    group_sq = np.zeros(len(layout.groups))
    for n, t in tau.items():
        group_sq[layout.tensor_group[n]] += float(t.square().sum())
    np.testing.assert_allclose(arrays["group_sq"], group_sq, rtol=1e-5)
    assert meta["base_sq_norm"] == pytest.approx(base_sq, rel=1e-5)
    assert meta["tv_sq_norm"] == pytest.approx(group_sq.sum(), rel=1e-5)
    for n, idx in layout.sample.items():
        so = layout.sample_offset[n]
        vals = tau[n].float()
        np.testing.assert_array_equal(arrays["sample"][so:so + len(idx)], vals[idx].numpy())
        if len(vals) > structural.THRESHOLD_SAMPLE:
            vals_thr = vals[structural._threshold_index(n, len(vals), CFG)]
        else:
            vals_thr = vals
        thr = structural.top_threshold(vals_thr.abs(), CFG.top_density)
        np.testing.assert_array_equal(arrays["sample_top"][so:so + len(idx)], (vals[idx].abs() >= thr).numpy())
    for g, (k, exact) in enumerate(zip(layout.group_k, layout.group_exact)):
        if not exact:
            want = sum(_reference_sketch(tau[n].numpy().reshape(structural._view2d(ck.tensors[n].shape)), n, k)
                       for n in layout.names if layout.tensor_group[n] == g)
            off = layout.group_offset[g]
            np.testing.assert_allclose(arrays["sketch"][off:off + k], want, rtol=1e-4, atol=1e-6)


def test_cached_layouts_and_tables_give_the_same_signature(family):
    """Same seed, same projections: a fresh process (no caches) computes exactly what a warm one does."""
    ck, ck0 = read_checkpoint(family["a"]), read_checkpoint(family["base"])
    warm = structural.compute(ck, ck0, CFG)[1]
    for fn in (structural._layout, structural._hash_tables, structural._threshold_index, structural._plans):
        fn.cache_clear()
    cold = structural.compute(ck, ck0, CFG)[1]
    for name in warm:
        np.testing.assert_array_equal(warm[name], cold[name])
    # and another seed gives other hashes
    other = structural.compute(ck, ck0, SignatureConfig(seed=CFG.seed + 1))[1]
    assert not np.array_equal(other["sketch"], warm["sketch"])


# ---------------------------------------------------------------------------------------------------------------
# the store


def test_arrays_round_trip_through_the_store_as_views(simmerge_home):
    arrays = {"f4": np.arange(7, dtype=np.float32), "f8": np.linspace(0, 1, 5), "i4": np.arange(6, dtype=np.int32)
              .reshape(2, 3), "u1": np.array([1, 0, 1], dtype=np.uint8), "b": np.array([True, False]),
              "empty": np.zeros((0, 4), dtype=np.float32), "scalar": np.array(3.5),
              "big_endian": np.arange(4, dtype=">f4"), "strided": np.arange(20, dtype=np.float64)[::3]}
    store = Store.open(simmerge_home)
    cache.save_signature(store, Signature("functional", "fp", "p", "v", "m", meta={"n": 1}, arrays=arrays))
    cache.MEMO.clear()
    sig = cache.load_signature(store, ("fp", "functional", "p", "v"))
    assert sig.meta == {"n": 1} and set(sig.arrays) == set(arrays)
    for name, a in arrays.items():
        got = sig.arrays[name]
        assert got.shape == a.shape and got.dtype == a.dtype.newbyteorder("="), name
        np.testing.assert_array_equal(got, a)
    assert not sig.arrays["f8"].flags.writeable                   # a view of the stored bytes, not a copy
    store.close()


def test_load_signatures_reads_only_the_keys_asked_for(simmerge_home):
    store = Store.open(simmerge_home)
    for ctx in ("p1", "p2"):
        cache.save_signature(store, Signature("functional", "fp", ctx, "v", "m",
                                              arrays={"x": np.full(3, float(ctx[1]), np.float32)}))
    cache.save_signature(store, Signature("structural", "fp", "", "v", "m", status="absent", reason="no base"))
    cache.MEMO.clear()
    got = cache.load_signatures(store, [("fp", "functional", "p2", "v"), ("fp", "functional", "p3", "v"),
                                        ("fp", "structural", "", "v")])
    assert set(got) == {("fp", "functional", "p2", "v"), ("fp", "structural", "", "v")}
    np.testing.assert_array_equal(got[("fp", "functional", "p2", "v")].arrays["x"], np.full(3, 2.0))
    absent = got[("fp", "structural", "", "v")]
    assert absent.status == "absent" and absent.reason == "no base" and absent.arrays == {}
    assert len(cache.MEMO) == 2                                  # p1 was neither read nor memoized
    store.close()
