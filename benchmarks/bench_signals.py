"""Benchmark of the similarity signals (issue 5). Writes benchmarks/results/signals.json.

1. Signature cost against its peer, one plain forward pass (logits only) over the same probes with the same
   batching, on a loaded model: goal <= 1.2x. With 1 and 2 torch threads. The structural pass is compared with a plain read of the same
   safetensors tensors (model and base), and the whole per-model cost (load + both passes) with load + plain
   forward.
2. Features of all ordered pairs of 1,000 synthetic signatures (2 CPU threads), shaped like those of a 32-layer,
   4096-wide model with the default configuration: goal <= 10 s. Its peer is the per-pair path (the same code
   called one pair at a time), timed on a sample of pairs and extrapolated. Run for full distributions (a
   character vocabulary, as in the micro-zoo) and for top-64 distributions over a 32k vocabulary. Also end to end
   through the store: cold (signatures read from DuckDB) and warm (in-process memo). With 1 and 2 torch threads.
3. Model loads for N models and two tasks: must be N, then 0 on a second call.

Other engineers share this machine's 2 cores: the load average is recorded before and after each part, timings
are the best of several repeats, and the pairwise part also records process CPU time (with one thread, about what
the wall time would be on an otherwise idle core).

    python benchmarks/bench_signals.py [--models 1000] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from simmerge_bandit.signals import SignatureConfig, cache, features, functional, structural  # noqa: E402
from simmerge_bandit.signals.cache import Signature  # noqa: E402

CFG = SignatureConfig()


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def _best(fn, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


# ---------------------------------------------------------------------------------------------------------------
# 1. signature cost


def _probe_prompts(n: int, seed: int = 0) -> list[str]:
    from simmerge_bandit.zoo_tasks import TASKS, task_rows

    names = sorted(TASKS)
    per = max(1, n // len(names))
    out = []
    for i, t in enumerate(names):
        out += [r["prompt"] for r in task_rows(t, per, seed + i)]
    return out[:n]


def bench_signature(root: Path, hidden: int, layers: int, n_probes: int, repeats: int) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    from simmerge_bandit.checkpoint import read_checkpoint
    from simmerge_bandit.tokenizer import VOCAB_SIZE, char_tokenizer

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB_SIZE, hidden_size=hidden, intermediate_size=4 * hidden,
                      num_hidden_layers=layers, num_attention_heads=max(1, hidden // 64) * 2,
                      num_key_value_heads=max(1, hidden // 64), max_position_embeddings=128,
                      tie_word_embeddings=False)
    paths = {}
    for name, seed in (("base", 0), ("ft", 1)):
        torch.manual_seed(seed)
        m = LlamaForCausalLM(cfg)
        paths[name] = root / f"sig-{hidden}x{layers}-{name}"
        m.save_pretrained(paths[name])
        char_tokenizer().save_pretrained(paths[name])
    prompts = _probe_prompts(n_probes)
    tok = functional.load_tokenizer(paths["ft"], "ft")
    probes = functional.tokenize_probes(tok, prompts, CFG, model_name="ft", vocab_size=VOCAB_SIZE)
    t_load = _best(lambda: functional.load_model(paths["ft"], "cpu"), repeats)
    model = functional.load_model(paths["ft"], "cpu")
    functional.plain_forward(model, probes, CFG, "cpu")               # warm-up
    t_plain = _best(lambda: functional.plain_forward(model, probes, CFG, "cpu"), repeats)
    t_sig = _best(lambda: functional.extract(model, probes, CFG, model_name="ft", device="cpu"), repeats)
    ck, ck0 = read_checkpoint(paths["ft"]), read_checkpoint(paths["base"])

    def plain_read():
        ra, rb = structural.TensorReader(ck), structural.TensorReader(ck0)
        for name in ck.tensors:
            float((ra.get(name).float() - rb.get(name).float()).sum())

    t_read = _best(plain_read, repeats)
    t_struct = _best(lambda: structural.compute(ck, ck0, CFG), repeats)
    n_params = sum(p.numel() for p in model.parameters())
    return {"hidden": hidden, "layers": layers, "params": n_params, "probes": len(prompts),
            "positions": int(sum(len(x) for x in probes.ids)), "load_s": t_load, "plain_forward_s": t_plain,
            "functional_signature_s": t_sig, "functional_vs_plain_forward": t_sig / t_plain,
            "plain_weight_read_s": t_read, "structural_signature_s": t_struct,
            "structural_vs_plain_read": t_struct / t_read,
            "per_model_total_s": t_load + t_sig + t_struct, "load_plus_plain_forward_s": t_load + t_plain,
            "per_model_total_vs_load_plus_plain_forward": (t_load + t_sig + t_struct) / (t_load + t_plain)}


# ---------------------------------------------------------------------------------------------------------------
# 2. pairwise features over synthetic signatures


def _llama7b_shapes() -> dict:
    mats = {"self_attn.q_proj.weight": [4096, 4096], "self_attn.k_proj.weight": [1024, 4096],
            "self_attn.v_proj.weight": [1024, 4096], "self_attn.o_proj.weight": [4096, 4096],
            "mlp.gate_proj.weight": [14336, 4096], "mlp.up_proj.weight": [14336, 4096],
            "mlp.down_proj.weight": [4096, 14336], "input_layernorm.weight": [4096],
            "post_attention_layernorm.weight": [4096]}
    shapes = {f"model.layers.{i}.{n}": ["BF16", s] for i in range(32) for n, s in mats.items()}
    shapes.update({"model.embed_tokens.weight": ["BF16", [128256, 4096]], "lm_head.weight": ["BF16", [128256, 4096]],
                   "model.norm.weight": ["BF16", [4096]]})
    return shapes


def synthetic_signatures(M: int, vocab: int, topk: int | None, seed: int = 0) -> tuple[list, list]:
    """Signatures with the shapes the default config gives a 32-layer, 4096-wide model; a family around a base."""
    rng = np.random.default_rng(seed)
    P, J, nh, m, S = CFG.max_positions, CFG.max_layers, CFG.state_positions, CFG.state_proj_dim, CFG.js_positions
    layout = structural.make_layout(_llama7b_shapes(), CFG)
    js_rows = functional._even_subset(P, S).astype(np.int32)
    base_states = rng.normal(size=(J, nh, 4096)).astype(np.float32)
    if topk is None:
        base_logits = rng.normal(size=(P, vocab)) * 3
    else:
        base_ids = np.stack([rng.choice(vocab, 2 * topk, replace=False) for _ in range(P)])   # (P, 2k) candidates
        base_lp = np.sort(rng.normal(size=(P, 2 * topk)) * 2)[:, ::-1] - 3.0
    base_tv = rng.normal(size=layout.sketch_dims).astype(np.float32)
    fs, ss = [], []
    for i in range(M):
        meta = {"vocab_size": vocab, "vocab_hash": "v", "ids_hash": "i", "n_positions": P,
                "representation": "full" if topk is None else "topk", "k": vocab if topk is None else topk,
                "n_layers": 32, "layers": functional.sampled_layers(32, J), "hidden_size": 4096,
                "n_state_positions": nh, "proj_dim": m, "n_js_positions": S}
        if topk is None:
            lg = base_logits + rng.normal(size=(P, vocab)) * 0.7
            lp = (lg - np.log(np.exp(lg).sum(-1, keepdims=True))).astype(np.float32)
            arrays = {"logp": lp, "top1": lp.argmax(-1).astype(np.int32)}
            ent = -(np.exp(lp) * lp).sum(-1)
        else:
            noisy = base_lp + rng.normal(size=base_lp.shape) * 0.5
            order = np.argsort(-noisy, axis=1)[:, :topk]                 # each model keeps its own top-k of 2k
            ids = np.take_along_axis(base_ids, order, 1).astype(np.int32)
            lp = np.take_along_axis(noisy, order, 1).astype(np.float32)
            arrays = {"logp": lp, "ids": ids, "logz": np.zeros(P, np.float32), "top1": ids[:, 0].copy()}
            ent = np.full(P, 3.0)
        states = base_states + rng.normal(size=base_states.shape).astype(np.float32) * 0.5
        grams = np.stack([functional.gram_vector(torch.from_numpy(states[j])) for j in range(J)])
        proj = states[:, :, :m] / np.linalg.norm(states[:, :, :m], axis=2, keepdims=True) / np.sqrt(nh)
        arrays.update(entropy=ent.astype(np.float32), gram=grams, proj=proj.reshape(J, -1).astype(np.float32),
                      js_rows=js_rows, positions=np.zeros((P, 2), np.int32), state_rows=np.arange(nh, dtype=np.int32))
        fs.append(Signature("functional", f"fp{i}", "probes", "bench", f"m{i}", meta=meta, arrays=arrays))
        smeta = {**layout.meta(), "tv_sq_norm": 1.0 + rng.random(), "base_sq_norm": 1e4,
                 "layer_groups": [g for g, n in enumerate(layout.groups) if n.startswith("layer.")]}
        sarr = {"sketch": (base_tv * 0.3 + rng.normal(size=layout.sketch_dims)).astype(np.float32),
                "group_sq": np.ones(len(layout.groups)), "sample": rng.normal(size=layout.n_sample).astype(np.float32),
                "sample_top": (rng.random(layout.n_sample) < 0.2).astype(np.uint8)}
        ss.append(Signature("structural", f"fp{i}", "basefp", "bench", f"m{i}", meta=smeta, arrays=sarr))
    return fs, ss


def bench_pairs(M: int, vocab: int, topk: int | None, repeats: int, naive_pairs: int = 200) -> dict:
    fs, ss = synthetic_signatures(M, vocab, topk)
    ia, ib = np.nonzero(~np.eye(M, dtype=bool))
    load0 = _load()
    times, cpu = [], []
    for _ in range(repeats):
        features.clear_stacks()
        t0, c0 = time.perf_counter(), time.process_time()
        X = features.compute_matrix(fs, ss, ia, ib)
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    t0 = time.perf_counter()
    X2 = features.compute_matrix(fs, ss, ia, ib)                      # stacks cached, as in a repeated suggest call
    warm = time.perf_counter() - t0
    assert np.array_equal(np.isnan(X), np.isnan(X2)) and np.isfinite(X).all()
    rng = np.random.default_rng(1)
    sample = rng.choice(len(ia), naive_pairs, replace=False)
    features.clear_stacks()
    t0 = time.perf_counter()
    for r in sample:
        features.compute_matrix([fs[ia[r]], fs[ib[r]]], [ss[ia[r]], ss[ib[r]]], np.array([0]), np.array([1]))
        features.clear_stacks()
    per_pair = (time.perf_counter() - t0) / naive_pairs
    return {"models": M, "ordered_pairs": int(len(ia)), "vocab": vocab, "representation": "full" if topk is None
            else f"top-{topk}", "seconds": min(times), "seconds_all_repeats": times,
            "cpu_seconds_all_repeats": cpu, "seconds_stacks_cached": warm,
            "per_pair_path_seconds_per_pair": per_pair, "per_pair_path_extrapolated_s": per_pair * len(ia),
            "speedup_vs_per_pair": per_pair * len(ia) / min(times), "goal_s": 10.0,
            "meets_goal": min(times) <= 10.0, "load_before": load0, "load_after": _load()}


def bench_store_end_to_end(M: int, root: Path) -> dict:
    """feature_matrix through the catalog and DuckDB: cold (read every signature) and warm (memo)."""
    from simmerge_bandit import signals
    from simmerge_bandit.signals.api import _probes
    from simmerge_bandit.catalog import Catalog
    from simmerge_bandit.store import Store

    store = Store.open(root / "e2e-home")
    cat = Catalog(store)
    data = root / "e2e.jsonl"
    data.write_text(json.dumps({"prompt": "x", "answer": "y"}) + "\n")
    cat.add_task("t", data)
    probes = _probes(cat, "t")
    fs, ss = synthetic_signatures(M, 100, None)
    t_save = time.perf_counter()
    store.execute("INSERT INTO models (name, path, base, fingerprint, tensors, config) VALUES "
                  "('base', '/nonexistent', NULL, 'basefp', '{}', '{}')")
    for i, (f, s) in enumerate(zip(fs, ss)):
        store.execute("INSERT INTO models (name, path, base, fingerprint, tensors, config) VALUES (?,?,?,?,?,?)",
                      [f"m{i}", "/nonexistent", "base", f"fp{i}", "{}", "{}"])
        cache.save_signature(store, Signature("functional", f"fp{i}", probes.hash, CFG.version("functional"),
                                              f"m{i}", meta=f.meta, arrays=f.arrays))
        cache.save_signature(store, Signature("structural", f"fp{i}", "basefp", CFG.version("structural"),
                                              f"m{i}", meta=s.meta, arrays=s.arrays))
    saved = time.perf_counter() - t_save
    pairs = [(f"m{a}", f"m{b}") for a in range(M) for b in range(M) if a != b]
    cache.MEMO.clear()
    features.clear_stacks()
    t0 = time.perf_counter()
    X, _ = signals.feature_matrix(store, pairs, "t")
    cold = time.perf_counter() - t0
    t0 = time.perf_counter()
    signals.feature_matrix(store, pairs, "t")
    warm = time.perf_counter() - t0
    store.close()
    return {"models": M, "ordered_pairs": len(pairs), "save_all_signatures_s": saved, "cold_s": cold, "warm_s": warm,
            "finite": bool(np.isfinite(X).all()), "load": _load()}


# ---------------------------------------------------------------------------------------------------------------
# 3. model loads


def bench_loads(root: Path) -> dict:
    from simmerge_bandit import signals
    from simmerge_bandit.catalog import Catalog
    from simmerge_bandit.store import Store
    from simmerge_bandit.zoo import build_zoo

    zoo = root / "zoo"
    manifest = build_zoo(zoo, preset="unit", progress=False)
    store = Store.open(root / "loads-home")
    cat = Catalog(store)
    names = []
    for m in manifest["models"]:
        cat.add_model(zoo / m["path"], name=m["name"], base=m["base"])
        names.append(m["name"])
    tasks = [t["name"] for t in manifest["tasks"][:2]]
    for t in manifest["tasks"][:2]:
        cat.add_task(t["name"], zoo / t["eval"], probes=zoo / t["probes"])
    calls = []
    real = functional.load_model
    functional.load_model = lambda p, d: (calls.append(str(p)), real(p, d))[1]
    try:
        first = signals.ensure_signatures(store, names, tasks)
        second = signals.ensure_signatures(store, names, tasks)
        signals.feature_matrix(store, [(a, b) for a in names for b in names], tasks[0])
    finally:
        functional.load_model = real
    store.close()
    return {"models": len(names), "tasks": len(tasks), "loads_first_call": first, "loads_second_call": second,
            "load_model_calls_including_all_pairs_features": len(calls), "ok": first == len(calls) == len(names)
            and second == 0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", type=int, default=1000)
    ap.add_argument("--quick", action="store_true", help="fewer repeats and models; prints, writes nothing")
    args = ap.parse_args()
    repeats = 1 if args.quick else 3
    M = 100 if args.quick else args.models
    out: dict = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
                             "load_at_start": _load()},
                 "note": "2 shared CPU cores; other engineers' jobs were running (see the load averages)"}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        out["loads"] = bench_loads(root)
        print("loads", out["loads"], flush=True)
        out["signature"] = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            for h, layers in ((64, 2), (512, 8)):
                r = {"torch_threads": threads, **bench_signature(root, h, layers, 64, repeats)}
                out["signature"].append(r)
                print("signature", {k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()},
                      flush=True)
        out["pairs"] = []
        for vocab, topk in ((100, None), (32000, 64)):
            for threads in (1, 2):
                torch.set_num_threads(threads)
                r = {"torch_threads": threads, **bench_pairs(M, vocab, topk, repeats)}
                out["pairs"].append(r)
                print("pairs", r, flush=True)
        torch.set_num_threads(1)
        out["end_to_end"] = {"torch_threads": 1, **bench_store_end_to_end(M, root)}
        print("end_to_end", out["end_to_end"], flush=True)
    out["machine"]["load_at_end"] = _load()
    if args.quick:
        return
    dest = HERE / "results" / "signals.json"
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(json.dumps(out, indent=2))
    print(f"wrote {dest}")


if __name__ == "__main__":
    main()
