"""The compiled TIES path (methods.fused) against the generic kernel: the same bits, every case it covers."""

import numpy as np
import pytest
import torch

from simmerge_bandit.errors import InvalidInput
from simmerge_bandit.methods import fused, get_method
from simmerge_bandit.methods.job import Source, TensorJob, TensorSink, bind_params, merge_tensors


@pytest.fixture(autouse=True)
def _every_size(monkeypatch):
    monkeypatch.setattr(fused, "MIN_ELEMENTS", 0)


def _family(shape, m, dtype=torch.bfloat16, seed=0, quantum=None):
    """A base and ``m`` fine-tunes of it. ``quantum`` rounds the deltas to multiples of it, so that many task-
    vector magnitudes are exactly equal (ties at every model's cut)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    models = []
    for _ in range(m):
        d = 0.02 * torch.randn(shape, generator=g)
        if quantum is not None:
            d = torch.round(d / quantum) * quantum
        models.append((base + d).to(dtype))
    return base.to(dtype), models


def _both(monkeypatch, models, base, params, **kw):
    monkeypatch.setattr(fused, "ENABLED", True)
    a = merge_tensors("ties", models, base, params, **kw)
    monkeypatch.setattr(fused, "ENABLED", False)
    b = merge_tensors("ties", models, base, params, **kw)
    monkeypatch.setattr(fused, "ENABLED", True)
    return a, b


CASES = [
    ({"density": 0.5}, 2),
    ({"density": 0.3, "weight": [0.7, 0.4], "lambda": 0.9}, 2),
    ({"density": [0.2, 1.0, 0.6], "weight": [1.0, 0.3, 0.55]}, 3),  # one model keeps everything
    ({"density": 0.4, "normalize": False}, 3),
    ({"density": 0.5, "weight": [0.8, -0.8]}, 2),   # a zero weight sum: divisor 0 -> 1 where nothing is kept
    ({"density": 0.5, "weight": [1.0, -0.5, 0.25]}, 3),
    ({"density": [0.9, 0.05], "weight": [0.3, 1.2], "lambda": 1.7}, 2),
    ({"density": [0.25, 0.3, 0.35]}, 3),
    ({"density": 1.0}, 2),                           # no cut at all
    ({"density": 0.001}, 2),                         # k = a few entries
]
# Two and three models only: numba compiles the loops for each number of models (and each dtype pair), so every
# other count would add seconds of compiling to the suite, not cases: the loops over models are the same code.


@pytest.mark.parametrize("compute", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("params,m", CASES)
def test_same_bits_as_the_generic_kernel(monkeypatch, compute, params, m):
    base, models = _family((300, 257), m, seed=m)
    a, b = _both(monkeypatch, models, base, params, compute_dtype=compute)
    assert a.dtype == b.dtype
    assert torch.equal(a, b)


@pytest.mark.parametrize("compute", [torch.bfloat16, torch.float32])
def test_ties_at_every_cut_split_across_parts_and_threads(monkeypatch, compute):
    """Deltas on a coarse grid: the cut of every model falls inside a large group of equal magnitudes, which the
    rule splits by index. Small parts put the split inside a later part; two threads split each chunk."""
    base, models = _family((1024, 600), 3, seed=7, quantum=0.01)
    monkeypatch.setattr(fused, "PART_ELEMENTS", 1 << 16)
    monkeypatch.setattr(fused, "MAX_PARTS", 1 << 10)
    old = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            a, b = _both(monkeypatch, models, base, {"density": [0.37, 0.5, 0.61], "weight": [1.0, 0.6, 0.9]},
                         compute_dtype=compute)
            assert torch.equal(a, b), threads
    finally:
        torch.set_num_threads(old)


def test_a_wrong_tie_position_is_caught(monkeypatch):
    """The comparison above can fail: keeping the entries at the cut from one index later changes the output."""
    base, models = _family((512, 300), 2, seed=3, quantum=0.01)
    k = fused._compiled()
    real = k.nth

    class Shifted:
        def __getattr__(self, name):
            return getattr(k, name)

        @staticmethod
        def nth(*args):
            return real(*args) + 1

    a, b = _both(monkeypatch, models, base, {"density": 0.5})
    assert torch.equal(a, b)
    monkeypatch.setattr(fused, "_kernels", Shifted())
    a, b = _both(monkeypatch, models, base, {"density": 0.5})
    assert not torch.equal(a, b)


@pytest.mark.parametrize("compute", [torch.bfloat16, torch.float32])
def test_float32_inputs(monkeypatch, compute):
    """float32 checkpoints: rounded to a bf16 compute dtype when read, or merged in float32 as they are."""
    base, models = _family((200, 333), 2, dtype=torch.float32, seed=5)
    a, b = _both(monkeypatch, models, base.float(), {"density": 0.45, "weight": [0.9, 0.35]}, compute_dtype=compute)
    assert torch.equal(a, b)


def test_hand_computed_tie_rule():
    """Magnitudes 1, 3, 3, 3, 2 and density 0.4: k = 2, the cut is 3 with three entries at it, and the last two
    in index order are kept (a stable ascending sort's top two). The second model is the base itself: a zero task
    vector, which changes neither the elected sign nor the divisor."""
    base = torch.zeros(5)
    x = torch.tensor([1.0, -3.0, 3.0, 3.0, -2.0])
    out = merge_tensors("ties", [x, base.clone()], base, {"density": 0.4})
    assert out.tolist() == [0.0, 0.0, 3.0, 3.0, 0.0]


def _job(models, base, params, dtype, exact_ties=False):
    spec = get_method("ties")
    glob, mp = bind_params(spec, params, len(models))
    dev = torch.device("cpu")
    srcs = [Source(t.reshape(-1), f"model {i}", dev) for i, t in enumerate(models)]
    shape = tuple(base.shape)
    return spec, TensorJob("w", shape, srcs, Source(base.reshape(-1), "the base model", dev), glob, mp,
                           TensorSink(shape[0], shape[1], dev, dtype), device=dev, dtype=dtype,
                           exact_ties=exact_ties)


def test_what_runs_here_and_what_does_not(monkeypatch):
    base, models = _family((8, 8), 2)
    assert fused.applies(*_job(models, base, {"density": 0.5}, torch.bfloat16))
    assert fused.applies(*_job(models, base, {"density": 0.5}, torch.float32))
    assert not fused.applies(*_job(models, base, {"density": 0.5}, torch.float16))
    assert not fused.applies(*_job(models, base, {"density": 0.5}, torch.bfloat16, exact_ties=True))
    assert not fused.applies(*_job(models, base, {"density": 0.5, "rescale": True}, torch.bfloat16))
    half = [models[0].half(), models[1]]
    assert not fused.applies(*_job(half, base, {"density": 0.5}, torch.bfloat16))  # stored dtypes differ
    for method in ("dare_ties", "breadcrumbs_ties", "task_arithmetic"):
        _, job = _job(models, base, {}, torch.bfloat16)
        assert not fused.applies(get_method(method), job)
    monkeypatch.setattr(fused, "MIN_ELEMENTS", 65)
    assert not fused.applies(*_job(models, base, {"density": 0.5}, torch.bfloat16))  # 64 elements


@pytest.mark.parametrize("which", ["base", "model"])
def test_nan_or_inf_is_refused_naming_the_input(which):
    base, models = _family((64, 64), 2)
    bad = (base if which == "base" else models[1]).clone()
    bad[10, 3] = float("inf") if which == "base" else float("nan")
    args = ([models[0], bad], base) if which == "model" else (models, bad)
    who = "the base model" if which == "base" else "model 1"
    for density in (0.5, 1.0):  # with and without the counting pass
        with pytest.raises(InvalidInput, match=f"of {who} contains NaN or Inf"):
            merge_tensors("ties", args[0], args[1], {"density": density}, compute_dtype=torch.bfloat16)


def test_bf16_rounding_matches_torch_on_every_halfway_case():
    """The bit rounding used for bfloat16 against torch's own conversion, on values at and around every halfway
    point of a range of exponents (and the overflow to infinity)."""
    k = fused._compiled()
    hi = np.arange(0x3F00, 0x3F40, dtype=np.uint32)
    lows = np.array([0x0000, 0x7FFF, 0x8000, 0x8001, 0xFFFF], dtype=np.uint32)
    bits = ((hi[:, None] << 16) | lows[None, :]).reshape(-1)
    bits = np.concatenate([bits, bits | 0x80000000, [0x7F7FFFFF, 0x7F7F8000]]).astype(np.uint32)
    vals = bits.view(np.float32)
    ref = torch.from_numpy(vals.copy()).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    got = np.empty(vals.size, dtype=np.uint16)
    k._out_block(got, vals, np.zeros(vals.size, dtype=np.float32))
    assert np.array_equal(got, ref)
