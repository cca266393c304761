"""Micro-zoo benchmark: build times, the full bench merge table, and whether the zoo is worth benchmarking on.

Measures, on this machine (2 CPU cores shared with other work; the load averages are recorded):

1. build time of the ``test`` preset (fresh) and of a second, cached build;
2. build time of the ``bench`` preset (fresh);
3. the full merge table of the bench zoo (every ordered pair of experts x the default operator set, evaluated
   on the tasks the pair covers), written to ``results/zoo_bench_table.parquet`` for the decision-quality
   benchmark, with its statistics (issue 4's thresholds) for all operators and for two smaller operator sets;
4. peers, as ratios in the same run: batched greedy exact match vs transformers' ``generate`` one prompt at a
   time (same answers required), and in-memory merging (``methods.merge_tensors``) vs the merge executor
   writing a checkpoint to disk (same tensors required);
5. determinism: two fresh builds of the unit preset give byte-identical weights.

Usage: ``python benchmarks/bench_zoo.py [--seed 0] [--skip-table]``. Takes about 15-20 minutes on 2 busy cores.

The realistic preset (``--realistic``): build and full table (every ordered pair of experts and ``--triples``
3-way merges, the preset's operator set) for one seed, with build and table seconds and the statistics on
both objectives, merged into ``results/zoo_realistic_stats.json`` under that seed; the table is committed as
``results/zoo_realistic_table_seed<N>.parquet``. Seed 0 is where the preset was tuned; seed 1 is the check seed
(nothing was tuned on it). ``--table`` prints the markdown table of docs/zoo.md from the committed JSON.

    python benchmarks/bench_zoo.py --realistic --seed 0 --work /work/zoos
    python benchmarks/bench_zoo.py --realistic --seed 1 --work /work/zoos
    python benchmarks/bench_zoo.py --table
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"

SEVEN = ["linear", "task_arithmetic_l1.0", "ties_d0.5", "dare_ties_d0.6", "slerp_t0.5", "nuslerp", "model_stock"]


def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def timed(fn, *args, **kwargs):
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t0


def short(stats: dict) -> dict:
    keys = ("n_cases", "n_operators", "median_spread", "max_best_share", "max_best_share_operator",
            "oracle_mean", "best_fixed_mean", "best_fixed_operator", "oracle_gap")
    return {**{k: stats["two_way"][k] for k in keys}, "checks": stats["checks"], "ok": stats["ok"]}


def peer_generation(root: Path, manifest: dict) -> dict:
    """Batched greedy exact match vs transformers' generate, one prompt at a time, on one expert and task."""
    import torch

    from simmerge_bandit.evaluators import load_model
    from simmerge_bandit.evaluators.exact_match import clean, exact_match_score
    from simmerge_bandit.zoo import _read_jsonl

    m = next(x for x in manifest["models"] if x["base"])
    task = m["tasks"][0]
    rows = _read_jsonl(root / f"tasks/{task}/eval.jsonl")
    lm = load_model(root / m["path"])
    (ours, texts), t_ours = timed(exact_match_score, lm.model, lm.tokenizer, rows)
    tok = lm.tokenizer
    longest = max(len(tok(r["answer"], add_special_tokens=False)["input_ids"]) for r in rows)
    t0 = time.perf_counter()
    ref_texts = []
    with torch.inference_mode():
        for r in rows:
            ids = torch.tensor([tok(r["prompt"])["input_ids"]])
            out = lm.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=longest + 1,
                                    do_sample=False, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
            ref_texts.append(clean(tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)))
    t_ref = time.perf_counter() - t0
    ref = sum(t == r["answer"] for t, r in zip(ref_texts, rows)) / len(rows)
    return {"model": m["name"], "task": task, "n_examples": len(rows), "score": ours, "score_generate": ref,
            "same_outputs": texts == ref_texts, "seconds": round(t_ours, 4), "seconds_generate": round(t_ref, 4),
            "speedup": round(t_ref / t_ours, 2)}


def peer_merge(root: Path, manifest: dict, n: int = 6) -> dict:
    """In-memory merge (as the table does) vs the executor writing a checkpoint to disk, then loading it."""
    import torch

    from simmerge_bandit.executor import merge_pair
    from simmerge_bandit.methods import get_method
    from simmerge_bandit.zoo import _merge_states, _seed_int, default_operators, load_state, table_cases

    ops = {o["name"]: o for o in default_operators()}
    picks = [ops[n_] for n_ in ("ties_d0.5", "dare_ties_d0.6", "slerp_t0.3", "model_stock", "della_d0.5",
                                "linear")][:n]
    cases = table_cases(manifest)[::37][:n]
    t_mem = t_disk = 0.0
    same = True
    with tempfile.TemporaryDirectory() as tmp:
        for i, (case, op) in enumerate(zip(cases, picks)):
            seed = _seed_int("merge", 0, op["name"], *case)
            states = [load_state(root / "models" / c) for c in case]
            base = load_state(root / "models" / "base")
            merged, dt = timed(_merge_states, get_method(op["method"]), op, states, base, seed)
            t_mem += dt
            t0 = time.perf_counter()
            out = Path(tmp) / f"m{i}"
            merge_pair([root / "models" / c for c in case], op["method"], op["params"], out,
                       base=root / "models" / "base", seed=seed, device="cpu")
            disk = load_state(out)
            t_disk += time.perf_counter() - t0
            same &= all(torch.equal(merged[k], disk[k]) for k in merged)
    return {"n_merges": len(cases), "seconds_in_memory": round(t_mem, 4), "seconds_executor_to_disk": round(t_disk, 4),
            "speedup": round(t_disk / t_mem, 2), "identical_tensors": bool(same)}


def determinism() -> dict:
    from simmerge_bandit.zoo import build_zoo

    with tempfile.TemporaryDirectory() as tmp:
        a = build_zoo(Path(tmp) / "a", "unit", progress=False)
        b = build_zoo(Path(tmp) / "b", "unit", progress=False)
        same = all((Path(tmp) / "a" / x["path"] / "model.safetensors").read_bytes()
                   == (Path(tmp) / "b" / y["path"] / "model.safetensors").read_bytes()
                   for x, y in zip(a["models"], b["models"]))
    return {"unit_preset_byte_identical": same}


REALISTIC_JSON = RESULTS / "zoo_realistic_stats.json"
CHECK_SEED = 1


def realistic(seed: int, work: Path, triples: int, jobs: int) -> dict:
    """Build (or reuse the cached build of) the realistic zoo for ``seed``, table it, and return the record."""
    from simmerge_bandit.zoo import build_table, build_zoo, get_preset, load_manifest, recipe_key, table_stats

    d = work / f"realistic-seed{seed}"
    rec: dict = {"seed": seed, "zoo_dir": str(d), "load_start": load(), "cpu_count": os.cpu_count(),
                 "threads_build": 1, "build_jobs": jobs, "table_jobs": jobs, "triples": triples,
                 "tuned_on": seed != CHECK_SEED}
    manifest, took = timed(build_zoo, d, "realistic", seed, progress=False, jobs=jobs)
    # A cached build returns at once; the manifest keeps the seconds of the build that made it.
    rec.update({"build_seconds": manifest["build_seconds"], "build_cached": took < manifest["build_seconds"] / 2,
                "recipe_key": recipe_key(get_preset("realistic"), seed), "zoo_key": manifest["key"]})
    print(f"realistic seed {seed}: built in {rec['build_seconds']:.0f}s"
          + (" (cached)" if rec["build_cached"] else ""), flush=True)
    df, rec["table_seconds"] = timed(build_table, d, n_triples=triples, seed=seed, progress=False, jobs=jobs)
    out = RESULTS / f"zoo_realistic_table_seed{seed}.parquet"
    df.to_parquet(out, index=False, compression="zstd")
    rec.update({"table": out.name, "table_rows": len(df), "table_bytes": out.stat().st_size,
                "table_merges": int(df.drop_duplicates(["model_a", "model_b", "model_c", "operator"]).shape[0]),
                "n_failed": int((df.status != "ok").sum())})
    print(f"table: {len(df)} rows, {rec['table_merges']} merges in {rec['table_seconds']:.0f}s", flush=True)
    manifest = load_manifest(d)
    rec["models"] = {x["name"]: {"tasks": x["tasks"], "steps": x["steps"], "lr": x["lr"], "replay": x["replay"],
                                 "scores": x["scores"]} for x in manifest["models"]}
    rec["stats"] = {o: table_stats(df, manifest, objective=o) for o in ("target", "task")}
    rec["load_end"] = load()
    return rec


def _fmt(x, pct: bool = False) -> str:
    if x is None:
        return "-"
    if isinstance(x, bool):
        return "yes" if x else "**no**"
    return f"{x:.0%}" if pct else f"{x:.3f}" if isinstance(x, float) else str(x)


def markdown_table(report: dict) -> str:
    """The figures of docs/zoo.md, from a ``zoo_realistic_stats.json`` report."""
    seeds = sorted(report["seeds"], key=int)
    recs = [report["seeds"][s] for s in seeds]
    goals = report["goals"]

    def row(label, goal, get, pct=False, check=None):
        cells = []
        for r in recs:
            v = get(r)
            c = r["stats"]["target"]["checks"].get(check) if check else None
            cells.append(_fmt(v, pct) + ("" if c in (None, True) else " (not met)"))
        return f"| {label} | {goal} | " + " | ".join(cells) + " |"

    def g(key, op, pct=False):
        return f"{op} {goals[key]:.0%}" if pct else f"{op} {goals[key]}"

    t = lambda r: r["stats"]["target"]             # noqa: E731
    two = lambda r: t(r)["two_way"]                 # noqa: E731
    three = lambda r: t(r)["three_way"] or {}      # noqa: E731
    head = ("| figure | goal | " + " | ".join(f"seed {s}" + (" (check seed)" if not report["seeds"][s]["tuned_on"]
                                                              else "") for s in seeds) + " |")
    lines = [head, "|---|---|" + "---|" * len(seeds),
             row("build seconds", f"<= {BUILD_GOAL_S}", lambda r: f"{round(r['build_seconds'])} "
                 f"({_processes(r.get('build_jobs', 1))})" + ("" if _build_ok(r) else " (not met)")),
             row("table seconds", f"<= {TABLE_GOAL_S}", lambda r: f"{round(r['table_seconds'])} "
                 f"({_processes(r['table_jobs'])})" + ("" if _table_ok(r) else " (not met)")),
             row("expert - base, own tasks: min", g("min_expert_margin", ">="), lambda r: t(r)["expert_margin"]["min"],
                 check="min_expert_margin"),
             row("expert - base, own tasks: median", g("median_expert_margin", ">="),
                 lambda r: t(r)["expert_margin"]["median"], check="median_expert_margin"),
             row("largest drop below the base elsewhere", g("max_off_task_drop", "<="),
                 lambda r: t(r)["expert_margin"]["off_task_max_drop"], check="max_off_task_drop"),
             row("2-way cases (ordered pairs)", "", lambda r: two(r)["n_cases"]),
             row("operators", "", lambda r: two(r)["n_operators"]),
             row("oracle retention (2-way)", g("oracle_mean", ">="), lambda r: two(r)["oracle_mean"],
                 check="oracle_mean"),
             row("best fixed operator", "", lambda r: f"{two(r)['best_fixed_operator']} "
                                                      f"{two(r)['best_fixed_mean']:.3f}"),
             row("oracle gap", g("oracle_gap", ">="), lambda r: two(r)["oracle_gap"], check="oracle_gap"),
             row("oracle gap, noise-corrected", g("oracle_gap_nc", ">="), lambda r: two(r)["oracle_gap_nc"],
                 check="oracle_gap_nc"),
             row("median best-worst spread", g("median_spread", ">="), lambda r: two(r)["median_spread"],
                 check="median_spread"),
             row("most frequent best operator", g("max_best_share", "<=", pct=True),
                 lambda r: f"{two(r)['max_best_share_operator']} {two(r)['max_best_share']:.0%}",
                 check="max_best_share"),
             row("best metadata rule: share of the gap closed (in-sample)", g("max_rule_share", "<=", pct=True),
                 lambda r: f"{two(r)['best_rule']} {two(r)['best_rule_share']:.0%}", check="max_rule_share")]
    for name in ("tag", "weaker", "stronger", "lookup"):
        lines.append(row(f"rule {name}: mean (share of gap)", "",
                         lambda r, n=name: f"{two(r)['rules'][n]['mean']:.3f} ({two(r)['rules'][n]['gap_share']:.0%})"))
    lines += [row("3-way cases", "", lambda r: three(r).get("n_cases")),
              row("3-way oracle retention", "", lambda r: three(r).get("oracle_mean")),
              row("3-way best fixed operator", "", lambda r: f"{three(r)['best_fixed_operator']} "
                                                            f"{three(r)['best_fixed_mean']:.3f}" if three(r) else None),
              row("3-way oracle gap (noise-corrected)", "",
                  lambda r: f"{three(r)['oracle_gap']:.3f} ({three(r)['oracle_gap_nc']:.3f})" if three(r) else None),
              row("per-task objective: oracle / best fixed / gap", "",
                  lambda r: "{oracle_mean:.3f} / {best_fixed_mean:.3f} / {oracle_gap:.3f}".format(
                      **r["stats"]["task"]["two_way"])),
              row("all goals met", "", lambda r: t(r)["ok"] and _build_ok(r) and _table_ok(r))]
    return "\n".join(lines)


FRONTIER_JSON = RESULTS / "zoo_realistic_frontier.json"
#: Issue 15: the realistic zoo builds in <= 10 minutes and its full table in <= 15 minutes on 2 cores.
BUILD_GOAL_S, TABLE_GOAL_S = 600, 900


def _processes(n: int) -> str:
    return f"{n} process" + ("" if n == 1 else "es")


def _build_ok(rec: dict) -> bool:
    return rec["build_seconds"] <= BUILD_GOAL_S


def _table_ok(rec: dict) -> bool:
    return rec["table_seconds"] <= TABLE_GOAL_S


def frontier_table(frontier: dict) -> str:
    """The variants explored before the realistic recipe was chosen (seed 0), from ``zoo_realistic_frontier.json``."""
    tasks = sorted({t for b in frontier["bases"].values() for t in b["scores"]})
    lines = ["| base (mixture, steps) | " + " | ".join(tasks) + " |", "|---|" + "---|" * len(tasks)]
    for name, b in frontier["bases"].items():
        cells = [f"{b['scores'][t]:.2f}" if t in b["scores"] else "" for t in tasks]
        lines.append(f"| {name} ({len(b['tasks'])} tasks, {b['steps']}) | " + " | ".join(cells) + " |")
    lines += ["", "| expert from base bD | lr | steps | replay | gain on own tasks | largest drop elsewhere |",
              "|---|---|---|---|---|---|"]
    for name, e in frontier["experts"].items():
        gain = ", ".join(f"{t} {m:+.3f}" for t, m in e["own_margin"].items())
        lines.append(f"| {name} | {e['lr']:g} | {e['steps']} | {e['replay']} | {gain} | "
                     f"{e['largest_drop_elsewhere']:.3f} |")
    lines += ["", "| table of 4 experts from base bD | lr | replay | 2-way cases | oracle | best fixed | gap (nc) "
                  "| best rule's share |", "|---|---|---|---|---|---|---|---|"]
    for name, t in frontier["tables"].items():
        lines.append(f"| {name} | {t['lr']:g} | {t['replay']} | {t['n_cases']} | {t['oracle_mean']:.3f} | "
                     f"{t['best_fixed_operator']} {t['best_fixed_mean']:.3f} | {t['oracle_gap']:.3f} "
                     f"({t['oracle_gap_nc']:.3f}) | {t['best_rule_share']:.0%} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", default=None, help="where to build the zoos (default: a temporary directory)")
    ap.add_argument("--skip-table", action="store_true", help="only time the builds")
    ap.add_argument("--triples", type=int, default=None,
                    help="random expert triples added to the table (default: 20 for bench, 30 for realistic)")
    ap.add_argument("--realistic", action="store_true", help="the realistic preset on --seed (see above)")
    ap.add_argument("--jobs", type=int, default=2, help="processes (one thread each) of the realistic build and table")
    ap.add_argument("--table", action="store_true", help="print the markdown table of the committed realistic JSON")
    ap.add_argument("--frontier", action="store_true", help="print the tables of the explored variants")
    args = ap.parse_args()

    if args.table:
        print(markdown_table(json.loads(REALISTIC_JSON.read_text())))
        return
    if args.frontier:
        print(frontier_table(json.loads(FRONTIER_JSON.read_text())))
        return
    if args.realistic:
        from simmerge_bandit.zoo import TARGET_GOALS

        work = Path(args.work or "/work/zoos")
        rec = realistic(args.seed, work, 30 if args.triples is None else args.triples, args.jobs)
        report = json.loads(REALISTIC_JSON.read_text()) if REALISTIC_JSON.is_file() else {}
        report.update({"preset": "realistic", "goals": TARGET_GOALS,
                       "check_seed": CHECK_SEED, "rules_fit": rec["stats"]["target"]["two_way"].get("rules_fit")})
        report.setdefault("seeds", {})[str(args.seed)] = rec
        REALISTIC_JSON.write_text(json.dumps(report, indent=1, default=str))
        print(markdown_table(report))
        return
    args.triples = 20 if args.triples is None else args.triples

    import torch

    from simmerge_bandit.zoo import (build_table, build_zoo, default_operators, get_preset, load_manifest,
                                     recipe_key, table_stats)

    torch.set_num_threads(1)
    RESULTS.mkdir(parents=True, exist_ok=True)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="simmerge-bench-zoo-"))
    report: dict = {"seed": args.seed, "load_start": load(), "cpu_count": os.cpu_count(), "threads": 1}

    test_dir = work / "test"
    shutil.rmtree(test_dir, ignore_errors=True)
    _, report["test_build_seconds"] = timed(build_zoo, test_dir, "test", args.seed, progress=False)
    _, report["test_cached_build_seconds"] = timed(build_zoo, test_dir, "test", args.seed, progress=False)
    test_m = load_manifest(test_dir)
    report["test_expert_margin_min"] = min(x["scores"][t] - test_m["models"][0]["scores"][t]
                                           for x in test_m["models"][1:] for t in x["tasks"])
    print(f"test preset: {report['test_build_seconds']:.1f}s fresh, {report['test_cached_build_seconds']:.3f}s cached",
          flush=True)

    bench_dir = work / "bench"
    shutil.rmtree(bench_dir, ignore_errors=True)
    manifest, report["bench_build_seconds"] = timed(build_zoo, bench_dir, "bench", args.seed, progress=False)
    report["recipe_key"] = recipe_key(get_preset("bench"), args.seed)
    report["zoo_key"] = manifest["key"]
    report["models"] = {x["name"]: {"tasks": x["tasks"], "steps": x["steps"], "lr": x["lr"],
                                    "own_scores": {t: x["scores"][t] for t in (x["tasks"] if x["base"] else [])},
                                    "scores": x["scores"]} for x in manifest["models"]}
    print(f"bench preset: {report['bench_build_seconds']:.1f}s", flush=True)

    report["determinism"] = determinism()
    report["peer_generation"] = peer_generation(bench_dir, manifest)
    report["peer_merge"] = peer_merge(bench_dir, manifest)
    print("peers:", report["peer_generation"]["speedup"], report["peer_merge"]["speedup"], flush=True)

    if not args.skip_table:
        df, report["table_seconds"] = timed(build_table, bench_dir, operators=default_operators(),
                                            n_triples=args.triples, seed=args.seed, progress=False)
        df.to_parquet(RESULTS / "zoo_bench_table.parquet", index=False)
        full = table_stats(df, load_manifest(bench_dir))
        report["table"] = full
        report["table_rows"] = len(df)
        report["table_merges"] = int(df.drop_duplicates(["model_a", "model_b", "model_c", "operator"]).shape[0])
        report["table_seconds_per_merge"] = report["table_seconds"] / report["table_merges"]
        report["subsets"] = {
            "seven_symmetric_operators": short(table_stats(df[df.operator.isin(SEVEN)])),
            "without_asymmetric_slerp": short(table_stats(df[~df.operator.isin(["slerp_t0.3", "slerp_t0.7"])])),
        }
        print(json.dumps(short(full), indent=1), flush=True)
    report["load_end"] = load()
    (RESULTS / "zoo_bench_stats.json").write_text(json.dumps(report, indent=2, default=str))
    print(f"wrote {RESULTS / 'zoo_bench_stats.json'}")
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
