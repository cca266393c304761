"""Our operators against mergekit itself, on the same tiny checkpoints and the same configs.

mergekit runs out of process (its own virtual environment: ``.ci/setup-mergekit DIR`` makes one and prints the
``mergekit-yaml`` path). It is found through $SIMMERGE_MERGEKIT_YAML, else ``mergekit-yaml`` on PATH; without it
these tests skip, unless $SIMMERGE_REQUIRE_MERGEKIT=1, where they fail. Every config goes to one ``mergekit-multi``
run (its sibling script), so mergekit's start-up is paid once; it runs torch with one thread (``--num-threads
1``), as we do: torch's whole-tensor sums of half-precision tensors round each thread's partial sum, so mergekit's
own result for a rescaled or angle-based method depends on its thread count.

Configs compute in float32, bfloat16 and float16 (mergekit's ``dtype``; one without ``dtype`` computes in its
inputs' promoted dtype). Deterministic methods must give mergekit's tensors bit for bit in half precision, and in
float32 except where a whole-tensor sum is involved (rescaled breadcrumbs, model_stock, flattened nuslerp: within
1e-6 of the tensor's scale). Magnitude selection (TIES, breadcrumbs) is compared with ``exact_ties`` (mergekit's own
sort among equal magnitudes); the fast default may differ from mergekit only at entries whose task-vector magnitude
is one of that model's cut values, which is checked too, and shown to fail on outputs that are wrong. DARE and
DELLA draw random masks, so what is compared is what does not depend on the draw: density 1, and the rescaling of
mergekit's own mask (read back from its output on a zero base) with the density/epsilon rules at their edges.

TIES of bfloat16 and float32 configs on the CPU runs as compiled loops (``methods.fused``) for tensors of 2^18
elements and more, which these tiny models do not have: they check the generic kernel, and ``tests/test_fused.py``
checks that the compiled loops give the generic kernel's bits.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from simmerge_bandit import executor
from simmerge_bandit.checkpoint import read_checkpoint
from simmerge_bandit.errors import InvalidInput
from simmerge_bandit.methods import get_method, sparsify


def _mergekit_yaml() -> str | None:
    path = os.environ.get("SIMMERGE_MERGEKIT_YAML") or shutil.which("mergekit-yaml")
    return path if path and Path(path).exists() else None


MERGEKIT = _mergekit_yaml()
if MERGEKIT is None:
    if os.environ.get("SIMMERGE_REQUIRE_MERGEKIT") == "1":
        raise RuntimeError("SIMMERGE_REQUIRE_MERGEKIT=1 but mergekit-yaml was not found: set SIMMERGE_MERGEKIT_YAML "
                           "(bash .ci/setup-mergekit DIR prints it)")
    pytestmark = pytest.mark.skip(reason="mergekit not installed: run `bash .ci/setup-mergekit /tmp/mkvenv` and set "
                                         "SIMMERGE_MERGEKIT_YAML to the path it prints")

#: Methods whose float32 result involves a whole-tensor sum (compared within rounding, not bit for bit).
SUMS = {"breadcrumbs_ties", "model_stock", "nuslerp-flat"}
HALF = ("bfloat16", "float16")


def load(path: Path) -> dict[str, torch.Tensor]:
    sd = {}
    for f in read_checkpoint(path).files:
        sd.update(load_file(str(Path(path) / f)))
    return sd


def variant(src: Path, dst: Path, seed: int, scale: float, dtype=None, keep: float = 1.0) -> Path:
    """A 'fine-tune' of a checkpoint: ``keep`` times its weights plus seeded noise, beside its config/tokenizer."""
    shutil.copytree(src, dst)
    g = torch.Generator().manual_seed(seed)
    for f in read_checkpoint(dst).files:
        sd = load_file(str(dst / f))
        for k, v in sd.items():
            noisy = v.float() * keep + torch.randn(v.shape, generator=g) * scale
            sd[k] = noisy.to(dtype or v.dtype)
        save_file(sd, str(dst / f), metadata={"format": "pt"})
    return dst


def _cfg(method, models, base=None, params=None, per_model=None, dtype=None, out_dtype=None) -> dict:
    cfg = {"merge_method": method}
    if dtype:
        cfg["dtype"] = dtype
    if out_dtype:
        cfg["out_dtype"] = out_dtype
    if base is not None:
        cfg["base_model"] = str(base)
    cfg["models"] = [{"model": str(p), **({"parameters": pm} if pm else {})}
                     for p, pm in zip(models, per_model or [None] * len(models))]
    if params:
        cfg["parameters"] = params
    return cfg


def cases(m: dict) -> dict[str, dict]:
    """Case name -> mergekit config, for every architecture, method and dtype compared."""
    out = {}
    w = [{"weight": 0.7}, {"weight": 0.4}, {"weight": 1.0}]
    ties_pm = [{"weight": 0.7, "density": 0.4}, {"weight": 0.4, "density": 0.6}, {"weight": 1.0, "density": 0.3}]
    for arch, runs in (("llama", [("float32", None), ("bfloat16", None), ("float16", "float32")]),
                       ("qwen2", [(None, None), ("float32", "bfloat16")]),
                       ("gpt2", [("float16", "float32"), ("float32", None)])):
        base, a, b, c = m[f"{arch}_base"], m[f"{arch}_a"], m[f"{arch}_b"], m[f"{arch}_c"]
        for dt, odt in runs:
            tag = dt or "promoted"

            def add(name, method, models, base=None, params=None, per_model=None):
                out[f"{arch}-{name}-{tag}"] = _cfg(method, models, base, params, per_model, dt, odt)

            add("linear", "linear", [a, b, c], per_model=w)
            add("ties", "ties", [a, b, c], base, None, ties_pm)
            add("slerp", "slerp", [a, b], a, {"t": 0.3})
            add("model_stock", "model_stock", [a, b, c], base)
            if arch != "llama":
                continue
            add("task_arithmetic", "task_arithmetic", [a, b, c], base, {"lambda": 0.8}, w)
            add("ties-lambda-int8", "ties", [a, b], base, {"lambda": 1.3, "int8_mask": True, "normalize": False},
                ties_pm[:2])
            add("breadcrumbs_ties", "breadcrumbs_ties", [a, b], base, {"rescale": True},
                [{"weight": 1.0, "density": 0.8, "gamma": 0.05}] * 2)
            add("breadcrumbs", "breadcrumbs", [a, b], base, None,
                [{"weight": 0.5, "density": 0.9, "gamma": 0.2}] * 2)
            add("nuslerp", "nuslerp", [a, b], base, {"nuslerp_flatten": False}, [{"weight": 1.0}, {"weight": 2.0}])
            add("nuslerp-flat", "nuslerp", [a, b], None, None, [{"weight": 1.0}, {"weight": 3.0}])
            add("nuslerp-rowwise", "nuslerp", [a, b], base, {"nuslerp_flatten": False, "nuslerp_row_wise": True},
                [{"weight": 2.0}, {"weight": 1.0}])
            add("model_stock-filter_wise", "model_stock", [a, b], base, {"filter_wise": True})
            add("slerp-gradient", "slerp", [a, b], a, {"t": [{"filter": "mlp", "value": [0.1, 0.9]}, {"value": 0.5}]})
            for method in ("dare_ties", "dare_linear", "della", "della_linear"):  # density 1: no draw at all
                add(f"{method}-d1", method, [a, b], base, {"rescale": True},
                    [{"weight": 0.6, "density": 1.0}, {"weight": 0.9, "density": 1.0}])
    for dt in ("float32",) + HALF:  # one model on a zero base: the output is the rescaled masked task vector
        zero, noise = m["zero"], m["noise"]
        out[f"masked-dare_linear-{dt}"] = _cfg("dare_linear", [noise], zero, None,
                                               [{"weight": 1.0, "density": 0.6}], dt)
        out[f"masked-della_linear-{dt}"] = _cfg("della_linear", [noise], zero, None,
                                                [{"weight": 1.0, "density": 0.5, "epsilon": 0.2}], dt)
    return out


def _names() -> list[str]:
    keys = ["zero", "noise"] + [f"{a}_{s}" for a in ("llama", "qwen2", "gpt2") for s in ("base", "a", "b", "c")]
    return list(cases({k: Path(k) for k in keys}))


def _dtype(name: str) -> str | None:
    tag = name.rsplit("-", 1)[1]
    return None if tag == "promoted" else tag


@pytest.fixture(scope="module")
def family(tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("mkref")
    m = {"llama_base": tiny_models["base"], "llama_a": tiny_models["ft_a"], "llama_b": tiny_models["ft_b"],
         "llama_c": variant(tiny_models["base"], root / "llama_c", 3, 0.02)}
    for arch in ("qwen2", "gpt2"):
        src = tiny_models[arch]
        m[f"{arch}_base"] = src
        for i, k in enumerate("abc"):
            m[f"{arch}_{k}"] = variant(src, root / f"{arch}_{k}", 10 + i, 0.02)
    m["zero"] = variant(tiny_models["base"], root / "zero", 0, 0.0, keep=0.0)
    m["noise"] = variant(m["zero"], root / "noise", 7, 0.02)
    return m


def _roundtrips(m: dict, root: Path) -> dict[str, Path]:
    """Merges made our way (catalog-style API, a config overridden to float32 compute, a chain); each writes the
    mergekit config that must reproduce it."""
    base, a, b = m["llama_base"], m["llama_a"], m["llama_b"]
    outs = {
        "rt-api-ties": executor.merge_pair([a, b], "ties", {"density": 0.4}, root / "rt-api-ties", base=base,
                                           dtype="bfloat16", exact_ties=True).out,
        "rt-api-slerp": executor.merge_pair([a, b], "slerp", {"t": 0.7}, root / "rt-api-slerp", base=base).out,
        "rt-config-f32": executor.merge_config(
            _cfg("ties", [a, b], base, None, [{"density": 0.5}, {"density": 0.3}], "bfloat16"),
            root / "rt-config-f32", compute_dtype="float32", exact_ties=True).out,
        "rt-chain": executor.merge_chain_pairs([a, b, m["llama_c"]], [("ties", {"density": 0.5}),
                                                                      ("model_stock", {})],
                                               root / "rt-chain", base=base, exact_ties=True,
                                               compute_dtype="bfloat16").out,
    }
    return outs


def _rename_docs(docs: list[dict], prefix: str) -> list[dict]:
    """A written (possibly multi-document) config with its intermediate names made unique to ``prefix``."""
    names = {d["name"] for d in docs if d.get("name")}
    fix = {n: f"{prefix}-{n}" for n in names}
    out = []
    for d in docs:
        d = json.loads(json.dumps(d))
        d["name"] = fix.get(d.get("name"), prefix)
        if d.get("base_model") in fix:
            d["base_model"] = fix[d["base_model"]]
        for e in d["models"]:
            e["model"] = fix.get(e["model"], e["model"])
        out.append(d)
    return out


@pytest.fixture(scope="module")
def reference(family, tmp_path_factory):
    """Run every case (and the configs our round-trip merges wrote) through one mergekit-multi run."""
    root = tmp_path_factory.mktemp("mkout")
    todo = cases(family)
    ours_rt = _roundtrips(family, root / "ours")
    docs = [{"name": name, **cfg} for name, cfg in todo.items()]
    for name, path in ours_rt.items():
        docs += _rename_docs(list(yaml.safe_load_all((path / "mergekit_config.yml").read_text())), name)
    multi = Path(MERGEKIT).with_name("mergekit-multi")
    cfg_path = root / "all.yml"
    cfg_path.write_text("---\n".join(yaml.safe_dump(d, sort_keys=False) for d in docs))
    r = subprocess.run([str(multi), str(cfg_path), "--intermediate-dir", str(root / "out"), "--quiet",
                        "--random-seed", "0", "--num-threads", "1"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    theirs = {name: load(root / "out" / name) for name in list(todo) + list(ours_rt)}
    return {"cases": todo, "theirs": theirs, "roundtrips": ours_rt}


def _method(name: str) -> str:
    return name.split("-", 1)[1].rsplit("-", 1)[0]


def _compare(name: str, ours: dict, theirs: dict, exact: bool, step: bool = False) -> None:
    """Bit for bit (``exact``), else within 1e-6 of each tensor's scale (a float32 sum rounded differently), or
    with ``step`` within one rounding step of the output dtype (a sum in float32 that the output rounds)."""
    assert set(ours) == set(theirs), (name, sorted(set(ours) ^ set(theirs)))
    for k in theirs:
        a, b = ours[k], theirs[k]
        assert a.dtype == b.dtype, (name, k, a.dtype, b.dtype)
        diff = (a.float() - b.float()).abs()
        if exact:
            assert torch.equal(a, b), (name, k, int((a != b).sum()), float(diff.max()))
        elif step:
            fi = torch.finfo(b.dtype)
            assert bool((diff <= b.float().abs() * fi.eps + fi.smallest_normal).all()), (name, k)
        else:
            assert float(diff.max()) <= 1e-6 * (float(b.float().abs().max()) + 1e-12), (name, k)


@pytest.mark.parametrize("case", [c for c in _names() if not c.startswith("masked-")])
def test_same_tensors_as_mergekit(case, reference, tmp_path):
    cfg, theirs = reference["cases"][case], reference["theirs"][case]
    ours = load(executor.merge_config(cfg, tmp_path / "ours", exact_ties=True).out)
    dt = _dtype(case)
    exact = dt != "float32" or _method(case) not in SUMS
    _compare(case, ours, theirs, exact)
    if dt is None:  # no dtype in the config: computed and written in the inputs' promoted dtype
        assert {t.dtype for t in ours.values() if t.is_floating_point()} == {torch.bfloat16}


@pytest.mark.parametrize("case", ["rt-api-ties", "rt-api-slerp", "rt-config-f32", "rt-chain"])
def test_written_config_reproduces_the_merge_under_mergekit(case, reference):
    """A merge from the API (as the catalog runs it: float32 compute), a config with --compute-dtype float32 and
    a bf16 chain each write a mergekit_config.yml that gives their tensors under mergekit, bit for bit."""
    out = reference["roundtrips"][case]
    _compare(case, load(out), reference["theirs"][case], exact=True)
    docs = list(yaml.safe_load_all((out / "mergekit_config.yml").read_text()))
    prov = json.loads((out / "provenance.json").read_text())
    assert docs[-1]["dtype"] == prov["compute_dtype"] == prov["steps"][-1]["compute_dtype"]
    if case == "rt-config-f32":  # --compute-dtype float32 over a bf16 config: recorded; still written as bf16
        assert docs[-1]["dtype"] == "float32" and docs[-1]["out_dtype"] == "bfloat16"


def _cuts(method: str, entry: dict, mag: torch.Tensor) -> list[float]:
    """The magnitudes at which model ``entry``'s selection cuts (mergekit's k-th largest for TIES; the first and
    last kept ascending ranks for breadcrumbs)."""
    p = entry["parameters"]
    n = mag.numel()
    if p.get("density", 1.0) >= 1:
        return []
    s = torch.sort(mag.reshape(-1)).values
    if method.startswith("breadcrumbs"):
        target, top = int(p["density"] * n), int(p.get("gamma", 0.01) * n)
        lo = max(0, n - target - top)
        return [float(s[lo]), float(s[lo + target - 1])] if target else []
    k = max(1, int(p["density"] * n))
    return [float(s[n - k])]


def off_cut(cfg: dict, ours: dict, theirs: dict, tol: float = 0.0) -> dict[str, int]:
    """Per tensor, the entries where ``ours`` differs from mergekit's ``theirs`` (by more than ``tol`` times the
    tensor's scale) although no model's task-vector magnitude (in the compute dtype) there is that model's cut."""
    cd = getattr(torch, cfg["dtype"])
    base = load(Path(cfg["base_model"]))
    models = [load(Path(e["model"])) for e in cfg["models"]]
    bad = {}
    for k in theirs:
        diff = (ours[k].float() - theirs[k].float()).abs() > tol * float(theirs[k].float().abs().max())
        if not diff.any():
            continue
        on_cut = torch.zeros_like(diff)
        for entry, sd in zip(cfg["models"], models):
            mag = (sd[k].to(cd) - base[k].to(cd)).abs().float()
            for v in _cuts(cfg["merge_method"], entry, mag):
                on_cut |= mag == v
        n = int((diff & ~on_cut).sum())
        if n:
            bad[k] = n
    return bad


TIE_CASES = [c for c in _names() if _method(c) in ("ties", "breadcrumbs", "breadcrumbs_ties")
             and _dtype(c) is not None]


@pytest.mark.parametrize("case", TIE_CASES)
def test_fast_tie_breaking_differs_only_on_the_cut(case, reference, tmp_path):
    """Without exact_ties, an entry may differ from mergekit only where some model's task-vector magnitude is
    that model's cut value (where mergekit's unstable argsort and our rule pick different equal entries)."""
    cfg, theirs = reference["cases"][case], reference["theirs"][case]
    ours = load(executor.merge_config(cfg, tmp_path / "ours").out)
    sums = _dtype(case) == "float32" and _method(case) in SUMS  # rescaled: the scale may differ in its last bit
    assert off_cut(cfg, ours, theirs, 1e-6 if sums else 0.0) == {}, case


def test_the_cut_check_fails_on_wrong_outputs(reference):
    case = "llama-ties-bfloat16"
    cfg, theirs = reference["cases"][case], reference["theirs"][case]
    assert off_cut(cfg, theirs, theirs) == {}
    # one entry where no model's magnitude is on its cut, moved away from mergekit's value
    name = "model.layers.0.mlp.up_proj.weight"
    base = load(Path(cfg["base_model"]))
    on_cut = torch.zeros(theirs[name].numel(), dtype=torch.bool)
    for entry in cfg["models"]:
        mag = (load(Path(entry["model"]))[name].bfloat16() - base[name].bfloat16()).abs().float().reshape(-1)
        for v in _cuts("ties", entry, mag):
            on_cut |= mag == v
    j = int((~on_cut).nonzero()[0, 0])
    corrupted = {k: v.clone() for k, v in theirs.items()}
    flat = corrupted[name].view(-1)
    flat[j] = flat[j] + flat[j].abs().clamp(min=1e-3)
    assert off_cut(cfg, corrupted, theirs) == {name: 1}
    # an output unrelated to mergekit's: another merge's tensors
    assert off_cut(cfg, reference["theirs"]["llama-linear-bfloat16"], theirs)


@pytest.mark.parametrize("case", [c for c in _names() if c.startswith("masked-")])
def test_rescaling_of_mergekits_own_dare_della_masks(case, reference, tmp_path, monkeypatch):
    """On a zero base with one model, mergekit's output is its rescaled masked task vector: its nonzero entries
    are its mask. Given that mask, our sparsifier must rescale (in mergekit's working dtype) to its tensors."""
    cfg, theirs = reference["cases"][case], reference["theirs"][case]
    masks = {k: (v != 0).reshape(v.shape[0] if v.dim() else 1, -1) for k, v in theirs.items()}
    assert all(0.3 < float(m.float().mean()) < 0.8 for m in masks.values() if m.numel() > 100)

    def draw(self, ci, lo, hi, d):
        return masks[self.job.name].reshape(-1, self.job.row_len)[lo:hi].to(d.device)

    monkeypatch.setattr(sparsify.Random, "_draw", draw)
    ours = load(executor.merge_config(cfg, tmp_path / "ours").out)
    # bf16 masks and rescales in bf16: bit for bit. float32, and float16 on the CPU (which mergekit rescales in
    # float32): both L1 norms are float32 sums, which may round differently from torch's by one float32 step.
    dt = _dtype(case)
    _compare(case, ours, theirs, exact=dt == "bfloat16", step=dt == "float16")


def test_della_density_epsilon_edges_as_mergekit():
    """mergekit's della_magprune refuses density +/- epsilon outside (0, 1) unless density is 1; same rule here,
    on the same float arithmetic (0.9 + 0.1 < 1 in binary floating point)."""
    grid = [(0.5, 0.5), (0.9, 0.1), (0.8, 0.2), (0.2, 0.2), (0.3, 0.29), (1.0, 0.5), (0.7, 0.3), (0.1, 0.1 - 1e-12)]
    python = Path(MERGEKIT).with_name("python")
    script = ("import json, sys, torch\nfrom mergekit.sparsify import della_magprune\nres = []\n"
              "for d, e in json.loads(sys.argv[1]):\n"
              "    try:\n        della_magprune(torch.ones(4, 4), d, e)\n        res.append(True)\n"
              "    except ValueError:\n        res.append(False)\nprint(json.dumps(res))\n")
    r = subprocess.run([str(python), "-c", script, json.dumps(grid)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    theirs = json.loads(r.stdout)

    def ours(d, e):
        try:
            get_method("della").validate({"density": d, "epsilon": e})
            return True
        except InvalidInput:
            return False

    assert [ours(d, e) for d, e in grid] == theirs
    assert theirs.count(False) >= 3 and theirs.count(True) >= 3
