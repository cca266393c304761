"""Budgeted search: the best merge for a target within N merge-and-evaluate runs.

The loop is the engine's own: suggest (the policy's choice among the candidates not tried yet in this search),
merge, evaluate on every task of the target, feed the reward back, keep the best checkpoint and remove the others.
Which candidates a step ranks (:func:`scope`): when the target has a group (at least three models tagged with its
tasks), the first step merges the group at once and the second a pair, each the policy's best of its kind (the
two merges a team tries first: all its experts together, or the best two); after that, every other step looks
near the best merge so far and the steps between choose among every candidate. Near the best merge means, on
every fourth step (4, 8, ...) when the best merge is n-way and its operator weighs each model, its *moves*: the
same merge with one member's weight doubled or halved, the total kept (:func:`moves`; a coordinate search over
mergekit-evolve's genome; which member, from the steps so far: :func:`favoured`), and otherwise its models with
another operator or parameter setting, or the model sets one model away.
Every step is a logged decision with its reward, so the policy learns from each evaluation, and the search is
recorded in the store (``searches``, ``search_steps``): rerun with the same target and policy, it resumes where it
stopped (a step merged but not scored is scored first) instead of starting over.

>>> res = run_search(engine, Target.of(["add", "rev"]), budget=10)      # doctest: +SKIP
>>> res["best"]["reward"], res["best"]["path"]                           # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Callable

from . import pipeline
from .engine import params_key
from .errors import InvalidInput, NotFound, SimmergeError
from .target import Target

Evaluate = Callable[[dict], dict]


def search_id(target: Target, policy: str) -> str:
    """A search is identified by its target and policy: the same arguments resume it."""
    return hashlib.blake2b(json.dumps([target.key, policy]).encode(), digest_size=8).hexdigest()


def search_dir(store, sid: str) -> Path:
    d = store.artifacts / "searches" / sid
    d.mkdir(parents=True, exist_ok=True)
    return d


def default_policy(engine) -> str:
    """The search's policy when none is given: the GP-UCB kernel bandit on the fitted predictor's residual when
    there is a predictor (it starts from what other tasks taught and corrects it with every evaluation, nearby
    settings of one merge informing each other), else GP-UCB alone. Chosen on the decision benchmark (the best of
    ours with 50 evaluations on the realistic zoo's target objective, where hybrid LinUCB's optimism spent its
    evaluations on high-uncertainty settings) and a two-target probe of the search benchmark
    (docs/search.md says so beside the figures)."""
    return "gp-ucb@predictor" if engine._stored_meta("predictor") is not None else "gp-ucb"


def _default_evaluate(device: str, limit: int | None) -> Evaluate:
    def run(spec: dict) -> dict:
        return pipeline.run_spec(spec, device=device, limit=limit, keep_merge=True)
    return run


def _steps(store, sid: str) -> list[dict]:
    rows = store.fetchdicts(
        "SELECT s.n, s.decision_id, s.error, d.models, d.operator, d.params, r.reward, r.scores FROM search_steps s "
        "JOIN decision_log d ON d.id = s.decision_id LEFT JOIN rewards r ON r.decision_id = s.decision_id "
        "WHERE s.search_id = ? ORDER BY s.n", [sid])
    for r in rows:
        r["models"] = json.loads(r["models"])
        r["operator"] = json.loads(r["operator"])
        r["scores"] = json.loads(r["scores"]) if r["scores"] else None
        r["params"] = json.loads(r["params"]) if r["params"] else None
    return rows


def _step_params(step: dict, engine) -> list[dict]:
    """Each step's concrete parameters: the decision's own (a family's), else its operators' catalog ones."""
    return step.get("params") or [engine.catalog.operator(o)["params"] for o in step["operator"]]


def _public(step: dict, engine) -> dict:
    ops = step["operator"]
    params = _step_params(step, engine)
    return {"id": step["decision_id"], "models": step["models"], "operator": ops[0] if len(ops) == 1 else ops,
            "params": params[0] if len(params) == 1 else params,
            "scores": step["scores"], "reward": step["reward"], "error": step["error"]}


def describe(engine, sid: str) -> dict:
    """A recorded search as ``run_search`` returns it: target, policy, budget, state, every evaluation so far and
    the best one (with the path of its kept checkpoint)."""
    row = engine.store.fetchone("SELECT target, policy, budget, state FROM searches WHERE id = ?", [sid])
    if row is None:
        raise NotFound(f"no search with id {sid!r}")
    target, policy, budget, state = row
    steps = _steps(engine.store, sid)
    best = _best(steps)
    b = None
    if best is not None:
        path = search_dir(engine.store, sid) / best["decision_id"]
        b = dict(_public(best, engine), path=str(path) if path.is_dir() else None)
    return {"id": sid, "target": Target.parse(target).as_json(), "policy": policy, "budget": budget,
            "state": state, "spent": len(steps), "evaluations": [_public(s, engine) for s in steps], "best": b}


def run_search(engine, target: Target, budget: int, *, policy: str | None = None, evaluate: Evaluate | None = None,
               device: str = "auto", limit: int | None = None, progress: Callable[[dict], None] | None = None,
               keep_best: bool = True) -> dict:
    """Spend up to ``budget`` evaluations (counting those of an earlier run of the same search) looking for the
    merge with the highest reward on ``target``; return ``{"id", "target", "policy", "budget", "evaluations",
    "best"}``. ``evaluate(spec)`` scores a job spec (:func:`pipeline.job_spec`; default: merge it to disk and
    evaluate it, :func:`pipeline.run_spec`) and returns at least ``scores``, ``reward``, ``score`` and
    ``source_scores``; ``progress(result_so_far)`` is called after each evaluation. Only the best checkpoint is kept
    on disk (``best["path"]``); the others are removed once scored. A merge or evaluation that fails spends its
    evaluation and is listed with its error; the search goes on.
    """
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
        raise InvalidInput(f"budget must be a positive integer, got {budget!r}")
    target = engine.target(target)
    policy = policy or default_policy(engine)
    sid = search_id(target, policy)
    store = engine.store
    evaluate = evaluate or _default_evaluate(device, limit)
    folder = search_dir(store, sid)
    with store.transaction():
        if store.fetchone("SELECT 1 FROM searches WHERE id = ?", [sid]) is None:
            store.execute("INSERT INTO searches (id, target, policy, budget, state) VALUES (?,?,?,?,'running')",
                          [sid, target.key, policy, budget])
        else:
            store.execute("UPDATE searches SET budget = greatest(budget, ?), state = 'running', "
                          "updated_at = current_timestamp WHERE id = ?", [budget, sid])
    steps = _steps(store, sid)
    best = _best(steps)

    try:
        with engine.snapshots_deferred():  # the policies learn from every step; one snapshot at the end
            while len(steps) < budget or (steps and steps[-1]["reward"] is None and steps[-1]["error"] is None):
                last = steps[-1] if steps else None
                if last is not None and last["reward"] is None and last["error"] is None:
                    did = last["decision_id"]           # interrupted after its suggestion: score it now
                    step = last
                else:
                    tried = {(tuple(s["models"]), s["operator"][-1], params_key(_step_params(s, engine)[-1]))
                             for s in steps}
                    s = _suggest(engine, target, policy, tried, len(steps), best, steps)
                    did = s["id"]
                    with store.transaction():
                        store.execute("INSERT INTO search_steps (search_id, n, decision_id) VALUES (?,?,?)",
                                      [sid, len(steps), did])
                    step = {"n": len(steps), "decision_id": did, "error": None, "models": s["models"],
                            "operator": [s["operator"]] if isinstance(s["operator"], str) else s["operator"],
                            "params": None, "reward": None, "scores": None}
                    steps.append(step)
                spec = pipeline.job_spec(engine, did, catalog_reference=True)
                spec["out"] = str(folder / did)
                step["params"] = [x["params"] for x in spec["steps"]]
                try:
                    res = evaluate(spec)
                    pipeline.record(engine, spec, res)
                except (SimmergeError, OSError, RuntimeError, ValueError) as e:  # a failed try spends its evaluation
                    step["error"] = str(e) if isinstance(e, SimmergeError) else f"{type(e).__name__}: {e}"
                    with store.transaction():
                        store.execute("UPDATE search_steps SET error = ? WHERE search_id = ? AND decision_id = ?",
                                      [step["error"], sid, did])
                    shutil.rmtree(folder / did, ignore_errors=True)
                else:
                    step["reward"], step["scores"] = float(res["reward"]), res.get("scores")
                    if best is None or step["reward"] > best["reward"]:
                        if best is not None:
                            shutil.rmtree(folder / best["decision_id"], ignore_errors=True)
                        best = step
                        if not keep_best:
                            shutil.rmtree(folder / did, ignore_errors=True)
                    else:
                        shutil.rmtree(folder / did, ignore_errors=True)
                    with store.transaction():
                        store.execute("UPDATE searches SET best_decision = ?, updated_at = current_timestamp "
                                      "WHERE id = ?", [best["decision_id"], sid])
                if progress is not None:
                    progress(describe(engine, sid))
    except KeyboardInterrupt:
        _set_state(store, sid, "stopped")
        raise
    except InvalidInput as e:
        if "has been tried" not in str(e):  # every candidate tried: the search is complete
            _set_state(store, sid, "failed")
            raise
    _set_state(store, sid, "done")
    return describe(engine, sid)


def _suggest(engine, target: Target, policy: str, tried: set, n: int, best: dict | None,
             steps: list[dict]) -> dict:
    """Step ``n``'s suggestion: among the best merge's untried :func:`moves` that the steps so far favour
    (:func:`favoured`) on a move step, else within :func:`scope`; a scope with nothing left to try widens to the
    next (moves, then the scope, then everything)."""
    scopes: list[dict] = []
    if n >= 2 and n % 4 == 0 and (mv := moves(engine, best)):
        untried = [m for m in mv if (m[0], m[1]["name"], params_key(m[1]["params"])) not in tried]
        if untried:
            scopes.append({"moves": favoured(untried, best, steps, engine)})
    within = scope(engine, target, n, best)
    if within is not None:
        scopes.append({"within": within})
    for kw in scopes:
        try:
            return engine.suggest(target, top=1, policy=policy, exclude=tried, queue=False, **kw)[0]
        except InvalidInput:
            continue
    return engine.suggest(target, top=1, policy=policy, exclude=tried, queue=False)[0]


def moves(engine, best: dict | None) -> list[tuple[tuple[str, ...], dict, str]]:
    """The best merge's moves ``(models, operator, arm)``: for each member and each factor of
    :data:`~.candidates.REWEIGHT`, its setting with that member's weight multiplied by the factor and the total
    kept (:func:`~.candidates.reweighted`); none when it is a pair (whose relative weight its operators' settings
    already span) or a chain, or when its operator has no per-model weight of its own (or a range chooses it)."""
    from .candidates import REWEIGHT, reweighted, weighs_each_model
    from .families import arm_name

    if best is None or len(best["operator"]) != 1 or len(best["models"]) < 3:
        return []
    try:
        op = engine.catalog.operator(best["operator"][0])
    except SimmergeError:  # removed from the catalog since
        return []
    if not weighs_each_model(op):
        return []
    models = tuple(best["models"])
    params = _step_params(best, engine)[-1]
    weights = _model_weights(params, op["method"], len(models))
    out, seen = [], {tuple(weights)}
    for i in range(len(models)):
        for f in REWEIGHT:
            moved = reweighted(weights, f, i)
            if tuple(moved) in seen:
                continue
            seen.add(tuple(moved))
            p = {**params, "weight": moved}
            out.append((models, {**op, "params": p}, arm_name(op, p, op["params"])))
    return out


def favoured(mv: list[tuple[tuple[str, ...], dict, str]], best: dict | None, steps: list[dict],
             engine) -> list[tuple[tuple[str, ...], dict, str]]:
    """The moves of ``mv`` (the best merge's, :func:`moves`) that the scored ``steps`` favour most; all of them
    when the steps say nothing about which member to move. Two kinds of evidence, in this order:

    - *momentum*: the best merge was itself a move of an earlier step's setting (one member's weight times a
      factor, total kept): the same move again;
    - *leave one out*: the merges of the best's models less one member, where two or more of them were scored. The
      member whose removal cost least (its model set's best reward nearest the best merge's) is halved first, the
      one whose removal cost most doubled first: halving a member scores how far its cost is below the mean cost
      of the members with evidence, doubling it how far above.

    The policy then ranks what is left (its descriptor sees a setting's mean weight and spread, not which member
    carries which weight, so without this it cannot tell one member's move from another's).
    """
    from .candidates import REWEIGHT, reweighted

    if not mv or best is None:
        return mv
    models = tuple(best["models"])
    method = mv[0][1]["method"]
    rest = {k: v for k, v in mv[0][1]["params"].items() if k != "weight"}

    def weights(step) -> list[float] | None:
        """The step's per-model weights when it merges the best's models with the best's setting but weights."""
        if tuple(step["models"]) != models or step["operator"] != best["operator"]:
            return None
        p = _step_params(step, engine)[-1]
        if {k: v for k, v in p.items() if k != "weight"} != rest:
            return None
        return _model_weights(p, method, len(models))

    def move(frm: list[float], to: list[float]) -> tuple[int, float] | None:
        """The move (member, factor) that takes weights ``frm`` to ``to``, if one does."""
        for i in range(len(models)):
            for f in REWEIGHT:
                if _close(reweighted(frm, f, i), to):
                    return i, f
        return None

    w_best = weights(best)
    if w_best is None:
        return mv
    which = [move(w_best, m[1]["params"]["weight"]) for m in mv]  # each move's (member, factor)
    score = [0.0] * len(mv)
    scored = [s for s in steps if s["reward"] is not None and s is not best]
    for s in scored:  # momentum
        w = weights(s)
        came = move(w, w_best) if w is not None else None
        if came is not None:
            score = [x + (which[j] == came) for j, x in enumerate(score)]
    cost: dict[int, float] = {}  # leave one out: what removing member i cost
    for s in scored:
        if len(s["models"]) == len(models) - 1 and set(s["models"]) < set(models):
            i = models.index((set(models) - set(s["models"])).pop())
            cost[i] = min(cost.get(i, float("inf")), best["reward"] - s["reward"])
    if len(cost) >= 2:
        mean = sum(cost.values()) / len(cost)
        for j, im in enumerate(which):
            if im is not None and im[0] in cost:
                score[j] += (mean - cost[im[0]]) if im[1] < 1 else (cost[im[0]] - mean)
    top = max(score)
    return mv if top <= 0.0 else [m for m, x in zip(mv, score) if x == top]


def _model_weights(params: dict, method: str, n: int) -> list[float]:
    """Each of ``n`` models' weight in ``params`` (a list, or one value for all; the method's default if absent)."""
    from .methods import get_method

    w = params.get("weight", get_method(method).param("weight").default)
    return [float(x) for x in w] if isinstance(w, list) else [float(w)] * n


def _close(a: list[float], b: list[float]) -> bool:
    return len(a) == len(b) and all(abs(x - y) <= 2e-4 for x, y in zip(a, b))


def scope(engine, target: Target, n: int, best: dict | None) -> set[tuple[str, ...]] | None:
    """The model sets step ``n`` of a search ranks (None: every candidate): the target's full groups at step 0
    and its pairs at step 1 when it has a group; then, on even steps, the best merge's models and the n-way
    sets one model away from them (a search that found a good merge tries its other operators and settings, and
    the group with one model less or more), every candidate on odd ones."""
    cs = engine.candidates(target.key)
    if cs.groups and n == 0:
        return set(cs.full_groups)
    if cs.groups and n == 1:
        return set(cs.pairs)
    if best is not None and n % 2 == 0:
        near = set(best["models"])
        return {tuple(best["models"])} | {g for g in cs.groups if len(set(g) ^ near) == 1}
    return None


def _best(steps: list[dict]) -> dict | None:
    scored = [s for s in steps if s["reward"] is not None]
    return max(scored, key=lambda s: (s["reward"], -s["n"])) if scored else None


def _set_state(store, sid: str, state: str) -> None:
    with store.transaction():
        store.execute("UPDATE searches SET state = ?, updated_at = current_timestamp WHERE id = ?", [state, sid])


def searches(store) -> list[dict]:
    """Every recorded search with its progress (evaluations spent) and best reward so far."""
    return store.fetchdicts(
        "SELECT s.id, s.target, s.policy, s.budget, s.state, s.best_decision, "
        "(SELECT count(*) FROM search_steps t WHERE t.search_id = s.id) AS spent, "
        "(SELECT r.reward FROM rewards r WHERE r.decision_id = s.best_decision) AS best_reward, "
        "s.created_at, s.updated_at FROM searches s ORDER BY s.created_at")
