"""A real daemon process on loopback."""

import http.client
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from simmerge_bandit.catalog import Catalog
from simmerge_bandit.cli import cli
from simmerge_bandit.engine import Engine
from simmerge_bandit.store import Store

from conftest import write_jsonl


def start_daemon(home: Path, *args: str) -> tuple[subprocess.Popen, dict]:
    (home / "daemon.json").unlink(missing_ok=True)
    log = open(home / "daemon.log", "ab")
    proc = subprocess.Popen([sys.executable, "-m", "simmerge_bandit", "--home", str(home), "daemon", "--port", "0",
                             "--device", "cpu", *args], stdout=log, stderr=log)
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            info = json.loads((home / "daemon.json").read_text())
            if info["pid"] == proc.pid:
                return proc, info
        except (OSError, ValueError, KeyError):
            pass
        if proc.poll() is not None:
            raise AssertionError((home / "daemon.log").read_text())
        time.sleep(0.1)
    proc.kill()
    raise AssertionError("daemon did not start: " + (home / "daemon.log").read_text())


def call(info, method, path, body=None, token=None):
    conn = http.client.HTTPConnection("127.0.0.1", info["port"], timeout=120)
    headers = {"Authorization": f"Bearer {token or info['token']}"} if token != "" else {}
    conn.request(method, path, body=json.dumps(body) if body is not None else None, headers=headers)
    resp = conn.getresponse()
    data = json.loads(resp.read() or b"null")
    conn.close()
    return resp.status, data


def stop(proc):
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            args = list(proc.args)  # the daemon writes its threads' stacks to daemon.log when shutdown hangs
            if "--home" in args:
                log = Path(args[args.index("--home") + 1]) / "daemon.log"
                if log.exists():
                    print(log.read_text()[-20000:])
            raise
    return proc.returncode


@pytest.fixture
def home(simmerge_home, tiny_models, tmp_path):
    with Store.open(simmerge_home) as store:
        cat = Catalog(store)
        cat.add_model(tiny_models["base"], name="base")
        for key in ("ft_a", "ft_b"):
            cat.add_model(tiny_models[key], name=key, base="base")
        rows = [{"prompt": f"{i}+{i}=", "answer": str(2 * i)} for i in range(6)]
        cat.add_task("double", write_jsonl(tmp_path / "d.jsonl", rows))
        cat.add_operator("lin", "linear")
        cat.add_operator("ties5", "ties", {"density": 0.5})
    return simmerge_home


def test_api_auth_errors_and_shutdown(home):
    proc, info = start_daemon(home, "--eval-budget", "0")
    try:
        assert stat.S_IMODE(os.stat(home / "daemon.json").st_mode) == 0o600
        assert call(info, "GET", "/v1/status", token="wrong")[0] == 401
        assert call(info, "GET", "/v1/status", token="")[0] == 401
        code, st = call(info, "GET", "/v1/status")
        assert code == 200 and st["counts"]["models"] == 3 and "uptime_s" in st and "queue_depth" in st
        assert call(info, "GET", "/v1/nope")[0] == 404
        code, err = call(info, "POST", "/v1/suggest", {"task": "ghost"})
        assert code == 404 and "ghost" in err["error"]
        code, err = call(info, "POST", "/v1/operators", {"name": "x", "method": "ties", "params": {"density": 3}})
        assert code == 400 and "out of range" in err["error"]
        assert call(info, "POST", "/v1/feedback", {"id": "nope", "reward": 0.5})[0] == 404
        code, rows = call(info, "POST", "/v1/suggest", {"task": "double", "top": 2})
        assert code == 200 and len(rows) == 2 and 0 < rows[0]["propensity"] <= 1
        assert call(info, "POST", "/v1/feedback", {"id": rows[0]["id"], "reward": "nan"})[0] == 400
        assert call(info, "GET", "/v1/models")[1][0]["name"] == "base"
        assert [t["name"] for t in call(info, "GET", "/v1/tasks")[1]] == ["double"]
        assert call(info, "POST", "/v1/suggest", {"task": "double", "top": 1})[0] == 200  # warm: journaled
        code, st = call(info, "GET", "/v1/status")  # ... and the read sees it
        assert st["journal"]["records"] >= 1 and st["counts"]["decisions"] == 3
        assert {"ingests", "cache_trims", "checkpoints"} <= set(st["journal"])
        assert st["memory"]["rss_kb"] > 0 and st["memory"]["duckdb_bytes"] >= 0
    finally:
        assert stop(proc) == 0
    assert not (home / "daemon.json").exists()


def test_non_loopback_host_is_refused(home):
    r = subprocess.run([sys.executable, "-m", "simmerge_bandit", "--home", str(home), "daemon", "--host",
                        "0.0.0.0"], capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "not a loopback address" in r.stderr and "Traceback" not in r.stderr


def test_bad_memory_limit_is_refused(home):
    r = subprocess.run([sys.executable, "-m", "simmerge_bandit", "--home", str(home), "daemon", "--memory-limit",
                        "lots"], capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "--memory-limit" in r.stderr and "Traceback" not in r.stderr
    assert not (home / "daemon.json").exists()


def test_cli_goes_through_the_daemon(home, tmp_path):
    proc, info = start_daemon(home, "--eval-budget", "0")
    try:
        runner = CliRunner()
        out = runner.invoke(cli, ["operator", "add", "della5", "--method", "della", "--param", "density=0.5",
                                  "--json"], catch_exceptions=False)
        assert out.exit_code == 0, out.output
        data = write_jsonl(tmp_path / "c.jsonl", [{"prompt": "ab>", "answer": "ab"}])
        assert runner.invoke(cli, ["task", "add", "copy", "--data", str(data)], catch_exceptions=False).exit_code == 0
        rows = json.loads(runner.invoke(cli, ["suggest", "--task", "double", "--top", "100", "--json"],
                                        catch_exceptions=False).output)
        assert "della5" in {r["operator"] for r in rows}
        fb = runner.invoke(cli, ["feedback", rows[0]["id"], "0.7", "--json"], catch_exceptions=False)
        assert json.loads(fb.output)["status"] == "recorded"
        st = json.loads(runner.invoke(cli, ["status", "--json"], catch_exceptions=False).output)
        assert st["counts"]["operators"] == 3 and st["counts"]["tasks"] == 2 and st["counts"]["rewards"] == 1
        assert st["pid"] == proc.pid
    finally:
        assert stop(proc) == 0


def test_concurrent_clients(home):
    proc, info = start_daemon(home, "--eval-budget", "0")
    errors, acked = [], []
    lock = threading.Lock()

    def client(k):
        try:
            for _ in range(5):
                code, rows = call(info, "POST", "/v1/suggest", {"task": "double", "top": 2})
                assert code == 200, rows
                code, res = call(info, "POST", "/v1/feedback", {"id": rows[0]["id"], "reward": 0.1 * k})
                assert code == 200, res
                with lock:
                    acked.append(rows[0]["id"])
        except Exception as e:  # collected and asserted below
            errors.append(e)

    try:
        threads = [threading.Thread(target=client, args=(k,)) for k in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors
        code, st = call(info, "GET", "/v1/status")
        assert st["counts"]["rewards"] == len(acked) == 30
        # every suggest and feedback went through the group commit
        assert st["batches"]["calls"] == 60 and 1 <= st["batches"]["count"] <= 60
    finally:
        assert stop(proc) == 0


def test_kill_9_loses_nothing_acknowledged(home):
    proc, info = start_daemon(home, "--eval-budget", "0")
    acked: list[tuple[str, float]] = []
    stop_flag = threading.Event()

    def stream():
        i = 0
        while not stop_flag.is_set():
            try:
                code, rows = call(info, "POST", "/v1/suggest", {"task": "double", "top": 1})
                if code != 200:
                    continue
                reward = round(0.01 * (i % 100), 2)
                code, _ = call(info, "POST", "/v1/feedback", {"id": rows[0]["id"], "reward": reward})
                if code == 200:
                    acked.append((rows[0]["id"], reward))
                i += 1
            except OSError:
                return

    t = threading.Thread(target=stream)
    t.start()
    deadline = time.time() + 60
    while len(acked) < 15 and time.time() < deadline:
        time.sleep(0.05)
    proc.kill()  # SIGKILL in the middle of the stream
    proc.wait()
    stop_flag.set()
    t.join()
    assert len(acked) >= 15
    proc, info = start_daemon(home, "--eval-budget", "0")  # the stale daemon.json is replaced
    try:
        code, st = call(info, "GET", "/v1/status")
        assert st["counts"]["rewards"] >= len(acked)
    finally:
        assert stop(proc) == 0
    with Store.open(home) as store:
        stored = dict(store.fetchall("SELECT decision_id, reward FROM rewards"))
        for did, reward in acked:
            assert stored[did] == pytest.approx(reward)
        eng = Engine(store)
        live = eng.policy().snapshot()[0]
        rebuilt = Engine(store).rebuild().snapshot()[0]
        for k in live:
            if "rng" not in k:
                assert (abs(live[k] - rebuilt[k]) <= 1e-9 + 1e-9 * abs(rebuilt[k])).all(), k


def test_watched_folder_registers_new_checkpoints(home, tiny_models, tmp_path):
    watch = tmp_path / "incoming"
    watch.mkdir()
    proc, info = start_daemon(home, "--watch", str(watch), "--eval-budget", "0")
    try:
        shutil.copytree(tiny_models["ft_sharded"], watch / "new-expert")
        deadline = time.time() + 60
        names = []
        while time.time() < deadline:
            names = {m["name"]: m for m in call(info, "GET", "/v1/models")[1]}
            if "new-expert" in names:
                break
            time.sleep(0.5)
        assert "new-expert" in names and names["new-expert"]["base"] == "base"
    finally:
        assert stop(proc) == 0


def test_daemon_runs_requested_evaluations_and_records_failures(home, tmp_path):
    data = write_jsonl(tmp_path / "x.jsonl", [{"prompt": "1+1=", "answer": "2"}])
    with Store.open(home) as store:
        Catalog(store).add_task("broken", data, metric="external", eval_command="exit 3 # {model} {output}",
                                metric_path="results.acc")
    proc, info = start_daemon(home, "--eval-budget", "10", "--max-attempts", "1", "--eval-limit", "4")
    try:
        ok = call(info, "POST", "/v1/suggest", {"task": "double", "top": 1})[1][0]
        bad = call(info, "POST", "/v1/suggest", {"task": "broken", "top": 1})[1][0]
        assert ok["evaluate"] and bad["evaluate"]
        deadline = time.time() + 120
        jobs = {}
        while time.time() < deadline:
            jobs = {j["decision_id"]: j for j in call(info, "GET", "/v1/jobs")[1]}
            if all(j["state"] in ("done", "failed") for j in jobs.values()) and len(jobs) == 2:
                break
            time.sleep(0.5)
        assert jobs[ok["id"]]["state"] == "done", jobs[ok["id"]]
        assert jobs[bad["id"]]["state"] == "failed" and "exit" in jobs[bad["id"]]["last_error"].lower()
        code, st = call(info, "GET", "/v1/status")
        assert code == 200 and st["counts"]["rewards"] == 1 and st["queue"]["failed"] == 1
    finally:
        assert stop(proc) == 0
    log = (home / "daemon.log").read_text()
    assert "job done" in log and "job failed" in log
