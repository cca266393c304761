"""What an evaluation job costs on Ray against the local executor (issue 21, part 3).

The daemon's worker runs one job at a time: :func:`simmerge_bandit.pipeline.run_spec` (merge the decision's
models, evaluate the merge and its sources, normalize) either in its own process (``--executor local``) or as a Ray
task whose result comes back to it (``--executor ray``). This script times the same job specs both ways on one
machine: a tiny Llama catalog (bench_daemon's), jobs of the built-in exact-match evaluator on 8 examples.

- local: ``run_spec`` in this process (after one job to warm it up), with torch's default threads as the daemon's
  local executor runs it, and with one thread, as a Ray worker runs it (Ray sets ``OMP_NUM_THREADS=1``);
- Ray: a local ``ray.init(num_cpus=2)``; its time, the first job's (a fresh worker process imports torch and the
  package), then the same jobs one at a time as the daemon submits them (``ray.get`` of one task each).

The three run in turns, job by job.

    python benchmarks/bench_ray.py [--jobs 8]
    python benchmarks/bench_ray.py --table     # docs/daemon.md's table from the committed results
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
OUT = ROOT / "results" / "ray.json"


def run(jobs: int, limit: int) -> dict:
    sys.path.insert(0, str(ROOT))
    import ray
    import torch

    from bench_daemon import make_catalog
    from simmerge_bandit import pipeline
    from simmerge_bandit.engine import Engine, EngineConfig
    from simmerge_bandit.store import Store

    load_before = os.getloadavg()
    tmp = Path(tempfile.mkdtemp(prefix="simmerge-bench-ray-"))
    try:
        home, work = tmp / "home", tmp / "models"
        work.mkdir(parents=True)
        make_catalog(home, work, n_experts=3)
        with Store.open(home) as store:
            eng = Engine(store, EngineConfig(eval_budget=0))
            specs = [pipeline.job_spec(eng, d["id"]) for d in eng.suggest("double", top=jobs + 1)]
        warm, specs = specs[0], specs[1:]

        def timed(fn, spec) -> tuple[float, dict]:
            t = time.perf_counter()
            res = fn(spec)
            return time.perf_counter() - t, res

        def local(spec):
            return pipeline.run_spec(spec, device="cpu", limit=limit)

        t = time.perf_counter()
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        init_s = time.perf_counter() - t
        remote = ray.remote(max_retries=3)(pipeline.run_spec)

        def on_ray(spec):
            return ray.get(remote.remote(spec, device="cpu", limit=limit))

        @ray.remote
        def worker_threads() -> int:
            import torch

            return torch.get_num_threads()

        threads = torch.get_num_threads()
        try:
            ray_first, first = timed(on_ray, warm)
            local_first, _ = timed(local, warm)
            in_worker = ray.get(worker_threads.remote())
            times: dict[str, list[float]] = {"local": [], "local_1_thread": [], "ray": []}
            rewards: dict[str, list[float]] = {k: [] for k in times}
            pids = {first["pid"]}
            for spec in specs:  # the three in turns, so that the machine's load falls on each alike
                for kind in times:
                    torch.set_num_threads(1 if kind == "local_1_thread" else threads)
                    s, res = timed(on_ray if kind == "ray" else local, spec)
                    times[kind].append(s)
                    rewards[kind].append(res["reward"])
                    if kind == "ray":
                        pids.add(res["pid"])
            torch.set_num_threads(threads)
        finally:
            ray.shutdown()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    med = {k: statistics.median(v) for k, v in times.items()}
    return {"benchmark": "ray", "jobs": len(specs), "eval_limit": limit, "ray_version": ray.__version__,
            "same_rewards": rewards["local"] == rewards["ray"] == rewards["local_1_thread"],
            "torch_threads": {"local": threads, "local_1_thread": 1, "ray_worker": in_worker},
            "first_job_s": {"local": local_first, "ray": ray_first}, "ray_init_s": init_s,
            "job_s": times, "median_s": med, "ray_worker_pids": sorted(pids), "driver_pid": os.getpid(),
            "ray_overhead_per_job_s": {"vs_local": med["ray"] - med["local"],
                                       "vs_local_1_thread": med["ray"] - med["local_1_thread"]},
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                        "load_avg_before": load_before, "load_avg_after": os.getloadavg()}}


def markdown_table(res: dict) -> str:
    th, times, over = res["torch_threads"], res["job_s"], res["ray_overhead_per_job_s"]

    def spread(xs: list[float]) -> str:
        return f"{1000 * min(xs):.0f} / {1000 * statistics.median(xs):.0f} / {1000 * max(xs):.0f} ms"

    rows = [f"| | local executor ({th['local']} torch threads, as the daemon runs it) | local, 1 torch thread | "
            f"Ray (local `ray.init(num_cpus=2)`; {th['ray_worker']} torch thread in its worker) |",
            "|---|---|---|---|",
            f"| start | | | `ray.init`: {res['ray_init_s']:.1f} s |",
            f"| first job (Ray: a new worker process imports torch and the package) | "
            f"{res['first_job_s']['local']:.1f} s | | {res['first_job_s']['ray']:.1f} s |",
            f"| each of the next {res['jobs']} jobs, min / median / max | {spread(times['local'])} | "
            f"{spread(times['local_1_thread'])} | {spread(times['ray'])} |",
            f"| Ray's cost per job (medians) | {1000 * over['vs_local']:+.0f} ms | "
            f"{1000 * over['vs_local_1_thread']:+.0f} ms | |"]
    m = res["machine"]
    rows += ["", f"Each job merges two tiny Llama checkpoints and evaluates the merge and both sources on "
             f"{res['eval_limit']} examples, one job at a time as the daemon's worker runs them, the three ways in "
             f"turns; rewards {'equal' if res['same_rewards'] else '**differ**'} across the three. Ray "
             f"{res['ray_version']}, {len(res['ray_worker_pids'])} worker process(es). Machine: {m['cpus']} CPU "
             f"cores shared with other jobs, load average {m['load_avg_before'][0]:.1f} before and "
             f"{m['load_avg_after'][0]:.1f} after."]
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=8)
    ap.add_argument("--limit", type=int, default=8, help="examples per evaluation")
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("--table", action="store_true", help="print the docs table from --out and exit")
    args = ap.parse_args()
    if args.table:
        print(markdown_table(json.loads(Path(args.out).read_text())))
        return
    res = run(args.jobs, args.limit)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2))
    print(markdown_table(res))


if __name__ == "__main__":
    main()
