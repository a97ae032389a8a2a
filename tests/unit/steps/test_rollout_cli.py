"""`mlpipe rollout` without Triton: refusals (exit 2, nothing changed), the kill switch and status."""

from __future__ import annotations

import json

from tasks.contracts import layout
from tasks.contracts.errors import EXIT_BAD_INPUT
from tasks.local.stack import _print_summary, _rollout_state
from tasks.steps import registry, rollout
from tests.support.models import mark_qc_passed, register_files


def _version(store, model="digits") -> int:
    from tests.support.factories import digits_onnx_bytes

    return register_files(store, model, {"model.onnx": digits_onnx_bytes(), "metrics.json": b"{}"})


def test_refused_requests_exit_2_with_the_reason_and_change_nothing(store, capsys):
    v1 = _version(store)
    assert rollout.main(["run", "--version", str(v1)]) == EXIT_BAD_INPUT
    assert "has not passed the QC gate" in capsys.readouterr().err
    mark_qc_passed(store, "digits", v1)
    assert rollout.main(["run", "--version", str(v1)]) == EXIT_BAD_INPUT
    assert "no production version" in capsys.readouterr().err
    registry.set_stage(store, "digits", v1, "production", "test")
    v2 = _version(store)
    mark_qc_passed(store, "digits", v2)
    for argv, words in ((["--version", "9"], "has no version 9"), (["--version", str(v1)], "already the production"),
                        (["--version", str(v2), "--steps", "shadow,101"], "0..100"),
                        (["--version", str(v2), "--steps", "shadow,50"], "must be 100")):
        assert rollout.main(["run", *argv]) == EXIT_BAD_INPUT, argv
        assert words in capsys.readouterr().err, argv
    assert not store.exists(layout.rollout_state_key("digits"))
    # one at a time: a fresh lease held by another controller refuses a second rollout at once
    lock = rollout.rollout_lock(store, "digits", "rollout r-test of digits v2").acquire()
    try:
        assert rollout.main(["run", "--version", str(v2)]) == EXIT_BAD_INPUT
        assert "already running (rollout r-test" in capsys.readouterr().err
    finally:
        lock.release()


def test_kill_writes_off_with_who_and_why_and_status_shows_it(store, capsys):
    v1 = _version(store)
    mark_qc_passed(store, "digits", v1)
    registry.set_stage(store, "digits", v1, "production", "test")
    store.put_json(layout.rollout_state_key("digits"), rollout.RolloutState(
        model="digits", rollout_id="r1", mode="canary", share=10, champion=str(v1), candidate="2",
        step="canary-10").model_dump())
    before = _rollout_state("digits")
    lines: list[str] = []
    _print_summary({"home": "/h", "services": {}, "rollout": before}, lines.append)
    assert any("rollout        canary 10%: candidate v2 vs champion v1" in x for x in lines), lines
    assert rollout.main(["kill", "--reason", "pager: DLQ rate", "--by", "oncall"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["was"]["mode"] == "canary" and out["state"]["mode"] == "off" and out["state"]["champion"] == str(v1)
    state = rollout.read_state(store, "digits")
    assert state.killed["by"] == "oncall" and state.killed["reason"] == "pager: DLQ rate"
    (event,) = [e for e in registry.events(store, "digits") if e["event"] == "rollout_kill"]
    assert event["was"]["share"] == 10 and event["by"] == "oncall"
    lines.clear()
    _print_summary({"home": "/h", "services": {}, "rollout": _rollout_state("digits")}, lines.append)
    assert any("rollout        none (champion v1" in x and "pager: DLQ rate" in x for x in lines), lines
    assert rollout.main(["status"]) == 0
    assert json.loads(capsys.readouterr().out)["state"]["mode"] == "off"
