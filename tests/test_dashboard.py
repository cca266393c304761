"""The daemon's dashboard: login by a one-time URL, pages and data only to a session (or the token), and the page
itself in a real headless Chromium against one real daemon on loopback."""

from __future__ import annotations

import http.client
import json
import os
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from simmerge_bandit import dashboard
from simmerge_bandit.backend import LocalBackend
from simmerge_bandit.catalog import Catalog
from simmerge_bandit.cli import cli
from simmerge_bandit.store import Store

from conftest import write_jsonl
from test_daemon import call, start_daemon, stop


# ---- sessions, without a daemon ----

def test_a_nonce_works_once_and_only_before_it_expires(monkeypatch):
    s = dashboard.UiSessions("127.0.0.1", 8123)
    url = s.issue()["url"]
    assert url.startswith("http://127.0.0.1:8123/ui/login?nonce=")
    nonce = url.split("nonce=")[1]
    secret = s.login(nonce)
    assert secret and secret != nonce
    assert s.valid({"cookie": f"other=1; simmerge_ui_8123={secret}"})
    assert not s.valid({"cookie": f"simmerge_ui_9999={secret}"})  # another daemon's cookie name
    assert not s.valid({"cookie": "simmerge_ui_8123=guess"}) and not s.valid({})
    assert s.login(nonce) is None  # spent
    monkeypatch.setattr(dashboard, "NONCE_S", -1.0)
    assert s.login(s.issue()["url"].split("nonce=")[1]) is None  # expired
    s.logout({"cookie": f"simmerge_ui_8123={secret}"})
    assert not s.valid({"cookie": f"simmerge_ui_8123={secret}"})
    assert "[::1]:8123" in dashboard.UiSessions("::1", 8123).issue()["url"]


def test_nonces_and_sessions_are_bounded():
    s = dashboard.UiSessions("127.0.0.1", 1)
    first = s.issue()["url"].split("nonce=")[1]
    for _ in range(dashboard.MAX_NONCES):
        s.issue()
    assert len(s._nonces) == dashboard.MAX_NONCES and s.login(first) is None  # the oldest went first


# ---- one real daemon for the module ----

@pytest.fixture(scope="module")
def daemon(tmp_path_factory, tiny_models):
    root = tmp_path_factory.mktemp("dash")
    home = root / "home"
    with Store.open(home) as store:
        cat = Catalog(store)
        cat.add_model(tiny_models["base"], name="base")
        for key in ("ft_a", "ft_b"):
            cat.add_model(tiny_models[key], name=key, base="base", tasks=["double"])
        rows = [{"prompt": f"{i}+{i}=", "answer": str(2 * i)} for i in range(6)]
        cat.add_task("double", write_jsonl(root / "d.jsonl", rows))
        cat.add_operator("lin", "linear")
        cat.add_operator("ties5", "ties", {"density": 0.5})
        # signatures here, where torch is loaded already: the daemon's first suggestion is then arithmetic
        LocalBackend(store).compute_signatures()
    proc, info = start_daemon(home, "--eval-budget", "0")
    try:
        yield home, info
    finally:
        assert stop(proc) == 0


def _get(info, path, headers=None, method="GET"):
    conn = http.client.HTTPConnection("127.0.0.1", info["port"], timeout=30)
    conn.request(method, path, headers=headers or {})
    resp = conn.getresponse()
    body = resp.read()
    conn.close()
    return resp.status, dict(resp.getheaders()), body


def _login_url(home: Path) -> str:
    out = CliRunner().invoke(cli, ["--home", str(home), "ui", "--json"], catch_exceptions=False)
    assert out.exit_code == 0, out.output
    return json.loads(out.output)["url"]


def _status(home: Path) -> dict:
    out = CliRunner().invoke(cli, ["--home", str(home), "status", "--json"], catch_exceptions=False)
    assert out.exit_code == 0, out.output
    return json.loads(out.output)


def test_login_url_sets_a_session_cookie_once_and_opens_only_the_dashboard(daemon):
    home, info = daemon
    # nothing without the token or a session: a page that says how to log in, no data
    code, _, body = _get(info, "/ui/")
    assert code == 401 and b"simmerge ui" in body and b"ft_a" not in body
    assert _get(info, "/ui/app.js")[0] == 401
    code, headers, _ = _get(info, "/ui/style.css")  # (the login page's stylesheet: no data)
    assert code == 200 and headers["Content-Type"].startswith("text/css")
    assert _get(info, "/v1/dashboard")[0] == 401
    url = _login_url(home)
    path = url.split(str(info["port"]), 1)[1]
    code, headers, _ = _get(info, path)
    assert code == 303 and headers["Location"] == "/ui/"
    cookie = headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and info["token"] not in cookie
    session = cookie.split(";")[0]
    assert session.startswith(f"simmerge_ui_{info['port']}=")
    assert _get(info, path)[0] == 401  # the link works once
    jar = {"Cookie": session}
    code, headers, body = _get(info, "/ui/", jar)
    assert code == 200 and headers["Content-Type"].startswith("text/html") and b"app.js" in body
    assert "script-src 'self'" in headers["Content-Security-Policy"]
    assert _get(info, "/ui/../daemon.json", jar)[0] == 404
    code, _, body = _get(info, "/v1/dashboard", jar)
    assert code == 200 and json.loads(body)["status"]["counts"]["models"] == 3
    # the cookie opens the dashboard's data only: no other route, nothing that changes state
    assert _get(info, "/v1/status", jar)[0] == 401
    assert _get(info, "/v1/suggest", jar, method="POST")[0] == 401
    # the token opens the same data (what scripts use)
    assert call(info, "GET", "/v1/dashboard")[0] == 200
    code, _, _ = _get(info, "/ui/logout", jar, method="POST")
    assert code == 200 and _get(info, "/v1/dashboard", jar)[0] == 401
    log = (home / "daemon.log").read_text()
    assert "ui login ok=True" in log
    for secret in (info["token"], path.split("nonce=")[1], session.split("=", 1)[1]):
        assert secret not in log


def test_ui_without_a_daemon_says_so_and_the_data_reads_the_store(tmp_path):
    out = CliRunner().invoke(cli, ["--home", str(tmp_path / "h"), "ui"])
    assert out.exit_code == 1 and "simmerge daemon" in out.output and "Traceback" not in out.output
    with Store.open(tmp_path / "h") as store:
        Catalog(store).add_operator("lin", "linear")
        d = LocalBackend(store).dashboard()
    assert d["status"]["counts"]["operators"] == 1 and d["curve"] == [] and d["targets"] == []
    assert [o["name"] for o in d["operators"]] == ["lin"] and d["policy"]["default"] == "linucb-hybrid"


def test_dashboard_data_has_the_best_merge_per_target_and_the_reward_curve(daemon):
    home, info = daemon
    code, rows = call(info, "POST", "/v1/suggest", {"task": "double", "top": 2})
    assert code == 200
    for r, reward in zip(rows, (0.25, 0.75)):
        assert call(info, "POST", "/v1/feedback", {"id": r["id"], "reward": reward})[0] == 200
    code, d = call(info, "GET", "/v1/dashboard")
    assert code == 200
    assert d["status"]["counts"] == _status(home)["counts"]
    (t,) = [t for t in d["targets"] if t["target"] == "double"]
    assert t["best"]["id"] == rows[1]["id"] and t["best"]["reward"] == 0.75
    assert t["best"]["operator"] == [rows[1]["operator"]]
    rewarded = {r["id"]: r["reward"] for r in d["decisions"]}
    assert rewarded[rows[0]["id"]] == 0.25
    n = d["status"]["counts"]["rewards"]
    assert d["curve"][-1]["rewards"] == n
    assert d["curve"][-1]["cumulative"] == pytest.approx(sum(r["reward"] for r in d["decisions"]
                                                             if r["reward"] is not None))
    assert d["policy"]["default"] == "linucb-hybrid"
    assert {o["name"] for o in d["operators"]} == {"lin", "ties5"}
    assert sum(o["chosen"] for o in d["operators"]) >= 1


# ---- the page in a real browser ----

def _chromium() -> str | None:
    return os.environ.get("SIMMERGE_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def browser():
    exe = _chromium()
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        exe = None
    if exe is None:
        if os.environ.get("CI"):  # .ci/run installs both: a CI run must not pass by skipping
            pytest.fail("no Chromium or no playwright in CI: .ci/run should have installed them")
        pytest.skip("no Chromium (apt-get install chromium) or no playwright (pip install playwright)")
    with sync_playwright() as p:  # noqa: F821 (imported above when it exists)
        b = p.chromium.launch(executable_path=exe, args=["--no-sandbox"])
        try:
            yield b
        finally:
            b.close()


def _counts(page) -> dict:  # what the page's count cards show
    return {k: int(page.inner_text(f"#count-{k}").replace(",", ""))
            for k in ("models", "tasks", "operators", "decisions", "rewards")}


def test_the_page_shows_status_counts_updates_after_feedback_and_refuses_without_login(daemon, browser):
    from playwright.sync_api import expect

    home, info = daemon
    ctx = browser.new_context()
    page = ctx.new_page()
    try:
        spent = _login_url(home)
        page.goto(spent)
        assert page.url.endswith("/ui/")
        page.goto(page.url + "?poll=250")  # a short refresh period
        page.wait_for_selector("body[data-updates]", timeout=10_000)  # (no wait_for_function: the page's CSP
        # forbids eval, which is how Playwright runs one)
        assert _counts(page) == _status(home)["counts"]
        assert page.inner_text("#policy").startswith("linucb-hybrid")
        assert "ft_a" in page.inner_text("#models") and "ties5" in page.inner_text("#operators")
        before = _counts(page)["rewards"]
        code, rows = call(info, "POST", "/v1/suggest", {"task": "double", "top": 1})
        assert code == 200 and call(info, "POST", "/v1/feedback", {"id": rows[0]["id"], "reward": 0.5})[0] == 200
        expect(page.locator("#count-rewards")).to_have_text(str(before + 1), timeout=10_000)
        assert _counts(page) == _status(home)["counts"]
        row = page.locator("#decisions tr", has_text=rows[0]["id"])
        assert row.inner_text().rstrip().endswith("0.500")
        if os.environ.get("SIMMERGE_UI_SCREENSHOT"):  # docs/dashboard.png, by scripts/dashboard_screenshot.sh
            page.set_viewport_size({"width": 1400, "height": 1000})
            page.screenshot(path=os.environ["SIMMERGE_UI_SCREENSHOT"], full_page=True)
        # without the session cookie (a new browser context): the login page, no data
        other = browser.new_context().new_page()
        resp = other.goto(f"http://127.0.0.1:{info['port']}/ui/")
        assert resp.status == 401 and "simmerge ui" in other.inner_text("body")
        assert other.locator("#count-models").count() == 0
        assert other.evaluate("fetch('/v1/dashboard').then(r => r.status)") == 401
        # a login link that was spent does not log the other browser in; a fresh one does
        assert other.goto(spent).status == 401
        assert other.evaluate("fetch('/v1/dashboard').then(r => r.status)") == 401
        other.goto(_login_url(home))
        assert other.evaluate("fetch('/v1/dashboard').then(r => r.status)") == 200
    finally:
        ctx.close()
