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
            "oracle_mean", "best_fixed_mean", "best_fixed_operator", "oracle_gap", "checks", "ok")
    return {k: stats[k] for k in keys if k in stats}


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", default=None, help="where to build the zoos (default: a temporary directory)")
    ap.add_argument("--skip-table", action="store_true", help="only time the builds")
    ap.add_argument("--triples", type=int, default=20, help="random expert triples added to the table")
    args = ap.parse_args()

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
