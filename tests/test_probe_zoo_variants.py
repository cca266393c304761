"""benchmarks/probe_zoo_variants.py: the variants are valid presets on the realistic base; its table, hand-worked."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import probe_zoo_variants as probe  # noqa: E402 (the benchmarks folder is put on the path above)

from simmerge_bandit.zoo import get_preset  # noqa: E402


def test_every_variant_keeps_the_realistic_base_and_changes_only_the_experts():
    real = get_preset("realistic")
    for name in probe.VARIANTS:
        p = probe.variant_preset(name)
        assert p.recipes[0] == real.recipes[0] and p.arch == real.arch and p.tasks == real.tasks
        assert p.n_eval == real.n_eval and p.name == f"realistic-{name}"
        experts = [r for r in p.recipes[1:] if r.name not in {x.parent for x in p.recipes}]
        assert all(r.replay == (0.7 if name == "hot-replay" and r.lr == 2e-3 else probe.REPLAY) for r in experts)
        assert len(experts) >= 10                                    # at least 45 unordered pairs
    mods = probe.variant_preset("modules")
    assert {r.train_only for r in mods.recipes[1:]} == {(), ("self_attn",), ("mlp",)}
    pairs = probe.disjoint_pairs(mods)
    assert len(pairs) == 18 and ("copy-attn", "dsum-mlp") in pairs and ("copy-attn", "dsum-attn") not in pairs
    assert not probe.disjoint_pairs(probe.variant_preset("fast"))
    lin = probe.variant_preset("lineage")
    cpt = lin.recipe("base-cpt")
    assert (cpt.parent, cpt.tasks, cpt.full_loss, cpt.replay) == ("base", lin.recipes[0].tasks, True, 0)
    assert {r.parent for r in lin.recipes[1:]} == {"base", "base-cpt"}


def test_lend_base_copies_the_base_once(tmp_path):
    src = tmp_path / "src"
    (src / "models" / "base").mkdir(parents=True)
    (src / "models" / "base" / "model.safetensors").write_bytes(b"w")
    (src / "models" / "copy").mkdir()
    (src / ".cache").mkdir()
    (src / ".cache" / "base.json").write_text("{}")
    assert probe.lend_base(src, tmp_path / "d")
    assert sorted(p.name for p in (tmp_path / "d" / "models").iterdir()) == ["base"]
    assert not probe.lend_base(src, tmp_path / "d")                # never over a zoo being built


def test_variants_table_hand_worked():
    fig = {"oracle_mean": 0.9, "best_fixed_mean": 0.87, "best_fixed_operator": "slerp_t0.5", "oracle_gap": 0.03,
           "oracle_gap_nc": 0.02, "best_rule": "stronger", "best_rule_share": 0.9,
           "expert_margin": {"min": 0.13, "median": 0.25, "off_task_max_drop": 0.395}}
    res = {"runs": {"modules/seed0": {"variant": "modules", "seed": 0, "figures": {**fig, "oracle_gap": 0.02},
                                      "disjoint_pairs": {"n_cases": 18, "operator_mean": {
                                          "linear": 0.9, "task_arithmetic_l1.0": 0.7, "nuslerp": 0.91}}},
                    "hot/seed0": {"variant": "hot", "seed": 0, "figures": fig}}}
    lines = probe.markdown_table(res).splitlines()
    assert lines[2] == "| hot | 0 | 0.900 | 0.870 (slerp_t0.5) | 0.030 | 0.020 | stronger 90% | 0.130 / 0.250 | 0.395 |"
    assert lines[3].startswith("| modules | 0 | 0.900 | 0.870 (slerp_t0.5) | 0.020 |")
    assert lines[5] == ("On the 18 ordered pairs of `modules` (seed 0) whose experts trained disjoint parameters "
                        "(attention only with MLP only), each operator's mean value: linear 0.900, "
                        "task_arithmetic_l1.0 0.700; best: nuslerp.")
    assert "`hot`:" in lines[7] and "`fast`" not in lines[7]


def test_figures_read_what_table_stats_writes(unit_zoo_dir, unit_pair_table):
    from simmerge_bandit.zoo import load_manifest

    df = unit_pair_table
    f = probe.figures(df, load_manifest(unit_zoo_dir))
    assert f["n_cases"] == df[["model_a", "model_b"]].drop_duplicates().shape[0] > 0
    assert set(f["expert_margin"]) == {"min", "median", "off_task_max_drop"} and f["checks"]
    assert set(f["best_share"]) == set(f["operator_mean_normalized"]) == {"linear", "slerp_t0.3"}
    first = tuple(df[["model_a", "model_b"]].iloc[0])
    got = probe.operator_means_on(df, load_manifest(unit_zoo_dir), {first})
    rows = df[(df.model_a == first[0]) & (df.model_b == first[1])]
    # by hand: a merge's value is the mean of its normalized scores over the tasks it was evaluated on
    want = rows.groupby("operator")["normalized_score"].mean()
    assert got["n_cases"] == 1
    assert got["operator_mean"] == pytest.approx(want.to_dict())
    assert probe.operator_means_on(df, load_manifest(unit_zoo_dir), set()) is None
    assert f["best_rule"] is None or f["best_rule"] in ("tag", "weaker", "stronger", "lookup")
