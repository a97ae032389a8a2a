"""One logging set-up for every ``mlpipe`` command: ``setup_logging()``.

Two formats, chosen by ``MLPIPE_LOG_FORMAT``:

* ``text`` (the default): ``LEVEL logger: message`` plus ``[run_id=... model_version=...]``
  when a record carries context. No timestamp: wherever these lines are kept, the
  collector stamps each one already (the Airflow task log, ``kubectl logs
  --timestamps``, journald), so a second time would only double it.
* ``json``: one JSON object per line: ``time`` (UTC, ISO 8601, milliseconds), ``level``,
  ``logger``, ``message``, the context fields ``trace_id``, ``span_id``, ``run_id`` and
  ``model_version`` when given in ``extra=``, and ``exc_info`` (the traceback, in the same
  line). For a log collector: the pods get it from the ``mlpipe-config`` ConfigMap, and the
  local Airflow operator asks its step subprocess for it and re-logs each record at its own
  level, without the time (Airflow adds its own).
* ``auto``: ``text`` when stderr is a terminal, else ``json``.

The level is ``MLPIPE_LOG_LEVEL`` (default INFO); a command's ``--log-level`` option,
passed as ``level``, wins. Records go to stderr; stdout stays for results.

Context, filled in automatically when a record does not carry it in ``extra=``:

* ``trace_id`` / ``span_id``: the current OpenTelemetry span (``tasks.tracing``), else the
  ``TRACEPARENT`` variable a parent process passed (the Airflow step operator passes its step span);
* ``run_id``: ``bind(run_id=...)`` / ``context(run_id=...)``, else Airflow's ``AIRFLOW_CTX_DAG_RUN_ID``;
* ``model_version``: ``bind(model_version=...)`` / ``context(...)`` (the consumer binds the served version).

The log folder (one per stack): every process that calls ``setup_logging()`` without a ``stream``
also appends JSON lines to ``<log dir>/<service>.log``, whatever the terminal format. The folder is
``MLPIPE_LOG_DIR``, else ``$MLPIPE_HOME/logs``, else ``./var/logs``; ``MLPIPE_LOG_DIR=off`` writes no
file. ``<service>`` is the ``mlpipe`` command (``set_service``, else the script's name). Size-based
rotation: past ``MLPIPE_LOG_FILE_MAX_BYTES`` (10 MiB) the file becomes ``<service>.log.1`` (older
ones shift up to ``.<MLPIPE_LOG_FILE_BACKUPS>``, default 5, the oldest is deleted). Several processes
of one service share the file: appends are single ``write()`` calls on an ``O_APPEND`` descriptor,
each one under an exclusive ``flock`` on ``<file>.lock`` (rotation too), and a writer whose file
was rotated away re-opens the new one.

**File format (read by ``mlpipe audit`` and ``mlpipe trace``; keep it stable)**: one JSON object per
line: ``time`` (UTC ISO 8601, ms, ``+00:00``), ``level``, ``logger``, ``message``, ``service``,
``pid``, and when known ``trace_id`` (32 hex), ``span_id`` (16 hex), ``run_id``, ``model_version``,
``exc_info``. No secret ever: the gateway's token and the settings' secret values never reach a log
call, and ``register_secret()`` values are replaced by ``***`` in every line as a last guard.
"""

from __future__ import annotations

import contextlib
import contextvars
import datetime as dt
import json
import logging
import os
import sys
import threading
from pathlib import Path
from typing import IO, Any, Iterator

LEVEL_ENV = "MLPIPE_LOG_LEVEL"
FORMAT_ENV = "MLPIPE_LOG_FORMAT"
FORMATS = ("text", "json", "auto")
DEFAULT_FORMAT = "text"
DEFAULT_LEVEL = "INFO"
#: ``extra=`` fields copied into a record's output when present (for tracing, next).
CONTEXT_FIELDS = ("trace_id", "span_id", "run_id", "model_version")
_HANDLER_MARK = "_mlpipe_handler"
DIR_ENV = "MLPIPE_LOG_DIR"
MAX_BYTES_ENV = "MLPIPE_LOG_FILE_MAX_BYTES"
BACKUPS_ENV = "MLPIPE_LOG_FILE_BACKUPS"
DEFAULT_MAX_BYTES = 10 * 1024 * 1024
DEFAULT_BACKUPS = 5
_OFF = ("off", "none", "0", "false", "no")

_bound: dict[str, Any] = {}  # process-wide context (bind)
_scoped: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar("mlpipe_log_context", default=None)
_service: list[str] = []
_secrets: set[str] = set()


def set_service(name: str) -> None:
    """The service name of this process (the ``mlpipe`` command; ``tasks.cli`` sets it)."""
    _service[:] = [name]


def service_name() -> str:
    """``set_service``'s name, else ``OTEL_SERVICE_NAME``, else the script's (``python -m pkg`` -> pkg)."""
    if _service:
        return _service[0]
    if os.environ.get("OTEL_SERVICE_NAME"):
        return os.environ["OTEL_SERVICE_NAME"]
    argv0 = Path(sys.argv[0] if sys.argv and sys.argv[0] else "python")
    name = argv0.parent.name if argv0.stem == "__main__" else argv0.stem
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name) or "python"


def bind(**fields: Any) -> None:
    """Process-wide context for every later record (``None`` removes a field), e.g. the served model version."""
    for key, value in fields.items():
        if key not in CONTEXT_FIELDS:
            raise ValueError(f"{key!r} is not one of the log context fields {CONTEXT_FIELDS}")
        if value is None:
            _bound.pop(key, None)
        else:
            _bound[key] = value


@contextlib.contextmanager
def context(**fields: Any) -> Iterator[None]:
    """Context for the records logged inside the block (this thread / task only)."""
    token = _scoped.set({**(_scoped.get() or {}), **{k: v for k, v in fields.items() if v is not None}})
    try:
        yield
    finally:
        _scoped.reset(token)


def register_secret(value: str | None) -> None:
    """A secret value that must never appear in a log line: replaced by ``***`` (values under 4 characters are
    ignored, they would mangle ordinary text)."""
    if value and len(value) >= 4:
        _secrets.add(value)


def redact(text: str) -> str:
    for secret in _secrets:
        if secret in text:
            text = text.replace(secret, "***")
    return text


def _env_traceparent() -> tuple[str, str] | None:
    value = os.environ.get("TRACEPARENT", "")
    parts = value.strip().lower().split("-")
    if len(parts) == 4 and len(parts[1]) == 32 and len(parts[2]) == 16 and parts[1] != "0" * 32:
        return parts[1], parts[2]
    return None


def _span_ids() -> tuple[str, str] | None:
    """(trace_id, span_id) of the current span, when OpenTelemetry is loaded and a span is recording."""
    trace = sys.modules.get("opentelemetry.trace")
    if trace is not None:
        ctx = trace.get_current_span().get_span_context()
        if ctx.is_valid:
            return f"{ctx.trace_id:032x}", f"{ctx.span_id:016x}"
    return _env_traceparent()


def current_context() -> dict[str, Any]:
    """The context fields a record logged now would get (besides its own ``extra=``)."""
    out: dict[str, Any] = {}
    ids = _span_ids()
    if ids is not None:
        out["trace_id"], out["span_id"] = ids
    out.update(_bound)
    out.update(_scoped.get() or {})
    if "run_id" not in out and os.environ.get("AIRFLOW_CTX_DAG_RUN_ID"):
        out["run_id"] = os.environ["AIRFLOW_CTX_DAG_RUN_ID"]
    return out


def _context(record: logging.LogRecord) -> dict[str, Any]:
    given = {k: getattr(record, k) for k in CONTEXT_FIELDS if getattr(record, k, None) is not None}
    if len(given) == len(CONTEXT_FIELDS):
        return given
    auto = current_context()
    if "trace_id" in given:  # ids come as a pair: never one from the record and one from the span
        auto.pop("trace_id", None)
        auto.pop("span_id", None)
    return {k: given[k] if k in given else auto[k] for k in CONTEXT_FIELDS if k in given or k in auto}


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line. ``file=True``: the log folder's format (with ``service``, ``pid``)."""

    def __init__(self, file: bool = False, service: str | None = None) -> None:
        super().__init__()
        self.file = file
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        obj: dict[str, Any] = {
            "time": dt.datetime.fromtimestamp(record.created, dt.timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if self.file:
            obj["service"] = self.service or service_name()
            obj["pid"] = record.process
        obj.update(_context(record))
        if record.exc_info:
            obj["exc_info"] = self.formatException(record.exc_info)
        if record.stack_info:
            obj["stack_info"] = self.formatStack(record.stack_info)
        return redact(json.dumps(obj, default=str, ensure_ascii=False))


class TextFormatter(logging.Formatter):
    """``LEVEL logger: message [key=value ...]``, no timestamp (the collector adds one).

    A record logged with ``extra={"bare": True}`` is its message alone: a CLI's closing
    ``error: <reason>`` line (``tasks.contracts.errors.run_cli``) reads as a CLI's error does."""

    def __init__(self) -> None:
        super().__init__("%(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        if getattr(record, "bare", False):
            record.message = record.getMessage()
            text = record.message
            if record.exc_info:
                text += "\n" + self.formatException(record.exc_info)
        else:
            text = super().format(record)
        ctx = _context(record)
        if ctx:
            first, sep, rest = text.partition("\n")  # after the message, before a traceback
            text = first + " [" + " ".join(f"{k}={v}" for k, v in ctx.items()) + "]" + sep + rest
        return redact(text)


def resolve_format(fmt: str | None = None, stream: IO[str] | None = None) -> str:
    """``fmt`` or ``MLPIPE_LOG_FORMAT`` (default text); ``auto`` -> text on a terminal, else json."""
    value = (fmt or os.environ.get(FORMAT_ENV) or DEFAULT_FORMAT).strip().lower()
    if value not in FORMATS:
        raise ValueError(f"{FORMAT_ENV} must be one of {', '.join(FORMATS)}, got {value!r}")
    if value == "auto":
        stream = stream or sys.stderr
        try:
            value = "text" if stream.isatty() else "json"
        except (AttributeError, ValueError):
            value = "json"
    return value


def resolve_level(level: str | int | None = None, default: str | int = DEFAULT_LEVEL) -> int:
    """``level``, else ``MLPIPE_LOG_LEVEL``, else ``default`` (INFO), as a logging level number."""
    value: str | int = level if level not in (None, "") else (os.environ.get(LEVEL_ENV) or default)
    if isinstance(value, int):
        return value
    name = str(value).strip().upper()
    if name.isdigit():
        return int(name)
    number = logging.getLevelName(name)
    if not isinstance(number, int):
        raise ValueError(f"{LEVEL_ENV} / --log-level must be a logging level (DEBUG, INFO, WARNING, "
                         f"ERROR), got {value!r}")
    return number


class _StreamHandler(logging.StreamHandler):
    """A handler on ``stream``, or on whatever ``sys.stderr`` is at each record (pytest swaps it)."""

    def __init__(self, stream: IO[str] | None = None) -> None:
        self._fixed = stream
        super().__init__(stream or sys.stderr)

    @property  # type: ignore[override]
    def stream(self) -> IO[str]:
        return self._fixed or sys.stderr

    @stream.setter
    def stream(self, value: IO[str]) -> None:  # StreamHandler.__init__ / setStream assign it
        self._fixed = value if value is not sys.stderr else None


def log_dir() -> Path | None:
    """The log folder (see the module doc); None when ``MLPIPE_LOG_DIR=off``."""
    value = os.environ.get(DIR_ENV, "").strip()
    if value.lower() in _OFF and value:
        return None
    if value:
        return Path(value).expanduser()
    home = os.environ.get("MLPIPE_HOME", "").strip()
    return Path(home).expanduser() / "logs" if home else Path(__file__).resolve().parent.parent / "var" / "logs"


def _int_env(name: str, default: int) -> int:
    value = os.environ.get(name, "").strip()
    try:
        return max(0, int(value)) if value else default
    except ValueError:
        raise ValueError(f"{name} must be a whole number, got {value!r}") from None


def rotation() -> tuple[int, int]:
    """(max bytes per file, backups kept) from ``MLPIPE_LOG_FILE_MAX_BYTES`` / ``MLPIPE_LOG_FILE_BACKUPS``."""
    return _int_env(MAX_BYTES_ENV, DEFAULT_MAX_BYTES), _int_env(BACKUPS_ENV, DEFAULT_BACKUPS)


def rotate(path: Path, backups: int) -> None:
    """``path`` -> ``path.1`` (``.1`` -> ``.2`` ..., the one past ``backups`` deleted). Caller holds the lock."""
    if backups <= 0:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        return
    with contextlib.suppress(FileNotFoundError):
        Path(f"{path}.{backups}").unlink()
    for i in range(backups - 1, 0, -1):
        with contextlib.suppress(FileNotFoundError):
            os.replace(f"{path}.{i}", f"{path}.{i + 1}")
    with contextlib.suppress(FileNotFoundError):
        os.replace(path, f"{path}.1")


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive ``flock`` on ``<path>.lock`` (the processes sharing ``path`` rotate it one at a time)."""
    import fcntl

    fd = os.open(f"{path}.lock", os.O_CREAT | os.O_WRONLY, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def append_rotating(path: Path, data: bytes, max_bytes: int, backups: int) -> None:
    """Append ``data`` to ``path`` (one write), rotating first when it would pass ``max_bytes``; for writers that
    append seldom and in blocks (the span store): open, lock, append, close."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(path):
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            size = 0
        if max_bytes and size and size + len(data) > max_bytes:
            rotate(path, backups)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)


class SharedRotatingFileHandler(logging.Handler):
    """JSON lines appended to ``path`` by any number of processes, rotated by size (see the module doc).

    Each record is one ``write()`` under an exclusive ``flock`` on ``<path>.lock`` (held for microseconds):
    a writer never appends to a file another one just rotated away, so no file passes ``max_bytes``."""

    def __init__(self, path: Path, max_bytes: int = DEFAULT_MAX_BYTES, backups: int = DEFAULT_BACKUPS) -> None:
        super().__init__()
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.backups = backups
        self._fd: int | None = None
        self._ino: int | None = None
        self._io_lock = threading.Lock()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock_fd: int | None = os.open(f"{self.path}.lock", os.O_CREAT | os.O_WRONLY, 0o644)

    def _open(self) -> int:
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        if self._fd is not None:
            os.close(self._fd)
        self._fd, self._ino = fd, os.fstat(fd).st_ino
        return fd

    def emit(self, record: logging.LogRecord) -> None:
        import fcntl

        try:
            data = (self.format(record) + "\n").encode("utf-8", "replace")
            with self._io_lock:
                if self._lock_fd is None:  # closed by a logging.config.dictConfig (uvicorn's): still ours
                    self._lock_fd = os.open(f"{self.path}.lock", os.O_CREAT | os.O_WRONLY, 0o644)
                fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
                try:
                    try:
                        st = os.stat(self.path)
                    except FileNotFoundError:
                        st = None
                    fd = self._fd
                    if fd is None or st is None or st.st_ino != self._ino:  # rotated by another process
                        fd = self._open()
                        st = os.fstat(fd)
                    if self.max_bytes and st.st_size and st.st_size + len(data) > self.max_bytes:
                        rotate(self.path, self.backups)
                        fd = self._open()
                    os.write(fd, data)
                finally:
                    fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
        except Exception:  # noqa: BLE001 - logging must never break the caller
            self.handleError(record)

    def close(self) -> None:
        """Closes the descriptors; a record that still arrives re-opens them (``logging.config.dictConfig``, as
        uvicorn runs it, closes every handler of the process but leaves them on the root logger)."""
        with self._io_lock:
            for fd in (self._fd, self._lock_fd):
                if fd is not None:
                    with contextlib.suppress(OSError):
                        os.close(fd)
            self._fd = None
            self._lock_fd = None
        super().close()


def file_handler() -> logging.Handler | None:
    """The log folder's handler for this process (``<dir>/<service>.log``), or None (``MLPIPE_LOG_DIR=off``, or
    the folder cannot be created: a warning on stderr, logging to the stream goes on)."""
    folder = log_dir()
    if folder is None:
        return None
    max_bytes, backups = rotation()
    service = service_name()
    try:
        handler = SharedRotatingFileHandler(folder / f"{service}.log", max_bytes, backups)
    except OSError as exc:
        print(f"warning: no log file in {folder} ({exc}); set {DIR_ENV} to a writable folder or 'off'",
              file=sys.stderr)
        return None
    handler.setFormatter(JsonFormatter(file=True, service=service))
    return handler


def setup_logging(level: str | int | None = None, fmt: str | None = None, *,
                  stream: IO[str] | None = None, default_level: str | int = DEFAULT_LEVEL) -> logging.Handler:
    """Send every record to ``stream`` (default: stderr) in one format, at one level; returns the handler.

    The level is ``level`` (a ``--log-level`` option), else ``MLPIPE_LOG_LEVEL``, else
    ``default_level`` (a quiet command such as ``mlpipe stack`` passes WARNING).

    Without a ``stream`` (a process's own set-up) the records also go to the log folder
    (``file_handler``, JSON lines, rotated).

    Idempotent: a second call replaces the handlers of the first (and leaves handlers that others
    set, such as pytest's capture, alone)."""
    handler = _StreamHandler(stream)
    handler.setFormatter(JsonFormatter() if resolve_format(fmt, handler.stream) == "json" else TextFormatter())
    setattr(handler, _HANDLER_MARK, True)
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, _HANDLER_MARK, False)]:
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    if stream is None:
        to_file = file_handler()
        if to_file is not None:
            setattr(to_file, _HANDLER_MARK, True)
            root.addHandler(to_file)
    root.setLevel(resolve_level(level, default_level))
    logging.captureWarnings(True)
    return handler
