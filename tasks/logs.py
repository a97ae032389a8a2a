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
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import sys
from typing import IO, Any

LEVEL_ENV = "MLPIPE_LOG_LEVEL"
FORMAT_ENV = "MLPIPE_LOG_FORMAT"
FORMATS = ("text", "json", "auto")
DEFAULT_FORMAT = "text"
DEFAULT_LEVEL = "INFO"
#: ``extra=`` fields copied into a record's output when present (for tracing, next).
CONTEXT_FIELDS = ("trace_id", "span_id", "run_id", "model_version")
_HANDLER_MARK = "_mlpipe_handler"


def _context(record: logging.LogRecord) -> dict[str, Any]:
    return {k: getattr(record, k) for k in CONTEXT_FIELDS if getattr(record, k, None) is not None}


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line."""

    def format(self, record: logging.LogRecord) -> str:
        obj: dict[str, Any] = {
            "time": dt.datetime.fromtimestamp(record.created, dt.timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        obj.update(_context(record))
        if record.exc_info:
            obj["exc_info"] = self.formatException(record.exc_info)
        if record.stack_info:
            obj["stack_info"] = self.formatStack(record.stack_info)
        return json.dumps(obj, default=str, ensure_ascii=False)


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
        return text


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


def setup_logging(level: str | int | None = None, fmt: str | None = None, *,
                  stream: IO[str] | None = None, default_level: str | int = DEFAULT_LEVEL) -> logging.Handler:
    """Send every record to ``stream`` (default: stderr) in one format, at one level; returns the handler.

    The level is ``level`` (a ``--log-level`` option), else ``MLPIPE_LOG_LEVEL``, else
    ``default_level`` (a quiet command such as ``mlpipe stack`` passes WARNING).

    Idempotent: a second call replaces the handler of the first (and leaves handlers that others
    set, such as pytest's capture, alone)."""
    handler = _StreamHandler(stream)
    handler.setFormatter(JsonFormatter() if resolve_format(fmt, handler.stream) == "json" else TextFormatter())
    setattr(handler, _HANDLER_MARK, True)
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, _HANDLER_MARK, False)]:
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(resolve_level(level, default_level))
    logging.captureWarnings(True)
    return handler
