"""Finding the frames Triton rejects: split a batch that failed permanently until the culprits are alone.

``bisect_infer(infer, frames, error)``: ``frames`` failed as one request with a permanent error
(``InferenceRejected``, e.g. INVALID_ARGUMENT). Halves are sent again, a failing half is split
further; a single frame that still fails is at fault. At most ``2 n - 2`` calls for ``n`` frames.
``InferenceUnavailable`` (Triton went away meanwhile) propagates: the caller retries the whole batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

from tasks.serving.consumer.backend import InferenceRejected


@dataclass
class Bisected:
    """``outputs`` (rows in order) for the frames at ``ok`` (positions in the batch); ``failed``: (position, error)."""

    ok: list[int] = field(default_factory=list)
    outputs: dict = field(default_factory=dict)
    failed: list[tuple[int, str]] = field(default_factory=list)
    calls: int = 0


def bisect_infer(infer: Callable[[Sequence[bytes]], dict], frames: Sequence[bytes], error: str) -> Bisected:
    import numpy as np

    n = len(frames)
    parts: list[tuple[int, int, dict]] = []
    result = Bisected()

    def split(lo: int, hi: int, err: str) -> None:
        if hi - lo <= 1:
            result.failed.append((lo, err))
            return
        mid = (lo + hi) // 2
        for a, b in ((lo, mid), (mid, hi)):
            result.calls += 1
            try:
                parts.append((a, b, infer(frames[a:b])))
            except InferenceRejected as exc:
                split(a, b, str(exc))

    split(0, n, error)
    parts.sort(key=lambda p: p[0])
    for a, b, _ in parts:
        result.ok.extend(range(a, b))
    if parts:
        result.outputs = {k: np.concatenate([p[2][k] for p in parts]) for k in parts[0][2]}
    result.failed.sort()
    return result
