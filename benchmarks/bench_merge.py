"""Merge executor benchmark: ours vs mergekit-yaml on the same configs, in the same run.

Generates (once, under benchmarks/_work/, git-ignored) a Llama-like bf16 family of ~0.3 B parameters: a base and
two experts (base + small noise), each sharded. For linear, ties, dare_ties and slerp it writes one mergekit
config, runs ``simmerge merge CONFIG`` and ``mergekit-yaml CONFIG`` as separate processes, and records wall time
and peak RSS of each (ratios mergekit / ours), our throughput (bytes read + written per second) against the
machine's measured memory-copy bandwidth, and how far the two outputs are apart.

    python benchmarks/bench_merge.py [--mergekit PATH] [--methods linear,ties] [--layers 20] [--device cpu]

mergekit: ``--mergekit``, else $SIMMERGE_MERGEKIT_YAML, else ``mergekit-yaml`` on PATH (``.ci/setup-mergekit``
makes one). Writes benchmarks/results/merge.json (or --out).
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

import torch

HERE = Path(__file__).resolve().parent
WORK = HERE / "_work" / "merge"
RESULTS = HERE / "results"


def make_family(root: Path, layers: int, hidden: int = 1024, inter: int = 2816, vocab: int = 32000,
                shard_bytes: int = 200_000_000) -> dict[str, Path]:
    """Base + 2 experts, bf16, sharded; deterministic. Reused when already there."""
    from safetensors.torch import save_file

    names = ["base", "expert_a", "expert_b"]
    paths = {n: root / n for n in names}
    if all((p / "model.safetensors.index.json").is_file() for p in paths.values()):
        return paths
    shutil.rmtree(root, ignore_errors=True)
    heads, kv, hd = 16, 4, 64
    shapes = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update({p + "self_attn.q_proj.weight": (heads * hd, hidden), p + "self_attn.k_proj.weight": (kv * hd, hidden),
                       p + "self_attn.v_proj.weight": (kv * hd, hidden), p + "self_attn.o_proj.weight": (hidden, heads * hd),
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


def configs(paths: dict[str, Path]) -> dict[str, dict]:
    base, a, b = (str(paths[n]) for n in ("base", "expert_a", "expert_b"))
    common = {"dtype": "float32", "out_dtype": "bfloat16"}
    return {
        "linear": {"merge_method": "linear", "models": [{"model": a, "parameters": {"weight": 1.0}},
                                                        {"model": b, "parameters": {"weight": 1.0}}], **common},
        "ties": {"merge_method": "ties", "base_model": base,
                 "models": [{"model": a, "parameters": {"weight": 1.0, "density": 0.5}},
                            {"model": b, "parameters": {"weight": 1.0, "density": 0.5}}], **common},
        "dare_ties": {"merge_method": "dare_ties", "base_model": base,
                      "models": [{"model": a, "parameters": {"weight": 1.0, "density": 0.5}},
                                 {"model": b, "parameters": {"weight": 1.0, "density": 0.5}}], **common},
        "slerp": {"merge_method": "slerp", "base_model": a, "models": [{"model": a}, {"model": b}],
                  "parameters": {"t": 0.3}, **common},
    }


_MEASURE = ("import json, resource, subprocess, sys, time\n"
            "t = time.perf_counter()\n"
            "r = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)\n"
            "w = time.perf_counter() - t\n"
            "print(json.dumps({'rc': r.returncode, 'wall_s': w, 'peak_rss_bytes': "
            "resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024, 'stderr': r.stderr.decode()[-2000:]}))")


def measure(cmd: list[str]) -> dict:
    """Wall time and peak RSS of one command, measured by a fresh parent process (RUSAGE_CHILDREN)."""
    out = subprocess.run([sys.executable, "-c", _MEASURE, *cmd], capture_output=True, text=True, check=True)
    res = json.loads(out.stdout)
    if res["rc"] != 0:
        raise RuntimeError(f"{cmd[0]} failed:\n{res['stderr']}")
    return res


def memcpy_bandwidth(nbytes: int = 512 << 20) -> dict:
    """Bytes moved (read + written) per second by a large copy, with torch's default threads and with one."""
    src = torch.empty(nbytes, dtype=torch.uint8).fill_(1)
    dst = torch.empty_like(src)
    dst.copy_(src)
    res = {}
    for threads in (torch.get_num_threads(), 1):
        old = torch.get_num_threads()
        torch.set_num_threads(threads)
        best = min(_time(lambda: dst.copy_(src)) for _ in range(5))
        torch.set_num_threads(old)
        res[f"threads_{threads}"] = 2 * nbytes / best / 1e9
    return res


def _time(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def compare(ours: Path, theirs: Path) -> dict:
    """Fraction of differing elements and the largest relative difference (bf16 outputs)."""
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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mergekit", default=os.environ.get("SIMMERGE_MERGEKIT_YAML") or shutil.which("mergekit-yaml"))
    ap.add_argument("--methods", default="linear,ties,dare_ties,slerp")
    ap.add_argument("--layers", type=int, default=20)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=str(RESULTS / "merge.json"))
    args = ap.parse_args(argv)
    if not args.mergekit or not Path(args.mergekit).exists():
        print("mergekit-yaml not found: pass --mergekit, set SIMMERGE_MERGEKIT_YAML, or run .ci/setup-mergekit",
              file=sys.stderr)
        return 2
    simmerge = shutil.which("simmerge") or str(Path(sys.executable).parent / "simmerge")
    paths = make_family(WORK / "family", args.layers)
    n_params = sum(json.loads((paths["base"] / "model.safetensors.index.json").read_text())["metadata"]
                   ["total_size"] for _ in [0]) // 2
    cfgs = configs(paths)
    import yaml

    results = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
                           "torch_threads": torch.get_num_threads(), "load_before": os.getloadavg()},
               "family": {"params_per_model": n_params, "dtype": "bfloat16", "models": 3,
                          "bytes_per_model": n_params * 2},
               "memcpy_gb_per_s": memcpy_bandwidth(), "methods": {}}
    for m in args.methods.split(","):
        cfg_path = WORK / f"{m}.yml"
        cfg_path.write_text(yaml.safe_dump(cfgs[m], sort_keys=False))
        out_ours, out_mk = WORK / f"out_ours_{m}", WORK / f"out_mk_{m}"
        shutil.rmtree(out_mk, ignore_errors=True)
        ours = measure([simmerge, "merge", str(cfg_path), "--out", str(out_ours), "--force", "--device",
                        args.device, "--json"])
        stats = json.loads((out_ours / "provenance.json").read_text())["stats"]
        mk = measure([args.mergekit, str(cfg_path), str(out_mk), "--quiet", "--random-seed", "0"]
                     + (["--cuda"] if args.device.startswith("cuda") else []))
        moved = stats["bytes_read"] + stats["bytes_written"]
        entry = {
            "ours": {"wall_s": round(ours["wall_s"], 3), "peak_rss_bytes": ours["peak_rss_bytes"],
                     "merge_s": stats["seconds"], "bytes_read": stats["bytes_read"],
                     "bytes_written": stats["bytes_written"],
                     "gb_per_s_wall": round(moved / ours["wall_s"] / 1e9, 3),
                     "gb_per_s_merge": round(moved / stats["seconds"] / 1e9, 3)},
            "mergekit": {"wall_s": round(mk["wall_s"], 3), "peak_rss_bytes": mk["peak_rss_bytes"]},
            "speedup_wall": round(mk["wall_s"] / ours["wall_s"], 2),
            "rss_ratio_ours_over_mergekit": round(ours["peak_rss_bytes"] / mk["peak_rss_bytes"], 3),
            "fraction_of_memcpy_bandwidth": round(moved / stats["seconds"] / 1e9
                                                  / results["memcpy_gb_per_s"][f"threads_{torch.get_num_threads()}"], 3),
            "outputs": compare(out_ours, out_mk),
            "load_after": os.getloadavg(),
        }
        results["methods"][m] = entry
        print(json.dumps({m: entry}), flush=True)
        shutil.rmtree(out_ours, ignore_errors=True)
        shutil.rmtree(out_mk, ignore_errors=True)
    results["machine"]["load_after"] = os.getloadavg()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
