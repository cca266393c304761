"""The lm-eval evaluator: real lm-evaluation-harness on a micro-zoo expert scores a task exported by `simmerge zoo
export-lm-eval` exactly as the built-in exact_match evaluator does (each evaluator checks the other), and every
way it can go wrong is one line (task add) or a failed result (evaluation), never a reward.

Skipped when lm-eval is not installed, unless SIMMERGE_REQUIRE_LM_EVAL=1 (CI installs the extra and sets it).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from simmerge_bandit import pipeline
from simmerge_bandit.cli import cli
from simmerge_bandit.errors import EvaluationFailed, InvalidInput
from simmerge_bandit.evaluators import TaskData, evaluate
from simmerge_bandit.evaluators import lm_eval as lm_eval_ev

if not lm_eval_ev.installed():
    if os.environ.get("SIMMERGE_REQUIRE_LM_EVAL") == "1":
        raise RuntimeError("SIMMERGE_REQUIRE_LM_EVAL=1 but lm-evaluation-harness is not installed")
    pytest.skip("lm-evaluation-harness is not installed (pip install '.[lm-eval]')", allow_module_level=True)


def _invoke(*args: str, ok: bool = True):
    res = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    if ok:
        assert res.exit_code == 0, res.output
    return res


@pytest.fixture(scope="module")
def lm_run(unit_zoo, tmp_path_factory) -> dict:
    """One real lm-eval run through the CLI: a zoo task added, exported as an lm-eval custom task, added again as an
    lm-eval task over that export, and a zoo expert evaluated on it."""
    root, manifest = unit_zoo
    # the expert whose score on its own task is furthest from 0 and 1: equal scores then mean equal answers
    expert = max((m for m in manifest["models"] if m["base"]),
                 key=lambda m: min(m["scores"][m["tasks"][0]], 1 - m["scores"][m["tasks"][0]]))
    task = expert["tasks"][0]
    tmp = tmp_path_factory.mktemp("lm-eval")
    home, export = tmp / "home", tmp / "lm-eval-tasks"
    data = root / f"tasks/{task}/eval.jsonl"
    times = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HOME", str(tmp / "hf"))  # datasets caches the JSON it reads there, not in ~/.cache
        _invoke("--home", str(home), "task", "add", task, "--data", str(data))
        _invoke("--home", str(home), "zoo", "export-lm-eval", str(export))
        t0 = time.perf_counter()
        _invoke("--home", str(home), "task", "add", f"{task}-lm", "--data", str(data), "--metric", "lm-eval",
                "--lm-eval-task", task, "--lm-eval-include", str(export))
        t1 = time.perf_counter()
        res = _invoke("--home", str(home), "evaluate", str(root / expert["path"]), "--task", f"{task}-lm", "--json")
        times = {"check_s": t1 - t0, "run_s": time.perf_counter() - t1}
        rows = json.loads(_invoke("--home", str(home), "task", "list", "--json").output)
    print(f"lm-eval: task add (index check) {times['check_s']:.1f} s, evaluate (child process) {times['run_s']:.1f} s")
    return {"root": root, "expert": expert, "task": task, "data": data, "export": export, "times": times,
            "result": json.loads(res.output), "rows": {r["name"]: r for r in rows}}


def test_lm_eval_scores_an_exported_task_as_exact_match_does(lm_run):
    out, expert, task = lm_run["result"], lm_run["expert"], lm_run["task"]
    builtin = evaluate(lm_run["root"] / expert["path"], {"name": task, "data_path": lm_run["data"]},
                       metric="exact_match")
    assert out["status"] == "ok", out["reason"]
    assert out["metric"] == "lm-eval" and out["details"]["lm_eval_metric"] == "exact_match,none"
    assert 0 < builtin.score < 1  # neither all right nor all wrong: a different answer would change the score
    assert out["score"] == builtin.score == expert["scores"][task]
    assert out["n_examples"] == builtin.n_examples == sum(1 for _ in lm_run["data"].open())
    # the full results JSON is kept beside the score
    full = out["details"]["lm_eval"]
    assert full["results"][task]["exact_match,none"] == out["score"]
    assert full["configs"][task]["generation_kwargs"]["do_sample"] is False
    import torch

    assert full["n-samples"][task]["effective"] == out["n_examples"]
    assert out["details"]["device"] == ("cuda" if torch.cuda.is_available() else "cpu")  # where the job runs


def test_the_task_records_its_resolved_lm_eval_options_and_the_export(lm_run):
    task = lm_run["task"]
    opts = json.loads(lm_run["rows"][f"{task}-lm"]["eval_options"])
    assert opts == {"task": task, "metric": "exact_match,none", "include": str(lm_run["export"].resolve()),
                    "args": None}
    assert lm_run["rows"][task]["eval_options"] is None
    import yaml

    doc = yaml.safe_load((lm_run["export"] / f"{task}.yaml").read_text())
    answers = [json.loads(ln)["answer"] for ln in lm_run["data"].read_text().splitlines()]
    assert doc["task"] == task and doc["generation_kwargs"]["max_gen_toks"] == max(map(len, answers)) + 1
    assert doc["dataset_kwargs"]["data_files"]["test"] == lm_run["rows"][task]["data_path"]  # the home's copy


def test_task_add_refusals_are_one_line_and_register_nothing(lm_run, tmp_path, monkeypatch):
    data, export, task = str(lm_run["data"]), str(lm_run["export"]), lm_run["task"]
    base = ["task", "add", "t", "--data", data, "--metric", "lm-eval", "--lm-eval-include", export]
    cases = [
        (["--lm-eval-task", "nosuch"], f"unknown lm-eval task 'nosuch' (in {lm_run['export'].resolve()})"),
        (["--lm-eval-task", task, "--lm-eval-metric", "acc"],
         f"unknown lm-eval metric 'acc' for lm-eval task '{task}'; it has: exact_match,none"),
        (["--lm-eval-task", task, "--lm-eval-args", "revision=main"], "names a Hub revision"),
        (["--lm-eval-task", task, "--lm-eval-args", "tokenizer=org/name"], "is not a path on this machine"),
        (["--lm-eval-task", task, "--lm-eval-args", "num_fewshot"], "key=value pairs"),
        (["--lm-eval-task", ""], "needs an lm-eval task"),
    ]
    for extra, message in cases:
        res = _invoke(*base, *extra, ok=False)
        assert res.exit_code == 1 and res.output.count("\n") == 1 and message in res.output, (extra, res.output)
    res = _invoke("task", "add", "t", "--data", data, "--lm-eval-task", task, ok=False)
    assert res.exit_code == 2 and "go with --metric lm-eval" in res.output
    monkeypatch.setattr(lm_eval_ev, "installed", lambda: False)
    res = _invoke(*base, "--lm-eval-task", task, ok=False)
    assert res.exit_code == 1 and res.output.count("\n") == 1
    assert "needs lm-evaluation-harness, which is not installed: pip install 'simmerge-bandit[lm-eval]'" in res.output
    assert json.loads(_invoke("task", "list", "--json").output) == []


def test_a_failed_run_is_a_failed_result_and_never_a_reward(lm_run, tmp_path, monkeypatch):
    task = lm_run["task"]
    row = {**lm_run["rows"][f"{task}-lm"]}
    model = lm_run["root"] / lm_run["expert"]["path"]
    # a run that does not finish in time is stopped, with its process group
    res = evaluate(model, row, timeout=0.05)
    assert not res.ok and res.score is None and res.reason.startswith("lm-eval timed out after 0.05 s")
    # what the child answers for a task that went away since it was added (run here, not in a child: the same code)
    from simmerge_bandit.evaluators._lm_eval_run import run

    assert run({"task": "gone", "include": str(lm_run["export"]), "model": str(model)}) == {
        "error": "unknown lm-eval task 'gone'"}
    # lm-eval missing where the job runs: a failed evaluation, so the job fails with the reason and no reward
    monkeypatch.setattr(lm_eval_ev, "installed", lambda: False)
    res = evaluate(model, row)
    assert not res.ok and "not installed" in res.reason
    spec = {"tasks": [{**row, "weight": 1.0}], "models": [], "source_scores": {}}
    with pytest.raises(EvaluationFailed, match=f"evaluation of the merge on {task}-lm failed: lm-evaluation-harness "
                                                f"is not installed"):
        pipeline.score_merge(spec, model)
    with pytest.raises(InvalidInput, match="has no lm-eval task"):
        evaluate(model, TaskData(name="plain", data_path=lm_run["data"]), metric="lm-eval")


def test_results_json_to_score():
    doc = {"results": {"t": {"acc,none": 0.5, "acc_stderr,none": 0.1, "perplexity,none": 3.0,
                             "exact_match,strict": 0.25, "exact_match,flex": 0.75}},
           "higher_is_better": {"t": {"acc": True, "perplexity": False, "exact_match": True}},
           "n-samples": {"t": {"original": 10, "effective": 8}}}
    ok = lm_eval_ev.score_of(doc, "t", "acc")
    assert (ok.score, ok.n_examples, ok.details["lm_eval_metric"]) == (0.5, 8, "acc,none")
    assert lm_eval_ev.score_of(doc, "t", "exact_match,flex").score == 0.75
    assert "several filters" in lm_eval_ev.score_of(doc, "t", "exact_match").reason
    assert "lower-is-better" in lm_eval_ev.score_of(doc, "t", "perplexity").reason
    assert "no entry for task 'u'" in lm_eval_ev.score_of(doc, "u", "acc").reason
    assert "unknown lm-eval metric 'bleu'" in lm_eval_ev.score_of(doc, "t", "bleu").reason


def test_what_runs_code_needs_a_daemon_that_allows_eval_commands():
    assert lm_eval_ev.runs_code({"task": "x", "include": "/some/dir"})
    assert lm_eval_ev.runs_code({"task": "x", "args": "num_fewshot=5,trust_remote_code=True"})
    assert not lm_eval_ev.runs_code({"task": "x", "args": "num_fewshot=5"})
    assert not lm_eval_ev.runs_code(None)
    assert lm_eval_ev.parse_args("num_fewshot=5, dtype=bfloat16") == {"num_fewshot": "5", "dtype": "bfloat16"}
    assert Path(lm_eval_ev.__file__).name == "lm_eval.py"
