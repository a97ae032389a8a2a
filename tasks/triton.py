"""Triton: the local server manager and the client helpers (the only module that talks to Triton).

* ``LocalTriton``: runs the ``tritonserver`` binary shipped in the nvidia-pytriton
  wheel (server 2.51, Python backend only) on free loopback ports, explicit model
  control, its log kept in a file. Used by tests, ``make up`` and the demo.
* ``TritonClient``: health, repository control (load / unload / index) and
  ``infer_images`` for the ensemble, over gRPC (default) or HTTP. Every failure
  is a ``TritonError`` naming the server URL, the model and what failed.
* ``serve_classifier_version``: pin a classifier version in the repository
  (``tasks.model_repo.set_serving_version``) and make Triton serve exactly it.

CLI::

    python -m tasks.triton serve --model-repository DIR [--load-model digits]
    python -m tasks.triton status --url 127.0.0.1:8001 [--model digits]
    python -m tasks.triton load|unload --url ... --model digits
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
from typing import Any, Callable, Mapping, Sequence, TypeVar

from tasks.model_repo import MAX_BATCH
from tasks.procs import LOOPBACK, ManagedProcess, free_port, http_ok, wait_until

logger = logging.getLogger(__name__)

T = TypeVar("T")
ENSEMBLE_OUTPUTS = ("LABEL", "SCORE", "TOPK_LABELS", "TOPK_SCORES", "EMBEDDING")
DEFAULT_TIMEOUT_S = 30.0


class TritonError(RuntimeError):
    """A Triton call failed. ``url``, ``model`` and ``what`` say where; ``unreachable`` if the server was down."""

    def __init__(self, message: str, *, url: str = "", model: str = "", what: str = "",
                 unreachable: bool = False) -> None:
        super().__init__(message)
        self.url = url
        self.model = model
        self.what = what
        self.unreachable = unreachable


class TritonNotFound(TritonError):
    """The ``tritonserver`` binary (nvidia-pytriton wheel) or its backends could not be found."""


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
# The local server
# ----------------------------------------------------------------------------------------------


class LocalTriton:
    """The bundled ``tritonserver`` as a child process on loopback ports.

    ``with LocalTriton(repo, logs) as triton: TritonClient(triton.grpc_url)...``

    Flags: explicit model control (nothing is loaded unless asked, via ``load_models`` or the
    client), ``--strict-readiness=false`` (a failed model load does not turn the server
    unready), ``--exit-on-error=false`` (a broken model does not stop the server),
    127.0.0.1 only. Ports not given are picked free; a start lost to a port race is retried.
    """

    def __init__(self, model_repository: Path, log_dir: Path, *, http_port: int | None = None,
                 grpc_port: int | None = None, metrics_port: int | None = None,
                 python_exe: str | Path | None = None, backend_dir: Path | None = None,
                 load_models: Sequence[str] = (), extra_args: Sequence[str] = (),
                 exit_timeout_s: int = 10) -> None:
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
        return {"pid": self.pid, "http_url": self.http_url, "grpc_url": self.grpc_url,
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
                              "(python -m tasks.model_repo render --out DIR)", what="start")
        python_version, libpython_dir = _python_info(self.python_exe)
        backend_dir = prepare_backends(self.backend_dir or _default_backend_dir(), python_version)
        env = self._env(libpython_dir)
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
                                        cwd=self.log_dir).start()
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
        code = self._proc.stop(timeout=timeout)
        # Python-backend stubs are our grandchildren in the session we created for the server
        # (start_new_session: process group id == server pid); reap any the server left behind.
        if pid is not None:
            try:
                os.killpg(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                return code
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:  # until the (re-parented) stubs are reaped
                try:
                    os.killpg(pid, 0)
                except (ProcessLookupError, PermissionError):
                    break
                time.sleep(0.05)
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


# ----------------------------------------------------------------------------------------------
# The client
# ----------------------------------------------------------------------------------------------

class TritonClient:
    """Talks to one Triton server over gRPC (``host:port`` of the gRPC endpoint) or HTTP.

    Health probes (``is_live``, ``is_ready``) answer False when the server is unreachable;
    everything else raises ``TritonError`` naming the URL, the model and what failed.
    """

    def __init__(self, url: str, protocol: str = "grpc", *, timeout: float = DEFAULT_TIMEOUT_S,
                 max_batch_size: int = MAX_BATCH) -> None:
        if protocol not in ("grpc", "http"):
            raise ValueError(f"protocol must be 'grpc' or 'http', got {protocol!r}")
        for prefix in ("http://", "https://", "grpc://"):
            if url.startswith(prefix):
                url = url[len(prefix):]
        self.url = url.rstrip("/")
        self.protocol = protocol
        self.timeout = timeout
        self.max_batch_size = max_batch_size
        self._client: Any = None
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"TritonClient({self.url!r}, protocol={self.protocol!r})"

    # -- plumbing -------------------------------------------------------------------------
    @property
    def raw(self) -> Any:
        """The underlying ``tritonclient`` client (created on first use)."""
        with self._lock:
            if self._client is None:
                if self.protocol == "grpc":
                    import tritonclient.grpc as grpcclient

                    self._client = grpcclient.InferenceServerClient(self.url)
                else:
                    import tritonclient.http as httpclient

                    self._client = httpclient.InferenceServerClient(
                        self.url, connection_timeout=min(self.timeout, 10.0), network_timeout=self.timeout)
            return self._client

    def close(self) -> None:
        with self._lock:
            if self._client is not None:
                try:
                    self._client.close()
                except Exception:  # noqa: BLE001 - closing a broken channel must not raise
                    pass
                self._client = None

    def __enter__(self) -> "TritonClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _timeout_kw(self) -> dict[str, Any]:
        return {"client_timeout": self.timeout} if self.protocol == "grpc" else {}

    def _error(self, what: str, model: str, exc: BaseException) -> TritonError:
        text = str(exc).strip() or type(exc).__name__
        status = ""
        try:
            from tritonclient.utils import InferenceServerException

            if isinstance(exc, InferenceServerException):
                status = str(exc.status() or "")
                text = exc.message() or text
        except ImportError:  # pragma: no cover
            pass
        about = f"{what}{f' of model {model!r}' if model else ''}"
        if status.endswith("DEADLINE_EXCEEDED") or isinstance(exc, TimeoutError):
            msg = f"Triton at {self.url} did not answer within {self.timeout:.0f}s ({about}): {text}"
            return TritonError(msg, url=self.url, model=model, what=what, unreachable=True)
        # gRPC: UNAVAILABLE; HTTP: socket errors (refused, reset, closed) surface as OSError subclasses
        if status.endswith("UNAVAILABLE") or isinstance(exc, (ConnectionError, OSError)):
            msg = f"Triton at {self.url} is not reachable ({about}): {text}"
            return TritonError(msg, url=self.url, model=model, what=what, unreachable=True)
        return TritonError(f"Triton at {self.url}: {about} failed: {text}", url=self.url, model=model, what=what)

    def _call(self, what: str, model: str, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except TritonError:
            raise
        except Exception as exc:  # noqa: BLE001 - every client failure becomes a TritonError
            raise self._error(what, model, exc) from exc

    # -- health ---------------------------------------------------------------------------
    def is_live(self) -> bool:
        try:
            return bool(self.raw.is_server_live(**self._timeout_kw()))
        except Exception:  # noqa: BLE001 - a probe answers False when the server is down
            return False

    def is_ready(self) -> bool:
        try:
            return bool(self.raw.is_server_ready(**self._timeout_kw()))
        except Exception:  # noqa: BLE001
            return False

    def wait_live(self, timeout: float = 60.0) -> None:
        try:
            wait_until(self.is_live, timeout, f"Triton at {self.url}", interval=0.1)
        except TimeoutError as exc:
            raise TritonError(f"Triton at {self.url} is not reachable: not live after {timeout:.0f}s",
                              url=self.url, what="wait live", unreachable=True) from exc

    def model_ready(self, name: str, version: str | int = "") -> bool:
        """Whether ``name`` (``version`` or any version) is loaded and ready. Raises if the server is down."""
        return bool(self._call("readiness check", name,
                               lambda: self.raw.is_model_ready(name, str(version), **self._timeout_kw())))

    def wait_model_ready(self, name: str, version: str | int = "", timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while not self.model_ready(name, version):
            failed = [m for m in self.repository_index() if m["name"] == name and m["state"] == "UNAVAILABLE"
                      and m["reason"] and m["reason"] != "unloaded" and (not version or m["version"] == str(version))]
            if failed:
                raise TritonError(f"Triton at {self.url}: model {name!r} version {version or 'any'} is UNAVAILABLE: "
                                  f"{failed[0]['reason']}", url=self.url, model=name, what="wait ready")
            if time.monotonic() > deadline:
                raise TritonError(f"Triton at {self.url}: model {name!r} version {version or 'any'} not ready "
                                  f"after {timeout:.0f}s", url=self.url, model=name, what="wait ready")
            time.sleep(0.1)

    def server_metadata(self) -> dict[str, Any]:
        return self._call("server metadata", "", lambda: self.raw.get_server_metadata(**self._json_kw()))

    # -- repository -----------------------------------------------------------------------
    def _json_kw(self) -> dict[str, Any]:
        return {"as_json": True, **self._timeout_kw()} if self.protocol == "grpc" else {}

    def repository_index(self) -> list[dict[str, Any]]:
        """Every model folder of the repository: ``[{"name", "version", "state", "reason"}]``.

        A model never loaded has version and state "".
        """
        def fetch() -> list[dict[str, Any]]:
            raw = self.raw.get_model_repository_index(**self._json_kw())
            models = raw.get("models", []) if isinstance(raw, dict) else list(raw or [])
            return [{"name": m.get("name", ""), "version": str(m.get("version", "")),
                     "state": m.get("state", ""), "reason": m.get("reason", "")} for m in models]
        return self._call("repository index", "", fetch)

    def ready_versions(self, name: str) -> list[int]:
        """The versions of ``name`` Triton reports READY in its repository index, sorted."""
        return sorted(int(m["version"]) for m in self.repository_index()
                      if m["name"] == name and m["state"] == "READY" and str(m["version"]).isdigit())

    def load_model(self, name: str) -> None:
        """(Re)load ``name`` from the repository files. Never sends a config override: Triton would keep
        an override until a file's mtime changes, hiding later config.pbtxt edits."""
        def load() -> None:
            if self.protocol == "grpc":
                self.raw.load_model(name, client_timeout=max(self.timeout, 120.0))
            else:
                self.raw.load_model(name)
        self._call("load", name, load)

    def unload_model(self, name: str, unload_dependents: bool = False) -> None:
        self._call("unload", name, lambda: self.raw.unload_model(
            name, unload_dependents=unload_dependents, **self._timeout_kw()))

    def model_config(self, name: str, version: str | int = "") -> dict[str, Any]:
        def fetch() -> dict[str, Any]:
            cfg = self.raw.get_model_config(name, str(version), **self._json_kw())
            return cfg.get("config", cfg) if isinstance(cfg, dict) else cfg
        return self._call("config", name, fetch)

    # -- inference ------------------------------------------------------------------------
    def infer(self, model_name: str, inputs: Mapping[str, Any], outputs: Sequence[str],
              version: str | int = "") -> dict[str, Any]:
        """One request: ``inputs`` name -> numpy array (dtype gives the Triton type); returns name -> array."""
        import numpy as np
        from tritonclient.utils import np_to_triton_dtype

        mod = self._module()

        def run() -> dict[str, Any]:
            req_inputs = []
            for name, array in inputs.items():
                arr = np.ascontiguousarray(array)
                inp = mod.InferInput(name, list(arr.shape), np_to_triton_dtype(arr.dtype))
                inp.set_data_from_numpy(arr)
                req_inputs.append(inp)
            req_outputs = [mod.InferRequestedOutput(o) for o in outputs]
            kw = {"client_timeout": self.timeout} if self.protocol == "grpc" else {}
            result = self.raw.infer(model_name, req_inputs, model_version=str(version), outputs=req_outputs, **kw)
            return {o: result.as_numpy(o) for o in outputs}
        return self._call("inference", model_name, run)

    def _module(self) -> Any:
        if self.protocol == "grpc":
            import tritonclient.grpc as mod
        else:
            import tritonclient.http as mod
        return mod

    def infer_images(self, model_name: str, images: Any, version: str | int = "",
                     outputs: Sequence[str] = ENSEMBLE_OUTPUTS) -> dict[str, Any]:
        """Run the ensemble on uint8 images ``[N, 28, 28]`` (a single ``[28, 28]`` image is allowed).

        Batches larger than ``max_batch_size`` are split into several requests. Returns
        ``LABEL`` int64 ``[N, 1]``, ``SCORE`` float32 ``[N, 1]``, ``TOPK_LABELS`` int64 ``[N, 3]``,
        ``TOPK_SCORES`` float32 ``[N, 3]``, ``EMBEDDING`` float32 ``[N, 64]``. The server checks shapes;
        a wrong one comes back as a ``TritonError`` quoting Triton's message.
        """
        import numpy as np

        arr = np.asarray(images)
        if arr.dtype != np.uint8:
            if np.issubdtype(arr.dtype, np.integer) and arr.size and (arr.min() < 0 or arr.max() > 255):
                raise TritonError(f"Triton at {self.url}: images for model {model_name!r} must be uint8 pixels "
                                  f"0..255, got {arr.dtype} values {arr.min()}..{arr.max()}",
                                  url=self.url, model=model_name, what="input check")
            if not np.issubdtype(arr.dtype, np.integer):
                raise TritonError(f"Triton at {self.url}: images for model {model_name!r} must be uint8, "
                                  f"got {arr.dtype} (scale float images to 0..255 and cast first)",
                                  url=self.url, model=model_name, what="input check")
            arr = arr.astype(np.uint8)
        if arr.ndim == 2:
            arr = arr[None]
        if arr.shape[0] == 0:
            raise TritonError(f"Triton at {self.url}: no images given for model {model_name!r}",
                              url=self.url, model=model_name, what="input check")
        parts = [self.infer(model_name, {"IMAGE": arr[i:i + self.max_batch_size]}, outputs, version)
                 for i in range(0, arr.shape[0], self.max_batch_size)]
        if len(parts) == 1:
            return parts[0]
        return {o: np.concatenate([p[o] for p in parts], axis=0) for o in outputs}


# ----------------------------------------------------------------------------------------------
# Deploy helper
# ----------------------------------------------------------------------------------------------


def serve_classifier_version(client: TritonClient, repo_dir: Path, model_name: str, version: int,
                             timeout: float = 120.0) -> dict[str, Any]:
    """Make Triton serve exactly classifier ``version`` of ``model_name`` (the version folder must exist).

    Pins the version in ``<model>_classifier/config.pbtxt`` (atomic rewrite, new mtime), reloads the
    classifier (Triton loads the new version before it retires the old one, and reloads the ensemble
    that depends on it), loads the ensemble if it was not loaded, and checks that exactly
    ``version`` is READY. Returns ``{"model", "classifier", "version", "ready_versions"}``.
    """
    from tasks.model_repo import classifier_name, serving_version, set_serving_version

    clf = classifier_name(model_name)
    previous = serving_version(repo_dir, model_name)
    set_serving_version(repo_dir, model_name, version)
    try:
        client.load_model(clf)
        if not client.model_ready(model_name):
            client.load_model(model_name)
        client.wait_model_ready(clf, version, timeout=timeout)
        client.wait_model_ready(model_name, timeout=timeout)
        ready = client.ready_versions(clf)
        if ready != [version]:
            raise TritonError(f"Triton at {client.url}: after loading, {clf} serves versions {ready}, expected "
                              f"[{version}]", url=client.url, model=clf, what="serve version")
    except TritonError as exc:
        # Triton keeps serving the old version when the new one fails to load: make the files say so too
        if previous is not None and previous != version:
            try:
                set_serving_version(repo_dir, model_name, previous)
                note = f"; config.pbtxt pins version {previous} again (Triton keeps serving it if it was loaded)"
            except Exception as restore_exc:  # noqa: BLE001 - report both failures
                note = f"; restoring the pin on version {previous} failed too: {restore_exc}"
        else:
            note = ""
        raise TritonError(f"{exc}{note}", url=client.url, model=clf, what="serve version",
                          unreachable=exc.unreachable) from exc
    logger.info("Triton at %s serves %s version %d", client.url, clf, version)
    return {"model": model_name, "classifier": clf, "version": version, "ready_versions": ready}


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tasks.triton", description=(
        "Run the local Triton server (the tritonserver binary of the nvidia-pytriton wheel) and talk to it."))
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve", help="run tritonserver in the foreground until Ctrl-C / SIGTERM")
    s.add_argument("--model-repository", type=Path,
                   help="rendered repository (tasks.model_repo; default: $MLPIPE_HOME/triton/model_repository)")
    s.add_argument("--log-dir", type=Path, help="default: $MLPIPE_HOME/logs/triton")
    s.add_argument("--backend-dir", type=Path, help="default: $MLPIPE_HOME/triton/backends")
    s.add_argument("--http-port", type=int)
    s.add_argument("--grpc-port", type=int)
    s.add_argument("--metrics-port", type=int)
    s.add_argument("--load-model", action="append", default=[], metavar="NAME",
                   help="load this model at start-up (repeatable; '*' loads every model)")
    s.add_argument("--state-file", type=Path, help="write pid and URLs here as JSON once live (removed on exit)")
    s.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the server to be live")
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

    from tasks.model_repo import default_repo_dir

    home = load_settings().home
    triton = LocalTriton(args.model_repository or default_repo_dir(), args.log_dir or home / "logs" / "triton",
                         http_port=args.http_port, grpc_port=args.grpc_port, metrics_port=args.metrics_port,
                         backend_dir=args.backend_dir, load_models=args.load_model)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    triton.start(timeout=args.timeout)
    try:
        info = triton.info()
        print(json.dumps(info, indent=2), flush=True)
        if args.state_file:
            args.state_file.parent.mkdir(parents=True, exist_ok=True)
            args.state_file.write_text(json.dumps(info, indent=2))
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
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
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
