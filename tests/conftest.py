"""Shared fixtures: an isolated state home per test, and tiny real checkpoints saved with transformers.

Under pytest-xdist (``-n 2``) every worker runs torch with one thread, and the session's tiny checkpoints and unit
zoo are built once for all workers (:func:`_built_once`)."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
from pathlib import Path
from typing import Callable

import pytest
import torch

#: pytest-xdist's name for this worker process ("gw0", ...); None in a plain run.
XDIST_WORKER = os.environ.get("PYTEST_XDIST_WORKER")


#: The test files that take longest on 2 cores, longest first (``pytest -n 2 --durations=0``, summed per file).
#: Under ``--dist loadfile`` each file runs whole on one worker, handed out in collection order
#: (``--no-loadscope-reorder``); starting with the longest balances the two workers' ends (the longest file
#: last would leave one worker idle while the other finishes it).
#: test_fused.py compiles its loops with numba in a fresh clone (about 40 s; a few seconds once cached).
LONGEST_FIRST = ("test_daemon.py", "test_engine.py", "test_zoo.py", "test_fused.py", "test_ray.py",
                 "test_mergekit_reference.py", "test_search.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order


def pytest_configure(config):
    if XDIST_WORKER:
        # Each worker is one of the machine's cores: torch's and the BLAS's own threads on top of that spin on
        # each other (several times slower on 2 cores). The environment carries it to the daemons tests start.
        for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ.setdefault(var, "1")
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
        import threadpoolctl

        threadpoolctl.threadpool_limits(int(os.environ["OMP_NUM_THREADS"]))


def _built_once(tmp_path_factory, name: str, build: Callable[[Path], object]) -> Path:
    """A directory that ``build`` fills, made once per test run: a fresh temp directory in a plain run; under
    pytest-xdist one directory for all workers, built by the first worker that asks while the others wait on a
    file lock (a second unit-zoo build is ~10 s of CPU per worker)."""
    if not XDIST_WORKER:
        root = tmp_path_factory.mktemp(name)
        build(root)
        return root
    root = tmp_path_factory.getbasetemp().parent / name  # the run's temp root, shared by its workers
    built = root.with_name(name + ".built")
    with open(root.with_name(name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not built.exists():
            shutil.rmtree(root, ignore_errors=True)  # what a worker that failed half way left
            root.mkdir()
            build(root)
            built.touch()
    return root


@pytest.fixture(autouse=True)
def simmerge_home(tmp_path, monkeypatch) -> Path:
    """Every test gets its own SIMMERGE_HOME, so no test touches a real home."""
    home = tmp_path / "home"
    monkeypatch.setenv("SIMMERGE_HOME", str(home))
    return home


def _save(model, tok, out: Path, *, dtype=None, shard_size=None) -> Path:
    if dtype is not None:
        model = model.to(dtype)
    kwargs = {"safe_serialization": True}
    if shard_size is not None:
        kwargs["max_shard_size"] = shard_size
    model.save_pretrained(out, **kwargs)
    if tok is not None:
        tok.save_pretrained(out)
    return out


def make_llama(out: Path, seed: int = 0, *, dtype=torch.float32, hidden=32, layers=2, shard_size=None,
               tokenizer=True, perturb_from: Path | None = None, scale: float = 0.02) -> Path:
    """A tiny Llama with grouped-query attention. With ``perturb_from``, a 'fine-tune' of that checkpoint."""
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    from simmerge_bandit.tokenizer import VOCAB_SIZE, char_tokenizer

    torch.manual_seed(seed)
    if perturb_from is not None:
        model = AutoModelForCausalLM.from_pretrained(perturb_from, dtype=torch.float32)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * scale)
    else:
        cfg = LlamaConfig(vocab_size=VOCAB_SIZE, hidden_size=hidden, intermediate_size=2 * hidden,
                          num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                          max_position_embeddings=128, tie_word_embeddings=False)
        model = LlamaForCausalLM(cfg)
    return _save(model, char_tokenizer() if tokenizer else None, out, dtype=dtype, shard_size=shard_size)


def make_qwen2(out: Path, seed: int = 0, *, dtype=torch.bfloat16) -> Path:
    """A tiny Qwen2 with tied embeddings (no lm_head tensor on disk)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from simmerge_bandit.tokenizer import VOCAB_SIZE, char_tokenizer

    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=VOCAB_SIZE, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=True)
    return _save(Qwen2ForCausalLM(cfg), char_tokenizer(), out, dtype=dtype)


def make_gpt2(out: Path, seed: int = 0, *, dtype=torch.float32) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    from simmerge_bandit.tokenizer import VOCAB_SIZE, char_tokenizer

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=VOCAB_SIZE, n_embd=32, n_layer=2, n_head=4, n_positions=128)
    return _save(GPT2LMHeadModel(cfg), char_tokenizer(), out, dtype=dtype)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """Real tiny checkpoints on disk: a Llama base, two fine-tunes of it, a sharded bf16 fine-tune,
    a Qwen2 (tied embeddings, bf16) and a GPT-2."""
    def build(root: Path) -> None:
        base = make_llama(root / "llama-base", seed=0)
        make_llama(root / "llama-ft-a", seed=1, perturb_from=base)
        make_llama(root / "llama-ft-b", seed=2, perturb_from=base)
        make_llama(root / "llama-ft-sharded", seed=3, perturb_from=base, dtype=torch.bfloat16, shard_size="20KB")
        make_qwen2(root / "qwen2")
        make_gpt2(root / "gpt2")

    root = _built_once(tmp_path_factory, "tiny", build)
    return {"base": root / "llama-base", "ft_a": root / "llama-ft-a", "ft_b": root / "llama-ft-b",
            "ft_sharded": root / "llama-ft-sharded", "qwen2": root / "qwen2", "gpt2": root / "gpt2"}


@pytest.fixture(scope="session")
def unit_zoo_dir(tmp_path_factory) -> Path:
    """The `unit` micro-zoo, built once per test run (a few seconds) and shared by every test module."""
    from simmerge_bandit.zoo import build_zoo

    return _built_once(tmp_path_factory, "unit-zoo", lambda root: build_zoo(root, "unit", progress=False))


@pytest.fixture(scope="session")
def unit_pair_table(unit_zoo_dir):
    """The unit zoo's 2-way merge table with two operators (linear, slerp_t0.3), built once per test run."""
    from simmerge_bandit.zoo import build_table, default_operators

    ops = [o for o in default_operators() if o["name"] in ("linear", "slerp_t0.3")]
    return build_table(unit_zoo_dir, operators=ops, progress=False)


@pytest.fixture(scope="session")
def unit_zoo(unit_zoo_dir) -> tuple[Path, dict]:
    """(directory, manifest as build_zoo returns it) of the shared unit zoo (a cache hit here)."""
    from simmerge_bandit.zoo import build_zoo

    return unit_zoo_dir, build_zoo(unit_zoo_dir, "unit", progress=False)


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
