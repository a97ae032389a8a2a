"""The stack supervisor (tasks.local.stack): restart backoff and give-up, why a service died, its orphaned
process group stopped; and the supervisor process `up` starts, restarting a kill -9'd service until `down`.

Tiny Python processes stand in for the services (no Airflow, no Triton): a few seconds in all.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tasks.local import stack

# a leader with a child in its session (a scheduler and its forked workers); writes the child's PID
WITH_CHILD = ("import subprocess, sys, time\n"
              "c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])\n"
              "open(sys.argv[1], 'a').write(f'{c.pid}\\n')\n"
              "print('leader up', flush=True)\n"
              "time.sleep(120)\n")


def _wait(check, timeout: float, what: str, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"{what} not within {timeout}s")


def _dead_pid() -> tuple[int, float]:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    created = stack.start_time(proc.pid) or time.time()
    proc.wait()
    return proc.pid, created


def _home(tmp_path: Path, services: dict[str, dict], supervisor_pid: int | None) -> Path:
    home = tmp_path / "var"
    (home / "stack" / "logs").mkdir(parents=True)
    state = {"home": str(home), "ports": {}, "services": services}
    if supervisor_pid:
        state[stack.SUPERVISOR] = {"pid": supervisor_pid}
    stack.write_state(home, state)
    return home


def test_backoff_doubles_caps_and_gives_up_within_the_window():
    b = stack.Backoff(initial=1, factor=2, maximum=30, max_restarts=5, window=600, stable_after=60)
    assert [b.next_delay(t, ran_for=1) for t in range(5)] == [1, 2, 4, 8, 16]
    assert b.next_delay(5, ran_for=1) is None  # a 6th crash within 600 s: give up
    assert b.next_delay(700, ran_for=1) == 30  # the window moved on; the delay stays doubled (capped)
    b = stack.Backoff(initial=1, maximum=30, max_restarts=100)
    assert [b.next_delay(t) for t in range(7)] == [1, 2, 4, 8, 16, 30, 30]
    assert b.next_delay(8, ran_for=61) == 1  # it had run stably: start over


def test_exit_reasons():
    assert stack.exit_reason(3) == "exit code 3"
    assert stack.exit_reason(-signal.SIGKILL) == "killed by SIGKILL"
    assert "unknown" in stack.exit_reason(None)


def test_a_crashing_service_is_restarted_with_backoff_then_marked_failed(tmp_path, capsys):
    pid, created = _dead_pid()
    log = tmp_path / "flaky.log"
    home = _home(tmp_path, {"gateway": {
        "pid": pid, "create_time": created, "log": str(log), "started_at": time.time(), "supervised": True,
        "argv": [sys.executable, "-c", "print('boom: no config', flush=True); raise SystemExit(3)"]}},
        supervisor_pid=os.getpid())
    lines: list[str] = []
    sup = stack.Supervisor(home, lambda: stack.Backoff(initial=0.1, factor=2, max_restarts=3, window=60),
                           interval=0.05, log=lines.append)
    t0 = time.monotonic()

    def failed():
        assert sup.check_once()
        return stack.read_state(home)["services"]["gateway"].get("failed")
    why = _wait(failed, 30, "the give-up")
    elapsed = time.monotonic() - t0
    assert "gave up after 3 restarts" in why and "exit code 3" in why
    info = stack.read_state(home)["services"]["gateway"]
    assert info["restarts"] == 3 and info["last_exit"] == "exit code 3"
    assert 0.7 <= elapsed < 20  # 0.1 + 0.2 + 0.4 s of backoff at least
    text = "\n".join(lines)
    assert "exit status unknown" in text  # the first death: not started by this supervisor
    assert text.count("died: exit code 3") == 3 and "| boom: no config" in text  # why, with the log's tail
    assert "restarting in" in text
    # no more restarts once failed; `status` says so
    sup.check_once()
    assert stack.read_state(home)["services"]["gateway"]["restarts"] == 3
    st = stack.status(home)
    assert st["services"]["gateway"]["failed"] == why and st["supervisor"]["alive"] is True
    stack._print_summary(st)
    assert "FAILED" in capsys.readouterr().out


def test_a_killed_leaders_orphans_are_stopped_before_the_restart(tmp_path):
    pid, created = _dead_pid()
    kids = tmp_path / "kids.txt"
    code = WITH_CHILD.replace("print('leader up', flush=True)\n", "print('leader up', flush=True)\n"
                        "import os, signal; os.kill(os.getpid(), signal.SIGKILL)\n")
    home = _home(tmp_path, {"gateway": {
        "pid": pid, "create_time": created, "log": str(tmp_path / "g.log"), "started_at": time.time(),
        "supervised": True, "argv": [sys.executable, "-c", code, str(kids)]}}, supervisor_pid=os.getpid())
    lines: list[str] = []
    sup = stack.Supervisor(home, lambda: stack.Backoff(initial=0.05, max_restarts=1, window=60),
                           interval=0.05, log=lines.append)

    def failed():
        sup.check_once()
        return stack.read_state(home)["services"]["gateway"].get("failed")
    _wait(failed, 30, "the give-up")
    text = "\n".join(lines)
    assert "died: killed by SIGKILL" in text and "stopped the processes its group left behind" in text
    orphan = int(kids.read_text().split()[0])
    assert not stack.pid_alive(orphan)


def test_supervisor_process_restarts_a_killed_service_and_down_stops_all(tmp_path):
    """What `up` does, with a stand-in service: the supervisor process starts it (over its stdin), restarts
    it after kill -9 with the orphaned child stopped, and `down` stops the supervisor first, then the rest."""
    home = _home(tmp_path, {}, supervisor_pid=None)
    state = stack.read_state(home)
    handle = stack.SupervisorHandle.start(home, os.environ, ["--interval", "0.1", "--initial-delay", "0.2"])
    kids = tmp_path / "kids.txt"
    try:
        state[stack.SUPERVISOR] = handle.record()
        stack.write_state(home, state)
        handle.connect()  # paused while connected, as `up` is
        log = home / "stack" / "logs" / "gateway.log"
        argv = [sys.executable, "-c", WITH_CHILD, str(kids)]
        pid, created = handle.spawn("gateway", argv, log)
        assert os.getpgid(pid) == pid and os.getsid(pid) == pid  # its own group and session
        state["services"]["gateway"] = {"pid": pid, "create_time": created, "argv": argv, "log": str(log),
                                        "started_at": time.time(), "supervised": True}
        stack.write_state(home, state)
        handle.close()
        assert stack.supervisor_socket(home).exists()
        _wait(lambda: kids.exists() and kids.read_text().strip(), 20, "the first child")
        first_child = int(kids.read_text().split()[0])

        os.kill(pid, signal.SIGKILL)
        t0 = time.monotonic()
        new = _wait(lambda: (stack.read_state(home)["services"]["gateway"]["pid"] != pid
                             and stack.read_state(home)["services"]["gateway"]), 20, "the restart")
        assert time.monotonic() - t0 < 10
        assert stack.pid_alive(new["pid"], new["create_time"]) and new["restarts"] == 1
        assert new["last_exit"] == "killed by SIGKILL"
        assert not stack.pid_alive(first_child)  # the orphan of the killed leader
        assert int((home / "stack" / "pids" / "gateway.pid").read_text()) == new["pid"]
        sup_log = (home / "stack" / "logs" / "supervisor.log").read_text()
        assert "gateway (pid %d) died: killed by SIGKILL" % pid in sup_log and "leader up" in sup_log
        _wait(lambda: len(kids.read_text().split()) == 2, 20, "the second child")

        # While `up` is connected the supervisor restarts nothing (up starts what is down itself).
        handle.connect()
        os.kill(new["pid"], signal.SIGKILL)
        time.sleep(1.5)
        assert stack.read_state(home)["services"]["gateway"]["pid"] == new["pid"]
        handle.close()
        new = _wait(lambda: (stack.read_state(home)["services"]["gateway"]["pid"] != new["pid"]
                             and stack.read_state(home)["services"]["gateway"]), 20, "the restart after the pause")
        assert new["restarts"] == 2
        _wait(lambda: len(kids.read_text().split()) == 3, 20, "the third child")
        second_child = int(kids.read_text().split()[2])

        t0 = time.monotonic()
        result = stack.down(home, out=lambda _m: None)
        assert time.monotonic() - t0 < 10
        assert result == {"supervisor": "stopped", "gateway": "stopped"}
        assert not stack.pid_alive(handle.pid) and not stack.pid_alive(new["pid"])
        assert not stack.pid_alive(second_child)
        assert stack.read_state(home) is None and not stack.supervisor_socket(home).exists()
    finally:
        for p in [handle.pid]:
            if stack.pid_alive(p):
                os.kill(p, signal.SIGKILL)
        if handle.mp.proc is not None:
            try:
                handle.mp.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass


@pytest.mark.parametrize("prefix", ["", "short", "triton_python_backend_shm_region_", "triton_py", "bad/x_12345"])
def test_shm_prefix_must_be_ours(prefix):
    from tasks.local.triton import remove_shm_regions

    with pytest.raises(ValueError):
        remove_shm_regions(prefix)


def test_only_regions_with_our_prefix_are_removed(tmp_path):
    from tasks.local.triton import remove_shm_regions

    for name in ("mlpipe_aaaa_1", "mlpipe_aaaa_2", "mlpipe_bbbb_1", "triton_python_backend_shm_region_x"):
        (tmp_path / name).write_bytes(b"x")
    assert sorted(remove_shm_regions("mlpipe_aaaa_", shm_dir=tmp_path)) == ["mlpipe_aaaa_1", "mlpipe_aaaa_2"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mlpipe_bbbb_1", "triton_python_backend_shm_region_x"]
    assert stack.shm_prefix(tmp_path) == stack.shm_prefix(tmp_path) != stack.shm_prefix(tmp_path / "x")


def test_down_of_one_service_is_not_undone_by_the_supervisor(tmp_path):
    home = _home(tmp_path, {}, supervisor_pid=None)
    state = stack.read_state(home)
    handle = stack.SupervisorHandle.start(home, os.environ, ["--interval", "0.1", "--initial-delay", "0.1"])
    try:
        state[stack.SUPERVISOR] = handle.record()
        stack.write_state(home, state)
        handle.connect()
        for name in ("gateway", "consumer"):
            log = home / "stack" / "logs" / f"{name}.log"
            argv = [sys.executable, "-c", "import time; time.sleep(120)"]
            pid, created = handle.spawn(name, argv, log)
            state["services"][name] = {"pid": pid, "create_time": created, "argv": argv, "log": str(log),
                                       "started_at": time.time(), "supervised": True}
        stack.write_state(home, state)
        handle.close()
        assert stack.down(home, services="gateway", out=lambda _m: None) == {"gateway": "stopped"}
        time.sleep(1.0)
        after = stack.read_state(home)
        assert set(after["services"]) == {"consumer"} and stack.supervisor_alive(after)
        assert not stack.pid_alive(state["services"]["gateway"]["pid"])
        assert stack.pid_alive(after["services"]["consumer"]["pid"], after["services"]["consumer"]["create_time"])
        assert stack.down(home, out=lambda _m: None) == {"supervisor": "stopped", "consumer": "stopped"}
        assert stack.read_state(home) is None
    finally:
        if stack.pid_alive(handle.pid):
            os.kill(handle.pid, signal.SIGKILL)
