"""The one frame decoder (tasks/model/frame_codec.py), shared by Triton's preprocess model and the host.

Each dead-letter reason, the resize policies, grayscale / RGB conversion, raw frames, normalisation, and that
its reason strings (repeated there on purpose: the file stands alone in the model repository) are the ones of
``tasks.contracts.messages``.
"""

from __future__ import annotations

import ast
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tasks.config import load_settings
from tasks.contracts import messages
from tasks.model import frame_codec
from tasks.model.frame_codec import FrameError, decode, encode, encoding_of, normalise
from tasks.model.frames import codec_params


@pytest.fixture(scope="module")
def digits():
    return codec_params(load_settings().model_spec("digits"))


@pytest.fixture(scope="module")
def shapes():
    return codec_params(load_settings().model_spec("shapes"))


def _reason(payload: bytes, params) -> tuple[str, str]:
    with pytest.raises(FrameError) as info:
        decode(payload, params)
    return info.value.reason, info.value.detail


def _png(arr: np.ndarray, mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr, mode).save(buf, "PNG") if mode else Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


def test_reason_strings_are_the_dead_letter_reasons():
    assert frame_codec.EMPTY == messages.R_EMPTY
    assert frame_codec.OVERSIZE == messages.R_OVERSIZE
    assert frame_codec.UNDECODABLE == messages.R_UNDECODABLE
    assert frame_codec.WRONG_SHAPE == messages.R_WRONG_SHAPE
    assert frame_codec.UNSUPPORTED == messages.R_UNSUPPORTED
    for name in ("EMPTY", "OVERSIZE", "UNDECODABLE", "WRONG_SHAPE", "UNSUPPORTED"):
        assert getattr(frame_codec, name) in messages.DLQ_REASONS


def test_the_codec_stands_alone():
    """Copied into Triton's model repository: it may import the stdlib, NumPy and Pillow only."""
    tree = ast.parse(Path(frame_codec.__file__).read_text())
    roots = {(n.module or "").split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    roots |= {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert "tasks" not in roots and roots <= {"__future__", "io", "typing", "numpy", "PIL"}, roots


def test_each_reason(digits, shapes):
    img = np.full((28, 28), 9, np.uint8)
    assert _reason(b"", digits)[0] == "empty"
    reason, detail = _reason(b"\x89PNG\r\n\x1a\n" + bytes(digits["max_frame_bytes"]), digits)
    assert reason == "oversize" and str(digits["max_frame_bytes"]) in detail
    reason, detail = _reason(b"GIF89a" + bytes(100), digits)
    assert reason == "undecodable" and "raw (784 bytes)" in detail  # names what would be accepted
    good = encode(img, "png")
    assert _reason(good[:40] + bytes(len(good) - 52) + good[-12:], digits)[0] == "undecodable"  # body broken
    noisy = encode(np.random.default_rng(0).integers(0, 256, (28, 28), dtype=np.uint8), "png")
    assert _reason(noisy[:len(noisy) // 2], digits)[0] == "undecodable"  # truncated
    reason, detail = _reason(encode(np.zeros((48, 48, 3), np.uint8), "jpeg"), digits)
    assert reason == "unsupported_content_type" and "png, raw" in detail
    assert _reason(img.tobytes(), shapes)[0] == "undecodable"  # shapes takes no raw pixels
    reason, detail = _reason(encode(np.zeros((32, 28), np.uint8), "png"), digits)  # resize: none
    assert (reason, detail) == ("wrong_shape", "image is 28x32, expected 28x28")
    reason, detail = _reason(encode(np.zeros((28, 28, 3), np.uint8), "png"), digits)
    assert reason == "wrong_shape" and "mode is RGB, expected 8-bit grayscale" in detail
    buf = io.BytesIO()
    frames = [Image.fromarray(np.full((28, 28), v, np.uint8)) for v in (0, 255)]
    frames[0].save(buf, "PNG", save_all=True, append_images=frames[1:])
    assert _reason(buf.getvalue(), digits) == ("wrong_shape", "animated / multi-frame images are not accepted")


def test_encoding_of_is_cheap_and_checks_the_accepted_encodings(digits, shapes):
    img = np.zeros((28, 28), np.uint8)
    assert encoding_of(encode(img, "png"), digits) == "png"
    assert encoding_of(img.tobytes(), digits) == "raw"
    assert encoding_of(encode(np.zeros((48, 48, 3), np.uint8), "jpeg"), shapes) == "jpeg"
    # a PNG whose body is garbage passes: only the magic bytes are looked at
    assert encoding_of(b"\x89PNG\r\n\x1a\n" + b"garbage", digits) == "png"
    with pytest.raises(FrameError) as info:
        encoding_of(img.tobytes()[:-1], digits)
    assert info.value.reason == "undecodable" and "not 784 bytes" in info.value.detail


def test_raw_frames_are_the_pixels_row_major(digits):
    img = np.arange(784, dtype=np.uint8).reshape(28, 28)
    out = decode(img.tobytes(), digits)
    assert out.dtype == np.uint8 and out.shape == (28, 28) and np.array_equal(out, img)
    assert encode(img, "raw") == img.tobytes()
    rgb = {**digits, "channels": 3, "raw_bytes": 28 * 28 * 3}
    colour = np.arange(28 * 28 * 3, dtype=np.uint32).astype(np.uint8).reshape(28, 28, 3)
    assert np.array_equal(decode(colour.tobytes(), rgb), colour)


def test_any_png_encoder_s_output_decodes(digits):
    img = np.random.default_rng(2).integers(0, 256, (28, 28), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img, "L").save(buf, "PNG", optimize=True)  # other encoder settings than ours
    assert buf.getvalue() != encode(img, "png") and np.array_equal(decode(buf.getvalue(), digits), img)


def test_grayscale_and_rgb_conversion(shapes):
    grey = np.full((48, 48), 77, np.uint8)
    out = decode(encode(grey, "png"), shapes)  # a grey image for a colour model: three equal channels
    assert out.shape == (48, 48, 3) and (out == 77).all()
    rgba = np.zeros((48, 48, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 10
    out = decode(_png(rgba, "RGBA"), shapes)  # the alpha channel is dropped, not blended
    assert out.shape == (48, 48, 3) and (out[..., 0] == 200).all() and (out[..., 1:] == 0).all()
    palette = Image.fromarray(np.full((48, 48, 3), (10, 20, 30), np.uint8)).convert("P", palette=Image.ADAPTIVE)
    buf = io.BytesIO()
    palette.save(buf, "PNG")
    assert tuple(decode(buf.getvalue(), shapes)[5, 5]) == (10, 20, 30)
    colour = np.zeros((48, 48, 3), np.uint8)
    colour[..., 2] = 180
    out = decode(encode(colour, "jpeg"), shapes)
    assert np.abs(out.astype(int) - colour).max() <= 3  # JPEG at quality 90, no chroma subsampling


def test_resize_policies(shapes):
    big = np.zeros((96, 96, 3), np.uint8)
    big[:, :48] = 255  # left half white
    out = decode(encode(big, "png"), shapes)  # stretch
    assert out.shape == (48, 48, 3) and (out[:, :20] == 255).all() and (out[:, 28:] == 0).all()
    wide = np.full((24, 96, 3), 255, np.uint8)
    boxed = decode(encode(wide, "png"), {**shapes, "resize": "letterbox"})
    assert boxed.shape == (48, 48, 3)
    assert (boxed[:18] == 0).all() and (boxed[30:] == 0).all() and (boxed[18:30] == 255).all()  # 48x12, centred
    stretched = decode(encode(wide, "png"), shapes)
    assert (stretched == 255).all()  # stretch fills the frame
    same = np.random.default_rng(1).integers(0, 256, (48, 48, 3), dtype=np.uint8)
    assert np.array_equal(decode(encode(same, "png"), shapes), same)  # the right size is never resampled
    with pytest.raises(FrameError) as info:
        decode(encode(wide, "png"), {**shapes, "resize": "none"})
    assert (info.value.reason, info.value.detail) == ("wrong_shape", "image is 96x24, expected 48x48")


def test_normalise_gives_the_spec_s_layout_and_values(digits, shapes):
    imgs = np.stack([np.full((28, 28), v, np.uint8) for v in (0, 255)])
    x = normalise(imgs, digits)
    assert x.dtype == np.float32 and x.shape == (2, 1, 28, 28)
    assert x[0].max() == 0.0 and np.allclose(x[1], 1.0)
    colour = np.zeros((1, 48, 48, 3), np.uint8)
    colour[..., 1] = 51
    params = {**shapes, "mean": [0.0, 0.1, 0.0], "std": [1.0, 0.5, 1.0]}
    nchw = normalise(colour, params)
    assert nchw.shape == (1, 3, 48, 48) and np.allclose(nchw[0, 1], (0.2 - 0.1) / 0.5)
    assert np.allclose(nchw[0, 0], 0.0)
    nhwc = normalise(colour, {**params, "layout": "NHWC"})
    assert nhwc.shape == (1, 48, 48, 3) and np.allclose(nhwc[0, :, :, 1], (0.2 - 0.1) / 0.5)


def test_encode_is_deterministic_and_names_unknown_encodings():
    img = np.random.default_rng(0).integers(0, 256, (48, 48, 3), dtype=np.uint8)
    for enc in ("png", "jpeg", "raw"):
        assert encode(img, enc) == encode(img, enc)
    with pytest.raises(ValueError, match="unknown encoding 'gif'"):
        encode(img, "gif")


def test_check_params_names_the_missing_keys(digits):
    assert frame_codec.check_params(digits) is digits
    with pytest.raises(ValueError, match=r"miss \['resize'\]"):
        frame_codec.check_params({k: v for k, v in digits.items() if k != "resize"})
