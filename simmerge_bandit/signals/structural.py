"""The structural part of a signature: one streaming pass over the weights, relative to the base.

Tensors are read one at a time from the memory-mapped safetensors files of the model and of its base, so memory
is bounded by two tensors whatever the model size. For the task vector tau = model - base it keeps:

* the exact squared norm of tau per layer group (``layer.N``, ``embed``, ``head``, ``other``) and of the base;
* a count sketch of tau per layer group, with hashes seeded by tensor name and shape only, so every model with
  the same tensor layout is sketched into the same space and inner products (hence cosines and distances) between
  two task vectors are estimated from two sketches. A group with no more entries than its sketch size is stored
  exactly instead;
* tau at a fixed uniform sample of weight coordinates (seeded by the layout), and whether each sampled entry is in
  its tensor's top-``top_density`` magnitudes (threshold from the full tensor, or from a seeded sample of a large
  one): sign agreement and top-k overlap are estimated from two samples.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import re
from dataclasses import dataclass
from typing import Any

import numpy as np

from .schema import SignatureConfig

_LAYER = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)\.")
_EMBED = re.compile(r"embed|wte|wpe|word_embeddings|position_embeddings")
_HEAD = re.compile(r"(?:^|\.)(?:lm_head|output|embed_out)\.")

#: Entries of a 2-D view hashed at once (bounds the temporary index tensors).
_CHUNK = 1 << 22


def _seed(*parts: Any) -> int:
    return int.from_bytes(hashlib.blake2b(json.dumps(parts).encode(), digest_size=8).digest(), "little") >> 1


def layer_group(name: str) -> str:
    """The layer group of a tensor: ``layer.N`` for transformer block N, else ``embed``, ``head`` or ``other``."""
    m = _LAYER.search(name)
    if m:
        return f"layer.{int(m.group(1))}"
    if _EMBED.search(name):
        return "embed"
    if _HEAD.search(name + "."):
        return "head"
    return "other"


def _group_order(g: str) -> tuple:
    if g.startswith("layer."):
        return (1, int(g.split(".")[1]))
    return ({"embed": 0, "head": 2, "other": 3}[g], 0)


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


@dataclass(frozen=True)
class Layout:
    """Where each tensor's task vector goes in the sketch and the coordinate sample; shared by a model family."""

    hash: str
    groups: list[str]
    group_numel: list[int]
    group_k: list[int]           # sketch size per group (== numel when stored exactly)
    group_exact: list[bool]
    group_offset: list[int]      # start of each group in the flat sketch
    tensor_group: dict[str, int]
    tensor_offset: dict[str, int]  # start of the tensor within its group (exact groups)
    sample: dict[str, np.ndarray]  # sorted local coordinates sampled in each tensor
    sample_offset: dict[str, int]  # start of the tensor's samples in the flat sample arrays
    n_sample: int
    n_total: int

    @property
    def sketch_dims(self) -> int:
        return sum(self.group_k)

    def meta(self) -> dict:
        return {"layout_hash": self.hash, "groups": self.groups, "group_numel": self.group_numel,
                "group_k": self.group_k, "group_exact": self.group_exact, "group_offset": self.group_offset,
                "n_sample": self.n_sample, "n_total": self.n_total}


def make_layout(shapes: dict[str, list], config: SignatureConfig) -> Layout:
    """The sketch and sample layout for tensors ``{name: [dtype, shape]}`` (floating tensors only)."""
    names = sorted(n for n, (dt, _) in shapes.items() if dt in ("F64", "F32", "F16", "BF16"))
    numel = {n: _numel(shapes[n][1]) for n in names}
    groups = sorted({layer_group(n) for n in names}, key=_group_order)
    gi = {g: i for i, g in enumerate(groups)}
    g_numel = [0] * len(groups)
    t_group, t_off = {}, {}
    for n in names:
        g = gi[layer_group(n)]
        t_group[n] = g
        t_off[n] = g_numel[g]
        g_numel[g] += numel[n]
    per = config.sketch_dims // max(1, len(groups))
    k = 1 << max(0, int(math.floor(math.log2(max(1, per)))))
    k = min(max(k, config.sketch_group_min), config.sketch_group_max)
    g_exact = [n <= k for n in g_numel]
    g_k = [n if e else k for n, e in zip(g_numel, g_exact)]
    g_off = np.concatenate([[0], np.cumsum(g_k)[:-1]]).astype(int).tolist()
    layout_hash = hashlib.blake2b(json.dumps([[n, list(shapes[n][1])] for n in names]).encode(),
                                  digest_size=16).hexdigest()
    total = sum(numel.values())
    rng = np.random.default_rng(_seed(config.seed, "coords", layout_hash))
    glob = np.sort(rng.integers(0, total, size=config.coord_sample)) if total else np.zeros(0, dtype=np.int64)
    starts = np.cumsum([0] + [numel[n] for n in names])
    sample, s_off = {}, {}
    pos = 0
    for i, n in enumerate(names):
        lo, hi = np.searchsorted(glob, [starts[i], starts[i + 1]])
        if hi > lo:
            sample[n] = (glob[lo:hi] - starts[i]).astype(np.int64)
            s_off[n] = pos
            pos += int(hi - lo)
    return Layout(hash=layout_hash, groups=groups, group_numel=g_numel, group_k=g_k, group_exact=g_exact,
                  group_offset=g_off, tensor_group=t_group, tensor_offset=t_off, sample=sample, sample_offset=s_off,
                  n_sample=pos, n_total=int(total))


@functools.lru_cache(maxsize=4096)
def _hash_tables(name: str, shape: tuple[int, int], k: int, config: SignatureConfig):
    """Bucket and sign tables for the rows and the columns of a 2-D view: entry (i, j) goes to bucket
    (hr[i] + hc[j]) mod k with sign sr[i] * sc[j]. Products of independent signs are pairwise independent, which is
    what an unbiased count-sketch inner product needs, at the cost of tables the size of one row and one column."""
    import torch

    g = torch.Generator().manual_seed(_seed(config.seed, "sketch", name, list(shape)))
    r, c = shape
    hr = torch.randint(0, k, (r,), generator=g)
    hc = torch.randint(0, k, (c,), generator=g)
    sr = torch.randint(0, 2, (r,), generator=g).float() * 2 - 1
    sc = torch.randint(0, 2, (c,), generator=g).float() * 2 - 1
    return hr, hc, sr, sc


def _view2d(shape) -> tuple[int, int]:
    if len(shape) == 0:
        return (1, 1)
    r = int(shape[0])
    return (r, _numel(shape) // max(1, r))


def sketch_tensor(tau, name: str, shape, k: int, config: SignatureConfig, out) -> None:
    """Add the count sketch of one tensor's task vector into ``out`` (a length-k view; k a power of two),
    chunked by rows."""
    r, c = _view2d(shape)
    hr, hc, sr, sc = (t.to(out.device) for t in _hash_tables(name, (r, c), k, config))
    hr, hc = hr.int(), hc.int()
    t2 = tau.reshape(r, c)
    step = max(1, _CHUNK // max(1, c))
    for s in range(0, r, step):
        e = min(r, s + step)
        bucket = (hr[s:e, None] + hc[None, :]).bitwise_and_(k - 1).reshape(-1)
        vals = (t2[s:e] * sc).mul_(sr[s:e, None]).reshape(-1)
        out.index_add_(0, bucket, vals)


#: Tensors larger than this get their top-density threshold from a seeded sample of this many entries: the
#: threshold's rank is then known to about +-0.002, which moves the top-20% overlap by about 0.002, well below the
#: binomial error of the coordinate sample; an exact selection would cost more than the rest of the pass.
THRESHOLD_SAMPLE = 1 << 16


def top_threshold(abs_tau, density: float, name: str = "", config: SignatureConfig | None = None):
    """The magnitude at or above which an entry is in its tensor's top ``density`` fraction: exact, or, with
    ``config`` and more than THRESHOLD_SAMPLE entries, from a seeded sample."""
    import torch

    flat = abs_tau.reshape(-1)
    n = flat.numel()
    if config is not None and n > THRESHOLD_SAMPLE:
        g = torch.Generator().manual_seed(_seed(config.seed, "threshold", name, n))
        flat = flat[torch.randint(0, n, (THRESHOLD_SAMPLE,), generator=g).to(flat.device)]
        n = THRESHOLD_SAMPLE
    m = max(1, math.ceil(density * n))
    return torch.kthvalue(flat, n - m + 1).values


class TensorReader:
    """Reads tensors by name from a checkpoint's safetensors files, memory-mapped, one at a time."""

    def __init__(self, ckpt):
        self.ckpt = ckpt
        self._handles: dict[str, Any] = {}

    def get(self, name: str):
        from safetensors import safe_open

        f = self.ckpt.tensors[name].file
        h = self._handles.get(f)
        if h is None:
            h = self._handles[f] = safe_open(str(self.ckpt.path / f), framework="pt", device="cpu")
        return h.get_tensor(name)

    def close(self) -> None:
        self._handles.clear()


def compute(model_ckpt, base_ckpt, config: SignatureConfig, *, device: str = "cpu") -> tuple[dict, dict]:
    """Stream the model and its base once; return (meta, arrays) of the structural signature.

    The caller has checked that both checkpoints have the same tensor names and shapes.
    """
    import torch

    layout = make_layout(model_ckpt.shapes(), config)
    G = len(layout.groups)
    sketch = torch.zeros(layout.sketch_dims, dtype=torch.float32, device=device)
    group_sq = np.zeros(G, dtype=np.float64)
    base_sq = 0.0
    samp = np.zeros(layout.n_sample, dtype=np.float32)
    top = np.zeros(layout.n_sample, dtype=np.uint8)
    mr, br = TensorReader(model_ckpt), TensorReader(base_ckpt)
    try:
        with torch.no_grad():
            for name in sorted(layout.tensor_group):
                theta = mr.get(name).to(device=device, dtype=torch.float32).reshape(-1)
                theta0 = br.get(name).to(device=device, dtype=torch.float32).reshape(-1)
                tau = theta - theta0
                del theta
                g = layout.tensor_group[name]
                group_sq[g] += float(tau.square().sum(dtype=torch.float64))
                base_sq += float(theta0.square().sum(dtype=torch.float64))
                del theta0
                off = layout.group_offset[g]
                if layout.group_exact[g]:
                    s = off + layout.tensor_offset[name]
                    sketch[s:s + tau.numel()] = tau
                else:
                    k = layout.group_k[g]
                    sketch_tensor(tau, name, model_ckpt.tensors[name].shape, k, config, sketch[off:off + k])
                idx = layout.sample.get(name)
                if idx is not None:
                    ii = torch.from_numpy(idx).to(device)
                    vals = tau[ii]
                    thr = top_threshold(tau.abs(), config.top_density, name, config)
                    so = layout.sample_offset[name]
                    samp[so:so + len(idx)] = vals.cpu().numpy()
                    top[so:so + len(idx)] = (vals.abs() >= thr).cpu().numpy().astype(np.uint8)
                del tau
    finally:
        mr.close()
        br.close()
    meta = {**layout.meta(), "tv_sq_norm": float(group_sq.sum()), "base_sq_norm": float(base_sq),
            "layer_groups": [i for i, g in enumerate(layout.groups) if g.startswith("layer.")]}
    arrays = {"sketch": sketch.cpu().numpy(), "group_sq": group_sq, "sample": samp, "sample_top": top}
    return meta, arrays
