"""How much of the realistic zoo's operator-choice gap is evaluation noise, as a function of eval examples per task.

The decision benchmark's noise-ceiling row (docs/decision.md) says that on the realistic zoo's target objective a
choice made without a case's own evaluations competes for about 55-62% of the best-fixed -> oracle gap measured on
200 examples per task: much of that gap is the noise of 100-example halves. This probe measures whether more eval
examples would lift that ceiling, before the testbed is changed: it copies a built zoo (the same models, linked),
rewrites the eval sets of the experts' tasks with N examples (the first 200 are the zoo's own: the same seeded
sequence, training prompts still excluded), builds the 2-way merge table on them, and reports its target-objective
statistics (:func:`simmerge_bandit.zoo.table_stats`) beside those of the same zoo at 200 examples:

- ``oracle_gap``: oracle minus best fixed operator, both measured on all examples;
- ``oracle_gap_nc``: the same with each pair's best operator (and the best fixed one) chosen on one half of the
  examples and scored on the other (noise-corrected);
- ``nc_share``: ``oracle_gap_nc / oracle_gap``, the share of the measured gap that is not noise: what a choice
  that never sees a pair's own evaluations can at best close (the goal of issue 15 asks 75% with 0 evaluations);
- ``best_rule_share``: the best metadata rule's share of the gap, fitted in-sample.

    python benchmarks/probe_eval_examples.py --zoo ZOO --examples 800     # writes results/probe_eval_examples.json
    python benchmarks/probe_eval_examples.py --table                      # the table docs/zoo.md shows
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
OUT = RESULTS / "probe_eval_examples.json"


def with_examples(zoo: Path, work: Path, n: int) -> Path:
    """A copy of ``zoo`` in ``work`` (models linked, not copied) whose experts' tasks have ``n`` eval examples."""
    from simmerge_bandit.zoo import _read_jsonl, _seed_int, _write_jsonl, load_manifest
    from simmerge_bandit.zoo_tasks import task_rows

    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    (work / "models").symlink_to((zoo / "models").resolve())
    shutil.copytree(zoo / "tasks", work / "tasks")
    manifest = json.loads((zoo / "zoo.json").read_text())
    skills = sorted({t for m in load_manifest(zoo)["models"] for t in (m.get("tasks") or [])})
    for t in manifest["tasks"]:
        if t["name"] not in skills:
            continue
        train = {r["prompt"] for r in _read_jsonl(zoo / t["train"])}
        rows = task_rows(t["name"], n, _seed_int("eval", manifest["seed"]), exclude=train)
        old = _read_jsonl(zoo / t["eval"])
        if rows[:len(old)] != old:  # pragma: no cover - the generator is sequential; a change would show here
            raise SystemExit(f"{t['name']}: the first {len(old)} examples differ from the zoo's eval set")
        _write_jsonl(work / t["eval"], rows)
        t["n_eval"] = n
    rescore(work, manifest, skills)
    (work / "zoo.json").write_text(json.dumps(manifest, indent=1))
    return work


def rescore(work: Path, manifest: dict, tasks: list[str]) -> None:
    """Every model's known scores on ``tasks``, measured again on the copy's eval sets (a merge is normalized by
    its sources' scores: they must come from the same examples as its own)."""
    from simmerge_bandit.evaluators.exact_match import exact_match_score
    from simmerge_bandit.tokenizer import char_tokenizer
    from simmerge_bandit.zoo import Arch, _fresh_model, _read_jsonl, deterministic, load_state

    evals = {t["name"]: _read_jsonl(work / t["eval"]) for t in manifest["tasks"] if t["name"] in tasks}
    tok = char_tokenizer()
    with deterministic(1):
        shell = _fresh_model(Arch(**manifest["arch"]), 0)
        shell.eval()
        for m in manifest["models"]:
            shell.load_state_dict(load_state(work / m["path"]), strict=False)
            for t, rows in evals.items():
                m["scores"][t] = exact_match_score(shell, tok, rows)[0]


def figures(df, manifest: dict) -> dict:
    from simmerge_bandit.zoo import table_stats

    two = table_stats(df, manifest, objective="target")["two_way"]
    keep = ("oracle_mean", "best_fixed_operator", "best_fixed_mean", "oracle_gap", "oracle_gap_nc",
            "median_spread", "best_rule_share")
    out = {k: two.get(k) for k in keep}
    out["nc_share"] = (two["oracle_gap_nc"] / two["oracle_gap"]) if two.get("oracle_gap") else None
    out["cases"] = two["n_cases"]
    return out


def markdown_table(res: dict) -> str:
    rows = ["| eval examples per task | oracle | best fixed | gap | gap, noise-corrected | not noise (share) | "
            "best metadata rule (share of the gap) |", "|---:|---:|---:|---:|---:|---:|---:|"]
    for r in res["runs"]:
        f = r["figures"]
        rows.append(f"| {r['examples']} | {f['oracle_mean']:.3f} | {f['best_fixed_mean']:.3f} "
                    f"({f['best_fixed_operator']}) | {f['oracle_gap']:.3f} | {f['oracle_gap_nc']:.3f} | "
                    f"{f['nc_share']:.0%} | {f['best_rule_share']:.0%} |")
    rows += ["", f"Realistic zoo seed {res['zoo']['seed']}, 2-way merges ({res['pairs']} ordered pairs x "
             f"{res['operators']} operators), target objective; the same models at every row, only the eval sets "
             f"grow (the first 200 examples are the zoo's own). {res['examples_table_s']:.0f} s for the "
             f"{max(r['examples'] for r in res['runs'])}-example table on {res['machine']['cpus']} CPUs."]
    return "\n".join(rows)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--zoo", help="a built realistic zoo")
    ap.add_argument("--table200", help="that zoo's committed merge table (default: results/"
                                       "zoo_realistic_table_seed<seed>.parquet)")
    ap.add_argument("--examples", type=int, default=800)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--work", default=None, help="where the copy is made (default: a temporary folder)")
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("--table", action="store_true", help="print the table from --out and exit")
    args = ap.parse_args(argv)
    if args.table:
        print(markdown_table(json.loads(Path(args.out).read_text())))
        return
    if not args.zoo:
        ap.error("--zoo is required")
    import tempfile

    import pandas as pd

    from simmerge_bandit.zoo import build_table, load_manifest

    zoo = Path(args.zoo)
    manifest = load_manifest(zoo)
    table200 = Path(args.table200 or RESULTS / f"zoo_realistic_table_seed{manifest['seed']}.parquet")
    df200 = pd.read_parquet(table200)
    df200 = df200[df200["model_c"].isna()]
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="simmerge-probe-")) / "zoo"
    copy = with_examples(zoo, work, args.examples)
    t = time.time()
    df = build_table(copy, n_triples=0, seed=manifest["seed"], progress=False, jobs=args.jobs)
    took = time.time() - t
    cmanifest = load_manifest(copy)
    res = {"probe": "eval_examples", "zoo": {"preset": manifest["preset"], "seed": manifest["seed"],
                                             "key": manifest["key"]},
           "pairs": int(len(df[["model_a", "model_b"]].drop_duplicates())),
           "operators": int(df["operator"].nunique()),
           "runs": [{"examples": 200, "table": table200.name, "figures": figures(df200, manifest)},
                    {"examples": args.examples, "figures": figures(df, cmanifest)}],
           "examples_table_s": round(took, 1),
           "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                       "python": platform.python_version(), "load_after": os.getloadavg()}}
    Path(args.out).write_text(json.dumps(res, indent=1))
    print(markdown_table(res))
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
