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
