"""The streaming executor on real tiny checkpoints: outputs, chains, YAML in/out, atomicity, refusals, CLI."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from simmerge_bandit import executor, mergekit_config
from simmerge_bandit.checkpoint import read_checkpoint
from simmerge_bandit.cli import cli
from simmerge_bandit.errors import IncompatibleModels, InvalidInput, SimmergeError, Unsupported
from simmerge_bandit.methods import merge_tensors


def load(path: Path) -> dict[str, torch.Tensor]:
    sd = {}
    for f in read_checkpoint(path).files:
        sd.update(load_file(str(Path(path) / f)))
    return sd


@pytest.fixture(scope="module")
def sd(tiny_models):
    return {k: load(v) for k, v in tiny_models.items()}


def test_nway_ties_equals_in_memory_math_and_writes_a_full_checkpoint(tiny_models, sd, tmp_path):
    m = tiny_models
    out = tmp_path / "merged"
    res = executor.merge([m["ft_a"], m["ft_b"], m["ft_sharded"]], "ties", {"density": 0.4, "weight": 0.8}, out,
                         base=m["base"], shard_size=40_000, seed=5)
    assert res.out == out.absolute() and res.stats["n_tensors"] == len(sd["base"])
    files = sorted(p.name for p in out.iterdir())
    assert "model.safetensors.index.json" in files and "mergekit_config.yml" in files
    assert {"config.json", "tokenizer.json", "provenance.json"} <= set(files)
    shards = [f for f in files if f.endswith(".safetensors")]
    assert len(shards) == res.stats["n_shards"] > 1
    assert all((out / f).stat().st_size < 40_000 + 4096 for f in shards)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(sd["base"])
    got = load(out)
    for name, t in got.items():
        ref = merge_tensors("ties", [sd["ft_a"][name], sd["ft_b"][name], sd["ft_sharded"][name]], sd["base"][name],
                            {"density": 0.4, "weight": 0.8}, seed=5, tensor_name=name)
        assert t.dtype == torch.float32 and torch.equal(t, ref), name
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["seed"] == 5 and prov["steps"][0]["method"] == "ties"
    assert {i["fingerprint"] for i in prov["inputs"]} == {read_checkpoint(p).fingerprint()
                                                          for p in (m["base"], m["ft_a"], m["ft_b"], m["ft_sharded"])}
    assert "torch" in prov["versions"] and prov["stats"]["bytes_written"] > 0
    assert read_checkpoint(out).config["num_hidden_layers"] == 2
    # no temporary directory is left beside the output
    assert [p.name for p in tmp_path.iterdir()] == ["merged"]


def test_output_dtype_and_config(tiny_models, sd, tmp_path):
    out = executor.merge([tiny_models["ft_a"], tiny_models["ft_b"]], "linear", {}, tmp_path / "o",
                         dtype="bfloat16").out
    cfg = json.loads((out / "config.json").read_text())
    assert cfg.get("dtype", cfg.get("torch_dtype")) == "bfloat16"
    got = load(out)
    name = "model.embed_tokens.weight"
    assert got[name].dtype == torch.bfloat16
    assert torch.equal(got[name], ((sd["ft_a"][name] + sd["ft_b"][name]) / 2).bfloat16())
    # without dtype: the first model's dtype (bf16 sharded model first)
    out2 = executor.merge([tiny_models["ft_sharded"], tiny_models["ft_a"]], "linear", {}, tmp_path / "o2").out
    assert load(out2)[name].dtype == torch.bfloat16


def test_mergekit_yaml_round_trip(tiny_models, tmp_path):
    m = tiny_models
    first = executor.merge([m["ft_a"], m["ft_b"]], "breadcrumbs_ties", {"density": 0.7, "gamma": 0.05,
                                                                       "lambda": 0.9}, tmp_path / "a",
                           base=m["base"], per_model=[{"weight": 0.3}, None]).out
    doc = yaml.safe_load((first / "mergekit_config.yml").read_text())
    assert doc["merge_method"] == "breadcrumbs_ties" and doc["base_model"] == str(m["base"])
    assert doc["models"][0]["parameters"]["weight"] == 0.3 and doc["models"][1]["parameters"]["weight"] == 1.0
    assert doc["parameters"]["lambda"] == 0.9 and doc["dtype"] == "float32" and doc["out_dtype"] == "float32"
    again = executor.merge_config(first / "mergekit_config.yml", tmp_path / "b").out
    a, b = load(first), load(again)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_filters_and_gradients_resolve_per_tensor(tiny_models, sd, tmp_path):
    m = tiny_models
    cfg = {"merge_method": "slerp", "base_model": str(m["ft_a"]),
           "models": [{"model": str(m["ft_a"])}, {"model": str(m["ft_b"])}],
           "parameters": {"t": [{"filter": "self_attn", "value": [0.0, 1.0]}, {"value": 0.25}]},
           "dtype": "float32"}
    out = executor.merge_config(cfg, tmp_path / "o").out
    got = load(out)
    # layer 0 of 2: t = 0 (model a); layer 1: t = 1 (model b); everything else 0.25
    n0, n1 = "model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.q_proj.weight"
    assert torch.equal(got[n0], sd["ft_a"][n0]) and torch.allclose(got[n1], sd["ft_b"][n1], atol=1e-6)
    n = "model.layers.1.mlp.up_proj.weight"
    assert torch.allclose(got[n], merge_tensors("slerp", [sd["ft_b"][n]], sd["ft_a"][n], {"t": 0.25}))
    assert mergekit_config.layer_t("model.layers.3.mlp.up_proj.weight", 5) == 0.75
    assert mergekit_config.layer_t("model.embed_tokens.weight", 5) == 0.0


def test_chain_is_evaluated_in_memory_per_tensor(tiny_models, sd, tmp_path):
    m = tiny_models
    res = executor.merge_chain_pairs([m["ft_a"], m["ft_b"], m["ft_sharded"]],
                                     [("ties", {"density": 0.5}), ("slerp", {"t": 0.3})], tmp_path / "c",
                                     base=m["base"], dtype="float32")
    got = load(res.out)
    for name, t in got.items():
        mid = merge_tensors("ties", [sd["ft_a"][name], sd["ft_b"][name]], sd["base"][name], {"density": 0.5},
                            tensor_name=name)
        ref = merge_tensors("slerp", [sd["ft_sharded"][name]], mid, {"t": 0.3}, tensor_name=name, step=1)
        assert torch.equal(t, ref), name
    text = (res.out / "mergekit_config.yml").read_text()
    docs = list(yaml.safe_load_all(text))
    assert [d.get("name") for d in docs] == ["step1", None] and docs[1]["base_model"] == "step1"
    assert docs[0]["out_dtype"] == "float32"
    # the written chain is itself a valid config for us (mergekit-multi format)
    plan = mergekit_config.load(res.out / "mergekit_config.yml")
    assert [s.method for s in plan.steps] == ["ties", "slerp"] and plan.steps[1].base == 0


def test_tied_qwen2_bf16_and_gpt2(tiny_models, sd, tmp_path):
    for key in ("qwen2", "gpt2"):
        out = executor.merge([tiny_models[key], tiny_models[key]], "linear", {"weight": 0.5}, tmp_path / key).out
        got = load(out)
        assert set(got) == set(sd[key])
        assert all(torch.equal(got[k], sd[key][k]) for k in got)
    assert "lm_head.weight" not in load(tmp_path / "qwen2")  # tied embeddings stay tied


class Boom(RuntimeError):
    pass


def test_atomic_on_exception_and_force_keeps_old_model(tiny_models, tmp_path, monkeypatch):
    m = tiny_models
    out = tmp_path / "target"
    calls = {"n": 0}
    real = executor.run

    def flaky(spec, job):
        calls["n"] += 1
        if calls["n"] == 5:
            raise Boom("disk on fire")
        return real(spec, job)

    monkeypatch.setattr(executor, "run", flaky)
    with pytest.raises(Boom):
        executor.merge([m["ft_a"], m["ft_b"]], "linear", {}, out, shard_size=20_000)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(executor, "run", real)
    executor.merge([m["ft_a"], m["ft_b"]], "linear", {}, out)
    before = load(out)
    with pytest.raises(InvalidInput, match="already exists"):
        executor.merge([m["ft_a"], m["ft_b"]], "linear", {}, out)
    calls["n"] = 0
    monkeypatch.setattr(executor, "run", flaky)
    with pytest.raises(Boom):
        executor.merge([m["ft_a"], m["ft_b"]], "ties", {}, out, base=m["base"], force=True)
    after = load(out)  # the old model is untouched
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["target"]


def test_full_disk_becomes_a_clear_error(tiny_models, tmp_path, monkeypatch):
    def full(self, i):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(executor._ShardWriter, "open_shard", full)
    with pytest.raises(SimmergeError, match=r"No space left on device\); nothing was written"):
        executor.merge([tiny_models["ft_a"], tiny_models["ft_b"]], "linear", {}, tmp_path / "o")
    assert list(tmp_path.iterdir()) == []


def _variant(src: Path, dst: Path, edit) -> Path:
    shutil.copytree(src, dst)
    for f in read_checkpoint(dst).files:
        tensors = load_file(str(dst / f))
        edit(tensors)
        save_file(tensors, str(dst / f), metadata={"format": "pt"})
    return dst


def test_refusals(tiny_models, tmp_path):
    m = tiny_models
    missing = _variant(m["ft_a"], tmp_path / "missing", lambda t: t.pop("model.norm.weight"))
    with pytest.raises(IncompatibleModels, match="model.norm.weight"):
        executor.merge([m["ft_b"], missing], "linear", {}, tmp_path / "o")
    name = "model.layers.0.mlp.up_proj.weight"
    shaped = _variant(m["ft_a"], tmp_path / "shaped", lambda t: t.update({name: t[name][:-1]}))
    with pytest.raises(IncompatibleModels, match="up_proj.weight' has shape"):
        executor.merge([m["ft_b"], shaped], "linear", {}, tmp_path / "o")
    nan = _variant(m["ft_a"], tmp_path / "nan", lambda t: t[name].view(-1)[3].fill_(float("nan")))
    with pytest.raises(InvalidInput, match=f"tensor '{name}' of .*nan contains NaN or Inf"):
        executor.merge([m["ft_b"], nan], "ties", {}, tmp_path / "o", base=m["base"])
    with pytest.raises(InvalidInput, match="unknown merge method"):
        executor.merge([m["ft_a"]], "frankenmerge", {}, tmp_path / "o")
    with pytest.raises(InvalidInput, match="density"):
        executor.merge([m["ft_a"], m["ft_b"]], "ties", {"density": 2}, tmp_path / "o", base=m["base"])
    with pytest.raises(InvalidInput, match="needs a base"):
        executor.merge([m["ft_a"], m["ft_b"]], "ties", {}, tmp_path / "o")
    with pytest.raises(InvalidInput, match="device"):
        executor.merge([m["ft_a"], m["ft_b"]], "linear", {}, tmp_path / "o", device="tpu")
    if not torch.cuda.is_available():
        with pytest.raises(InvalidInput, match="no CUDA GPU"):
            executor.merge([m["ft_a"], m["ft_b"]], "linear", {}, tmp_path / "o", device="cuda")
    with pytest.raises(InvalidInput, match="inside input model"):
        executor.merge([m["ft_a"], m["ft_b"]], "linear", {}, Path(m["ft_a"]) / "sub")
    for key, msg in (("slices", "layer slices"), ("tokenizer", "tokenizer"), ("modules", "modules"),
                     ("chat_template", "chat_template")):
        with pytest.raises(Unsupported, match=msg):
            executor.merge_config({"merge_method": "linear", "models": [{"model": str(m["ft_a"])}], key: {}},
                                  tmp_path / "o")
    with pytest.raises(Unsupported, match="tokenizer_source"):
        executor.merge_config({"merge_method": "linear", "models": [str(m["ft_a"])], "tokenizer_source": "union"},
                              tmp_path / "o")
    with pytest.raises(InvalidInput, match="global"):
        executor.merge_config({"merge_method": "ties", "base_model": str(m["base"]),
                               "models": [{"model": str(m["ft_a"]), "parameters": {"normalize": False}}]},
                              tmp_path / "o")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["missing", "nan", "shaped"]


def test_vocab_sizes_refused_unless_truncated(tiny_models, sd, tmp_path):
    m = tiny_models
    big = _variant(m["ft_b"], tmp_path / "big", lambda t: [t.update({k: torch.cat([v, v[:3]])})
                                                          for k, v in list(t.items())
                                                          if k in ("model.embed_tokens.weight", "lm_head.weight")])
    cfg = json.loads((big / "config.json").read_text())
    small_vocab = cfg["vocab_size"]
    cfg["vocab_size"] += 3
    (big / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(IncompatibleModels, match="vocabulary sizes differ"):
        executor.merge([m["ft_a"], big], "linear", {}, tmp_path / "o")
    out = executor.merge([m["ft_a"], big], "linear", {}, tmp_path / "o", vocab="truncate").out
    got = load(out)
    emb = "model.embed_tokens.weight"
    assert got[emb].shape[0] == small_vocab
    assert torch.equal(got[emb], (sd["ft_a"][emb] + sd["ft_b"][emb]) / 2)
    assert json.loads((out / "config.json").read_text())["vocab_size"] == small_vocab


def test_cli_merge_config_and_catalog(tiny_models, tmp_path):
    m = tiny_models
    runner = CliRunner()
    cfg = tmp_path / "recipe.yml"
    cfg.write_text(yaml.safe_dump({"merge_method": "task_arithmetic", "base_model": str(m["base"]),
                                   "models": [{"model": str(m["ft_a"]), "parameters": {"weight": 0.5}},
                                              {"model": str(m["ft_b"]), "parameters": {"weight": 0.5}}],
                                   "dtype": "bfloat16"}))
    r = runner.invoke(cli, ["merge", str(cfg), "--out", str(tmp_path / "o1"), "--json"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    data = json.loads(r.output)
    assert data["n_tensors"] > 0 and Path(data["out"]).is_dir()
    assert load(tmp_path / "o1")["model.norm.weight"].dtype == torch.bfloat16
    assert json.loads((tmp_path / "o1" / "provenance.json").read_text())["compute_dtype"] == "bfloat16"
    r = runner.invoke(cli, ["merge", str(cfg), "--out", str(tmp_path / "o1f"), "--compute-dtype", "float32",
                            "--json"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    prov = json.loads((tmp_path / "o1f" / "provenance.json").read_text())
    assert prov["compute_dtype"] == "float32" and prov["output_dtype"] == "bfloat16"
    r = runner.invoke(cli, ["merge", str(cfg), "--out", str(tmp_path / "o1")])
    assert r.exit_code == 1 and "already exists" in r.output and "Traceback" not in r.output
    # catalog models and operators
    for args in (["model", "add", str(m["base"]), "--name", "base"],
                 ["model", "add", str(m["ft_a"]), "--name", "a", "--base", "base"],
                 ["model", "add", str(m["ft_b"]), "--name", "b", "--base", "base"],
                 ["operator", "add", "t5", "--method", "ties", "--param", "density=0.5", "--no-input"],
                 ["operator", "add", "s3", "--method", "slerp", "--param", "t=0.3", "--no-input"]):
        r = runner.invoke(cli, args, catch_exceptions=False)
        assert r.exit_code == 0, r.output
    r = runner.invoke(cli, ["merge", "--models", "a,b", "--operator", "t5", "--out", str(tmp_path / "o2"),
                            "--json"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    prov = json.loads((tmp_path / "o2" / "provenance.json").read_text())
    assert prov["steps"][0]["operator"] == "t5" and prov["steps"][0]["base"]["path"] == str(m["base"])
    assert prov["compute_dtype"] == "float32"
    # the catalog merge's written config reproduces it
    again = load(executor.merge_config(tmp_path / "o2" / "mergekit_config.yml", tmp_path / "o2b").out)
    assert all(torch.equal(v, again[k]) for k, v in load(tmp_path / "o2").items())
    r = runner.invoke(cli, ["merge", "--models", "a,b,a", "--operator", "t5,s3", "--out", str(tmp_path / "o3")],
                      catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert "merged into" in r.output
    r = runner.invoke(cli, ["merge", "--models", "a,b", "--operator", "s3,t5", "--out", str(tmp_path / "o4")])
    assert r.exit_code != 0 and "Error" in r.output
    r = runner.invoke(cli, ["merge", "--out", str(tmp_path / "o5")])
    assert r.exit_code == 2 and "CONFIG" in r.output


# ---- compute dtype -------------------------------------------------------------------------------------------

def test_config_dtype_is_the_compute_dtype_and_compute_dtype_overrides_it(tiny_models, sd, tmp_path):
    m = tiny_models
    cfg = {"merge_method": "ties", "base_model": str(m["base"]), "dtype": "bfloat16",
           "models": [{"model": str(m["ft_a"]), "parameters": {"density": 0.4, "weight": 0.7}},
                      {"model": str(m["ft_b"]), "parameters": {"density": 0.6}}]}
    half = load(executor.merge_config(cfg, tmp_path / "bf16").out)
    full = executor.merge_config(cfg, tmp_path / "f32", compute_dtype="float32").out
    diverged = 0
    for name, t in half.items():
        args = ([sd["ft_a"][name], sd["ft_b"][name]], sd["base"][name], {"density": [0.4, 0.6],
                                                                          "weight": [0.7, 1.0]})
        ref = merge_tensors("ties", *args, tensor_name=name, compute_dtype=torch.bfloat16, out_dtype=torch.bfloat16)
        assert t.dtype == torch.bfloat16 and torch.equal(t, ref), name
        in_f32 = merge_tensors("ties", *args, tensor_name=name, out_dtype=torch.bfloat16)
        assert torch.equal(load(full)[name], in_f32), name
        diverged += int((in_f32 != t).sum())
    assert diverged > 0  # the compute dtype changes the tensors, not only their rounding at the end
    prov = json.loads((full / "provenance.json").read_text())
    assert prov["compute_dtype"] == "float32" and prov["compute_dtype_option"] == "float32"
    assert prov["output_dtype"] == "bfloat16"
    doc = yaml.safe_load((full / "mergekit_config.yml").read_text())
    assert doc["dtype"] == "float32" and doc["out_dtype"] == "bfloat16"
    # the written config reproduces the float32-compute merge (dtype float32, out_dtype bfloat16)
    again = load(executor.merge_config(full / "mergekit_config.yml", tmp_path / "again").out)
    assert all(torch.equal(again[k], load(full)[k]) for k in again)


def test_promoted_compute_dtype_without_dtype_and_api_default(tiny_models, sd, tmp_path):
    m = tiny_models
    # no dtype: mergekit computes each tensor in its inputs' promoted dtype (bf16 + fp32 -> fp32) and writes it
    cfg = {"merge_method": "linear", "models": [{"model": str(m["ft_sharded"])}, {"model": str(m["ft_a"])}]}
    out = executor.merge_config(cfg, tmp_path / "p").out
    assert {t.dtype for t in load(out).values()} == {torch.float32}
    qwen = executor.merge_config({"merge_method": "linear", "models": [str(m["qwen2"]), str(m["qwen2"])]},
                                 tmp_path / "q").out
    assert json.loads((qwen / "provenance.json").read_text())["compute_dtype"] == "bfloat16"
    # the API computes in float32 unless told, and writes the reference model's dtype
    api = executor.merge([m["ft_sharded"], m["ft_a"]], "task_arithmetic", {"weight": 0.5}, tmp_path / "a",
                         base=m["base"], compute_dtype="bfloat16", dtype="float16").out
    prov = json.loads((api / "provenance.json").read_text())
    assert prov["compute_dtype"] == "bfloat16" and prov["output_dtype"] == "float16"
    name = "model.layers.0.mlp.up_proj.weight"
    ref = merge_tensors("task_arithmetic", [sd["ft_sharded"][name], sd["ft_a"][name]], sd["base"][name],
                        {"weight": 0.5}, compute_dtype=torch.bfloat16, out_dtype=torch.float16)
    assert torch.equal(load(api)[name], ref)
    with pytest.raises(InvalidInput, match="unknown compute dtype"):
        executor.merge([m["ft_a"]], "linear", {}, tmp_path / "x", compute_dtype="int8")


# ---- durability ----------------------------------------------------------------------------------------------

def _fd_path(fd: int) -> str:
    return os.readlink(f"/proc/self/fd/{fd}")


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc to name fsynced descriptors")
def test_fsync_covers_every_file_and_the_directories(tiny_models, tmp_path, monkeypatch):
    synced: list[str] = []
    real = os.fsync

    def spy(fd):
        synced.append(_fd_path(fd))
        return real(fd)

    monkeypatch.setattr(os, "fsync", spy)
    m = tiny_models
    out = executor.merge([m["ft_a"], m["ft_b"]], "linear", {}, tmp_path / "o", shard_size=20_000, fsync=True).out
    names = {Path(p).name for p in synced}
    files = {p.name for p in out.iterdir()}
    assert "model.safetensors.index.json" in files and "tokenizer.json" in files
    assert files <= names, files - names
    assert any(n.startswith(".o.tmp-") for n in names)   # the new directory, before it is renamed
    assert str(tmp_path) in synced                          # the parent, after the rename
    synced.clear()
    executor.merge([m["ft_a"], m["ft_b"]], "linear", {}, out, fsync=True, force=True)
    assert str(tmp_path) in synced and "model.safetensors" in {Path(p).name for p in synced}
    synced.clear()
    executor.merge([m["ft_a"], m["ft_b"]], "linear", {}, tmp_path / "p")
    assert synced == []


def _model_dir(path: Path, tag: str) -> Path:
    path.mkdir()
    for i in range(3):
        (path / f"part{i}").write_text(f"{tag} {i}")
    return path


def _tag(path: Path) -> str | None:
    """'old' or 'new' when ``path`` is that complete model, None when it is missing (anything else fails)."""
    if not path.exists():
        return None
    texts = {p.read_text() for p in path.iterdir()}
    tags = {t.split()[0] for t in texts}
    assert len(texts) == 3 and len(tags) == 1, texts
    return tags.pop()


@pytest.mark.parametrize("exchange", [True, False])
def test_force_replacement_survives_a_kill_at_every_step(tmp_path, monkeypatch, exchange):
    """Stopping the replacement between any two of its file-system steps is a kill there: OUT then holds the
    complete old or new model, or recover() (what the next merge into OUT runs first) puts the old one back and
    says so; nothing is left beside OUT afterwards."""
    dead = 4_194_304 + 17  # above Linux's largest pid: no process has it
    monkeypatch.setattr(executor, "_sibling",
                        lambda out, kind: out.parent / f".{out.name}.{kind}-{dead}-{os.urandom(4).hex()}")
    if not exchange:
        monkeypatch.setattr(executor, "_exchange", lambda a, b: False)
    n_steps = None
    for k in range(0, 10):
        root = tmp_path / f"k{k}"
        root.mkdir()
        out = _model_dir(root / "model", "old")
        tmp = _model_dir(executor._sibling(out, "tmp"), "new")
        steps = executor._replace(tmp, out, fsync=False)
        done = [s for _, s in zip(range(k), steps)]
        if len(done) < k:  # the protocol has fewer steps: every kill point is covered
            n_steps = len(done)
            break
        state = _tag(out)
        notes = executor.recover(out)
        if state is None:
            assert any("restored the previous model" in n for n in notes), (k, notes)
            assert _tag(out) == "old"
        else:
            assert state == ("old" if k == 0 else "new"), (k, done)
            assert _tag(out) == state and not any("restored" in n for n in notes)
        assert [p.name for p in root.iterdir()] == ["model"], (k, done)
    assert n_steps == (3 if exchange else 4)


def test_next_merge_restores_an_interrupted_replacement_and_says_so(tiny_models, tmp_path, caplog):
    m = tiny_models
    out = executor.merge([m["ft_a"], m["ft_b"]], "linear", {}, tmp_path / "o").out
    before = load(out)
    # the state a kill between the two renames leaves: OUT missing, the old model aside under a dead pid
    os.rename(out, tmp_path / f".o.old-{4_194_304 + 3}-abcd1234")
    junk = tmp_path / f".o.tmp-{4_194_304 + 3}-ffff0000"
    junk.mkdir()
    with caplog.at_level(logging.WARNING, logger="simmerge_bandit.executor"):
        with pytest.raises(InvalidInput, match="already exists"):
            executor.merge([m["ft_a"], m["ft_b"]], "ties", {}, out, base=m["base"])
    assert "restored the previous model" in caplog.text and "incomplete merge" in caplog.text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"]
    assert all(torch.equal(before[k], v) for k, v in load(out).items())


@pytest.mark.skipif(executor._glibc() is None, reason="glibc's mallopt only")
def test_merging_keeps_freed_chunk_buffers_instead_of_faulting_them_in_again():
    import resource

    def burst():  # what TIES does per tensor: task-vector chunks kept between passes (80 MB here), then freed
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        held = [torch.empty(1 << 20, dtype=torch.bfloat16).fill_(1.0) for _ in range(40)]
        del held
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

    with executor._reused_heap(), executor._reused_heap():  # nested, as concurrent merges are
        burst()
        again = burst()
    assert executor._merging == 0
    # 20 000 page faults when glibc gives the freed 80 MB back at once (it does without _reused_heap); none when
    # the next tensor reuses them, but the count is the process's: other threads left by earlier tests in the
    # same worker fault in a few MB of their own (2,048 seen once in a full run), hence the margin
    assert again < 5000
