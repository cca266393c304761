"""`simmerge zoo table` through the backend (issue 17): with a daemon holding the home it writes the merge table
through the daemon's API, into a home made before the table's newer columns (migration m0016)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from simmerge_bandit.backend import LocalBackend
from simmerge_bandit.cli import cli
from simmerge_bandit.errors import InvalidInput
from simmerge_bandit.store import Store
from simmerge_bandit.zoo import TABLE_COLUMNS

NEW = ("score_h0", "score_h1", "tasks_a", "tasks_b", "tasks_c")
BEFORE = "m0015_searches_and_families"  # the last migration before merge_table had NEW


def _old_home(home: Path) -> None:
    """A home as the release before m0016 left it, holding one merge-table row of another zoo build."""
    with Store.open(home, upto=BEFORE) as store:
        assert not set(NEW) & {r[0] for r in store.fetchall("SELECT column_name FROM information_schema.columns "
                                                            "WHERE table_name = 'merge_table'")}
        store.execute("INSERT INTO merge_table (zoo_key, model_a, model_b, operator, method, params, task, metric, "
                      "score, status) VALUES ('older', 'a', 'b', 'lin', 'linear', '{}', 't', 'exact_match', 0.5, "
                      "'ok')")


def _columns(store) -> set[str]:
    return {r[0] for r in store.fetchall("SELECT column_name FROM information_schema.columns "
                                         "WHERE table_name = 'merge_table'")}


def _frame(n: int = 3) -> pd.DataFrame:
    rows = []
    for i in range(n):
        row = {c: None for c in TABLE_COLUMNS}
        row.update(model_a="a", model_b=f"b{i}", operator="lin", method="linear", params="{}", task="t",
                   metric="exact_match", score=0.25 * i, normalized_score=float("nan") if i == 1 else 0.5,
                   status="ok", merge_seed=2**63 + i, score_h0=0.1 * i, score_h1=0.2, tasks_a='["t"]',
                   tasks_b='["u"]')
        rows.append(row)
    return pd.DataFrame(rows, columns=list(TABLE_COLUMNS))


def test_an_old_home_is_migrated_and_takes_every_table_column(simmerge_home):
    _old_home(simmerge_home)
    with Store.open(simmerge_home) as store:                # migrates
        assert set(NEW) <= _columns(store) and set(TABLE_COLUMNS) <= _columns(store)
        assert store.fetchall("SELECT zoo_key, score FROM merge_table") == [("older", 0.5)]
        be = LocalBackend(store)
        assert be.store_merge_table(_frame(), "k1") == {"zoo_key": "k1", "rows": 3}
        got = store.fetchall("SELECT model_b, normalized_score, merge_seed, score_h0, score_h1, tasks_a, tasks_b, "
                             "tasks_c FROM merge_table WHERE zoo_key = 'k1' ORDER BY model_b")
        assert got == [("b0", 0.5, 2**63, 0.0, 0.2, '["t"]', '["u"]', None),
                       ("b1", None, 2**63 + 1, 0.1, 0.2, '["t"]', '["u"]', None),
                       ("b2", 0.5, 2**63 + 2, 0.2, 0.2, '["t"]', '["u"]', None)]
        assert be.store_merge_table(_frame(2), "k1")["rows"] == 2   # replaces the rows of the same build
        # bad input changes nothing
        with pytest.raises(InvalidInput, match="no column score_h1"):
            be.store_merge_table(_frame().drop(columns=["score_h1"]), "k1")
        with pytest.raises(InvalidInput, match="one per column"):
            be.op_store_merge_table("k1", list(TABLE_COLUMNS), [[None]])
        assert store.fetchall("SELECT zoo_key, count(*) FROM merge_table GROUP BY ALL ORDER BY 1") == [
            ("k1", 2), ("older", 1)]


def test_zoo_table_with_a_daemon_running_writes_through_it(unit_zoo_dir, tmp_path):
    home = tmp_path / "home"
    _old_home(home)
    log = open(tmp_path / "daemon.log", "ab")
    code = ("import sys; from simmerge_bandit.daemon import Daemon; "
            "Daemon(sys.argv[1], port=0, device='cpu', poll_s=3600).run()")
    proc = subprocess.Popen([sys.executable, "-c", code, str(home)], stdout=log, stderr=log)
    runner = CliRunner()
    out = tmp_path / "table.parquet"
    try:
        deadline = time.time() + 90
        while not (home / "daemon.json").exists():
            assert proc.poll() is None and time.time() < deadline, (tmp_path / "daemon.log").read_text()
            time.sleep(0.1)
        # a catalog operator (added through the daemon) and one of the zoo's default set
        res = runner.invoke(cli, ["--home", str(home), "operator", "add", "slerp4", "--method", "slerp", "--param",
                                  "t=0.4", "--json"], catch_exceptions=False)
        assert res.exit_code == 0, res.output
        res = runner.invoke(cli, ["--home", str(home), "zoo", "table", str(unit_zoo_dir), "--out", str(out),
                                  "--operators", "linear,slerp4", "--json"], catch_exceptions=False)
        assert res.exit_code == 0, res.output
        stats = json.loads(res.output)
        res = runner.invoke(cli, ["--home", str(home), "status", "--json"], catch_exceptions=False)
        assert "pid" in json.loads(res.output), "the home was not held by the daemon"
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    df = pd.read_parquet(out)
    assert stats["n_rows"] == len(df) > 0 and set(df["operator"]) == {"linear", "slerp4"}
    assert set(json.loads(p)["t"] for p in df.loc[df["operator"] == "slerp4", "params"]) == {0.4}
    db = duckdb.connect(str(home / "state.duckdb"), read_only=True)
    try:
        assert db.execute("SELECT name FROM _migrations WHERE name = 'm0016_merge_table_halves_and_tags'").fetchall()
        stored = db.execute(f"SELECT {', '.join(TABLE_COLUMNS)} FROM merge_table WHERE zoo_key <> 'older' "
                            "ORDER BY model_a, model_b, operator, task").df()
        assert db.execute("SELECT count(*) FROM merge_table WHERE zoo_key = 'older'").fetchone() == (1,)
    finally:
        db.close()
    want = df.sort_values(["model_a", "model_b", "operator", "task"]).reset_index(drop=True)
    assert len(stored) == len(want)
    for c in ("model_a", "model_b", "operator", "task", "status", "tasks_a", "tasks_b"):
        assert stored[c].tolist() == want[c].tolist(), c
    for c in ("score", "normalized_score", "score_h0", "score_h1"):
        np.testing.assert_array_equal(stored[c].to_numpy(float), want[c].to_numpy(float), err_msg=c)
    assert want["score_h0"].notna().all()
