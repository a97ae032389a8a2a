"""tasks.model.frames: the plain grayscale PNG helpers, and the spec-driven frame functions around the one codec
(check_frame's cheap checks, decode_frame, encode_frame, content types)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from tasks.config import load_settings
from tasks.contracts.messages import FrameRejected
from tasks.model import frame_codec, frames


@pytest.mark.parametrize("shape", [(28, 28), (32, 32), (5, 9)])
def test_encode_decode_round_trip_any_size(shape):
    img = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    data = frames.encode_png(img)
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    out = frames.decode_png(data)
    assert out.dtype == np.uint8 and out.shape == shape and np.array_equal(out, img)
    assert frames.encode_png(img) == data  # deterministic: same pixels, same bytes


def test_encode_png_is_the_codec_s_png():
    img = np.arange(784, dtype=np.uint8).reshape(28, 28)
    assert frames.encode_png(img) == frame_codec.encode(img, "png")  # same bytes: drops keep their digests
    with pytest.raises(ValueError, match="grayscale"):
        frames.encode_png(np.zeros((4, 4, 3), np.uint8))


@pytest.mark.parametrize("model", ["digits", "shapes"])
def test_frames_of_a_spec_round_trip(model):
    spec = load_settings().model_spec(model)
    img = np.random.default_rng(3).integers(0, 256, spec.image_shape, dtype=np.uint8)
    for enc in spec.frames.encodings:
        data = frames.encode_frame(img, spec, enc)
        ctype = frames.content_type_of(enc)
        assert frames.check_frame(data, ctype, spec) == enc
        assert frames.check_frame(data, None, spec) == enc  # no content type: told by the bytes
        out = frames.decode_frame(data, spec, ctype)
        assert out.shape == spec.image_shape and out.dtype == np.uint8
        if enc != "jpeg":
            assert np.array_equal(out, img)
    assert frames.encode_frame(img, spec) == frames.encode_frame(img, spec, spec.image_encoding)
    assert frames.accepted_content_types(spec) == [frames.content_type_of(e) for e in spec.frames.encodings]


def test_check_frame_order_and_messages():
    digits = load_settings().model_spec("digits")
    png = frames.encode_frame(np.zeros((28, 28), np.uint8), digits, "png")

    def reason(payload, ctype, limit=None):
        with pytest.raises(FrameRejected) as info:
            frames.check_frame(payload, ctype, digits, limit)
        return info.value.reason, info.value.detail

    assert reason(b"", "text/plain")[0] == "empty"  # empty and oversize come before the content type
    limit = len(png) - 1
    assert reason(png, "text/plain", limit) == ("oversize", f"frame is {len(png)} bytes, the limit is {limit}")
    assert reason(png, "text/plain") == ("unsupported_content_type", ("content-type 'text/plain' is not accepted "
                                         "by model 'digits' (send image/png, application/x-raw-uint8)"))
    assert reason(png, "image/jpeg")[0] == "unsupported_content_type"  # a known type, not this model's
    assert reason(png, "application/x-raw-uint8") == (
        "undecodable", "content-type 'application/x-raw-uint8' but the bytes are PNG")
    assert reason(bytes(700), "application/x-raw-uint8") == (
        "wrong_shape", "raw frame is 700 bytes, expected 784 (28x28x1 uint8, row-major)")
    assert reason(bytes(700), None)[0] == "undecodable"  # without a content type it is no frame at all
    assert frames.check_frame(bytes(784), "application/octet-stream", digits) == "raw"
    assert frames.check_frame(png, "image/png; charset=binary", digits) == "png"  # parameters ignored
    # check_frame never decodes: a broken body passes (Triton's preprocess model finds it), decode_frame not
    broken = png[:40] + bytes(len(png) - 52) + png[-12:]
    assert frames.check_frame(broken, "image/png", digits) == "png"
    with pytest.raises(FrameRejected) as info:
        frames.decode_frame(broken, digits, "image/png")
    assert info.value.reason == "undecodable"


def test_decode_errors_are_value_errors():
    with pytest.raises(ValueError, match="not a decodable PNG"):
        frames.decode_png(b"definitely not a png")
    buf = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buf, "PNG")
    with pytest.raises(ValueError, match="mode RGB, expected 8-bit grayscale"):
        frames.decode_png(buf.getvalue())
