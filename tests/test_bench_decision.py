"""The decision benchmark's bookkeeping: combining runs of several processes, pooling over splits."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest

PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_decision.py"


@pytest.fixture(scope="module")
def bd():
    spec = importlib.util.spec_from_file_location("bench_decision_under_test", PATH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _config(preset, seed, objective, tag, code=None):
    out = {"preset": preset, "zoo_seed": seed, "objective": objective, "tag": tag}
    return out if code is None else dict(out, code=code)


def test_merge_keeps_every_configuration_once_in_the_benchmark_order(bd):
    a = {"benchmark": "decision-v2", "configs": [_config("bench", 0, "target", "a", 1),
                                                  _config("realistic", 0, "task", "a", 1)], "disclosures": ["x"]}
    b = {"benchmark": "decision-v2", "configs": [_config("realistic", 0, "target", "b", bd.CODE),
                                                  _config("bench", 0, "target", "b", bd.CODE)],
         "disclosures": ["stale"]}
    out = bd.merge_results([a, b])
    assert [(c["preset"], c["zoo_seed"], c["objective"], c["tag"]) for c in out["configs"]] == [
        ("realistic", 0, "target", "b"), ("realistic", 0, "task", "a"), ("bench", 0, "target", "b")]
    # this script's disclosures, and the one configuration left at an older version, named from the results
    assert out["disclosures"][:-1] == bd.DISCLOSURES
    assert "realistic seed 0, task (version 1)" in out["disclosures"][-1]
    assert "bench" not in out["disclosures"][-1]
    assert bd.version_note([_config("bench", 1, "task", "c", bd.CODE)]) is None
    with pytest.raises(SystemExit):
        bd.merge_results([{"benchmark": "decision-v1", "configs": []}])


def test_pooled_share_of_the_gap_weights_splits_by_their_pool(bd):
    # two splits of 10 and 30 pool cases; oracle .9/.8, fixed .8/.6 -> pooled oracle .825, fixed .65
    finals = np.array([[0.85, 0.7], [0.85, 0.7]])          # two seeds, identical
    row = bd.pooled_values(finals, np.array([10.0, 30.0]), np.array([0.9, 0.8]), np.array([0.8, 0.6]))
    pooled_final = 0.25 * 0.85 + 0.75 * 0.7
    assert row["final_score"] == pytest.approx(pooled_final)
    assert row["final_gap_closed"] == pytest.approx((pooled_final - 0.65) / (0.825 - 0.65))
    assert row["per_split_final_gap_closed"] == pytest.approx([0.5, 0.5])


def test_interaction_figures_by_hand(bd):
    # 4 cases x 2 operators: operator 1 is better by 0.2 everywhere (main effect) and, in group "a", by 0.2 more
    V = np.array([[0.5, 0.9], [0.4, 0.8], [0.6, 0.8], [0.3, 0.5]])
    out = bd.interaction_figures(V, ["a", "a", "b", "b"], V_h0=V + 0.01, V_h1=V - 0.01)
    # within-case deviations: +-0.2 (a), +-0.1 (b); operator main effect +-0.15; interaction +-0.05 / -+0.05
    assert out["operator_share"] == pytest.approx(1 - 8 * 0.05 ** 2 / (4 * 0.2 ** 2 + 4 * 0.1 ** 2))
    assert out["task_share"] == pytest.approx(1.0)       # the interaction is exactly the group's
    assert out["reliability"] == pytest.approx(1.0)      # the halves differ by a constant only
    noisy = bd.interaction_figures(V, ["a", "b", "a", "b"])
    assert noisy["task_share"] == pytest.approx(0.0) and noisy["reliability"] is None
