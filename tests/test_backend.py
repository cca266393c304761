"""One road to the state: the operation table, JSON bodies checked against signatures, and the CLI answering the
same with and without a daemon (one real daemon process on loopback)."""

from __future__ import annotations

import inspect
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from simmerge_bandit import backend as be
from simmerge_bandit.catalog import Catalog
from simmerge_bandit.cli import cli
from simmerge_bandit.errors import InvalidInput
from simmerge_bandit.store import Store

from conftest import write_jsonl


def test_every_operation_has_a_method_an_implementation_and_its_own_route():
    public = {n for n, f in vars(be.Backend).items() if inspect.isfunction(f) and not n.startswith("_")}
    public -= {"close"}
    assert public == set(be.OPERATIONS), "a Backend method without an operation, or the other way round"
    routes = [(op.method, op.path) for op in be.OPERATIONS.values()]
    assert len(set(routes)) == len(routes)
    for name in be.OPERATIONS:
        assert callable(getattr(be.LocalBackend, f"op_{name}", None)), name
    ref = {r["operation"]: r for r in be.api_reference()}  # what docs/daemon.md can show, from the same table
    assert [f["name"] for f in ref["add_model"]["fields"]] == ["path", "name", "base", "tasks", "allow_duplicate"]
    assert ref["feedback"]["batched"] and "`POST /v1/feedback`" in be.api_markdown()


def test_json_bodies_are_checked_against_the_implementation_signature():
    fn = be.LocalBackend.op_add_operator
    assert be.parse_body(fn, {"name": "x", "method": "ties", "extra": 1}) == {"name": "x", "method": "ties"}
    for bad in ({"method": "ties"}, {"name": 3, "method": "ties"}, {"name": "x", "method": "ties", "params": [1]}):
        with pytest.raises(InvalidInput, match="missing or invalid field"):
            be.parse_body(fn, bad)
    assert be.parse_body(be.LocalBackend.op_suggest, {"tasks": ["a"], "top": 2}) == {"tasks": ["a"], "top": 2}
    with pytest.raises(InvalidInput, match="'top'"):
        be.parse_body(be.LocalBackend.op_suggest, {"tasks": ["a"], "top": True})
    assert be.query_body("all=true&name=%22x%22&raw=abc") == {"all": True, "name": "x", "raw": "abc"}


# ---- the CLI both ways ----

def _setup_home(home: Path, tiny_models, tmp_path: Path) -> None:
    with Store.open(home) as store:
        cat = Catalog(store)
        cat.add_model(tiny_models["base"], name="tbase")  # the zoo registered later has its own "base"
        cat.add_model(tiny_models["ft_a"], name="ft_a", base="tbase", tasks=["double"])
        cat.add_model(tiny_models["ft_b"], name="ft_b", base="tbase")
        rows = [{"prompt": f"{i}+{i}=", "answer": str(2 * i)} for i in range(6)]
        cat.add_task("double", write_jsonl(tmp_path / "d.jsonl", rows))
        cat.add_operator("lin", "linear")
        cat.add_operator("ties5", "ties", {"density": 0.5})


def _suite(home: Path, files: dict[str, Path], tiny_models, zoo_dir: Path) -> list[tuple[str, int, object]]:
    """Every state command once, in an order where each sees what the earlier ones did: (command, exit code,
    JSON answer or error line)."""
    runner = CliRunner()
    out = []

    def run(*args):
        res = runner.invoke(cli, ["--home", str(home), *args], catch_exceptions=False)
        try:
            answer = json.loads(res.output)
        except ValueError:
            answer = res.output.strip().splitlines()[-1] if res.output.strip() else ""
        label = " ".join(args).replace(str(home), "<home>").replace(str(zoo_dir), "<zoo>")
        out.append((re.sub(r"\b[0-9a-f]{16}\b", "ID", label), res.exit_code, answer))
        return answer

    run("model", "list", "--json")
    run("model", "show", "ft_a", "--json")
    run("model", "add", str(tiny_models["ft_b"]), "--name", "ft_c", "--base", "tbase", "--json")  # refused: ft_b
    run("model", "add", str(tiny_models["ft_b"]), "--name", "ft_c", "--base", "tbase", "--allow-duplicate", "--json")
    run("model", "remove", "ft_c", "--json")
    run("model", "show", "ghost", "--json")
    run("task", "add", "copy", "--data", str(files["data"]), "--no-input", "--json")
    run("task", "list", "--json")
    run("task", "show", "copy", "--json")
    run("probe", "add", "extra", str(files["probes"]), "--json")
    run("probe", "list", "--json")
    run("operator", "add", "dare6", "--method", "dare_ties", "--param", "density=0.6", "--json")
    run("operator", "show", "dare6", "--json")
    run("operator", "retire", "dare6", "--json")
    run("operator", "list", "--json")
    run("operator", "list", "--all", "--json")
    run("operator", "add", "bad", "--method", "ties", "--param", "density=3", "--json")
    run("status", "--json")
    rows = run("suggest", "--task", "double", "--top", "2", "--json")
    run("feedback", rows[0]["id"], "0.75", "--json")
    run("feedback", rows[0]["id"], "0.5", "--json")
    run("feedback", "nope", "0.5", "--json")
    run("suggest", "--task", "double", "--top", "2", "--json")
    run("policy", "rebuild", "--json")
    run("predictor", "fit", "--model", "linear", "--json")
    run("predictor", "fit", "--model", "linear", "--init-seed", "2", "--json")
    run("replay", "--policy", "uniform", "--estimator", "snips", "--json")
    run("signatures", "list", "--json")
    run("features", "ft_a", "ft_b", "--task", "double", "--json")
    run("merge", "--models", "ft_a,ft_b", "--operator", "lin", "--out", str(home.parent / f"{home.name}-merged"),
        "--device", "cpu", "--json")
    run("evaluate", "ft_a", "--task", "double", "--limit", "2", "--json")
    run("zoo", "register", str(zoo_dir), "--json")
    run("model", "list", "--json")
    run("status", "--json")
    return out


_VOLATILE = {"added_at", "created_at", "computed_at", "retired_at", "seconds", "started_at", "updated_at",
             "gb_per_s", "peak_rss_bytes", "n_eval_s"}


def _normal(value, home: Path, ids: dict):
    """An answer with what differs between two homes made alike taken out: the home's path, decision ids (numbered
    in order of appearance) and times."""
    if isinstance(value, dict):
        return {k: _normal(v, home, ids) for k, v in value.items() if k not in _VOLATILE}
    if isinstance(value, list):
        return [_normal(v, home, ids) for v in value]
    if isinstance(value, str):
        value = value.replace(str(home), "<home>")
        for did in re.findall(r"\b[0-9a-f]{16}\b", value):
            value = value.replace(did, ids.setdefault(did, f"<id{len(ids)}>"))
        return value
    return value


def test_every_cli_command_answers_the_same_with_and_without_a_daemon(tiny_models, unit_zoo_dir, tmp_path):
    files = {"data": write_jsonl(tmp_path / "copy.jsonl", [{"prompt": f"{c}=", "answer": c} for c in "abcdef"]),
             "probes": write_jsonl(tmp_path / "probes.jsonl", [{"prompt": p} for p in ("a", "b b", "c c c")])}
    local_home, remote_home = tmp_path / "local" / "home", tmp_path / "remote" / "home"
    for h in (local_home, remote_home):
        _setup_home(h, tiny_models, tmp_path)
    local = _suite(local_home, files, tiny_models, unit_zoo_dir)

    # the daemon's worker must not run the evaluations suggest queues (the local run leaves them queued), and
    # every reward is learned before the next suggestion (as in this process)
    log = open(remote_home / "daemon.log", "ab")
    code = ("import sys; from simmerge_bandit.daemon import Daemon; "
            "Daemon(sys.argv[1], port=0, device='cpu', poll_s=3600, learn_interval_s=0).run()")
    proc = subprocess.Popen([sys.executable, "-c", code, str(remote_home)], stdout=log, stderr=log)
    try:
        deadline = time.time() + 90
        while not (remote_home / "daemon.json").exists():
            assert proc.poll() is None and time.time() < deadline, (remote_home / "daemon.log").read_text()
            time.sleep(0.1)
        remote = _suite(remote_home, files, tiny_models, unit_zoo_dir)
        st = remote[-1][2]
        assert "pid" in st and "uptime_s" in st, "the last status did not come from the daemon"
    finally:
        proc.terminate()
        proc.wait(timeout=60)

    assert [c for c, _, _ in local] == [c for c, _, _ in remote]
    for (cmd, lcode, lans), (_, rcode, rans) in zip(local, remote):
        if cmd.startswith("status"):  # the daemon adds its own figures (pid, port, uptime, batches, memory)
            rans = {k: v for k, v in rans.items() if k in lans}
        lnorm, rnorm = _normal(lans, local_home, {}), _normal(rans, remote_home, {})
        assert (lcode, lnorm) == (rcode, rnorm), cmd
    codes = dict((c, code) for c, code, _ in local)
    assert codes["zoo register <zoo> --json"] == 0
    assert codes["model show ghost --json"] == codes["feedback nope 0.5 --json"] == 1
    assert local[-1][2]["counts"]["rewards"] == 1
    with Store.open(remote_home) as store:  # the zoo's measured scores went through the daemon too
        assert store.fetchone("SELECT count(*) FROM evaluations")[0] > 0


class _FakeClient:
    """Answers POST /v1/search from a script of states."""

    def __init__(self, states):
        self.states, self.calls = list(states), []

    def call(self, method, path, body=None):
        self.calls.append((method, path, body))
        return self.states.pop(0)


def test_a_search_in_the_daemon_is_followed_until_it_ends(monkeypatch):
    monkeypatch.setattr(be.RemoteBackend, "POLL_S", 0.0)
    step = {"id": "s1", "budget": 2, "best": None}
    client = _FakeClient([{**step, "state": "running", "evaluations": []},
                          {**step, "state": "running", "evaluations": [1]},
                          {**step, "state": "running", "evaluations": [1]},
                          {**step, "state": "done", "evaluations": [1, 2]}])
    seen = []
    res = be.RemoteBackend(client).search(["a"], 2, progress=lambda r: seen.append(len(r["evaluations"])))
    assert res["state"] == "done" and seen == [0, 1]
    assert {(m, p) for m, p, _ in client.calls} == {("POST", be.OPERATIONS["search"].path)}
    assert client.calls[0][2] == {"tasks": ["a"], "weights": None, "budget": 2, "policy": None, "limit": None}
    failed = _FakeClient([{**step, "state": "failed", "evaluations": [], "error": "merge failed: disk full"}])
    with pytest.raises(be.SearchFailed, match="search s1 failed: merge failed: disk full"):
        be.RemoteBackend(failed).search(["a"], 2)
