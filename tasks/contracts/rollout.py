"""Safe rollout: the state every consumer follows and the live evidence each consumer records.

Three parties share these files in the object store (keys in ``tasks.contracts.layout``):

* ``rollouts/<model>/state.json`` (:class:`RolloutState`): written by the rollout controller
  (``tasks/steps/rollout.py``) and by the kill switch (``mlpipe rollout kill``, the gateway's
  ``POST /v1/rollout/<model>/kill``, the ``rollout_kill`` DAG); read by every consumer about once a
  second. ``mode`` is ``off`` (champion only), ``shadow`` (the champion answers every frame; the candidate
  answers a copy, into ``predictions.shadow``), ``canary`` (``share`` percent of the devices are answered by
  the candidate) or ``full`` (the candidate is being promoted: every frame goes to it until the main lane
  serves it).
* ``rollouts/<model>/<rollout_id>/evidence/<consumer>.json``: one consumer's counters per step and per arm
  (:class:`ArmStats`), plus a time series for the report's plots; the controller adds up all consumers'.

Which frames the candidate answers is :func:`routes_to_candidate`: a hash of the frame's key (the device id;
the frame id when a frame has no key) salted with the rollout id, so a device sees one version for the
whole rollout, the split survives a consumer restart, and two consumers split alike.

The candidate is served by its own lane of Triton models, :func:`candidate_lane` (``<model>_candidate``:
its own preprocess, classifier and postprocess, the same spec), loaded next to the champion's.

Standard library and pydantic only.
"""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping

from pydantic import BaseModel, Field, field_validator

MODES = ("off", "shadow", "canary", "full")
Mode = Literal["off", "shadow", "canary", "full"]
ARMS = ("champion", "candidate")
#: the lane suffix of the candidate's Triton models (``digits`` -> ``digits_candidate``)
LANE_SUFFIX = "_candidate"
#: upper edges (ms) of the latency histogram in the evidence files; the last bucket is open
LATENCY_BUCKETS_MS = (1, 2, 5, 10, 20, 35, 50, 75, 100, 150, 250, 400, 650, 1000, 2000, 5000)
#: seconds per point of the evidence time series (the report's plots)
SERIES_BUCKET_S = 5
SERIES_MAX_POINTS = 720


def candidate_lane(model: str) -> str:
    """The Triton ensemble that serves ``model``'s rollout candidate."""
    return f"{model}{LANE_SUFFIX}"


def check_share(share: float) -> float:
    """``share`` as a float in 0..100, or ``ValueError`` naming the bad value."""
    try:
        value = float(share)
    except (TypeError, ValueError):
        raise ValueError(f"a canary share must be a number of percent in 0..100, got {share!r}") from None
    if not math.isfinite(value) or not 0.0 <= value <= 100.0:
        raise ValueError(f"a canary share must be in 0..100 (percent of the devices), got {share!r}")
    return value


def routes_to_candidate(key: bytes, share: float, salt: str) -> bool:
    """Whether the frame keyed ``key`` is answered by the candidate at ``share`` percent (stable per key)."""
    if share <= 0.0:
        return False
    if share >= 100.0:
        return True
    digest = hashlib.blake2b(key, digest_size=8, key=salt.encode()[:64]).digest()
    return int.from_bytes(digest, "big") % 10_000 < round(share * 100)


class RolloutState(BaseModel):
    """``rollouts/<model>/state.json``: what every consumer of ``model`` does now."""

    model: str
    rollout_id: str = ""
    mode: Mode = "off"
    champion: str = ""  # the version the main lane serves (text, as predictions carry it)
    candidate: str = ""  # the version the candidate lane serves ("" with mode off)
    share: float = 0.0  # canary: percent of the devices answered by the candidate
    step: str = ""  # the controller's step name ("shadow", "canary-10", ...): the evidence is kept per step
    updated_at: float = Field(default_factory=time.time)
    reason: str = ""
    killed: dict[str, Any] | None = None  # {"by", "reason", "at"} when the kill switch set ``off``

    @field_validator("share", mode="before")
    @classmethod
    def _share(cls, value: float) -> float:
        return check_share(value)

    @property
    def active(self) -> bool:
        return self.mode != "off" and bool(self.candidate)

    def candidate_share(self) -> float:
        """Percent of the frames answered by the candidate (shadow answers none: it only gets a copy)."""
        return {"off": 0.0, "shadow": 0.0, "canary": self.share, "full": 100.0}[self.mode]


def off_state(model: str, *, champion: str = "", reason: str = "", killed: dict | None = None,
              rollout_id: str = "") -> RolloutState:
    return RolloutState(model=model, rollout_id=rollout_id, mode="off", champion=champion, reason=reason,
                        killed=killed)


@dataclass
class ArmStats:
    """Counters of one arm (champion or candidate) over one step, from one or more consumers."""

    n: int = 0  # frames answered
    classes: dict[str, int] = field(default_factory=dict)  # answers per class id (text)
    conf_sum: float = 0.0  # sum of the top score
    frame_errors: int = 0  # frames Triton could not use (FRAME_ERROR): dead letters
    errors: int = 0  # frames whose call failed (the candidate's fall back to the champion)
    calls: int = 0  # Triton calls
    latency: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS_MS) + 1))
    agree: int = 0  # shadow: frames where this arm's class equals the champion's
    compared: int = 0
    labelled: int = 0  # late labels seen for frames this arm answered
    correct: int = 0

    def add_latency(self, ms: float, count: int = 1) -> None:
        for i, edge in enumerate(LATENCY_BUCKETS_MS):
            if ms <= edge:
                self.latency[i] += count
                return
        self.latency[-1] += count

    def merge(self, other: "ArmStats") -> "ArmStats":
        out = ArmStats(n=self.n + other.n, conf_sum=self.conf_sum + other.conf_sum,
                       frame_errors=self.frame_errors + other.frame_errors, errors=self.errors + other.errors,
                       calls=self.calls + other.calls, agree=self.agree + other.agree,
                       compared=self.compared + other.compared, labelled=self.labelled + other.labelled,
                       correct=self.correct + other.correct,
                       latency=[a + b for a, b in zip(self.latency, other.latency)])
        out.classes = dict(self.classes)
        for k, v in other.classes.items():
            out.classes[k] = out.classes.get(k, 0) + v
        return out

    @property
    def mean_confidence(self) -> float | None:
        return self.conf_sum / self.n if self.n else None

    @property
    def agreement(self) -> float | None:
        return self.agree / self.compared if self.compared else None

    @property
    def error_rate(self) -> float | None:
        tried = self.n + self.errors + self.frame_errors
        return (self.errors + self.frame_errors) / tried if tried else None

    @property
    def accuracy(self) -> float | None:
        return self.correct / self.labelled if self.labelled else None

    def p95_ms(self) -> float | None:
        """The upper edge of the bucket holding the 95th percentile (the open bucket: twice the last edge)."""
        total = sum(self.latency)
        if not total:
            return None
        need, seen = math.ceil(0.95 * total), 0
        for i, count in enumerate(self.latency):
            seen += count
            if seen >= need:
                return float(LATENCY_BUCKETS_MS[i]) if i < len(LATENCY_BUCKETS_MS) else 2.0 * LATENCY_BUCKETS_MS[-1]
        return 2.0 * LATENCY_BUCKETS_MS[-1]

    def distribution(self) -> dict[str, float]:
        total = sum(self.classes.values())
        return {k: v / total for k, v in sorted(self.classes.items())} if total else {}

    def to_dict(self) -> dict[str, Any]:
        return {"n": self.n, "classes": dict(self.classes), "conf_sum": round(self.conf_sum, 6),
                "frame_errors": self.frame_errors, "errors": self.errors, "calls": self.calls,
                "latency": list(self.latency), "agree": self.agree, "compared": self.compared,
                "labelled": self.labelled, "correct": self.correct}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ArmStats":
        latency = [int(x) for x in d.get("latency") or []]
        width = len(LATENCY_BUCKETS_MS) + 1
        latency = (latency + [0] * width)[:width]
        return cls(n=int(d.get("n", 0)), classes={str(k): int(v) for k, v in (d.get("classes") or {}).items()},
                   conf_sum=float(d.get("conf_sum", 0.0)), frame_errors=int(d.get("frame_errors", 0)),
                   errors=int(d.get("errors", 0)), calls=int(d.get("calls", 0)), latency=latency,
                   agree=int(d.get("agree", 0)), compared=int(d.get("compared", 0)),
                   labelled=int(d.get("labelled", 0)), correct=int(d.get("correct", 0)))

    def summary(self) -> dict[str, Any]:
        """The figures a decision and a report use (rounded)."""
        def r(x: float | None, nd: int = 4) -> float | None:
            return None if x is None else round(x, nd)

        return {"frames": self.n, "mean_confidence": r(self.mean_confidence), "agreement": r(self.agreement),
                "compared": self.compared, "error_rate": r(self.error_rate), "errors": self.errors,
                "frame_errors": self.frame_errors, "p95_ms": self.p95_ms(), "accuracy": r(self.accuracy),
                "labelled": self.labelled, "classes": self.distribution()}


def total_variation(p: Mapping[str, float], q: Mapping[str, float]) -> float | None:
    """Half the L1 distance of two class distributions (0: the same, 1: disjoint); None if either is empty."""
    if not p or not q:
        return None
    keys = set(p) | set(q)
    return 0.5 * sum(abs(p.get(k, 0.0) - q.get(k, 0.0)) for k in keys)
