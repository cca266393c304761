import json
import shutil
import struct

import pytest
import torch
from safetensors.torch import save_file

from simmerge_bandit.catalog import Catalog
from simmerge_bandit.checkpoint import read_checkpoint
from simmerge_bandit.errors import AlreadyExists, IncompatibleModels, InvalidCheckpoint, InvalidInput, NotFound
from simmerge_bandit.store import Store

from conftest import write_jsonl


@pytest.fixture
def cat(simmerge_home):
    store = Store.open(simmerge_home)
    yield Catalog(store)
    store.close()


def test_models_round_trip(cat, tiny_models):
    base = cat.add_model(tiny_models["base"], name="base")
    ft = cat.add_model(tiny_models["ft_a"], name="ft-a", base="base")
    assert ft["base"] == "base" and ft["architecture"] == "LlamaForCausalLM"
    assert ft["n_params"] == base["n_params"] > 0
    assert ft["fingerprint"] != base["fingerprint"]
    assert [m["name"] for m in cat.models()] == ["base", "ft-a"]
    sharded = cat.add_model(tiny_models["ft_sharded"], name="sharded", base="base")
    assert sharded["dtype"] == "bfloat16"
    qwen = cat.add_model(tiny_models["qwen2"])
    assert qwen["name"] == "qwen2" and qwen["dtype"] == "bfloat16" and "lm_head.weight" not in qwen["tensors"]
    assert cat.add_model(tiny_models["gpt2"])["model_type"] == "gpt2"
    with pytest.raises(InvalidInput, match="base of ft-a"):
        cat.remove_model("base")
    cat.remove_model("ft-a")
    with pytest.raises(NotFound):
        cat.model("ft-a")


def test_duplicate_and_base_mismatch(cat, tiny_models):
    cat.add_model(tiny_models["base"], name="base")
    with pytest.raises(AlreadyExists):
        cat.add_model(tiny_models["ft_a"], name="base")
    with pytest.raises(IncompatibleModels, match="tensor '.*' is in"):
        cat.add_model(tiny_models["gpt2"], name="g", base="base")
    with pytest.raises(NotFound):
        cat.add_model(tiny_models["ft_a"], name="x", base="nope")


def test_shape_mismatch_names_the_tensor(cat, tiny_models, tmp_path):
    from conftest import make_llama

    wide = make_llama(tmp_path / "wide", hidden=48)
    cat.add_model(tiny_models["base"], name="base")
    with pytest.raises(IncompatibleModels, match=r"tensor '\S+' has shape \[100, 32\] in base but \[100, 48\] in wide"):
        cat.add_model(wide, name="wide", base="base")


def test_fingerprint_changes_with_any_tensor(tiny_models, tmp_path):
    src = tmp_path / "m"
    shutil.copytree(tiny_models["ft_a"], src)
    before = read_checkpoint(src).fingerprint()
    assert read_checkpoint(src).fingerprint() == before
    ck = read_checkpoint(src)
    t = min(ck.tensors.values(), key=lambda t: t.numel)
    with open(src / t.file, "r+b") as fh:
        fh.seek(t.start)
        b = fh.read(1)
        fh.seek(t.start)
        fh.write(bytes([b[0] ^ 0xFF]))
    assert read_checkpoint(src).fingerprint() != before


@pytest.mark.parametrize("case", ["missing", "file", "no_config", "no_weights", "pickled", "corrupt", "truncated",
                                  "bad_json_config", "missing_shard"])
def test_bad_checkpoints_are_refused(cat, tiny_models, tmp_path, case):
    d = tmp_path / case
    if case == "missing":
        d = tmp_path / "nope"
        msg = "no such file"
    elif case == "file":
        d.write_text("x")
        msg = "not a directory"
    else:
        shutil.copytree(tiny_models["ft_a"], d)
        weights = d / "model.safetensors"
        if case == "no_config":
            (d / "config.json").unlink()
            msg = "no config.json"
        elif case == "no_weights":
            weights.unlink()
            msg = "no \\*.safetensors"
        elif case == "pickled":
            weights.unlink()
            (d / "pytorch_model.bin").write_bytes(b"\x80\x04")
            msg = "pickled weights .* convert"
        elif case == "corrupt":
            data = bytearray(weights.read_bytes())
            data[8:12] = b"\xff\xfe\x00{"
            weights.write_bytes(bytes(data))
            msg = "corrupt safetensors header"
        elif case == "truncated":
            data = weights.read_bytes()
            weights.write_bytes(data[: len(data) // 2])
            msg = "corrupt safetensors header"
        elif case == "bad_json_config":
            (d / "config.json").write_text("{nope")
            msg = "not valid JSON"
        elif case == "missing_shard":
            shutil.rmtree(d)
            shutil.copytree(tiny_models["ft_sharded"], d)
            next(iter(sorted(d.glob("*-of-*.safetensors")))).unlink()
            msg = "shard .* is missing"
    with pytest.raises(InvalidCheckpoint, match=msg):
        cat.add_model(d, name="x")
    assert cat.models() == []


def test_header_length_overflow_is_refused(tmp_path):
    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text("{}")
    (d / "model.safetensors").write_bytes(struct.pack("<Q", 10**9) + b"{}")
    with pytest.raises(InvalidCheckpoint, match="declared header length"):
        read_checkpoint(d)


def test_single_file_tensor_offsets_are_validated(tmp_path):
    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text("{}")
    save_file({"w": torch.ones(4)}, str(d / "model.safetensors"))
    raw = (d / "model.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    header["w"]["data_offsets"] = [0, 999]
    hb = json.dumps(header).encode()
    (d / "model.safetensors").write_bytes(struct.pack("<Q", len(hb)) + hb + raw[8 + n:])
    with pytest.raises(InvalidCheckpoint, match="bad entry for tensor 'w'"):
        read_checkpoint(d)


def test_tasks_and_probes(cat, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": f"{i}+1=", "answer": str(i + 1)} for i in range(100)])
    t = cat.add_task("add", data)
    assert t["n_examples"] == 100 and t["metric"] == "exact_match"
    assert cat.probe_prompts(t["probe_set"]) == [f"{i}+1=" for i in range(64)]
    probes = tmp_path / "p.txt"
    probes.write_text("hello\nworld\n")
    t2 = cat.add_task("add2", data, probes=probes)
    assert cat.probe_prompts(t2["probe_set"]) == ["hello", "world"]
    cat.add_probe_set("shared", probes)
    assert cat.add_task("add3", data, probes="shared")["probe_set"] == "shared"
    assert [x["name"] for x in cat.tasks()] == ["add", "add2", "add3"]
    with pytest.raises(AlreadyExists):
        cat.add_task("add", data)


@pytest.mark.parametrize("content,msg", [
    ("", "empty file"),
    ('{"prompt": "a", "answer": "b"}\n{"prompt": "a"\n', r":2: not valid JSON"),
    ('{"prompt": "a", "answer": "b"}\n\n{"prompt": "a"}\n', r":3: missing string field 'answer'"),
    ('[1, 2]\n', r":1: expected a JSON object"),
])
def test_bad_task_files(cat, tmp_path, content, msg):
    f = tmp_path / "bad.jsonl"
    f.write_text(content)
    with pytest.raises(InvalidInput, match=msg):
        cat.add_task("t", f)
    assert cat.tasks() == [] and cat.probe_sets() == []


def test_empty_probe_file_refused(cat, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "answer": "b"}])
    empty = tmp_path / "p.txt"
    empty.write_text("\n")
    with pytest.raises(InvalidInput, match="empty probe set"):
        cat.add_task("t", data, probes=empty)
    assert cat.tasks() == []


def test_operators(cat):
    op = cat.add_operator("ties_d0.5", "ties", {"density": "0.5"})
    assert op["params"]["density"] == 0.5 and op["params"]["normalize"] is True and op["status"] == "active"
    assert cat.add_operator("s", "slerp", {})["params"] == {"t": 0.5}
    cat.retire_operator("s")
    assert [o["name"] for o in cat.operators(active_only=True)] == ["ties_d0.5"]
    assert cat.operator("s")["status"] == "retired" and len(cat.operators()) == 2
    for method, params, msg in [
        ("nope", {}, "unknown merge method 'nope'; known: linear"),
        ("ties", {"bogus": 1}, "no parameter 'bogus'"),
        ("ties", {"density": 0}, "out of range"),
        ("ties", {"density": 1.5}, "out of range"),
        ("slerp", {"t": -0.1}, "out of range"),
        ("slerp", {"t": "abc"}, "must be a float"),
        ("ties", {"normalize": "maybe"}, "true or false"),
        ("della", {"density": 0.1, "epsilon": 0.2}, "density \\+/- epsilon"),
        ("linear", {"weight": "nan"}, "finite"),
    ]:
        with pytest.raises(InvalidInput, match=msg):
            cat.add_operator("bad", method, params)
    with pytest.raises(AlreadyExists):
        cat.add_operator("ties_d0.5", "ties", {})
    assert len(cat.operators()) == 2
