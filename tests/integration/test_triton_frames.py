"""Triton decodes the frames: the real tritonserver serving two models of different shapes from one repository.

``digits`` (28x28 grayscale, PNG / raw, resize none) and ``shapes`` (48x48 RGB, JPEG / PNG, resize
stretch), each rendered from its spec with a classifier of its own shape (random weights). One request
per model mixes good frames, a corrupt one and one of another size: the good ones get exactly what the
host gets (``frames.decode_frame`` + ``networks.to_input`` + ONNX Runtime), a bad one its own
``FRAME_ERROR`` (the other rows are unaffected).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tasks.adapters.triton import TritonClient, TritonError
from tasks.config import load_settings
from tasks.contracts.serving import ENSEMBLE_OUTPUTS, FRAME_ERROR, FRAME_INPUT
from tasks.local.triton import LocalTriton
from tasks.model import frame_codec
from tasks.model import repo as mr
from tasks.model.frames import decode_frame, encode_frame
from tasks.model.networks import build_model, export_onnx, onnx_session, run_onnx, to_input

pytestmark = pytest.mark.integration
DIGITS = load_settings().model_spec("digits")
SHAPES = load_settings().model_spec("shapes")


def _random_classifier(spec, path: Path, seed: int = 0) -> Path:
    import torch

    torch.manual_seed(seed)
    return export_onnx(build_model(spec).eval(), path, spec)


@pytest.fixture(scope="module")
def two_models(tmp_path_factory):
    """A started LocalTriton serving ``digits`` and ``shapes``; yields ``(triton, {name: onnx path})``."""
    work = tmp_path_factory.mktemp("triton-frames")
    repo = work / "repo"
    onnx = {}
    for spec in (DIGITS, SHAPES):
        mr.render_repo("local", repo, spec)
        onnx[spec.name] = _random_classifier(spec, work / f"{spec.name}.onnx")
        mr.write_classifier_version(repo, spec, 1, onnx[spec.name])
        mr.set_serving_version(repo, spec, 1)
    mr.validate_repo(repo)
    triton = LocalTriton(repo, work / "logs", backend_dir=work / "backends", load_models=[DIGITS.name, SHAPES.name])
    triton.start(timeout=90)
    try:
        with triton.client() as client:
            for spec in (DIGITS, SHAPES):
                client.wait_model_ready(spec.name, timeout=90)
        yield triton, onnx
    finally:
        triton.stop()


def _image(shape: tuple[int, ...], seed: int) -> np.ndarray:
    """A deterministic uint8 image: a bright rectangle on a dark noisy background."""
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 40, size=shape, dtype=np.uint8)
    h, w = shape[:2]
    img[h // 4: h // 4 + h // 2, w // 3: w // 3 + w // 3] = 220
    return img


def _host(spec, onnx_path: Path, frame_list: list[bytes]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(labels, scores, embeddings) the host computes for ``frame_list``: the same decoder, then ONNX Runtime."""
    images = np.stack([decode_frame(f, spec) for f in frame_list])
    logits, emb = run_onnx(onnx_session(onnx_path), to_input(images, spec), spec)
    z = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs = z / z.sum(axis=1, keepdims=True)
    return logits.argmax(axis=1), probs.max(axis=1), emb


def _corrupt(frame: bytes) -> bytes:
    """The signature of ``frame``'s format, then garbage: sniffed as PNG / JPEG, undecodable."""
    return frame[:16] + b"\x00garbage" * 20


CASES = {
    # model: (good encodings, the other-size frame's expected outcome: a FRAME_ERROR reason, or None = predicted)
    "digits": (("png", "raw"), frame_codec.WRONG_SHAPE),
    "shapes": (("jpeg", "png"), None),
}


@pytest.mark.parametrize("protocol", ["grpc", "http"])
@pytest.mark.parametrize("spec", [DIGITS, SHAPES], ids=["digits", "shapes"])
def test_good_bad_and_other_size_frames_in_one_request(two_models, spec, protocol):
    triton, onnx = two_models
    encodings, other_size = CASES[spec.name]
    h, w = spec.input.height, spec.input.width
    good = [encode_frame(_image(spec.image_shape, seed=i), spec, enc) for i, enc in enumerate(encodings)]
    big = (h + 12, w + 20) + spec.image_shape[2:]
    other = encode_frame(_image(big, seed=7), spec, spec.image_encoding)
    request = [good[0], _corrupt(good[0]), good[1], other]

    with triton.client(protocol) as client:
        out = client.infer_frames(spec.name, request)
    n, k = len(request), min(3, spec.num_classes)
    assert set(out) == set(ENSEMBLE_OUTPUTS)
    assert {key: v.shape for key, v in out.items()} == {
        "LABEL": (n, 1), "SCORE": (n, 1), "TOPK_LABELS": (n, k), "TOPK_SCORES": (n, k),
        "EMBEDDING": (n, spec.embedding_dim), FRAME_ERROR: (n, 1)}
    errors = [bytes(e) for e in out[FRAME_ERROR].reshape(-1)]
    assert errors[0] == errors[2] == b""
    assert errors[1].startswith(b"undecodable: "), errors[1]

    used = [0, 2] + ([3] if other_size is None else [])
    if other_size is None:  # stretched to the spec's size, as the host's decoder does
        assert errors[3] == b""
        assert decode_frame(other, spec).shape == spec.image_shape
    else:
        assert errors[3].startswith(f"{other_size}: ".encode()), errors[3]
        assert f"expected {w}x{h}".encode() in errors[3]
    labels, scores, emb = _host(spec, onnx[spec.name], [request[i] for i in used])
    np.testing.assert_array_equal(out["LABEL"][used, 0], labels)
    np.testing.assert_allclose(out["SCORE"][used, 0], scores, atol=1e-4)
    np.testing.assert_allclose(out["EMBEDDING"][used], emb, atol=1e-4)
    np.testing.assert_array_equal(out["TOPK_LABELS"][used, 0], labels)


def test_a_full_batch_of_frames_is_one_request_and_a_malformed_request_is_an_error(two_models):
    triton, onnx = two_models
    spec = SHAPES
    frames = [encode_frame(_image(spec.image_shape, seed=i), spec) for i in range(mr.MAX_BATCH)]
    with triton.client() as client:
        out = client.infer(spec.name, {FRAME_INPUT: np.array(frames, dtype=object).reshape(-1, 1)},
                           ["LABEL", FRAME_ERROR])
        assert out["LABEL"].shape == (mr.MAX_BATCH, 1)
        assert not any(out[FRAME_ERROR].reshape(-1))
        labels, _, _ = _host(spec, onnx[spec.name], frames[:8])
        np.testing.assert_array_equal(out["LABEL"][:8, 0], labels)
        # not BYTES: refused by Triton for the request, naming the input
        with pytest.raises(TritonError, match=FRAME_INPUT):
            client.infer(spec.name, {FRAME_INPUT: np.zeros((1, 1), np.uint8)}, ["LABEL"])
        # the server is still fine
        assert client.infer_frames(spec.name, frames[:2])["LABEL"].shape == (2, 1)


def test_frames_above_max_batch_size_are_split(two_models):
    triton, _ = two_models
    spec = DIGITS
    frames = [encode_frame(_image(spec.image_shape, seed=i), spec) for i in range(5)]
    with TritonClient(triton.grpc_url, max_batch_size=2) as client, triton.client() as whole_client:
        split = client.infer_frames(spec.name, frames)
        whole = whole_client.infer_frames(spec.name, frames)
    assert split["LABEL"].shape == (5, 1)
    np.testing.assert_allclose(split["SCORE"], whole["SCORE"], atol=1e-6)
