"""Budgeted search benchmark: the best merge for a target within N merge-and-evaluate runs, against random search,
Optuna (TPE) and CMA-ES over mergekit-evolve's genome, with real merges and evaluations on the micro-zoo.

For each held-out target of the zoo (single tasks and two-task targets; held out = tasks the predictor was not
fitted on), every method gets the same catalog, the same evaluator and the same budget, and reports the best
*aggregate score* it found after each evaluation:

- ``ours``: the engine's search loop (``simmerge_bandit.search.run_search``) with the SimMerge predictor fitted on
  the training tasks' rows of the zoo's merge table, over the zoo's grid operators and the families below;
- ``random``: uniform over the same candidate space (ordered pair, method, continuous parameters);
- ``optuna``: Optuna's TPE sampler (library defaults) over the same space: a categorical pair, a categorical
  method, the method's parameters as conditional floats;
- ``cma-ties`` / ``cma-ta``: the ``cma`` package as mergekit-evolve drives it: one genome of per-model weights
  (and densities for TIES) over the target's experts (the models tagged with a target task), merged n-way with
  the zoo's base; mergekit-evolve's defaults: ``x0`` = weight 1/n and density 1, ``sigma0`` = 1/6, weights taken
  as absolute values, densities as absolute values clipped to [0, 1], ``normalize`` on for TIES and off for task
  arithmetic, one parameter set for all layers (``layer_granularity`` 0), the default population size.

The aggregate score of a merge on a target is the weighted mean over its tasks of
``clip(raw score / reference, 0, 2)``, where a task's reference is the best raw score of any model in the catalog
on it. The reference is the same for every candidate, so a merge of two models that know little of the target
cannot look good by being normalized against weak sources (which the per-merge reward, normalized against the
merge's own sources, would allow). Every method optimizes this same number; ``ours`` receives it as its reward.

Metric: best aggregate score after B evaluations divided by the best aggregate score any method found on that
target in all its runs (every method is run once with 200 evaluations for this reference, which is reported);
evaluations needed to reach 90% and 95% of the reference. Budgets 5, 10, 20 and 50; 10 seeds.

Cost control: merges run in memory (the zoo's models are tiny) with the executor's kernels; every evaluation is
cached on disk, keyed by (models, method, parameters rounded to 1e-3, merge seed, task). Parameters are rounded
*before* merging, so a cached score is exactly the score of the merge it names. The merge seed is derived from
the candidate (the same candidate gives the same merge in every method's run). Seed 0 of every method is its
200-evaluation reference run; its first 50 evaluations are its budgeted run (random, Optuna and CMA-ES do not
depend on the budget, so that prefix is what a 50-evaluation run does).

    python benchmarks/bench_search.py --zoo DIR --merge-table TABLE.parquet   # the full run
    python benchmarks/bench_search.py --zoo DIR --quick                        # smoke run (minutes)
    python benchmarks/bench_search.py --table                                  # docs/search.md's tables
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
BUDGETS = (5, 10, 20, 50)
REFERENCE_BUDGET = 200
METHODS = ("ours", "random", "optuna", "cma-ties", "cma-ta")
PEERS = ("random", "optuna", "cma-ties", "cma-ta")
LEVELS = (0.90, 0.95)
#: Version of this script's search logic (the peers, the candidate space, the engine adapter, the metric's
#: inputs): finished runs are reused across invocations only under the same version (bump it when they change).
BENCH_VERSION = 4  # 2: the space holds the target's group (the engine's n-way candidate) besides the pairs;
#                    3: and the group less one model; 4: and a group's focused weights (candidates.FOCUS)
#: goals of issue 16 (section 3)
GOALS = {"ours_at_10_min": 0.95, "speedup_min": 3.0}

#: The continuous families of the candidate space (method -> parameter -> (low, high)) and the parameters they
#: fix. Each range spans the zoo's grid operators of that method (zoo.REALISTIC_OPERATORS), so every grid
#: operator is a point of the space random search and Optuna sample from. Chosen before any search was run.
FAMILIES: dict[str, dict[str, tuple[float, float]]] = {
    "task_arithmetic": {"lambda": (0.2, 1.0)},
    "ties": {"density": (0.2, 0.9)},
    "dare_ties": {"density": (0.3, 0.9)},
    "dare_linear": {"density": (0.5, 0.95)},
    "breadcrumbs": {"density": (0.6, 0.95)},
    "della": {"density": (0.3, 0.7)},
    "slerp": {"t": (0.1, 0.9)},
}
FIXED: dict[str, dict] = {"breadcrumbs": {"gamma": 0.01}, "della": {"epsilon": 0.15}}
#: Methods of the space without a continuous parameter (one point each, as in the grid).
POINTS = ("linear", "nuslerp", "model_stock")
SPACE_METHODS = (*FAMILIES, *POINTS)

#: mergekit-evolve's genome (mergekit/evo/genome.py): the parameters per model of each method, in genome order.
GENOME_PARAMS = {"ties": ("weight", "density"), "task_arithmetic": ("weight",)}
CMA_METHODS = {"cma-ties": "ties", "cma-ta": "task_arithmetic"}
SIGMA0 = 1 / 6           # mergekit-evolve's --sigma0 default
#: Policy snapshots of ours' runs: each run's state home is thrown away after it, so persisting the policy after
#: every update (the engine's default, for crash safety) would only cost time; decisions are the same.
SNAPSHOT_EVERY = 10_000
MIN_DENSITY = 1e-3       # our density is in (0, 1]; mergekit's clip to [0, 1] could give 0
WEIGHT_MAX = 10.0        # our weights' bound (methods.base.SCALE_BOUNDS)


# ---------------------------------------------------------------------------------------------------------------
# candidates and the metric


def _digest(obj) -> str:
    return hashlib.blake2b(json.dumps(obj, sort_keys=True).encode(), digest_size=12).hexdigest()


def _file_digest(path: Path) -> str:
    return hashlib.blake2b(Path(path).read_bytes(), digest_size=12).hexdigest()


def run_code(method: str) -> list:
    """What a method's runs depend on: :data:`BENCH_VERSION` (this script's search logic) and the package's code:
    the merge kernels and the metric for a peer, every module and this script for ours (the engine)."""
    if method == "ours":  # its adapter is this script: any change of it counts
        return [BENCH_VERSION, code_digest_of([""]), _file_digest(Path(__file__))]
    return [BENCH_VERSION, code_digest_of(["methods", "evaluators/exact_match.py"])]


def code_digest_of(paths: Sequence[str]) -> str:
    """Hash of the package's modules at ``paths`` (files or folders), without this script."""
    import simmerge_bandit

    pkg = Path(simmerge_bandit.__file__).parent
    files = sorted(f for p in paths for f in ((pkg / p).rglob("*.py") if (pkg / p).is_dir() else [pkg / p]))
    return _digest([_file_digest(f) for f in files])


def _round(v):
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return v
    return round(float(v), 3)


def canonical_params(method: str, params: dict) -> dict:
    """The method's full parameter dict (defaults filled, values checked) with every number rounded to 1e-3; a
    per-model parameter may be a list (one value per model)."""
    from simmerge_bandit.methods import get_method

    spec = get_method(method)
    out = spec.defaults()
    for k, v in params.items():
        p = spec.param(k)
        out[k] = [p.coerce(_round(x)) for x in v] if isinstance(v, (list, tuple)) else p.coerce(_round(v))
    return {k: _round(v) if not isinstance(v, list) else v for k, v in out.items()}


@dataclass(frozen=True)
class Candidate:
    """One merge: the models in order (the first is slerp's base), the method and its parameters."""

    models: tuple[str, ...]
    method: str
    params_json: str

    @classmethod
    def of(cls, models: Sequence[str], method: str, params: dict) -> Candidate:
        return cls(tuple(models), method, json.dumps(canonical_params(method, params), sort_keys=True))

    @property
    def params(self) -> dict:
        return json.loads(self.params_json)

    def merge_seed(self) -> int:
        h = hashlib.blake2b(json.dumps([self.models, self.method, self.params_json]).encode(), digest_size=8)
        return int.from_bytes(h.digest(), "little") >> 33

    def as_json(self) -> dict:
        return {"models": list(self.models), "method": self.method, "params": self.params}


def aggregate(scores: dict[str, float | None], weights: dict[str, float], refs: dict[str, float]) -> float:
    """Weighted mean over the target's tasks of clip(raw / reference, 0, 2); a failed evaluation counts 0."""
    total = 0.0
    for t, w in weights.items():
        s = scores.get(t)
        if s is None or not math.isfinite(s):
            continue
        total += w * (min(max(s / refs[t], 0.0), 2.0) if refs[t] > 0 else (1.0 if s <= 0 else 2.0))
    return total


def best_so_far(rewards: Sequence[float]) -> list[float]:
    out, best = [], -math.inf
    for r in rewards:
        best = max(best, r)
        out.append(best)
    return out


def evals_to_reach(curve: Sequence[float], level: float) -> int | None:
    """1-based number of evaluations after which the best-so-far ``curve`` is at least ``level`` (None: never)."""
    for i, v in enumerate(curve):
        if v >= level - 1e-12:
            return i + 1
    return None


# ---------------------------------------------------------------------------------------------------------------
# the search space of a target (shared by ours' families, random search and Optuna) and mergekit-evolve's genome


@dataclass
class Space:
    """Ordered pairs of experts sharing a base, at least one tagged with a target task (the engine's rule,
    ``Engine.pairs``), and the target's group (every expert tagged with a target task, when there are at least
    three: the engine's n-way candidate, merged with each model at 2/n of the method's weight as the engine
    does, ``candidates.group_operator``) with its subsets less one model (``candidates.group_sets``), times the
    methods of :data:`SPACE_METHODS` that can merge that many models, with the ranges of :data:`FAMILIES`. A
    group merged by a method with per-model weights also takes a focus: 0 (one weight for all) or one of the
    engine's ``candidates.FOCUS``, each member weighted by its known score on the target as the engine does
    (``candidates.focused_weights``; ``known`` holds each member's score over the best member's per task,
    weighted as the target weighs them)."""

    pairs: list[tuple[str, ...]]
    methods: tuple[str, ...] = SPACE_METHODS
    #: each expert's known raw score per task (the manifest's), and the target's weights
    known: dict[str, dict[str, float]] = field(default_factory=dict)
    weights: dict[str, float] = field(default_factory=dict)

    @classmethod
    def of(cls, manifest: dict, tasks: Sequence[str], weights: dict[str, float] | None = None) -> Space:
        experts = [m for m in manifest["models"] if m["base"] is not None]
        tagged = {m["name"] for m in experts if set(m["tasks"]) & set(tasks)}
        pairs: list[tuple[str, ...]] = [
            (a["name"], b["name"]) for a in experts for b in experts
            if a["name"] != b["name"] and a["base"] == b["base"]
            and (not tagged or a["name"] in tagged or b["name"] in tagged)]
        from simmerge_bandit import candidates

        for base in dict.fromkeys(m["base"] for m in experts):  # the engine's groups and subsets: per base
            tags_of = {m["name"]: set(m["tasks"]) for m in experts if m["base"] == base}
            if len(candidates.tagged(tags_of, set(tasks))) > candidates.MAX_GROUP:
                raise ValueError(f"more than {candidates.MAX_GROUP} experts of one base are tagged with "
                                 f"{list(tasks)}: the engine would choose its group by known score, which this "
                                 f"space does not")
            pairs.extend(candidates.group_sets(tags_of, set(tasks)))
        weights = weights or {t: 1 / len(tasks) for t in tasks}
        return cls(pairs, known={m["name"]: m.get("scores") or {} for m in experts}, weights=dict(weights))

    def focuses(self, models: Sequence[str], method: str) -> list[float]:
        """The focus values a model set takes with ``method``: 0 alone for a pair or a method without per-model
        weights (and for a group with a member of no known score, or whose members all score alike, as the engine
        offers none there)."""
        from simmerge_bandit import candidates

        if len(models) < 3 or not candidates.weighs_each_model({"method": method}):
            return [0.0]
        if any(t not in self.known.get(m, {}) for m in models for t in self.weights):
            return [0.0]
        s = self.scores(models)
        return [0.0] if max(s) - min(s) <= 1e-9 else [0.0, *candidates.FOCUS]

    def scores(self, models: Sequence[str]) -> list[float]:
        """Each member's known score on the target over the best member's, per task, weighted by the target (as
        the engine computes it: ``candidates.relative_known``)."""
        from simmerge_bandit.candidates import relative_known
        from simmerge_bandit.target import Target

        rel = relative_known({m: self.known[m] for m in models}, Target.of(list(self.weights), self.weights))
        return [rel[m] for m in models]

    def methods_for(self, models: Sequence[str]) -> list[str]:
        from simmerge_bandit.methods import get_method

        return [m for m in self.methods if get_method(m).merges(len(models))]

    def candidate(self, pair: Sequence[str], method: str, values: dict, focus: float = 0.0) -> Candidate:
        params = {**FIXED.get(method, {}), **values}
        if len(pair) > 2:
            from simmerge_bandit.candidates import focused_weights, group_operator

            params = group_operator({"method": method, "params": params}, len(pair))["params"]
            if focus:
                params["weight"] = focused_weights(float(params["weight"]), self.scores(pair), focus)
        return Candidate.of(pair, method, params)

    def sample(self, rng) -> Candidate:
        """Uniform: a model set (a pair or the group), a method that can merge it, each parameter uniform in its
        range, a group's focus uniform among those it takes (:meth:`focuses`)."""
        pair = self.pairs[int(rng.integers(len(self.pairs)))]
        methods = self.methods_for(pair)
        method = methods[int(rng.integers(len(methods)))]
        values = {p: float(rng.uniform(lo, hi)) for p, (lo, hi) in FAMILIES.get(method, {}).items()}
        focuses = self.focuses(pair, method)
        return self.candidate(pair, method, values, focuses[int(rng.integers(len(focuses)))])

    def suggest(self, trial) -> Candidate:
        """Optuna's define-by-run encoding: categorical model set and method (the group's methods a categorical
        of their own), the method's parameters conditional, a group's focus a categorical when it takes one."""
        key = trial.suggest_categorical("pair", ["|".join(p) for p in self.pairs])
        models = tuple(key.split("|"))
        name = "method" if len(models) == 2 else "group_method"
        method = trial.suggest_categorical(name, self.methods_for(models))
        values = {p: trial.suggest_float(f"{method}.{p}", lo, hi) for p, (lo, hi) in FAMILIES.get(method, {}).items()}
        focuses = self.focuses(models, method)
        focus = trial.suggest_categorical("focus", focuses) if len(focuses) > 1 else 0.0
        return self.candidate(models, method, values, focus)


@dataclass
class Genome:
    """mergekit-evolve's genome for one method over ``models`` (layer_granularity 0, no filters): a flat vector
    of ``len(models) * len(GENOME_PARAMS[method])`` values, model-major, weight first."""

    models: list[str]
    method: str

    @property
    def n_params(self) -> int:
        return len(GENOME_PARAMS[self.method])

    def x0(self) -> list[float]:
        """mergekit-evolve's non-random initial genotype: weights 1/n, densities 1."""
        n = len(self.models)
        return [1 / n if j == 0 else 1.0 for _ in range(n) for j in range(self.n_params)]

    def decode(self, x: Sequence[float]) -> Candidate:
        n, k = len(self.models), self.n_params
        if len(x) != n * k:
            raise ValueError(f"genotype of {len(x)} values for {n} models x {k} parameters")
        params: dict = {}
        for j, name in enumerate(GENOME_PARAMS[self.method]):
            vals = [abs(float(x[i * k + j])) for i in range(n)]
            if name == "density":
                vals = [min(max(round(v, 3), MIN_DENSITY), 1.0) for v in vals]
            else:
                vals = [min(v, WEIGHT_MAX) for v in vals]
            params[name] = vals
        # mergekit-evolve's default: normalize for ties / dare_ties / linear, not for task arithmetic
        params["normalize"] = self.method in ("ties", "dare_ties", "linear")
        return Candidate.of(self.models, self.method, params)


def target_experts(manifest: dict, tasks: Sequence[str]) -> list[str]:
    return [m["name"] for m in manifest["models"] if m["base"] is not None and set(m["tasks"]) & set(tasks)]


# ---------------------------------------------------------------------------------------------------------------
# live evaluation with an on-disk cache


class Evaluator:
    """Merges candidates in memory and scores them with exact match on the zoo's eval sets; caches each
    (candidate, task) score in a JSON-lines file."""

    def __init__(self, zoo_dir: str | os.PathLike, cache_path: str | os.PathLike, *, limit: int | None = None):
        from simmerge_bandit.tokenizer import char_tokenizer
        from simmerge_bandit.zoo import (
            Arch,
            _fresh_model,
            _read_jsonl,
            load_manifest,
            load_state,
        )

        self.manifest = load_manifest(zoo_dir)
        root = Path(self.manifest["root"])
        self.by_name = {m["name"]: m for m in self.manifest["models"]}
        self.evals = {t["name"]: _read_jsonl(root / t["eval"])[:limit] for t in self.manifest["tasks"]}
        self.states = {m["name"]: load_state(root / m["path"]) for m in self.manifest["models"]}
        self.tok = char_tokenizer()
        self.shell = _fresh_model(Arch(**self.manifest["arch"]), 0)
        self.shell.eval()
        self.limit = limit
        # the merge kernels and the metric: a change of either makes every cached score stale
        self.code = code_digest_of(["methods", "evaluators/exact_match.py"])
        self.path = Path(cache_path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.cache: dict[str, float | None] = {}
        if self.path.exists():
            for line in self.path.read_text().splitlines():
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue  # a line cut by an interrupted run
                self.cache[rec["k"]] = rec["s"]
        self.hits = self.misses = self.failures = 0
        self.merge_s = self.eval_s = 0.0

    def _key(self, c: Candidate, task: str) -> str:
        return hashlib.blake2b(json.dumps([self.manifest["key"], self.code, self.limit, c.models, c.method,
                                           c.params_json, c.merge_seed(), task]).encode(), digest_size=16).hexdigest()

    def refs(self) -> dict[str, float]:
        """Per task, the best raw score of any catalog model (the manifest's scores on the full eval set)."""
        if self.limit is None:
            return {t: max(m["scores"][t] for m in self.manifest["models"]) for t in self.evals}
        from simmerge_bandit.evaluators.exact_match import exact_match_score

        out = {}
        for t, rows in self.evals.items():
            best = 0.0
            for m in self.manifest["models"]:
                self.shell.load_state_dict(self.states[m["name"]], strict=False)
                best = max(best, exact_match_score(self.shell, self.tok, rows)[0])
            out[t] = best
        return out

    def scores(self, c: Candidate, tasks: Sequence[str]) -> dict[str, float | None]:
        """Raw exact-match score of the merge on each task (None: the merge failed)."""
        from simmerge_bandit.evaluators.exact_match import exact_match_score
        from simmerge_bandit.methods import get_method
        from simmerge_bandit.zoo import _merge_states

        keys = {t: self._key(c, t) for t in tasks}
        todo = [t for t in tasks if keys[t] not in self.cache]
        self.hits += len(tasks) - len(todo)
        if todo:
            self.misses += len(todo)
            t0 = time.perf_counter()
            try:
                base = self.by_name[c.models[0]]["base"]
                merged = _merge_states(get_method(c.method), {"params": c.params},
                                       [self.states[n] for n in c.models], self.states[base], c.merge_seed())
                self.shell.load_state_dict(merged, strict=False)
                ok = True
            except Exception as e:  # noqa: BLE001 - a merge that fails scores nothing; counted and reported
                ok = False
                self.failures += 1
                print(f"merge failed: {c.as_json()}: {type(e).__name__}: {e}", file=sys.stderr)
            self.merge_s += time.perf_counter() - t0
            with self.path.open("a") as f:
                for t in todo:
                    t1 = time.perf_counter()
                    s = exact_match_score(self.shell, self.tok, self.evals[t])[0] if ok else None
                    self.eval_s += time.perf_counter() - t1
                    self.cache[keys[t]] = s
                    f.write(json.dumps({"k": keys[t], "s": s}) + "\n")
        return {t: self.cache[keys[t]] for t in tasks}


@dataclass
class TargetCase:
    key: str
    weights: dict[str, float]
    split: int
    train_tasks: list[str]

    @property
    def tasks(self) -> list[str]:
        return sorted(self.weights)


@dataclass
class Run:
    """One method's run on one target: every evaluation in order."""

    rewards: list[float] = field(default_factory=list)
    candidates: list[Candidate] = field(default_factory=list)

    def add(self, c: Candidate, reward: float) -> None:
        self.candidates.append(c)
        self.rewards.append(reward)


Objective = Callable[[Candidate], float]


# ---------------------------------------------------------------------------------------------------------------
# the peers


def run_random(space: Space, objective: Objective, budget: int, seed: int) -> Run:
    import numpy as np

    rng = np.random.default_rng([seed, 16])
    run = Run()
    for _ in range(budget):
        c = space.sample(rng)
        run.add(c, objective(c))
    return run


def run_optuna(space: Space, objective: Objective, budget: int, seed: int) -> Run:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=seed))
    run = Run()
    for _ in range(budget):
        trial = study.ask()
        c = space.suggest(trial)
        r = objective(c)
        study.tell(trial, r)
        run.add(c, r)
    return run


def run_cma(genome: Genome, objective: Objective, budget: int, seed: int) -> Run:
    """CMA-ES as mergekit-evolve runs it (``cma.fmin2`` with a parallel objective, minimizing the negated score),
    through ask/tell so that evaluations are counted one by one; the last generation is cut at the budget."""
    import cma

    es = cma.CMAEvolutionStrategy(genome.x0(), SIGMA0, {"seed": seed + 1, "verbose": -9, "maxfevals": budget})
    run = Run()
    while len(run.rewards) < budget:
        xs = es.ask()
        fs = []
        for x in xs:
            if len(run.rewards) >= budget:
                break
            c = genome.decode(x)
            r = objective(c)
            run.add(c, r)
            fs.append(-r)
        if len(fs) < len(xs):
            break
        es.tell(xs, fs)
    return run


# ---------------------------------------------------------------------------------------------------------------
# ours: the engine's search loop


class Ours:
    """The engine in a fresh state home per run: the zoo registered with its grid operators and the families of
    :data:`FAMILIES`, signatures computed once, the predictor fitted on the training tasks' rows of the merge
    table (per split and seed), then ``run_search`` with an evaluate that scores like every other method."""

    def __init__(self, zoo_dir: Path, table_path: Path, work: Path):
        from simmerge_bandit.zoo import load_manifest

        self.zoo_dir, self.table_path, self.work = zoo_dir, table_path, work
        self.scores = {m["name"]: m["scores"] for m in load_manifest(zoo_dir)["models"]}
        self.families: list[str] = []
        self.policy: str | None = None
        self._homes: dict = {}

    def _template(self) -> Path:
        home = self.work / "template"
        if (home / ".done").exists():
            self.families = json.loads((home / ".done").read_text())
            return home
        from simmerge_bandit.catalog import Catalog
        from simmerge_bandit.store import Store
        from simmerge_bandit.zoo import register_zoo

        shutil.rmtree(home, ignore_errors=True)
        store = Store.open(home)
        try:
            register_zoo(store, self.zoo_dir)  # the zoo's measured scores become the known scores
            cat = Catalog(store)
            self.families = []
            for method, ranges in FAMILIES.items():
                if add_family(cat, f"{method}_range", method, ranges, FIXED.get(method, {})):
                    self.families.append(f"{method}_range")
            # every model's signature on every task's probes, once for all the copies of this home
            from simmerge_bandit import signals

            signals.ensure_signatures(store, [m["name"] for m in cat.models()], [t["name"] for t in cat.tasks()])
        finally:
            store.close()
        (home / ".done").write_text(json.dumps(self.families))
        return home

    def home(self, case: TargetCase, seed: int) -> Path:
        """A state home with the predictor fitted on the split's training tasks with ``seed``."""
        key = (case.split, seed)
        if key not in self._homes:
            import pandas as pd

            from simmerge_bandit.engine import Engine, EngineConfig
            from simmerge_bandit.store import Store

            home = self.work / f"split{case.split}-seed{seed}"
            shutil.rmtree(home, ignore_errors=True)
            shutil.copytree(self._template(), home)
            df = pd.read_parquet(self.table_path)
            table = self.work / f"train-split{case.split}.parquet"
            df[df["task"].isin(case.train_tasks)].to_parquet(table)
            store = Store.open(home)
            try:
                # seed s of ours is the fit replicate s with exploration seed s: the bands over seeds cover the
                # randomness of a fit, not only of the exploration
                Engine(store, EngineConfig(seed=seed)).fit_predictor(table=str(table), objective="target",
                                                                     init_seed=seed)
            finally:
                store.close()
            self._homes[key] = home
        return self._homes[key]

    def run(self, case: TargetCase, objective_of_spec: Callable[[dict], tuple[Candidate, float, dict]],
            budget: int, seed: int) -> Run:
        from simmerge_bandit.engine import Engine, EngineConfig
        from simmerge_bandit.search import default_policy, run_search
        from simmerge_bandit.store import Store
        from simmerge_bandit.target import Target

        home = self.work / "run"
        shutil.rmtree(home, ignore_errors=True)
        shutil.copytree(self.home(case, seed), home)
        run = Run()

        def evaluate(spec: dict) -> dict:
            c, reward, scores = objective_of_spec(spec)
            run.add(c, reward)
            known = {t: {m["name"]: self.scores[m["name"]][t] for m in spec["models"]} for t in scores}
            raw = sum(case.weights[t] * (scores[t] or 0.0) for t in scores)
            return {"scores": scores, "reward": reward, "score": raw, "source_scores": known}

        store = Store.open(home)
        try:
            engine = Engine(store, EngineConfig(seed=seed, snapshot_every=SNAPSHOT_EVERY))
            self.policy = default_policy(engine)
            run_search(engine, Target.of(case.tasks, case.weights), budget, evaluate=evaluate)
        finally:
            store.close()
        return run


def add_family(cat, name: str, method: str, ranges: dict, fixed: dict) -> bool:
    """Register a family operator (a method with parameter ranges) in the catalog; False when this engine has no
    families yet (then ours searches the grid operators alone, and the results say so)."""
    import inspect

    if "ranges" not in inspect.signature(cat.add_operator).parameters:
        return False
    cat.add_operator(name, method, fixed, ranges={p: tuple(r) for p, r in ranges.items()})
    return True


def spec_candidate(spec: dict) -> Candidate:
    """The candidate of an engine job spec (``pipeline.job_spec``): its models and its (single) step."""
    if len(spec["steps"]) != 1:
        raise ValueError("the benchmark scores single-step merges only")
    step = spec["steps"][0]
    return Candidate.of([m["name"] for m in spec["models"]], step["method"], step["params"])


# ---------------------------------------------------------------------------------------------------------------
# targets and summaries


def splits_of(tasks: list[str], k: int) -> list[list[str]]:
    """k held-out sets that together hold out every task exactly once (as benchmarks/bench_decision.py)."""
    return [tasks[i::k] for i in range(k)]


def target_cases(tasks: list[str], k: int) -> list[TargetCase]:
    """Per split: each held-out task alone, then one two-task target (equal weights): the split's first two
    held-out tasks, or, when a split holds out one task, that task with the next split's first task (a target
    that touches the held-out task belongs to its split, as a case does in benchmarks/bench_decision.py: the
    predictor has seen the other task, never this one). Training tasks: all but the split's held-out ones."""
    out = []
    holdouts = splits_of(tasks, k)
    for i, hold in enumerate(holdouts):
        train = [t for t in tasks if t not in hold]
        for t in hold:
            out.append(TargetCase(t, {t: 1.0}, i, train))
        pair = hold[:2] if len(hold) > 1 else [hold[0], holdouts[(i + 1) % len(holdouts)][0]]
        if len(set(pair)) == 2:
            out.append(TargetCase(",".join(f"{t}=0.5" for t in sorted(pair)), {t: 0.5 for t in pair}, i, train))
    return out


def skill_tasks(manifest: dict) -> list[str]:
    """The tasks some expert is tagged with, in the zoo's order (a target needs experts to merge)."""
    tagged = {t for m in manifest["models"] if m["base"] is not None for t in m["tasks"]}
    return [t["name"] for t in manifest["tasks"] if t["name"] in tagged]


def _median(xs: Sequence[float]) -> float | None:
    import numpy as np

    xs = [x for x in xs if x is not None]
    return float(np.median(xs)) if xs else None


def summarize(per_target: dict, budgets: Sequence[int], horizon: int) -> dict:
    """Figures per method from ``per_target[key] = {"reference": r, "runs": {method: [rewards per seed]}}``.

    - ``ratio[B]``: per target, the mean over seeds of best-after-B / reference; then the median and mean over
      targets (and the per-target values);
    - ``evals_to[level]``: per target, the median over seeds of the evaluations needed to reach level x the
      reference within ``horizon`` (None = not within it in half of the seeds or more), and the share of runs
      that reached it;
    - ``curve``: the mean over targets and seeds of best-so-far / reference after 1..horizon evaluations, with the
      10% and 90% quantiles over seeds of the mean over targets;
    - ``speedup``: the best peer (highest pooled curve at ``horizon``) reaches level L there after n_peer
      evaluations (first point of its pooled curve at L); ours after n_ours; speedup = n_peer / n_ours.
    """
    import numpy as np

    methods = sorted({m for v in per_target.values() for m in v["runs"]}, key=lambda m: METHODS.index(m)
                     if m in METHODS else 99)
    out: dict = {"methods": {}}
    for m in methods:
        ratio = {}
        for b in budgets:
            vals = {k: float(np.mean([best_so_far(r[:b])[-1] / v["reference"] for r in v["runs"][m]]))
                    for k, v in per_target.items() if m in v["runs"]}
            ratio[str(b)] = {"median": _median(list(vals.values())), "mean": float(np.mean(list(vals.values()))),
                             "per_target": vals}
        evals_to = {}
        for level in LEVELS:
            med, reached = {}, {}
            for k, v in per_target.items():
                if m not in v["runs"]:
                    continue
                n = [evals_to_reach(best_so_far(r[:horizon]), level * v["reference"]) for r in v["runs"][m]]
                reached[k] = sum(x is not None for x in n) / len(n)
                med[k] = _median_censored(n)
            evals_to[f"{level:.2f}"] = {"median_per_target": med, "reached_share": reached,
                                        "median_over_targets": _median_censored(list(med.values())),
                                        "reached_share_mean": float(np.mean(list(reached.values())))}
        curves = []  # [seed][target][eval]
        keys = [k for k, v in per_target.items() if m in v["runs"]]
        n_seeds = min(len(per_target[k]["runs"][m]) for k in keys)
        for s in range(n_seeds):
            curves.append([[x / per_target[k]["reference"] for x in
                            _pad(best_so_far(per_target[k]["runs"][m][s][:horizon]), horizon)] for k in keys])
        arr = np.array(curves)  # seeds x targets x evals
        pooled = arr.mean(axis=1)  # seeds x evals
        out["methods"][m] = {"ratio": ratio, "evals_to": evals_to,
                             "curve_per_target": {k: arr[:, j].mean(axis=0).tolist() for j, k in enumerate(keys)},
                             "curve": {"mean": arr.mean(axis=(0, 1)).tolist(),
                                       "q10": np.quantile(pooled, 0.1, axis=0).tolist(),
                                       "q90": np.quantile(pooled, 0.9, axis=0).tolist()}}
    out["speedup"] = _speedup({m: v["curve"]["mean"] for m, v in out["methods"].items()}, horizon)
    per = {k: _speedup({m: v["curve_per_target"][k] for m, v in out["methods"].items()
                        if k in v["curve_per_target"]}, horizon) for k in per_target}
    out["speedup_per_target"] = per
    met = [v is not None and v["speedup"] is not None and v["speedup"] >= GOALS["speedup_min"] for v in per.values()]
    out["speedup_targets_met"] = sum(met)
    return out


def _pad(curve: list[float], n: int) -> list[float]:
    return curve + [curve[-1]] * (n - len(curve))


def _median_censored(xs: list[int | None]) -> int | float | None:
    """Median where None means 'more than the horizon' (sorted after every number)."""
    if not xs:
        return None
    order = sorted(xs, key=lambda x: math.inf if x is None else x)
    n = len(order)
    lo, hi = order[(n - 1) // 2], order[n // 2]
    if lo is None or hi is None:
        return None
    return (lo + hi) / 2


def _speedup(curves: dict[str, list[float]], horizon: int) -> dict | None:
    """From mean best-so-far curves per method: the best peer at ``horizon``, the level it reaches there, the
    evaluations it needs to reach that level and those ours needs (None: not within the horizon)."""
    peers = [p for p in PEERS if p in curves]
    if "ours" not in curves or not peers:
        return None
    best = max(peers, key=lambda p: curves[p][horizon - 1])
    level = curves[best][horizon - 1]
    n_peer = evals_to_reach(curves[best], level)
    n_ours = evals_to_reach(curves["ours"], level)
    return {"best_peer": best, "level": level, "peer_evals": n_peer, "ours_evals": n_ours,
            "speedup": None if n_ours is None else n_peer / n_ours}


def goals(summary: dict) -> dict:
    ours = summary["methods"].get("ours")
    if ours is None:
        return {}
    at10 = ours["ratio"].get("10", {}).get("median")
    sp = summary.get("speedup") or {}
    return {"ours_at_10_median": at10, "ours_at_10_met": at10 is not None and at10 >= GOALS["ours_at_10_min"],
            "speedup": sp.get("speedup"),
            "speedup_met": sp.get("speedup") is not None and sp["speedup"] >= GOALS["speedup_min"]}


# ---------------------------------------------------------------------------------------------------------------
# report


def headline(res: dict) -> tuple[str, str]:
    """The README's headline row: ours at B = 10 (median over targets of best / reference) and the speed-up
    against the best peer, beside the best peer at the same budget."""
    s = res["summary"]["methods"]
    b = "10" if "10" in s["ours"]["ratio"] else str(res["budgets"][0])
    peers = [m for m in s if m != "ours"]
    best = max(peers, key=lambda m: s[m]["ratio"][b]["median"])
    sp = res["summary"].get("speedup") or {}
    speed = (f"; reaches {sp['best_peer']}'s level at {res['horizon']} evaluations after "
             f"{sp['ours_evals'] if sp.get('ours_evals') is not None else 'more than %d' % res['horizon']}"
             f" (it needs {sp['peer_evals']})") if sp else ""
    return (f"best merge found within {b} evaluations: {s['ours']['ratio'][b]['median']:.3f} of the best any "
            f"method found in 200 (median over {len(res['targets'])} held-out targets){speed}",
            f"{best} {s[best]['ratio'][b]['median']:.3f} within {b}; "
            + ", ".join(f"{m} {s[m]['ratio'][b]['median']:.3f}" for m in peers if m != best))


def markdown_table(res: dict) -> str:
    """The benchmark page's tables (docs/search.md), from the results JSON alone."""
    s = res["summary"]
    budgets = [str(b) for b in res["budgets"]]
    rows = ["| method | " + " | ".join(f"B = {b}" for b in budgets) + " | evals to 90% | evals to 95% |",
            "|---|" + "---:|" * (len(budgets) + 2)]

    def ev(m, level):
        e = s["methods"][m]["evals_to"][level]
        med = e["median_over_targets"]
        text = f"> {res['horizon']}" if med is None else f"{med:g}"
        return f"{text} ({e['reached_share_mean']:.0%} of runs)"

    for m in s["methods"]:
        r = s["methods"][m]["ratio"]
        rows.append(f"| {m} | " + " | ".join(f"{r[b]['median']:.3f}" for b in budgets) +
                    f" | {ev(m, '0.90')} | {ev(m, '0.95')} |")
    rows += ["", "Best aggregate score after B evaluations / the target's reference: per target the mean over "
             f"{res['seeds']} seeds, then the median over {len(res['targets'])} held-out targets. Evaluations "
             f"to reach 90% / 95% of the reference: median over targets of the per-target median over seeds "
             f"(within {res['horizon']}), and the share of runs that reached it."]
    sp = s.get("speedup")
    g = res.get("goals") or {}
    if sp:
        ours_n = sp["ours_evals"] if sp["ours_evals"] is not None else f"more than {res['horizon']}"
        speed = f"x{sp['speedup']:.1f} fewer" if sp["speedup"] else "no speed-up"
        at10 = "-" if g["ours_at_10_median"] is None else f"{g['ours_at_10_median']:.3f}"
        rows += ["", f"Goals: at B = 10 ours reaches {at10} of the reference (goal >= "
                 f"{GOALS['ours_at_10_min']:.2f}: {'met' if g['ours_at_10_met'] else 'not met'}). The best peer at "
                 f"B = {res['horizon']}, {sp['best_peer']}, reaches {sp['level']:.3f} (pooled mean curve) after "
                 f"{sp['peer_evals']} evaluations; ours reaches it after {ours_n} ({speed}; goal: at most a third, "
                 f"{'met' if g['speedup_met'] else 'not met'}); the same per target (its best peer, its level): met on "
                 f"{s['speedup_targets_met']} of {len(res['targets'])} targets."]
    b = "10" if "10" in budgets else budgets[0]
    rows += ["", f"Per target (B = {b}: mean over seeds of best / reference; speed-up: evaluations the target's "
             f"best peer at B = {res['horizon']} needs to reach its level there, over those ours needs, on the "
             f"mean curves):", "",
             "| target | split | reference | found by | " + " | ".join(f"{m}" for m in s["methods"]) +
             " | best peer: level, evals | ours evals | speed-up |",
             "|---|---:|---:|---|" + "---:|" * len(s["methods"]) + "---|---:|---:|"]
    for t in res["targets"]:
        k = t["key"]
        sp = (s.get("speedup_per_target") or {}).get(k)
        if sp:
            tail = (f"{sp['best_peer']}: {sp['level']:.3f}, {sp['peer_evals']} | "
                    f"{sp['ours_evals'] if sp['ours_evals'] is not None else '> %d' % res['horizon']} | "
                    f"{'x%.1f' % sp['speedup'] if sp['speedup'] is not None else '-'}")
        else:
            tail = "- | - | -"
        rows.append(f"| {k} | {t['split']} | {t['reference']:.3f} | {t['reference_method']} | " +
                    " | ".join(f"{s['methods'][m]['ratio'][b]['per_target'][k]:.3f}"
                               if k in s["methods"][m]["ratio"][b]["per_target"] else "-"
                               for m in s["methods"]) + f" | {tail} |")
    m = res["machine"]
    costs = res.get("costs") or []
    timed = [c for c in costs if c.get("wall_s") is not None]
    spent = (f"the runs took {sum(c['wall_s'] for c in timed) / 60:.0f} min in all ({len(timed)} of {len(costs)} "
             f"(target, method) runs timed; {sum(c['computed'] for c in timed):,} (merge, task) scores computed "
             f"in them, the rest served from the cache)" if timed else "the runs were not timed")
    rows += ["", f"Peers: optuna {res['versions']['optuna']}, cma {res['versions']['cma']}. Zoo "
             f"`{res['zoo']['preset']}` (seed {res['zoo']['seed']}); {res['evaluations'].get('cache_entries', 0):,} "
             f"distinct (merge, task) scores in the cache, {res['evaluations']['failed']} failed merges; {spent}, on "
             f"{m['cpus']} shared CPU cores (load average {m['load_before'][0]:.1f} when the results were "
             f"assembled)."]
    return "\n".join(rows)


def dumps(res: dict) -> str:
    """JSON with lists of numbers on one line each (the runs would otherwise take one line per evaluation)."""
    import re

    text = json.dumps(res, indent=1)
    return re.sub(r"\[\s*(-?[\d.eE+-]+(?:,\s*-?[\d.eE+-]+)*)\s*\]",
                  lambda m: "[" + ", ".join(x.strip() for x in m.group(1).split(",")) + "]", text)


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = res["summary"]["methods"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for m, v in s.items():
        c = v["curve"]
        x = list(range(1, len(c["mean"]) + 1))
        ax.plot(x, c["mean"], label=m, lw=2 if m == "ours" else 1.2)
        ax.fill_between(x, c["q10"], c["q90"], alpha=0.15)
    for b in res["budgets"]:
        ax.axvline(b, color="grey", lw=0.5, ls=":")
    ax.axhline(GOALS["ours_at_10_min"], color="grey", lw=0.5, ls="--")
    ax.set_xlabel("evaluations (merge + evaluate)")
    ax.set_ylabel("best aggregate score / reference")
    ax.set_title(f"Best-so-far on {len(res['targets'])} held-out targets ({res['zoo']['preset']} zoo), "
                 f"mean; bands: 10-90% over {res['seeds']} seeds", fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------------------
# main


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--zoo", help="the built zoo directory (default: the realistic zoo in the demo's cache)")
    ap.add_argument("--merge-table", help="the zoo's full merge table (Parquet) the predictor is fitted on "
                                          "(default: built with zoo.build_table and cached)")
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--budgets", type=int, nargs="+", default=list(BUDGETS))
    ap.add_argument("--reference-budget", type=int, default=REFERENCE_BUDGET)
    ap.add_argument("--splits", type=int, default=3, help="task splits; each task is held out in exactly one")
    ap.add_argument("--targets", nargs="+", help="only these target keys (default: every held-out target)")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--cache", help="evaluation cache (JSON lines; default in the demo's cache dir)")
    ap.add_argument("--runs-dir", help="where each (target, method)'s finished runs are kept (default: beside "
                                        "the cache)")
    ap.add_argument("--limit", type=int, default=None, help="evaluate on the first N examples of each task")
    ap.add_argument("--quick", action="store_true", help="smoke run: 2 targets, 2 seeds, budgets 5 10, "
                                                         "reference 20, 40 examples per task")
    ap.add_argument("--out", default=str(RESULTS / "search.json"))
    ap.add_argument("--plot", default=str(RESULTS / "search.png"))
    ap.add_argument("--table", action="store_true", help="print the benchmark page's tables from --out and exit")
    args = ap.parse_args(argv)
    if args.table:
        print(markdown_table(json.loads(Path(args.out).read_text())))
        return
    if args.quick:
        args.seeds, args.budgets, args.reference_budget = 2, [5, 10], 20
        args.limit = args.limit or 40
        if args.out == str(RESULTS / "search.json"):
            args.out, args.plot = "/tmp/search-quick.json", "/tmp/search-quick.png"

    import cma
    import optuna

    from simmerge_bandit.demo import cache_dir
    from simmerge_bandit.zoo import (
        build_zoo,
        default_operators,
        deterministic,
        load_manifest,
    )

    t_start = time.time()
    load_before = os.getloadavg()
    zoo_dir = Path(args.zoo) if args.zoo else cache_dir() / "zoo-realistic-seed0"
    if not (zoo_dir / "zoo.json").exists():
        build_zoo(zoo_dir, "realistic", 0)
    manifest = load_manifest(zoo_dir)
    tasks = skill_tasks(manifest)
    n_splits = min(args.splits, len(tasks))
    cases = target_cases(tasks, n_splits)
    if args.targets:
        unknown = set(args.targets) - {c.key for c in cases}
        if unknown:
            ap.error(f"unknown target(s) {sorted(unknown)}; held-out targets: {[c.key for c in cases]}")
        by_key = {c.key: c for c in cases}
        cases = [by_key[k] for k in dict.fromkeys(args.targets)]  # in the order given
    elif args.quick:
        cases = [cases[0], next(c for c in cases if len(c.weights) > 1)]
    horizon = max(args.budgets)
    ref_budget = max(args.reference_budget, horizon)
    cache = Path(args.cache) if args.cache else cache_dir() / f"search-evals-{manifest['key']}.jsonl"
    ev = Evaluator(zoo_dir, cache, limit=args.limit)
    refs = ev.refs()

    ours = None
    work = Path(tempfile.mkdtemp(prefix="simmerge-bench-search-"))
    if "ours" in args.methods:
        table = Path(args.merge_table) if args.merge_table else None
        if table is None:
            table = cache_dir() / f"merge-table-{manifest['key']}.parquet"
            if not table.exists():
                from simmerge_bandit.zoo import build_table

                print("building the zoo's merge table for the predictor (cached)", flush=True)
                build_table(zoo_dir).to_parquet(table)
        ours = Ours(zoo_dir, table, work)

    # Each (target, method)'s runs are kept beside the cache, keyed by the code and the settings, so that targets
    # can be run by separate invocations (and an interrupted run loses at most one method of one target).
    settings = {"seeds": args.seeds, "horizon": horizon, "reference": ref_budget,
                "limit": args.limit, "zoo": manifest["key"], "splits": n_splits,
                "families": FAMILIES, "fixed": FIXED}
    table_digest = _file_digest(ours.table_path) if ours else None
    runs_dir = Path(args.runs_dir) if args.runs_dir else cache.with_suffix(".runs")
    runs_dir.mkdir(parents=True, exist_ok=True)
    per_target: dict = {}
    costs: list[dict] = []  # per (target, method): the invocation that ran it measured its cost
    best_of: dict = {}  # target key -> (reward, candidate, method)
    with deterministic(1):
        for case in cases:
            t0 = time.time()
            space = Space.of(manifest, case.tasks, case.weights)
            experts = target_experts(manifest, case.tasks)

            def objective(c: Candidate, case=case) -> float:
                return aggregate(ev.scores(c, case.tasks), case.weights, refs)

            def objective_of_spec(spec: dict, case=case):
                c = spec_candidate(spec)
                scores = ev.scores(c, case.tasks)
                return c, aggregate(scores, case.weights, refs), scores

            runs: dict[str, list[list[float]]] = {}
            for m in args.methods:
                if m in CMA_METHODS and len(experts) < 2:
                    print(f"{case.key}: {m} needs at least two experts of the target (has {experts}); skipped")
                    continue
                key = [settings, case.key, m, run_code(m), table_digest if m == "ours" else None]
                record = runs_dir / f"{_digest(key)}.json"
                if record.exists():  # done by an earlier invocation with the same code and settings
                    rec = json.loads(record.read_text())
                    print(f"{case.key:24s} {m:9s} from {record}", flush=True)
                else:
                    rec = {"target": case.key, "method": m, "runs": [], "best": None}
                    t_rec, counts = time.time(), (ev.misses, ev.hits, ev.merge_s, ev.eval_s)
                    for seed in range(args.seeds):
                        n = ref_budget if seed == 0 else horizon
                        if m == "random":
                            run = run_random(space, objective, n, seed)
                        elif m == "optuna":
                            run = run_optuna(space, objective, n, seed)
                        elif m in CMA_METHODS:
                            run = run_cma(Genome(experts, CMA_METHODS[m]), objective, n, seed)
                        else:
                            run = ours.run(case, objective_of_spec, n, seed)
                        rec["runs"].append(run.rewards)
                        i = max(range(len(run.rewards)), key=run.rewards.__getitem__)
                        if rec["best"] is None or run.rewards[i] > rec["best"][0]:
                            rec["best"] = [run.rewards[i], run.candidates[i].as_json()]
                        print(f"{case.key:24s} {m:9s} seed {seed}: best@{horizon} "
                              f"{best_so_far(run.rewards[:horizon])[-1]:.3f}  best@{n} {run.rewards[i]:.3f}  "
                              f"({ev.misses} computed, {ev.hits} cached, {time.time() - t_start:.0f}s)", flush=True)
                    if m == "ours":
                        rec["policy"] = ours.policy  # what the engine ran (its default), for a later assembly
                    rec["cost"] = {"wall_s": round(time.time() - t_rec, 1), "computed": ev.misses - counts[0],
                                   "cached": ev.hits - counts[1], "merge_s": round(ev.merge_s - counts[2], 1),
                                   "eval_s": round(ev.eval_s - counts[3], 1), "load_end": os.getloadavg()}
                    record.write_text(json.dumps(rec))
                runs[m] = rec["runs"]
                if m == "ours" and rec.get("policy"):
                    ours.policy = rec["policy"]
                costs.append({"target": case.key, "method": m, **(rec.get("cost") or {"wall_s": None})})
                if rec["best"][0] > best_of.get(case.key, (-math.inf,))[0]:
                    best_of[case.key] = (rec["best"][0], rec["best"][1], m)
            reference, best_c, by = best_of[case.key]
            per_target[case.key] = {"reference": reference, "runs": runs}
            print(f"{case.key}: reference {reference:.3f} ({by}: {best_c}) in {time.time() - t0:.0f}s",
                  flush=True)

    summary = summarize(per_target, args.budgets, horizon)
    res = {
        "benchmark": "search", "budgets": args.budgets, "horizon": horizon, "reference_budget": ref_budget,
        "seeds": args.seeds, "splits": splits_of(tasks, n_splits), "limit": args.limit,
        "zoo": {"preset": manifest["preset"], "seed": manifest["seed"], "key": manifest["key"],
                "dir": str(zoo_dir)},
        "families": {m: {p: list(r) for p, r in v.items()} for m, v in FAMILIES.items()},
        "fixed": FIXED, "points": list(POINTS), "task_references": refs,
        "ours": None if ours is None else {"families": ours.families, "policy": ours.policy,
                                           "grid": [o["name"] for o in default_operators(manifest["preset"])]},
        "targets": [{"key": c.key, "weights": c.weights, "split": c.split, "train_tasks": c.train_tasks,
                     "pairs": sum(len(p) == 2 for p in Space.of(manifest, c.tasks).pairs),
                     "group": next((list(p) for p in Space.of(manifest, c.tasks).pairs if len(p) > 2), None),
                     "experts": target_experts(manifest, c.tasks),
                     "reference": per_target[c.key]["reference"], "reference_method": best_of[c.key][2],
                     "reference_candidate": best_of[c.key][1]} for c in cases],
        "runs": {k: {"reference": v["reference"], "runs": {m: [[round(x, 6) for x in r] for r in rs]
                                                          for m, rs in v["runs"].items()}}
                 for k, v in per_target.items()},
        "summary": summary, "goals": goals(summary),
        "versions": {"optuna": optuna.__version__, "cma": cma.__version__},
        "evaluations": {"computed": ev.misses, "cached": ev.hits, "failed": ev.failures,
                        "merge_s": round(ev.merge_s, 1), "eval_s": round(ev.eval_s, 1),
                        "cache_entries": len(ev.cache)},
        "costs": costs,
        "runs_wall_s": round(sum(c["wall_s"] for c in costs if c["wall_s"] is not None), 1),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "load_before": load_before, "load_after": os.getloadavg(),
                    "note": "shared 2-core machine; other engineers' jobs may run at the same time"},
        "wall_s": round(time.time() - t_start, 1),
    }
    Path(args.out).write_text(dumps(res))
    plot(res, Path(args.plot))
    shutil.rmtree(work, ignore_errors=True)
    print(markdown_table(res))
    print(f"wrote {args.out} and {args.plot}")


if __name__ == "__main__":
    main()
