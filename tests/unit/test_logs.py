"""tasks/logs.py: one set-up, JSON lines or text, one level variable, no timestamp in text."""

from __future__ import annotations

import io
import json
import logging
import re
import subprocess
import sys

import pytest

from tasks import logs
from tasks.logs import CONTEXT_FIELDS, resolve_format, resolve_level, setup_logging


@pytest.fixture(autouse=True)
def restore_root():
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for h in [h for h in root.handlers if h not in handlers]:
        root.removeHandler(h)
    root.setLevel(level)


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_json_lines_one_object_per_record_with_context(monkeypatch):
    out = io.StringIO()
    setup_logging("DEBUG", "json", stream=out)
    log = logging.getLogger("mlpipe.t")
    log.info("trained %s", "r1", extra={"run_id": "r1", "model_version": 7, "trace_id": "ab" * 16})
    log.debug("quote \" and\nnewline")
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        log.exception("failed")
    lines = out.getvalue().splitlines()
    assert len(lines) == 3  # a newline in a message or a traceback stays inside its line
    first, second, third = map(json.loads, lines)
    assert set(first) == {"time", "level", "logger", "message", "run_id", "model_version", "trace_id"}
    assert (first["level"], first["logger"], first["message"]) == ("INFO", "mlpipe.t", "trained r1")
    assert first["run_id"] == "r1" and first["model_version"] == 7 and "span_id" not in first
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00", first["time"])
    assert second["message"] == "quote \" and\nnewline" and second["level"] == "DEBUG"
    assert third["level"] == "ERROR" and "RuntimeError: boom" in third["exc_info"]
    assert set(CONTEXT_FIELDS) == {"trace_id", "span_id", "run_id", "model_version"}


def test_text_has_no_timestamp_and_appends_context():
    out = io.StringIO()
    setup_logging("INFO", "text", stream=out)
    logging.getLogger("tasks.steps.train").warning("slow epoch", extra={"run_id": "r9", "span_id": "s1"})
    logging.getLogger("x").info("plain")
    assert out.getvalue().splitlines() == ["WARNING tasks.steps.train: slow epoch [span_id=s1 run_id=r9]",
                                           "INFO x: plain"]
    assert not re.search(r"\d\d:\d\d:\d\d", out.getvalue())  # Airflow / kubectl add the time


def test_level_from_the_argument_or_mlpipe_log_level(monkeypatch):
    monkeypatch.setenv("MLPIPE_LOG_LEVEL", "warning")
    out = io.StringIO()
    setup_logging(fmt="text", stream=out)
    logging.getLogger("a").info("hidden")
    logging.getLogger("a").warning("shown")
    assert out.getvalue() == "WARNING a: shown\n"
    assert resolve_level("debug") == logging.DEBUG  # --log-level wins over the variable
    assert resolve_level(None) == logging.WARNING
    monkeypatch.delenv("MLPIPE_LOG_LEVEL")
    assert resolve_level(None) == logging.INFO
    with pytest.raises(ValueError, match="MLPIPE_LOG_LEVEL"):
        resolve_level("loud")


def test_format_from_mlpipe_log_format(monkeypatch):
    monkeypatch.delenv("MLPIPE_LOG_FORMAT", raising=False)
    assert resolve_format() == "text"  # the default
    monkeypatch.setenv("MLPIPE_LOG_FORMAT", "JSON")
    assert resolve_format() == "json"
    monkeypatch.setenv("MLPIPE_LOG_FORMAT", "auto")
    assert resolve_format(stream=Tty()) == "text" and resolve_format(stream=io.StringIO()) == "json"
    monkeypatch.setenv("MLPIPE_LOG_FORMAT", "xml")
    with pytest.raises(ValueError, match="MLPIPE_LOG_FORMAT"):
        resolve_format()


def test_setup_is_idempotent_and_leaves_other_handlers(caplog):
    root = logging.getLogger()
    before = [h for h in root.handlers if not getattr(h, logs._HANDLER_MARK, False)]
    a, b = io.StringIO(), io.StringIO()
    setup_logging("INFO", "text", stream=a)
    setup_logging("INFO", "text", stream=b)
    ours = [h for h in root.handlers if getattr(h, logs._HANDLER_MARK, False)]
    assert len(ours) == 1
    assert [h for h in root.handlers if not getattr(h, logs._HANDLER_MARK, False)] == before
    logging.getLogger("z").info("once")
    assert a.getvalue() == "" and b.getvalue() == "INFO z: once\n"


def test_default_stream_follows_sys_stderr(capsys):
    setup_logging("INFO", "text")
    logging.getLogger("late").info("to the current stderr")
    assert capsys.readouterr().err == "INFO late: to the current stderr\n"


def test_no_basic_config_left_in_tasks():
    from pathlib import Path

    root = Path(logs.__file__).resolve().parent
    # the consumer and the model repository CLI are being reworked by others (see the report)
    skip = {root / "serving" / "consumer.py", root / "model" / "repo.py"}
    left = [str(p.relative_to(root)) for p in root.rglob("*.py")
            if p not in skip and (root / "serving" / "consumer") not in p.parents
            and "logging.basicConfig(" in p.read_text()]
    assert not left, left


def test_a_step_cli_logs_json_lines_to_stderr(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "MLPIPE_HOME": str(tmp_path), "MLPIPE_STORE_URL": f"file://{tmp_path}/s",
           "MLPIPE_LOG_FORMAT": "json"}
    proc = subprocess.run([sys.executable, "-m", "tasks.cli", "drops", "show", "nope"], env=env,
                          capture_output=True, text=True, timeout=120)
    records = [json.loads(ln) for ln in proc.stderr.splitlines() if ln.strip()]
    assert records, proc.stderr
    assert records[-1]["level"] == "ERROR" and records[-1]["message"].startswith("error: ")
    assert proc.stdout == ""


def test_the_cli_error_line_is_bare_in_text_and_a_record_in_json():
    from tasks.contracts.errors import Rejected, run_cli

    def main(argv):
        raise Rejected("QC gate failed for digits v3: accuracy 0.5")

    text, js = io.StringIO(), io.StringIO()
    setup_logging("INFO", "text", stream=text)
    assert run_cli(main) == 3
    assert text.getvalue() == "error: QC gate failed for digits v3: accuracy 0.5\n"  # reads as a CLI's error
    setup_logging("INFO", "json", stream=js)
    run_cli(main)
    record = json.loads(js.getvalue())
    assert (record["level"], record["logger"]) == ("ERROR", "mlpipe.cli")
    assert record["message"] == "error: QC gate failed for digits v3: accuracy 0.5" and "bare" not in record
