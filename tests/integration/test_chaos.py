"""``mlpipe chaos --short`` for real: the local stack (broker, Triton, consumer, gateway, supervisor) on free
loopback ports, a steady stream of frames, and one trial each of: kill -9 of the consumer, kill -9 of Triton's
group, a stalled Triton (SIGSTOP/SIGCONT), a burst of every poison kind (poison also at random points).
The targets are asserted from its results.json: 0 lost, 0 duplicate Qdrant points, every poison frame
dead-lettered with its reason, every service recovered without a hand. The long run is ``make chaos``
(docs/CHAOS.md).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tasks.local import stack

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.integration]


def _chaos(args: list[str], tmp_path: Path, timeout: float) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "MLPIPE_HOME": str(tmp_path / "var")}
    return subprocess.run([sys.executable, "-m", "tasks.cli", "chaos", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_short_chaos_run_meets_every_target(tmp_path):
    out = tmp_path / "chaos"
    run = _chaos(["--short", "--out-dir", str(out)], tmp_path, timeout=420)
    print(run.stdout[-4000:])
    results_path = out / "results.json"
    assert results_path.exists(), run.stdout[-3000:] + run.stderr[-3000:]
    r = json.loads(results_path.read_text())
    assert run.returncode == 0, f"{r['missed']}\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}"
    # one line per trial, the table printed
    for name in ("consumer-kill", "triton-kill", "triton-stall", "poison"):
        assert f" {name} " in run.stdout
    assert "| lost (sent valid, neither predicted nor dead-lettered) |" in run.stdout
    assert (out / "results.md").read_text().startswith("# Chaos run (short)")
    # the targets, from the figures themselves
    assert r["trials_run"] == 4 and [t["name"] for t in r["trials"]] == [
        "consumer-kill", "triton-kill", "triton-stall", "poison"]
    f, q, p = r["frames"], r["qdrant"], r["poison"]
    assert f["sent_acked"] > 0 and f["lost"] == 0, f
    assert f["predicted"] + f["dead_lettered_valid"] == f["sent_acked"]
    assert q["duplicate_points"] == 0 and q["points"] == q["distinct_ids"] > 0, q
    assert p["all_dead_lettered"] and all(k["sent"] > 0 and k["ok"] for k in p["by_kind"].values()), p
    assert r["all_recovered_without_a_hand"]
    for t in r["trials"]:
        assert t["recovered"] and t["recovery_s"] is not None, t
        if t["name"] in ("consumer-kill", "triton-kill"):
            assert t["restarted"] and t["new_pid"] != t["old_pid"], t
    assert all(s["alive"] and s["healthy"] for s in r["services_at_end"].values()), r["services_at_end"]
    # everything it started was stopped
    assert stack.read_state(out / "home") is None


def test_chaos_usage_errors(tmp_path):
    bad = _chaos(["--trials", "meteor-strike"], tmp_path, timeout=60)
    assert bad.returncode == 2 and "unknown meteor-strike" in bad.stderr and "Traceback" not in bad.stderr
    shown = _chaos(["--help"], tmp_path, timeout=60)
    assert shown.returncode == 0 and "broker-kill" in shown.stdout and "results.json" in shown.stdout
