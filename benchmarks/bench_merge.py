"""Merge executor benchmark: ours vs mergekit-yaml on the same configs, in the same run, for bf16 and float32.

Generates (once, under benchmarks/_work/, git-ignored) a Llama-like bf16 family of ~0.3 B parameters: a base and
two experts (base + small noise), each sharded. For every compute dtype asked for (``dtype: bfloat16``, what most
published configs say, and ``dtype: float32``; output bf16 either way) and every method (linear, ties, dare_ties,
slerp), it writes one mergekit config and runs ``simmerge merge CONFIG`` and ``mergekit-yaml CONFIG`` as separate
processes, each measured by a fresh parent (wall time, CPU time, peak RSS). Recorded per pair of runs: the ratios
(goals on both dtypes: TIES >= 5x mergekit, linear >= 3x, peak RSS <= mergekit's), the load average around each run,
how far our merge time is from this machine's memory bandwidth, and how far the outputs are apart. ``--runs N``
repeats the whole set N times (each run recorded).

Two floors, both measured with one thread just before each of our merges (the machine is shared, so the bandwidth
it has changes from minute to minute): the memcpy floor is the bytes the merge moves (every input byte it reads,
once, and every output byte, once: ``bytes_read + bytes_written`` of its stats) at the speed of a large memcpy
(bytes read + written per second), the goal's measure; the file-I/O floor is the time to read the same input files
from the page cache (``readinto``) and write an output file of the same size, i.e. the data path a merge cannot
avoid, which costs more than a memcpy (page-cache lookups and page faults when reading, page allocation when
writing).

    python benchmarks/bench_merge.py [--mergekit PATH] [--dtypes bfloat16,float32] [--methods linear,ties]
                                     [--runs 2] [--layers 20] [--device cpu] [--out FILE]
    python benchmarks/bench_merge.py --device cuda --no-mergekit --out benchmarks/results/merge_gpu.json
    python benchmarks/bench_merge.py --table     # the docs/merge.md table, from benchmarks/results/merge.json

The report (``--out``) holds ``machine``, ``family``, ``memcpy_gb_per_s``, ``goals`` and ``runs``: each run
``{"load_before", "load_after", "dtypes": {config dtype: {method: entry}}}``; an entry holds ``ours`` and
``mergekit`` (each ``wall_s``, ``cpu_s``, ``peak_rss_bytes``, load averages), the ratios, ``memcpy_gb_per_s`` and
``file_floor`` measured just before it, and ``merge_over_memcpy`` / ``merge_over_file_floor``. :func:`runs_of`
also reads the report this script wrote before bf16 configs were measured (``methods`` at the top: one run, every config
``dtype: float32``), so ``--table`` and the README's headline (:func:`headline`, used by ``simmerge_bandit.docgen``)
work on either; nothing here needs torch unless a merge is run.

Warm guest memory (``--pretouch-gb``, default 3): on a virtual machine the hypervisor backs a guest page with host
memory the first time it is touched, and may take it back once freed. On this benchmark's 2-core VM that first
touch cost about 1-3.3 s per GB (the committed report's ``pretouch_s``: 3 GB in 3.2-9.9 s), and writing a fresh
output file into the page cache pays it, so a merge's wall time depended on how recently the memory it gets had
been used, and more so for the tool that touches more of it (mergekit's peak RSS is 3-4x ours). Before each timed
command (either tool) and each file-I/O floor, the benchmark touches and frees that many GB, so both run on memory
the host already backs; ``pretouch_s`` records what that touch cost (how cold the memory was). ``--pretouch-gb 0``
measures as before (reports without ``pretouch_gb`` were made that way).

mergekit: ``--mergekit``, else $SIMMERGE_MERGEKIT_YAML, else ``mergekit-yaml`` on PATH (``.ci/setup-mergekit``
makes one). Our side runs with ``--threads 1`` (the CLI default), mergekit with torch's default threads. The
machine is shared: compare ratios within one run, and read the load averages beside them. Before anything is timed,
the compiled TIES loops (``methods.fused``, numba) are compiled into numba's cache; ``compiled_loops`` records what
that costs with an empty cache and what loading them costs a process afterwards (included in every TIES time).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
WORK = HERE / "_work" / "merge"
RESULTS = HERE / "results"
GOALS = {"ties": 5.0, "linear": 3.0}
BANDWIDTH_GOAL = {"ties": 10.0}
#: The config dtype of every measurement in a report of the old format (before bf16 configs were measured).
OLD_FORMAT_DTYPE = "float32"


def make_family(root: Path, layers: int, hidden: int = 1024, inter: int = 2816, vocab: int = 32000,
                shard_bytes: int = 200_000_000) -> dict[str, Path]:
    """Base + 2 experts, bf16, sharded; deterministic. Reused when already there."""
    import torch
    from safetensors.torch import save_file

    names = ["base", "expert_a", "expert_b"]
    paths = {n: root / n for n in names}
    if all((p / "model.safetensors.index.json").is_file() and (p / "config.json").is_file()
           and json.loads((p / "config.json").read_text())["num_hidden_layers"] == layers for p in paths.values()):
        return paths
    shutil.rmtree(root, ignore_errors=True)
    heads, kv, hd = 16, 4, 64
    shapes = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update({p + "self_attn.q_proj.weight": (heads * hd, hidden),
                       p + "self_attn.k_proj.weight": (kv * hd, hidden),
                       p + "self_attn.v_proj.weight": (kv * hd, hidden),
                       p + "self_attn.o_proj.weight": (hidden, heads * hd),
                       p + "mlp.gate_proj.weight": (inter, hidden), p + "mlp.up_proj.weight": (inter, hidden),
                       p + "mlp.down_proj.weight": (hidden, inter), p + "input_layernorm.weight": (hidden,),
                       p + "post_attention_layernorm.weight": (hidden,)})
    shapes.update({"model.norm.weight": (hidden,), "lm_head.weight": (vocab, hidden)})
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
              "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": heads,
              "num_key_value_heads": kv, "head_dim": hd, "vocab_size": vocab, "max_position_embeddings": 2048,
              "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False, "hidden_act": "silu",
              "torch_dtype": "bfloat16", "bos_token_id": 1, "eos_token_id": 2}
    for k, n in enumerate(names):
        g = torch.Generator().manual_seed(0)
        ge = torch.Generator().manual_seed(100 + k)
        out = paths[n]
        out.mkdir(parents=True)
        shards, cur, size = [], {}, 0
        for name, shape in shapes.items():
            t = torch.randn(shape, generator=g) * 0.02
            if name.endswith("layernorm.weight") or name == "model.norm.weight":
                t = t + 1.0
            if k > 0:
                t += torch.randn(shape, generator=ge) * 0.002
            t = t.to(torch.bfloat16)
            nbytes = t.numel() * 2
            if cur and size + nbytes > shard_bytes:
                shards.append(cur)
                cur, size = {}, 0
            cur[name] = t
            size += nbytes
        shards.append(cur)
        weight_map, total = {}, 0
        for i, sd in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(sd, str(out / fname), metadata={"format": "pt"})
            for name, t in sd.items():
                weight_map[name] = fname
                total += t.numel() * 2
        (out / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": weight_map}))
        (out / "config.json").write_text(json.dumps(config, indent=2))
    return paths


def configs(paths: dict[str, Path], dtype: str) -> dict[str, dict]:
    """One mergekit config per method, computing in ``dtype`` and writing bf16."""
    base, a, b = (str(paths[n]) for n in ("base", "expert_a", "expert_b"))
    common = {"dtype": dtype, "out_dtype": "bfloat16"}
    two = [{"model": a, "parameters": {"weight": 1.0, "density": 0.5}},
           {"model": b, "parameters": {"weight": 1.0, "density": 0.5}}]
    return {
        "linear": {"merge_method": "linear", "models": [{"model": a, "parameters": {"weight": 1.0}},
                                                        {"model": b, "parameters": {"weight": 1.0}}], **common},
        "ties": {"merge_method": "ties", "base_model": base, "models": two, **common},
        "dare_ties": {"merge_method": "dare_ties", "base_model": base, "models": two, **common},
        "slerp": {"merge_method": "slerp", "base_model": a, "models": [{"model": a}, {"model": b}],
                  "parameters": {"t": 0.3}, **common},
    }


_MEASURE = ("import json, resource, subprocess, sys, time\n"
            "t = time.perf_counter()\n"
            "r = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)\n"
            "w = time.perf_counter() - t\n"
            "u = resource.getrusage(resource.RUSAGE_CHILDREN)\n"
            "print(json.dumps({'rc': r.returncode, 'wall_s': w, 'cpu_s': round(u.ru_utime + u.ru_stime, 3), "
            "'peak_rss_bytes': u.ru_maxrss * 1024, 'stderr': r.stderr.decode()[-2000:]}))")


def measure(cmd: list[str]) -> dict:
    """Wall time, CPU time (user + system, all threads) and peak RSS of one command, measured by a fresh parent
    process (RUSAGE_CHILDREN), with the load average just before and after."""
    before = os.getloadavg()
    out = subprocess.run([sys.executable, "-c", _MEASURE, *cmd], capture_output=True, text=True, check=True)
    res = json.loads(out.stdout)
    if res["rc"] != 0:
        raise RuntimeError(f"{cmd[0]} failed:\n{res['stderr']}")
    res["load_before"], res["load_after"] = [round(x, 2) for x in before], [round(x, 2) for x in os.getloadavg()]
    del res["stderr"], res["rc"]
    return res


def memcpy_bandwidth(device: str, nbytes: int = 512 << 20) -> dict:
    """Bytes moved (read + written) per second by a large copy: with 1 torch thread (what our merge uses) and
    with torch's default thread count (best of 5); on a GPU also a device-to-device copy and a pinned
    host-to-device upload (bytes uploaded per second)."""
    import torch

    src = torch.empty(nbytes, dtype=torch.uint8).fill_(1)
    dst = torch.empty_like(src)
    dst.copy_(src)
    res = {}
    old = torch.get_num_threads()
    for label, threads in (("threads_1", 1), ("threads_default", old)):
        torch.set_num_threads(threads)
        best = min(_time(lambda: dst.copy_(src)) for _ in range(5))
        res[label] = round(2 * nbytes / best / 1e9, 3)
    torch.set_num_threads(old)
    if device.startswith("cuda"):
        d_src, d_dst, pinned = src.to(device), torch.empty_like(src, device=device), src.pin_memory()

        def timed(fn):
            torch.cuda.synchronize()
            t = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            return time.perf_counter() - t

        res["cuda_device_to_device"] = round(2 * nbytes / min(timed(lambda: d_dst.copy_(d_src)) for _ in range(5))
                                             / 1e9, 3)
        res["cuda_host_to_device_pinned"] = round(nbytes / min(timed(lambda: d_dst.copy_(pinned, non_blocking=True))
                                                               for _ in range(5)) / 1e9, 3)
    return res


def memcpy_here(nbytes: int = 256 << 20) -> float:
    """GB/s moved (read + written) by a 1-thread copy of ``nbytes``, best of 3: the machine's memory bandwidth
    as it is right now (the machine is shared, so each measurement gets its own, taken just before it)."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        src = torch.empty(nbytes, dtype=torch.uint8).fill_(1)
        dst = torch.empty_like(src)
        dst.copy_(src)
        return round(2 * nbytes / min(_time(lambda: dst.copy_(src)) for _ in range(3)) / 1e9, 3)
    finally:
        torch.set_num_threads(old)


def pretouch(gb: float) -> float:
    """Touch ``gb`` GB of fresh anonymous memory one byte per page and free it (see the module's docstring); the
    seconds it took."""
    if gb <= 0:
        return 0.0
    import mmap

    import numpy as np

    t = time.perf_counter()
    m = mmap.mmap(-1, int(gb * (1 << 30)))
    a = np.frombuffer(m, dtype=np.uint8)
    a[::mmap.PAGESIZE] = 1
    del a
    m.close()
    return round(time.perf_counter() - t, 3)


def file_floor(inputs: list[Path], out_bytes: int, work: Path) -> dict:
    """Seconds to move a merge's bytes through the file system and nothing else, 1 thread: read every shard of
    ``inputs`` from the page cache (``readinto`` a 1 MiB buffer) and write ``out_bytes`` into a new file beside the
    outputs (1 MiB writes, no fsync, as a merge without ``--fsync``). The merge reads by memory-mapping instead,
    but either way each input page is brought in once and each output page is allocated and filled once."""
    buf = bytearray(1 << 20)
    view = memoryview(buf)
    read = 0
    t = time.perf_counter()
    for d in inputs:
        for f in sorted(d.glob("*.safetensors")):
            with open(f, "rb", buffering=0) as fh:
                while n := fh.readinto(view):
                    read += n
    t_read = time.perf_counter() - t
    path = work / "file_floor.tmp"
    t = time.perf_counter()
    with open(path, "wb", buffering=0) as fh:
        left = out_bytes
        while left > 0:
            left -= fh.write(view[:min(left, len(buf))])
    t_write = time.perf_counter() - t
    path.unlink()
    return {"bytes_read": read, "read_s": round(t_read, 4), "write_s": round(t_write, 4),
            "seconds": round(t_read + t_write, 4)}


def _time(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def compare(ours: Path, theirs: Path) -> dict:
    """Fraction of differing elements and the largest relative L2 difference of a tensor."""
    from safetensors.torch import load_file

    def load(d):
        sd = {}
        for f in sorted(d.glob("*.safetensors")):
            sd.update(load_file(str(f)))
        return sd

    a, b = load(ours), load(theirs)
    if set(a) != set(b):
        return {"same_tensor_names": False}
    diff = total = 0
    worst = 0.0
    for k in a:
        x, y = a[k].float(), b[k].float()
        diff += int((x != y).sum())
        total += x.numel()
        worst = max(worst, float(((x - y).norm() / y.norm().clamp(min=1e-12))))
    return {"same_tensor_names": True, "differing_fraction": diff / total, "max_tensor_rel_l2_diff": worst}


_WARM_UP = "from simmerge_bandit.methods import fused; print(fused.warm_up())"


def compiled_loops() -> dict:
    """Compile the TIES loops (numba) before anything is timed, and record what that costs a user: once with an
    empty cache (the first TIES merge after installing: every (stored, compute) dtype pair the warm-up covers),
    then loading them from the cache (what every later process pays, once, before its first TIES tensor)."""
    import tempfile

    def seconds(env):
        r = subprocess.run([sys.executable, "-c", _WARM_UP], capture_output=True, text=True, env=env, check=True)
        return round(float(r.stdout.strip().splitlines()[-1]), 2)

    with tempfile.TemporaryDirectory() as cold:
        first = seconds({**os.environ, "NUMBA_CACHE_DIR": cold})
    seconds(dict(os.environ))  # fill the cache our merges use
    return {"cases": "4 (stored, compute) dtype pairs: bf16/f32 x bf16/f32", "compile_empty_cache_s": first,
            "load_from_cache_s": seconds(dict(os.environ))}


def run_once(paths: dict[str, Path], dtypes: list[str], methods: list[str], args, simmerge: list[str],
             memcpy: dict) -> dict:
    import yaml

    out: dict = {"load_before": [round(x, 2) for x in os.getloadavg()], "dtypes": {}}
    out_bytes = json.loads((paths["base"] / "model.safetensors.index.json").read_text())["metadata"]["total_size"]
    for dt in dtypes:
        cfgs = configs(paths, dt)
        entries = {}
        for m in methods:
            cfg_path = args.work / f"{m}-{dt}.yml"
            cfg_path.write_text(yaml.safe_dump(cfgs[m], sort_keys=False))
            out_ours, out_mk = args.work / f"out_ours_{m}", args.work / f"out_mk_{m}"
            inputs = [Path(x["model"]) for x in cfgs[m]["models"]] + (
                [Path(cfgs[m]["base_model"])] if "base_model" in cfgs[m] else [])
            # Both floors measured just before our merge, in the load it then runs in.
            bandwidth = memcpy_here() if args.device == "cpu" else memcpy["threads_1"]
            touched = {"floor": pretouch(args.pretouch_gb)}
            files = file_floor(list(dict.fromkeys(inputs)), out_bytes, args.work)  # out_dtype bf16, as stored
            touched["ours"] = pretouch(args.pretouch_gb)
            ours = measure([*simmerge, "merge", str(cfg_path), "--out", str(out_ours), "--force", "--device",
                            args.device, "--json"])
            stats = json.loads((out_ours / "provenance.json").read_text())["stats"]
            moved = stats["bytes_read"] + stats["bytes_written"]
            floor_s = moved / (bandwidth * 1e9)
            entry = {"ours": {**ours, "merge_s": stats["seconds"], "bytes_read": stats["bytes_read"],
                              "bytes_written": stats["bytes_written"],
                              "gb_per_s_merge": round(moved / stats["seconds"] / 1e9, 3)},
                     "memcpy_gb_per_s": bandwidth,
                     "memcpy_floor_s": round(floor_s, 4),
                     "merge_over_memcpy": round(stats["seconds"] / floor_s, 1),
                     "file_floor": files,
                     "merge_over_file_floor": round(stats["seconds"] / files["seconds"], 1),
                     "pretouch_s": touched}
            if args.mergekit:
                shutil.rmtree(out_mk, ignore_errors=True)
                touched["mergekit"] = pretouch(args.pretouch_gb)
                mk = measure([args.mergekit, str(cfg_path), str(out_mk), "--quiet", "--random-seed", "0"]
                             + (["--cuda"] if args.device.startswith("cuda") else []))
                entry.update({
                    "mergekit": mk,
                    "speedup_wall": round(mk["wall_s"] / ours["wall_s"], 2),
                    "rss_ratio_ours_over_mergekit": round(ours["peak_rss_bytes"] / mk["peak_rss_bytes"], 3),
                    "outputs": compare(out_ours, out_mk),
                })
                shutil.rmtree(out_mk, ignore_errors=True)
            entries[m] = entry
            print(json.dumps({dt: {m: entry}}), flush=True)
            shutil.rmtree(out_ours, ignore_errors=True)
        out["dtypes"][dt] = entries
    out["load_after"] = [round(x, 2) for x in os.getloadavg()]
    return out


def runs_of(res: dict) -> list[dict]:
    """The runs of a report, in the format this script writes: ``[{"load_before", "load_after", "dtypes":
    {config dtype: {method: entry}}}]``.

    A report of the old format (``methods`` at the top, no ``runs``) is one run whose configs all said
    ``dtype: float32`` (:data:`OLD_FORMAT_DTYPE`); its entries get ``memcpy_floor_s`` and ``merge_over_memcpy``
    from their bytes and merge time over the 1-thread memcpy, as :func:`run_once` computes them, and have no load
    average per measurement (the run's are kept)."""
    if "runs" in res:
        return res["runs"]
    if "methods" not in res:
        raise ValueError("not a merge benchmark report: it has neither 'runs' nor 'methods'")
    bandwidth = res["memcpy_gb_per_s"]["threads_1"] * 1e9
    entries = {}
    for m, e in res["methods"].items():
        floor_s = (e["ours"]["bytes_read"] + e["ours"]["bytes_written"]) / bandwidth
        entries[m] = {**{k: v for k, v in e.items() if k not in ("load_after", "fraction_of_memcpy_bandwidth")},
                      "memcpy_floor_s": round(floor_s, 4),
                      "merge_over_memcpy": round(e["ours"]["merge_s"] / floor_s, 1)}
    machine = res.get("machine", {})
    return [{"load_before": machine.get("load_before"), "load_after": machine.get("load_after"),
             "dtypes": {OLD_FORMAT_DTYPE: entries}}]


def _load(e: dict, side: str) -> str:
    before = e.get(side, {}).get("load_before")
    return f"{before[0]:.1f}" if before else "-"


def _wall(side: dict) -> str:
    """Wall seconds, with the process's CPU seconds (all threads) where recorded: on a shared machine the two
    differ by the time it waited for a core."""
    return f"{side['wall_s']:.2f}" + (f", {side['cpu_s']:.1f}" if "cpu_s" in side else "")


def markdown_table(res: dict) -> str:
    """docs/merge.md's table: per run, compute dtype and method, ours vs mergekit (wall, CPU, peak RSS), the
    goal, and our merge time over the memcpy and file-I/O floors."""
    rows = ["| run | config dtype | method | ours (s: wall, CPU) | mergekit (s: wall, CPU) | speedup (goal) "
            "| peak RSS ours / mergekit "
            "(GB) | merge time / memcpy floor | merge time / file-I/O floor | load avg (1 min) |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    bandwidths = []
    for i, run in enumerate(runs_of(res), 1):
        for dt, entries in run["dtypes"].items():
            for m, e in entries.items():
                goal = GOALS.get(m)
                mk = e.get("mergekit")
                speed = "-" if not mk else (f"{e['speedup_wall']:.2f}x" + (
                    f" ({'met' if e['speedup_wall'] >= goal else 'NOT met'}: >= {goal:g}x)" if goal else ""))
                rss = f"{e['ours']['peak_rss_bytes'] / 1e9:.2f}" + (
                    f" / {mk['peak_rss_bytes'] / 1e9:.2f}" if mk else "")
                bw = f"{e['merge_over_memcpy']:.1f}x" + (
                    f" (goal <= {BANDWIDTH_GOAL[m]:g}x)" if m in BANDWIDTH_GOAL else "")
                files = f"{e['merge_over_file_floor']:.1f}x" if "merge_over_file_floor" in e else "-"
                load = _load(e, "ours") + (f" / {_load(e, 'mergekit')}" if mk else "")
                mk_wall = _wall(mk) if mk else "-"
                rows.append(f"| {i} | {dt} | {m} | {_wall(e['ours'])} | {mk_wall} | {speed} | {rss} | {bw} "
                            f"| {files} | {load} |")
                bandwidths.append(e.get("memcpy_gb_per_s"))
    fam = res["family"]
    rows.append("")
    if all(bandwidths):
        memcpy = (f"memcpy {min(bandwidths):.1f}-{max(bandwidths):.1f} GB/s (1 thread, bytes read + written), "
                  f"measured just before each of our merges, as is its file-I/O floor (the inputs read from the page "
                  f"cache, the output written to it)")
    else:
        memcpy = f"memcpy {res['memcpy_gb_per_s']['threads_1']:.1f} GB/s (1 thread, bytes read + written)"
    rows.append(f"{fam['params_per_model'] / 1e9:.2f} B parameters per model, bf16 on disk, base + 2 experts; "
                f"{res['machine']['cpus']} CPUs, torch {res['machine']['torch']}; {memcpy}. Load average: "
                f"ours / mergekit, just before each.")
    if res.get("pretouch_gb"):
        rows[-1] += (f" Before each timed command of either tool and each floor, {res['pretouch_gb']:g} GB of memory "
                     f"were touched and freed (warm guest memory; see the benchmark's docstring).")
    else:
        rows[-1] += " Measured without warming guest memory first (the VM's first-touch cost falls on either tool)."
    loops = res.get("compiled_loops")
    if loops:
        rows[-1] += (f" The compiled TIES loops took {loops['compile_empty_cache_s']:.1f} s to compile with an empty "
                     f"cache ({loops['cases']}; once, before anything was timed) and take "
                     f"{loops['load_from_cache_s']:.1f} s to load from it (for all four pairs; a merge loads the "
                     f"pair it uses, inside its TIES times).")
    if "runs" not in res:
        rows.append("")
        rows.append(f"Recorded before bf16 configs were measured (the report's old format): one run, every config "
                    f"`dtype: {OLD_FORMAT_DTYPE}`, no load average per measurement; `python benchmarks/bench_merge.py`"
                    f" records both dtypes.")
    return "\n".join(rows)


def _median_run(entries: list[dict]) -> dict:
    """The run whose speedup is the median (the lower middle one of an even number: the less flattering)."""
    ranked = sorted(entries, key=lambda e: e.get("speedup_wall", 0.0))
    return ranked[(len(ranked) - 1) // 2]


def headline(res: dict, method: str = "ties") -> tuple[str, str]:
    """The README's headline row for the merge executor: ``(figure, baseline)`` for ``method`` on each config
    dtype measured (bf16 first: what most published configs say), each the median run by speedup."""
    per_dtype: dict[str, list[dict]] = {}
    for run in runs_of(res):
        for dt, entries in run["dtypes"].items():
            if method in entries:
                per_dtype.setdefault(dt, []).append(entries[method])
    if not per_dtype:
        raise ValueError(f"the report has no {method} measurement")
    order = sorted(per_dtype, key=lambda dt: (dt != "bfloat16", dt))
    gb = lambda b: f"{b / 1e9:.2f} GB"  # noqa: E731
    ours, theirs = [], []
    for dt in order:
        e = _median_run(per_dtype[dt])
        n = len(per_dtype[dt])
        ours.append(f"`dtype: {dt}` config {e['ours']['wall_s']:.1f} s, peak RSS {gb(e['ours']['peak_rss_bytes'])}"
                    + (f" (median of {n} runs)" if n > 1 else ""))
        mk = e.get("mergekit")
        if mk is None:
            theirs.append(f"`dtype: {dt}` not measured")
            continue
        wall = f"{mk['wall_s']:.0f}" if mk["wall_s"] >= 100 else f"{mk['wall_s']:.1f}"
        theirs.append(f"`dtype: {dt}` {wall} s ({e['speedup_wall']:.1f}x slower), peak RSS "
                      f"{gb(mk['peak_rss_bytes'])}")
    label = method.upper() if method == "ties" else method
    return (f"{label} merge of base + 2 experts ({res['family'].get('params_per_model', 0) / 1e9:.2f} B parameters "
            f"each): " + "; ".join(ours), "mergekit: " + "; ".join(theirs))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mergekit", default=os.environ.get("SIMMERGE_MERGEKIT_YAML") or shutil.which("mergekit-yaml"))
    ap.add_argument("--no-mergekit", action="store_true", help="time our side only (e.g. on a GPU machine)")
    ap.add_argument("--dtypes", default="bfloat16,float32")
    ap.add_argument("--methods", default="linear,ties,dare_ties,slerp")
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--layers", type=int, default=20)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=str(RESULTS / "merge.json"))
    ap.add_argument("--work", type=Path, default=WORK, help="where the family, configs and outputs go")
    ap.add_argument("--pretouch-gb", type=float, default=3.0,
                    help="GB of memory touched and freed before each timed command (0: none; see the docstring)")
    ap.add_argument("--table", action="store_true", help="print docs/merge.md's table from --out and exit")
    args = ap.parse_args(argv)
    if args.table:
        print(markdown_table(json.loads(Path(args.out).read_text())))
        return 0
    if args.no_mergekit:
        args.mergekit = None
    elif not args.mergekit or not Path(args.mergekit).exists():
        print("mergekit-yaml not found: pass --mergekit, set SIMMERGE_MERGEKIT_YAML, run .ci/setup-mergekit, or "
              "pass --no-mergekit", file=sys.stderr)
        return 2
    found = shutil.which("simmerge") or str(Path(sys.executable).parent / "simmerge")
    simmerge = [found] if Path(found).exists() else [sys.executable, "-m", "simmerge_bandit"]
    import torch

    args.work.mkdir(parents=True, exist_ok=True)
    paths = make_family(args.work / ("family" if args.layers == 20 else f"family-{args.layers}"), args.layers)
    n_params = json.loads((paths["base"] / "model.safetensors.index.json").read_text())["metadata"]["total_size"] // 2
    memcpy = memcpy_bandwidth(args.device)
    loops = compiled_loops() if args.device == "cpu" else None
    results = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
                           "torch_threads_default": torch.get_num_threads(), "device": args.device,
                           "gpu": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else None},
               "family": {"params_per_model": n_params, "dtype": "bfloat16", "models": 3,
                          "bytes_per_model": n_params * 2},
               "memcpy_gb_per_s": memcpy, "goals": {"speedup": GOALS, "merge_over_memcpy": BANDWIDTH_GOAL},
               "compiled_loops": loops, "pretouch_gb": args.pretouch_gb, "runs": []}
    for _ in range(args.runs):
        results["runs"].append(run_once(paths, args.dtypes.split(","), args.methods.split(","), args, simmerge,
                                        memcpy))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
