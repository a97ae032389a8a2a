"""Frame values for a model spec: the cheap checks the host makes before a frame goes to Triton
(``check_frame``: size, content type, magic bytes), the full decoder for the host's own readers
(``decode_frame``, exactly what Triton's preprocess model does: both run ``tasks.model.frame_codec``), the
encoder of producers (``encode_frame``) and the content type of each encoding (``content_type_of``).

``encode_png`` / ``decode_png`` are the plain grayscale PNG helpers of the data drops (any size, no spec).
"""

from __future__ import annotations

import io
from typing import TYPE_CHECKING

from tasks.contracts.messages import (OCTET_STREAM, R_UNDECODABLE, R_UNSUPPORTED, R_WRONG_SHAPE, RAW_CONTENT_TYPES,
                                      FrameRejected, media_type)

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np

    from tasks.contracts.spec import ModelSpec


def encode_png(image: "np.ndarray") -> bytes:
    """A uint8 ``[H, W]`` array as an 8-bit grayscale PNG, deterministic (same pixels, same bytes): the
    images of the digits drops (``encode_frame(image, spec, "png")`` for any spec)."""
    from tasks.model import frame_codec

    if image.ndim != 2:
        raise ValueError(f"encode_png takes a grayscale [H, W] image (got shape {image.shape}); "
                         "use encode_frame for colour images")
    return frame_codec.encode(image, "png")


def decode_png(data: bytes) -> "np.ndarray":
    """PNG bytes -> uint8 array ``[H, W]`` of any size; ``ValueError`` when undecodable or not 8-bit
    grayscale. (A frame value goes through :func:`decode_frame`, which also checks the model's contract.)"""
    import numpy as np
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            if im.mode != "L":
                raise ValueError(f"image mode {im.mode}, expected 8-bit grayscale (L)")
            return np.asarray(im, dtype=np.uint8).copy()
    except ValueError:
        raise
    except Exception as exc:  # noqa: BLE001 - PIL raises many types for bad bytes
        raise ValueError(f"not a decodable PNG: {exc}") from None


# =============================================================================== spec-driven frames
# (the decoder itself is tasks.model.frame_codec, shared with Triton's preprocess model)

#: content types per encoding (a frame's ``content-type`` header, the gateway's Content-Type)
CONTENT_TYPES = {"png": ("image/png",), "jpeg": ("image/jpeg", "image/jpg"),
                 "raw": ("application/x-raw-uint8", *sorted(RAW_CONTENT_TYPES - {"application/x-raw-uint8"}))}


def codec_params(spec: "ModelSpec", max_frame_bytes: int | None = None) -> dict:
    """The ``tasks.model.frame_codec`` parameters of ``spec`` (``max_frame_bytes`` overrides the spec's limit)."""
    inp, fr, pre = spec.input, spec.frames, spec.preprocessing
    return {"height": inp.height, "width": inp.width, "channels": inp.channels, "layout": inp.layout,
            "encodings": list(fr.encodings), "raw_bytes": fr.raw_bytes,
            "max_frame_bytes": int(max_frame_bytes or fr.max_frame_bytes), "resize": pre.resize,
            "scale": pre.normalisation.scale, "mean": list(pre.normalisation.mean),
            "std": list(pre.normalisation.std)}


_last_params: tuple = (None, None, {})  # (spec, max_frame_bytes, params) of the last call: frames come in streams


def _params(spec: "ModelSpec", max_frame_bytes: int | None) -> dict:
    """``codec_params``, made once per spec and limit (the tuple is swapped whole: safe across threads)."""
    global _last_params
    last = _last_params
    if last[0] is not spec or last[1] != max_frame_bytes:
        last = _last_params = (spec, max_frame_bytes, codec_params(spec, max_frame_bytes))
    return last[2]


def accepted_content_types(spec: "ModelSpec") -> list[str]:
    """The content types a frame of ``spec`` may declare (the first of each accepted encoding)."""
    return [CONTENT_TYPES[e][0] for e in spec.frames.encodings]


def check_frame(payload: bytes | None, content_type: str | None, spec: "ModelSpec",
                max_frame_bytes: int | None = None) -> str:
    """Cheap checks of a frame for ``spec`` (no decoding), in this order: not empty and not above the size limit
    (``max_frame_bytes``, default the spec's), a content type the spec accepts (none and
    ``application/octet-stream`` are sniffed), magic bytes of an accepted encoding that agree with the
    content type (raw: no magic and exactly ``frames.raw_bytes``). Returns the encoding (``png``, ``jpeg``,
    ``raw``); raises ``FrameRejected`` (``empty``, ``oversize``, ``unsupported_content_type``,
    ``wrong_shape`` for a raw frame of another size, ``undecodable``) naming the problem. Whether the image
    itself decodes (and its size) is found by Triton's preprocess model, or ``decode_frame`` on the host."""
    from tasks.model import frame_codec

    encodings = spec.frames.encodings
    mtype = media_type(content_type)
    declared = None
    if mtype and mtype != OCTET_STREAM:
        declared = next((e for e, types in CONTENT_TYPES.items() if mtype in types), None)
    try:
        enc: str | None = frame_codec.encoding_of(payload or b"", _params(spec, max_frame_bytes))
        error = None
    except frame_codec.FrameError as exc:
        if exc.reason in (frame_codec.EMPTY, frame_codec.OVERSIZE):
            raise FrameRejected(exc.reason, exc.detail) from None
        enc, error = None, exc
    if mtype and mtype != OCTET_STREAM and declared not in encodings:  # unknown (None) or not this model's
        raise FrameRejected(R_UNSUPPORTED, f"content-type {mtype!r} is not accepted by model {spec.name!r} "
                                           f"(send {', '.join(accepted_content_types(spec))})")
    if error is not None:
        if declared == "raw" and frame_codec.sniff(payload or b"") is None:
            inp = spec.input
            raise FrameRejected(R_WRONG_SHAPE, f"raw frame is {len(payload or b'')} bytes, expected "
                                               f"{spec.frames.raw_bytes} ({inp.height}x{inp.width}x{inp.channels} "
                                               "uint8, row-major)")
        raise FrameRejected(error.reason, error.detail) from None
    if declared is not None and declared != enc:
        raise FrameRejected(R_UNDECODABLE, f"content-type {mtype!r} but the bytes are "
                                           f"{'raw pixels' if enc == 'raw' else str(enc).upper()}")
    return str(enc)


def decode_frame(payload: bytes | None, spec: "ModelSpec", content_type: str | None = None,
                 max_frame_bytes: int | None = None) -> "np.ndarray":
    """A frame value -> uint8 image of ``spec`` (``spec.image_shape``), decoded and resized as Triton's
    preprocess model does; ``FrameRejected`` when it cannot be used."""
    from tasks.model import frame_codec

    check_frame(payload, content_type, spec, max_frame_bytes)
    try:
        return frame_codec.decode(payload or b"", _params(spec, max_frame_bytes))
    except frame_codec.FrameError as exc:
        raise FrameRejected(exc.reason, exc.detail) from None


def encode_frame(image: "np.ndarray", spec: "ModelSpec", encoding: str | None = None) -> bytes:
    """A uint8 image as a frame of ``spec``: ``encoding`` or the spec's ``image_encoding`` (the first encoded
    format of ``frames.encodings``); deterministic. ``content_type_of(encoding)`` is the header to send with it."""
    from tasks.model import frame_codec

    return frame_codec.encode(image, encoding or spec.image_encoding)


def content_type_of(encoding: str) -> str:
    """The ``content-type`` of a frame of ``encoding``."""
    return CONTENT_TYPES[encoding][0]
