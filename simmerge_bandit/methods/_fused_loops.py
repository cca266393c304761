"""The compiled loops of :mod:`.fused` (numba, imported on first use; machine code cached beside this file).

Inputs are stored bfloat16 (as uint16 bits) or float32; values are computed in float32 and rounded to the compute
dtype. ``o`` is any array of the compute dtype's storage (uint16 for bfloat16; an empty one will do): it selects
the rounding, the keys and the output format when a loop is compiled, one compilation per (input, compute) pair.
The models come as a tuple (:func:`models`). Every function that reads inputs returns 0, or 1 when the base
holds NaN / Inf, or ``2 + i`` when model ``i`` does.
"""

from __future__ import annotations

import numpy as np
from numba import njit, types
from numba.extending import overload


def models(arrays):
    """The models' arrays as the loops take them: a tuple (each number of models compiles, and caches, its own
    loops; a numba typed list would serve any number, but building one compiles code in every process: seconds)."""
    return tuple(arrays)


_S16 = np.uint32(16)
_EXP = np.uint32(0x7F800000)
_ABS = np.uint32(0x7FFFFFFF)
_TINY = np.float32(1.1754944e-38)  # the smallest normal float32 (and bfloat16)


@njit
def _bits(x):
    return np.float32(x).view(np.uint32)


@njit
def _float(b):
    return np.uint32(b).view(np.float32)


@njit
def _bf16_bits(b):
    """The bits of the bfloat16 nearest (ties to even) to the float32 whose bits are ``b``, as float32 bits (the
    low 16 are 0)."""
    return np.uint32((b + np.uint32(0x7FFF) + ((b >> _S16) & np.uint32(1))) & np.uint32(0xFFFF0000))


def _load(a, j):
    """Element ``j`` of an input as float32 (exact: a bfloat16 array holds its bits)."""


@overload(_load)
def _load_impl(a, j):
    if a.dtype == types.uint16:
        return lambda a, j: _float(np.uint32(np.uint32(a[j]) << _S16))
    return lambda a, j: np.float32(a[j])


def _rnd(o, x):
    """``x`` rounded to the compute dtype (to nearest even), as float32.

    For bfloat16 this is the rounding on the bits without the NaN case: inputs holding NaN are refused, so the only
    NaN that can arise is the one an operation makes (inf - inf after an overflow), the processor's default NaN,
    which this rounding keeps a NaN (torch would give the NaN of the other sign).
    """


@overload(_rnd)
def _rnd_impl(o, x):
    if o.dtype == types.uint16:
        return lambda o, x: _float(_bf16_bits(_bits(x)))
    return lambda o, x: np.float32(x)


def _in(o, a, j):
    """Element ``j`` of input ``a`` in the compute dtype, as float32 (rounded only when ``a`` is wider)."""


@overload(_in)
def _in_impl(o, a, j):
    if o.dtype == types.uint16 and a.dtype != types.uint16:
        return lambda o, a, j: _rnd(o, _load(a, j))
    return lambda o, a, j: _load(a, j)


def _store(o, j, x):
    """Store ``x`` rounded to the compute dtype at ``o[j]``."""


@overload(_store)
def _store_impl(o, j, x):
    if o.dtype == types.uint16:
        def store_bf16(o, j, x):
            o[j] = np.uint16(_bf16_bits(_bits(x)) >> _S16)
        return store_bf16

    def store(o, j, x):
        o[j] = np.float32(x)
    return store


def _key(o, x):
    """The magnitude key of ``x`` (a value of the compute dtype): its bits without the sign."""


@overload(_key)
def _key_impl(o, x):
    if o.dtype == types.uint16:
        return lambda o, x: np.uint32((_bits(x) >> _S16) & np.uint32(0x7FFF))
    return lambda o, x: np.uint32(_bits(x) & _ABS)


#: Elements per block: each loop below computes one step for a block into a small array (a simple loop over
#: block slices, which the compiler turns into vector instructions; indexing the whole arrays with computed
#: indices does not vectorize) before the next step reads them.
BLOCK = 1024


@njit
def _exp(x):
    return _bits(x) & _EXP


@njit(error_model="numpy")
def _base_block(o, bb, B):
    emax = np.uint32(0)
    for t in range(bb.size):
        B[t] = _in(o, bb, t)
        emax = max(emax, _exp(B[t]))
    return emax


@njit(error_model="numpy")
def _delta_keys(o, xb, B, keys):
    """Keys of the task vector ``xb - B`` (a block) into ``keys``; returns the largest exponent field of ``xb``."""
    emax = np.uint32(0)
    for t in range(xb.size):
        v = _in(o, xb, t)
        emax = max(emax, _exp(v))
        keys[t] = _key(o, _rnd(o, v - B[t]))
    return emax


@njit(error_model="numpy")
def _histogram(keys, h, shift):
    for t in range(keys.size):
        h[keys[t] >> shift] += 1


@njit(nogil=True, cache=True, error_model="numpy")
def count(base, xs, o, lo, hi, shift, hist):
    """Count the keys of each task vector ``xs[i] - base`` over elements ``[lo, hi)``:
    ``hist[i, key >> shift] += 1``."""
    B = np.empty(BLOCK, np.float32)
    keys = np.empty(BLOCK, np.uint32)
    eb = np.uint32(0)
    ex = np.zeros(len(xs), np.uint32)
    sh = np.uint32(shift)
    for s in range(lo, hi, BLOCK):
        e = min(s + BLOCK, hi)
        n = e - s
        Bn, kn = B[:n], keys[:n]
        eb = max(eb, _base_block(o, base[s:e], Bn))
        for i in range(len(xs)):
            ex[i] = max(ex[i], _delta_keys(o, xs[i][s:e], Bn, kn))
            _histogram(kn, hist[i], sh)
    if eb == _EXP:
        return 1
    for i in range(len(xs)):
        if ex[i] == _EXP:
            return 2 + i
    return 0


@njit(error_model="numpy")
def _histogram_low(keys, h, top):
    for t in range(keys.size):
        if (keys[t] >> np.uint32(16)) == top:
            h[keys[t] & np.uint32(0xFFFF)] += 1


@njit(nogil=True, cache=True, error_model="numpy")
def count_low(base, xs, o, lo, hi, tops, hist):
    """For each model, count the low 16 bits of the keys whose top bits (``key >> 16``) are ``tops[i]``, over
    ``[lo, hi)``: ``hist[i, key & 0xFFFF] += 1``."""
    B = np.empty(BLOCK, np.float32)
    keys = np.empty(BLOCK, np.uint32)
    for s in range(lo, hi, BLOCK):
        e = min(s + BLOCK, hi)
        n = e - s
        Bn, kn = B[:n], keys[:n]
        _base_block(o, base[s:e], Bn)
        for i in range(len(xs)):
            _delta_keys(o, xs[i][s:e], Bn, kn)
            _histogram_low(kn, hist[i], np.uint32(tops[i]))


@njit(nogil=True, cache=True, error_model="numpy")
def nth(base, x, o, lo, hi, cut, t):
    """The index of the ``t``-th (from 0) element of ``[lo, hi)`` whose key is ``cut``, or -1."""
    B = np.empty(BLOCK, np.float32)
    keys = np.empty(BLOCK, np.uint32)
    c = np.uint32(cut)
    for s in range(lo, hi, BLOCK):
        e = min(s + BLOCK, hi)
        n = e - s
        _base_block(o, base[s:e], B[:n])
        _delta_keys(o, x[s:e], B[:n], keys[:n])
        seen = 0
        for u in range(n):
            seen += keys[u] == c
        if seen <= t:
            t -= seen
            continue
        for u in range(n):
            if keys[u] == c:
                if t == 0:
                    return s + u
                t -= 1
    return -1


# The steps of :func:`ties`, one loop each over a block. They are separate functions because the compiler
# vectorizes each of them alone but not all of them inside one function (measured: 4x slower).

@njit(error_model="numpy")
def _delta_block(o, xb, B, d, thr):
    """The task vector ``xb - B`` where its key is at least ``thr``, else 0."""
    emax = np.uint32(0)
    for t in range(xb.size):
        v = _in(o, xb, t)
        emax = max(emax, _exp(v))
        x = _rnd(o, v - B[t])
        d[t] = x if _key(o, x) >= thr else np.float32(0.0)
    return emax


@njit(error_model="numpy")
def _ties_at_cut(o, xb, B, d, cut, first):
    """Put back the entries at the cut from block index ``first`` on."""
    for t in range(first, xb.size):
        x = _rnd(o, _in(o, xb, t) - B[t])
        if _key(o, x) == cut:
            d[t] = x


@njit(error_model="numpy")
def _weigh(o, d, w):
    for t in range(d.size):
        d[t] = _rnd(o, d[t] * w)


@njit(error_model="numpy")
def _copy(src, dst):
    for t in range(src.size):
        dst[t] = src[t]


@njit(error_model="numpy")
def _add(src, dst):
    for t in range(src.size):
        dst[t] = dst[t] + src[t]


@njit(error_model="numpy")
def _signs(S):
    for t in range(S.size):
        S[t] = np.float32(-1.0) if _bits(S[t]) >> np.uint32(31) else np.float32(1.0)


@njit(error_model="numpy")
def _agree_first(d, S, K, W, e):
    for t in range(d.size):
        k = d[t] * S[t]
        k = k if k >= 0 else np.float32(0.0)
        K[t] = k
        W[t] = e if k > 0 else np.float32(0.0)


@njit(error_model="numpy")
def _agree(d, S, K, W, e):
    for t in range(d.size):
        k = d[t] * S[t]
        k = k if k >= 0 else np.float32(0.0)
        K[t] = K[t] + k
        W[t] = W[t] + (e if k > 0 else np.float32(0.0))


@njit(error_model="numpy")
def _mix(o, K, S):
    for t in range(K.size):
        K[t] = _rnd(o, K[t] * S[t])


@njit(error_model="numpy")
def _divide_positive(o, K, W):
    for t in range(K.size):
        div = _rnd(o, W[t])
        K[t] = _rnd(o, K[t] / (div if div >= _TINY else _TINY))


@njit(error_model="numpy")
def _divide(o, K, W):
    for t in range(K.size):
        div = _rnd(o, W[t])
        K[t] = _rnd(o, K[t] / (div if div != 0 else np.float32(1.0)))


@njit(error_model="numpy")
def _scale(o, K, lam):
    for t in range(K.size):
        K[t] = _rnd(o, K[t] * lam)


@njit(error_model="numpy")
def _out_block(ob, B, K):
    for t in range(ob.size):
        _store(ob, t, B[t] + K[t])


@njit(nogil=True, cache=True, error_model="numpy")
def ties(base, xs, out, lo, hi, cuts, starts, ws, unit, normalize, positive, lam, scale):
    """TIES over elements ``[lo, hi)`` into ``out[0 : hi - lo]``: per model keep keys above ``cuts[i]`` and
    those equal to it from index ``starts[i]`` on, weigh, elect the sign of the sum, mix the agreeing entries,
    divide by their weight (``normalize``), times ``lam`` (``scale``), plus the base."""
    m = len(xs)
    B = np.empty(BLOCK, np.float32)
    D = np.empty(m * BLOCK, np.float32)  # one block per model (1-D: a row of a 2-D array does not vectorize)
    S = np.empty(BLOCK, np.float32)
    K = np.empty(BLOCK, np.float32)
    W = np.empty(BLOCK, np.float32)
    emax = np.uint32(0)
    for s in range(lo, hi, BLOCK):
        e = min(s + BLOCK, hi)
        n = e - s
        Bn, Sn, Kn, Wn = B[:n], S[:n], K[:n], W[:n]
        emax = max(emax, _base_block(out, base[s:e], Bn))
        # each model's task vector, masked to its kept magnitudes and weighted; their sum, in order
        for i in range(m):
            xb = xs[i][s:e]
            d = D[i * BLOCK:i * BLOCK + n]
            # kept: keys from thr up (the entries at the cut are kept from index starts[i] on: in a block that
            # starts there or later thr is the cut, in one that ends before it the next key)
            first = starts[i] - s
            emax = max(emax, _delta_block(out, xb, Bn, d, np.uint32(cuts[i] if first <= 0 else cuts[i] + 1)))
            if 0 < first < n:
                _ties_at_cut(out, xb, Bn, d, np.uint32(cuts[i]), first)
            if not unit[i]:
                _weigh(out, d, ws[i])
            if i == 0:
                _copy(d, Sn)
            else:
                _add(d, Sn)
        # the majority sign (the sign of the sum; 0 counts as +), the agreeing entries' sum and their weight
        _signs(Sn)
        for i in range(m):
            e_i = np.float32(1.0) if unit[i] else ws[i]
            if i == 0:
                _agree_first(D[:n], Sn, Kn, Wn, e_i)
            else:
                _agree(D[i * BLOCK:i * BLOCK + n], Sn, Kn, Wn, e_i)
        _mix(out, Kn, Sn)
        if normalize:
            if positive:
                _divide_positive(out, Kn, Wn)
            else:
                _divide(out, Kn, Wn)
        if scale:
            _scale(out, Kn, lam)
        _out_block(out[s - lo:e - lo], Bn, Kn)
    if emax == _EXP:
        return which_nonfinite(base, xs, out, lo, hi)
    return 0


@njit(nogil=True, cache=True, error_model="numpy")
def which_nonfinite(base, xs, o, lo, hi):
    """Which input holds NaN or Inf over ``[lo, hi)`` (0: none)."""
    for j in range(lo, hi):
        if _exp(_in(o, base, j)) == _EXP:
            return 1
    for i in range(len(xs)):
        x = xs[i]
        for j in range(lo, hi):
            if _exp(_in(o, x, j)) == _EXP:
                return 2 + i
    return 0
