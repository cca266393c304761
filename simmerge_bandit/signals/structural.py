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

The pass is meant to cost little more than reading the weights: per tensor one subtraction into a reused buffer,
two float32 dot products, one scatter-add whose index is a broadcast sum of a row table and a column table (bucket
and sign folded into one index, so there is no multiplication pass), and two small gathers. Layouts, hash tables
and sample indices are cached, so the models of one family derive them once; per-tensor results stay on the device
until the end.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import mmap
import re
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..checkpoint import DTYPE_BYTES
from .schema import SignatureConfig

_LAYER = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)\.")
_EMBED = re.compile(r"embed|wte|wpe|word_embeddings|position_embeddings")
_HEAD = re.compile(r"(?:^|\.)(?:lm_head|output|embed_out)\.")

#: Entries of a 2-D view hashed at once: the int64 index of a chunk (2 MiB) stays in a core's L2 cache between
#: the broadcast sum that writes it and the scatter that reads it (measured: 4M-entry chunks are 1.6x slower).
_CHUNK = 1 << 18
#: Entries per float32 dot product in a squared norm (bounds its accumulated rounding error).
_DOT_CHUNK = 1 << 20


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


@dataclass(frozen=True, eq=False)
class Layout:
    """Where each tensor's task vector goes in the sketch and the coordinate sample; shared by a model family.

    Compared and hashed by identity: :func:`make_layout` returns one cached object per tensor layout."""

    hash: str
    names: list[str]             # floating tensors, sorted: the order of the pass
    shapes: dict[str, tuple]
    tensor_numel: dict[str, int]
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
        """Total count-sketch size over every layer group."""
        return sum(self.group_k)

    def meta(self) -> dict:
        """The layout's description as a signature's metadata."""
        # copies: the layout is cached and shared, a signature's meta is its own
        return {"layout_hash": self.hash, "groups": list(self.groups), "group_numel": list(self.group_numel),
                "group_k": list(self.group_k), "group_exact": list(self.group_exact),
                "group_offset": list(self.group_offset), "n_sample": self.n_sample, "n_total": self.n_total}


def make_layout(shapes: dict[str, list], config: SignatureConfig) -> Layout:
    """The sketch and sample layout for tensors ``{name: [dtype, shape]}`` (floating tensors only).

    Cached: every model of a family has the same layout, and its coordinate sample is drawn once."""
    key = tuple(sorted((n, dt, tuple(int(x) for x in shape)) for n, (dt, shape) in shapes.items()
                       if dt in ("F64", "F32", "F16", "BF16")))
    return _layout(key, config)


@functools.lru_cache(maxsize=16)
def _layout(tensors: tuple, config: SignatureConfig) -> Layout:
    shapes = {n: [dt, list(shape)] for n, dt, shape in tensors}
    names = sorted(shapes)
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
    return Layout(hash=layout_hash, names=names, shapes={n: tuple(shapes[n][1]) for n in names}, tensor_numel=numel,
                  groups=groups, group_numel=g_numel, group_k=g_k, group_exact=g_exact,
                  group_offset=g_off, tensor_group=t_group, tensor_offset=t_off, sample=sample, sample_offset=s_off,
                  n_sample=pos, n_total=int(total))


@functools.lru_cache(maxsize=4096)
def _hash_tables(name: str, shape: tuple[int, int], k: int, config: SignatureConfig):
    """Bucket and sign tables for the rows and the columns of a 2-D view: entry (i, j) goes to bucket
    (hr[i] + hc[j]) mod k with sign sr[i] * sc[j]. Products of independent signs are pairwise independent, which is
    what an unbiased count-sketch inner product needs, at the cost of tables the size of one row and one column.

    They are returned folded into one index per row and per column, ``ur = hr + 2k [sr < 0]`` and
    ``uc = hc + 2k [sc < 0]``: ``ur[i] + uc[j]`` lies in [0, 6k) and says both the bucket (its value mod k) and the
    sign (its region of 2k: + - +), so the sketch is one scatter-add with no multiplication pass (see
    :func:`sketch_into`). Small integers (int16 while 6k fits) keep the broadcast sum cheap."""
    import torch

    g = torch.Generator().manual_seed(_seed(config.seed, "sketch", name, list(shape)))
    r, c = shape
    hr = torch.randint(0, k, (r,), generator=g)
    hc = torch.randint(0, k, (c,), generator=g)
    sr = torch.randint(0, 2, (r,), generator=g)
    sc = torch.randint(0, 2, (c,), generator=g)
    dtype = torch.int16 if 6 * k <= torch.iinfo(torch.int16).max else torch.int32
    # randint(0, 2) == 0 is the sign -1 (as ``2 b - 1``)
    return (hr + 2 * k * (sr == 0)).to(dtype), (hc + 2 * k * (sc == 0)).to(dtype)


def _view2d(shape) -> tuple[int, int]:
    if len(shape) == 0:
        return (1, 1)
    r = int(shape[0])
    return (r, _numel(shape) // max(1, r))


def sketch_into(t2, ur, uc, k: int, signed, work=None) -> None:
    """Add the count sketch of ``t2`` (an r x c view of a tensor's task vector) with hash tables ``ur``, ``uc`` (see
    :func:`_hash_tables`) into ``signed``, a length-6k accumulator that :func:`fold_signed` turns into the k-bucket
    sketch: a scatter-add at ``ur[i] + uc[j]``, chunked by rows (_CHUNK entries). ``work`` is an optional int64
    buffer for the indices, reused across tensors (fresh pages cost page faults).

    A tensor with many more rows than there are row indices (2k of them) first adds up the rows that share one
    (a dense row-wise pass), so that only 2k rows are scattered entry by entry.
    """
    import torch

    r, c = t2.shape
    if r >= 4 * k:
        group = torch.where(ur >= 2 * k, ur - k, ur).long()                    # in [0, 2k)
        t2 = t2.new_zeros((2 * k, c)).index_add_(0, group, t2)
        g = torch.arange(k, device=signed.device, dtype=ur.dtype)
        ur, r = torch.cat([g, g + 2 * k]), 2 * k
    step = max(1, _CHUNK // max(1, c))
    n_idx = min(r, step) * c
    if work is None or work.numel() < n_idx:
        work = torch.empty(n_idx, dtype=torch.long, device=signed.device)
    if r <= step:                                       # one chunk (most tensors): the fewest calls
        ix = torch.add(ur[:, None], uc, out=work[:r * c].view(r, c))
        signed.scatter_add_(0, ix.view(-1), t2.reshape(-1))
        return
    for s in range(0, r, step):
        e = min(r, s + step)
        ix = torch.add(ur[s:e, None], uc, out=work[:(e - s) * c].view(e - s, c))
        signed.scatter_add_(0, ix.view(-1), t2[s:e].reshape(-1))


def fold_signed(signed, k: int):
    """The k-bucket count sketch from a length-6k accumulator of :func:`sketch_into`: regions + - +, each of 2k
    slots folded mod k."""
    v = signed.view(3, 2, k).sum(1)
    return v[0] - v[1] + v[2]


#: Tensors larger than this get their top-density threshold from a seeded sample of this many entries: the
#: threshold's rank is then known to about +-0.006 per tensor, and the errors of different tensors are independent.
#: The coordinate sample dominates the overlap's error: on a three-layer family, over three seeds, the deviation of
#: ``overlap_top20_tv`` from --exact spread by +-0.018 across seeds and moved by at most 0.004 between threshold
#: samples of 65536, 16384 and 4096 entries. A selection costs about 6 ns an entry (branch mispredictions), which
#: on a small model is half of the pass.
THRESHOLD_SAMPLE = 1 << 12


@functools.lru_cache(maxsize=1024)
def _threshold_index(name: str, n: int, config: SignatureConfig):
    """The seeded entries of an n-entry tensor its threshold is estimated from, sorted (a forward gather)."""
    import torch

    g = torch.Generator().manual_seed(_seed(config.seed, "threshold", name, n))
    return torch.randint(0, n, (THRESHOLD_SAMPLE,), generator=g).sort().values


def top_threshold(abs_tau, density: float):
    """The magnitude at or above which an entry is in the top ``density`` fraction of ``abs_tau``'s entries."""
    import torch

    flat = abs_tau.reshape(-1)
    n = flat.numel()
    m = max(1, math.ceil(density * n))
    return torch.kthvalue(flat, n - m + 1).values


#: torch dtypes of the safetensors dtype codes a signature reads.
_TORCH_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
                 "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}


class TensorReader:
    """Reads tensors by name from a checkpoint's safetensors files: views of a private memory mapping of each file.

    The offsets come from the checkpoint's parsed headers, so a tensor costs one view instead of a library call
    (which costs more than reading a small tensor). The views must not be written to (nothing here does; the
    mapping is copy-on-write, so the file would stay intact anyway)."""

    def __init__(self, ckpt):
        self.ckpt = ckpt
        self._maps: dict[str, mmap.mmap] = {}
        self._bytes: dict[str, Any] = {}

    def get(self, name: str, flat: bool = False):
        """The tensor (flat with ``flat``), in its stored dtype."""
        import torch

        info = self.ckpt.tensors[name]
        u8 = self._bytes.get(info.file)
        if u8 is None:
            with open(self.ckpt.path / info.file, "rb") as fh:
                mm = self._maps[info.file] = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY)
            u8 = self._bytes[info.file] = torch.frombuffer(mm, dtype=torch.uint8)
        b = u8[info.start:info.end]
        if info.start % DTYPE_BYTES[info.dtype]:
            b = b.clone()                          # a view must be aligned to its element size
        t = b.view(getattr(torch, _TORCH_DTYPES[info.dtype]))
        return t if flat else t.view(info.shape)

    def close(self) -> None:
        """Release the memory mappings of the checkpoint's files."""
        self._bytes.clear()
        for mm in self._maps.values():
            try:
                mm.close()
            except BufferError:                    # a view is still alive somewhere; the mapping goes with it
                pass
        self._maps.clear()


@dataclass(frozen=True)
class _TensorPlan:
    """What the pass does with one tensor, derived once per layout and device (see :func:`_plans`)."""

    name: str
    group: int
    numel: int
    view: tuple[int, int]       # the 2-D view the hash tables index
    k: int                      # sketch size of the tensor's group
    exact_at: int               # start in the flat sketch when its group is stored exactly, else -1
    tables: tuple | None        # (ur, uc) on the device, when its group is sketched
    sample: Any                 # sampled local coordinates (int64, on the device), or None
    sample_at: int
    threshold_index: Any        # the threshold's seeded sample (int64, on the device), or None: every entry


@functools.lru_cache(maxsize=8)
def _plans(layout: Layout, config: SignatureConfig, device: str) -> tuple[_TensorPlan, ...]:
    """The per-tensor plans of a layout in pass order, with every index already a tensor on the device: the
    models of a family share them, and the pass itself does no table lookups or conversions."""
    import torch

    plans = []
    for name in layout.names:
        g = layout.tensor_group[name]
        k, n = layout.group_k[g], layout.tensor_numel[name]
        view = _view2d(layout.shapes[name])
        exact = layout.group_exact[g]
        idx = layout.sample.get(name)
        plans.append(_TensorPlan(
            name=name, group=g, numel=n, view=view, k=k,
            exact_at=layout.group_offset[g] + layout.tensor_offset[name] if exact else -1,
            tables=None if exact else tuple(t.to(device) for t in _hash_tables(name, view, k, config)),
            sample=None if idx is None else torch.from_numpy(idx).to(device),
            sample_at=layout.sample_offset.get(name, 0),
            threshold_index=None if n <= THRESHOLD_SAMPLE else _threshold_index(name, n, config).to(device)))
    return tuple(plans)


def compute(model_ckpt, base_ckpt, config: SignatureConfig, *, device: str = "cpu") -> tuple[dict, dict]:
    """Stream the model and its base once; return (meta, arrays) of the structural signature.

    The caller has checked that both checkpoints have the same tensor names and shapes. Per tensor: one
    subtraction into a reused buffer, two float32 dot products (per _DOT_CHUNK entries: the rounding error of a
    float32 dot grows along the vector, about 3e-6 relative per chunk), one scatter-add (sketched groups) or copy
    (exact groups), a gather of the sampled coordinates and a selection for the threshold. Per-tensor results stay
    on the device until the end (one transfer, no per-tensor sync).
    """
    import torch

    layout = make_layout(model_ckpt.shapes(), config)
    plans = _plans(layout, config, str(device))
    sketch = torch.zeros(layout.sketch_dims, dtype=torch.float32, device=device)
    signed = {g: torch.zeros(6 * k, dtype=torch.float32, device=device)
              for g, (k, exact) in enumerate(zip(layout.group_k, layout.group_exact)) if not exact}
    samp = torch.zeros(layout.n_sample, dtype=torch.float32, device=device)
    # workspaces reused by every tensor (never write into what the reader returns: it is the file's mapping)
    tau_work = torch.empty(max(layout.tensor_numel.values(), default=0), dtype=torch.float32, device=device)
    idx_work = torch.empty(min(_CHUNK, tau_work.numel()) if signed else 0, dtype=torch.long, device=device)
    sq_group, sq_tv, sq_base, thresholds, counts = [], [], [], [], []
    mr, br = TensorReader(model_ckpt), TensorReader(base_ckpt)
    try:
        with torch.no_grad():
            for pl in plans:
                theta0, theta = br.get(pl.name, flat=True), mr.get(pl.name, flat=True)
                if theta.dtype != torch.float32 or theta.device != tau_work.device:
                    theta0 = theta0.to(device=device, dtype=torch.float32)
                    theta = theta.to(device=device, dtype=torch.float32)
                tau = torch.sub(theta, theta0, out=tau_work[:pl.numel])
                chunks = ((tau, theta0),) if pl.numel <= _DOT_CHUNK else zip(tau.split(_DOT_CHUNK),
                                                                              theta0.split(_DOT_CHUNK))
                for t, t0 in chunks:
                    sq_group.append(pl.group)
                    sq_tv.append(torch.dot(t, t))
                    sq_base.append(torch.dot(t0, t0))
                del theta, theta0
                if pl.tables is None:
                    sketch[pl.exact_at:pl.exact_at + pl.numel] = tau
                else:
                    sketch_into(tau.view(pl.view), *pl.tables, pl.k, signed[pl.group], idx_work)
                if pl.sample is not None:
                    torch.index_select(tau, 0, pl.sample, out=samp[pl.sample_at:pl.sample_at + len(pl.sample)])
                    vals = tau if pl.threshold_index is None else tau.index_select(0, pl.threshold_index)
                    thresholds.append(top_threshold(vals.abs(), config.top_density))
                    counts.append(len(pl.sample))
                del tau
            for g, acc in signed.items():
                k, off = layout.group_k[g], layout.group_offset[g]
                sketch[off:off + k] = fold_signed(acc, k)
            top = torch.zeros(0, dtype=torch.bool, device=device)
            if counts:
                thr = torch.stack(thresholds).repeat_interleave(torch.tensor(counts, device=device))
                top = samp.abs() >= thr
    finally:
        mr.close()
        br.close()
    group_sq = np.zeros(len(layout.groups), dtype=np.float64)
    base_sq = 0.0
    if sq_tv:
        np.add.at(group_sq, sq_group, torch.stack(sq_tv).double().cpu().numpy())
        base_sq = float(torch.stack(sq_base).double().sum())
    meta = {**layout.meta(), "tv_sq_norm": float(group_sq.sum()), "base_sq_norm": base_sq,
            "layer_groups": [i for i, g in enumerate(layout.groups) if g.startswith("layer.")]}
    arrays = {"sketch": sketch.cpu().numpy(), "group_sq": group_sq, "sample": samp.cpu().numpy(),
              "sample_top": top.cpu().numpy().astype(np.uint8)}
    return meta, arrays
