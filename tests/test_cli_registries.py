"""Registries drive everything that lists them: discovery of the policy and evaluator modules, the CLI's choices and
help texts, and a policy registered at run time working through suggest, feedback and rebuild."""

from __future__ import annotations

import dataclasses
import json
import re

import numpy as np
import pytest
from click.testing import CliRunner

from simmerge_bandit import evaluators, methods, policies
from simmerge_bandit.backend import LocalBackend
from simmerge_bandit.catalog import Catalog
from simmerge_bandit.cli import cli
from simmerge_bandit.errors import InvalidInput
from simmerge_bandit.policies.random_policy import RandomPolicy
from simmerge_bandit.store import Store

from conftest import write_jsonl


def test_every_policy_and_evaluator_module_registers_what_it_defines():
    registered = [cls.__module__.rsplit(".", 1)[1] for cls in policies.REGISTRY.values()]
    assert registered == policies.policy_modules(), "a policy module defines no POLICY, or one is registered twice"
    assert len(registered) >= 8
    found = [type(ev).__module__.rsplit(".", 1)[1] for ev in evaluators.REGISTRY.values()]
    assert found == evaluators.evaluator_modules() and len(found) >= 3


class GreedyMeans(RandomPolicy):
    """Always the operator with the best mean reward so far (a policy defined outside the package)."""

    name = "test-greedy"

    def _score(self, cands):
        predicted = self._means.of(cands)
        best = (predicted == predicted.max()).astype(float)
        return predicted, predicted, np.zeros(len(cands)), best / best.sum()


@pytest.fixture
def greedy():
    policies.register(GreedyMeans)
    yield GreedyMeans
    policies.unregister(GreedyMeans.name)


def test_register_refuses_a_bad_or_taken_policy_name(greedy):
    for bad in ("Bad", "a:b", "x@predictor", "uniform", ""):
        with pytest.raises(InvalidInput, match="policy name"):
            policies.register(type("P", (RandomPolicy,), {"name": bad}))
    with pytest.raises(InvalidInput, match="registered already"):
        policies.register(type("P", (RandomPolicy,), {"name": "test-greedy"}))
    with pytest.raises(InvalidInput, match="Policy subclass"):
        policies.register(dict)


def test_a_policy_registered_at_run_time_suggests_learns_and_rebuilds(greedy, tiny_models, tmp_path,
                                                                      simmerge_home):
    with Store.open(simmerge_home) as store:
        cat = Catalog(store)
        cat.add_model(tiny_models["base"], name="base")
        for key in ("ft_a", "ft_b"):
            cat.add_model(tiny_models[key], name=key, base="base")
        cat.add_task("double", write_jsonl(tmp_path / "d.jsonl", [{"prompt": f"{i}+{i}=", "answer": str(2 * i)}
                                                                 for i in range(6)]))
        cat.add_operator("lin", "linear")
        cat.add_operator("ties5", "ties", {"density": 0.5})
        be = LocalBackend(store)
        first = be.suggest("double", top=4, policy="test-greedy")
        assert {r["policy"] for r in first} == {"test-greedy"}
        chosen = first[0]["operator"]
        other = "lin" if chosen == "ties5" else "ties5"
        be.feedback(first[0]["id"], 0.2)  # the chosen operator is now worse than the other's starting mean 0 ...
        be.feedback(next(r["id"] for r in first if r["operator"] == other), 0.9)  # ... and the other one better
        assert be.suggest("double", top=1, policy="test-greedy")[0]["operator"] == other
        rebuilt = be.rebuild_policy("test-greedy")
        assert rebuilt == {"name": "test-greedy", "n_updates": 2, "version": rebuilt["version"]}
        live = be.engine.policy("test-greedy")
        assert live.n_updates == 2 and live._means.mean(other) == pytest.approx(0.9)

    runner = CliRunner()
    listed = json.loads(runner.invoke(cli, ["policy", "list", "--json"], catch_exceptions=False).output)
    assert {"name": "test-greedy"} in listed
    for cmd in (["suggest", "--help"], ["replay", "--help"], ["search", "--help"]):
        text = re.sub(r"-\s+", "-", runner.invoke(cli, cmd, catch_exceptions=False).output)  # wrapped at '-'
        assert "test-greedy" in text, cmd


def test_cli_choices_and_help_follow_the_method_and_evaluator_registries(simmerge_home, tmp_path):
    runner = CliRunner()
    spec = dataclasses.replace(methods.get_method("linear"), name="regtest_linear")
    ev = dataclasses.replace(evaluators.get_evaluator("exact_match"), name="regtest_metric") \
        if dataclasses.is_dataclass(evaluators.get_evaluator("exact_match")) else None
    methods.register(spec)
    if ev is None:
        ev = type("Metric", (), {"name": "regtest_metric", "evaluate": lambda self, *a, **k: None})()
    evaluators.register(ev)
    try:
        text = " ".join(runner.invoke(cli, ["operator", "add", "--help"], catch_exceptions=False).output.split())
        assert "regtest_linear" in text
        assert "regtest_metric" in runner.invoke(cli, ["task", "add", "--help"], catch_exceptions=False).output
        data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "1+1=", "answer": "2"}])
        res = runner.invoke(cli, ["task", "add", "t", "--data", str(data), "--metric", "regtest_metric",
                                  "--no-input", "--json"], catch_exceptions=False)
        assert res.exit_code == 0 and json.loads(res.output)[0]["metric"] == "regtest_metric"
        res = runner.invoke(cli, ["operator", "add", "r", "--method", "regtest_linear", "--json"])
        assert res.exit_code == 0, res.output
    finally:
        methods.unregister("regtest_linear")
        evaluators.unregister("regtest_metric")
    res = runner.invoke(cli, ["task", "add", "t2", "--data", str(data), "--metric", "regtest_metric", "--no-input"])
    assert res.exit_code == 2 and "regtest_metric" in res.output and "not one of" in res.output
