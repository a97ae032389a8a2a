"""tasks.model.detector: the centre-heatmap CNN's shapes, its ONNX export and contract (and the dispatch of
``networks.check_onnx_contract`` for a detection spec), parity, decoding a model's outputs, and box metrics."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tasks.contracts.spec import find_spec
from tasks.model import detector
from tasks.model import networks
from tasks.model.networks import OnnxContractError, ParityError

ROOT = Path(__file__).resolve().parents[3]
SPEC = find_spec("scenes-detector", ROOT / "models")
DIGITS = find_spec("digits", ROOT / "models")


def _renamed(spec, **names):
    return spec.model_copy(update={"onnx": spec.onnx.model_copy(update=names)})


@pytest.fixture(scope="module")
def model():
    import torch

    torch.manual_seed(0)
    return detector.build_detector(SPEC).eval()


@pytest.fixture(scope="module")
def onnx_path(model, tmp_path_factory):
    return detector.export_detector_onnx(model, tmp_path_factory.mktemp("det") / "model.onnx", SPEC)


def test_outputs_are_sized_by_the_spec(model):
    import torch

    h, w = SPEC.input.height // SPEC.detection.stride, SPEC.input.width // SPEC.detection.stride
    x = torch.from_numpy(detector.parity_inputs(3, SPEC))
    with torch.no_grad():
        heat, size, emb = model(x)
    assert tuple(heat.shape) == (3, SPEC.num_classes, h, w)
    assert tuple(size.shape) == (3, 2, h, w)
    assert tuple(emb.shape) == (3, SPEC.embedding_dim)
    assert float(size.min()) > 0  # pixels: stride * exp(log size in cells)
    np.testing.assert_allclose(np.linalg.norm(emb.numpy(), axis=1), 1.0, rtol=1e-5)  # L2-normalised
    # the untrained size head starts near exp(LOG_SIZE_INIT) cells
    assert abs(float(size.mean()) - SPEC.detection.stride * np.exp(detector.LOG_SIZE_INIT)) < 1.0


def test_a_classification_spec_is_refused():
    with pytest.raises(detector.DetectorSpecError, match="task is 'classification'"):
        detector.build_detector(DIGITS)


def test_export_passes_the_contract_directly_and_through_networks(onnx_path):
    import onnxruntime as ort

    detector.check_detector_contract(onnx_path, SPEC)
    networks.check_onnx_contract(onnx_path, SPEC)  # dispatches on task: detection
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    out = {o.name: o.shape for o in sess.get_outputs()}
    assert set(out) == {"heatmap", "box_size", "embedding"}
    for name in out:  # the batch axis is dynamic
        assert not isinstance(out[name][0], int)
    res = sess.run(["heatmap"], {"input": np.zeros((5, *SPEC.input_shape), np.float32)})
    assert res[0].shape[0] == 5


def test_contract_names_a_wrong_output_name(model, tmp_path):
    bad = detector.export_detector_onnx(model, tmp_path / "bad.onnx", _renamed(SPEC, logits="centres"))
    with pytest.raises(OnnxContractError, match=r"output 'heatmap' float32 \['N', 1, 24, 24\] is missing"):
        detector.check_detector_contract(bad, SPEC)
    with pytest.raises(OnnxContractError, match="'heatmap'"):
        networks.check_onnx_contract(bad, SPEC)


def test_contract_refuses_a_fixed_batch_and_a_classifier(model, tmp_path):
    import torch

    fixed = tmp_path / "fixed.onnx"
    torch.onnx.export(model, (torch.zeros(2, *SPEC.input_shape),), str(fixed), dynamo=False, opset_version=17,
                      input_names=["input"], output_names=["heatmap", "box_size", "embedding"])
    with pytest.raises(OnnxContractError, match="fixed batch axis 2"):
        detector.check_detector_contract(fixed, SPEC)
    torch.manual_seed(0)
    clf = networks.export_onnx(networks.build_model(DIGITS), tmp_path / "clf.onnx", DIGITS)
    with pytest.raises(OnnxContractError, match="box_size"):
        networks.check_onnx_contract(clf, SPEC)
    networks.check_onnx_contract(clf, DIGITS)  # the classifier path is unchanged


def test_parity_within_the_spec_and_a_changed_model_fails(model, onnx_path):
    import copy

    import torch

    diff = detector.check_detector_parity(model, onnx_path, SPEC)
    assert 0 <= diff <= SPEC.qc.max_parity_diff
    frames = np.random.default_rng(3).integers(0, 256, (4, *SPEC.image_shape), dtype=np.uint8)
    assert detector.check_detector_parity(model, onnx_path, SPEC, batch_sizes=(1, 4), images=frames) <= \
        SPEC.qc.max_parity_diff
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.heat[-1].bias += 0.5
    with pytest.raises(ParityError, match="'heatmap'"):
        detector.check_detector_parity(other, onnx_path, SPEC)


def test_save_and_load_round_trip(model, tmp_path):
    import torch

    path = detector.save_detector(model, tmp_path / "model.pt")
    again = detector.load_detector(path, SPEC)
    x = torch.from_numpy(detector.parity_inputs(2, SPEC))
    with torch.no_grad():
        for a, b in zip(model(x), again(x)):
            assert torch.equal(a, b)
    with pytest.raises(FileNotFoundError):
        detector.load_detector(tmp_path / "none.pt", SPEC)


def test_predict_boxes_decodes_a_models_outputs():
    stride = SPEC.detection.stride
    h, w = SPEC.input.height // stride, SPEC.input.width // stride

    def fake(x):
        heat = np.full((len(x), 1, h, w), -8.0, np.float32)
        size = np.full((len(x), 2, h, w), 20.0, np.float32)
        heat[0, 0, 5, 6] = 3.0  # centre (26, 22) in pixels, score sigmoid(3) = 0.95
        size[0, :, 5, 6] = (12.0, 16.0)
        heat[0, 0, 20, 3] = 0.0  # score 0.5 > threshold 0.3
        heat[1, 0, 10, 10] = -2.0  # score 0.12 < threshold: no box
        return heat, size, np.zeros((len(x), SPEC.embedding_dim), np.float32)

    frames = np.zeros((2, *SPEC.image_shape), np.uint8)
    out = detector.predict_boxes(fake, frames, SPEC)
    assert len(out) == 2
    boxes, scores, classes = out[0]
    np.testing.assert_allclose(boxes[0], [20.0, 14.0, 32.0, 30.0])
    np.testing.assert_allclose(boxes[1], [4.0, 72.0, 24.0, 92.0])
    assert scores[0] > scores[1] > SPEC.detection.score_threshold and list(classes) == [0, 0]
    assert len(out[1][0]) == 0


def test_predict_boxes_same_for_onnx_and_torch(model, onnx_path):
    frames = np.random.default_rng(5).integers(0, 256, (6, *SPEC.image_shape), dtype=np.uint8)
    via_torch = detector.predict_boxes(model, frames, SPEC)
    via_onnx = detector.predict_boxes(networks.onnx_session(onnx_path), frames, SPEC)
    for (bt, st, _), (bo, so, _) in zip(via_torch, via_onnx):
        assert len(bt) == len(bo) <= SPEC.detection.max_objects
        np.testing.assert_allclose(bt, bo, atol=1e-3)
        np.testing.assert_allclose(st, so, atol=1e-4)
    with pytest.raises(TypeError):
        detector.predict_boxes(42, frames, SPEC)


def test_detection_metrics_on_hand_made_boxes():
    gt = [np.array([[0, 0, 10, 10], [20, 20, 30, 30]], np.float32),
          np.array([[50, 50, 70, 70]], np.float32),
          np.zeros((0, 4), np.float32)]
    pred = [
        # one exact, one shifted by 5 px (IoU 5*10/(150) = 0.33 < 0.5: a miss and a false positive)
        (np.array([[0, 0, 10, 10], [25, 20, 35, 30]], np.float32), np.array([0.9, 0.8], np.float32), np.zeros(2)),
        # right box plus a duplicate: one-to-one matching makes the duplicate a false positive
        (np.array([[50, 50, 70, 70], [51, 50, 71, 70]], np.float32), np.array([0.9, 0.7], np.float32), np.zeros(2)),
        (np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0)),
    ]
    m = detector.detection_metrics(pred, gt, 0.5)
    assert (m["tp"], m["fp"], m["fn"]) == (2, 2, 1)
    assert m["precision"] == pytest.approx(0.5) and m["recall"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(2 * 0.5 * (2 / 3) / (0.5 + 2 / 3))
    assert m["count_accuracy"] == pytest.approx(2 / 3)  # frames 0 and 2 have the right count
    loose = detector.detection_metrics(pred, gt, 0.3)  # the shifted box now matches
    assert (loose["tp"], loose["fp"], loose["fn"]) == (3, 1, 0)
    empty = detector.detection_metrics([pred[2]], [gt[2]], 0.5)
    assert empty["precision"] == 1.0 and empty["recall"] == 1.0
    with pytest.raises(ValueError, match="2 predicted frames for 3"):
        detector.detection_metrics(pred[:2], gt, 0.5)


def test_loss_prefers_the_targets():
    import torch

    boxes = [np.array([[10, 10, 30, 34]], np.float32)]
    heat, size, mask = (torch.from_numpy(t) for t in detector.scene_targets(boxes, [[0]], SPEC))
    stride = SPEC.detection.stride
    assert float(mask.sum()) == 1 and float(heat.max()) == 1.0
    good_logits = torch.where(heat >= 1.0, torch.tensor(6.0), torch.tensor(-6.0))
    log_size = torch.log(torch.clamp(size, min=1.0) / stride)
    good, _, good_size = detector.detection_loss(good_logits, log_size, heat, size, mask, stride)
    bad, _, bad_size = detector.detection_loss(-good_logits, log_size + 1.0, heat, size, mask, stride)
    assert float(good) < 0.1 < float(bad)
    assert float(good_size) == pytest.approx(0.0, abs=1e-6) and float(bad_size) == pytest.approx(1.0, abs=1e-5)
