"""Pairwise features from two signatures, vectorized over many pairs.

Every feature of an ordered pair comes from the two models' stored signatures alone. For many pairs the work is
arranged as matrix products over stacks of signatures: models whose signatures are comparable (same tokenizer and
probe positions; same base and tensor layout) are stacked, pairs are processed in blocks of first models, and each
block's dot products against the second models it needs are one batched product. The per-position KL values of a
block are then sorted once for the mean, median and percentiles.

How each family is estimated (see :mod:`.schema` for the definitions):

* KL: exact for full distributions. For top-k distributions each model's distribution is completed by spreading
  its remaining mass uniformly over the tokens outside its top-k, and the KL of the completed distributions is
  computed exactly: over the union of the two top-k sets plus a closed-form tail term. The cross term
  sum_v a(v) log b(v) is a dot product of per-position vectors over the union of all stacked models' top-k tokens,
  augmented by two tail coordinates.
* Jensen-Shannon: the same completed distributions, summed over an evenly spaced subset of the positions. The
  per-token terms js(x, y) are tabulated at log-spaced values of y and interpolated, so that a sum over tokens is one
  dot product; the estimate is symmetrized and each model's own interpolation error is subtracted (JS(a, a) = 0).
  A subset of positions alone is a sample (on the test zoo its mean missed the mean over all positions by up to 0.09
  nats: benchmarks/results/signals_exact.json). So the subset's mean is corrected with a control variate known at
  every position: the exact per-position KLs both ways, mapped through ``kl_to_js``, track JS closely
  (JS ~ (KL_ab + KL_ba) / 8 for close distributions, -> ln 2 for far ones). The estimate is
  ``mean_subset(JS) + mean_all(g) - mean_subset(g)``.
* Activation cosine and CKA: dot products of stored unit vectors (projected token states; centered Gram matrices).
* Task vectors: per-layer-group count-sketch dot products, normalized by the sketch norms; sign agreement and
  top-20% overlap from the shared coordinate sample; norms exact.

Why one module of this size: every feature family's vectorized estimator works on the same stacks of signatures,
the same grouping of comparable models and the same blocks of pairs (and the cache of stacks); the definitions of
the features are :mod:`.schema`.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from typing import Iterator, Sequence

import numpy as np

from .cache import Signature
from .schema import FEATURE_INDEX, FEATURE_NAMES, SHIFT_SOURCES

_LN2 = math.log(2.0)
#: How close the sketched features are to ``--exact`` (the claim the docs make and the tests and
#: ``benchmarks/bench_signals_exact.py`` check): within EXACT_ABS absolute for a bounded feature, within EXACT_REL
#: of the exact value for an unbounded one.
EXACT_ABS = 0.05
EXACT_REL = 0.05
#: Elements a block may hold in its largest temporary (floats).
_BLOCK_ELEMS = 1 << 23
_STACKS: OrderedDict[tuple, dict] = OrderedDict()
_STACKS_MAX = 8
_STACKS_MAX_BYTES = 3 << 30
_STACKS_LOCK = threading.Lock()
#: First models per block in the dot-product families (small enough that triangular pair sets halve the work).
_GEMM_ROWS = 128


def _q(sorted_vals: np.ndarray, q: float) -> np.ndarray:
    """Quantile with linear interpolation (numpy's default) along the last axis of sorted values."""
    n = sorted_vals.shape[-1]
    x = q * (n - 1)
    lo = int(math.floor(x))
    hi = min(lo + 1, n - 1)
    w = x - lo
    return sorted_vals[..., lo] * (1 - w) + sorted_vals[..., hi] * w


def within_exact(bounded: bool, sketch: float, exact: float) -> bool:
    """Whether a sketched value is as close to the exact one as the docs claim (see :data:`EXACT_ABS`); the tiny
    absolute floor of the relative test only matters for values within 1e-6 of zero."""
    if bounded:
        return abs(sketch - exact) <= EXACT_ABS
    return abs(sketch - exact) <= EXACT_REL * abs(exact) + 1e-6


def kl_summary(kl: np.ndarray) -> np.ndarray:
    """(mean, median, p10, p90) along the last axis of per-position KL values."""
    s = np.sort(kl, axis=-1)
    return np.stack([kl.mean(-1), _q(s, 0.5), _q(s, 0.1), _q(s, 0.9)], axis=-1)


def kl_to_js(kl: np.ndarray) -> np.ndarray:
    """One direction's share of the Jensen-Shannon control variate: ``ln2 / 2 * (1 - exp(-kl / (4 ln2)))``.

    Summed over both directions it is ``(KL_ab + KL_ba) / 8`` for close distributions (where JS is too) and tends
    to ln 2 for disjoint ones (the bound JS reaches); only its agreement with JS position by position matters, since
    it enters the estimate as ``mean over all positions - mean over the JS subset``.
    """
    return (0.5 * _LN2) * -np.expm1(kl * (-0.25 / _LN2))


# ---------------------------------------------------------------------------------------------------------------
# grouping and blocking


def _groups(keys: Sequence, ia: np.ndarray, ib: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray,
                                                                                   np.ndarray]]:
    """For each comparable group: (member slots, pair rows, local a, local b) of the pairs inside it."""
    by_key: dict = {}
    for slot, k in enumerate(keys):
        if k is not None:
            by_key.setdefault(k, []).append(slot)
    gid = np.full(len(keys), -1, dtype=np.int64)
    members = list(by_key.values())
    local = np.zeros(len(keys), dtype=np.int64)
    for g, slots in enumerate(members):
        gid[slots] = g
        local[slots] = np.arange(len(slots))
    if len(ia) == 0:
        return
    ga, gb = gid[ia], gid[ib]
    same = (ga == gb) & (ga >= 0)
    for g, slots in enumerate(members):
        rows = np.nonzero(same & (ga == g))[0]
        if len(rows):
            yield np.asarray(slots), rows, local[ia[rows]], local[ib[rows]]


def _blocks(la: np.ndarray, lb: np.ndarray, per_pair: int, max_rows: int = 1 << 30
            ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """Blocks of first models: (a locals, b locals, rows, row's a position, row's b position).

    A block holds as many first models as keep (block size x second models needed x ``per_pair``) bounded, and at
    most ``max_rows`` (small blocks let triangular pair sets skip the half they do not need).
    """
    order = np.argsort(la, kind="stable")
    ua, starts = np.unique(la[order], return_index=True)
    starts = np.append(starts, len(order))
    nb_all = len(np.unique(lb))
    size = min(max_rows, max(1, _BLOCK_ELEMS // max(1, nb_all * per_pair)))
    for i in range(0, len(ua), size):
        j = min(len(ua), i + size)
        rows = order[starts[i]:starts[j]]
        a_loc = ua[i:j]
        b_loc, rb = np.unique(lb[rows], return_inverse=True)
        ra = np.searchsorted(a_loc, la[rows])
        yield a_loc, b_loc, rows, ra, rb.reshape(-1)


def _directed(ia: np.ndarray, ib: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Unique directed pairs covering (a, b) and (b, a); indices of each input's forward and reverse pair."""
    n = int(max(ia.max(), ib.max())) + 1
    both = np.concatenate([ia * n + ib, ib * n + ia])
    if n * n <= 1 << 25:        # mark the keys in a dense table: no sort of (here) two million keys
        seen = np.zeros(n * n, dtype=bool)
        seen[both] = True
        keys, inv = np.flatnonzero(seen), (np.cumsum(seen) - 1)[both]
    else:
        keys, inv = np.unique(both, return_inverse=True)
        inv = inv.reshape(-1)
    return keys // n, keys % n, inv[:len(ia)], inv[len(ia):]


def _undirected(ia: np.ndarray, ib: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    n = int(max(ia.max(), ib.max())) + 1
    both = np.minimum(ia, ib) * n + np.maximum(ia, ib)
    if n * n <= 1 << 25:        # as in _directed: a dense table instead of a sort
        seen = np.zeros(n * n, dtype=bool)
        seen[both] = True
        return *np.divmod(np.flatnonzero(seen), n), (np.cumsum(seen) - 1)[both]
    keys, inv = np.unique(both, return_inverse=True)
    return keys // n, keys % n, inv.reshape(-1)


def _mm(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a @ b.T through torch (whose BLAS runs several times faster here than numpy's for these shapes, and shares
    one thread pool with the batched products)."""
    import torch

    return torch.mm(torch.from_numpy(a), torch.from_numpy(b).T).numpy()


def _take(X, idx: np.ndarray):
    """Rows ``idx`` of X: a view when they are a contiguous range (no copy of a large stack)."""
    if len(idx) and idx[-1] - idx[0] + 1 == len(idx):
        return X[int(idx[0]):int(idx[-1]) + 1]
    return X[idx]


# ---------------------------------------------------------------------------------------------------------------
# stacks


def dist_key(sig: Signature | None):
    """What makes two signatures' distributions comparable (same vocabulary, probe tokens and shapes); None when
    there is nothing to compare."""
    if sig is None or not sig.ok:
        return None
    m = sig.meta
    return ("dist", m["vocab_hash"], m["ids_hash"], m["representation"], m["vocab_size"], m["k"],
            m["n_positions"], m["n_js_positions"])


def cka_key(sig: Signature | None):
    """What makes two signatures' Gram matrices comparable (same probe tokens, layer count and positions)."""
    if sig is None or not sig.ok:
        return None
    m = sig.meta
    return ("cka", m["vocab_hash"], m["ids_hash"], len(m["layers"]), m["n_state_positions"])


def cos_key(sig: Signature | None):
    """What makes two signatures' projected token states comparable (as :func:`cka_key`, plus the hidden size)."""
    k = cka_key(sig)
    return None if k is None else ("cos", *k[1:], sig.meta["hidden_size"], sig.meta["proj_dim"])


def tv_key(sig: Signature | None):
    """What makes two structural signatures comparable (same base, tensor layout and sketch sizes)."""
    if sig is None or not sig.ok:
        return None
    m = sig.meta
    return ("tv", sig.context, m["layout_hash"], tuple(m["group_k"]), m["n_sample"])


def _nbytes(stack: dict) -> int:
    return sum(v.nbytes for v in stack.values() if isinstance(v, np.ndarray))


def _cached(kind: str, sigs: Sequence[Signature], build):
    """The stacked arrays of these signatures, built once and kept for the next calls with the same models (the
    engine ranks the same catalog again and again). Locked: the daemon calls this from several threads."""
    key = (kind, tuple(s.key for s in sigs))
    with _STACKS_LOCK:
        st = _STACKS.get(key)
        if st is None:
            st = build(sigs)
            _STACKS[key] = st
            while len(_STACKS) > 1 and (len(_STACKS) > _STACKS_MAX or sum(map(_nbytes, _STACKS.values()))
                                        > _STACKS_MAX_BYTES):
                _STACKS.popitem(last=False)
        else:
            _STACKS.move_to_end(key)
        return st


def completed_topk(logp: np.ndarray, V: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Probabilities of the kept tokens (float32), the tail probability of each other token (float64, from a
    float64 sum so that a tiny tail keeps its digits), and the tail count."""
    p = np.exp(logp, dtype=np.float32)
    k = logp.shape[-1]
    tail_n = V - k
    if tail_n <= 0:
        return p, np.zeros(p.shape[:-1]), 0
    r = np.clip(1.0 - p.sum(-1, dtype=np.float64), 1e-30, 1.0)
    return p, r / tail_n, tail_n


def js_elem(x, y):
    """Per-token Jensen-Shannon terms: x log x / 2 + y log y / 2 - m log m with m = (x + y) / 2."""
    from scipy.special import xlogy

    m = 0.5 * (x + y)
    return 0.5 * xlogy(x, x) + 0.5 * xlogy(y, y) - xlogy(m, m)


#: The Jensen-Shannon sketch tabulates js_elem(x, c_j) at log-spaced nodes c_j in [JS_FLOOR, 1] and interpolates the
#: second argument linearly in log space, so that a sum over tokens of js_elem(a_v, b_v) becomes one dot product
#: <X_a, Y_b>. The interpolation error of one position is at most about max_x x h^2 / 32 summed over tokens
#: (h = node spacing in log space); measured on the micro-zoo, about 0.003 nats.
JS_NODES = 24
JS_FLOOR = 1e-10
_U0 = math.log(JS_FLOOR)
_H = -_U0 / (JS_NODES - 1)
_NODES = np.exp(_U0 + _H * np.arange(JS_NODES))


def js_tables(q: np.ndarray, weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(X, Y), each (n, S*W*JS_NODES) float32, for completed probabilities q (n, S, W).

    ``weight`` (broadcast to q) multiplies each slot's terms: 0 for padding, 1 for a token, and the number of
    tokens a slot stands for (the tail outside every kept token, which all share one probability per model)."""
    import torch

    n, S, W = q.shape
    Q = JS_NODES
    qt = torch.from_numpy(np.ascontiguousarray(q, dtype=np.float32)).reshape(n, S * W)
    w = torch.from_numpy(np.ascontiguousarray(np.broadcast_to(weight, q.shape), dtype=np.float32))
    w = w.reshape(n, S * W, 1)
    nodes = torch.from_numpy(_NODES.astype(np.float32))
    half_clogc = 0.5 * nodes * nodes.log()
    X = torch.empty((n, S * W, Q), dtype=torch.float32)
    Y = torch.zeros((n, S * W, Q), dtype=torch.float32)
    chunk = max(1, (1 << 22) // max(1, S * W * Q))
    for i in range(0, n, chunk):
        qi = qt[i:i + chunk]
        m = (qi[..., None] + nodes) * 0.5                                    # > 0: the nodes are positive
        X[i:i + chunk] = (0.5 * torch.xlogy(qi, qi))[..., None] + half_clogc - m * m.log()
        u = (qi.clamp(JS_FLOOR, 1.0).log() - _U0) / _H
        j = u.floor().long().clamp_(0, Q - 2)
        t = (u - j).clamp_(0.0, 1.0)
        Y[i:i + chunk].scatter_(2, j[..., None], (1.0 - t)[..., None])
        Y[i:i + chunk].scatter_(2, j[..., None] + 1, t[..., None])
    X.mul_(w)
    Y.mul_(w > 0)
    return X.reshape(n, -1).numpy(), Y.reshape(n, -1).numpy()


def _build_dist(sigs: Sequence[Signature]) -> dict:
    import torch

    m0 = sigs[0].meta
    V, P = m0["vocab_size"], m0["n_positions"]
    js_rows = sigs[0].arrays["js_rows"].astype(np.int64)
    S = len(js_rows)
    logp = np.stack([s.arrays["logp"] for s in sigs])            # (M, P, k)
    M = len(sigs)
    out = {"top1": np.stack([s.arrays["top1"] for s in sigs]).astype(np.int32),
           "hmean": np.array([float(s.arrays["entropy"].astype(np.float64).mean()) for s in sigs]), "n_js": S,
           "js_rows": js_rows}
    if m0["representation"] == "full":
        lt = torch.from_numpy(logp).float().transpose(0, 1).contiguous()     # (P, M, V)
        out["A"], out["B"] = lt.exp().numpy(), lt.numpy()
        q = np.exp(logp[:, js_rows, :].astype(np.float64))
        weight = np.ones(q.shape[1:])
    else:
        ids = np.stack([s.arrays["ids"] for s in sigs])                      # (M, P, k)
        k = ids.shape[-1]
        p, t, tail_n = completed_topk(logp, V)
        log_t = np.log(np.maximum(t, 1e-300)) if tail_n else np.zeros_like(t)
        # per position, the union of every model's kept tokens, numbered 0..U_p-1 in id order
        pos = np.broadcast_to(np.arange(P)[None, :, None], ids.shape)
        mark = np.zeros((P, V), bool)
        mark[pos, ids] = True
        number = np.cumsum(mark, axis=1, dtype=np.int32) - 1
        cols = number[pos, ids]                                               # (M, P, k)
        U = mark.sum(1)                                                       # (P,)
        W = int(U.max()) + 2
        A = np.zeros((P, M, W), np.float32)
        B = np.zeros((P, M, W), np.float32)
        mm = np.broadcast_to(np.arange(M)[:, None, None], ids.shape)
        flat = ((np.arange(P)[None, :, None] * M + np.arange(M)[:, None, None]) * W + cols).reshape(-1)
        A.reshape(-1)[flat] = (p - t[..., None]).reshape(-1)
        B.reshape(-1)[flat] = (logp - log_t[..., None]).reshape(-1)
        # tail coordinates: sum_v a log b = <alpha_a, delta_b> + (sum_K a - k t_a) log t_b + t_a sum_v log b
        A[:, :, W - 2] = (p.sum(-1) - k * t).T
        A[:, :, W - 1] = t.T
        B[:, :, W - 2] = log_t.T
        B[:, :, W - 1] = (logp.sum(-1, dtype=np.float64) + tail_n * log_t).T
        out["A"], out["B"] = A, B
        # per JS position: the union's tokens, then one slot for the tokens outside it (weighted by their count)
        Uj = U[js_rows]
        Wq = int(Uj.max()) + 1
        slot = np.arange(Wq)[None, :]
        q = np.where(slot <= Uj[:, None], t[:, js_rows, None], 0.0)             # (M, S, Wq)
        q[mm[:, js_rows], np.arange(S)[None, :, None], cols[:, js_rows]] = p[:, js_rows]
        weight = np.where(slot < Uj[:, None], 1.0, np.where(slot == Uj[:, None], (V - Uj)[:, None], 0.0))
    # self terms: sum_v a(v) log a(v) per position (the completed distribution's negative entropy)
    out["self"] = np.einsum("pmw,pmw->mp", out["A"], out["B"], dtype=np.float64).astype(np.float32)
    X, Y = js_tables(q, weight)
    out["jx"], out["jy"] = X, Y
    out["jd"] = np.einsum("md,md->m", X, Y, dtype=np.float64)
    return out


def _dist_features(sigs: Sequence[Signature], la: np.ndarray, lb: np.ndarray, out: np.ndarray, rows: np.ndarray):
    import torch

    st = _cached("dist", sigs, _build_dist)
    A, B = torch.from_numpy(st["A"]), torch.from_numpy(st["B"])
    P = A.shape[0]
    selfp = torch.from_numpy(st["self"])
    # KL over the directed pairs both ways; top-1 agreement in the same blocks
    da, db, fwd, rev = _directed(la, lb)
    kl = np.empty((len(da), 4))
    agree = np.empty(len(da))
    # the JS control variate of each directed pair: its mean over all positions minus its mean over the JS subset
    cv = np.empty(len(da))
    top1 = st["top1"]
    js_rows = st["js_rows"]
    for a_loc, b_loc, drows, ra, rb in _blocks(da, db, P):
        ta = torch.from_numpy(a_loc)
        cross = torch.bmm(_take(A.transpose(0, 1), a_loc).transpose(0, 1),
                          _take(B.transpose(0, 1), b_loc).permute(1, 2, 0))  # (P, Ba, Bb)
        if 2 * len(drows) >= len(a_loc) * len(b_loc):
            # dense block: summarize every pair, then pick
            vals = (selfp[ta].T[:, :, None] - cross).clamp_min_(0.0).permute(1, 2, 0).contiguous().numpy()
            kl[drows] = kl_summary(vals)[ra, rb]
            g = kl_to_js(vals)
            cv[drows] = (g.mean(-1, dtype=np.float64) - g[..., js_rows].mean(-1, dtype=np.float64))[ra, rb]
            eq = (_take(top1, a_loc)[:, None, :] == _take(top1, b_loc)[None, :, :]).mean(-1)
            agree[drows] = eq[ra, rb]
        else:
            vals = np.maximum(selfp[ta][ra].numpy() - cross.numpy()[:, ra, rb].T, 0.0)
            kl[drows] = kl_summary(vals)
            g = kl_to_js(vals)
            cv[drows] = g.mean(-1, dtype=np.float64) - g[:, js_rows].mean(-1, dtype=np.float64)
            agree[drows] = (top1[a_loc][ra] == top1[b_loc][rb]).mean(-1)
    i_ab = [FEATURE_INDEX[n] for n in ("kl_ab_mean", "kl_ab_median", "kl_ab_p10", "kl_ab_p90")]
    i_ba = [FEATURE_INDEX[n] for n in ("kl_ba_mean", "kl_ba_median", "kl_ba_p10", "kl_ba_p90")]
    out[np.ix_(rows, i_ab)] = kl[fwd]
    out[np.ix_(rows, i_ba)] = kl[rev]
    out[rows, FEATURE_INDEX["agree_top1"]] = agree[fwd]
    # Jensen-Shannon over the unordered pairs: symmetrized tabulated sums, less each model's own interpolation
    # error (which makes JS(a, a) exactly 0), plus the closed-form tail of the completed distributions; then the
    # subset's mean is corrected by the control variate of both directions (see the module docstring)
    ua, ub, inv = _undirected(la, lb)
    X, Y, d = st["jx"], st["jy"], st["jd"]
    js = np.empty(len(ua))
    for a_loc, b_loc, urows, ra, rb in _blocks(ua, ub, 2, max_rows=_GEMM_ROWS):
        xa, ya = _take(X, a_loc), _take(Y, a_loc)
        xb, yb = _take(X, b_loc), _take(Y, b_loc)
        g = _mm(xa, yb)[ra, rb].astype(np.float64) + _mm(ya, xb)[ra, rb]
        v = 0.5 * g - 0.5 * (d[a_loc][ra] + d[b_loc][rb])
        js[urows] = v / st["n_js"]
    out[rows, FEATURE_INDEX["js_mean"]] = np.clip(js[inv] + cv[fwd] + cv[rev], 0.0, _LN2)
    out[rows, FEATURE_INDEX["entropy_diff_mean"]] = st["hmean"][la] - st["hmean"][lb]


def _bmm(X: np.ndarray, a_loc: np.ndarray, b_loc: np.ndarray) -> np.ndarray:
    """Batched dot products (G, Ba, Bb) of stacked vectors X (G, M, D) between two sets of rows."""
    import torch

    T = torch.from_numpy(X).transpose(0, 1)                                  # (M, G, D) view
    xa = _take(T, a_loc).transpose(0, 1)
    xb = _take(T, b_loc).transpose(0, 1)
    return torch.bmm(xa, xb.transpose(1, 2)).numpy()


def _act_features(kind: str, sigs: Sequence[Signature], la, lb, out, rows) -> None:
    """Per-layer dot products of stored unit vectors, summarized over layers (mean, min, last)."""
    name = "gram" if kind == "cka" else "proj"
    st = _cached(kind, sigs, lambda ss: {"X": np.ascontiguousarray(
        np.stack([s.arrays[name] for s in ss], axis=1), dtype=np.float32)})      # (J, M, D)
    X = st["X"]
    lo, hi = (0.0, 1.0) if kind == "cka" else (-1.0, 1.0)
    ua, ub, inv = _undirected(la, lb)
    res = np.empty((len(ua), 3))
    for a_loc, b_loc, urows, ra, rb in _blocks(ua, ub, 3 * X.shape[0], max_rows=_GEMM_ROWS):
        g = np.clip(_bmm(X, a_loc, b_loc)[:, ra, rb], lo, hi)                 # (J, rows)
        res[urows] = np.stack([g.mean(0, dtype=np.float64), g.min(0), g[-1]], axis=-1)
    names = ("cka_mean", "cka_min", "cka_last") if kind == "cka" else ("cos_act_mean", "cos_act_min", "cos_act_last")
    out[np.ix_(rows, [FEATURE_INDEX[n] for n in names])] = res[inv]


def _build_tv(sigs: Sequence[Signature]) -> dict:
    m0 = sigs[0].meta
    offs, ks = m0["group_offset"], m0["group_k"]
    M, kmax = len(sigs), max(ks)
    # groups padded to one width so that all their dot products are one batched product
    flat = np.stack([s.arrays["sketch"] for s in sigs]).astype(np.float32, copy=False)
    sk = np.zeros((len(ks), M, kmax), np.float32)
    for g, (o, k) in enumerate(zip(offs, ks)):
        sk[g, :, :k] = flat[:, o:o + k]
    del flat
    gn = np.einsum("gmd,gmd->mg", sk, sk, dtype=np.float64)                 # (M, G) sketch norms^2
    samp = np.stack([s.arrays["sample"] for s in sigs])
    sign = np.sign(samp).astype(np.float32)
    top = np.stack([s.arrays["sample_top"] for s in sigs]).astype(np.float32)
    return {"sketch": sk, "gn": gn, "sample": np.ascontiguousarray(np.stack([sign, (sign != 0), top]),
                                                                   dtype=np.float32),
            "top_n": top.sum(1).astype(np.float64),
            "tv_sq": np.array([s.meta["tv_sq_norm"] for s in sigs]),
            "base_sq": np.array([s.meta["base_sq_norm"] for s in sigs]), "layers": m0["layer_groups"]}


def _tv_features(sigs: Sequence[Signature], la, lb, out, rows) -> None:
    st = _cached("tv", sigs, _build_tv)
    gn, layers = st["gn"], list(st["layers"])
    rg = np.sqrt(gn)
    rtot = np.sqrt(gn.sum(1))
    ua, ub, inv = _undirected(la, lb)
    res = np.empty((len(ua), 5))
    G = st["sketch"].shape[0]
    with np.errstate(divide="ignore", invalid="ignore"):
        for a_loc, b_loc, urows, ra, rb in _blocks(ua, ub, G + 3, max_rows=_GEMM_ROWS):
            d = _bmm(st["sketch"], a_loc, b_loc)[:, ra, rb].astype(np.float64)   # (G, rows)
            ia, ib = a_loc[ra], b_loc[rb]
            cos = np.clip(d.sum(0) / (rtot[ia] * rtot[ib]), -1.0, 1.0)
            if layers:
                c = np.clip(d[layers] / (rg[ia][:, layers] * rg[ib][:, layers]).T, -1.0, 1.0)
                lmean, lmin = c.mean(0), c.min(0)
            else:
                lmean = lmin = np.full(len(ra), np.nan)
            sgn, nz, ov = _bmm(st["sample"], a_loc, b_loc)[:, ra, rb]
            agree = np.clip((sgn + nz) / (2.0 * nz), 0.0, 1.0)
            overlap = np.clip(ov / np.sqrt(st["top_n"][ia] * st["top_n"][ib]), 0.0, 1.0)
            res[urows] = np.stack([cos, lmean, lmin, agree, overlap], axis=-1)
        res = res[inv]
        na, nb = np.sqrt(st["tv_sq"][la]), np.sqrt(st["tv_sq"][lb])
        d2 = (na - nb) ** 2 + 2.0 * na * nb * (1.0 - res[:, 0])
        dist = np.sqrt(np.maximum(d2, 0.0)) / np.sqrt(st["base_sq"][la])
        ratio = na / nb
    names = ("cos_tv_global", "cos_tv_layer_mean", "cos_tv_layer_min", "agree_sign_tv", "overlap_top20_tv")
    out[np.ix_(rows, [FEATURE_INDEX[n] for n in names])] = res
    out[rows, FEATURE_INDEX["norm_ratio_tv"]] = ratio
    out[rows, FEATURE_INDEX["dist_l2_rel"]] = dist


def compute_matrix(functional: Sequence[Signature | None], structural: Sequence[Signature | None],
                   ia: np.ndarray, ib: np.ndarray, base_slot: Sequence[int] | None = None) -> np.ndarray:
    """Features (n_pairs, n_features) of pairs ``(ia[i], ib[i])`` of signature slots; NaN where absent.

    ``base_slot[s]`` is the slot holding the functional signature of slot ``s``'s base on the same probes (-1
    when there is none); without it the shift family is absent. Base slots share the stacks of the models, so
    the shift costs one more row per base, not another stack.
    """
    ia = np.asarray(ia, dtype=np.int64)
    ib = np.asarray(ib, dtype=np.int64)
    out = np.full((len(ia), len(FEATURE_NAMES)), np.nan)
    if base_slot is not None and len(ia):
        _shift_features(functional, np.asarray(base_slot, dtype=np.int64), ia, ib, out)
    for key_fn, fn in ((dist_key, _dist_features), (cka_key, lambda *a: _act_features("cka", *a)),
                       (cos_key, lambda *a: _act_features("cos", *a))):
        keys = [key_fn(s) for s in functional]
        for slots, rows, la, lb in _groups(keys, ia, ib):
            fn([functional[s] for s in slots], la, lb, out, rows)
    keys = [tv_key(s) for s in structural]
    for slots, rows, la, lb in _groups(keys, ia, ib):
        _tv_features([structural[s] for s in slots], la, lb, out, rows)
    out[~np.isfinite(out)] = np.nan
    return out


def _shift_features(functional: Sequence[Signature | None], base_slot: np.ndarray, ia: np.ndarray, ib: np.ndarray,
                    out: np.ndarray) -> None:
    """Each model's shift from its base (the distribution family of the pair (base, model)), for both sides."""
    used = np.unique(np.concatenate([ia, ib]))
    used = used[base_slot[used] >= 0]
    if not len(used):
        return
    pb, pm = base_slot[used], used
    tmp = np.full((len(used), len(FEATURE_NAMES)), np.nan)
    keys = [dist_key(s) for s in functional]
    for slots, rows, la, lb in _groups(keys, pb, pm):
        _dist_features([functional[s] for s in slots], la, lb, tmp, rows)
    shift = np.full((len(functional), len(SHIFT_SOURCES)), np.nan)
    shift[used] = tmp[:, [FEATURE_INDEX[src] for _, src, _ in SHIFT_SOURCES]] * [s for _, _, s in SHIFT_SOURCES]
    for side, idx in (("a", ia), ("b", ib)):
        out[:, [FEATURE_INDEX[name.format(side)] for name, _, _ in SHIFT_SOURCES]] = shift[idx]


def clear_stacks() -> None:
    """Forget the cached stacks (tests and benchmarks)."""
    with _STACKS_LOCK:
        _STACKS.clear()
