"""The GPU paths give the CPU's results, within rounding: every merge method (in memory and through the executor,
whose CUDA path uploads through a pinned staging buffer on a side stream) and both signature passes.

Skipped without a CUDA GPU; ``benchmarks/gpu_check.sh`` runs them on one. $SIMMERGE_TEST_DEVICE names the device
compared with the CPU (default ``cuda``); ``SIMMERGE_TEST_DEVICE=cpu`` runs the same comparisons CPU against CPU, so
that the tests themselves are exercised on a machine without a GPU.

"Within rounding": a GPU reduces in another order (other chunk sizes, parallel sums) and its transcendental
functions differ from the CPU's by an ulp, so tensors agree within a few units of the compute dtype's last place,
not bit for bit. Random methods (DARE, DELLA) draw their masks on the device: they are compared at density 1
(no draw) and by the statistics of their draws otherwise.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from simmerge_bandit import executor
from simmerge_bandit.checkpoint import read_checkpoint
from simmerge_bandit.methods import REGISTRY, merge_tensors

DEVICE = os.environ.get("SIMMERGE_TEST_DEVICE", "cuda")
pytestmark = pytest.mark.skipif(DEVICE.startswith("cuda") and not torch.cuda.is_available(),
                                reason="needs a CUDA GPU (benchmarks/gpu_check.sh runs these on one)")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
RANDOM = {"dare_linear", "dare_ties", "della", "della_linear"}


def params(method: str) -> dict:
    spec = REGISTRY[method]
    p = {}
    names = {x.name for x in spec.params}
    if "density" in names:
        p["density"] = 1.0 if method in RANDOM else 0.6
    if "gamma" in names:
        p["gamma"] = 0.05
    if "t" in names:
        p["t"] = 0.3
    if method == "nuslerp":
        p["weight"] = [1.0, 2.0]
    if "weight" in names and method != "nuslerp":
        p["weight"] = [0.7, 0.4]
    if "rescale" in names:
        p["rescale"] = True
    return p


def inputs(method: str, shape, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g) * 0.02
    xs = [base + torch.randn(shape, generator=g) * 0.005 for _ in range(2)]
    spec = REGISTRY[method]
    if spec.base_role == "none":
        return xs, None
    if spec.base_role == "input":
        return xs[:1], base
    return xs, base


def close(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype, ulps: int = 8) -> None:
    a, b = a.float().cpu(), b.float().cpu()
    eps = torch.finfo(dtype).eps
    scale = float(b.abs().max()) + 1e-12
    torch.testing.assert_close(a, b, rtol=ulps * eps, atol=ulps * eps * scale)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("method", list(REGISTRY))
def test_every_method_on_the_device_gives_the_cpus_tensor(method, dtype):
    for shape in ((257, 130), (1000,), (3, 40, 50)):
        xs, base = inputs(method, shape)
        p = params(method)
        cpu = merge_tensors(method, xs, base, p, tensor_name="w", compute_dtype=dtype, out_dtype=dtype)
        dev = merge_tensors(method, [x.to(DEVICE) for x in xs], None if base is None else base.to(DEVICE), p,
                            tensor_name="w", compute_dtype=dtype, out_dtype=dtype, device=DEVICE)
        assert dev.device.type == torch.device(DEVICE).type and dev.dtype == dtype
        close(dev, cpu, dtype)


@pytest.mark.parametrize("method", sorted(RANDOM))
def test_random_masks_on_the_device_keep_the_density_and_the_norm(method):
    g = torch.Generator().manual_seed(1)
    base = torch.zeros(400, 300)
    x = torch.randn(400, 300, generator=g)
    p = {"density": 0.4, "rescale": True, **({"epsilon": 0.2} if method.startswith("della") else {})}
    for device in ("cpu", DEVICE):
        out = merge_tensors(method, [x.to(device)], base.to(device), p, seed=3, tensor_name="w", device=device)
        kept = (out != 0).float().mean().item()
        assert abs(kept - 0.4) < 0.01, (device, kept)
        l1_ratio = out.abs().sum().item() / x.abs().sum().item()
        assert abs(l1_ratio - 1) < 1e-3, (device, l1_ratio)  # rescaled to the task vector's L1 norm


def load(path: Path) -> dict[str, torch.Tensor]:
    sd = {}
    for f in read_checkpoint(path).files:
        sd.update(load_file(str(Path(path) / f)))
    return sd


@pytest.mark.parametrize("compute", ["float32", "bfloat16"])
@pytest.mark.parametrize("method", ["linear", "ties", "breadcrumbs_ties", "dare_linear", "slerp", "nuslerp",
                                    "model_stock", "task_arithmetic"])
def test_executor_on_the_device_writes_the_cpus_checkpoint(tiny_models, tmp_path, monkeypatch, method, compute):
    """Through the executor: the bf16 sharded model is uploaded in pieces smaller than its tensors (the staging
    buffer reused across pieces, on the side stream) and merged in the device's larger chunks."""
    monkeypatch.setattr(executor, "STAGING_BYTES", 4096)
    m = tiny_models
    p = params(method)
    p.pop("weight", None)
    if method in RANDOM:
        p["density"] = 1.0
    models = [m["ft_a"], m["ft_sharded"]]
    kw = dict(base=m["base"], compute_dtype=compute, dtype=compute)
    outs = []
    for i, device in enumerate(("cpu", DEVICE)):
        out = executor.merge_pair(models, method, p, tmp_path / f"out{i}", device=device, **kw).out
        prov = json.loads((out / "provenance.json").read_text())
        assert prov["device"].startswith(torch.device(device).type) and prov["compute_dtype"] == compute
        outs.append(load(out))
    assert set(outs[0]) == set(outs[1])
    for k, v in outs[0].items():
        close(outs[1][k], v, getattr(torch, compute))


def test_signatures_on_the_device_match_the_cpus(tiny_models):
    from simmerge_bandit.signals import SignatureConfig, functional, structural

    cfg = SignatureConfig()
    ck, ck0 = read_checkpoint(tiny_models["ft_a"]), read_checkpoint(tiny_models["base"])
    meta_c, arr_c = structural.compute(ck, ck0, cfg, device="cpu")
    meta_d, arr_d = structural.compute(ck, ck0, cfg, device=DEVICE)
    assert set(arr_c) == set(arr_d)
    for k in arr_c:
        np.testing.assert_allclose(np.asarray(arr_d[k], dtype=np.float64), np.asarray(arr_c[k], dtype=np.float64),
                                   rtol=1e-4, atol=1e-6, err_msg=k)
    prompts = ["abc def", "the quick brown fox", "1 + 2 = 3", "zzz"]
    fc = functional.compute(tiny_models["ft_a"], prompts, cfg, model_name="a", device="cpu")
    fd = functional.compute(tiny_models["ft_a"], prompts, cfg, model_name="a", device=DEVICE)
    assert set(fc[1]) == set(fd[1])
    for k in fc[1]:
        a, b = np.asarray(fd[1][k]), np.asarray(fc[1][k])
        if a.dtype.kind in "iub":
            assert np.array_equal(a, b), k
        else:
            np.testing.assert_allclose(a.astype(np.float64), b.astype(np.float64), rtol=2e-3, atol=2e-4,
                                       err_msg=k)
