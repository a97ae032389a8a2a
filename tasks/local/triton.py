"""The local Triton server: the ``tritonserver`` binary shipped in the nvidia-pytriton wheel.

``LocalTriton`` runs it (server 2.51, Python backend only) on free loopback
ports, explicit model control, its log kept in a file. Used by tests,
``make up`` and the demo. Clients go through ``tasks.adapters.triton``.

CLI::

    mlpipe triton serve --model-repository DIR [--load-model digits]
    mlpipe triton status --url 127.0.0.1:8001 [--model digits]
    mlpipe triton load|unload --url ... --model digits
"""

from __future__ import annotations

import argparse
import atexit
import importlib.util
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Sequence

from tasks.adapters.triton import TritonClient, TritonError, TritonNotFound
from tasks.contracts.files import atomic_write
from tasks.local.procs import LOOPBACK, ManagedProcess, free_port, http_ok, wait_until

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------
# Locating and preparing the bundled tritonserver
# ----------------------------------------------------------------------------------------------


def pytriton_dir() -> Path:
    """The installed ``pytriton`` package folder (found without importing it)."""
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise TritonNotFound("the nvidia-pytriton wheel is not installed (pip install nvidia-pytriton==0.7.0); "
                             "it ships the tritonserver binary used locally")
    return Path(list(spec.submodule_search_locations)[0])


def tritonserver_binary() -> Path:
    path = pytriton_dir() / "tritonserver" / "bin" / "tritonserver"
    if not path.is_file():
        raise TritonNotFound(f"{path} is missing: reinstall nvidia-pytriton==0.7.0")
    return path


def _server_libs_dir() -> Path:
    path = pytriton_dir().parent / "nvidia_pytriton.libs"
    if not path.is_dir():
        raise TritonNotFound(f"{path} is missing: reinstall nvidia-pytriton==0.7.0")
    return path


def _python_info(python_exe: Path) -> tuple[str, str]:
    """(``"3.11"``, the folder holding libpython) of ``python_exe``."""
    if Path(python_exe) == Path(sys.executable):
        return f"{sys.version_info.major}.{sys.version_info.minor}", str(sysconfig.get_config_var("LIBDIR"))
    code = ("import sys, sysconfig; print(f'{sys.version_info.major}.{sys.version_info.minor}'); "
            "print(sysconfig.get_config_var('LIBDIR'))")
    try:
        out = subprocess.run([str(python_exe), "-c", code], capture_output=True, text=True, check=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as exc:
        raise TritonNotFound(f"cannot run the Python-backend interpreter {python_exe}: {exc}") from exc
    version, libdir = out.stdout.split()[:2]
    return version, libdir


def prepare_backends(dest: Path, python_version: str | None = None) -> Path:
    """Copy the wheel's backends to ``dest`` and add the Python-backend stub for ``python_version``.

    Idempotent and safe to run from two processes at once: a ready copy (same source files) is
    reused; a new one is built in a temporary sibling folder and renamed into place.
    """
    dest = Path(dest)
    python_version = python_version or f"{sys.version_info.major}.{sys.version_info.minor}"
    root = pytriton_dir() / "tritonserver"
    src = root / "backends"
    stub = root / "python_backend_stubs" / python_version / "triton_python_backend_stub"
    if not stub.is_file():
        raise TritonNotFound(f"no Python-backend stub for Python {python_version} in the nvidia-pytriton wheel "
                             f"({stub})")
    stamp = {"source": str(src), "stub": str(stub), "stub_size": stub.stat().st_size,
             "stub_mtime_ns": stub.stat().st_mtime_ns,
             "python_backend_size": (src / "python" / "libtriton_python.so").stat().st_size}
    marker = dest / ".mlpipe-backends.json"
    try:
        if json.loads(marker.read_text()) == stamp:
            return dest
    except (FileNotFoundError, json.JSONDecodeError):
        pass
    tmp = dest.parent / f".{dest.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.parent.mkdir(parents=True, exist_ok=True)
    try:
        shutil.copytree(src, tmp, ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copy2(stub, tmp / "python" / "triton_python_backend_stub")
        (tmp / ".mlpipe-backends.json").write_text(json.dumps(stamp, indent=2, sort_keys=True))
        if dest.exists():  # stale copy from another wheel version: move it aside first
            old = dest.parent / f".{dest.name}.old-{uuid.uuid4().hex[:8]}"
            try:
                os.rename(dest, old)
                shutil.rmtree(old, ignore_errors=True)
            except FileNotFoundError:
                pass
        try:
            os.rename(tmp, dest)
        except OSError:
            if not marker.is_file():  # nobody else won the race
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("prepared Triton backends in %s (Python %s stub)", dest, python_version)
    return dest


def _default_backend_dir() -> Path:
    from tasks.config import load_settings

    return load_settings().home / "triton" / "backends"


# ----------------------------------------------------------------------------------------------
# Python-backend shared memory
# ----------------------------------------------------------------------------------------------

SHM_DIR = Path("/dev/shm")
#: the Python backend's own prefix (``triton_python_backend_shm_region_<uuid>``) when none is configured
DEFAULT_SHM_PREFIX = "triton_python_backend_shm_region_"
_SHM_PREFIX_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-")


def new_shm_prefix() -> str:
    """A prefix for one server's Python-backend shm regions (``mlpipe_<12 hex>_``)."""
    return f"mlpipe_{uuid.uuid4().hex[:12]}_"


def _check_shm_prefix(prefix: str) -> str:
    if (len(prefix) < 8 or not set(prefix) <= _SHM_PREFIX_CHARS or prefix.startswith(DEFAULT_SHM_PREFIX)
            or DEFAULT_SHM_PREFIX.startswith(prefix)):
        raise ValueError(f"shm prefix {prefix!r}: use 8 or more of [A-Za-z0-9_-], not the backend's default")
    return prefix


def shm_regions(prefix: str, shm_dir: Path = SHM_DIR) -> list[Path]:
    """The shared-memory regions named with ``prefix`` (left behind by a killed server's stubs)."""
    _check_shm_prefix(prefix)
    try:
        return sorted(p for p in shm_dir.iterdir() if p.name.startswith(prefix))
    except FileNotFoundError:
        return []


def remove_shm_regions(prefix: str, shm_dir: Path = SHM_DIR) -> list[str]:
    """Remove the regions with ``prefix`` (only those: other servers' regions are left alone)."""
    removed = []
    for path in shm_regions(prefix, shm_dir):
        try:
            path.unlink()
            removed.append(path.name)
        except FileNotFoundError:
            pass
        except OSError as exc:
            logger.warning("cannot remove shared memory %s: %s", path, exc)
    if removed:
        logger.info("removed %d Python-backend shm region(s) with prefix %s", len(removed), prefix)
    return removed


# ----------------------------------------------------------------------------------------------
# The local server
# ----------------------------------------------------------------------------------------------


class LocalTriton:
    """The bundled ``tritonserver`` as a child process on loopback ports.

    ``with LocalTriton(repo, logs) as triton: TritonClient(triton.grpc_url)...``

    Flags: explicit model control (nothing is loaded unless asked, via ``load_models`` or the
    client), ``--strict-readiness=false`` (a failed model load does not turn the server
    unready), ``--exit-on-error=false`` (a broken model does not stop the server),
    127.0.0.1 only. Ports not given are picked free; a start lost to a port race is retried.

    The Python-backend stubs name their shared memory ``<shm_prefix><uuid>`` in /dev/shm
    (``shm-region-prefix-name``; a unique prefix unless given): a killed server's regions are
    removed on ``stop()`` and, with a prefix that outlives one process (the local stack's), on the
    next ``start()``. ``new_session=False`` keeps the server in the caller's process group.
    """

    def __init__(self, model_repository: Path, log_dir: Path, *, http_port: int | None = None,
                 grpc_port: int | None = None, metrics_port: int | None = None,
                 python_exe: str | Path | None = None, backend_dir: Path | None = None,
                 load_models: Sequence[str] = (), extra_args: Sequence[str] = (),
                 exit_timeout_s: int = 10, shm_prefix: str | None = None, new_session: bool = True) -> None:
        self.model_repository = Path(model_repository).resolve()
        self.log_dir = Path(log_dir)
        self._ports_given = (http_port, grpc_port, metrics_port)
        # picked now, so the URLs are known before start(); re-picked if a start loses a port race
        self.http_port = http_port or free_port()
        self.grpc_port = grpc_port or free_port()
        self.metrics_port = metrics_port or free_port()
        # not resolved: a venv's bin/python is a symlink and the venv's bin must lead PATH
        self.python_exe = Path(python_exe) if python_exe else Path(sys.executable)
        self.backend_dir = Path(backend_dir) if backend_dir else None
        self.load_models = list(load_models)
        self.extra_args = list(extra_args)
        self.exit_timeout_s = exit_timeout_s
        self.shm_prefix = _check_shm_prefix(shm_prefix) if shm_prefix else new_shm_prefix()
        self.new_session = new_session
        self.log_path = self.log_dir / "tritonserver.log"
        self.startup_s: float | None = None
        self._proc: ManagedProcess | None = None

    # -- addresses ------------------------------------------------------------------------
    @property
    def http_url(self) -> str:
        return f"{LOOPBACK}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{LOOPBACK}:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{LOOPBACK}:{self.metrics_port}/metrics"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def alive(self) -> bool:
        return self._proc is not None and self._proc.alive()

    def client(self, protocol: str = "grpc", **kwargs: Any) -> "TritonClient":
        return TritonClient(self.grpc_url if protocol == "grpc" else self.http_url, protocol=protocol, **kwargs)

    def info(self) -> dict[str, Any]:
        return {"pid": self.pid, "shm_prefix": self.shm_prefix, "http_url": self.http_url, "grpc_url": self.grpc_url,
                "metrics_url": self.metrics_url, "model_repository": str(self.model_repository),
                "log": str(self.log_path), "startup_s": self.startup_s}

    # -- lifecycle ------------------------------------------------------------------------
    def _argv(self, backend_dir: Path) -> list[str]:
        argv = [
            str(tritonserver_binary()),
            f"--model-repository={self.model_repository}",
            f"--backend-directory={backend_dir}",
            "--model-control-mode=explicit",
            "--strict-readiness=false",
            "--exit-on-error=false",
            "--log-verbose=0",
            f"--exit-timeout-secs={self.exit_timeout_s}",
            f"--http-address={LOOPBACK}", f"--http-port={self.http_port}",
            f"--grpc-address={LOOPBACK}", f"--grpc-port={self.grpc_port}",
            f"--metrics-address={LOOPBACK}", f"--metrics-port={self.metrics_port}",
            "--allow-gpu-metrics=false",
            "--pinned-memory-pool-byte-size=0",
            f"--backend-config=python,shm-region-prefix-name={self.shm_prefix}",
        ]
        argv += [f"--load-model={m}" for m in self.load_models]
        return argv + self.extra_args

    def _env(self, libpython_dir: str) -> dict[str, str]:
        env = dict(os.environ)
        ld = [str(_server_libs_dir()), libpython_dir]
        if env.get("LD_LIBRARY_PATH"):
            ld.append(env["LD_LIBRARY_PATH"])
        env["LD_LIBRARY_PATH"] = ":".join(ld)
        # the stub embeds Python and finds numpy/onnxruntime through the first python3 on PATH
        env["PATH"] = f"{self.python_exe.parent}:{env.get('PATH', '/usr/bin:/bin')}"
        env.pop("PYTHONHOME", None)
        return env

    def start(self, timeout: float = 60.0) -> "LocalTriton":
        """Start the server and wait for ``/v2/health/live``; raises ``TritonError`` with the log tail."""
        if self.alive():
            return self
        if not self.model_repository.is_dir():
            raise TritonError(f"model repository {self.model_repository} does not exist: render it first "
                              "(mlpipe model-repo render --out DIR --model NAME)", what="start")
        python_version, libpython_dir = _python_info(self.python_exe)
        backend_dir = prepare_backends(self.backend_dir or _default_backend_dir(), python_version)
        env = self._env(libpython_dir)
        remove_shm_regions(self.shm_prefix)  # left by a server with this prefix that was killed
        auto_ports = not all(self._ports_given)
        attempts = 3 if auto_ports else 1
        for attempt in range(1, attempts + 1):
            if attempt > 1:
                self.http_port = self._ports_given[0] or free_port()
                self.grpc_port = self._ports_given[1] or free_port()
                self.metrics_port = self._ports_given[2] or free_port()
            log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
            t0 = time.monotonic()
            self._proc = ManagedProcess("tritonserver", self._argv(backend_dir), self.log_path, env=env,
                                        cwd=self.log_dir, new_session=self.new_session).start()
            logger.info("starting tritonserver pid %s (http %s, grpc %s), log %s", self.pid, self.http_url,
                        self.grpc_url, self.log_path)
            try:
                wait_until(lambda: http_ok(f"http://{self.http_url}/v2/health/live"), timeout,
                           f"tritonserver at {self.http_url}", interval=0.05, alive=self._proc.alive)
                self.startup_s = time.monotonic() - t0
                atexit.register(self._stop_at_exit)
                logger.info("tritonserver live after %.2fs", self.startup_s)
                return self
            except (TimeoutError, RuntimeError) as exc:
                new_log = self._read_log_from(log_offset)
                self._stop_process(timeout=5)
                port_race = "address already in use" in new_log.lower() or "failed to start" in new_log.lower()
                if auto_ports and port_race and attempt < attempts:
                    logger.warning("tritonserver lost a port race, retrying with new ports")
                    continue
                tail = "\n".join(new_log.splitlines()[-25:])
                raise TritonError(f"tritonserver did not become live at {self.http_url}: {exc}. "
                                  f"Log {self.log_path}:\n{tail}", url=self.http_url, what="start") from exc
        raise AssertionError("unreachable")

    def _read_log_from(self, offset: int) -> str:
        try:
            with open(self.log_path, "rb") as fh:
                fh.seek(offset)
                return fh.read().decode(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 40) -> str:
        return self._proc.log_tail(lines) if self._proc else ""

    def _stop_process(self, timeout: float) -> int | None:
        if self._proc is None:
            return None
        pid = self._proc.pid
        stubs = _children(pid) if pid is not None and self._proc.alive() else []
        code = self._proc.stop(timeout=timeout)
        # Python-backend stubs are the server's children: in the session we created for it
        # (start_new_session: process group id == server pid), or found by PID in ours.
        if pid is not None and self.new_session:
            try:
                os.killpg(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            else:
                deadline = time.monotonic() + 5
                while time.monotonic() < deadline:  # until the (re-parented) stubs are reaped
                    try:
                        os.killpg(pid, 0)
                    except (ProcessLookupError, PermissionError):
                        break
                    time.sleep(0.05)
        _kill_all(stubs)
        remove_shm_regions(self.shm_prefix)
        return code

    def _stop_at_exit(self) -> None:
        if self.alive():
            logger.warning("stopping tritonserver pid %s left running at interpreter exit", self.pid)
        self._stop_process(timeout=5)

    def stop(self, timeout: float | None = None) -> int | None:
        """SIGTERM (models unload), SIGKILL after ``timeout``; then reap leftover backend stubs."""
        atexit.unregister(self._stop_at_exit)
        code = self._stop_process(timeout if timeout is not None else self.exit_timeout_s + 5)
        if code is not None:
            logger.info("tritonserver stopped (exit code %s)", code)
        return code

    def kill(self) -> None:
        """SIGKILL the server only (fault tests); ``stop()`` later reaps what is left."""
        if self._proc is not None:
            self._proc.kill()

    def __enter__(self) -> "LocalTriton":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()



def _children(pid: int) -> list[Any]:
    import psutil

    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []


def _kill_all(procs: Sequence[Any], timeout: float = 5.0) -> None:
    """SIGKILL the processes (psutil, so a reused PID is left alone) and wait until they are gone."""
    import psutil

    for proc in procs:
        try:
            proc.kill()
        except psutil.Error:
            pass
    if procs:
        psutil.wait_procs(list(procs), timeout=timeout)


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mlpipe triton", description=(
        "Run the local Triton server (the tritonserver binary of the nvidia-pytriton wheel) and talk to it."))
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve", help="run tritonserver in the foreground until Ctrl-C / SIGTERM")
    s.add_argument("--model-repository", type=Path,
                   help="rendered repository (tasks.model.repo; default: $MLPIPE_HOME/triton/model_repository)")
    s.add_argument("--log-dir", type=Path, help="default: $MLPIPE_HOME/logs/triton")
    s.add_argument("--backend-dir", type=Path, help="default: $MLPIPE_HOME/triton/backends")
    s.add_argument("--http-port", type=int)
    s.add_argument("--grpc-port", type=int)
    s.add_argument("--metrics-port", type=int)
    s.add_argument("--load-model", action="append", default=[], metavar="NAME",
                   help="load this model at start-up (repeatable; '*' loads every model)")
    s.add_argument("--state-file", type=Path, help="write pid and URLs here as JSON once live (removed on exit)")
    s.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the server to be live")
    s.add_argument("--shm-prefix", default=None,
                   help="prefix of the Python-backend shm regions in /dev/shm (default: a unique one); regions "
                        "with it left by a killed server are removed at start")
    s.add_argument("--same-group", action="store_true",
                   help="keep tritonserver in this process's group (the local stack stops services as groups)")
    st = sub.add_parser("status", help="health, repository index and model readiness of a running server")
    st.add_argument("--url", required=True, help="host:port (gRPC port with --protocol grpc)")
    st.add_argument("--protocol", choices=("grpc", "http"), default="grpc")
    st.add_argument("--model", help="also report this model's readiness")
    for name in ("load", "unload"):
        c = sub.add_parser(name, help=f"{name} a model (explicit model control)")
        c.add_argument("--url", required=True)
        c.add_argument("--protocol", choices=("grpc", "http"), default="grpc")
        c.add_argument("--model", required=True)
    return p


def _serve(args: argparse.Namespace) -> int:
    from tasks.config import load_settings

    from tasks.model.repo import default_repo_dir

    home = load_settings().home
    triton = LocalTriton(args.model_repository or default_repo_dir(), args.log_dir or home / "logs" / "triton",
                         http_port=args.http_port, grpc_port=args.grpc_port, metrics_port=args.metrics_port,
                         backend_dir=args.backend_dir, load_models=args.load_model, shm_prefix=args.shm_prefix,
                         new_session=not args.same_group)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    triton.start(timeout=args.timeout)
    try:
        info = triton.info()
        print(json.dumps(info, indent=2), flush=True)
        if args.state_file:  # a reader waits for this file: it appears whole
            atomic_write(args.state_file, json.dumps(info, indent=2), 0o644)
        while not stop.wait(1.0):
            if not triton.alive():
                print(f"error: tritonserver exited; log {triton.log_path}:\n{triton.log_tail(20)}", file=sys.stderr)
                return 1
        return 0
    finally:
        triton.stop()
        if args.state_file:
            args.state_file.unlink(missing_ok=True)


def main(argv: Sequence[str] | None = None) -> int:
    from tasks.logs import setup_logging

    setup_logging()
    args = _parser().parse_args(argv)
    try:
        if args.cmd == "serve":
            return _serve(args)
        client = TritonClient(args.url, protocol=args.protocol, timeout=10.0)
        if args.cmd == "status":
            live = client.is_live()
            out: dict[str, Any] = {"url": client.url, "live": live, "ready": client.is_ready() if live else False}
            if live:
                out["models"] = client.repository_index()
                if args.model:
                    out["model_ready"] = {args.model: client.model_ready(args.model)}
            print(json.dumps(out, indent=2))
            if not live:
                print(f"error: Triton at {client.url} is not reachable ({args.protocol})", file=sys.stderr)
            return 0 if live else 1
        if args.cmd == "load":
            client.load_model(args.model)
        else:
            client.unload_model(args.model)
        print(json.dumps({"url": client.url, "model": args.model, "action": args.cmd, "ok": True}))
        return 0
    except TritonError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
