"""--executor ray on a local Ray (the daemon's ray.init() starts one): jobs run as Ray tasks, a worker killed in the
middle of a job is retried, and the daemon stays the only process that opens the state."""

import json
import os
import shlex
import signal
import time
from pathlib import Path

import pytest

from simmerge_bandit.catalog import Catalog
from simmerge_bandit.store import Store

from conftest import write_jsonl
from test_daemon import call, home, start_daemon, stop  # noqa: F401 (home is a fixture)

pytest.importorskip("ray")


def holders(path: Path) -> set[int]:
    """The pids of every process that has ``path`` open now."""
    out = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                if os.readlink(f"/proc/{pid}/fd/{fd}") == str(path):
                    out.add(int(pid))
        except OSError:  # gone, or not ours to read
            continue
    return out


def test_jobs_run_as_ray_tasks_a_killed_worker_is_retried_and_the_daemon_is_the_only_writer(home, tmp_path):  # noqa: F811
    marker = tmp_path / "attempts"
    # The evaluation records where it runs (its parent is the Ray worker; it leads its own process group) and, the
    # first time, waits to be killed with its worker; later ones answer at once.
    m = shlex.quote(str(marker))
    cmd = f"echo $PPID $$ >> {m}; [ $(wc -l < {m}) -gt 1 ] || sleep 60; echo '{{{{\"acc\": 0.5}}}}' > {{output}}"
    rows = [{"prompt": f"{i}+{i}=", "answer": str(2 * i)} for i in range(4)]
    with Store.open(home) as store:
        Catalog(store).add_task("ext", write_jsonl(tmp_path / "e.jsonl", rows), metric="external", eval_command=cmd,
                                metric_path="acc")
    proc, info = start_daemon(home, "--executor", "ray", "--eval-budget", "10", "--log-json")
    state = home / "state.duckdb"
    try:
        job = call(info, "POST", "/v1/suggest", {"task": "ext", "top": 1})[1][0]
        assert job["evaluate"]
        deadline = time.time() + 120
        while not (marker.exists() and marker.read_text().strip()) and time.time() < deadline:
            time.sleep(0.1)
        worker, shell = map(int, marker.read_text().split())
        assert worker not in (proc.pid, os.getpid())
        # mid-job: the state is open in the daemon alone (not in the Ray worker, not in any other process)
        assert holders(state) == {proc.pid}
        os.kill(worker, signal.SIGKILL)
        os.killpg(shell, signal.SIGKILL)  # the evaluation it was running (in a session of its own)
        deadline = time.time() + 120
        while time.time() < deadline:
            jobs = {j["decision_id"]: j for j in call(info, "GET", "/v1/jobs")[1]}
            if jobs.get(job["id"], {}).get("state") in ("done", "failed"):
                break
            time.sleep(0.2)
        assert jobs[job["id"]]["state"] == "done", jobs
        assert call(info, "GET", "/v1/status")[1]["counts"]["rewards"] == 1
        assert holders(state) == {proc.pid}
    finally:
        assert stop(proc) == 0
    runs = [tuple(map(int, line.split())) for line in marker.read_text().splitlines()]
    retry_workers = {w for w, _ in runs[1:]}
    assert len(runs) == 4 and worker not in retry_workers  # the merge's evaluation again, then both sources'
    lines = [json.loads(x) for x in (home / "daemon.log").read_text().splitlines() if x.startswith("{")]
    done = [x for x in lines if x["msg"] == "job done"]
    assert [x["executor"] for x in done] == ["ray"] and done[0]["worker_pid"] in retry_workers
    assert not [x for x in lines if x["msg"] in ("job failed", "job will retry")]  # Ray retried it, not the queue
