"""QC of a model that is not digits: everything (classes, input, tensors, thresholds, frames) comes from
its spec.

The spec ``tricolour`` (3 named classes, 16x16 RGB, JPEG frames, 8-d embedding, its own thresholds) lives
in a temporary ``MLPIPE_MODELS_DIR``; its model is a real built-in CNN trained for a second on colour
images (``tests/support/spec_models.py``). The golden set is a fixed set of such images in which the
``cross`` images are red like the circles, so ``cross`` has recall 0 and the rest 1.
"""

from __future__ import annotations

import numpy as np
import pytest

from tasks.config import load_settings
from tasks.contracts.errors import EXIT_REJECTED
from tasks.contracts.files import sha256_file
from tasks.model.networks import OnnxContractError
from tasks.steps import drops, registry
from tasks.steps import qc
from tests.support.models import register_files
from tests.support import spec_models as sm

MODEL = "tricolour"
PER_CLASS = 20


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(model.onnx, model.pt) of the tricolour CNN."""
    return sm.train_tiny(sm.load(MODEL, **sm.TRICOLOUR), tmp_path_factory.mktemp("tricolour"))


@pytest.fixture
def spec_env(mlpipe_env, tmp_path, monkeypatch):
    """The tricolour spec in MLPIPE_MODELS_DIR, no MLPIPE_QC_* set but the Triton check off, its golden set."""
    import os

    for key in list(os.environ):
        if key.startswith("MLPIPE_QC_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("MLPIPE_QC_TRITON_CHECK", "0")
    path = sm.write_spec(tmp_path / "models", MODEL, **sm.TRICOLOUR)
    sm.use_specs(monkeypatch, tmp_path / "models")
    spec = load_settings().model_spec(MODEL)
    labels = np.repeat(np.arange(spec.num_classes), PER_CLASS)
    looks_like = np.where(labels == 2, 0, labels)  # the crosses look like circles (red)
    golden = (sm.colour_images(spec, looks_like, seed=99), labels.astype(np.int64))

    def golden_set(asked=None):
        assert asked is not None and asked.name == MODEL, "QC must ask for the golden set of its spec"
        return golden[0].copy(), golden[1].copy()

    monkeypatch.setattr(drops, "golden_set", golden_set)
    return spec, path


def _checks(report):
    return {c["name"]: c for c in report["checks"]}


def test_thresholds_default_to_the_spec_and_explicit_settings_and_flags_win(spec_env, monkeypatch):
    spec, _ = spec_env
    th = qc.QCThresholds.for_spec(spec)
    assert (th.min_accuracy, th.min_class_recall, th.max_regression) == (0.6, 0.5, 0.02)  # the spec's
    assert th.latency_requests == qc.QCSection.model_fields["latency_requests"].default  # not in a spec
    monkeypatch.setenv("MLPIPE_QC_MIN_ACCURACY", "0.7")
    th = qc.QCThresholds.for_spec(spec, min_class_recall=0.25)
    assert (th.min_accuracy, th.min_class_recall, th.max_regression) == (0.7, 0.25, 0.02)


def test_per_class_results_by_name_and_the_spec_thresholds_applied(spec_env, store, tiny):
    spec, spec_path = spec_env
    onnx, pt = tiny
    v = register_files(store, MODEL, {"model.onnx": onnx, "model.pt": pt})

    report = qc.run_qc(store, MODEL, v)

    checks = _checks(report)
    assert report["classes"] == ["circle", "square", "cross"]
    assert report["per_class_recall"] == {"circle": 1.0, "square": 1.0, "cross": 0.0}
    assert report["confusion_matrix"] == [[PER_CLASS, 0, 0], [0, PER_CLASS, 0], [PER_CLASS, 0, 0]]
    assert report["thresholds"]["min_accuracy"] == 0.6 and report["thresholds"]["min_class_recall"] == 0.5
    # accuracy 2/3 passes the spec's 0.6 (the settings' default 0.95 would fail it); cross fails 0.5
    assert checks["accuracy"]["status"] == "passed" and checks["accuracy"]["value"] == pytest.approx(0.6667)
    assert checks["class_recall"]["status"] == "failed"
    assert "for class 'cross'" in checks["class_recall"]["detail"] and "cross 0.000" in checks["class_recall"]["detail"]
    assert checks["loads"]["status"] == "passed" and "logits [N, 3], embedding [N, 8]" in checks["loads"]["detail"]
    assert checks["parity_onnx_torch"]["status"] == "passed"
    assert report["verdict"] == "failed" and [r.split(":")[0] for r in report["reasons"]] == ["class_recall"]
    assert report["spec"]["name"] == MODEL and report["spec"]["sha256"] == sha256_file(spec_path)
    assert report["spec"]["registered_with"] == {"name": MODEL, "sha256": sha256_file(spec_path)}
    html = store.get_bytes(f"models/{MODEL}/{v}/qc_report.html").decode()
    assert "circle, square, cross" in html and "digits" not in html
    assert html.count("data:image/png;base64,") == 2
    assert registry.get_version(store, MODEL, v)["stage"] == "rejected"


def test_an_explicit_flag_wins_over_the_spec(spec_env, store, tiny):
    onnx, pt = tiny
    v = register_files(store, MODEL, {"model.onnx": onnx, "model.pt": pt})
    assert qc.main(["--model", MODEL, "--version", str(v)]) == EXIT_REJECTED
    assert qc.main(["--model", MODEL, "--version", str(v), "--min-class-recall", "0"]) == 0
    assert store.get_json(f"models/{MODEL}/{v}/qc_report.json")["verdict"] == "passed"


def test_parity_with_pytorch_is_a_trainers_own_check_when_it_is_not_the_built_in_one(spec_env, store, tiny,
                                                                                      monkeypatch, tmp_path):
    onnx, _pt = tiny
    # the built-in trainer always leaves model.pt: without it, parity cannot be shown and the version fails
    v = register_files(store, MODEL, {"model.onnx": onnx})
    report = qc.run_qc(store, MODEL, v, qc.QCThresholds.for_spec(spec_env[0], min_class_recall=0.0))
    assert _checks(report)["parity_onnx_torch"]["status"] == "failed" and report["verdict"] == "failed"
    # a brought trainer (another entry point) leaves no model.pt of the built-in network: skipped, saying why
    sm.write_spec(tmp_path / "models", MODEL, **{**sm.TRICOLOUR, "trainer": {
        **sm.spec_data(MODEL, **sm.TRICOLOUR)["trainer"], "entry_point": "byo.trainer:train"}})
    spec = load_settings().model_spec(MODEL)
    assert spec.trainer.entry_point == "byo.trainer:train"
    v2 = register_files(store, MODEL, {"model.onnx": onnx})
    report = qc.run_qc(store, MODEL, v2, qc.QCThresholds.for_spec(spec, min_class_recall=0.0))
    check = _checks(report)["parity_onnx_torch"]
    assert check["status"] == "skipped" and "byo.trainer:train is not the built-in one" in check["detail"]
    assert report["verdict"] == "passed", report["reasons"]


def test_a_wrong_output_size_is_rejected_at_register_and_at_qc(spec_env, store, tiny, tmp_path):
    """An ONNX with 4 logits for the 3-class spec: register refuses it (rejected), and QC's loads check
    names the tensor and the expected shape when such a file gets onto a version anyway."""
    spec, _ = spec_env
    wrong = sm.contract_onnx(tmp_path / "wrong.onnx", sm.load(MODEL, **{**sm.TRICOLOUR, "classes": [
        {"id": i, "name": n} for i, n in enumerate(["circle", "square", "cross", "star"])]}))
    with pytest.raises(OnnxContractError) as exc:
        register_files(store, MODEL, {"model.onnx": wrong})
    assert "output 'logits' has shape ['N', 4], expected ['N', 3]" in str(exc.value)
    assert "refusing to register run" in str(exc.value)
    assert registry.list_versions(store, MODEL) == []

    onnx, pt = tiny
    v = register_files(store, MODEL, {"model.onnx": onnx, "model.pt": pt})
    store.put_bytes(f"models/{MODEL}/{v}/model.onnx", wrong.read_bytes())  # the file changed after register
    report = qc.run_qc(store, MODEL, v)
    assert [c["name"] for c in report["checks"]] == ["loads"]
    assert report["reasons"][0].startswith("loads: ")
    assert "output 'logits' has shape ['N', 4], expected ['N', 3]" in report["reasons"][0]


# ------------------------------------------------------------------------------- the Triton checks


class FakeTriton:
    """A stand-in for the QC Triton runner (``MLPIPE_QC_TRITON_RUNNER``): no server, a fake URL."""

    grpc_url = "fake:0"

    def __init__(self, repo, logs, backend_dir=None) -> None:
        self.repo = repo

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        return None

    def log_tail(self, n: int) -> str:
        return ""


class FakeClient:
    """A fake of our ``TritonClient``: decodes each frame as the preprocess model would and answers with the
    classifier in ONNX Runtime; the frames in ``broken`` come back with a ``FRAME_ERROR``."""

    broken: set[int] = set()
    sent: list[list[bytes]] = []
    onnx = None
    spec = None

    def __init__(self, url, protocol="grpc") -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        return None

    def load_model(self, name) -> None:
        assert name == MODEL

    def wait_model_ready(self, name, timeout=0) -> None:
        return None

    def infer_frames(self, model, frames):
        from tasks.model.frames import decode_frame
        from tasks.model.networks import onnx_session, run_onnx, to_input

        FakeClient.sent.append(list(frames))
        images = np.stack([decode_frame(f, self.spec) for f in frames])
        logits, emb = run_onnx(onnx_session(self.onnx), to_input(images, self.spec), self.spec)
        errors = np.array([[b"undecodable: cannot identify image file" if i in self.broken else b""]
                           for i in range(len(frames))], dtype=object)
        return {"LABEL": logits.argmax(1).reshape(-1, 1), "EMBEDDING": emb, "FRAME_ERROR": errors}


@pytest.fixture
def fake_triton(spec_env, tiny, monkeypatch):
    from tasks.adapters import triton

    spec, _ = spec_env
    monkeypatch.setenv("MLPIPE_QC_TRITON_CHECK", "1")
    monkeypatch.setenv("MLPIPE_QC_LATENCY_REQUESTS", "5")
    monkeypatch.setenv("MLPIPE_QC_P95_LATENCY_MS", "10000")
    monkeypatch.setenv("MLPIPE_QC_MIN_CLASS_RECALL", "0")
    monkeypatch.setenv("MLPIPE_QC_TRITON_RUNNER", f"{__name__}:FakeTriton")
    monkeypatch.setattr(triton, "TritonClient", FakeClient)
    monkeypatch.setattr(FakeClient, "spec", spec)
    monkeypatch.setattr(FakeClient, "onnx", tiny[0])
    monkeypatch.setattr(FakeClient, "sent", [])
    monkeypatch.setattr(FakeClient, "broken", set())
    return FakeClient


def test_triton_check_sends_encoded_frames_of_the_spec(fake_triton, store, tiny):
    onnx, pt = tiny
    v = register_files(store, MODEL, {"model.onnx": onnx, "model.pt": pt})

    report = qc.run_qc(store, MODEL, v)

    checks = _checks(report)
    assert checks["triton_serves"]["status"] == "passed", checks["triton_serves"]
    assert "60 golden images as jpeg frames" in checks["triton_serves"]["detail"]
    assert checks["triton_serves"]["value"] == 1.0
    assert checks["latency_p95"]["status"] == "passed"
    first = fake_triton.sent[0]
    assert len(first) == 3 * PER_CLASS and all(f[:3] == b"\xff\xd8\xff" for f in first)  # JPEG, as the spec says
    assert all(len(batch) == 1 for batch in fake_triton.sent[1:])  # warm-up and latency: one frame each


def test_a_frame_error_row_fails_the_triton_check_naming_the_reason(fake_triton, store, tiny):
    onnx, pt = tiny
    v = register_files(store, MODEL, {"model.onnx": onnx, "model.pt": pt})
    fake_triton.broken = {3}

    report = qc.run_qc(store, MODEL, v)

    serves = _checks(report)["triton_serves"]
    assert serves["status"] == "failed"
    assert "1 of 60 frames were not decoded by the preprocess model (FRAME_ERROR)" in serves["detail"]
    assert "undecodable: cannot identify image file" in serves["detail"]
    assert _checks(report)["latency_p95"]["status"] == "skipped"
    assert report["verdict"] == "failed"


@pytest.mark.integration
def test_a_real_triton_serves_the_spec_model_from_jpeg_frames(spec_env, store, tiny, monkeypatch):
    """The throw-away local Triton decodes the spec's JPEG frames in its preprocess model and answers as ONNX
    Runtime does on the same frames."""
    monkeypatch.setenv("MLPIPE_QC_TRITON_CHECK", "1")
    monkeypatch.setenv("MLPIPE_QC_LATENCY_REQUESTS", "5")
    monkeypatch.setenv("MLPIPE_QC_P95_LATENCY_MS", "10000")
    onnx, pt = tiny
    v = register_files(store, MODEL, {"model.onnx": onnx, "model.pt": pt})

    report = qc.run_qc(store, MODEL, v)

    serves = _checks(report)["triton_serves"]
    assert serves["status"] == "passed", serves["detail"]
    assert serves["value"] == 1.0 and "EMBEDDING [60, 8]" in serves["detail"]
    assert _checks(report)["latency_p95"]["status"] == "passed"
