"""Which expert recipes make operator choice matter: variants of the realistic zoo, each scored on 2-way merges.

The realistic zoo's operator-choice gap on its target objective is small (0.012-0.016 noise-corrected with 800
eval examples, `probe_eval_examples.py`): every expert there is a full fine-tune of one base at one learning
rate, so the best operator for a pair differs from the best fixed one only in how far slerp leans, and the
catalog's metadata (which source is stronger) already says that. This probe builds variants that keep the
realistic base (same recipe, tasks and seed) and change only the experts, one lever at a time, and reports for
each the statistics of :func:`simmerge_bandit.zoo.table_stats` on the target objective (2-way merges, the
realistic operator set):

- ``fast``: one expert per task and a second at twice the learning rate for half the steps (same skills,
  another path);
- ``hot``: the second expert at four times the rate for a quarter of the steps (larger, more forgetful task
  vectors);
- ``hot-replay``: ``hot`` with 70% of the hot experts' batches replayed (less forgetting);
- ``norms``: long (1,500 steps) and short (250 steps) experts of each task: task vectors of different sizes;
- ``modules``: full fine-tunes, attention-only and MLP-only fine-tunes of each task (``Recipe.train_only``): two
  experts that changed disjoint parameters add without interfering, two that changed the same ones interfere,
  and no tag or known score says which;
- ``lineage``: half the experts fine-tuned from the base, half from a continued pretraining of it (``base-cpt``,
  600 more steps of the base's mixture, an intermediate checkpoint and not an expert): merges across the two
  lines carry the continued pretraining's delta once, merges within the second line twice (task arithmetic
  measures task vectors from the zoo's base), and no tag or known score says which line a model is on.

Each variant is built in ``--work/v-<name>-seed<N>`` (the zoo built before it in the same run, or a realistic zoo
of the same seed in ``--base-from``, lends its trained base: the build keeps it when its cache key says it is the
same model), its 2-way table is built with ``--jobs`` processes (kept there as ``table_2way.parquet``), and
its figures are merged into ``results/zoo_variants.json`` under ``<name>/seed<N>``.

    python benchmarks/probe_zoo_variants.py --variant fast --variant modules --seed 0 --work /work/zoos
    python benchmarks/probe_zoo_variants.py --table          # the table docs/zoo.md shows
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "zoo_variants.json"

SKILLS = ("copy", "shift", "dsum")
PAIRS = (("copy", "shift"), ("shift", "dsum"), ("copy", "dsum"))
REPLAY = 0.4
#: operators whose means the table shows on pairs of experts that trained disjoint parameters
DISJOINT_SHOWN = ("linear", "task_arithmetic_l0.7", "task_arithmetic_l1.0", "ties_d0.8", "slerp_t0.5")


def _experts(*groups) -> Callable:
    """A variant: the realistic preset's base followed by the recipes the groups give."""
    from simmerge_bandit.zoo import get_preset

    def make(name: str):
        p = get_preset("realistic")
        recipes = [p.recipes[0]] + [r for g in groups for r in g()]
        return replace(p, name=f"realistic-{name}", recipes=tuple(recipes))
    return make


def _single(suffix: str, steps: int, lr: float, seed: int, parent: str = "base", replay: float = REPLAY,
            **kw) -> Callable:
    from simmerge_bandit.zoo import Recipe

    return lambda: [Recipe(f"{t}{suffix}", (t,), parent, steps, lr, seed=seed, replay=replay, **kw) for t in SKILLS]


def _two_task(steps: int = 800, lr: float = 5e-4, pairs=PAIRS, suffix: str = "", seed: int = 5,
              parent: str = "base", replay: float = REPLAY) -> Callable:
    from simmerge_bandit.zoo import Recipe

    return lambda: [Recipe(f"{a}+{b}{suffix}", (a, b), parent, steps, lr, seed=seed, replay=replay)
                    for a, b in pairs]


def _continued(name: str, steps: int, lr: float, seed: int) -> Callable:
    """An intermediate checkpoint: the base trained further on its own mixture, as the base was."""
    from simmerge_bandit.zoo import get_preset

    return lambda: [replace(get_preset("realistic").recipes[0], name=name, parent="base", steps=steps, lr=lr,
                            seed=seed)]


#: The variants: name -> (what changes, the preset it builds).
VARIANTS: dict[str, tuple[str, Callable]] = {
    "fast": ("experts at 600 steps, lr 5e-4 and at 300 steps, lr 1e-3; three two-task experts and a fast one",
             _experts(_single("", 600, 5e-4, 1), _single("-fast", 300, 1e-3, 3), _two_task(),
                      _two_task(400, 1e-3, (("shift", "dsum"),), "-fast", 6))),
    "hot": ("experts at 600 steps, lr 5e-4 and at 150 steps, lr 2e-3; three two-task experts and a hot one",
            _experts(_single("", 600, 5e-4, 1), _single("-fast", 150, 2e-3, 3), _two_task(),
                     _two_task(200, 2e-3, (("shift", "dsum"),), "-hot", 6))),
    "hot-replay": ("as hot, with 70% of every batch of the hot experts replayed from the base's mixture (40% for "
                   "the others)",
                   _experts(_single("", 600, 5e-4, 1), _single("-fast", 150, 2e-3, 3, replay=0.7), _two_task(),
                            _two_task(200, 2e-3, (("shift", "dsum"),), "-hot", 6, replay=0.7))),
    "norms": ("experts at 1,500 steps and at 250 steps (lr 5e-4); three two-task experts and a 2,000-step one",
              _experts(_single("", 1500, 5e-4, 1), _single("-short", 250, 5e-4, 3), _two_task(),
                       _two_task(2000, 5e-4, (("copy", "shift"),), "-long", 6))),
    "modules": ("full, attention-only and MLP-only fine-tunes of each task (600 steps; lr 5e-4 full, 1e-3 partial); "
                "one two-task expert",
                _experts(_single("", 600, 5e-4, 1), _single("-attn", 600, 1e-3, 3, train_only=("self_attn",)),
                         _single("-mlp", 600, 1e-3, 4, train_only=("mlp",)),
                         _two_task(pairs=(("shift", "dsum"),)))),
    "lineage": ("experts of each task from the base and from base-cpt (the base after 600 more pretraining steps at "
                "lr 1e-3; 600 steps, lr 5e-4); two-task experts from each line",
                _experts(_continued("base-cpt", 600, 1e-3, 7), _single("", 600, 5e-4, 1),
                         _single("-cpt", 600, 5e-4, 3, parent="base-cpt"),
                         _two_task(pairs=(("copy", "shift"), ("shift", "dsum"))),
                         _two_task(pairs=(("copy", "dsum"), ("shift", "dsum")), suffix="-cpt", parent="base-cpt"))),
}


def variant_preset(name: str):
    try:
        return VARIANTS[name][1](name).check()
    except KeyError:
        raise SystemExit(f"unknown variant {name!r}; known: {', '.join(VARIANTS)}") from None


def lend_base(src: Path, dest: Path) -> bool:
    """Copy a built zoo's base (weights and cache record) into ``dest``; the build retrains it unless its cache
    key matches (same recipe, data, seed and code)."""
    if dest.exists() or not (src / "models" / "base").is_dir():
        return False
    (dest / ".cache").mkdir(parents=True)
    shutil.copytree(src / "models" / "base", dest / "models" / "base")
    shutil.copy(src / ".cache" / "base.json", dest / ".cache" / "base.json")
    return True


def figures(df, manifest: dict) -> dict:
    from simmerge_bandit.zoo import table_stats

    st = table_stats(df, manifest, objective="target")
    two = st["two_way"]
    keep = ("n_cases", "oracle_mean", "best_fixed_operator", "best_fixed_mean", "oracle_gap", "oracle_gap_nc",
            "median_spread", "max_best_share", "max_best_share_operator", "best_rule", "best_rule_share",
            "best_share", "operator_mean_normalized")
    out = {k: two.get(k) for k in keep}
    out["expert_margin"] = {k: v for k, v in (st.get("expert_margin") or {}).items()
                            if k in ("min", "median", "off_task_max_drop")}
    out["checks"] = st.get("checks")
    return out


def disjoint_pairs(preset) -> set[tuple[str, str]]:
    """Ordered pairs of experts that trained disjoint parameters, as their recipes say: each trained only some
    parameters (``Recipe.train_only``) and the two share no name string (attention-only with MLP-only)."""
    part = {r.name: set(r.train_only) for r in preset.recipes[1:] if r.train_only}
    return {(a, b) for a in part for b in part if a != b and not part[a] & part[b]}


def operator_means_on(df, manifest: dict, pairs: set[tuple[str, str]]) -> dict | None:
    """Each operator's mean value (target objective) over the given ordered pairs, or None when there are none."""
    import numpy as np

    from simmerge_bandit.zoo import case_matrix

    if not pairs:
        return None
    m = case_matrix(df, "target", 2, manifest)
    rows = [i for i, k in enumerate(m.keys) if (k[0], k[1]) in pairs]
    V = np.asarray(m.V)[rows]
    names = [o["name"] for o in m.operators]
    return {"n_cases": len(rows), "operator_mean": {n: float(v) for n, v in zip(names, V.mean(0))}}


def run(name: str, seed: int, work: Path, base_from: Path | None, jobs: int) -> dict:
    from simmerge_bandit.zoo import build_table, build_zoo, default_operators, load_manifest

    preset = variant_preset(name)
    dest = work / f"v-{name}-seed{seed}"
    lent = lend_base(base_from, dest) if base_from else False
    t0 = time.perf_counter()
    build_zoo(dest, preset, seed, progress=False, jobs=jobs)
    build_s = time.perf_counter() - t0
    manifest = load_manifest(dest)
    t0 = time.perf_counter()
    # every ordered pair of experts (zoo.expert_names: a continued pretraining others start from is no expert)
    df = build_table(dest, operators=default_operators("realistic"), seed=seed, progress=False, jobs=jobs)
    table_s = time.perf_counter() - t0
    df.to_parquet(dest / "table_2way.parquet")
    return {"variant": name, "what": VARIANTS[name][0], "seed": seed, "zoo_key": manifest["key"],
            "models": {m["name"]: {"parent": m["parent"], "tasks": m["tasks"], "steps": m["steps"], "lr": m["lr"],
                                   "scores": m["scores"]} for m in manifest["models"]},
            "base_lent": lent, "build_s": round(build_s, 1), "table_s": round(table_s, 1),
            "operators": int(df["operator"].nunique()), "figures": figures(df, manifest),
            "disjoint_pairs": operator_means_on(df, manifest, disjoint_pairs(preset)),
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "load_after": os.getloadavg()}}


def markdown_table(res: dict) -> str:
    rows = ["| variant | seed | oracle | best fixed | gap | gap, noise-corrected | best metadata rule (share) | "
            "expert margin min / median | largest off-task drop |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for key in sorted(res["runs"], key=lambda k: (list(VARIANTS).index(res["runs"][k]["variant"])
                                                  if res["runs"][k]["variant"] in VARIANTS else 99, k)):
        r = res["runs"][key]
        f = r["figures"]
        m = f["expert_margin"]
        rows.append(f"| {r['variant']} | {r['seed']} | {f['oracle_mean']:.3f} | {f['best_fixed_mean']:.3f} "
                    f"({f['best_fixed_operator']}) | {f['oracle_gap']:.3f} | {f['oracle_gap_nc']:.3f} | "
                    f"{f['best_rule']} {f['best_rule_share']:.0%} | {m['min']:.3f} / {m['median']:.3f} | "
                    f"{m['off_task_max_drop']:.3f} |")
    for key in sorted(res["runs"]):
        r = res["runs"][key]
        d = r.get("disjoint_pairs")
        if d:
            means = d["operator_mean"]
            shown = ", ".join(f"{n} {means[n]:.3f}" for n in DISJOINT_SHOWN if n in means)
            rows += ["", f"On the {d['n_cases']} ordered pairs of `{r['variant']}` (seed {r['seed']}) whose experts "
                     f"trained disjoint parameters (attention only with MLP only), each operator's mean value: "
                     f"{shown}; best: {max(means, key=means.get)}."]
    rows += ["", "Variants: " + "; ".join(f"`{k}`: {v[0]}" for k, v in VARIANTS.items()
                                          if any(r["variant"] == k for r in res["runs"].values())) + ". "
             "2-way merges, target objective, 200 eval examples per task; goals: gap >= 0.05 (also noise-corrected), "
             "best metadata rule <= 50% of the gap, expert margin >= 0.2 / 0.4, off-task drop <= 0.1."]
    return "\n".join(rows)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variant", action="append", choices=list(VARIANTS), help="repeatable")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", default="/tmp/simmerge-variants")
    ap.add_argument("--base-from", default=None, help="a realistic zoo of the same seed whose base to lend")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("--table", action="store_true", help="print the table from --out and exit")
    args = ap.parse_args(argv)
    out = Path(args.out)
    if args.table:
        print(markdown_table(json.loads(out.read_text())))
        return
    if not args.variant:
        ap.error("--variant is required")
    res = json.loads(out.read_text()) if out.is_file() else {"probe": "zoo_variants", "runs": {}}
    lender = Path(args.base_from) if args.base_from else None
    for name in args.variant:
        r = run(name, args.seed, Path(args.work), lender, args.jobs)
        lender = Path(args.work) / f"v-{name}-seed{args.seed}"
        res["runs"][f"{name}/seed{args.seed}"] = r
        out.write_text(json.dumps(res, indent=1))
        print(json.dumps(r["figures"], indent=1), file=sys.stderr)
    print(markdown_table(res))


if __name__ == "__main__":
    main()
