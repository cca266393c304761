"""benchmarks/probe_eval_examples.py: a zoo copy whose eval sets grow, on the unit zoo (real models, real scores)."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import probe_eval_examples as probe  # noqa: E402 (the benchmarks folder is put on the path above)

from simmerge_bandit.zoo import _read_jsonl, load_manifest  # noqa: E402


def test_a_copy_with_more_eval_examples_keeps_the_zoos_own_first_and_rescores_the_models(unit_zoo_dir, tmp_path):
    zoo = unit_zoo_dir
    old = json.loads((zoo / "zoo.json").read_text())
    skills = sorted({t for m in load_manifest(zoo)["models"] for t in (m.get("tasks") or [])})
    n0 = next(t["n_eval"] for t in old["tasks"] if t["name"] == skills[0])

    same = probe.with_examples(zoo, tmp_path / "same", n0)
    # scored again on the same examples, every model's known score is the build's, exactly
    again = json.loads((same / "zoo.json").read_text())
    for m in again["models"]:
        m["scores"] = {t: -1.0 for t in m["scores"]}
    probe.rescore(same, again, skills)
    for a, b in zip(again["models"], old["models"]):
        for t in skills:
            assert a["scores"][t] == b["scores"][t], (a["name"], t)

    more = probe.with_examples(zoo, tmp_path / "more", n0 + 10)
    grown = json.loads((more / "zoo.json").read_text())
    assert (more / "models").resolve() == (zoo / "models").resolve()  # linked, not copied
    for t in grown["tasks"]:
        rows = _read_jsonl(more / t["eval"])
        if t["name"] not in skills:  # tasks no expert is tagged with are left as they are
            assert rows == _read_jsonl(zoo / t["eval"])
            continue
        assert t["n_eval"] == len(rows) == n0 + 10
        assert rows[:n0] == _read_jsonl(zoo / t["eval"])
        prompts = [r["prompt"] for r in rows]
        assert len(set(prompts)) == len(prompts)
        assert not set(prompts) & {r["prompt"] for r in _read_jsonl(zoo / t["train"])}
    # the original zoo is untouched
    assert json.loads((zoo / "zoo.json").read_text()) == old


def test_probe_table_hand_worked():
    res = {"zoo": {"seed": 0}, "pairs": 90, "operators": 17, "examples_table_s": 600.4, "machine": {"cpus": 2},
           "runs": [{"examples": 200, "figures": {"oracle_mean": 0.92, "best_fixed_mean": 0.9,
                                                   "best_fixed_operator": "slerp_t0.3", "oracle_gap": 0.02,
                                                   "oracle_gap_nc": 0.012, "nc_share": 0.6,
                                                   "best_rule_share": 0.62}},
                    {"examples": 800, "figures": {"oracle_mean": 0.93, "best_fixed_mean": 0.9,
                                                   "best_fixed_operator": "ta_l0.7", "oracle_gap": 0.03,
                                                   "oracle_gap_nc": 0.024, "nc_share": 0.8,
                                                   "best_rule_share": 0.5}}]}
    lines = probe.markdown_table(res).splitlines()
    assert lines[2] == "| 200 | 0.920 | 0.900 (slerp_t0.3) | 0.020 | 0.012 | 60% | 62% |"
    assert lines[3] == "| 800 | 0.930 | 0.900 (ta_l0.7) | 0.030 | 0.024 | 80% | 50% |"
    assert "600 s for the 800-example table on 2 CPUs" in lines[-1]


def test_nc_share_is_the_noise_corrected_gap_over_the_gap(monkeypatch):
    import simmerge_bandit.zoo as zoo

    two = {"oracle_mean": 0.9, "best_fixed_operator": "x", "best_fixed_mean": 0.8, "oracle_gap": 0.1,
           "oracle_gap_nc": 0.03, "median_spread": 0.2, "best_rule_share": 0.4, "n_cases": 7}
    monkeypatch.setattr(zoo, "table_stats", lambda df, manifest, objective: {"two_way": two})
    f = probe.figures(None, {})
    assert f["nc_share"] == pytest.approx(0.3) and f["cases"] == 7 and f["oracle_gap"] == 0.1


def test_figures_read_what_table_stats_writes(unit_zoo_dir, unit_pair_table):
    # on a real (tiny) table, not a hand-made dict: a key table_stats does not write fails here
    from simmerge_bandit.zoo import load_manifest

    df = unit_pair_table
    f = probe.figures(df, load_manifest(unit_zoo_dir))
    assert f["cases"] == df[["model_a", "model_b"]].drop_duplicates().shape[0] > 0
    assert f["best_fixed_operator"] in ("linear", "slerp_t0.3") and f["oracle_mean"] >= f["best_fixed_mean"]
