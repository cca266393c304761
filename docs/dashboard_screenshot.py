"""Write docs/dashboard.png: the dashboard of a real daemon on the unit micro-zoo, taken by headless Chromium.

The daemon runs its own evaluation queue: the script asks for suggestions for each of the zoo's tasks and for one
two-task target, the daemon merges and evaluates the ones it chose to evaluate (within its budget), and the rewards
on the page are those evaluations (nothing is typed in by the script). Needs Debian's ``chromium`` and
``pip install playwright``; a few minutes on 2 cores.

    python docs/dashboard_screenshot.py [--out docs/dashboard.png] [--rounds 6]
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def simmerge(home: Path, *args: str) -> dict | list:
    out = subprocess.run([sys.executable, "-m", "simmerge_bandit", "--home", str(home), *args, "--json"],
                         check=True, capture_output=True, text=True)
    return json.loads(out.stdout)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "docs" / "dashboard.png"))
    ap.add_argument("--rounds", type=int, default=6, help="Suggestion rounds over the targets.")
    ap.add_argument("--chromium", default=shutil.which("chromium") or "chromium")
    args = ap.parse_args()

    from playwright.sync_api import expect, sync_playwright

    from simmerge_bandit.zoo import build_zoo

    with tempfile.TemporaryDirectory() as tmp:
        zoo, home = Path(tmp) / "zoo", Path(tmp) / "home"
        manifest = build_zoo(zoo, "unit", progress=False)
        simmerge(home, "zoo", "register", str(zoo))
        tasks = [t["name"] if isinstance(t, dict) else t for t in manifest["tasks"]]
        log = open(Path(tmp) / "daemon.log", "ab")
        proc = subprocess.Popen([sys.executable, "-m", "simmerge_bandit", "--home", str(home), "daemon",
                                 "--device", "cpu", "--eval-budget", "40", "--eval-limit", "8"],
                                stdout=log, stderr=log)
        try:
            deadline = time.time() + 120
            while not (home / "daemon.json").exists():
                if proc.poll() is not None or time.time() > deadline:
                    sys.exit("the daemon did not start: " + (Path(tmp) / "daemon.log").read_text())
                time.sleep(0.2)
            targets = [[t] for t in tasks] + [tasks[:2]]
            for _ in range(args.rounds):
                for target in targets:
                    simmerge(home, "suggest", *[a for t in target for a in ("--task", t)], "--top", "3")
                deadline = time.time() + 300  # the daemon evaluates what it queued; then the next round learns
                while time.time() < deadline:
                    q = simmerge(home, "status")["queue"]
                    if q["queued"] + q["running"] == 0:
                        break
                    time.sleep(1)
            url = simmerge(home, "ui")["url"]
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path=args.chromium, args=["--no-sandbox"])
                page = browser.new_page(viewport={"width": 1400, "height": 1150})
                page.goto(url)
                page.wait_for_selector("body[data-updates]")
                expect(page.locator("#state")).to_contain_text("live")
                page.screenshot(path=args.out)  # the top of the page: counts, curves, targets, decisions
                browser.close()
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=120)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
