"""Serving limits and the ensemble's tensor names, shared by the model repository, the compile step, the
Triton adapter and the consumer."""

from typing import Any, Mapping

MAX_BATCH = 256
"""Largest batch every model in the Triton repository accepts; the consumer's micro-batch goes as one request."""

FRAME_INPUT = "FRAME"
"""The ensemble's one input: BYTES ``[N, 1]``, one encoded frame (PNG / JPEG / raw pixels) per row, decoded by
the preprocess model as the model spec says."""

FRAME_ERROR = "FRAME_ERROR"
"""BYTES ``[N, 1]`` output: ``b""`` for a frame that was used, ``b"<reason>: <detail>"`` (a dead-letter reason of
``tasks.contracts.messages``) for one that was not; that row's other outputs are meaningless."""

ENSEMBLE_OUTPUTS = ("LABEL", "SCORE", "TOPK_LABELS", "TOPK_SCORES", "EMBEDDING", FRAME_ERROR)
"""The ensemble's outputs: class id int64 ``[N, 1]``, its softmax score float32 ``[N, 1]``, the top-k ids and scores
``[N, k]`` (k = min(3, classes)), the embedding float32 ``[N, embedding_dim]``, and ``FRAME_ERROR``."""


def frame_error_rows(outputs: Mapping[str, Any]) -> list[tuple[int, str]]:
    """``(row, "<reason>: <detail>")`` for every row of an ensemble answer whose ``FRAME_ERROR`` is not empty, in
    row order; none when the answer has no ``FRAME_ERROR`` output. The one reader of that output (consumer,
    QC, deploy)."""
    errors = outputs.get(FRAME_ERROR)
    if errors is None:
        return []
    return [(j, v.decode("utf-8", "replace") if isinstance(v, (bytes, bytearray)) else str(v))
            for j, v in enumerate(errors.reshape(-1).tolist()) if v]


PIPELINE_OUTPUTS = ("BOXES", "BOX_SCORES", "BOX_LABELS", "LABEL_SCORES", "COUNT", "READOUT", "EMBEDDING", FRAME_ERROR)
"""A pipeline model's outputs (``models/<name>/pipeline.yaml``, served as one Triton model ``<name>``), per frame,
with ``K`` = the detector's ``detection.max_objects`` box slots, the first ``COUNT`` used (best detector score
first), the rest padding:

* ``BOXES`` float32 ``[N, K, 4]``: ``(x0, y0, x1, y1)`` in frame pixels (padding 0);
* ``BOX_SCORES`` float32 ``[N, K]``: the detector's centre score of each box (padding 0);
* ``BOX_LABELS`` int64 ``[N, K]``: the classifier's class id of each box's crop (padding -1);
* ``LABEL_SCORES`` float32 ``[N, K]``: its softmax score (padding 0);
* ``COUNT`` int32 ``[N, 1]``: boxes found (0: an empty read-out, not an error);
* ``READOUT`` BYTES ``[N, 1]``: the class names of the boxes left to right, joined (UTF-8; ``b""`` when none);
* ``EMBEDDING`` float32 ``[N, detector embedding_dim]``: the frame's embedding (the detector's pooled features);
* ``FRAME_ERROR`` as for a single model."""

PIPELINE_MEMBERS_FILE = "members.json"
"""In each version folder of a pipeline model: ``{"pipeline": name, "version": n, "members": {role: {"model":
<Triton model>, "version": <pinned version>, "name": <model project>}}}``; the pipeline model calls exactly those
(BLS), so one pipeline version never answers with another's members."""
