"""``mlpipe trace FRAME_ID``: one frame's path through the stack, with timings, from the local span store.

Reads the span store of ``tasks.tracing`` (``<log dir>/spans.jsonl`` and its rotated files; the
format is in that module's doc) and shows every span of the frame, in time order, as a tree:

    frame 6f1c... (trace 4bf92f35..., lineage digits/3)
      +0.000 ms   gateway  POST /v1/frames              12.410 ms
      +1.020 ms   gateway    frames publish               8.905 ms  topic frames
      +15.300 ms  stream   consumer batch (64 frames)    40.002 ms  model digits v3
      +16.100 ms  stream     triton infer                20.114 ms
      ...

How a frame is found: the gateway's ``frames publish`` span has ``mlpipe.frame_id``; a consumer
micro-batch span lists its frames in ``mlpipe.frame_ids`` (comma-separated; it links to each frame's trace). Every
span of those traces is shown (the gateway's request span, the batch's ``triton infer``, ``kafka
produce`` and ``qdrant upsert``, and Triton's own spans when Triton exports to the same store).
The store is scanned as text first (only lines naming the frame or its traces are parsed), so a
full store (about 120 MB) is read in seconds.

With ``OTEL_EXPORTER_OTLP_ENDPOINT`` set the spans go to that collector instead: look the frame up
there (attribute ``mlpipe.frame_id`` / ``mlpipe.frame_ids``). Bad input (exit 2, an ``error:``
line saying what to do): an id that is not a UUID, or a frame the store does not hold.
"""

from __future__ import annotations

import argparse
import json
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

from tasks import tracing
from tasks.contracts.errors import BadInput, run_cli
from tasks.logs import setup_logging


class UnknownFrame(BadInput, LookupError):
    """The span store holds no span of this frame."""


@dataclass
class Found:
    frame_id: str
    spans: list[dict[str, Any]] = field(default_factory=list)  # every span of the frame's traces, by start
    batches: list[dict[str, Any]] = field(default_factory=list)  # the consumer batch spans that held the frame
    trace_ids: list[str] = field(default_factory=list)  # the frame's own trace(s) (gateway)
    where: str = ""


def _lines(files: Sequence[Path]) -> Iterator[str]:
    for f in files:
        try:
            with f.open(encoding="utf-8", errors="replace") as fh:
                yield from fh
        except FileNotFoundError:  # rotated away meanwhile
            continue


def _parse(line: str) -> dict[str, Any] | None:
    try:
        rec = json.loads(line)
    except ValueError:
        return None
    return rec if isinstance(rec, dict) and "trace_id" in rec and "span_id" in rec else None


def find_frame(frame_id: str, store: Path | None = None) -> Found:
    """Every span of frame ``frame_id`` (see the module doc); ``ValueError`` for an id that is not a UUID,
    ``UnknownFrame`` when the store has none."""
    try:
        fid = str(uuid.UUID(frame_id.strip()))
    except ValueError:
        raise ValueError(f"{frame_id!r} is not a frame id: a frame id is the UUID the gateway answered "
                         "(POST /v1/frames) or the frame's frame_id header") from None
    path = store or tracing.span_store_path()
    files = tracing.store_files(path) if path is not None else []
    where = (f"the span store {path} ({len(files)} file(s))" if path is not None
             else "the span store, which is off (MLPIPE_LOG_DIR=off)")
    found = Found(fid, where=where)
    traces: set[str] = set()
    for line in _lines(files):
        if fid not in line:
            continue
        rec = _parse(line)
        if rec is None:
            continue
        attrs = rec.get("attributes") or {}
        ids = attrs.get("mlpipe.frame_ids") or ""
        ids = ids.split(",") if isinstance(ids, str) else ids
        if attrs.get("mlpipe.frame_id") == fid:
            found.trace_ids.append(rec["trace_id"])
            traces.add(rec["trace_id"])
        elif isinstance(ids, list) and fid in ids:
            found.batches.append(rec)
            traces.add(rec["trace_id"])
    if not traces:
        hint = ("is tracing on (MLPIPE_TRACING) for the gateway and the consumer, was the frame sampled "
                "(MLPIPE_TRACE_SAMPLE), or has the store rotated past it (MLPIPE_SPAN_STORE_MAX_BYTES)?"
                if files else "nothing has been traced here yet (a service writes spans once it runs with "
                "tracing on; with OTEL_EXPORTER_OTLP_ENDPOINT set they go to that collector instead)")
        raise UnknownFrame(f"no span of frame {fid} in {where}: {hint}")
    seen: set[tuple[str, str]] = set()
    for line in _lines(files):
        if not any(t in line for t in traces):
            continue
        rec = _parse(line)
        if rec is None or rec["trace_id"] not in traces or (rec["trace_id"], rec["span_id"]) in seen:
            continue
        seen.add((rec["trace_id"], rec["span_id"]))
        found.spans.append(rec)
    found.spans.sort(key=lambda s: (s.get("start_ns") or 0, s.get("end_ns") or 0))
    return found


def _note(s: dict[str, Any]) -> str:
    a = s.get("attributes") or {}
    parts = []
    if s.get("name") == "consumer batch":
        parts.append(f"{a.get('messaging.batch.message_count', '?')} message(s)")
        if a.get("mlpipe.model_version"):
            parts.append(f"model {a.get('mlpipe.model')} v{a['mlpipe.model_version']}")
        if a.get("mlpipe.lineage"):
            parts.append(f"lineage {a['mlpipe.lineage']}")
        if a.get("mlpipe.dead_letters"):
            parts.append(f"{a['mlpipe.dead_letters']} dead letter(s)")
    for key, label in (("messaging.destination.name", "topic"), ("http.response.status_code", "status"),
                       ("http.status_code", "status"), ("mlpipe.frames", "frames"), ("mlpipe.points", "points"),
                       ("mlpipe.messages", "messages")):
        if a.get(key) is not None:
            parts.append(f"{label} {a[key]}")
    if s.get("status") == "error":
        parts.append(f"ERROR {s.get('status_message') or ''}".strip())
    return ", ".join(parts)


def render(found: Found) -> str:
    """The text answer: a header line, then one line per span (offset from the first, service, name, duration)."""
    spans = found.spans
    t0 = min((s.get("start_ns") or 0) for s in spans) if spans else 0
    ids = {(s["trace_id"], s["span_id"]) for s in spans}
    depth: dict[tuple[str, str], int] = {}
    by_key = {(s["trace_id"], s["span_id"]): s for s in spans}

    def level(s: dict[str, Any]) -> int:
        key = (s["trace_id"], s["span_id"])
        if key not in depth:
            parent = (s["trace_id"], s.get("parent_span_id"))
            depth[key] = 0  # guards a cycle
            depth[key] = level(by_key[parent]) + 1 if parent in ids else 0
        return depth[key]

    lineage = next(((b.get("attributes") or {}).get("mlpipe.lineage") for b in found.batches
                    if (b.get("attributes") or {}).get("mlpipe.lineage")), None)
    head = f"frame {found.frame_id}"
    extras = []
    if found.trace_ids:
        extras.append("trace " + ", ".join(sorted(set(found.trace_ids))))
    if lineage:
        extras.append(f"lineage {lineage}")
    lines = [head + (f" ({'; '.join(extras)})" if extras else "")]
    if not found.batches:
        lines.append("  no consumer batch holds it yet (not consumed, or the consumer's spans are not here)")
    if not found.trace_ids:
        lines.append("  no gateway span (the frame did not come through a traced gateway)")
    width = max((len(str(s.get("service") or "?")) for s in spans), default=7)
    for s in spans:
        offset = ((s.get("start_ns") or t0) - t0) / 1e6
        name = "  " * level(s) + str(s.get("name"))
        dur = s.get("duration_ms")
        note = _note(s)
        lines.append(f"  +{offset:10.3f} ms  {str(s.get('service') or '?'):<{width}}  {name:<34} "
                     f"{dur if dur is not None else '?':>10} ms" + (f"  {note}" if note else ""))
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mlpipe trace", description="One frame's path through the stack with timings (gateway -> Kafka -> "
        "consumer batch -> Triton -> sinks), from the local span store that the services write "
        "(tasks/tracing.py). Exit 2 with an error line for an id that is not a UUID or a frame not in the store.",
        epilog="The span store is <log dir>/spans.jsonl (MLPIPE_LOG_DIR, default $MLPIPE_HOME/logs).",
    )
    p.add_argument("frame_id", help="the frame id (UUID) the gateway answered, or a frame's frame_id header")
    p.add_argument("--store", type=Path, default=None, help="a span store file other than the log folder's")
    p.add_argument("--json", action="store_true", help="print the spans as JSON (one object: frame, spans)")
    return p


def _main(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(default_level="WARNING")
    found = find_frame(args.frame_id, args.store)
    if args.json:
        print(json.dumps({"frame_id": found.frame_id, "trace_ids": sorted(set(found.trace_ids)),
                          "spans": found.spans}, default=str))
    else:
        print(render(found))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Exit codes: 0 found; 2 (bad input) not a UUID, or no span of that frame in the store."""
    return run_cli(_main, argv, bad_input=(ValueError,))


if __name__ == "__main__":
    sys.exit(main())
