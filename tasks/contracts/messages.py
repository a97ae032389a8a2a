"""Message formats that cross the Kafka boundary: topics, headers, frame encodings, dead-letter reasons.

* ``frames``: key = device id; value = the encoded image (an encoding the model spec's
  ``frames.encodings`` lists: PNG, JPEG, or raw pixels of ``frames.raw_bytes``); headers ``frame_id``,
  ``content-type``, ``captured_at`` (ISO 8601), ``traceparent`` (W3C).
* ``predictions``: one JSON object per frame (frame id, class id and name, outputs, model
  version, its ``lineage`` id (``lineage_id``), latency, processed-at), keyed like the frame.
* ``frames.dlq``: the original value and headers plus ``reason`` (one of
  ``DLQ_REASONS``) and a human-readable detail.

The checks and the decoder of frame values are ``tasks.model.frames`` (sizes and
encodings come from the model spec); this module holds only the names and limits both
sides agree on.
"""

from __future__ import annotations

FRAMES = "frames"
PREDICTIONS = "predictions"
FRAMES_DLQ = "frames.dlq"
#: a shadow candidate's answers (the same JSON as ``predictions``): never read by users
PREDICTIONS_SHADOW = "predictions.shadow"
#: late-arriving ground truth: JSON ``{"frame_id", "label"}`` per frame (optional; the rollout's accuracy evidence)
LABELS = "labels"

# Frame headers (ARCHITECTURE.md "Frame"); ``reason`` is added on dead letters.
H_FRAME_ID = "frame_id"
H_CONTENT_TYPE = "content-type"
H_CAPTURED_AT = "captured_at"
H_TRACEPARENT = "traceparent"
H_REASON = "reason"
H_DEVICE_ID = "device_id"

#: Largest Kafka message (value + key + headers) any producer of the pipeline writes: librdkafka's default
#: ``message.max.bytes`` (1 MB; a larger message fails with MSG_SIZE_TOO_LARGE). One setting
#: (``MLPIPE_MAX_MESSAGE_BYTES``) sets the producers' ``message.max.bytes`` and the topics'
#: ``max.message.bytes``; the consumer keeps every prediction and dead letter below it.
DEFAULT_MAX_MESSAGE_BYTES = 1_000_000
#: Headers of one frame (names + values) above this make it a dead letter (``oversize_headers``); a dead
#: letter keeps an original header only up to ``MAX_HEADER_VALUE_BYTES`` (the fact of any drop is recorded).
DEFAULT_MAX_HEADERS_BYTES = 16 * 1024
MAX_HEADER_VALUE_BYTES = 4 * 1024
#: Largest frame key (device id) accepted.
MAX_KEY_BYTES = 1024

#: content types whose value is the raw pixels: the spec's ``frames.raw_bytes``, row-major, uint8.
RAW_CONTENT_TYPES = frozenset({"application/x-raw-uint8", "application/x-mlpipe-raw"})
#: ``application/octet-stream`` (or no content type): the encoding is told by the bytes (magic, or the raw size).
OCTET_STREAM = "application/octet-stream"

# Dead-letter reasons (the ``reason`` header of ``frames.dlq``).
R_MISSING_ID = "missing_frame_id"
R_INVALID_ID = "invalid_frame_id"
R_OVERSIZE = "oversize"
R_EMPTY = "empty"
R_UNDECODABLE = "undecodable"
R_WRONG_SHAPE = "wrong_shape"
R_UNSUPPORTED = "unsupported_content_type"
R_OVERSIZE_HEADERS = "oversize_headers"  # headers or key above their limit
R_INFERENCE_FAILED = "inference_failed"  # Triton rejected this frame (a permanent error, found by bisection)
R_UNDELIVERABLE = "undeliverable"  # the broker permanently refused the prediction (e.g. larger than its limit)
R_INFERENCE_UNAVAILABLE = "inference_unavailable"  # Triton unavailable for longer than the consumer's hold bound
DLQ_REASONS = (R_MISSING_ID, R_INVALID_ID, R_OVERSIZE, R_EMPTY, R_UNDECODABLE, R_WRONG_SHAPE, R_UNSUPPORTED,
               R_OVERSIZE_HEADERS, R_INFERENCE_FAILED, R_UNDELIVERABLE, R_INFERENCE_UNAVAILABLE)

# Dead-letter headers added by the consumer (besides ``reason``).
H_REASON_DETAIL = "reason_detail"
H_ORIGINAL = "original"  # object-store key prefix of the stored original (value + record.json) when it was too large
H_ORIGINAL_BYTES = "original_bytes"  # size of the original value
H_HEADERS_DROPPED = "headers_dropped"  # "name:size,..." of original headers not copied onto the dead letter


class FrameRejected(ValueError):
    """A frame that can never be processed: ``reason`` (one of DLQ_REASONS) and a human ``detail``."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def lineage_id(model: str, version: str | int | None) -> str | None:
    """A prediction's ``lineage`` id: ``<model>/<version>``, the registry version whose ``version.json`` and
    ``lineage.json`` (``models/<model>/<version>/``) name the drops, their validation digests, the training run
    and the QC report (``mlpipe lineage ID``); None while the served version is unknown."""
    return f"{model}/{version}" if model and version not in (None, "") else None


def parse_lineage_id(text: str) -> tuple[str, int]:
    """``"digits/3"`` -> ``("digits", 3)``; ``ValueError`` saying what a lineage id looks like otherwise."""
    model, sep, version = (text or "").strip().rpartition("/")
    if not sep or not model or not version.isdigit() or int(version) < 1:
        raise ValueError(f"{text!r} is not a lineage id: it is <model>/<version> (e.g. digits/3), the "
                         "'lineage' field of a prediction")
    return model, int(version)


def media_type(content_type: str | None) -> str:
    """``"image/png; foo=bar"`` -> ``"image/png"`` (lower case, "" when missing)."""
    return (content_type or "").split(";", 1)[0].strip().lower()
