"""Frame values to pixels and back: the decoder every reader of ``frames`` shares (consumer, gateway, monitor),
and the one PNG encoder / plain PNG decoder (drops, producers, tests)."""

from __future__ import annotations

import io
import struct
from typing import TYPE_CHECKING

from tasks.contracts.messages import (DEFAULT_MAX_FRAME_BYTES, IMAGE_SIZE, OCTET_STREAM, R_EMPTY, R_OVERSIZE,
                                      R_UNDECODABLE, R_UNSUPPORTED, R_WRONG_SHAPE, RAW_BYTES, RAW_CONTENT_TYPES,
                                      FrameRejected, media_type)

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np


_PNG_SIG = b"\x89PNG\r\n\x1a\n"
_IHDR = struct.Struct(">I4sIIBBBBB")
_CHUNK = struct.Struct(">I4s")


def _png_fast(payload: bytes) -> bytes | None:
    """Pixels of an 8-bit grayscale, non-interlaced 28x28 PNG (the common case), else None.

    Skips PIL's generic loader (2x faster): the IDAT stream goes straight to
    PIL's PNG ("zip") decoder. zlib's checksum catches corrupted data.
    """
    from PIL import Image

    if len(payload) < 45 or not payload.startswith(_PNG_SIG):
        return None
    length, ctype, width, height, depth, color, _comp, _filt, interlace = _IHDR.unpack_from(payload, 8)
    if ctype != b"IHDR" or depth != 8 or color != 0 or interlace != 0:
        return None
    if width != IMAGE_SIZE or height != IMAGE_SIZE:
        raise FrameRejected(R_WRONG_SHAPE, f"image is {width}x{height}, expected {IMAGE_SIZE}x{IMAGE_SIZE}")
    pos = 8 + 12 + length
    idat: list[bytes] = []
    end = len(payload)
    while pos + 8 <= end:
        length, ctype = _CHUNK.unpack_from(payload, pos)
        if ctype == b"IDAT":
            idat.append(payload[pos + 8:pos + 8 + length])
        elif ctype == b"IEND":
            break
        pos += 12 + length
    if not idat:
        raise FrameRejected(R_UNDECODABLE, "PNG has no image data (IDAT)")
    try:
        return Image.frombytes("L", (IMAGE_SIZE, IMAGE_SIZE), b"".join(idat), "zip", "L").tobytes()
    except (ValueError, OSError) as exc:
        raise FrameRejected(R_UNDECODABLE, f"PNG image data is corrupt or truncated ({exc})") from exc


def _image_generic(payload: bytes) -> bytes:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(payload)) as im:
            if im.size != (IMAGE_SIZE, IMAGE_SIZE):
                raise FrameRejected(R_WRONG_SHAPE, f"image is {im.size[0]}x{im.size[1]}, "
                                                   f"expected {IMAGE_SIZE}x{IMAGE_SIZE}")
            if im.mode != "L":
                raise FrameRejected(R_WRONG_SHAPE, f"image mode is {im.mode}, expected 8-bit grayscale (L)")
            if getattr(im, "n_frames", 1) != 1:
                raise FrameRejected(R_WRONG_SHAPE, "animated / multi-frame images are not accepted")
            im.load()
            return im.tobytes()
    except FrameRejected:
        raise
    except UnidentifiedImageError:
        raise FrameRejected(R_UNDECODABLE, "not a decodable image: the format is not recognised "
                                           "(send PNG, or application/x-raw-uint8 with 784 bytes)") from None
    except (OSError, ValueError, SyntaxError, struct.error) as exc:
        raise FrameRejected(R_UNDECODABLE, f"not a decodable image ({type(exc).__name__}: {exc})") from exc
    except Exception as exc:  # noqa: BLE001 - any decoder failure is a property of the bytes
        raise FrameRejected(R_UNDECODABLE, f"image decoder failed ({type(exc).__name__}: {exc})") from exc


def decode_pixels(payload: bytes | None, content_type: str | None = None,
                  max_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> bytes:
    """The 784 uint8 pixels (row-major) of a frame value, or ``FrameRejected``.

    ``application/x-raw-uint8``: exactly 784 raw bytes. ``application/octet-stream``:
    raw when exactly 784 bytes, otherwise an image file. ``image/*`` or no
    content type: an image file (PNG fast path; anything PIL reads), which
    must be 28x28, 8-bit grayscale, one frame. Other types are rejected.
    """
    if not payload:
        raise FrameRejected(R_EMPTY, "frame value is empty")
    if len(payload) > max_bytes:
        raise FrameRejected(R_OVERSIZE, f"frame is {len(payload)} bytes, the limit is {max_bytes}")
    mtype = media_type(content_type)
    if mtype in RAW_CONTENT_TYPES or (mtype == OCTET_STREAM and len(payload) == RAW_BYTES):
        if len(payload) != RAW_BYTES:
            raise FrameRejected(R_WRONG_SHAPE, f"raw frame is {len(payload)} bytes, expected {RAW_BYTES} "
                                               f"({IMAGE_SIZE}x{IMAGE_SIZE} uint8)")
        return bytes(payload)
    if mtype and not (mtype.startswith("image/") or mtype == OCTET_STREAM):
        raise FrameRejected(R_UNSUPPORTED, f"content-type {mtype!r} is not an image; send image/png or "
                                           f"application/x-raw-uint8 ({RAW_BYTES} bytes)")
    pixels = _png_fast(payload)
    return pixels if pixels is not None else _image_generic(payload)


def decode_image(payload: bytes | None, content_type: str | None = None,
                 max_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> "np.ndarray":
    """``decode_pixels`` as a uint8 array ``[28, 28]``."""
    import numpy as np

    return np.frombuffer(decode_pixels(payload, content_type, max_bytes), dtype=np.uint8).reshape(
        IMAGE_SIZE, IMAGE_SIZE).copy()


def encode_png(image: "np.ndarray") -> bytes:
    """A uint8 ``[H, W]`` array as an 8-bit grayscale PNG, deterministic (same pixels, same bytes): the
    images of drops, and frames of producers, tests and the demo."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image.astype("uint8"), "L").save(buf, "PNG", optimize=False, compress_level=6)
    return buf.getvalue()


def decode_png(data: bytes) -> "np.ndarray":
    """PNG bytes -> uint8 array ``[H, W]`` of any size; ``ValueError`` when undecodable or not 8-bit
    grayscale. (A frame value goes through :func:`decode_image`, which also checks the contract.)"""
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
