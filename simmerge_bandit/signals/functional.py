"""The functional part of a signature: one forward pass over a task's probe prompts.

What is kept, per probe set (see :class:`~.schema.SignatureConfig`):

* next-token distributions at each kept probe position: full log-probabilities for small vocabularies, otherwise
  the top-k log-probabilities and the log-normalizer (the rest of the mass is known, and spread uniformly over
  the other tokens when two models are compared); the exact entropy and the most likely token at every position;
* per sampled layer, over a fixed subset of token positions: the unit-normalized centered Gram matrix of the token
  states (linear CKA between two models is then one dot product) and a seeded random projection of each
  token state (one projection per token position), unit-normalized (the activation cosine is then one dot
  product).

Position sampling is seeded by the probe tokens, so every model that tokenizes the probes identically keeps the same
positions. Prompts are batched with right padding (causal attention makes the padded tail invisible to real tokens,
and position ids stay those of an unpadded prompt).
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ..errors import InvalidCheckpoint, InvalidInput
from .schema import SignatureConfig

#: Stored log-probabilities are floored here, so that a token one model rules out (probability 0) gives a large
#: but finite KL instead of infinity.
LOGP_FLOOR = -80.0


def pick_device(device: str | None = None) -> str:
    """``device`` if given, else ``cuda`` when a GPU is present, else ``cpu``."""
    import torch

    if device:
        return device
    return "cuda" if torch.cuda.is_available() else "cpu"


def _digest(obj: Any, size: int = 16) -> str:
    return hashlib.blake2b(json.dumps(obj, sort_keys=True).encode(), digest_size=size).hexdigest()


def _seed(*parts: Any) -> int:
    return int.from_bytes(hashlib.blake2b(json.dumps(parts).encode(), digest_size=8).digest(), "little") >> 1


def has_tokenizer(path: str | Path) -> bool:
    """Whether a checkpoint directory ships a tokenizer file (functional signatures need one)."""
    p = Path(path)
    return any((p / f).exists() for f in ("tokenizer.json", "tokenizer.model", "vocab.json"))


def load_tokenizer(path: str | Path, model_name: str):
    """The model's tokenizer, or :class:`InvalidCheckpoint` saying functional features need one."""
    from transformers import AutoTokenizer

    if not has_tokenizer(path):
        raise InvalidCheckpoint(f"model {model_name!r} has no tokenizer in {path}, so its functional signature "
                                f"(next-token distributions, activations) cannot be computed")
    return AutoTokenizer.from_pretrained(str(path))


def load_model(path: str | Path, device: str):
    """Load a causal LM for signature extraction: float32 on CPU, the checkpoint's dtype on a GPU."""
    import torch
    from transformers import AutoModelForCausalLM

    from transformers.utils import logging as hf_logging

    dtype = torch.float32 if device == "cpu" else "auto"
    # our own progress bar counts models; transformers' per-load bar would interleave with it
    quiet = not hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
    finally:
        if not quiet:
            hf_logging.enable_progress_bar()
    return model.to(device).eval()


@dataclass(frozen=True)
class ProbeTokens:
    """The probes as the model's tokenizer sees them, and the positions kept."""

    ids: list[list[int]]
    vocab_size: int
    vocab_hash: str     # same vocabulary (token strings -> ids)
    ids_hash: str       # same token ids for every probe: positions align across models
    positions: np.ndarray       # (P, 2) int32: (prompt index, token index), sorted
    js_rows: np.ndarray         # rows of ``positions`` the sketch Jensen-Shannon mean uses
    state_rows: np.ndarray      # rows of ``positions`` whose hidden states are kept


def _even_subset(n: int, k: int) -> np.ndarray:
    if k >= n:
        return np.arange(n)
    return np.floor(np.arange(k) * (n / k)).astype(np.int64)


def tokenize_probes(tokenizer, prompts: Sequence[str], config: SignatureConfig, *, model_name: str,
                    vocab_size: int, probe_name: str = "probe set") -> ProbeTokens:
    """Tokenize the probes (cut to ``max_tokens``) and choose the kept positions."""
    if not prompts:
        raise InvalidInput(f"{probe_name} has no prompts, so functional signatures cannot be computed")
    ids = [list(tokenizer(p, truncation=True, max_length=config.max_tokens)["input_ids"]) for p in prompts]
    ids = [x[:config.max_tokens] for x in ids]
    if not any(ids):
        raise InvalidInput(f"{probe_name}: every prompt tokenizes to nothing with {model_name}'s tokenizer")
    vocab = tokenizer.get_vocab()
    vocab_hash = _digest(sorted(vocab.items()))
    ids_hash = _digest(ids)
    pos = np.array([(i, t) for i, x in enumerate(ids) for t in range(len(x))], dtype=np.int32)
    if len(pos) > config.max_positions:
        rng = np.random.default_rng(_seed(config.seed, "positions", ids_hash))
        pos = pos[np.sort(rng.choice(len(pos), config.max_positions, replace=False))]
    return ProbeTokens(ids=ids, vocab_size=int(vocab_size), vocab_hash=vocab_hash, ids_hash=ids_hash,
                       positions=pos, js_rows=_even_subset(len(pos), config.js_positions),
                       state_rows=_even_subset(len(pos), config.state_positions))


def sampled_layers(n_layers: int, max_layers: int) -> list[int]:
    """Indices into ``hidden_states`` (0 = embeddings, ``n_layers`` = last): evenly spaced by depth, last kept."""
    j = min(max_layers, n_layers)
    return sorted({max(1, round((i + 1) * n_layers / j)) for i in range(j)})


@functools.lru_cache(maxsize=2)
def state_projection(hidden: int, n_tokens: int, config: SignatureConfig):
    """Seeded Gaussian projections (n_tokens x hidden x m), one per kept token position, shared by every model with
    this hidden size; None (identity) when the hidden size is not larger than m.

    A separate projection per token makes the projection errors of different tokens independent, so the average
    activation cosine over tokens converges like 1/sqrt(tokens * m) instead of staying at the 1/sqrt(m) error of a
    single shared projection. Cached (read-only): drawing it costs more than the rest of the summaries.
    """
    import torch

    if hidden <= config.state_proj_dim:
        return None
    g = torch.Generator().manual_seed(_seed(config.seed, "state-proj", hidden))
    return torch.randn(n_tokens, hidden, config.state_proj_dim, generator=g)


def _layer_label(i: int, n_layers: int) -> str:
    if i == 0:
        return "the embeddings (hidden_states[0])"
    suffix = " and final norm" if i == n_layers else ""
    return f"decoder layer {i} of {n_layers} (model.layers.{i - 1}{suffix})"


def _batches(ids: list[list[int]], size: int):
    order = sorted((i for i in range(len(ids)) if ids[i]), key=lambda i: len(ids[i]))
    for s in range(0, len(order), size):
        yield order[s:s + size]


def _pad_batch(ids: list[list[int]], idx: list[int], pad: int, device: str):
    """Right-padded input ids and attention mask of the prompts ``idx`` (one tensor built per batch, not per row)."""
    import torch

    lens = [len(ids[i]) for i in idx]
    width = max(lens)
    x = torch.tensor([ids[i] + [pad] * (width - n) for i, n in zip(idx, lens)], dtype=torch.long)
    m = (torch.arange(width)[None, :] < torch.tensor(lens)[:, None]).long()
    return x.to(device), m.to(device)


def plain_forward(model, probes: ProbeTokens, config: SignatureConfig, device: str) -> float:
    """One plain forward pass (logits only) over the probes, batched like the signature pass; returns seconds.

    The benchmark's reference cost.
    """
    import torch

    t0 = time.perf_counter()
    with torch.no_grad():
        for idx in _batches(probes.ids, config.batch_size):
            x, m = _pad_batch(probes.ids, idx, 0, device)
            model(input_ids=x, attention_mask=m, use_cache=False).logits.float().sum().item()
    return time.perf_counter() - t0


def _batch_plan(probes: ProbeTokens, batch_size: int) -> list[tuple]:
    """Per batch: (prompt indices, then for each kept position in it: batch row, token index and output row, then
    which of those are state rows and their index among the state rows). Model-independent, built once."""
    import torch

    batches = list(_batches(probes.ids, batch_size))
    n = len(probes.ids)
    batch_of, row_of = np.full(n, -1), np.zeros(n, dtype=np.int64)
    for bn, idx in enumerate(batches):
        batch_of[idx] = bn
        row_of[idx] = np.arange(len(idx))
    prompt, token = probes.positions[:, 0].astype(np.int64), probes.positions[:, 1].astype(np.int64)
    state_index = np.full(len(prompt), -1)
    state_index[probes.state_rows] = np.arange(len(probes.state_rows))
    plan = []
    for bn, idx in enumerate(batches):
        rows = np.nonzero(batch_of[prompt] == bn)[0]
        src = np.nonzero(state_index[rows] >= 0)[0]
        plan.append((idx, *(torch.from_numpy(a) for a in (row_of[prompt[rows]], token[rows], rows, src,
                                                           state_index[rows[src]]))))
    return plan


def _check_finite(hs, valid, model_name: str) -> None:
    """Raise :class:`InvalidCheckpoint` naming the first layer whose activations at real (unpadded) tokens are not
    finite.

    Each layer adds into the residual stream that ends in the last hidden state, and a non-finite value stays
    non-finite through it (x + inf is inf or NaN, a norm of either is NaN), so the last layer tells whether any
    layer is bad: when the sum of its states is finite, every state is (NaN and inf cannot cancel into a finite
    sum). Only otherwise (a bad state, one at a padded position, or an overflowing sum) are the layers scanned,
    at real tokens only, to name the first bad one.
    """
    import torch

    if bool(torch.isfinite(hs[-1].sum())):
        return
    n_layers = len(hs) - 1
    for li, h in enumerate(hs):
        if not torch.isfinite(h[valid]).all():
            raise InvalidCheckpoint(f"model {model_name!r} produces non-finite activations (NaN/inf) at "
                                    f"{_layer_label(li, n_layers)} on the probe prompts")


def extract(model, probes: ProbeTokens, config: SignatureConfig, *, model_name: str, device: str,
            keep_raw: bool = False, pad_id: int = 0) -> tuple[dict, dict, dict | None]:
    """Run the signature forward pass. Returns (meta, arrays, raw).

    ``raw`` (with ``keep_raw``) holds the full log-probabilities at every kept position and the full token states,
    for the ``--exact`` path. Raises :class:`InvalidCheckpoint` naming the model and the first layer whose
    activations are not finite.
    """
    import torch

    P = len(probes.positions)
    V = probes.vocab_size
    full = V <= config.full_vocab_max
    k = V if full else min(config.top_k, V)

    # the kept positions' logits, gathered batch by batch and summarized once at the end (one set of ops, not one
    # per batch: on a small model the per-op cost is what a signature adds to a forward pass)
    logits = torch.empty((P, V), dtype=torch.float32, device=device)
    layers: list[int] | None = None
    states = None
    n_layers = None

    with torch.no_grad():
        for idx, bi, ti, ri, src, dst in _batch_plan(probes, config.batch_size):
            x, m = _pad_batch(probes.ids, idx, pad_id, device)
            out = model(input_ids=x, attention_mask=m, output_hidden_states=True, use_cache=False)
            hs = out.hidden_states
            if n_layers is None:
                n_layers = len(hs) - 1
                layers = sampled_layers(n_layers, config.max_layers)
                states = torch.empty((len(layers), len(probes.state_rows), hs[-1].shape[-1]), dtype=torch.float32)
            _check_finite(hs, m.bool(), model_name)
            if not len(ri):
                continue
            bi, ti = bi.to(x.device), ti.to(x.device)
            logits[ri.to(x.device)] = out.logits[bi, ti, :V].float()
            if len(src):
                bs, ts = bi[src.to(x.device)], ti[src.to(x.device)]
                for j, li in enumerate(layers):
                    states[j, dst] = hs[li][bs, ts].float().cpu()
        if not torch.isfinite(logits.sum()) and not torch.isfinite(logits).all():
            raise InvalidCheckpoint(f"model {model_name!r} produces non-finite logits (NaN/inf) at the output "
                                    f"head (lm_head) on the probe prompts; the hidden states are finite")
        lp = torch.log_softmax(logits, dim=-1)
        ent_out = -(lp.exp() * lp).sum(-1).cpu()
        top1_out = lp.argmax(-1).to(torch.int32).cpu()
        raw_logp = lp.clamp_min(LOGP_FLOOR).cpu() if keep_raw or full else None
        if full:
            logp_out = raw_logp
        else:
            vals, ids = torch.topk(lp, k, dim=-1)
            logp_out = vals.clamp_min(LOGP_FLOOR).cpu()
            ids_out = ids.to(torch.int32).cpu()
            logz_out = torch.logsumexp(logits, -1).cpu()
        del logits, lp

    hidden = int(states.shape[-1])
    grams, projs, stats = _state_summaries(states, config, hidden)
    meta = {
        "vocab_size": V, "vocab_hash": probes.vocab_hash, "ids_hash": probes.ids_hash, "n_positions": P,
        "representation": "full" if full else "topk", "k": k, "n_layers": n_layers, "layers": layers,
        "hidden_size": hidden, "n_state_positions": int(len(probes.state_rows)),
        "proj_dim": int(projs.shape[-1]) // max(1, len(probes.state_rows)),
        "n_js_positions": int(len(probes.js_rows)),
    }
    arrays = {"positions": probes.positions.astype(np.int32), "logp": logp_out.numpy(),
              "entropy": ent_out.numpy(), "top1": top1_out.numpy(), "gram": grams, "proj": projs,
              "state_norm": stats, "js_rows": probes.js_rows.astype(np.int32),
              "state_rows": probes.state_rows.astype(np.int32)}
    if not full:
        arrays["ids"] = ids_out.numpy()
        arrays["logz"] = logz_out.numpy()
    raw = {"logp": raw_logp.numpy(), "states": states.numpy()} if keep_raw else None
    return meta, arrays, raw


def gram_vectors(x) -> np.ndarray:
    """Unit-norm vectorized centered Gram matrices of token states ``x`` (layers x n x d), one row per layer: the
    dot product of two models' rows is their linear CKA. Off-diagonal entries are stored once, scaled by sqrt(2).
    A row is NaN where degenerate (constant states)."""
    import torch

    x = x.double()
    xc = x - x.mean(1, keepdim=True)
    k = xc @ xc.transpose(1, 2)
    n = k.shape[-1]
    iu = torch.triu_indices(n, n, offset=1)
    v = torch.cat([torch.diagonal(k, dim1=1, dim2=2), math.sqrt(2.0) * k[:, iu[0], iu[1]]], dim=1)
    norm = v.norm(dim=1, keepdim=True)
    ok = torch.isfinite(norm) & (norm > 0)
    return torch.where(ok, v / torch.where(ok, norm, 1.0), float("nan")).float().numpy()


def gram_vector(x) -> np.ndarray:
    """:func:`gram_vectors` of one layer's token states ``x`` (n x d)."""
    return gram_vectors(x[None])[0]


def _state_summaries(states, config: SignatureConfig, hidden: int):
    """Gram vectors, unit projected token states and (mean, std) of token-state norms, for all layers at once."""
    import torch

    J, n = states.shape[0], states.shape[1]
    proj = state_projection(hidden, n, config)
    y = states if proj is None else torch.einsum("jnd,ndm->jnm", states, proj)
    norms = y.norm(dim=2, keepdim=True)
    u = torch.where(norms > 0, y / norms.clamp_min(1e-30), torch.full_like(y, float("nan")))
    tn = states.norm(dim=2)
    std = tn.std(1) if n > 1 else torch.zeros(J)
    stats = torch.stack([tn.mean(1), std], dim=1)
    return (gram_vectors(states), (u / math.sqrt(n)).reshape(J, -1).numpy().astype(np.float32),
            stats.numpy().astype(np.float32))


def compute_many(path: str | Path, prompt_sets: Sequence[tuple[str, Sequence[str]]], config: SignatureConfig, *,
                 model_name: str, device: str | None = None, keep_raw: bool = False,
                 on_load: Callable[[], None] | None = None) -> list[tuple[dict, dict, dict | None]]:
    """Load the model at ``path`` once and run :func:`extract` for each (probe set name, prompts); then free it."""
    import torch

    from ..checkpoint import read_checkpoint

    device = pick_device(device)
    tok = load_tokenizer(path, model_name)
    vocab = read_checkpoint(path).vocab_size or len(tok)
    probes = [tokenize_probes(tok, prompts, config, model_name=model_name, vocab_size=vocab, probe_name=name)
              for name, prompts in prompt_sets]
    model = load_model(path, device)
    if on_load is not None:
        on_load()
    try:
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        return [extract(model, p, config, model_name=model_name, device=device, keep_raw=keep_raw, pad_id=pad)
                for p in probes]
    finally:
        del model
        if device.startswith("cuda"):
            torch.cuda.empty_cache()


def compute(path: str | Path, prompts: Sequence[str], config: SignatureConfig, *, model_name: str,
            device: str | None = None, keep_raw: bool = False, probe_name: str = "probe set",
            on_load: Callable[[], None] | None = None) -> tuple[dict, dict, dict | None]:
    """Load the model at ``path`` (once), run :func:`extract` on ``prompts`` and free it."""
    return compute_many(path, [(probe_name, prompts)], config, model_name=model_name, device=device,
                        keep_raw=keep_raw, on_load=on_load)[0]
