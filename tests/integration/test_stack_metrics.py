"""The local stack's Prometheus (``make up``) scrapes every service, loads the repository's rules, and
``make status`` prints its URL and the cost per frame. Uses the session's ``mlpipe_stack`` (started once,
run last with the other stack tests)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

from tasks.local import stack

ROOT = Path(__file__).resolve().parents[2]
JOBS = {"consumer", "gateway", "triton", "exporter", "prometheus"}


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=5) as resp:  # noqa: S310 - loopback
        return json.loads(resp.read())


def test_the_stack_prometheus_scrapes_every_service_and_status_prints_it(mlpipe_stack):
    st = stack.status(mlpipe_stack.home)
    base = st["urls"]["prometheus"]
    assert st["services"]["prometheus"]["healthy"] and st["services"]["exporter"]["healthy"]
    deadline = time.monotonic() + 60  # the default scrape interval is 15 s
    health: dict[str, str] = {}
    while time.monotonic() < deadline:
        targets = _get(f"{base}/api/v1/targets")["data"]["activeTargets"]
        health = {t["labels"]["job"]: t["health"] for t in targets}
        if set(health) == JOBS and all(h == "up" for h in health.values()):
            break
        time.sleep(1)
    assert set(health) == JOBS and all(h == "up" for h in health.values()), health
    groups = {g["name"] for g in _get(f"{base}/api/v1/rules")["data"]["groups"]}
    assert groups == {"mlpipe.recording", "mlpipe.alerts"}
    q = urllib.parse.urlencode({"query": 'mlpipe_kafka_up{job="exporter"}'})
    assert [r["value"][1] for r in _get(f"{base}/api/v1/query?{q}")["data"]["result"]] == ["1"]
    # make status: the Prometheus URL and a cost line (no frames yet, or CPU s per 1,000 frames)
    out = subprocess.run([sys.executable, "-m", "tasks.cli", "stack", "--home", str(mlpipe_stack.home), "status"],
                         capture_output=True, text=True, timeout=60, cwd=ROOT, env=mlpipe_stack.env).stdout
    assert f"Prometheus     {base}" in out
    assert "  cost           " in out and "per 1,000 frames" in out
