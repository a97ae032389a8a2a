"""The one error contract of every step CLI: three kinds of failure and their exit codes.

* ``BadInput``: the request can never succeed as given (unknown drop or version, bad
  options, a drop that cannot be read). Final: exit ``EXIT_BAD_INPUT`` (2, also
  argparse's usage error).
* ``Rejected``: the step ran and its verdict is "no" (validation failed, the QC gate
  failed, a deploy whose smoke test failed). Final: exit ``EXIT_REJECTED`` (3).
* ``Transient``: a service was down or answered an error (object store, Triton, Kafka):
  worth a retry. Exit ``EXIT_TRANSIENT`` (75, ``EX_TEMPFAIL`` of sysexits.h).

Any other non-zero exit (1: an uncaught Python exception, -9 / 137: killed, OOM) is
transient too: only the codes in ``FINAL_EXIT_CODES`` stop the retries, and 1 never
means "rejected". Both operator paths (``plugins/mlpipe_steps.py``: the local subprocess
and the Kubernetes pod) read that table.

An exception class picks its kind by inheriting one base (``class StoreError(Transient,
RuntimeError)``). When a class inherits more than one (``ObjectNotFound`` is a
``StoreError`` and a ``BadInput``), the final kinds win: BadInput, then Rejected, then
Transient.

A step's CLI runs through ``run_cli``::

    def main(argv=None) -> int:
        return run_cli(_main, argv)

which maps the error to its exit code and logs the reason at error level, whole, on one
line starting ``error: `` (the line the Airflow operator quotes in its exception).
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Callable, Sequence

EXIT_OK = 0
EXIT_BAD_INPUT = 2  # also argparse's exit code for a usage error
EXIT_REJECTED = 3
EXIT_TRANSIENT = 75  # EX_TEMPFAIL
EXIT_UNEXPECTED = 1  # Python's exit code for an uncaught exception: transient

#: exit code -> what it means; these, and only these, are final (never retried).
FINAL_EXIT_CODES: dict[int, str] = {EXIT_BAD_INPUT: "bad input", EXIT_REJECTED: "rejected"}

#: Kubernetes' default ``terminationMessagePath``: in a pod, the ``error:`` line is also written
#: there, so the pod's status (and the Airflow exception that quotes it) carries the reason.
TERMINATION_LOG = "/dev/termination-log"

logger = logging.getLogger("mlpipe.cli")
_BARE = {"bare": True}  # tasks.logs' text format prints this line as it is: "error: <reason>"


class MlpipeError(Exception):
    """Base of the three kinds below; not raised itself (an uncategorised one counts as transient)."""


class BadInput(MlpipeError):
    """The request can never succeed as given: final, exit ``EXIT_BAD_INPUT``."""


class Rejected(MlpipeError):
    """The step ran and rejected its input or model: final, exit ``EXIT_REJECTED``."""


class Transient(MlpipeError):
    """A service was down or failed: retried, exit ``EXIT_TRANSIENT``."""


#: checked in this order: a final kind wins over Transient when a class inherits both.
_KINDS: tuple[tuple[type[MlpipeError], int], ...] = (
    (BadInput, EXIT_BAD_INPUT), (Rejected, EXIT_REJECTED), (Transient, EXIT_TRANSIENT))


def exit_code_for(exc: BaseException, bad_input: tuple[type[BaseException], ...] = ()) -> int:
    """The exit code for ``exc``: its kind's code; ``bad_input`` classes (e.g. ``ValueError`` for a CLI
    whose options are checked by the library) count as BadInput; anything else ``EXIT_UNEXPECTED``."""
    for kind, code in _KINDS:
        if isinstance(exc, kind):
            return code
    if isinstance(exc, MlpipeError):
        return EXIT_TRANSIENT
    if bad_input and isinstance(exc, bad_input):
        return EXIT_BAD_INPUT
    return EXIT_UNEXPECTED


def is_transient(exc: BaseException) -> bool:
    """True for an outage (a ``Transient`` no final kind overrides): a catch-all that turns failures
    into a verdict or a default ("skip the unreadable old drop") must re-raise these, or a short
    outage becomes a wrong answer instead of a retry."""
    return exit_code_for(exc) == EXIT_TRANSIENT and isinstance(exc, Transient)


def is_final(code: int) -> bool:
    """True for the exit codes that must not be retried."""
    return code in FINAL_EXIT_CODES


def one_line(text: str) -> str:
    """``text`` whole, its lines joined with `` | `` (a multi-line reason stays one log line)."""
    parts = [ln.strip() for ln in str(text).splitlines() if ln.strip()]
    return " | ".join(parts)


def describe(exc: BaseException) -> str:
    """The reason of ``exc`` on one line (its type name when it has no message)."""
    text = one_line(str(exc))
    if isinstance(exc, KeyError) and not isinstance(exc, MlpipeError) and len(exc.args) == 1:
        text = one_line(repr(exc.args[0]))
    return text or type(exc).__name__


def run_cli(main_fn: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None, *,
            bad_input: tuple[type[BaseException], ...] = (), log: logging.Logger | None = None) -> int:
    """Run ``main_fn(argv)`` and return its exit code, an error mapped to the contract's code.

    An error of a known kind logs ``error: <reason>`` once at error level (no traceback: the
    reason is the message). Anything else logs its traceback, then ``error: unexpected <Type>:
    <reason>``, and returns ``EXIT_UNEXPECTED`` (1, transient). ``SystemExit`` (argparse) and
    ``KeyboardInterrupt`` pass through.
    """
    log = log or logger
    try:
        code = main_fn(argv)
    except (SystemExit, KeyboardInterrupt):
        raise
    except Exception as exc:  # noqa: BLE001 - this is the one place that maps every failure
        code = exit_code_for(exc, bad_input)
        if code == EXIT_UNEXPECTED:
            log.error("unexpected %s (transient: exit %d, retried)", type(exc).__name__, code, exc_info=exc)
            line = f"error: unexpected {type(exc).__name__}: {describe(exc)}"
        else:
            line = f"error: {describe(exc)}"
        log.error("%s", line, extra=_BARE)
        _termination_message(line)
        _flush()
        return code
    return int(code or 0)


def _termination_message(line: str, path: str | None = None) -> None:
    """Write ``line`` to the pod's termination log when there is one (only inside Kubernetes)."""
    path = path or os.environ.get("MLPIPE_TERMINATION_LOG") or TERMINATION_LOG
    if not os.path.exists(path):
        return
    try:
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(line[:4000])  # Kubernetes keeps at most 4096 bytes
    except OSError:
        pass


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
