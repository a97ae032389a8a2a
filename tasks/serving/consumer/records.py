"""Pure record building: consumed frames and Triton's outputs -> the messages and points to write.

No I/O and no clock (the caller passes ``processed``): the same inputs give the same records.

* ``check_frames``: a polled micro-batch -> the encoded frames to send to Triton plus the rejected
  ones (no or invalid ``frame_id`` header, headers or key above their limits, and the cheap checks of
  ``tasks.model.frames.check_frame``: empty, oversize, a content type or magic bytes the model spec
  does not accept, a raw frame of another size: ``FrameRejected``). Decoding is Triton's.
* ``frame_errors``: the rows of Triton's ``FRAME_ERROR`` output that are not empty (frames its
  preprocess model could not use: undecodable, wrong shape) -> ``FrameRejected`` with that reason.
* ``prediction_records``: one JSON prediction per frame to ``predictions`` (key = frame id; headers
  ``frame_id``, ``content-type``, ``traceparent`` if the frame had one) and the Qdrant points the
  policy selects. Prediction value: ``frame_id``, ``device_id`` (the frame's key), ``label`` (the
  class id), ``class`` (its name in the model spec), ``score``, ``topk`` (``[{"label", "class",
  "score"}]``, up to 3), ``model_name`` (the ensemble),
  ``model_version`` (the served classifier version), ``lineage`` (``<model>/<version>``: the registry version
  that resolves to its drops, validation, training run and QC report, ``mlpipe lineage``),
  ``latency_ms`` (captured_at -> processed_at),
  ``inference_ms`` (the Triton call of the micro-batch), ``processed_at``, ``captured_at``,
  ``traceparent``. The Qdrant payload is the same without ``traceparent``, plus ``indexed_because``.
* ``dead_letter_records``: a rejected frame to ``frames.dlq`` with its original key, bytes and
  headers plus ``reason``, ``reason_detail``, ``source_topic``/``_partition``/``_offset`` and
  ``dead_lettered_at``. Bounded: a dead letter never exceeds ``max_message_bytes`` (the producers'
  ``message.max.bytes``). An original header above ``MAX_HEADER_VALUE_BYTES`` (or past the headers'
  budget) or a key above ``MAX_KEY_BYTES`` is not copied (``headers_dropped`` says which, with its
  size); a value that does not fit is replaced by ``original`` (the object-store prefix where the
  loop stored it, ``dead_letter_plan(...).needs_store``) and ``original_bytes``.
* ``message_size``: what a message counts against ``message.max.bytes`` (plus a margin).
"""

from __future__ import annotations

import datetime as dt
import json
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import orjson

from tasks.adapters.qdrant import PredictionPoint
from tasks.contracts.messages import (
    DEFAULT_MAX_HEADERS_BYTES,
    DEFAULT_MAX_MESSAGE_BYTES,
    DLQ_REASONS,
    H_CONTENT_TYPE,
    H_FRAME_ID,
    H_HEADERS_DROPPED,
    H_ORIGINAL,
    H_ORIGINAL_BYTES,
    H_REASON,
    H_REASON_DETAIL,
    H_TRACEPARENT,
    MAX_HEADER_VALUE_BYTES,
    MAX_KEY_BYTES,
    R_INVALID_ID,
    R_MISSING_ID,
    R_OVERSIZE_HEADERS,
    R_UNDECODABLE,
    FrameRejected,
    lineage_id,
)
from tasks.contracts.serving import frame_error_rows
from tasks.model.frames import check_frame
from tasks.serving.consumer.policy import QdrantPolicy

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np

    from tasks.adapters.kafka import Record
    from tasks.contracts.spec import ModelSpec

#: ``(topic, value, key, headers)``, as ``BusProducer.produce_batch`` takes it.
Message = tuple[str, bytes | None, bytes | None, list[tuple[str, bytes]]]

#: The predictions' serialiser: orjson writes a dict straight to compact UTF-8 JSON bytes in one call (the
#: standard library's encoder built a str, then ``.encode()`` copied it: ~3x slower per prediction, measured).
#: Same JSON document: the same keys in the same order, compact; text other than ASCII is written as UTF-8 instead of
#: ``\u`` escapes (both parse to the same strings), a NaN score as null (the standard library wrote ``NaN``,
#: which is not JSON).
_dumps = orjson.dumps
_JSON_CT = (H_CONTENT_TYPE, b"application/json")  # one tuple for every prediction's content-type header

#: Room kept below ``message.max.bytes`` for the record's framing (librdkafka counts it too).
MESSAGE_OVERHEAD = 512


def message_size(message: Message) -> int:
    """Bytes ``message`` counts against the producer's ``message.max.bytes`` (value, key, headers, framing)."""
    _topic, value, key, headers = message
    return (len(value or b"") + len(key or b"") + sum(len(k) + len(v or b"") + 8 for k, v in headers)
            + MESSAGE_OVERHEAD)


def headers_size(rec: "Record") -> int:
    return sum(len(k) + len(v or b"") for k, v in rec.raw_headers)


def parse_time(value: str | None) -> dt.datetime | None:
    """An ISO-8601 timestamp (``Z`` allowed; naive = UTC), or None when missing or unparsable."""
    if not value:
        return None
    try:
        t = dt.datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    except ValueError:
        return None
    return t if t.tzinfo else t.replace(tzinfo=dt.timezone.utc)


def now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def iso(t: dt.datetime) -> str:
    return t.isoformat(timespec="milliseconds").replace("+00:00", "Z")


# --------------------------------------------------------------------------- frames in


@dataclass
class Checked:
    """A micro-batch after the cheap checks: ``frames[j]`` (the encoded value) is ``records[good[j]]`` with id
    ``frame_ids[j]``."""

    good: list[int]  # indexes into records
    frames: list[bytes]
    rejected: list[tuple[int, FrameRejected]]
    frame_ids: list[str]


def check_frames(records: Sequence["Record"], spec: "ModelSpec", max_frame_bytes: int | None = None,
                 max_headers_bytes: int = DEFAULT_MAX_HEADERS_BYTES) -> Checked:
    """The frames of ``records`` that may go to Triton, in order, and the rejected ones (see the module doc).

    ``max_frame_bytes``: the size limit (None: the spec's ``frames.max_frame_bytes``)."""
    out = Checked(good=[], frames=[], rejected=[], frame_ids=[])
    for i, rec in enumerate(records):
        try:
            hsize = headers_size(rec)
            if hsize > max_headers_bytes:
                raise FrameRejected(R_OVERSIZE_HEADERS, f"the frame's headers are {hsize} bytes, the limit is "
                                                        f"{max_headers_bytes}")
            if rec.key is not None and len(rec.key) > MAX_KEY_BYTES:
                raise FrameRejected(R_OVERSIZE_HEADERS, f"the frame's key is {len(rec.key)} bytes, the limit is "
                                                        f"{MAX_KEY_BYTES}")
            raw_id = rec.headers.get(H_FRAME_ID)
            if raw_id is None:
                raise FrameRejected(R_MISSING_ID, "the frame has no frame_id header")
            try:
                fid = str(uuid.UUID(raw_id.decode("ascii").strip()))
            except (ValueError, UnicodeDecodeError):
                raise FrameRejected(R_INVALID_ID, f"frame_id header {raw_id[:64]!r} is not a UUID") from None
            check_frame(rec.value, rec.header(H_CONTENT_TYPE), spec, max_frame_bytes)
        except FrameRejected as exc:
            out.rejected.append((i, exc))
            continue
        out.good.append(i)
        out.frames.append(rec.value)  # type: ignore[arg-type]  # check_frame: not empty
        out.frame_ids.append(fid)
    return out


def parse_frame_error(text: bytes | str) -> FrameRejected:
    """One ``FRAME_ERROR`` value (``b"<reason>: <detail>"``) -> ``FrameRejected``; a reason that is not one of
    ``DLQ_REASONS`` becomes ``undecodable`` with the whole text as the detail."""
    value = text.decode("utf-8", "replace") if isinstance(text, (bytes, bytearray)) else str(text)
    reason, sep, detail = value.partition(": ")
    if sep and reason in DLQ_REASONS:
        return FrameRejected(reason, detail)
    return FrameRejected(R_UNDECODABLE, f"Triton could not use the frame: {value}")


def frame_errors(outputs: Mapping[str, "np.ndarray"]) -> list[tuple[int, FrameRejected]]:
    """(row, rejection) for every row whose ``FRAME_ERROR`` output is not empty, in row order (none without
    that output)."""
    return [(j, parse_frame_error(text)) for j, text in frame_error_rows(outputs)]


# --------------------------------------------------------------------------- records out


@dataclass
class Built:
    """What a micro-batch's results become: Kafka messages, Qdrant points, and each frame's captured_at."""

    messages: list[Message] = field(default_factory=list)
    points: list[PredictionPoint] = field(default_factory=list)
    captured: list[dt.datetime | None] = field(default_factory=list)  # per predicted frame, in order


def prediction_point(pred: Mapping[str, Any], embedding: Sequence[float], why: str) -> PredictionPoint:
    """The Qdrant point of one prediction: id = frame id, payload = the prediction without ``traceparent``."""
    payload = {k: v for k, v in pred.items() if k != "traceparent"}
    payload["indexed_because"] = why
    return PredictionPoint(pred["frame_id"], embedding, payload)


def prediction_records(records: Sequence["Record"], good: Sequence[int], frame_ids: Sequence[str],
                       outputs: Mapping[str, "np.ndarray"], *, topic: str, model: str, version: str, infer_s: float,
                       processed: dt.datetime, policy: QdrantPolicy | None, spec: "ModelSpec") -> Built:
    """Predictions (and, with a ``policy``, the points it selects) for ``records[good[j]]`` = output row j.

    Class names come from ``spec`` (an id out of its range is named by the id as text). ``policy`` None: nothing
    is indexed (no vector store); no points either without an ``EMBEDDING`` output.
    """
    import numpy as np

    built = Built()
    if not good:
        return built
    n = len(good)
    # convert once per batch (per-element numpy indexing is slow)
    labels = outputs["LABEL"].reshape(n, -1)[:, 0].tolist()
    raw_scores = outputs["SCORE"].reshape(n, -1)[:, 0].astype(np.float64)
    scores = np.round(raw_scores, 6).tolist()
    topl = outputs["TOPK_LABELS"].reshape(n, -1).tolist()
    tops = np.round(outputs["TOPK_SCORES"].reshape(n, -1).astype(np.float64), 6).tolist()
    out = PredictionWriter(built, outputs, n, topic=topic, model=model, version=version, infer_s=infer_s,
                           processed=processed, policy=policy)
    cls = class_names(spec.class_name)
    for j, i in enumerate(good):
        out.add(j, records[i], frame_ids[j], {
            "label": labels[j], "class": cls(labels[j]), "score": scores[j],
            "topk": [{"label": lab, "class": cls(lab), "score": sc} for lab, sc in zip(topl[j], tops[j])]},
            scores[j])
    return built


def class_names(name: Callable[[int], str]) -> Callable[[int], str]:
    """``name`` (class id -> name) cached for one batch (several lookups per frame otherwise)."""
    names: dict[int, str] = {}

    def cls(label: int) -> str:
        got = names.get(label)
        if got is None:
            got = names[label] = name(label)
        return got

    return cls


class PredictionWriter:
    """One micro-batch's predictions as the prediction contract frames them, whatever the model's own fields:
    ``add`` frames a model's own fields (between ``frame_id`` / ``device_id`` and the shared ones: model, version,
    lineage, times, trace), serialises the prediction into a Kafka message and, when ``policy`` selects the frame,
    adds a Qdrant point with its ``EMBEDDING`` row."""

    def __init__(self, built: Built, outputs: Mapping[str, "np.ndarray"], n: int, *, topic: str, model: str,
                 version: str, infer_s: float, processed: dt.datetime, policy: QdrantPolicy | None) -> None:
        emb = outputs.get("EMBEDDING")
        self.built, self.topic, self.policy = built, topic, policy
        self.emb_rows = emb.reshape(n, -1) if emb is not None else None
        self.index = policy is not None and self.emb_rows is not None
        self.model, self.version, self.lineage = model, version, lineage_id(model, version)
        self.infer_ms = round(infer_s * 1000, 3)
        self.processed, self.processed_iso = processed, iso(processed)

    def add(self, j: int, rec: "Record", fid: str, fields: Mapping[str, Any], score: float) -> None:
        """The prediction of output row ``j`` (frame ``fid`` of ``rec``) with the model's ``fields``; ``score``
        is what the Qdrant policy judges."""
        cap_text = rec.header("captured_at")
        cap = parse_time(cap_text)
        self.built.captured.append(cap)
        ts = cap or (dt.datetime.fromtimestamp(rec.timestamp_ms / 1000, dt.timezone.utc)
                     if rec.timestamp_ms else None)
        trace = rec.headers.get(H_TRACEPARENT)
        pred = {
            "frame_id": fid,
            "device_id": rec.key.decode("utf-8", "replace") if rec.key else (rec.header("device_id") or ""),
            **fields,
            "model_name": self.model,
            "model_version": self.version,
            "lineage": self.lineage,
            "latency_ms": round((self.processed - ts).total_seconds() * 1000, 3) if ts else None,
            "inference_ms": self.infer_ms,
            "processed_at": self.processed_iso,
            "captured_at": iso(cap) if cap else cap_text,
            "traceparent": trace.decode("latin-1") if trace else None,
        }
        fid_b = fid.encode()
        headers = [(H_FRAME_ID, fid_b), _JSON_CT]
        if trace:
            headers.append((H_TRACEPARENT, trace))
        self.built.messages.append((self.topic, _dumps(pred), fid_b, headers))
        if self.index:
            why = self.policy.reason(fid, score)  # type: ignore[union-attr]
            if why is not None:
                self.built.points.append(prediction_point(pred, self.emb_rows[j], why))  # type: ignore[index]


#: Room kept for the headers the consumer adds to a dead letter (reason, detail, source, pointer, drops).
DEAD_LETTER_OWN_BYTES = 3 * 1024


@dataclass
class DeadLetterPlan:
    """What of a rejected frame fits on its dead letter (``max_message_bytes``)."""

    headers: list[tuple[str, bytes]]  # the original headers kept
    dropped: list[tuple[str, int]]  # (name, size) of those not kept; name "<key>" for the key
    key: bytes | None
    keep_value: bool

    @property
    def needs_store(self) -> bool:
        """Something of the original is not on the dead letter: store the original in the object store."""
        return bool(self.dropped) or not self.keep_value


def dead_letter_plan(rec: "Record", max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                     minimal: bool = False) -> DeadLetterPlan:
    """Which original headers, key and value a dead letter of ``rec`` carries (``minimal``: none of them)."""
    budget = max(0, max_message_bytes - MESSAGE_OVERHEAD - DEAD_LETTER_OWN_BYTES)
    kept: list[tuple[str, bytes]] = []
    dropped: list[tuple[str, int]] = []
    key = rec.key
    if key is not None and (minimal or len(key) > MAX_KEY_BYTES):
        dropped.append(("<key>", len(key)))
        key = None
    used = len(key or b"")
    header_budget = min(DEFAULT_MAX_HEADERS_BYTES, budget)
    for name, value in rec.raw_headers:
        size = len(name) + len(value or b"") + 8
        if minimal or len(value or b"") > MAX_HEADER_VALUE_BYTES or used + size > header_budget:
            dropped.append((name[:64], len(value or b"")))
            continue
        kept.append((name, value))
        used += size
    value = rec.value or b""
    keep_value = not minimal and used + len(value) <= budget
    return DeadLetterPlan(headers=kept, dropped=dropped, key=key, keep_value=keep_value)


def dead_letter_records(records: Sequence["Record"], rejected: Sequence[tuple[int, FrameRejected]], *,
                        dlq_topic: str, processed_iso: str, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                        stored: Mapping[int, str] | None = None, minimal: bool = False) -> list[Message]:
    """One dead letter per rejected frame (``records[i]``), in order, none above ``max_message_bytes``.

    ``stored``: record index -> object-store prefix of its stored original (``original`` header).
    ``minimal``: the dead letter keeps none of the original (a last resort the broker refused otherwise).
    """
    out: list[Message] = []
    stored = stored or {}
    for i, rej in rejected:
        rec = records[i]
        plan = dead_letter_plan(rec, max_message_bytes, minimal=minimal)
        headers = list(plan.headers) + [
            (H_REASON, rej.reason.encode()), (H_REASON_DETAIL, rej.detail[:500].encode("utf-8", "replace")),
            ("source_topic", rec.topic.encode()), ("source_partition", str(rec.partition).encode()),
            ("source_offset", str(rec.offset).encode()), ("dead_lettered_at", processed_iso.encode())]
        if plan.dropped:
            text = ",".join(f"{name}:{size}" for name, size in plan.dropped)
            headers.append((H_HEADERS_DROPPED, text[:1000].encode("utf-8", "replace")))
        if not plan.keep_value:
            headers.append((H_ORIGINAL_BYTES, str(len(rec.value or b"")).encode()))
        if i in stored:
            headers.append((H_ORIGINAL, stored[i].encode()))
        out.append((dlq_topic, (rec.value or b"") if plan.keep_value else b"", plan.key, headers))
    return out


def original_record_json(rec: "Record") -> bytes:
    """``record.json`` of a stored original: where it came from, its key and headers (base64)."""
    import base64

    def b64(data: bytes | None) -> str | None:
        return None if data is None else base64.b64encode(data).decode()

    return json.dumps({"topic": rec.topic, "partition": rec.partition, "offset": rec.offset,
                       "timestamp_ms": rec.timestamp_ms, "key_b64": b64(rec.key),
                       "value_bytes": len(rec.value or b""),
                       "headers": [[k, b64(v)] for k, v in rec.raw_headers]}).encode()
