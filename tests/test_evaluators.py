"""Evaluators: exact match and log-likelihood against unbatched references, the external command runner,
reward normalization, and `simmerge evaluate`."""

import json
import math
import sys

import pytest
import torch
from click.testing import CliRunner

from simmerge_bandit.catalog import METRICS, Catalog
from simmerge_bandit.cli import cli
from simmerge_bandit.errors import InvalidInput
from simmerge_bandit.evaluators import (REGISTRY, TaskData, evaluate, evaluator_names, get_evaluator, load_model,
                                        normalize_score)
from simmerge_bandit.evaluators.exact_match import clean, encode_left_padded, exact_match_score, greedy_generate
from simmerge_bandit.evaluators.external import render_command, resolve_metric
from simmerge_bandit.evaluators.loglik import loglik_score
from simmerge_bandit.store import Store

from conftest import write_jsonl



@pytest.fixture(scope="module")
def expert(unit_zoo):
    root, manifest = unit_zoo
    m = next(x for x in manifest["models"] if x["base"] is not None)
    rows = [json.loads(ln) for ln in (root / f"tasks/{m['tasks'][0]}/eval.jsonl").read_text().splitlines()]
    return load_model(root / m["path"]), rows, m


def test_registry_matches_the_catalog_metrics():
    assert evaluator_names() == list(METRICS)
    assert all(get_evaluator(n).name == n for n in REGISTRY)
    with pytest.raises(InvalidInput, match="unknown metric"):
        get_evaluator("bleu")


def test_batched_greedy_matches_unbatched_generate(expert):
    lm, rows, _ = expert
    # Prompts of different lengths in batches of 3: left padding and positions must not change any output.
    prompts = sorted({r["prompt"] for r in rows}, key=len)[::4][:7]
    assert len({len(p) for p in prompts}) > 1
    batched = greedy_generate(lm.model, lm.tokenizer, prompts, 6, batch_size=3)
    for p, got in zip(prompts, batched):
        ids = torch.tensor([lm.tokenizer(p)["input_ids"]])
        ref = lm.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                                eos_token_id=lm.tokenizer.eos_token_id, pad_token_id=lm.tokenizer.pad_token_id)
        ref = ref[0, ids.shape[1]:].tolist()
        if lm.tokenizer.eos_token_id in ref:
            ref = ref[:ref.index(lm.tokenizer.eos_token_id)]
        assert got == ref


def test_left_padded_batch_has_each_texts_own_ids():
    """One batch call must give every text the ids a call of its own gives, special tokens included (a tokenizer
    that starts every text with <bos>, and that pads batches when asked to: left padding is ours)."""
    from tokenizers import processors

    from simmerge_bandit.tokenizer import char_tokenizer

    tok = char_tokenizer()
    bos = tok.bos_token_id
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[
        ("<bos>", bos)])
    tok.backend_tokenizer.enable_padding(pad_id=tok.pad_token_id, pad_token="<pad>")
    texts = ["ab", "abcd", "c"]
    ids, mask, positions = encode_left_padded(tok, texts)
    assert ids.shape == (3, 5)
    for row, m, pos, t in zip(ids.tolist(), mask.tolist(), positions.tolist(), texts):
        own = tok(t)["input_ids"]
        assert own[0] == bos and row[len(row) - len(own):] == own
        assert m == [0] * (5 - len(own)) + [1] * len(own) and pos[len(row) - len(own):] == list(range(len(own)))


def test_exact_match_counts_hits_by_hand(expert):
    lm, rows, _ = expert
    score, texts = exact_match_score(lm.model, lm.tokenizer, rows)
    assert score == sum(t == r["answer"] for t, r in zip(texts, rows)) / len(rows)
    # Answers the model cannot produce: a wrong label set scores zero.
    wrong = [{"prompt": r["prompt"], "answer": "#" + r["answer"]} for r in rows]
    assert exact_match_score(lm.model, lm.tokenizer, wrong)[0] == 0.0


def test_clean_cuts_at_stop_strings():
    assert clean(" 42\nrest") == "42"
    assert clean("abc", stop=("b",)) == "a"


def test_loglik_matches_a_per_example_reference(expert):
    lm, rows, _ = expert
    rows = rows[:9]
    score, mean = loglik_score(lm.model, lm.tokenizer, rows, batch_size=4)
    total, count = 0.0, 0
    with torch.no_grad():
        for r in rows:
            p = lm.tokenizer(r["prompt"])["input_ids"]
            a = lm.tokenizer(r["answer"], add_special_tokens=False)["input_ids"]
            logp = torch.log_softmax(lm.model(input_ids=torch.tensor([p + a])).logits[0].float(), -1)
            for k, tok in enumerate(a):
                total += float(logp[len(p) + k - 1, tok])
                count += 1
    assert mean == pytest.approx(total / count, abs=1e-5)
    assert score == pytest.approx(math.exp(total / count), rel=1e-5)
    assert 0 < score <= 1


def test_evaluate_dispatches_on_the_task_metric(expert, unit_zoo):
    lm, _, m = expert
    root, _ = unit_zoo
    task = {"name": m["tasks"][0], "data_path": str(root / f"tasks/{m['tasks'][0]}/eval.jsonl"),
            "metric": "loglik"}
    res = evaluate(lm, task, limit=5)
    assert res.ok and res.metric == "loglik" and res.n_examples == 5 and "mean_loglik" in res.details
    em = evaluate(root / m["path"], task, metric="exact_match")
    assert em.metric == "exact_match" and em.score == pytest.approx(m["scores"][m["tasks"][0]])
    with pytest.raises(InvalidInput, match="limit"):
        evaluate(lm, task, limit=0)


# ---- external ----

def _script(tmp_path, body: str) -> str:
    path = tmp_path / "evalscript.py"
    path.write_text(body)
    return f"{sys.executable} {path}"


def _task(cmd, metric_path="results.acc", data=None):
    return TaskData(name="ext", data_path=data, eval_command=cmd, metric_path=metric_path)


def test_external_reads_the_metric_from_the_output_file(tmp_path):
    cmd = _script(tmp_path, "import json, sys\n"
                            "json.dump({'results': {'acc': 0.75}, 'model': sys.argv[1]}, open(sys.argv[2], 'w'))\n")
    model_dir = tmp_path / "my model"          # a space: placeholders are shell-quoted
    model_dir.mkdir()
    res = get_evaluator("external").evaluate(model_dir, _task(cmd + " {model} {output}"))
    assert res.ok and res.score == 0.75 and res.details["returncode"] == 0


def test_external_reads_stdout_when_there_is_no_output_placeholder(tmp_path):
    cmd = _script(tmp_path, "print('loading...')\nprint('{\"results\": {\"acc,none\": 3}}')\n")
    res = get_evaluator("external").evaluate(tmp_path, _task(cmd, "results.acc,none"))
    assert res.ok and res.score == 3.0


@pytest.mark.parametrize("body, metric_path, reason", [
    ("import sys\nsys.stderr.write('boom: no GPU\\n')\nsys.exit(3)\n", "results.acc",
     "command exited with status 3: boom: no GPU"),
    ("print('not json')\n", "results.acc", "output is not JSON"),
    ("print('{\"results\": {}}')\n", "results.acc", "metric path 'results.acc' not found"),
    ("print('{\"results\": {\"acc\": \"high\"}}')\n", "results.acc", "not a finite number"),
    ("print('{\"results\": {\"acc\": NaN}}')\n", "results.acc", "not a finite number"),
])
def test_external_failures_are_results_with_a_reason(tmp_path, body, metric_path, reason):
    res = get_evaluator("external").evaluate(tmp_path, _task(_script(tmp_path, body), metric_path))
    assert not res.ok and res.score is None and reason in res.reason


def test_external_missing_output_file_and_timeout(tmp_path):
    res = get_evaluator("external").evaluate(tmp_path, _task(_script(tmp_path, "pass\n") + " {output}"))
    assert not res.ok and "did not write" in res.reason
    slow = _script(tmp_path, "import time\ntime.sleep(30)\n")
    res = get_evaluator("external").evaluate(tmp_path, _task(slow), timeout=0.5)
    assert not res.ok and res.reason == "timed out after 0.5 s" and res.seconds < 10


def test_external_template_errors_are_invalid_input(tmp_path):
    with pytest.raises(InvalidInput, match="unknown placeholder"):
        render_command("run {modle}", model="m", task="t", data="", output="o")
    with pytest.raises(InvalidInput, match="no eval command"):
        get_evaluator("external").evaluate(tmp_path, TaskData(name="t"))


def test_resolve_metric_handles_dotted_keys_and_lists():
    doc = {"results": {"mmlu.abstract": {"acc,none": 0.5}}, "runs": [{"f1": 0.25}]}
    assert resolve_metric(doc, "results.mmlu.abstract.acc,none") == 0.5
    assert resolve_metric(doc, "runs.0.f1") == 0.25
    with pytest.raises(KeyError):
        resolve_metric(doc, "runs.3.f1")


# ---- normalization ----

@pytest.mark.parametrize("score, sources, expected", [
    (0.45, [0.9, 0.3], 0.5),          # divided by the best source
    (0.9, [0.3, 0.2], 2.0),           # clipped above
    (-0.5, [0.5], 0.0),               # clipped below
    (0.0, [0.0, 0.0], 1.0),           # zero denominator, merge no better: as good as the best source
    (0.1, [0.0, None], 2.0),          # zero denominator, merge better than every source
    (None, [0.5], None),              # failed evaluation: no reward
    (0.5, [None], None),              # no source score: no reward
    (float("nan"), [0.5], None),
])
def test_normalize_score(score, sources, expected):
    assert normalize_score(score, sources) == expected


# ---- CLI ----

def test_cli_evaluate_by_name_and_by_path(simmerge_home, expert, unit_zoo):
    root, manifest = unit_zoo
    _, _, m = expert
    task = m["tasks"][0]
    store = Store.open(simmerge_home)
    cat = Catalog(store)
    cat.add_model(root / "models/base", name="base")
    cat.add_model(root / m["path"], name=m["name"], base="base")
    cat.add_task(task, root / f"tasks/{task}/eval.jsonl")
    store.close()
    runner = CliRunner()
    res = runner.invoke(cli, ["evaluate", m["name"], "--task", task, "--json"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    assert out["status"] == "ok" and out["score"] == pytest.approx(m["scores"][task]) and out["model"] == m["name"]
    res = runner.invoke(cli, ["evaluate", str(root / m["path"]), "--task", task, "--metric", "loglik"],
                        catch_exceptions=False)
    assert res.exit_code == 0 and "loglik = " in res.output
    res = runner.invoke(cli, ["evaluate", "nosuch", "--task", task])
    assert res.exit_code == 1 and res.output.count("\n") == 1 and "no model named 'nosuch'" in res.output


def test_cli_evaluate_reports_a_failed_external_run(simmerge_home, tmp_path, tiny_models):
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "answer": "b"}])
    store = Store.open(simmerge_home)
    Catalog(store).add_task("ext", data, metric="external", eval_command=f"{sys.executable} -c 'import sys; "
                            f"sys.exit(2)'", metric_path="x")
    store.close()
    res = CliRunner().invoke(cli, ["evaluate", str(tiny_models["base"]), "--task", "ext"])
    assert res.exit_code == 1 and "evaluation failed: command exited with status 2" in res.output
