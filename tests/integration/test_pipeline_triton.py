"""The pipeline served as one Triton model (tasks/model/pipeline_repo.py, model_repo/python/pipeline/model.py)
by the real tritonserver of the nvidia-pytriton wheel: BLS calls of the pinned member versions, the contract's
outputs, per-frame errors and empty read-outs, and a switch of pipeline versions under load that never answers
with a half-switched set of members. One server for the module."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from tasks.config import load_settings
from tasks.contracts.pipeline import find_pipeline, member_specs
from tasks.contracts.serving import FRAME_ERROR, FRAME_INPUT, PIPELINE_OUTPUTS
from tasks.adapters.triton import TritonError
from tasks.local.triton import LocalTriton
from tasks.model import frame_codec, scene_codec
from tasks.model import pipeline_repo as pr
from tasks.model.frames import codec_params, encode_frame
from tasks.model.networks import onnx_session
from tests.support.pipeline_models import detector_onnx, scene

pytestmark = pytest.mark.integration
SETTINGS = load_settings()
PIPE = find_pipeline("scenes", SETTINGS.models_dir)
SPECS = member_specs(PIPE, SETTINGS.models_dir)
DET, CLS = SPECS["detector"], SPECS["classifier"]
NAMES = pr.member_model_names(PIPE)
K = DET.detection.max_objects
#: pipeline version -> (detector box side, classifier seed): every member differs between the two
VERSIONS = {1: (16.0, 0), 2: (22.0, 1)}


class Server:
    def __init__(self, triton, repo, files):
        self.triton, self.repo, self.files = triton, repo, files

    def client(self, **kw):
        return self.triton.client("grpc", **kw)


def _load(client, pipeline=True):
    for name in NAMES.values():
        client.load_model(name)
    if pipeline:
        client.load_model(PIPE.name)
        client.wait_model_ready(PIPE.name, timeout=120)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    import torch

    from tasks.model.networks import build_model, export_onnx

    work = tmp_path_factory.mktemp("pipeline-triton")
    repo = work / "repo"
    pr.render_pipeline("local", repo, PIPE, SETTINGS.models_dir)
    files = {}
    for v, (box, seed) in VERSIONS.items():
        torch.manual_seed(seed)
        files[v] = {"detector": detector_onnx(work / f"det{v}.onnx", DET, box),
                    "classifier": export_onnx(build_model(CLS), work / f"cls{v}.onnx", CLS)}
        pr.write_member_version(repo, DET, v, files[v]["detector"], pipeline=PIPE.name)
        pr.write_member_version(repo, CLS, v, files[v]["classifier"], pipeline=PIPE.name)
        pr.write_pipeline_version(repo, PIPE, SETTINGS.models_dir, v, {"detector": v, "classifier": v})
    pr.set_pipeline_serving(repo, PIPE, 1)
    triton = LocalTriton(repo, work / "logs", backend_dir=work / "backends")
    triton.start(timeout=90)
    try:
        with triton.client("grpc") as client:
            _load(client)
        yield Server(triton, repo, files)
    finally:
        triton.stop()


# ---------------------------------------------------------------------------------------------- the host's answer


def reference(files, frames):
    """What the pipeline must answer, computed on the host with the same codecs and ONNX Runtime."""
    det_s, cls_s = onnx_session(files["detector"]), onnx_session(files["classifier"])
    fp, cp, d, c = codec_params(DET), codec_params(CLS), DET.detection, PIPE.crop
    out = []
    for payload in frames:
        try:
            img = frame_codec.decode(payload, fp)
        except frame_codec.FrameError as exc:
            out.append({"error": exc.reason})
            continue
        heat, size, emb = det_s.run([DET.onnx.logits, DET.onnx.box_size, DET.onnx.embedding],
                                    {DET.onnx.input: frame_codec.normalise(img[None], fp)})
        boxes, scores, _ = scene_codec.decode_centres(
            heat[0], size[0], stride=d.stride, threshold=d.score_threshold, max_objects=d.max_objects,
            window=d.peak_window, min_box_size=d.min_box_size, height=DET.input.height, width=DET.input.width)
        labels, lscores = np.zeros(0, np.int64), np.zeros(0, np.float32)
        if len(boxes):
            crops = scene_codec.crop_boxes(img, boxes, height=c.height, width=c.width, channels=c.channels,
                                           padding=c.padding, square=c.square)
            (logits,) = cls_s.run([CLS.onnx.logits], {CLS.onnx.input: frame_codec.normalise(crops, cp)})
            p = np.exp(logits - logits.max(1, keepdims=True))
            p /= p.sum(1, keepdims=True)
            labels, lscores = p.argmax(1), p.max(1)
        out.append({"error": None, "boxes": boxes, "scores": scores, "labels": labels, "label_scores": lscores,
                    "readout": scene_codec.readout(boxes, [CLS.class_names[i] for i in labels]), "embedding": emb[0]})
    return out


def _png(cells):
    return encode_frame(scene(DET, cells), DET, "png")


def _matches(answer, ref, tol=1e-5):
    """Whether one ``infer_pipeline`` answer is the host's ``ref`` (same boxes, labels, scores, embedding)."""
    if answer["error"] or ref["error"]:
        return bool(answer["error"]) and bool(ref["error"]) and answer["error"].startswith(ref["error"])
    return (answer["count"] == len(ref["boxes"]) and answer["labels"] == ref["labels"].tolist()
            and answer["readout"] == ref["readout"]
            and np.allclose(np.asarray(answer["boxes"]).reshape(-1, 4), ref["boxes"].reshape(-1, 4), atol=1e-4)
            and np.allclose(answer["box_scores"], ref["scores"], atol=tol)
            and np.allclose(answer["label_scores"], ref["label_scores"], atol=tol)
            and np.allclose(answer["embedding"], ref["embedding"], atol=tol))


CELLS = [[(5, 5)], [(3, 4), (12, 18)], [(4, 20), (18, 3), (11, 11)], [(2, 2), (2, 12), (20, 6), (15, 21)]]


# ---------------------------------------------------------------------------------------------- tests


def test_pipeline_answers_the_contract_outputs_per_frame(server):
    good = [_png(c) for c in CELLS]
    jpeg = encode_frame(scene(DET, [(9, 9), (9, 16)]), DET, "jpeg")
    empty = _png([])  # a dark frame: the detector's heatmap is negative everywhere
    corrupt = good[0][:40] + b"\x00" * 64
    small = frame_codec.encode(np.zeros((DET.input.height // 2, DET.input.width // 2, 3), np.uint8), "png")
    frames = [*good, empty, corrupt, jpeg, small]
    with server.client() as client:
        raw = client.infer_frames(PIPE.name, frames, outputs=PIPELINE_OUTPUTS)
        answers = client.infer_pipeline(frames, model=PIPE.name)
    n = len(frames)
    assert {k: (v.dtype.type, v.shape) for k, v in raw.items()} == {
        "BOXES": (np.float32, (n, K, 4)), "BOX_SCORES": (np.float32, (n, K)), "BOX_LABELS": (np.int64, (n, K)),
        "LABEL_SCORES": (np.float32, (n, K)), "COUNT": (np.int32, (n, 1)), "READOUT": (np.object_, (n, 1)),
        "EMBEDDING": (np.float32, (n, DET.embedding_dim)), FRAME_ERROR: (np.object_, (n, 1))}
    ref = reference(server.files[1], frames)
    for i, (a, r) in enumerate(zip(answers, ref)):
        assert _matches(a, r), f"frame {i}: {a} != {r}"
    # one box per bright cell, centred on it, of the detector v1's size; labels and read-out of the classifier
    for a, cells in zip(answers, CELLS):
        assert a["count"] == len(cells) and a["error"] is None
        centres = sorted(((x0 + x1) / 2, (y0 + y1) / 2) for x0, y0, x1, y1 in a["boxes"])
        s = DET.detection.stride
        assert centres == sorted(((c + 0.5) * s, (r + 0.5) * s) for r, c in cells)
        assert all(0 <= lab < CLS.num_classes for lab in a["labels"]) and len(a["readout"]) == len(cells)
    assert raw["COUNT"][: len(CELLS), 0].tolist() == [len(c) for c in CELLS]
    assert np.all(raw["BOX_LABELS"][0, 1:] == -1) and np.all(raw["BOXES"][0, 1:] == 0)
    # the dark frame: an empty read-out, not an error
    e = len(good)
    assert answers[e] == {**answers[e], "count": 0, "readout": "", "boxes": [], "labels": [], "error": None}
    assert raw["READOUT"][e, 0] == b"" and raw[FRAME_ERROR][e, 0] == b"" and np.all(raw["BOX_LABELS"][e] == -1)
    # bad frames are their own rows' errors, with padding outputs; the rest of the batch is answered
    assert raw[FRAME_ERROR][e + 1, 0].startswith(b"undecodable: ")
    assert raw[FRAME_ERROR][e + 3, 0].startswith(b"wrong_shape: ")
    assert answers[e + 1]["count"] == 0 and answers[e + 1]["readout"] == "" and answers[e + 1]["error"]
    assert np.all(raw["EMBEDDING"][e + 1] == 0) and np.all(raw["BOX_LABELS"][e + 1] == -1)
    assert answers[e + 2]["count"] == 2 and answers[e + 2]["error"] is None  # the JPEG frame


def _stats(client, name):
    raw = client.raw.get_inference_statistics(name, as_json=True)
    return sum(int(m.get("inference_count", 0)) for m in raw.get("model_stats", []))


def test_frames_without_boxes_skip_the_classifier_and_big_batches_are_chunked(server):
    frames = [_png(CELLS[3]) for _ in range(70)]  # 280 crops: more than the classifier's max batch (256)
    with server.client() as client:
        before = _stats(client, NAMES["classifier"])
        answers = client.infer_pipeline([_png([]), _png([])], model=PIPE.name)
        assert [a["count"] for a in answers] == [0, 0] and _stats(client, NAMES["classifier"]) == before
        answers = client.infer_pipeline(frames, model=PIPE.name)
        assert _stats(client, NAMES["classifier"]) == before + 4 * len(frames)
    ref = reference(server.files[1], frames[:1])[0]
    assert all(_matches(a, ref) for a in answers)


def test_malformed_request_is_that_request_s_error(server):
    with server.client() as client:
        with pytest.raises(TritonError, match="unexpected shape|must be BYTES"):
            client.infer(PIPE.name, {FRAME_INPUT: np.array([[_png([]), _png([])]], dtype=object)}, ["COUNT"])
        assert client.infer_pipeline([_png(CELLS[0])], model=PIPE.name)[0]["count"] == 1


def test_switching_pipeline_versions_under_load_never_mixes_members(server):
    frames = [_png(c) for c in CELLS]
    refs = {v: reference(server.files[v], frames) for v in VERSIONS}
    # every member differs between the versions: the detector's boxes and the classifier's scores
    assert all(not np.allclose(a["boxes"], b["boxes"]) and not np.allclose(a["label_scores"], b["label_scores"])
               for a, b in zip(refs[1], refs[2]))
    seen: list[int | None] = []
    failures: list[str] = []
    stop = threading.Event()

    def stream():
        with server.client(timeout=60) as client:
            while not stop.is_set():
                try:
                    got = client.infer_pipeline(frames, model=PIPE.name)
                except TritonError as exc:  # a request refused during the switch would be a failure too
                    failures.append(str(exc))
                    continue
                which = [v for v, ref in refs.items() if all(_matches(a, r) for a, r in zip(got, ref))]
                seen.append(which[0] if len(which) == 1 else None)

    def wait_for(version, timeout=60.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if seen and seen[-1] == version:
                n = len(seen)
                while len(seen) < n + 3 and time.monotonic() < deadline:
                    time.sleep(0.05)
                return
            time.sleep(0.05)
        raise AssertionError(f"version {version} never answered: {seen[-10:]}")

    thread = threading.Thread(target=stream, daemon=True)
    thread.start()
    try:
        with server.client() as client:
            wait_for(1)
            for old, new in ((1, 2), (2, 1)):  # switch, then back (the deploy's order both times)
                pr.set_pipeline_serving(server.repo, PIPE, new, keep_members={"detector": {old}, "classifier": {old}})
                _load(client, pipeline=False)
                assert client.ready_versions(NAMES["detector"]) == sorted({old, new})
                assert client.ready_versions(NAMES["classifier"]) == sorted({old, new})
                client.load_model(PIPE.name)
                assert client.ready_versions(PIPE.name) == [new]
                wait_for(new)
                pr.set_pipeline_serving(server.repo, PIPE, new)  # retire the old members
                _load(client, pipeline=False)
                assert client.ready_versions(NAMES["detector"]) == [new]
                assert client.ready_versions(NAMES["classifier"]) == [new]
                wait_for(new)
    finally:
        stop.set()
        thread.join(timeout=60)
    assert not failures, failures[:3]
    assert None not in seen, f"answers matching neither version's members: {seen.count(None)} of {len(seen)}"
    # the order of answers: 1s, then 2s, then 1s again (each request answered by exactly one version)
    runs = [v for i, v in enumerate(seen) if i == 0 or seen[i - 1] != v]
    assert runs == [1, 2, 1], runs


def test_a_built_in_detector_version_serves_through_the_pipeline(server, tmp_path):
    """tasks.model.detector's randomly initialised network, exported, as detector version 3 of pipeline version 3:
    the served answers are the host's (its tensor names and shapes are the rendered configs')."""
    import torch

    from tasks.model.detector import build_detector, export_detector_onnx

    torch.manual_seed(3)
    onnx = export_detector_onnx(build_detector(DET), tmp_path / "det3.onnx", DET)
    files = {"detector": onnx, "classifier": server.files[1]["classifier"]}
    pr.write_member_version(server.repo, DET, 3, onnx, pipeline=PIPE.name)
    pr.write_pipeline_version(server.repo, PIPE, SETTINGS.models_dir, 3, {"detector": 3, "classifier": 1})
    frames = [_png(c) for c in CELLS] + [encode_frame(scene(DET, [(9, 9)]), DET, "jpeg")]
    with server.client() as client:
        try:
            pr.set_pipeline_serving(server.repo, PIPE, 3, keep_members={"detector": {1}})
            _load(client)
            assert client.ready_versions(PIPE.name) == [3]
            answers = client.infer_pipeline(frames, model=PIPE.name)
            for i, (a, r) in enumerate(zip(answers, reference(files, frames))):
                assert _matches(a, r, tol=1e-4), f"frame {i}: {a} != {r}"
        finally:  # leave the module's server serving version 1
            pr.set_pipeline_serving(server.repo, PIPE, 1, keep_members={"detector": {3}})
            _load(client)
            pr.set_pipeline_serving(server.repo, PIPE, 1)
            _load(client, pipeline=False)
        assert client.ready_versions(NAMES["detector"]) == [1] and client.ready_versions(PIPE.name) == [1]
