"""Signatures per model, features per pair: the functions the engine and the CLI call."""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import IncompatibleModels, InvalidInput
from ..threads import torch_threads
from . import cache, exact, features, functional, structural
from .cache import Signature
from .schema import (FEATURE_NAMES, FEATURE_SCHEMA_VERSION, FEATURES_BY_KIND, SHIFT_SOURCES, SignatureConfig,
                     features_version)

DEFAULT_CONFIG = SignatureConfig()

#: (path, file stats) -> fingerprint already checked against the disk in this process.
_VERIFIED: dict[tuple, str] = {}


@dataclass
class PairFeatures:
    """The features of one ordered pair: ``values`` for those computed, ``absent`` (name -> reason) for the rest.

    Every schema feature is in exactly one of the two.
    """

    values: dict[str, float]
    absent: dict[str, str]
    mode: str = "sketch"
    meta: dict = field(default_factory=dict)

    def vector(self) -> np.ndarray:
        """The values in schema order, NaN where absent."""
        return exact.as_vector(self.values)

    def to_json(self) -> dict:
        """What ``simmerge features --json`` prints: features and absence reasons in schema order, and the pair."""
        return {"features": {n: self.values[n] for n in FEATURE_NAMES if n in self.values},
                "absent": {n: self.absent[n] for n in FEATURE_NAMES if n in self.absent},
                "schema_version": FEATURE_SCHEMA_VERSION, "mode": self.mode, **self.meta}


# ---------------------------------------------------------------------------------------------------------------
# task context and staleness


@dataclass(frozen=True)
class _TaskProbes:
    task: str
    probe_set: str
    prompts: list[str]
    hash: str


def _probes(catalog, task_name: str) -> _TaskProbes:
    task = catalog.task(task_name)
    name = task["probe_set"]
    prompts = catalog.probe_prompts(name)
    if not prompts:
        raise InvalidInput(f"probe set {name!r} of task {task_name!r} has no prompts; functional signatures need "
                           f"at least one")
    # keyed by the content actually read, not the hash recorded at add time, so an edited file is never stale
    h = hashlib.blake2b(json.dumps(prompts).encode(), digest_size=16).hexdigest()
    return _TaskProbes(task_name, name, prompts, h)


def _file_stats(path: str | Path) -> tuple:
    p = Path(path)
    files = sorted(list(p.glob("*.safetensors")) + list(p.glob("*.index.json")))
    return tuple((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files)


def _stored_stats(store, fingerprints: list[str]) -> tuple[set, dict[str, set]]:
    """Keys of the stored signatures of these fingerprints, and the file stats each was computed from."""
    keys, stats = set(), {}
    for fp, part, ctx, ver, meta in store.fetchall(
            "SELECT fingerprint, part, context, version, meta FROM signatures WHERE list_contains(?, fingerprint)",
            [fingerprints]):
        keys.add((fp, part, ctx, ver))
        files = json.loads(meta).get("files")
        if files:
            stats.setdefault(fp, set()).add(tuple(tuple(f) for f in files))
    return keys, stats


def _current(catalog, row: dict, stored: dict[str, set]) -> dict:
    """The model's catalog row, refreshed first when its files changed on disk since it was fingerprinted.

    Files whose size and mtime match those a stored signature was computed from are trusted; otherwise the
    fingerprint is recomputed from the files (a few MB read) and compared with the catalog's.
    """
    from ..checkpoint import read_checkpoint

    stats = _file_stats(row["path"])
    if stats in stored.get(row["fingerprint"], ()):
        return row
    key = (row["path"], stats)
    fp = _VERIFIED.get(key)
    if fp is None:
        fp = read_checkpoint(row["path"]).fingerprint()
        _VERIFIED[key] = fp
    if fp != row["fingerprint"]:
        row = {**row, **catalog.refresh_model(row["name"])}
    return row


def _keys(row: dict, base: dict | None, probes: _TaskProbes | None, config: SignatureConfig):
    fkey = (row["fingerprint"], "functional", probes.hash if probes else "", config.version("functional"))
    skey = (row["fingerprint"], "structural", base["fingerprint"] if base else "", config.version("structural"))
    return fkey, skey


# ---------------------------------------------------------------------------------------------------------------
# signatures


def ensure_signatures(store, model_names: Sequence[str], task_name: str | Sequence[str], progress: bool = False, *,
                      config: SignatureConfig | None = None, device: str | None = None,
                      threads: int | None = None) -> int:
    """Compute and cache the signatures of ``model_names`` for a task (or several) that are missing or stale.

    A model whose weights changed on disk is re-fingerprinted in the catalog first; signatures are keyed by the
    model fingerprint, the probe set's content hash (functional part) or the base's fingerprint (structural part),
    and the signature version, so nothing stale is ever served. Models are processed one at a time (at most one in
    memory), each loaded once for all the probe sets it needs. ``threads`` sets torch's CPU threads meanwhile.
    Returns how many models were loaded.

    >>> ensure_signatures(store, ["copy", "upper"], "copy")        # doctest: +SKIP
    2
    """
    from tqdm.auto import tqdm

    from ..catalog import Catalog

    config = config or DEFAULT_CONFIG
    cat = Catalog(store)
    tasks = [task_name] if isinstance(task_name, str) else list(task_name)
    probe_sets = list({p.hash: p for p in (_probes(cat, t) for t in tasks)}.values())
    all_rows = _model_rows(store)
    names = list(dict.fromkeys(model_names))
    for n in names:
        if n not in all_rows:
            cat.model(n)                       # raises NotFound with the catalog's message
    wanted = list(dict.fromkeys(x for n in names for x in (n, all_rows[n]["base"]) if x))
    stored_keys, stored_files = _stored_stats(store, [all_rows[n]["fingerprint"] for n in wanted])
    rows = {n: _current(cat, all_rows[n], stored_files) for n in wanted}
    if any(rows[n]["fingerprint"] != all_rows[n]["fingerprint"] for n in wanted):
        stored_keys, _ = _stored_stats(store, [rows[n]["fingerprint"] for n in wanted])
    todo, seen = [], set(stored_keys)
    for name in names:
        row = rows[name]
        base = rows[row["base"]] if row["base"] else None
        need_f = []
        for probes in probe_sets:
            fkey, skey = _keys(row, base, probes, config)
            if fkey not in seen:
                need_f.append((probes, fkey))
                seen.add(fkey)
        skey = None if skey in seen else skey
        seen.add(skey)
        if need_f or skey:
            todo.append((row, base, need_f, skey))
    loads = 0
    desc = f"signatures for {tasks[0]}" if len(tasks) == 1 else f"signatures for {len(tasks)} tasks"
    bar = tqdm(total=len(todo), desc=desc, unit="model", disable=not progress or not todo)
    try:
        with torch_threads(threads):
            for row, base, need_f, skey in todo:
                bar.set_postfix_str(row["name"])
                if need_f:
                    loads += _compute_functional(store, row, need_f, config, device)
                if skey is not None:
                    _compute_structural(store, row, base, skey, config, device)
                bar.update(1)
    finally:
        bar.close()
    return loads


def _compute_functional(store, row: dict, need: list, config: SignatureConfig, device: str | None) -> int:
    t0 = time.perf_counter()
    files = [list(f) for f in _file_stats(row["path"])]
    sigs = [Signature("functional", fkey[0], fkey[2], fkey[3], row["name"],
                      meta={"probe_set": p.probe_set, "files": files}) for p, fkey in need]
    counted: list[int] = []
    if not functional.has_tokenizer(row["path"]):
        for sig in sigs:
            sig.status, sig.reason = "absent", f"model {row['name']!r} has no tokenizer"
    else:
        results = functional.compute_many(
            row["path"], [(f"probe set {p.probe_set!r}", p.prompts) for p, _ in need], config,
            model_name=row["name"], device=device, on_load=lambda: counted.append(1))
        for sig, (meta, arrays, _) in zip(sigs, results):
            sig.meta.update(meta)
            sig.arrays = arrays
    for sig in sigs:
        sig.seconds = (time.perf_counter() - t0) / len(sigs)
        cache.save_signature(store, sig)
    return len(counted)


def _compute_structural(store, row: dict, base: dict | None, skey: tuple, config: SignatureConfig,
                        device: str | None) -> None:
    from ..checkpoint import check_compatible, read_checkpoint

    t0 = time.perf_counter()
    sig = Signature("structural", skey[0], skey[2], skey[3], row["name"])
    if base is None:
        sig.status, sig.reason = "absent", f"model {row['name']!r} has no base, so no task vector"
    else:
        ck, ck0 = read_checkpoint(row["path"]), read_checkpoint(base["path"])
        try:
            check_compatible(ck0.shapes(), ck.shapes(), base["name"], row["name"])
        except IncompatibleModels as e:
            sig.status, sig.reason = "absent", f"task vector of {row['name']!r} undefined: {e}"
        else:
            sig.meta, sig.arrays = structural.compute(ck, ck0, config, device=functional.pick_device(device))
            sig.meta["base"] = base["name"]
    sig.meta["files"] = [list(f) for f in _file_stats(row["path"])]
    sig.seconds = time.perf_counter() - t0
    cache.save_signature(store, sig)


# ---------------------------------------------------------------------------------------------------------------
# features


def _model_rows(store) -> dict[str, dict]:
    """name -> {name, fingerprint, base, path} for every catalog model (one query, no JSON parsing)."""
    return {r[0]: {"name": r[0], "fingerprint": r[1], "base": r[2], "path": r[3]}
            for r in store.fetchall("SELECT name, fingerprint, base, path FROM models")}


def _load_pair_sigs(store, names: Sequence[str], task_name: str, config: SignatureConfig, rows: dict | None = None):
    """(functional, structural) signatures of ``names``, computing any that are missing."""
    from ..catalog import Catalog
    from ..errors import NotFound

    rows = rows or _model_rows(store)
    for n in names:
        if n not in rows:
            raise NotFound(f"no model named {n!r}")
    probes = _probes(Catalog(store), task_name)

    def lookup(which):
        keys = {n: _keys(rows[n], rows.get(rows[n]["base"]) if rows[n]["base"] else None, probes, config)
                for n in which}
        got = cache.load_signatures(store, [k for pair in keys.values() for k in pair])
        return {n: (got.get(f), got.get(s)) for n, (f, s) in keys.items()}

    sigs = lookup(names)
    missing = [n for n, (f, s) in sigs.items() if f is None or s is None]
    if missing:
        ensure_signatures(store, missing, task_name, config=config)
        rows = _model_rows(store)
        sigs.update(lookup(missing))
    fs = {n: f for n, (f, _) in sigs.items()}
    ss = {n: s for n, (_, s) in sigs.items()}
    return fs, ss, probes, rows


def feature_matrix(store, pairs: Sequence[tuple[str, str]], task_name: str, *,
                   config: SignatureConfig | None = None) -> tuple[np.ndarray, list[str]]:
    """Features of many ordered pairs at once: (array [n_pairs, n_features], feature names), NaN where absent.

    Signatures come from an in-process memo keyed by (fingerprint, probe hash, version), so repeated calls do not
    re-read the store; missing ones are computed first. The catalog's fingerprints are trusted here (no file is
    looked at): call :func:`ensure_signatures` first to pick up weights changed on disk, as the engine does.
    Row i equals ``pair_features(store, *pairs[i], task_name)``.
    """
    config = config or DEFAULT_CONFIG
    pairs = list(pairs)
    if not pairs:
        return np.zeros((0, len(FEATURE_NAMES))), list(FEATURE_NAMES)
    names = list(dict.fromkeys(n for p in pairs for n in p))
    rows = _model_rows(store)
    bases = [b for b in dict.fromkeys(rows[n]["base"] for n in names if n in rows) if b and b not in names]
    fs, ss, _, _ = _load_pair_sigs(store, names + bases, task_name, config, rows)
    # one slot per distinct (functional, structural) signature pair, so duplicates share stacks
    slot_of: dict[tuple, int] = {}
    name_slot = {}
    f_slots, s_slots = [], []
    for n in names + bases:
        key = (fs[n].key if fs[n] else None, ss[n].key if ss[n] else None)
        if key not in slot_of:
            slot_of[key] = len(f_slots)
            f_slots.append(fs[n])
            s_slots.append(ss[n])
        name_slot[n] = slot_of[key]
    base_slot = np.full(len(f_slots), -1, dtype=np.int64)
    for n in names:
        if rows[n]["base"]:
            base_slot[name_slot[n]] = name_slot[rows[n]["base"]]
    ia = np.fromiter((name_slot[a] for a, _ in pairs), dtype=np.int64, count=len(pairs))
    ib = np.fromiter((name_slot[b] for _, b in pairs), dtype=np.int64, count=len(pairs))
    return features.compute_matrix(f_slots, s_slots, ia, ib, base_slot), list(FEATURE_NAMES)


def features_against(store, checkpoint: str | Path, base: str, others: Sequence[str], task_name: str, *,
                     label: str | None = None, config: SignatureConfig | None = None,
                     device: str | None = None) -> np.ndarray:
    """Features (len(others), n_features) of the ordered pairs (checkpoint, other) for a checkpoint that is not in
    the catalog (an intermediate merge of a chain), fine-tuned from catalog model ``base``.

    The checkpoint gets a signature like any model (one forward pass over the task's probes and one streaming
    pass over its weights), stored under its fingerprint, so asking again costs nothing.
    """
    from ..catalog import Catalog
    from ..checkpoint import read_checkpoint

    config = config or DEFAULT_CONFIG
    others = list(others)
    rows = _model_rows(store)
    if base not in rows:
        raise InvalidInput(f"no model named {base!r} to use as the base")
    path = Path(checkpoint)
    stats = _file_stats(path)
    fp = _VERIFIED.get((str(path), stats))
    if fp is None:
        fp = _VERIFIED[(str(path), stats)] = read_checkpoint(path).fingerprint()
    row = {"name": label or path.name, "fingerprint": fp, "base": base, "path": str(path)}
    probes = _probes(Catalog(store), task_name)
    fkey, skey = _keys(row, rows[base], probes, config)
    got = cache.load_signatures(store, [fkey, skey])
    if fkey not in got:
        _compute_functional(store, row, [(probes, fkey)], config, device)
    if skey not in got:
        _compute_structural(store, row, rows[base], skey, config, device)
    got = cache.load_signatures(store, [fkey, skey])
    names = list(dict.fromkeys([*others, base]))
    fs, ss, _, rows = _load_pair_sigs(store, names, task_name, config, rows)
    slots_f = [got.get(fkey)] + [fs[n] for n in names]
    slots_s = [got.get(skey)] + [ss[n] for n in names]
    at = {n: i + 1 for i, n in enumerate(names)}
    base_slot = [at[base]] + [at.get(rows[n]["base"], -1) if rows[n]["base"] else -1 for n in names]
    ib = np.array([at[n] for n in others], dtype=np.int64)
    return features.compute_matrix(slots_f, slots_s, np.zeros(len(others), dtype=np.int64), ib, base_slot)


def absence_reasons(a: str, b: str, fa: Signature | None, fb: Signature | None, sa: Signature | None,
                    sb: Signature | None, rows: dict, base_f: dict | None = None) -> dict[str, str]:
    """Why each family of features cannot be computed for (a, b), by feature name (empty when all can).

    ``base_f`` maps each model's base to its functional signature on the task's probes (for the shift family).
    """
    reasons: dict[str, str] = {}

    def put(kind_names, why):
        for n in kind_names:
            reasons.setdefault(n, why)

    for side, name, f in (("a", a, fa), ("b", b, fb)):
        shift = [n.format(side) for n, _, _ in SHIFT_SOURCES]
        base = rows[name]["base"]
        fbase = (base_f or {}).get(base)
        if not base:
            put(shift, f"model {name!r} has no base to measure its shift from")
        elif f is not None and not f.ok:
            put(shift, f.reason)
        elif fbase is None or not fbase.ok:
            put(shift, fbase.reason if fbase is not None else f"no signature of {base!r} on these probes")
        elif f is not None and features.dist_key(f) != features.dist_key(fbase):
            put(shift, f"{name!r} and its base {base!r} have different vocabularies, tokenizations or "
                       f"next-token summaries, so their distributions do not align")

    dist, act, tv = FEATURES_BY_KIND["distribution"], FEATURES_BY_KIND["activation"], FEATURES_BY_KIND["task_vector"]
    for name, f in ((a, fa), (b, fb)):
        if f is not None and not f.ok:
            put(dist + act, f.reason)
    if fa is not None and fb is not None and fa.ok and fb.ok:
        ma, mb = fa.meta, fb.meta
        if ma["vocab_hash"] != mb["vocab_hash"]:
            put(dist + act, f"{a!r} and {b!r} have different vocabularies ({ma['vocab_size']} vs "
                            f"{mb['vocab_size']} tokens), so their distributions and token positions do not align")
        elif ma["ids_hash"] != mb["ids_hash"]:
            put(dist + act, f"{a!r} and {b!r} tokenize the probe prompts differently, so positions do not align")
        if features.dist_key(fa) != features.dist_key(fb):
            put(dist, f"{a!r} and {b!r} keep different next-token summaries ({ma['representation']} "
                      f"k={ma['k']} vs {mb['representation']} k={mb['k']})")
        if features.cka_key(fa) != features.cka_key(fb):
            put(act, f"{a!r} and {b!r} have different numbers of sampled layers ({len(ma['layers'])} vs "
                     f"{len(mb['layers'])})")
        if ma["hidden_size"] != mb["hidden_size"]:
            put(("cos_act_mean", "cos_act_min", "cos_act_last"),
                f"hidden sizes differ ({ma['hidden_size']} vs {mb['hidden_size']}), so token states cannot be "
                f"compared coordinate by coordinate (CKA still can)")
    ra, rb = rows[a], rows[b]
    for name, row in ((a, ra), (b, rb)):
        if not row["base"]:
            put(tv, f"model {name!r} has no base, so it has no task vector")
    if ra["base"] and rb["base"] and ra["base"] != rb["base"]:
        put(tv, f"{a!r} and {b!r} are fine-tuned from different bases ({ra['base']!r} vs {rb['base']!r})")
    for s in (sa, sb):
        if s is not None and not s.ok:
            put(tv, s.reason)
    if sa is not None and sb is not None and sa.ok and sb.ok:
        if sa.meta["tv_sq_norm"] == 0 or sb.meta["tv_sq_norm"] == 0:
            which = a if sa.meta["tv_sq_norm"] == 0 else b
            put(("cos_tv_global", "cos_tv_layer_mean", "cos_tv_layer_min", "agree_sign_tv", "overlap_top20_tv",
                 "norm_ratio_tv"), f"model {which!r} equals its base (zero task vector)")
        if not sa.meta["layer_groups"]:
            put(("cos_tv_layer_mean", "cos_tv_layer_min"), "no transformer layers recognized in the tensor names")
    return reasons


def pair_features(store, a: str, b: str, task_name: str, exact: bool = False, *,
                  config: SignatureConfig | None = None, device: str | None = None) -> PairFeatures:
    """The features of the ordered pair (a, b) for a task, cached in the store.

    ``exact=False`` estimates them from the two stored signatures (the same numbers :func:`feature_matrix` gives);
    ``exact=True`` recomputes them from full distributions, full token states and full tensors (two forward passes
    and a streaming pass over both models and their base).

    >>> pf = pair_features(store, "copy", "upper", "copy")          # doctest: +SKIP
    >>> pf.values["cos_tv_global"], pf.absent                       # doctest: +SKIP
    (0.12, {})
    """
    config = config or DEFAULT_CONFIG
    # cheap when cached (file stats and one query), and it catches weights changed on disk since the last call
    ensure_signatures(store, [a, b], task_name, config=config, device=device)
    rows = _model_rows(store)
    bases = [x for x in dict.fromkeys(rows[n]["base"] for n in (a, b) if n in rows) if x and x not in (a, b)]
    fs, ss, probes, rows = _load_pair_sigs(store, [a, b, *bases], task_name, config, rows)
    ra, rb = rows[a], rows[b]
    bfp = {n: (rows[rows[n]["base"]]["fingerprint"] if rows[n]["base"] else "") for n in (a, b)}
    mode = "exact" if exact else "sketch"
    fkey = (ra["fingerprint"], rb["fingerprint"], f"{probes.hash}|{bfp[a]}|{bfp[b]}", features_version(config), mode)
    meta = {"a": a, "b": b, "task": task_name}
    hit = cache.load_features(store, fkey)
    if hit is not None:
        return PairFeatures(hit[0], hit[1], mode, meta)
    base_f = {x: fs[x] for n in (a, b) if (x := rows[n]["base"])}
    reasons = absence_reasons(a, b, fs[a], fs[b], ss[a], ss[b], rows, base_f)
    if exact:
        values = _exact_values(a, b, fs, ss, probes, rows, config, device, reasons)
    else:
        slots = [a, b, *bases]
        base_slot = [slots.index(rows[n]["base"]) if rows[n]["base"] else -1 for n in slots]
        vec = features.compute_matrix([fs[n] for n in slots], [ss[n] for n in slots], np.array([0]),
                                      np.array([1]), base_slot)[0]
        values = {n: float(vec[i]) for i, n in enumerate(FEATURE_NAMES) if math.isfinite(vec[i])}
    values = {n: v for n, v in values.items() if n not in reasons and math.isfinite(v)}
    absent = {n: reasons.get(n, "not finite: degenerate signature (constant states or zero variance)")
              for n in FEATURE_NAMES if n not in values}
    cache.save_features(store, fkey, a, b, task_name, values, absent)
    return PairFeatures(values, absent, mode, meta)


def _exact_values(a, b, fs, ss, probes, rows, config, device, reasons) -> dict[str, float]:
    from ..checkpoint import read_checkpoint

    values: dict[str, float] = {}
    raws: dict[str, tuple] = {}

    def raw(n):
        if n not in raws:
            _, arrays, r = functional.compute(rows[n]["path"], probes.prompts, config, model_name=n,
                                              device=device, keep_raw=True)
            raws[n] = (r, arrays)
        return raws[n]

    fam = FEATURES_BY_KIND["distribution"] + FEATURES_BY_KIND["activation"]
    if not all(n in reasons for n in fam):
        (raw_a, arr_a), (raw_b, arr_b) = raw(a), raw(b)
        values.update(exact.functional_values(raw_a, raw_b, arr_a, arr_b))
    for side, n in (("a", a), ("b", b)):
        names = [name.format(side) for name, _, _ in SHIFT_SOURCES]
        if not all(x in reasons for x in names):
            (raw_base, arr_base), (raw_n, arr_n) = raw(rows[n]["base"]), raw(n)
            pair = exact.functional_values(raw_base, raw_n, arr_base, arr_n)
            values.update({name: sign * pair[src] for name, (_, src, sign) in zip(names, SHIFT_SOURCES)
                           if src in pair})
    if not all(n in reasons for n in FEATURES_BY_KIND["task_vector"]):
        base = rows[rows[a]["base"]]
        values.update(exact.structural_values(read_checkpoint(rows[a]["path"]), read_checkpoint(rows[b]["path"]),
                                              read_checkpoint(base["path"]), config,
                                              device=functional.pick_device(device)))
    return values


def list_signatures(store) -> list[dict]:
    """Every stored signature (model, part, keys, status, reason, seconds, computed_at)."""
    return cache.list_signatures(store)

