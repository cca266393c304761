"""Signatures and pairwise features on real tiny checkpoints and a real DuckDB store.

The reference for every sketch is the ``--exact`` path (full distributions, full token states, full tensors), run on
the micro-zoo's trained experts and on a wider hand-made family (hidden size 96 > the 64-d state projection, three
layers) so that projections, count sketches and the coordinate sample are all genuinely approximate.
"""

from __future__ import annotations

import gc
import json
import math
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from simmerge_bandit import signals
from simmerge_bandit.catalog import Catalog
from simmerge_bandit.cli import cli
from simmerge_bandit.errors import InvalidCheckpoint, InvalidInput
from simmerge_bandit.signals import FEATURE_NAMES, FEATURES, SignatureConfig, cache, features, functional
from simmerge_bandit.signals.features import within_exact
from simmerge_bandit.signals.schema import FEATURES_BY_KIND, SHIFT_SOURCES
from simmerge_bandit.store import Store

from conftest import make_llama, write_jsonl


# ---------------------------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="session")
def unit_zoo(unit_zoo_dir) -> Path:
    return unit_zoo_dir  # the session-wide unit zoo of conftest.py, as a directory


def _zoo(unit_zoo: Path) -> tuple[list[str], list[dict]]:
    """(experts, tasks) of the zoo's manifest: the experts are its models with a base."""
    manifest = json.loads((unit_zoo / "zoo.json").read_text())
    return [m["name"] for m in manifest["models"] if m["base"]], manifest["tasks"]


@pytest.fixture(scope="session")
def wide_family(tmp_path_factory) -> dict[str, Path]:
    """A base with hidden size 96 and three layers; two independent fine-tunes and one close to the first."""
    root = tmp_path_factory.mktemp("signals-wide")
    base = make_llama(root / "base", seed=10, hidden=96, layers=3)
    a = make_llama(root / "a", seed=11, hidden=96, layers=3, perturb_from=base)
    return {"base": base, "a": a,
            "b": make_llama(root / "b", seed=12, hidden=96, layers=3, perturb_from=base),
            "c": make_llama(root / "c", seed=13, hidden=96, layers=3, perturb_from=a, scale=0.01)}


@pytest.fixture(autouse=True)
def _fresh_memo():
    cache.MEMO.clear()
    features.clear_stacks()
    yield
    cache.MEMO.clear()
    features.clear_stacks()


@pytest.fixture
def store(simmerge_home):
    s = Store.open(simmerge_home)
    yield s
    s.close()


def _probes(unit_zoo: Path) -> list[str]:
    return [json.loads(line)["prompt"] for t in _zoo(unit_zoo)[1]
            for line in (unit_zoo / t["probes"]).read_text().splitlines()]


def _add_zoo(store, unit_zoo: Path) -> tuple[Catalog, list[str], list[str]]:
    """Register the zoo's models and tasks; return (catalog, its first three experts, its first three tasks)."""
    experts, tasks = _zoo(unit_zoo)
    cat = Catalog(store)
    cat.add_model(unit_zoo / "models" / "base", name="base")
    for n in experts:
        cat.add_model(unit_zoo / "models" / n, name=n, base="base")
    for t in tasks:
        cat.add_task(t["name"], unit_zoo / t["eval"], probes=unit_zoo / t["probes"])
    assert len(experts) >= 3 and len(tasks) >= 3
    return cat, experts[:3], [t["name"] for t in tasks][:3]


def _add_wide(store, wide_family: dict, tmp_path: Path, unit_zoo: Path) -> Catalog:
    cat = Catalog(store)
    cat.add_model(wide_family["base"], name="base")
    for n in ("a", "b", "c"):
        cat.add_model(wide_family[n], name=n, base="base")
    prompts = _probes(unit_zoo)
    data = write_jsonl(tmp_path / "mix.jsonl", [{"prompt": p, "answer": "x"} for p in prompts])
    (tmp_path / "mix-probes.txt").write_text("\n".join(prompts))
    cat.add_task("mix", data, probes=tmp_path / "mix-probes.txt")
    return cat


def _close(spec, sketch: float, exact: float) -> bool:
    # the bound the docs state (0.05 absolute for bounded features, 5% relative for the others)
    return within_exact(spec.bounds is not None, sketch, exact)


# ---------------------------------------------------------------------------------------------------------------
# schema


def test_schema_is_ordered_named_and_versioned():
    assert isinstance(FEATURE_NAMES, tuple) and len(set(FEATURE_NAMES)) == len(FEATURE_NAMES) == len(FEATURES)
    prefixes = ("kl_", "js_", "agree_", "entropy_", "cos_", "cka_", "overlap_", "norm_", "dist_")
    assert all(n.startswith(prefixes) for n in FEATURE_NAMES)
    for f in FEATURES:
        assert f.kind in ("distribution", "activation", "task_vector", "shift")
        assert f.swap in ("symmetric", "negated", "reciprocal") or f.swap.split(":")[1] in FEATURE_NAMES
    assert [d["name"] for d in signals.feature_schema()] == list(FEATURE_NAMES)
    cfg = SignatureConfig()
    assert cfg.version("functional") == SignatureConfig().version("functional")
    # a functional setting changes the functional version only
    other = SignatureConfig(top_k=32)
    assert other.version("functional") != cfg.version("functional")
    assert other.version("structural") == cfg.version("structural")
    with pytest.raises(ValueError):
        SignatureConfig(top_density=1.5)


# ---------------------------------------------------------------------------------------------------------------
# exactness, identities, symmetry


def _check_against_exact(store, pairs, task):
    checked = 0
    for a, b in pairs:
        sk = signals.pair_features(store, a, b, task)
        ex = signals.pair_features(store, a, b, task, exact=True)
        assert set(sk.values) == set(ex.values), (a, b)
        assert set(sk.values) | set(sk.absent) == set(FEATURE_NAMES)
        for f in FEATURES:
            if f.name in sk.values:
                assert math.isfinite(sk.values[f.name])
                assert _close(f, sk.values[f.name], ex.values[f.name]), (a, b, f.name, sk.values[f.name],
                                                                         ex.values[f.name])
                checked += 1
    return checked


def test_sketch_agrees_with_exact_on_zoo_experts(store, unit_zoo):
    _, (x, y, z), (t1, _, _) = _add_zoo(store, unit_zoo)
    pairs = [(x, y), (y, z), (z, x)]
    assert _check_against_exact(store, pairs, t1) == 3 * len(FEATURE_NAMES)


def test_sketch_agrees_with_exact_with_projection_and_layers(store, wide_family, tmp_path, unit_zoo):
    _add_wide(store, wide_family, tmp_path, unit_zoo)
    sig = cache.load_signature(store, _keys(store, "a", "mix")[0])
    assert sig.meta["hidden_size"] == 96 and sig.meta["proj_dim"] == 64 and len(sig.meta["layers"]) == 3
    # both a close pair (cosines near 0.9) and an unrelated one (near 0)
    assert _check_against_exact(store, [("a", "c"), ("b", "a")], "mix") == 2 * len(FEATURE_NAMES)
    close = signals.pair_features(store, "a", "c", "mix").values["cos_tv_global"]
    far = signals.pair_features(store, "a", "b", "mix").values["cos_tv_global"]
    assert close > 0.8 and abs(far) < 0.1


def _keys(store, name, task):
    from simmerge_bandit.signals.api import _keys as keys, _probes as probes

    cat = Catalog(store)
    signals.ensure_signatures(store, [name], task)
    m = cat.model(name)
    base = cat.model(m["base"]) if m["base"] else None
    return keys(m, base, probes(cat, task), signals.DEFAULT_CONFIG)


def test_identities(store, unit_zoo):
    _, (_, y, _), (t1, _, _) = _add_zoo(store, unit_zoo)
    for exact in (False, True):
        v = signals.pair_features(store, y, y, t1, exact=exact).values
        assert set(v) == set(FEATURE_NAMES)
        for side_a, _, _ in SHIFT_SOURCES:     # both sides are the same model, so the same shift from the base
            assert v[side_a.format("a")] == pytest.approx(v[side_a.format("b")], rel=1e-6, abs=1e-9)
        for n in FEATURE_NAMES:
            if n in FEATURES_BY_KIND["shift"]:
                continue
            if n.startswith(("kl_", "js_", "entropy_")):
                assert abs(v[n]) <= 1e-5, (n, v[n])
            elif n.startswith(("cos_", "cka_", "agree_", "overlap_", "norm_ratio")):
                assert abs(v[n] - 1.0) <= 1e-5, (n, v[n])
        assert v["dist_l2_rel"] <= 1e-3


def test_symmetry_follows_the_schema(store, unit_zoo):
    _, experts, (_, t2, _) = _add_zoo(store, unit_zoo)
    names = ["base", *experts]
    pairs = [(a, b) for a in names for b in names if a != b]
    X, fnames = signals.feature_matrix(store, pairs, t2)
    assert fnames == list(FEATURE_NAMES) and X.shape == (len(pairs), len(FEATURE_NAMES))
    row = {p: X[i] for i, p in enumerate(pairs)}
    for (a, b), x in row.items():
        y = row[(b, a)]
        for i, f in enumerate(FEATURES):
            src = FEATURE_NAMES.index(f.swap.split(":")[1]) if f.swap.startswith("swap:") else i
            if np.isnan(x[src]):
                assert np.isnan(y[i]), (a, b, f.name)
                continue
            if f.swap == "symmetric":
                expect = x[i]
            elif f.swap == "negated":
                expect = -x[i]
            elif f.swap == "reciprocal":
                expect = 1.0 / x[i]
            else:
                expect = x[FEATURE_NAMES.index(f.swap.split(":")[1])]
            assert y[i] == pytest.approx(expect, rel=1e-5, abs=1e-6), (a, b, f.name)


def test_feature_matrix_rows_equal_pair_features(store, unit_zoo):
    _, (x, y, z), (_, _, t3) = _add_zoo(store, unit_zoo)
    pairs = [(x, y), ("base", z), (z, x)]
    X, _ = signals.feature_matrix(store, pairs, t3)
    for i, (a, b) in enumerate(pairs):
        pf = signals.pair_features(store, a, b, t3)
        np.testing.assert_allclose(X[i], pf.vector(), rtol=1e-5, atol=1e-6, equal_nan=True)
    # the base has no task vector and no shift from a base: those features are absent, the others present
    gone = [FEATURE_NAMES.index(f.name) for f in FEATURES if f.kind == "task_vector" or
            f.name in [n.format("a") for n, _, _ in SHIFT_SOURCES]]
    assert np.isnan(X[1, gone]).all() and np.isfinite(np.delete(X[1], gone)).all()
    assert "no base" in signals.pair_features(store, "base", z, t3).absent["kl_base_a_mean"]
    assert signals.feature_matrix(store, [], t3)[0].shape == (0, len(FEATURE_NAMES))


def test_completed_topk_kl_and_js_match_brute_force():
    """The top-k path computes KL and JS of the completed distributions (checked densely here)."""
    rng = np.random.default_rng(0)
    V, P, k, M = 40, 12, 6, 3
    sigs, dense = [], []
    for m in range(M):
        logits = rng.normal(size=(P, V)) * 2
        lp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        ids = np.argsort(-lp, axis=-1)[:, :k]
        top = np.take_along_axis(lp, ids, -1)
        rest = (1 - np.exp(top).sum(-1)) / (V - k)
        full = np.repeat(rest[:, None], V, 1)
        np.put_along_axis(full, ids, np.exp(top), -1)
        dense.append(full)
        meta = {"vocab_size": V, "vocab_hash": "v", "ids_hash": "i", "n_positions": P, "representation": "topk",
                "k": k, "n_js_positions": P, "layers": [1], "n_state_positions": 2, "hidden_size": 4,
                "proj_dim": 4}
        arrays = {"logp": top.astype(np.float32), "ids": ids.astype(np.int32), "top1": ids[:, 0].astype(np.int32),
                  "entropy": -(full * np.log(full)).sum(-1).astype(np.float32), "js_rows": np.arange(P),
                  "gram": np.ones((1, 3), np.float32) / math.sqrt(3),
                  "proj": np.ones((1, 8), np.float32) / math.sqrt(8)}
        sigs.append(cache.Signature("functional", f"f{m}", "p", "v", f"m{m}", meta=meta, arrays=arrays))
    ia, ib = np.array([0, 1, 2, 0]), np.array([1, 2, 0, 0])
    X = features.compute_matrix(sigs, [None] * M, ia, ib)
    for r, (a, b) in enumerate(zip(ia, ib)):
        pa, pb = dense[a], dense[b]
        kl = (pa * np.log(pa / pb)).sum(-1)
        js = features.js_elem(pa, pb).sum(-1)
        assert X[r, FEATURE_NAMES.index("kl_ab_mean")] == pytest.approx(kl.mean(), abs=1e-4)
        assert X[r, FEATURE_NAMES.index("kl_ab_p90")] == pytest.approx(np.quantile(kl, 0.9), abs=1e-4)
        assert X[r, FEATURE_NAMES.index("js_mean")] == pytest.approx(js.mean(), abs=5e-3)
    assert X[3, FEATURE_NAMES.index("kl_ab_mean")] == pytest.approx(0.0, abs=1e-6)
    assert X[3, FEATURE_NAMES.index("js_mean")] == pytest.approx(0.0, abs=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# loads, caching, staleness


def test_one_load_per_model_one_at_a_time(store, unit_zoo, monkeypatch):
    _, experts, tasks = _add_zoo(store, unit_zoo)
    alive: list[weakref.ref] = []
    real = functional.load_model

    def counting(path, device):
        gc.collect()
        assert all(r() is None for r in alive), "a previous model is still in memory"
        model = real(path, device)
        alive.append(weakref.ref(model))
        return model

    monkeypatch.setattr(functional, "load_model", counting)
    names = ["base", *experts]
    assert signals.ensure_signatures(store, names, tasks) == len(names) == len(alive)
    assert signals.ensure_signatures(store, names, tasks) == 0
    rows = signals.list_signatures(store)
    assert len([r for r in rows if r["part"] == "functional"]) == len(names) * len(tasks)
    assert len([r for r in rows if r["part"] == "structural"]) == len(names)
    # features of every pair come from the stored signatures: no further loads
    signals.feature_matrix(store, [(a, b) for a in names for b in names], tasks[0])
    assert len(alive) == len(names)


def test_changed_weights_and_probes_are_recomputed(store, unit_zoo, tmp_path):
    import shutil

    cat, (x, y, _), (t1, _, _) = _add_zoo(store, unit_zoo)
    model_dir = tmp_path / "x2"
    shutil.copytree(unit_zoo / "models" / x, model_dir)
    cat.add_model(model_dir, name="x2", base="base")
    assert signals.ensure_signatures(store, ["x2", y], t1) == 2
    before = signals.pair_features(store, "x2", y, t1).values
    fp = cat.model("x2")["fingerprint"]
    # overwrite the weights in place: the change is detected, the catalog refreshed, the signature recomputed
    make_llama(model_dir, seed=5, perturb_from=unit_zoo / "models" / x, scale=0.05)
    assert signals.ensure_signatures(store, ["x2", y], t1) == 1
    assert cat.model("x2")["fingerprint"] != fp
    after = signals.pair_features(store, "x2", y, t1).values
    assert after["cos_tv_global"] != before["cos_tv_global"]
    assert after["kl_ab_mean"] != before["kl_ab_mean"]
    # a changed probe file: functional signatures are recomputed (two loads), structural ones are kept
    probe_path = Path(cat.probe_set(cat.task(t1)["probe_set"])["path"])
    probe_path.write_text(json.dumps({"prompt": "abc:123="}) + "\n")
    n_struct = len([r for r in signals.list_signatures(store) if r["part"] == "structural"])
    assert signals.ensure_signatures(store, ["x2", y], t1) == 2
    assert len([r for r in signals.list_signatures(store) if r["part"] == "structural"]) == n_struct
    assert signals.pair_features(store, "x2", y, t1).values["kl_ab_mean"] != after["kl_ab_mean"]


def test_a_signature_known_in_one_home_is_still_stored_in_another(tmp_path, unit_zoo):
    """The in-process memo is shared by every store a process opens; a signature computed for one home must still
    be written to a second home that asks for it (it used to be taken as stored there, and never saved)."""
    first, second = Store.open(tmp_path / "one"), Store.open(tmp_path / "two")
    try:
        _, (x, y, _), (t1, _, _) = _add_zoo(first, unit_zoo)
        _add_zoo(second, unit_zoo)
        for store in (first, second):
            signals.ensure_signatures(store, [x, y], t1)
            signals.feature_matrix(store, [(x, y)], t1)
        rows = "SELECT model, part, context FROM signatures ORDER BY ALL"
        assert second.fetchall(rows) == first.fetchall(rows) and len(first.fetchall(rows)) >= 4
    finally:
        first.close()
        second.close()


def test_signatures_round_trip_through_the_store(store, unit_zoo):
    _, (x, _, _), (t1, _, _) = _add_zoo(store, unit_zoo)
    signals.ensure_signatures(store, [x], t1)
    keys = [tuple(k) for k in store.fetchall("SELECT fingerprint, part, context, version FROM signatures "
                                             "WHERE model = ?", [x])]
    assert len(keys) == 2
    in_memory = {k: cache.MEMO.get(k) for k in keys}
    cache.MEMO.clear()
    for key, mem in in_memory.items():
        disk = cache.load_signature(store, key)
        assert disk.meta == json.loads(json.dumps(mem.meta)) and set(disk.arrays) == set(mem.arrays)
        for name, arr in mem.arrays.items():
            assert disk.arrays[name].dtype == arr.dtype and disk.arrays[name].shape == arr.shape
            np.testing.assert_array_equal(disk.arrays[name], arr)
    blobs = store.fetchall("SELECT data FROM signature_arrays")
    assert blobs and not any(bytes(b[0]).startswith(b"\x80") for b in blobs)  # raw arrays, not pickles


def test_migration_from_an_older_store(simmerge_home):
    old = Store.open(simmerge_home, upto="m0002_tasks_and_probe_sets")
    assert "m0003_signatures" not in old.applied_migrations()
    old.close()
    new = Store.open(simmerge_home)
    assert "m0003_signatures" in new.applied_migrations()
    for table in ("signatures", "signature_arrays", "pair_features"):
        assert new.fetchone(f"SELECT count(*) FROM {table}") == (0,)
    new.close()


# ---------------------------------------------------------------------------------------------------------------
# refusals and absent features


def test_refuses_an_empty_probe_set(store, unit_zoo):
    cat, (x, _, _), (t1, _, _) = _add_zoo(store, unit_zoo)
    with pytest.raises(InvalidInput, match="has no prompts"):
        functional.tokenize_probes(None, [], SignatureConfig(), model_name=x, vocab_size=100,
                                   probe_name="probe set 'p'")
    Path(cat.probe_set(cat.task(t1)["probe_set"])["path"]).write_text("")
    with pytest.raises(InvalidInput, match="empty probe set"):
        signals.ensure_signatures(store, [x], t1)
    assert store.fetchone("SELECT count(*) FROM signatures") == (0,)


def test_no_tokenizer_gives_structural_features_only(store, unit_zoo, tmp_path):
    cat, (x, _, _), (t1, _, _) = _add_zoo(store, unit_zoo)
    bare = make_llama(tmp_path / "bare", seed=7, tokenizer=False, perturb_from=unit_zoo / "models" / "base")
    cat.add_model(bare, name="bare", base="base")
    with pytest.raises(InvalidCheckpoint, match="'bare' has no tokenizer"):
        functional.load_tokenizer(bare, "bare")
    assert signals.ensure_signatures(store, ["bare", x], t1) == 1
    pf = signals.pair_features(store, "bare", x, t1)
    # bare's own shift from the base is absent too; x's (side b) still comes
    functional_names = [f.name for f in FEATURES if f.kind in ("distribution", "activation")
                        or f.name in [n.format("a") for n, _, _ in SHIFT_SOURCES]]
    assert set(pf.absent) == set(functional_names)
    assert all("no tokenizer" in pf.absent[n] for n in functional_names)
    assert set(pf.values) == {f.name for f in FEATURES if f.kind == "task_vector"
                              or f.name in [n.format("b") for n, _, _ in SHIFT_SOURCES]}


def test_nan_weights_are_refused_naming_model_and_layer(store, unit_zoo, tmp_path):
    from transformers import AutoModelForCausalLM

    cat, (x, _, _), (t1, _, _) = _add_zoo(store, unit_zoo)
    for name, tensor, where in (("nan-layer", "model.layers.0.mlp.down_proj.weight", "decoder layer 1"),
                                ("nan-head", "lm_head.weight", "lm_head")):
        model = AutoModelForCausalLM.from_pretrained(unit_zoo / "models" / x, dtype=torch.float32)
        with torch.no_grad():
            model.get_parameter(tensor).fill_(float("nan"))
        model.save_pretrained(tmp_path / name)
        functional.load_tokenizer(unit_zoo / "models" / x, x).save_pretrained(tmp_path / name)
        cat.add_model(tmp_path / name, name=name, base="base")
        with pytest.raises(InvalidCheckpoint, match=f"model '{name}' produces non-finite .*{where}"):
            signals.ensure_signatures(store, [name], t1)


def test_different_vocabularies_and_bases_are_absent_with_reasons(store, unit_zoo, tmp_path, tiny_models):
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from simmerge_bandit.tokenizer import CHARS, SPECIALS

    cat, (x, y, _), (t1, _, _) = _add_zoo(store, unit_zoo)
    # the same architecture and vocabulary size, but the characters map to other ids
    odd = make_llama(tmp_path / "odd", seed=3, tokenizer=False)
    vocab = {t: i for i, t in enumerate(SPECIALS + CHARS[::-1])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>").save_pretrained(odd)
    cat.add_model(odd, name="odd")
    cat.add_model(tiny_models["base"], name="other-base")
    cat.add_model(tiny_models["ft_a"], name="other-ft", base="other-base")
    pf = signals.pair_features(store, x, "odd", t1)
    shift_a = [n.format("a") for n, _, _ in SHIFT_SOURCES]
    assert set(pf.values) == set(shift_a)        # only x's own shift from its base
    assert "no base" in pf.absent["kl_base_b_mean"]
    assert "different vocabularies" in pf.absent["kl_ab_mean"] and "no base" in pf.absent["cos_tv_global"]
    pf = signals.pair_features(store, x, "other-ft", t1)
    assert "different bases" in pf.absent["cos_tv_global"]
    assert {f.name for f in FEATURES if f.kind == "distribution"} <= set(pf.values)  # same tokenizer: comparable
    X, _ = signals.feature_matrix(store, [(x, "odd"), (x, y), (x, "other-ft")], t1)
    keep = [FEATURE_NAMES.index(n) for n in shift_a]
    assert np.isnan(np.delete(X[0], keep)).all() and np.isfinite(X[0, keep]).all() and np.isfinite(X[1]).all()


# ---------------------------------------------------------------------------------------------------------------
# CLI


def test_cli_signatures_and_features(simmerge_home, unit_zoo):
    store = Store.open(simmerge_home)
    _, (x, y, _), (t1, _, _) = _add_zoo(store, unit_zoo)
    store.close()
    run = CliRunner().invoke
    r = run(cli, ["signatures", "compute"], catch_exceptions=False)
    assert r.exit_code == 2 and "--task NAME" in r.output
    r = run(cli, ["signatures", "compute", "--task", t1, "--json"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert json.loads(r.output) == {"tasks": [t1], "models": 4, "loaded": 4}
    r = run(cli, ["signatures", "compute", "--all", "--model", x, "--no-progress"], catch_exceptions=False)
    assert r.exit_code == 0 and "1 model(s) loaded" in r.output
    r = run(cli, ["signatures", "list", "--json"], catch_exceptions=False)
    assert {(s["model"], s["part"]) for s in json.loads(r.output)} >= {(x, "functional"), ("base", "structural")}
    r = run(cli, ["signatures", "schema", "--json"], catch_exceptions=False)
    assert [f["name"] for f in json.loads(r.output)["features"]] == list(FEATURE_NAMES)
    r = run(cli, ["features", x, "base", "--task", t1, "--json"], catch_exceptions=False)
    data = json.loads(r.output)
    assert set(data["features"]) | set(data["absent"]) == set(FEATURE_NAMES)
    assert "no base" in data["absent"]["cos_tv_global"] and data["mode"] == "sketch"
    r = run(cli, ["features", x, y, "--task", t1], catch_exceptions=False)
    assert r.exit_code == 0 and "kl_ab_mean" in r.output and "absent" not in r.output
    r = run(cli, ["features", x, "nope", "--task", t1], catch_exceptions=False)
    assert r.exit_code == 1 and r.output.strip() == "Error: no model named 'nope'"
