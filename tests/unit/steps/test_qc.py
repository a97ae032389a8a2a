"""The QC gate on REAL trained models, with its Triton infra check on a real local Triton (no mocks).

The good / worse models are trained once per session (tests/model_fixtures.py); the gate's
throw-away Triton runs only where the test is about it (MLPIPE_QC_TRITON_CHECK=0 elsewhere).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tasks.config import load_settings
from tasks.contracts.errors import EXIT_BAD_INPUT, EXIT_REJECTED
from tasks.steps import registry
from tasks.model.networks import OnnxContractError
from tasks.steps.qc import QCThresholds, main as qc_main, run_qc
from tests.support.models import export_wrong_shape_onnx, register_files, register_model

pytestmark = pytest.mark.integration
MODEL = "digits"
ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture
def qc_env(mlpipe_env, monkeypatch):
    """Small latency sample, a generous latency budget (timings are not what these tests check)."""
    for key in list(os.environ):
        if key.startswith("MLPIPE_QC_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("MLPIPE_QC_LATENCY_REQUESTS", "30")
    monkeypatch.setenv("MLPIPE_QC_P95_LATENCY_MS", "1000")
    return mlpipe_env


@pytest.fixture
def no_triton(qc_env, monkeypatch):
    monkeypatch.setenv("MLPIPE_QC_TRITON_CHECK", "0")
    return qc_env


def _checks(report: dict) -> dict[str, dict]:
    return {c["name"]: c for c in report["checks"]}


def _failed(report: dict) -> set[str]:
    return {c["name"] for c in report["checks"] if c["status"] == "failed"}


def test_good_model_passes_with_triton_check_and_stores_reports(qc_env, store, good_model, good_model_t):
    """Champion v1 (good) in production; candidate v2 (good, softer head) passes every check incl. Triton."""
    v1 = register_model(store, good_model, MODEL)
    registry.set_stage(store, MODEL, v1, "production", "test champion")
    v2 = register_model(store, good_model_t, MODEL)

    report = run_qc(store, MODEL, v2)

    checks = _checks(report)
    assert report["verdict"] == "passed", report["reasons"]
    assert report["reasons"] == []
    assert report["accuracy"] == pytest.approx(good_model_t.golden_accuracy, abs=1e-6)
    for name in ("loads", "accuracy", "class_recall", "no_regression", "parity_onnx_torch", "triton_serves",
                 "latency_p95"):
        assert checks[name]["status"] == "passed", checks[name]
    assert checks["parity_trt_onnx"]["status"] == "skipped"
    assert "TensorRT" in checks["parity_trt_onnx"]["detail"]
    assert checks["triton_serves"]["value"] >= 0.99
    assert 0 < checks["latency_p95"]["value"] <= 1000 and checks["latency_p95"]["p50_ms"] > 0
    assert "30 requests at batch 1" in checks["latency_p95"]["detail"]
    assert report["champion"]["version"] == v1
    assert checks["no_regression"]["value"] == pytest.approx(0.0, abs=1e-9)  # same labels as the champion
    spec = load_settings().model_spec(MODEL)
    cm = np.array(report["confusion_matrix"])
    assert cm.shape == (spec.num_classes, spec.num_classes) and cm.sum() == report["golden_set_size"] == 1000
    assert list(report["per_class_recall"]) == report["classes"] == spec.class_names  # by class name
    assert report["spec"]["name"] == MODEL and report["spec"]["registered_with"]["sha256"] == report["spec"]["sha256"]

    # stored on the version: JSON + a self-contained HTML page with both figures
    stored = store.get_json(f"models/{MODEL}/{v2}/qc_report.json")
    assert stored["verdict"] == "passed" and stored["checks"] == report["checks"]
    html = store.get_bytes(f"models/{MODEL}/{v2}/qc_report.html").decode()
    assert "PASSED" in html and html.count("data:image/png;base64,") == 2
    assert "alt='Confusion matrix'" in html and "alt='Per-class recall'" in html
    assert report["report_uri"] == store.uri(f"models/{MODEL}/{v2}/qc_report.html")
    manifest = registry.get_version(store, MODEL, v2)
    assert manifest["stage"] == "candidate"  # passing does not promote: deploy does
    assert manifest["qc"]["verdict"] == "passed"


def test_worse_model_fails_and_is_rejected_cli(no_triton, store, worse_model, capsys):
    v = register_model(store, worse_model, MODEL)
    code = qc_main(["--version", str(v), "--result-json", str(no_triton.home / "qc.json")])
    out, err = capsys.readouterr()
    assert code == EXIT_REJECTED
    assert "Traceback" not in err
    assert f"error: QC gate failed for {MODEL} v{v}" in err and "accuracy" in err
    result = json.loads((no_triton.home / "qc.json").read_text())
    assert set(result) == {"model", "version", "verdict", "reasons", "report_uri", "accuracy", "overrides"}
    assert result["overrides"] == []
    assert result["verdict"] == "failed" and result["accuracy"] < 0.9
    assert any(r.startswith("accuracy: golden-set accuracy") for r in result["reasons"])
    assert any(r.startswith("class_recall: lowest recall") for r in result["reasons"])
    manifest = registry.get_version(store, MODEL, v)
    assert manifest["stage"] == "rejected"
    assert "QC gate failed" in manifest["history"][-1]["reason"]
    html = store.get_bytes(f"models/{MODEL}/{v}/qc_report.html").decode()
    assert "FAILED" in html and "alt='Confusion matrix'" in html

    # --no-fail (the DAG's mode): exit 0, verdict in the result; re-running does not re-reject
    def stage_events():
        return [e for e in registry.events(store, MODEL) if e["event"] == "stage"]

    events_before = stage_events()
    assert events_before[-1]["stage"] == "rejected" and events_before[-1]["previous"] == "candidate"
    assert qc_main(["--version", str(v), "--no-fail", "--result-json", str(no_triton.home / "qc2.json")]) == 0
    assert json.loads((no_triton.home / "qc2.json").read_text())["verdict"] == "failed"
    assert stage_events() == events_before  # already rejected: no new stage event
    # the verdict and the reports were recorded through the registry: events, not silent rewrites
    recorded = [e for e in registry.events(store, MODEL) if e.get("version") == v]
    assert [e["verdict"] for e in recorded if e["event"] == "qc"] == ["failed", "failed"]
    assert {"qc_report.json", "qc_report.html"} <= {e.get("name") for e in recorded if e["event"] == "artifact"}


def test_regression_against_champion_fails_no_regression(no_triton, store, good_model, worse_model, monkeypatch):
    """Absolute thresholds lowered so only the comparison with the champion can fail."""
    champ = register_model(store, good_model, MODEL)
    registry.set_stage(store, MODEL, champ, "production", "test champion")
    cand = register_model(store, worse_model, MODEL)
    monkeypatch.setenv("MLPIPE_QC_MIN_ACCURACY", "0")
    monkeypatch.setenv("MLPIPE_QC_MIN_CLASS_RECALL", "0")

    report = run_qc(store, MODEL, cand)

    assert report["verdict"] == "failed"
    assert _failed(report) == {"no_regression"}, report["reasons"]
    nr = _checks(report)["no_regression"]
    assert f"champion v{champ}" in nr["detail"]
    assert nr["value"] < -0.01 and nr["threshold"] == -0.01
    assert report["champion"]["accuracy"] == pytest.approx(good_model.golden_accuracy, abs=1e-6)
    assert registry.get_version(store, MODEL, cand)["stage"] == "rejected"
    assert registry.champion(store, MODEL)["version"] == champ  # the champion keeps its stage
    html = store.get_bytes(f"models/{MODEL}/{cand}/qc_report.html").decode()
    assert f"champion v{champ}" in html and "alt='Per-class recall'" in html


def test_unreadable_champion_fails_closed_and_an_override_is_recorded(no_triton, store, good_model):
    """A champion whose model.onnx cannot be read fails no_regression (not "skipped"), with the reason
    and what to do; an explicit override lets it pass and is recorded in the report, the manifest
    and the registry's qc event."""
    champ = register_model(store, good_model, MODEL)
    registry.set_stage(store, MODEL, champ, "production", "test champion")
    store.put_bytes(f"models/{MODEL}/{champ}/model.onnx", b"not an onnx model")  # the champion is broken
    cand = register_model(store, good_model, MODEL)

    report = run_qc(store, MODEL, cand)

    assert report["verdict"] == "failed"
    assert _failed(report) == {"no_regression"}, report["reasons"]
    detail = _checks(report)["no_regression"]["detail"]
    assert f"champion v{champ} could not be evaluated" in detail and "--override-unreadable-champion" in detail
    assert any(r.startswith("no_regression: ") for r in report["reasons"])
    assert registry.get_version(store, MODEL, cand)["stage"] == "rejected"

    cand2 = register_model(store, good_model, MODEL)
    out = no_triton.home / "qc-override.json"
    code = qc_main(["--version", str(cand2), "--override-unreadable-champion", "champion file lost in the outage",
                    "--result-json", str(out)])
    assert code == 0
    result = json.loads(Path(out).read_text())
    assert result["verdict"] == "passed"
    assert result["overrides"] == [{"check": "no_regression", "reason": "champion file lost in the outage",
                                    "because": result["overrides"][0]["because"]}]
    assert f"champion v{champ}" in result["overrides"][0]["because"]
    manifest = registry.get_version(store, MODEL, cand2)
    assert manifest["qc"]["overrides"][0]["reason"] == "champion file lost in the outage"
    qc_events = [e for e in registry.events(store, MODEL) if e.get("version") == cand2 and e["event"] == "qc"]
    assert qc_events and qc_events[-1]["overrides"][0]["reason"] == "champion file lost in the outage"


def test_failed_recheck_of_the_champion_keeps_its_stage(no_triton, store, good_model, monkeypatch):
    """Only a candidate is rejected: re-running QC on the serving version records the verdict only."""
    v = register_model(store, good_model, MODEL)
    registry.set_stage(store, MODEL, v, "production", "test champion")
    monkeypatch.setenv("MLPIPE_QC_MIN_ACCURACY", "0.999")

    report = run_qc(store, MODEL, v)

    assert report["verdict"] == "failed" and _failed(report) == {"accuracy"}
    assert _checks(report)["no_regression"]["detail"] == f"v{v} is the champion itself"
    manifest = registry.get_version(store, MODEL, v)
    assert manifest["stage"] == "production" and manifest["qc"]["verdict"] == "failed"


def test_corrupt_onnx_fails_loads_without_crash(no_triton, store, good_model):
    """Register refuses such a file; one that gets onto a version anyway fails QC's loads check."""
    rng = np.random.default_rng(0)
    v = register_model(store, good_model, MODEL)
    store.put_bytes(f"models/{MODEL}/{v}/model.onnx", rng.bytes(4096))

    report = run_qc(store, MODEL, v)

    assert report["verdict"] == "failed"
    assert [c["name"] for c in report["checks"]] == ["loads"]
    assert report["reasons"][0].startswith("loads: ") and "not a loadable ONNX model" in report["reasons"][0]
    assert registry.get_version(store, MODEL, v)["stage"] == "rejected"
    html = store.get_bytes(f"models/{MODEL}/{v}/qc_report.html").decode()
    assert "FAILED" in html and "loads" in html


def test_wrong_output_shape_fails_naming_the_shape(no_triton, store, good_model, tmp_path):
    onnx = export_wrong_shape_onnx(tmp_path / "wrong.onnx", num_logits=7)
    with pytest.raises(OnnxContractError, match=r"output 'logits' has shape \['N', 7\], expected \['N', 10\]"):
        register_files(store, MODEL, {"model.onnx": onnx})  # refused at register
    v = register_model(store, good_model, MODEL)
    store.put_bytes(f"models/{MODEL}/{v}/model.onnx", onnx.read_bytes())  # changed behind the registry's back

    report = run_qc(store, MODEL, v)

    assert report["verdict"] == "failed" and _failed(report) == {"loads"}
    assert "output 'logits' has shape ['N', 7], expected ['N', 10]" in report["reasons"][0]
    assert registry.get_version(store, MODEL, v)["stage"] == "rejected"


def test_thresholds_from_env_are_honoured_with_triton_latency(qc_env, store, good_model, monkeypatch):
    v = register_model(store, good_model, MODEL)
    monkeypatch.setenv("MLPIPE_QC_MIN_ACCURACY", "0.999")
    monkeypatch.setenv("MLPIPE_QC_P95_LATENCY_MS", "0.001")  # no real server answers in 1 us

    report = run_qc(store, MODEL, v)

    assert report["thresholds"]["min_accuracy"] == 0.999
    assert report["thresholds"]["p95_latency_ms"] == 0.001
    assert report["thresholds"]["latency_requests"] == 30
    assert _failed(report) == {"accuracy", "latency_p95"}, report["reasons"]
    checks = _checks(report)
    assert checks["accuracy"]["threshold"] == 0.999
    assert checks["triton_serves"]["status"] == "passed"  # the model itself loads and answers
    assert any(r.startswith("latency_p95: 30 requests at batch 1") for r in report["reasons"])


def test_thresholds_parse_and_validate(monkeypatch):
    spec = load_settings().model_spec(MODEL)
    for key in list(os.environ):
        if key.startswith("MLPIPE_QC_"):
            monkeypatch.delenv(key)
    assert QCThresholds.for_spec(spec).max_regression == spec.qc.max_regression
    monkeypatch.setenv("MLPIPE_QC_MIN_CLASS_RECALL", "0.8")
    monkeypatch.setenv("MLPIPE_QC_TRITON_CHECK", "no")
    monkeypatch.setenv("MLPIPE_QC_LATENCY_REQUESTS", "7")
    th = QCThresholds.for_spec(spec, min_accuracy=0.5)
    assert (th.min_class_recall, th.triton_check, th.latency_requests, th.min_accuracy) == (0.8, False, 7, 0.5)
    monkeypatch.setenv("MLPIPE_QC_MIN_ACCURACY", "high")
    with pytest.raises(ValueError, match="MLPIPE_QC_MIN_ACCURACY='high' is not a number"):
        QCThresholds.for_spec(spec)
    monkeypatch.setenv("MLPIPE_QC_MIN_ACCURACY", "1.5")
    with pytest.raises(ValueError, match="min_accuracy"):
        QCThresholds.for_spec(spec)


def test_cli_unknown_version_and_bad_threshold_exit_2(no_triton, store, capsys, monkeypatch):
    assert qc_main(["--version", "42"]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1].startswith("error: model 'digits' has no version 42")
    assert "Traceback" not in err
    monkeypatch.setenv("MLPIPE_QC_LATENCY_REQUESTS", "0")
    assert qc_main(["--version", "1"]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert "error: QC latency_requests" in err and "Traceback" not in err


def test_module_entry_point_unknown_version_is_one_error_line(no_triton):
    proc = subprocess.run([sys.executable, "-m", "tasks.cli", "qc", "--version", "7"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == EXIT_BAD_INPUT, proc.stderr
    assert proc.stderr.strip().splitlines() == ["error: model 'digits' has no version 7 (known versions: none)"]


def test_cli_help_runs_without_heavy_work(capsys):
    with pytest.raises(SystemExit) as exc:
        qc_main(["--help"])
    assert exc.value.code == 0
    assert "--min-accuracy" in capsys.readouterr().out
