"""Replay of the engine's own log when its decisions were logged under several arm-descriptor schema versions
(issue 17): every decision is mapped into the current schema, none is dropped for its width."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from simmerge_bandit import descriptor
from simmerge_bandit import replay as rp
from simmerge_bandit.catalog import Catalog
from simmerge_bandit.cli import cli
from simmerge_bandit.migrations import vector_key
from simmerge_bandit.store import Store

OPS = {"lin": ("linear", {}), "ties5": ("ties", {"density": 0.5})}


def _log(store, did: str, op: str, x: list[float], z: np.ndarray, version: str | None, reward: float) -> None:
    for v in (x, list(map(float, z))):
        store.execute("INSERT OR IGNORE INTO vectors VALUES (?, ?)", [vector_key(v), v])
    store.execute(
        "INSERT INTO decision_log (id, batch, rank, task, models, operator, policy, policy_version, feature_schema, "
        "context_key, arm_key, predicted, uncertainty, propensity, evaluate, arm_schema) "
        "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
        [did, did, 0, "t", json.dumps(["a", "b"]), json.dumps([op]), "linucb-hybrid", "v", "f1",
         vector_key(x), vector_key(list(map(float, z))), 0.5, 0.1, 0.5, True, version])
    store.execute("INSERT INTO rewards (decision_id, seq, reward) VALUES (?, nextval('reward_seq'), ?)",
                  [did, reward])


def _legacy_z(method: str, params: dict) -> np.ndarray:
    """Layout 1's descriptor (version '1': a one-hot over 12 methods, 11 raw parameters, 2 flags)."""
    legacy = descriptor.legacy_schema()
    z = np.zeros(len(legacy))
    z[legacy.index[f"method:{method}"]] = 1.0
    for k, v in params.items():
        z[legacy.index[f"param:{k}"]] = float(v)
    return z


@pytest.fixture
def two_schema_home(simmerge_home):
    """A home whose log holds 10 rewarded choices in layout 1 (25-wide descriptors, as before versions) and then
    10 in the current schema."""
    store = Store.open(simmerge_home)
    cat = Catalog(store)
    for name, (method, params) in OPS.items():
        cat.add_operator(name, method, params)
    now = descriptor.current()
    store.execute("INSERT INTO arm_schemas (version, coordinates) VALUES (?, ?)",
                  [now.version, json.dumps(now.coordinates_json())])
    rng = np.random.default_rng(0)
    for i in range(20):
        name = "lin" if i % 2 else "ties5"
        method, params = OPS[name]
        op = cat.operator(name)
        old = i < 10
        z = _legacy_z(method, params) if old else now.describe(op)
        _log(store, f"d{i:02d}", name, [float(rng.normal()), 1.0], z, "1" if old else now.version,
             0.9 if name == "lin" else 0.4)
    assert len(descriptor.legacy_schema()) != len(now)          # the two versions' widths differ
    yield store
    store.close()


def test_decisions_of_two_schema_versions_all_replay(two_schema_home):
    store = two_schema_home
    assert {r[0] for r in store.fetchall("SELECT arm_schema FROM decisions")} == {"1", descriptor.current().version}
    frame = rp.engine_log_frame(store)
    assert len(frame[rp.ACTION]) == 20
    log = rp.load_engine_log(store)
    assert len(log) == 20 and log.arms == ["lin", "ties5"]
    cat = Catalog(store)
    want = np.array([descriptor.operator_descriptor(cat.operator(a)) for a in log.arms])
    np.testing.assert_array_equal(log.Z, want)                 # every row in today's schema
    (r,) = rp.evaluate(log, ["fixed:lin"], ["snips"]).results()
    assert r["value"] == pytest.approx(0.9) and r["n"] == 20


def test_cli_replays_a_log_of_two_schema_versions(two_schema_home):
    two_schema_home.close()
    out = CliRunner().invoke(cli, ["replay", "--policy", "fixed:ties5", "--policy", "linucb-hybrid",
                                   "--estimator", "snips", "--json"], catch_exceptions=False)
    assert out.exit_code == 0, out.output
    res = json.loads(out.output)
    assert res["log"]["events"] == 20
    fixed = next(r for r in res["results"] if r["policy"] == "fixed:ties5")
    assert fixed["value"] == pytest.approx(0.4)
