"""Shared fixtures: an isolated state home per test, and tiny real checkpoints saved with transformers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch


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
    root = tmp_path_factory.mktemp("tiny")
    base = make_llama(root / "llama-base", seed=0)
    return {
        "base": base,
        "ft_a": make_llama(root / "llama-ft-a", seed=1, perturb_from=base),
        "ft_b": make_llama(root / "llama-ft-b", seed=2, perturb_from=base),
        "ft_sharded": make_llama(root / "llama-ft-sharded", seed=3, perturb_from=base, dtype=torch.bfloat16,
                                 shard_size="20KB"),
        "qwen2": make_qwen2(root / "qwen2"),
        "gpt2": make_gpt2(root / "gpt2"),
    }


@pytest.fixture(scope="session")
def unit_zoo_dir(tmp_path_factory) -> Path:
    """The `unit` micro-zoo, built once per test session (a few seconds) and shared by every test module."""
    from simmerge_bandit.zoo import build_zoo

    root = tmp_path_factory.mktemp("unit-zoo")
    build_zoo(root, "unit", progress=False)
    return root


@pytest.fixture(scope="session")
def unit_zoo(unit_zoo_dir) -> tuple[Path, dict]:
    """(directory, manifest as build_zoo returns it) of the shared unit zoo (a cache hit here)."""
    from simmerge_bandit.zoo import build_zoo

    return unit_zoo_dir, build_zoo(unit_zoo_dir, "unit", progress=False)


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
