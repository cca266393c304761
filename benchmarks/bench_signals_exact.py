"""Sketched pair features against ``--exact`` on every ordered pair of a micro-zoo's experts, on every task.

The claim checked: each bounded feature within ``EXACT_ABS`` of its exact value, each unbounded one within
``EXACT_REL`` relative (``simmerge_bandit.signals.features``). The sketch comes from the stored signatures (what
``feature_matrix`` and the engine use); the exact value is ``pair_features(..., exact=True)``: full distributions
at every kept position, unprojected token states, every weight. Writes benchmarks/results/signals_exact.json with
each feature's largest error and where it occurred; exits 1 when a feature misses the claim.

    python benchmarks/bench_signals_exact.py [--preset test] [--zoo DIR]   # about 10 minutes on 2 cores
    python benchmarks/bench_signals_exact.py --table                        # the page's table from the JSON
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT = HERE / "results" / "signals_exact.json"


def markdown_table(res: dict) -> str:
    """The benchmark page's summary and table from a results file."""
    b = res["bound"]
    bad = [f["name"] for f in res["features"] if not f["within"]]
    lines = [f"`{res['preset']}` zoo (seed {res['seed']}): {len(res['models'])} experts, {res['ordered_pairs']} "
             f"ordered pairs x {len(res['tasks'])} tasks = {res['cases']} cases; claim: bounded features within "
             f"{b['abs']} absolute, unbounded within {b['rel']:.0%} relative. "
             + ("**Every feature holds it.**" if not bad else f"**Missed by: {', '.join(bad)}.**"), "",
             "| feature | kind | bounded | compared | absent | largest error | where (task: a, b) | sketch / exact |",
             "|---|---|---|---|---|---|---|---|"]
    for f in res["features"]:
        if f["compared"] == 0:
            lines.append(f"| `{f['name']}` | {f['kind']} | {'yes' if f['bounded'] else 'no'} | 0 | {f['absent']} "
                         "| | | |")
            continue
        w = f["worst"]
        err = f"{f['max_abs_error']:.4f}" if f["bounded"] else f"{f['max_rel_error']:.2%} relative"
        lines.append(f"| `{f['name']}` | {f['kind']} | {'yes' if f['bounded'] else 'no'} | {f['compared']} "
                     f"| {f['absent']} | {err}{'' if f['within'] else ' **(over)**'} | {w['task']}: {w['a']}, "
                     f"{w['b']} | {w['sketch']:.4f} / {w['exact']:.4f} |")
    old = res["js_without_control_variate"]
    lines += ["", "Without the control variate (the sampled positions' mean alone, the estimator before it), "
              "the largest "
              "errors on the same cases were: " + "; ".join(
                  f"`{n}` {w['max_abs_error']:.3f} ({w['task']}: {w['a']}, {w['b']}: {w['sketch']:.3f} / "
                  f"{w['exact']:.3f})" for n, w in old.items()) + "."]
    m = res["machine"]
    lines += ["", f"{res['seconds']:.0f} s on {m['cpus']} CPU cores (torch {m['torch']})."]
    return "\n".join(lines)


def _js_without_control_variate(store, experts: list[str], tasks: list[str], cases: list) -> dict:
    """The Jensen-Shannon features as the estimator gave them before its control variate (the sampled positions'
    mean alone), against the same exact values: what the correction is worth."""
    import numpy as np

    from simmerge_bandit import signals
    from simmerge_bandit.signals import features

    exact = {(t, a, b): e for t, a, b, _, e in cases}
    names = ("js_mean", "js_base_a_mean", "js_base_b_mean")
    worst = {n: {"max_abs_error": 0.0} for n in names}
    saved = features.kl_to_js
    features.kl_to_js = np.zeros_like            # no correction
    features.clear_stacks()
    try:
        pairs = [(a, b) for a in experts for b in experts if a != b]
        for task in tasks:
            X, cols = signals.feature_matrix(store, pairs, task)
            for (a, b), row in zip(pairs, X):
                for n in names:
                    v, e = row[cols.index(n)], exact[(task, a, b)].get(n)
                    if e is not None and np.isfinite(v) and abs(v - e) > worst[n]["max_abs_error"]:
                        worst[n] = {"max_abs_error": float(abs(v - e)), "task": task, "a": a, "b": b,
                                    "sketch": float(v), "exact": e}
    finally:
        features.kl_to_js = saved
        features.clear_stacks()
    return worst


def run(preset: str, zoo_dir: Path | None, seed: int) -> dict:
    import torch

    from simmerge_bandit import signals
    from simmerge_bandit.demo import cache_dir
    from simmerge_bandit.signals.features import EXACT_ABS, EXACT_REL, within_exact
    from simmerge_bandit.signals.schema import FEATURES
    from simmerge_bandit.store import Store
    from simmerge_bandit.zoo import build_zoo, register_zoo

    zoo_dir = zoo_dir or cache_dir() / f"zoo-{preset}-seed{seed}"
    manifest = build_zoo(zoo_dir, preset, seed)          # cached after the first build
    experts = [m["name"] for m in manifest["models"] if m.get("base")]
    tasks = [t["name"] for t in manifest["tasks"]]
    t0 = time.perf_counter()
    cases = []
    with tempfile.TemporaryDirectory() as home, Store.open(home) as store:
        register_zoo(store, zoo_dir)
        for task in tasks:
            signals.ensure_signatures(store, experts, task)
            for a, b in itertools.permutations(experts, 2):
                sk = signals.pair_features(store, a, b, task)
                ex = signals.pair_features(store, a, b, task, exact=True)
                cases.append((task, a, b, sk.values, ex.values))
            print(f"{task}: {len(cases)} cases, {time.perf_counter() - t0:.0f} s", flush=True)
        without_cv = _js_without_control_variate(store, experts, tasks, cases)
    feats = []
    for spec in FEATURES:
        bounded = spec.bounds is not None
        rows = [(t, a, b, s[spec.name], e[spec.name]) for t, a, b, s, e in cases
                if spec.name in s and spec.name in e]
        f = {"name": spec.name, "kind": spec.kind, "bounded": bounded, "compared": len(rows),
             "absent": len(cases) - len(rows), "within": all(within_exact(bounded, s, e) for *_, s, e in rows)}
        if rows:
            def err(r):
                return abs(r[3] - r[4]) if bounded else abs(r[3] - r[4]) / max(abs(r[4]), 1e-12)

            t, a, b, s, e = max(rows, key=err)
            f.update(max_abs_error=max(abs(r[3] - r[4]) for r in rows),
                     max_rel_error=max(abs(r[3] - r[4]) / max(abs(r[4]), 1e-12) for r in rows),
                     worst={"task": t, "a": a, "b": b, "sketch": s, "exact": e})
        feats.append(f)
    return {"benchmark": "signals_exact", "preset": preset, "js_without_control_variate": without_cv, "seed": seed,
            "zoo_key": manifest.get("key"),
            "models": experts, "tasks": tasks, "ordered_pairs": len(experts) * (len(experts) - 1),
            "cases": len(cases), "bound": {"abs": EXACT_ABS, "rel": EXACT_REL}, "features": feats,
            "all_within": all(f["within"] for f in feats), "seconds": time.perf_counter() - t0,
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
                        "load_avg_end": [round(x, 2) for x in os.getloadavg()]}}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="test", choices=["unit", "test", "bench"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--zoo", type=Path, default=None, help="zoo directory (default: the demo's cache)")
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--table", action="store_true", help="print the page's table from --out and exit")
    args = ap.parse_args(argv)
    if args.table:
        print(markdown_table(json.loads(args.out.read_text())))
        return 0
    res = run(args.preset, args.zoo, args.seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=1) + "\n")
    print(markdown_table(res))
    return 0 if res["all_within"] else 1


if __name__ == "__main__":
    sys.exit(main())
