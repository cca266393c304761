"""The demo loop end to end on the unit zoo: suggest -> merge -> evaluate -> feedback, an operator joining."""

import json

from click.testing import CliRunner

from simmerge_bandit.cli import cli
from simmerge_bandit.demo import LATE_OPERATOR, run_demo
from simmerge_bandit.store import Store


def test_demo_loop_learns_from_real_merges(tmp_path, unit_zoo_dir):
    lines = []
    res = run_demo(tmp_path / "home", rounds=4, preset="unit", zoo_dir=unit_zoo_dir, eval_limit=12,
                   echo=lines.append)
    assert len(res["rounds"]) == 4
    for r in res["rounds"]:
        assert 0.0 <= r["reward"] <= 2.0 and r["oracle"] >= max(r["fixed"].values()) - 1e-12
    assert LATE_OPERATOR in res["summary"]["fixed"] and res["summary"]["fixed"][LATE_OPERATOR]["rounds"] == 2
    assert any("joins" in ln for ln in lines) and any("oracle" in ln for ln in lines)
    with Store.open(tmp_path / "home") as store:
        assert store.fetchone("SELECT count(*) FROM rewards")[0] == 4
        assert store.fetchone("SELECT count(*) FROM evaluations")[0] >= 2  # source scores cached
    st = CliRunner().invoke(cli, ["--home", str(tmp_path / "home"), "status", "--json"], catch_exceptions=False)
    assert json.loads(st.output)["counts"]["rewards"] == 4
