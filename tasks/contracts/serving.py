"""Serving limits and the ensemble's tensor names, shared by the model repository, the compile step, the
Triton adapter and the consumer."""

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
