"""Serving a pipeline (``models/<name>/pipeline.yaml``): the consumer's view of it and its predictions.

A pipeline (``tasks.contracts.pipeline``) is served by Triton as ONE model named like the pipeline, with the
single model's input (``FRAME``, encoded frames) and the outputs ``tasks.contracts.serving.PIPELINE_OUTPUTS``
(boxes, per-box labels and scores, ``COUNT``, ``READOUT``, the frame's ``EMBEDDING``, ``FRAME_ERROR``). The
loop is the same as for a single model: the frames are checked against the detector's spec (the pipeline's
first step decodes them as the detector takes them), a frame whose ``FRAME_ERROR`` is set is a dead letter,
and only the predictions are built here instead of by ``records.prediction_records``.

* ``pipeline_serving(name, models_dir)``: the specs the consumer needs (``PipelineServing``), None for a
  single model.
* ``pipeline_prediction_records``: one JSON prediction per frame (``predictions``, key = frame id; the same
  headers as a single model's) and the Qdrant points the policy selects: one point per frame (id = frame id,
  vector = ``EMBEDDING``, the detector's ``embedding_dim``). Prediction value, in this order: ``frame_id``,
  ``device_id``, ``readout`` (the class names of the boxes left to right, joined; ``""`` when none),
  ``count`` (boxes found), ``boxes`` (``[{"box": [x0, y0, x1, y1], "score", "label", "label_name",
  "label_score"}]``, best detector score first, frame pixels), ``score`` (the lowest ``label_score`` of the
  boxes: a read-out is as sure as its least sure digit; null when no box), ``model_name`` (the pipeline),
  ``model_version`` (the served pipeline version), ``lineage`` (``<pipeline>/<version>``: the pipeline
  version, whose manifest names its member versions), ``latency_ms``, ``inference_ms``, ``processed_at``,
  ``captured_at``, ``traceparent``. No ``label`` / ``class`` / ``topk``: a frame has no single class. The
  Qdrant payload is the prediction without ``traceparent``, plus ``indexed_because``; the policy's
  ``low_confidence`` reads ``score`` (a frame without a box counts as score 0: worth a look).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Sequence

from tasks.serving.consumer.policy import QdrantPolicy
from tasks.serving.consumer.records import Built, PredictionWriter, class_names

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np

    from tasks.adapters.kafka import Record
    from tasks.contracts.pipeline import PipelineSpec
    from tasks.contracts.spec import ModelSpec


@dataclass(frozen=True)
class PipelineServing:
    """A served pipeline as the consumer sees it: ``frames`` = the detector's spec (frame checks, the Qdrant
    vector size), ``classes`` = the classifier's spec (the names of the box labels)."""

    name: str
    spec: "PipelineSpec"
    frames: "ModelSpec"
    classes: "ModelSpec"

    @property
    def embedding_dim(self) -> int:
        """The size of the ``EMBEDDING`` output (and of Qdrant's vectors): the detector's ``embedding_dim``."""
        return int(self.frames.embedding_dim)


def pipeline_serving(name: str, models_dir: str | Path) -> PipelineServing | None:
    """The pipeline ``name`` (``<models_dir>/<name>/pipeline.yaml``, validated with its members), or None when
    ``name`` is not a pipeline. ``SpecError`` (bad input) names a missing or invalid spec."""
    from tasks.contracts.pipeline import find_pipeline, is_pipeline, member_specs

    if not is_pipeline(name, models_dir):
        return None
    spec = find_pipeline(name, models_dir)
    members = member_specs(spec, models_dir)
    return PipelineServing(name=name, spec=spec, frames=members["detector"], classes=members["classifier"])


def _text(value: object) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, (bytes, bytearray)) else str(value)


def pipeline_prediction_records(records: Sequence["Record"], good: Sequence[int], frame_ids: Sequence[str],
                                outputs: Mapping[str, "np.ndarray"], *, topic: str, model: str, version: str,
                                infer_s: float, processed: dt.datetime, policy: QdrantPolicy | None,
                                classes: "ModelSpec") -> Built:
    """Predictions (and, with a ``policy``, the points it selects) for ``records[good[j]]`` = output row j of a
    pipeline answer (``PIPELINE_OUTPUTS``, the rows with a ``FRAME_ERROR`` already taken out).

    Box label names come from ``classes`` (the classifier member's spec; an id out of its range is named by the
    id as text). ``policy`` None: nothing is indexed; no points either without an ``EMBEDDING`` output."""
    import numpy as np

    built = Built()
    if not good:
        return built
    n = len(good)
    box_scores = outputs["BOX_SCORES"].reshape(n, -1)
    k = box_scores.shape[1]
    counts = np.clip(outputs["COUNT"].reshape(n, -1)[:, 0].astype(np.int64), 0, k).tolist()
    boxes = np.round(outputs["BOXES"].reshape(n, k, 4).astype(np.float64), 3).tolist()
    bscores = np.round(box_scores.astype(np.float64), 6).tolist()
    labels = outputs["BOX_LABELS"].reshape(n, k).astype(np.int64).tolist()
    lscores = np.round(outputs["LABEL_SCORES"].reshape(n, k).astype(np.float64), 6).tolist()
    readouts = [_text(v) for v in outputs["READOUT"].reshape(n, -1)[:, 0].tolist()]
    out = PredictionWriter(built, outputs, n, topic=topic, model=model, version=version, infer_s=infer_s,
                           processed=processed, policy=policy)
    cls = class_names(classes.class_name)
    for j, i in enumerate(good):
        c = counts[j]
        score = min(lscores[j][:c]) if c else None
        out.add(j, records[i], frame_ids[j], {
            "readout": readouts[j], "count": c,
            "boxes": [{"box": boxes[j][b], "score": bscores[j][b], "label": labels[j][b],
                       "label_name": cls(labels[j][b]), "label_score": lscores[j][b]} for b in range(c)],
            "score": score}, 0.0 if score is None else score)
    return built


__all__ = ["PipelineServing", "pipeline_prediction_records", "pipeline_serving"]
