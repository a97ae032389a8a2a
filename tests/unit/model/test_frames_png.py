"""The one PNG encoder / plain decoder (tasks.model.frames), shared by drops, producers and tests."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from tasks.model import frames
from tasks.steps import drops


@pytest.mark.parametrize("shape", [(28, 28), (32, 32), (5, 9)])
def test_encode_decode_round_trip_any_size(shape):
    img = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    data = frames.encode_png(img)
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    out = frames.decode_png(data)
    assert out.dtype == np.uint8 and out.shape == shape and np.array_equal(out, img)
    assert frames.encode_png(img) == data  # deterministic: same pixels, same bytes


def test_frame_decoder_reads_the_encoder_output():
    img = np.arange(784, dtype=np.uint8).reshape(28, 28)
    assert np.array_equal(frames.decode_image(frames.encode_png(img), "image/png"), img)


def test_drops_uses_the_same_functions():
    assert drops.encode_png is frames.encode_png and drops.decode_png is frames.decode_png


def test_decode_errors_are_value_errors():
    with pytest.raises(ValueError, match="not a decodable PNG"):
        frames.decode_png(b"definitely not a png")
    buf = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buf, "PNG")
    with pytest.raises(ValueError, match="mode RGB, expected 8-bit grayscale"):
        frames.decode_png(buf.getvalue())
