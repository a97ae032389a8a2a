"""tasks.local.stack's process control through psutil: PID-reuse checks by start time, stopping a tree."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psutil

from tasks.local import stack
from tasks.local.procs import ManagedProcess

# a parent that ignores SIGTERM (so it needs the SIGKILL), with a child in its own session
STUBBORN = ("import signal, subprocess, sys, time\n"
            "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
            "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'], start_new_session=True)\n"
            "time.sleep(60)\n")
POLITE = ("import subprocess, sys, time\n"
          "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
          "time.sleep(60)\n")


def _spawn(code: str, tmp_path) -> tuple[subprocess.Popen, list[tuple[int, float]]]:
    mp = ManagedProcess("t", [sys.executable, "-c", code], tmp_path / f"{len(stack._STARTED)}.log").start()
    stack._STARTED[mp.pid] = mp  # as `up` does: this process reaps it
    proc = mp.proc
    deadline = time.monotonic() + 20
    while not stack.descendants(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    kids = stack.descendants(proc.pid)
    assert len(kids) == 1, kids
    return proc, kids


def test_start_time_and_pid_reuse_check():
    me = os.getpid()
    created = stack.start_time(me)
    assert created == psutil.Process(me).create_time()
    assert stack.pid_alive(me) and stack.pid_alive(me, created)
    assert not stack.pid_alive(me, created - 10)  # another process that had this PID before
    assert not stack.pid_alive(None) and not stack.pid_alive(0)
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    pid = proc.pid
    deadline = time.monotonic() + 10
    while proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not stack.pid_alive(pid) and stack.start_time(pid) is None and stack.descendants(pid) == []


def test_stop_pids_stops_the_tree_and_kills_the_stubborn(tmp_path):
    polite, polite_kids = _spawn(POLITE, tmp_path)
    stubborn, stubborn_kids = _spawn(STUBBORN, tmp_path)
    try:
        procs = [("polite", polite.pid, stack.start_time(polite.pid)),
                 ("stubborn", stubborn.pid, stack.start_time(stubborn.pid)),
                 ("reused", polite.pid, stack.start_time(polite.pid) - 100),  # same PID, another start
                 ("gone", 0, None)]
        t0 = time.monotonic()
        result = stack.stop_pids(procs, grace=1.0)
        assert time.monotonic() - t0 < 15
        assert result == {"polite": "stopped", "stubborn": "killed", "reused": "not running", "gone": "not running"}
        assert polite.wait(timeout=5) == -signal.SIGTERM and stubborn.wait(timeout=5) == -signal.SIGKILL
        for pid, _created in polite_kids + stubborn_kids:
            assert not stack.pid_alive(pid)
    finally:
        for p in (polite, stubborn):
            if p.poll() is None:
                p.kill()
                p.wait()


def test_the_group_of_a_crashed_leader_is_stopped(tmp_path):
    """``make down`` after kill -9 of a service: its leader is gone, its group is not ("orphans stopped")."""
    polite, kids = _spawn(POLITE, tmp_path)
    created = stack.start_time(polite.pid)
    polite.kill()
    polite.wait(timeout=5)
    (kid, _), = kids
    assert stack.pid_alive(kid) and [p.pid for p in stack.session_members(polite.pid, created)] == [kid]
    assert stack.session_members(polite.pid, created + 100) == []  # not the session we recorded
    assert stack.stop_pids([("svc", polite.pid, created)], grace=1.0) == {"svc": "orphans stopped"}
    assert not stack.pid_alive(kid)
    assert stack.stop_pids([("svc", polite.pid, created)], grace=1.0) == {"svc": "not running"}


LISTENER = ("import os, socket, subprocess, sys, time\n"
            "if sys.argv[1] == 'leader':\n"
            "    subprocess.Popen([sys.executable, '-c', sys.argv[2], 'child', sys.argv[3]])\n"
            "    sys.exit(0)\n"
            "s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
            "s.bind(('127.0.0.1', 0)); s.listen(1)\n"
            "open(sys.argv[2], 'w').write(str(s.getsockname()[1]))\n"
            "time.sleep(60)\n")


def _orphan_listener(tmp_path, home) -> tuple[int, int]:
    """A process listening on a port whose session leader (started like a service) has exited."""
    portfile = tmp_path / f"port-{len(list(tmp_path.iterdir()))}"
    env = {**os.environ, "MLPIPE_HOME": str(home)}
    leader = subprocess.Popen([sys.executable, "-c", LISTENER, "leader", LISTENER, str(portfile)], env=env,
                              start_new_session=True)
    leader.wait(timeout=20)
    deadline = time.monotonic() + 20
    while not (portfile.exists() and portfile.read_text()) and time.monotonic() < deadline:
        time.sleep(0.05)
    port = int(portfile.read_text())
    holder = stack.port_holder(port)
    assert holder is not None and os.getsid(holder.pid) == leader.pid
    return port, holder.pid


def test_a_port_held_by_our_orphan_is_freed_and_another_programs_is_not(tmp_path):
    home = (tmp_path / "var").resolve()
    port, pid = _orphan_listener(tmp_path, home)
    msgs: list[str] = []
    assert stack._free_our_port(home, None, "scheduler", port, msgs.append) is True  # same MLPIPE_HOME
    assert not stack.pid_alive(pid) and "left behind" in msgs[0]
    other_port, other = _orphan_listener(tmp_path, tmp_path / "someone-else")
    try:
        assert stack._free_our_port(home, None, "scheduler", other_port, msgs.append) is False
        assert stack.pid_alive(other)
    finally:
        os.kill(other, signal.SIGKILL)
