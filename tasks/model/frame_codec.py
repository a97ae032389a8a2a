"""One frame decoder for both sides: Triton's preprocess model and the host (monitor, tests, tools).

This module imports only the standard library, NumPy and Pillow (never ``tasks``): the model
repository renderer copies it next to the preprocess model (``preprocess/1/frame_codec.py``), so the
server decodes exactly as the host does. Its parameters are a plain dict (``CodecParams``), made from a
model spec by ``tasks.model.frames.codec_params`` and carried in the preprocess model's
``config.pbtxt`` as JSON (parameter ``codec``).

``decode`` turns one encoded frame (PNG, JPEG or raw pixels) into a uint8 image of the spec's size:
``[H, W]`` for one channel, ``[H, W, 3]`` for three, resized as the spec says (``none``: another size
is ``wrong_shape``; ``stretch``; ``letterbox``: aspect kept, padded with 0). ``normalise`` turns a
batch of those into the float32 model input (``(pixel * scale - mean) / std``, the spec's layout).
A frame that cannot be used raises ``FrameError(reason, detail)``; ``reason`` is one of the
dead-letter reasons of ``tasks.contracts.messages`` (the strings are repeated here on purpose:
this file must stand alone; ``tests/unit/model/test_frame_codec.py`` checks they agree).
"""

from __future__ import annotations

import io
from typing import Any, Mapping

import numpy as np

# dead-letter reasons (tasks.contracts.messages)
EMPTY = "empty"
OVERSIZE = "oversize"
UNDECODABLE = "undecodable"
WRONG_SHAPE = "wrong_shape"
UNSUPPORTED = "unsupported_content_type"

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
JPEG_MAGIC = b"\xff\xd8\xff"
#: the keys of a codec parameter dict (all required)
PARAM_KEYS = ("height", "width", "channels", "layout", "encodings", "raw_bytes", "max_frame_bytes", "resize",
              "scale", "mean", "std")

CodecParams = Mapping[str, Any]


class FrameError(ValueError):
    """A frame that can never be processed: ``reason`` (a dead-letter reason) and a human ``detail``."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def check_params(params: CodecParams) -> CodecParams:
    missing = [k for k in PARAM_KEYS if k not in params]
    if missing:
        raise ValueError(f"frame codec parameters miss {missing} (have {sorted(params)})")
    return params


def sniff(payload: bytes) -> str | None:
    """``png`` / ``jpeg`` from the magic bytes, else None."""
    if payload[:8] == PNG_MAGIC:
        return "png"
    if payload[:3] == JPEG_MAGIC:
        return "jpeg"
    return None


def encoding_of(payload: bytes, params: CodecParams) -> str:
    """The encoding of ``payload`` by its magic bytes (``raw``: no magic and exactly ``raw_bytes``), checked
    against the accepted encodings; ``FrameError`` otherwise. Cheap: no decoding."""
    if not payload:
        raise FrameError(EMPTY, "frame value is empty")
    if len(payload) > params["max_frame_bytes"]:
        raise FrameError(OVERSIZE, f"frame is {len(payload)} bytes, the limit is {params['max_frame_bytes']}")
    accepted = list(params["encodings"])
    enc = sniff(payload)
    if enc is None:
        raw = params.get("raw_bytes")
        if "raw" in accepted and raw and len(payload) == raw:
            return "raw"
        want = ", ".join(e if e != "raw" else f"raw ({raw} bytes)" for e in accepted)
        raise FrameError(UNDECODABLE, f"not a {want} frame: no PNG/JPEG signature"
                         + (f" and not {raw} bytes" if "raw" in accepted else ""))
    if enc not in accepted:
        raise FrameError(UNSUPPORTED, f"{enc.upper()} frames are not accepted by this model (accepted: "
                         f"{', '.join(accepted)})")
    return enc


def _resize(im: Any, params: CodecParams) -> Any:
    from PIL import Image

    h, w = params["height"], params["width"]
    if h is None or w is None or im.size == (w, h):
        return im
    mode = params["resize"]
    if mode == "none":
        raise FrameError(WRONG_SHAPE, f"image is {im.size[0]}x{im.size[1]}, expected {w}x{h}")
    if mode == "stretch":
        return im.resize((w, h), Image.BILINEAR)
    scale = min(w / im.size[0], h / im.size[1])  # letterbox
    nw, nh = max(1, round(im.size[0] * scale)), max(1, round(im.size[1] * scale))
    canvas = Image.new(im.mode, (w, h), 0)
    canvas.paste(im.resize((nw, nh), Image.BILINEAR), ((w - nw) // 2, (h - nh) // 2))
    return canvas


def decode(payload: bytes, params: CodecParams) -> np.ndarray:
    """One frame -> uint8 ``[H, W]`` (1 channel) or ``[H, W, 3]``, resized per ``params``; ``FrameError`` when
    it cannot be used. A grayscale model takes only 8-bit grayscale images; a colour model converts
    grayscale / palette images to RGB (an alpha channel is dropped)."""
    from PIL import Image, UnidentifiedImageError

    enc = encoding_of(payload, params)
    h, w, c = params["height"], params["width"], params["channels"]
    if enc == "raw":
        arr = np.frombuffer(payload, dtype=np.uint8)
        return arr.reshape((h, w) if c == 1 else (h, w, c)).copy()
    try:
        with Image.open(io.BytesIO(payload)) as im:
            if getattr(im, "n_frames", 1) != 1:
                raise FrameError(WRONG_SHAPE, "animated / multi-frame images are not accepted")
            im.load()
            if c == 1:
                if im.mode != "L":
                    raise FrameError(WRONG_SHAPE, f"image mode is {im.mode}, expected 8-bit grayscale (L)")
                out = im
            else:
                out = im if im.mode == "RGB" else im.convert("RGB")
            out = _resize(out, params)
            return np.asarray(out, dtype=np.uint8).copy()
    except FrameError:
        raise
    except UnidentifiedImageError:
        raise FrameError(UNDECODABLE, f"not a decodable {enc.upper()} image") from None
    except Exception as exc:  # noqa: BLE001 - any decoder failure is a property of the bytes
        raise FrameError(UNDECODABLE, f"{enc.upper()} image is corrupt or truncated "
                                      f"({type(exc).__name__}: {exc})") from None


def image_shape(params: CodecParams) -> tuple[int, ...]:
    """The uint8 shape ``decode`` gives for ``params``: ``(H, W)`` for 1 channel, else ``(H, W, C)``."""
    h, w, c = params["height"], params["width"], params["channels"]
    return (h, w) if c == 1 else (h, w, c)


def decode_batch(frames: Any, params: CodecParams) -> tuple[np.ndarray, np.ndarray]:
    """Every frame of a batch -> uint8 images ``[N, *image_shape(params)]`` and the errors, object ``[N, 1]``:
    ``b""`` for a frame that was used, ``b"<reason>: <detail>"`` (a dead-letter reason) for one that was not,
    whose pixels stay zero. A bad frame is that row's error, never the batch's."""
    images = np.zeros((len(frames), *image_shape(params)), dtype=np.uint8)
    errors = np.full((len(frames), 1), b"", dtype=object)
    for j, payload in enumerate(frames):
        try:
            images[j] = decode(payload, params)
        except FrameError as exc:
            errors[j, 0] = f"{exc.reason}: {exc.detail}".encode()
        except Exception as exc:  # noqa: BLE001 - a frame that breaks the decoder is that frame's problem
            errors[j, 0] = f"{UNDECODABLE}: {type(exc).__name__}: {exc}".encode()
    return images, errors


def normalise(images: np.ndarray, params: CodecParams) -> np.ndarray:
    """uint8 ``[N, H, W]`` / ``[N, H, W, C]`` -> float32 model input in the params' layout."""
    arr = np.asarray(images)
    if arr.ndim == 3:
        arr = arr[:, :, :, None]
    if params["layout"] == "NCHW":
        arr = arr.transpose(0, 3, 1, 2)
        axis: tuple[int, ...] = (1, -1, 1, 1)
    else:
        axis = (1, 1, 1, -1)
    x = arr.astype(np.float32) * np.float32(params["scale"])
    mean, std = list(params["mean"]), list(params["std"])
    if any(m != 0.0 for m in mean) or any(s != 1.0 for s in std):
        x = (x - np.asarray(mean, np.float32).reshape(axis)) / np.asarray(std, np.float32).reshape(axis)
    return np.ascontiguousarray(x, dtype=np.float32)


def encode(image: np.ndarray, encoding: str, quality: int = 90) -> bytes:
    """uint8 ``[H, W]`` / ``[H, W, 3]`` -> PNG / JPEG bytes (deterministic) or the raw pixels."""
    from PIL import Image

    arr = np.ascontiguousarray(image, dtype=np.uint8)
    if encoding == "raw":
        return arr.tobytes()
    im = Image.fromarray(arr, "L" if arr.ndim == 2 else "RGB")
    buf = io.BytesIO()
    if encoding == "png":
        im.save(buf, "PNG", optimize=False, compress_level=6)
    elif encoding == "jpeg":
        im.save(buf, "JPEG", quality=quality, optimize=False, subsampling=0)
    else:
        raise ValueError(f"unknown encoding {encoding!r} (png, jpeg, raw)")
    return buf.getvalue()
