"""The shift family (feature schema 2): how far each model of a pair moved from its base on the task's probes."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from simmerge_bandit import signals
from simmerge_bandit.catalog import Catalog
from simmerge_bandit.signals import FEATURE_NAMES, features
from simmerge_bandit.signals.schema import FEATURES_BY_KIND, SHIFT_SOURCES
from simmerge_bandit.store import Store
from simmerge_bandit.zoo import register_zoo


@pytest.fixture
def store(simmerge_home, unit_zoo_dir):
    features.clear_stacks()
    s = Store.open(simmerge_home)
    register_zoo(s, unit_zoo_dir)
    yield s
    s.close()


def _names(side: str) -> list[str]:
    return [n.format(side) for n, _, _ in SHIFT_SOURCES]


def test_a_copy_of_the_base_has_no_shift(store, unit_zoo_dir, tmp_path):
    twin = tmp_path / "twin"
    shutil.copytree(unit_zoo_dir / "models" / "base", twin)
    Catalog(store).add_model(twin, name="twin", base="base")
    task = Catalog(store).tasks()[0]["name"]
    for exact in (False, True):
        v = signals.pair_features(store, "twin", "max", task, exact=exact).values
        assert v["kl_base_a_mean"] == pytest.approx(0, abs=1e-6) and v["kl_a_base_mean"] == pytest.approx(0, abs=1e-6)
        assert v["js_base_a_mean"] == pytest.approx(0, abs=1e-6)
        assert v["agree_top1_base_a"] == 1.0 and v["entropy_diff_a_base"] == pytest.approx(0, abs=1e-6)
        # the other side is the expert's own shift, which fine-tuning made non-zero
        assert v["kl_base_b_mean"] > 1e-3 and v["agree_top1_base_b"] < 1.0


def test_shift_equals_the_distribution_features_of_the_pair_base_model(store):
    """Each side's shift is, by definition, the distribution family of (its base, it)."""
    task = "sort"
    pairs = [("max", "sort"), ("sort", "dsum"), ("dsum", "max")]
    X, names = signals.feature_matrix(store, pairs, task)
    ref, _ = signals.feature_matrix(store, [("base", m) for m in ("max", "sort", "dsum")], task)
    ref = dict(zip(("max", "sort", "dsum"), ref))
    for row, (a, b) in zip(X, pairs):
        for side, m in (("a", a), ("b", b)):
            for (name, src, sign) in SHIFT_SOURCES:
                got = row[names.index(name.format(side))]
                assert got == pytest.approx(sign * ref[m][FEATURE_NAMES.index(src)], rel=1e-6, abs=1e-9)


def test_shift_depends_on_the_task_probes_and_is_cached_per_task(store):
    a = signals.feature_matrix(store, [("max", "sort")], "max")[0][0]
    b = signals.feature_matrix(store, [("max", "sort")], "dsum")[0][0]
    cols = [FEATURE_NAMES.index(n) for n in FEATURES_BY_KIND["shift"]]
    assert np.isfinite(a[cols]).all() and np.isfinite(b[cols]).all()
    assert not np.allclose(a[cols], b[cols])      # other prompts, other shifts
    # task-vector features do not depend on the probes
    tv = [FEATURE_NAMES.index(n) for n in FEATURES_BY_KIND["task_vector"]]
    np.testing.assert_allclose(a[tv], b[tv])
