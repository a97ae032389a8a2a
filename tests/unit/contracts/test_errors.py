"""tasks/contracts/errors.py: every kind maps to its exit code, the final codes are exactly bad input
and rejected, an unexpected exception is 1 (transient, never final), and the failure is logged as
one ``error:`` line."""

from __future__ import annotations

import logging
import subprocess
import sys

import pytest

from tasks.contracts import errors
from tasks.contracts.errors import (EXIT_BAD_INPUT, EXIT_REJECTED, EXIT_TRANSIENT, EXIT_UNEXPECTED,
                                    FINAL_EXIT_CODES, BadInput, MlpipeError, Rejected, Transient, exit_code_for,
                                    is_final, run_cli)


def raising(exc: BaseException):
    def main(argv):
        raise exc
    return main


def test_the_codes_and_the_final_table():
    assert (EXIT_BAD_INPUT, EXIT_REJECTED, EXIT_TRANSIENT, EXIT_UNEXPECTED) == (2, 3, 75, 1)
    assert FINAL_EXIT_CODES == {EXIT_BAD_INPUT: "bad input", EXIT_REJECTED: "rejected"}
    for code in (0, 1, -9, 137, EXIT_TRANSIENT, 4, 255):
        assert not is_final(code), code  # 1 (a crash) or a kill never means "rejected"
    assert is_final(EXIT_BAD_INPUT) and is_final(EXIT_REJECTED)


@pytest.mark.parametrize(("kind", "code"), [(BadInput, EXIT_BAD_INPUT), (Rejected, EXIT_REJECTED),
                                            (Transient, EXIT_TRANSIENT)])
def test_each_kind_maps_to_its_code(kind, code):
    class Sub(kind, RuntimeError):
        pass

    assert exit_code_for(kind("x")) == code
    assert exit_code_for(Sub("x")) == code
    assert run_cli(raising(Sub("why"))) == code


def test_a_final_kind_wins_over_transient_whatever_the_base_order():
    class NotFound(Transient, BadInput):  # e.g. ObjectNotFound: a StoreError (transient) and a BadInput
        pass

    class Refused(Transient, Rejected):
        pass

    assert exit_code_for(NotFound()) == EXIT_BAD_INPUT
    assert exit_code_for(Refused()) == EXIT_REJECTED


def test_is_transient_names_the_outages_only():
    from tasks.adapters.storage import ObjectNotFound, StoreError
    from tasks.adapters.triton import TritonError

    assert errors.is_transient(StoreError("connection refused")) and errors.is_transient(TritonError("down"))
    assert not errors.is_transient(ObjectNotFound("k"))  # a StoreError, but bad input: final
    assert not errors.is_transient(RuntimeError("bug")) and not errors.is_transient(Rejected("no"))
    assert isinstance(ObjectNotFound("k"), KeyError) and isinstance(ObjectNotFound("k"), StoreError)
    assert exit_code_for(ObjectNotFound("k")) == EXIT_BAD_INPUT and exit_code_for(StoreError("x")) == EXIT_TRANSIENT


def test_an_uncategorised_mlpipe_error_is_transient():
    assert exit_code_for(MlpipeError("?")) == EXIT_TRANSIENT


@pytest.mark.parametrize("exc", [RuntimeError("boom"), KeyError("k"), ZeroDivisionError(), OSError(5, "io")])
def test_an_unexpected_exception_exits_1_and_is_not_final(exc, caplog):
    caplog.set_level(logging.DEBUG)
    code = run_cli(raising(exc))
    assert code == EXIT_UNEXPECTED == 1 and not is_final(code)
    tracebacks = [r for r in caplog.records if r.exc_info]
    assert len(tracebacks) == 1 and tracebacks[0].exc_info[1] is exc  # the traceback is logged
    last = caplog.records[-1]  # ... and the reason is the last line
    assert last.levelno == logging.ERROR and last.getMessage().startswith(f"error: unexpected {type(exc).__name__}")


def test_bad_input_classes_of_a_cli():
    assert run_cli(raising(ValueError("--window must be positive")), bad_input=(ValueError,)) == EXIT_BAD_INPUT
    assert run_cli(raising(ValueError("x"))) == EXIT_UNEXPECTED
    # a contract kind is not overridden by bad_input
    class Outage(Transient, ValueError):
        pass

    assert run_cli(raising(Outage("down")), bad_input=(ValueError,)) == EXIT_TRANSIENT


def test_the_reason_is_logged_whole_on_one_error_line(caplog):
    caplog.set_level(logging.DEBUG)
    reason = "invalid config.pbtxt:\n  - max_batch_size: 0\n  - input 'x' has no dims\n"
    assert run_cli(raising(Rejected(reason))) == EXIT_REJECTED
    lines = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(lines) == 1 and not lines[0].exc_info  # a known kind: no traceback
    msg = lines[0].getMessage()
    assert msg == "error: invalid config.pbtxt: | - max_batch_size: 0 | - input 'x' has no dims"
    assert "\n" not in msg


def test_in_a_pod_the_error_line_is_the_termination_message(tmp_path, monkeypatch):
    log = tmp_path / "termination-log"
    monkeypatch.setenv("MLPIPE_TERMINATION_LOG", str(log))
    assert run_cli(raising(Rejected("QC gate failed"))) == EXIT_REJECTED
    assert not log.exists()  # only where Kubernetes made the file
    log.write_text("")
    assert run_cli(raising(Rejected("QC gate failed: accuracy 0.5"))) == EXIT_REJECTED
    assert log.read_text() == "error: QC gate failed: accuracy 0.5"


def test_success_passes_the_code_through():
    assert run_cli(lambda argv: None) == 0
    assert run_cli(lambda argv: 0) == 0
    assert run_cli(lambda argv: 5) == 5  # a code the step returns itself is kept
    seen = []
    run_cli(lambda argv: seen.append(argv), ["--a", "1"])
    assert seen == [["--a", "1"]]


def test_argparse_usage_errors_pass_through_as_exit_2():
    import argparse

    def main(argv):
        argparse.ArgumentParser(prog="t").parse_args(argv)

    with pytest.raises(SystemExit) as exc:
        run_cli(main, ["--nope"])
    assert exc.value.code == EXIT_BAD_INPUT


def test_a_step_cli_in_a_subprocess_exits_with_the_contract_code_and_one_error_line(tmp_path):
    """The real CLI (drops show of an unknown drop): bad input, one ``error:`` line, no traceback."""
    env = {"PATH": "/usr/bin:/bin", "MLPIPE_HOME": str(tmp_path), "MLPIPE_STORE_URL": f"file://{tmp_path}/store",
           "MLPIPE_LOG_FORMAT": "text"}
    proc = subprocess.run([sys.executable, "-m", "tasks.cli", "drops", "show", "no-such-drop"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == EXIT_BAD_INPUT, proc.stderr
    errors_ = [ln for ln in proc.stderr.splitlines() if "error: " in ln]
    assert len(errors_) == 1 and "no-such-drop" in errors_[0], proc.stderr
    assert "Traceback" not in proc.stderr


def test_the_module_has_no_imports_beyond_the_stdlib():
    import ast
    from pathlib import Path

    tree = ast.parse(Path(errors.__file__).read_text())
    mods = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    mods |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert mods <= {"__future__", "logging", "os", "sys", "typing"}, mods
