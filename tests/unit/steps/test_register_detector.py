"""A detector whose model.onnx does not match its spec is refused at register (nothing claimed), naming the
tensor; one that matches is registered (the contract check dispatches on the spec's task)."""

from __future__ import annotations

import pytest

from tasks.contracts import layout
from tasks.model.networks import OnnxContractError
from tasks.steps import registry


def _run(store, run_id: str, onnx_path) -> None:
    store.put_file(layout.run_file_key(run_id, layout.MODEL_ONNX), onnx_path)
    store.put_json(layout.run_file_key(run_id, layout.METRICS), {"golden_recall": 0.5})


def test_a_classifier_onnx_registered_as_the_detector_is_refused(store, tmp_path, mlpipe_env):
    from tasks.model.networks import build_model, export_onnx

    cls = mlpipe_env.model_spec("scenes-digits")
    _run(store, "wrong", export_onnx(build_model(cls), tmp_path / "cls.onnx", cls))
    with pytest.raises(OnnxContractError, match=r"refusing to register run 'wrong' .* as 'scenes-detector'"):
        registry.register(store, "scenes-detector", "wrong", ["d1"], mirror=False)
    assert registry.list_versions(store, "scenes-detector") == []
    assert not store.list("models/scenes-detector/_claims/")


def test_a_detector_of_another_stride_is_refused_naming_the_tensor(store, tmp_path, mlpipe_env):
    from tests.support.pipeline_models import detector_onnx

    det = mlpipe_env.model_spec("scenes-detector")
    other = det.model_copy(update={"detection": det.detection.model_copy(update={"stride": 8})})
    _run(store, "stride8", detector_onnx(tmp_path / "det8.onnx", other))
    with pytest.raises(OnnxContractError, match=det.onnx.logits):
        registry.register(store, "scenes-detector", "stride8", ["d1"], mirror=False)
