"""Metadata rules on tiny hand-made cases whose answers are computed by hand in the comments."""

import numpy as np
import pytest

from simmerge_bandit.errors import InvalidInput
from simmerge_bandit.rules import (PAIR_RULES, RULES, Case, case_from_json, case_to_json, choices, fit_rule,
                                   metadata_class, rule_values)

OPS = [{"name": "s3", "method": "slerp", "params": {"t": 0.3}},
       {"name": "s5", "method": "slerp", "params": {"t": 0.5}},
       {"name": "s7", "method": "slerp", "params": {"t": 0.7}},
       {"name": "ties", "method": "ties", "params": {"density": 0.5}}]


def case(a, b, tags_a, tags_b, score_a, score_b, target=("t1",)):
    return Case((a, b), (frozenset(tags_a), frozenset(tags_b)),
                ({t: score_a for t in target}, {t: score_b for t in target}), {t: 1.0 for t in target})


# c1: a is tagged and stronger; c2: the same pair the other way round; c3: both tagged, the first stronger
CASES = [case("a", "b", {"t1"}, {"t2"}, 0.9, 0.4),
         case("b", "a", {"t2"}, {"t1"}, 0.4, 0.9),
         case("a", "c", {"t1"}, {"t1"}, 0.9, 0.8)]
#              s3   s5   s7   ties
R = np.array([[0.9, 0.6, 0.3, 0.5],
              [0.2, 0.6, 0.8, 0.5],
              [0.4, 0.7, 0.3, 1.0]])


def test_registry_lists_every_rule():
    assert set(RULES) == {"fixed", "tag", "weaker", "stronger", "lookup"}
    assert set(PAIR_RULES) <= set(RULES)
    with pytest.raises(InvalidInput, match="unknown rule"):
        fit_rule("nope", CASES, R, OPS)


def test_fixed_takes_the_best_mean():
    # means: s3 0.5, s5 0.633, s7 0.467, ties 0.667
    rule = fit_rule("fixed", CASES, R, OPS)
    assert rule.fitted() == {"operator": "ties"}
    assert choices(rule, CASES, OPS) == ["ties"] * 3


def test_tag_goes_towards_the_tagged_model():
    # distance 0.3: c1 towards a (t=0.3) 0.9, c2 towards a, now second (t=0.7) 0.8, c3 both tagged (t=0.5) 0.7
    # -> mean 0.8; distance 0.5: 0.6, 0.6, 0.7 -> 0.633
    rule = fit_rule("tag", CASES, R, OPS)
    assert rule.fitted()["distance"] == 0.3
    assert choices(rule, CASES, OPS) == ["s3", "s7", "s5"]
    assert rule_values(rule, CASES, R, OPS).mean() == pytest.approx(0.8)


def test_stronger_and_weaker():
    # stronger, distance 0.3: c1 t=0.3 0.9, c2 t=0.7 0.8, c3 towards a t=0.3 0.4 -> 0.7 (distance 0.5: 0.633)
    rule = fit_rule("stronger", CASES, R, OPS)
    assert rule.fitted()["distance"] == 0.3 and choices(rule, CASES, OPS) == ["s3", "s7", "s3"]
    assert rule_values(rule, CASES, R, OPS).mean() == pytest.approx(0.7)
    # weaker, distance 0.3: c1 t=0.7 0.3, c2 t=0.3 0.2, c3 t=0.7 0.3 -> 0.267; distance 0.5 -> 0.633 wins
    rule = fit_rule("weaker", CASES, R, OPS)
    assert rule.fitted()["distance"] == 0.5 and choices(rule, CASES, OPS) == ["s5"] * 3


def test_lookup_fits_one_operator_per_class_and_falls_back_to_fixed():
    rule = fit_rule("lookup", CASES, R, OPS)
    assert [metadata_class(c) for c in CASES] == ["n2|strong=0|tags=T-", "n2|strong=1|tags=-T",
                                                  "n2|strong=0|tags=TT"]
    assert choices(rule, CASES, OPS) == ["s3", "s7", "ties"]                 # each class's best: the oracle here
    unseen = case("c", "a", {"t1"}, {"t1"}, 0.8, 0.9)                          # n2|strong=1|tags=TT
    assert rule.choose(unseen, OPS) == "ties"


def test_fitted_rules_apply_to_held_out_cases():
    held = [case("c", "a", {"t1"}, {"t1"}, 0.8, 0.9), case("d", "e", set(), set(), 0.5, 0.5)]
    assert choices(fit_rule("tag", CASES, R, OPS), held, OPS) == ["s5", "s5"]        # no tag preference
    assert choices(fit_rule("stronger", CASES, R, OPS), held, OPS) == ["s7", "s5"]   # towards the second; tie
    triple = Case(("a", "b", "c"), (frozenset({"t1"}),) * 3, ({"t1": 0.9},) * 3, {"t1": 1.0})
    assert fit_rule("tag", CASES, R, OPS).choose(triple, OPS) == "ties"     # slerp takes two: the fixed choice


def test_target_weights_decide_tags_and_known_scores():
    c = Case(("a", "b"), (frozenset({"t1"}), frozenset({"t2", "t3"})), ({"t1": 0.9, "t2": 0.1, "t3": 0.1},
             {"t1": 0.2, "t2": 0.8, "t3": 0.6}), {"t1": 3.0, "t2": 1.0, "t3": 0.0})
    assert c.tagged_weight(0) == pytest.approx(0.75) and c.tagged_weight(1) == pytest.approx(0.25)
    assert c.known_score(0) == pytest.approx((2.7 + 0.1) / 4) and c.known_score(1) == pytest.approx(1.4 / 4)
    assert c.strongest() == 0 and metadata_class(c) == "n2|strong=0|tags=--"
    assert case_from_json(__import__("json").loads(case_to_json(c))) == c


def test_bad_inputs_are_refused():
    with pytest.raises(InvalidInput, match="one row of values per case"):
        fit_rule("fixed", CASES, R[:2], OPS)
    with pytest.raises(InvalidInput, match="missing values"):
        fit_rule("lookup", CASES, np.where(R > 0.8, np.nan, R), OPS)
    with pytest.raises(InvalidInput, match="slerp"):
        fit_rule("tag", CASES, R[:, 3:], OPS[3:])
    with pytest.raises(InvalidInput, match="target"):
        Case(("a", "b"), (frozenset(),) * 2, ({}, {}), {})
    with pytest.raises(InvalidInput, match="not fitted"):
        RULES["lookup"]().choose(CASES[0], OPS)
