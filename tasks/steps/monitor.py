"""Drift monitor: live predictions against the champion's training reference.

``mlpipe monitor --help``. Everything model-specific comes from the model spec of ``--model``
(``models/<name>/spec.yaml``, ``load_settings().model_spec``): the classes (counted and named in the
report and plots), the embedding size, the frame decoding, and the drift thresholds (its ``drift``
section; a threshold flag set explicitly wins). One run:

1. **Reference** (cached at ``monitoring/reference/<model>/v<version>.npz``): the champion
   (the ``production`` version in the registry) run with ONNX Runtime over a sample of the
   drops it was trained on (its lineage; the spec's golden set when those cannot be read):
   predicted class distribution, top-1 confidence, embeddings (``embedding_dim`` each).
2. **Live window**, a bounded read:

   * ``--source kafka`` (default): the newest ``--window`` predictions on ``predictions``
     (read with an assign-only tail reader: no consumer group, nothing committed), and
     their frames from ``frames``, decoded as the spec says (``tasks.model.frames.decode_frame``,
     the decoder Triton runs) and embedded with the champion (the prediction messages carry no
     embedding);
   * ``--source qdrant``: the newest ``--window`` points of the prediction collection, with
     their stored embeddings. The consumer's default policy indexes every low-confidence
     prediction plus an unbiased sample; only the sample (``indexed_because`` ``sample`` or
     ``all``) is used when it holds ``--min-samples`` points, otherwise all points with a
     warning. (Local-mode Qdrant is locked while the consumer runs: use kafka then.)

   Predictions of the champion's version are used when there are enough of them.
3. **Checks**, each against a threshold (all configurable):

   * class distribution: PSI and Jensen-Shannon distance (base 2) of the predicted labels;
   * confidence: the drop of the mean top-1 score, and the two-sample KS statistic;
   * embeddings: cosine distance between the mean embeddings and the (biased) squared MMD
     with an RBF kernel (median-distance bandwidth), with a permutation p-value.

   Drift = any check past its threshold with at least ``--min-samples`` live predictions
   (fewer: status ``insufficient_data``, never drift).
4. **Report** in the object store under ``monitoring/<UTC timestamp>/``: ``report.json``,
   ``report.html`` (verdict, checks, plots) and the plots as PNG; ``monitoring/latest.json``.

**Pipelines** (``--model`` names ``models/<name>/pipeline.yaml``): the champion is the production pipeline
version (the registry keeps pipeline versions under the pipeline's name), and the checks read the pipeline's
outputs: the class distribution is that of the per-box labels (the classifier member's classes), the
confidence the per-box label scores (the classifier's softmax score of each crop; the detector's box scores
are cut at its ``score_threshold`` and say less), the embeddings the frames' (``EMBEDDING``: the detector's
pooled features), the thresholds the pipeline spec's ``drift`` section; ``--min-samples`` counts boxes. The
reference (the same cache key, ``monitoring/reference/<pipeline>/v<version>.npz``) is made from arrays of
pipeline outputs (``pipeline_reference``): the pipeline's QC writes it from its answers on the golden scenes
(``save_pipeline_reference``); a missing one is bad input naming that step. Live: the predictions' ``boxes``
(kafka: the frames embedded by the detector member version the pipeline version pins; qdrant: the points'
vectors, which are the frames' ``EMBEDDING``).

Exit codes (``tasks.contracts.errors``): 0 evaluated (drift or not: read ``drift`` in the result);
``EXIT_REJECTED`` drift with ``--fail-on-drift``; ``EXIT_BAD_INPUT`` bad usage or nothing to compare
with (no champion; with ``--no-champion-ok``, as the DAG runs it, that is status ``no_champion``
and exit 0); ``EXIT_TRANSIENT`` the source or the object store could not be read (retried by Airflow).
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import html
import io
import json
import logging
import sys
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from tasks.contracts import layout
from tasks.contracts.errors import BadInput, Rejected, Transient, is_transient, run_cli
from tasks.logs import setup_logging

from tasks.contracts.results import write_result_json

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np

    from tasks.adapters.kafka import KafkaConfig
    from tasks.adapters.storage import Store
    from tasks.contracts.pipeline import PipelineSpec
    from tasks.contracts.spec import ModelSpec

logger = logging.getLogger(__name__)

REFERENCE_PREFIX = layout.MONITOR_REFERENCE_PREFIX
REPORT_PREFIX = layout.MONITORING
SOURCES = ("kafka", "qdrant")
UNBIASED_REASONS = {"sample", "all"}
EPS = 1e-4


class MonitorError(BadInput, ValueError):
    """Nothing to monitor against (no champion, unreadable model) or bad options."""


class NoChampion(MonitorError):
    """No production version: nothing to compare live predictions with (yet)."""


class SourceUnavailable(Transient, RuntimeError):
    """The live source (Kafka, Qdrant) or the object store could not be read (transient: retried)."""


class DriftDetected(Rejected):
    """``--fail-on-drift`` and the live predictions drifted (final: the report says which checks)."""


@dataclass(frozen=True)
class Thresholds:
    """Drift thresholds (``for_spec`` builds them from a spec's ``drift``). A check past its threshold is drift."""

    class_psi: float  # population stability index of the predicted class distribution
    class_js: float  # Jensen-Shannon distance (base 2, 0..1) of the same
    confidence_drop: float  # mean top-1 score: reference minus live
    confidence_ks: float  # two-sample KS statistic of the top-1 scores
    embedding_cosine: float  # cosine distance between the mean embeddings
    embedding_mmd: float  # squared MMD, RBF kernel with the median-distance bandwidth
    min_samples: int  # fewer live predictions: insufficient data, no verdict

    @classmethod
    def for_spec(cls, spec: "ModelSpec | PipelineSpec", **overrides: Any) -> "Thresholds":
        """``spec.drift`` (a model's or a pipeline's), with the non-None ``overrides`` (CLI flags, set explicitly)
        winning."""
        values = {**spec.drift.model_dump(), **{k: v for k, v in overrides.items() if v is not None}}
        return cls(**values)

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if value < 0:
                raise MonitorError(f"threshold {name} must be >= 0, got {value}")
        if self.min_samples < 10:
            raise MonitorError(f"min_samples must be at least 10, got {self.min_samples}")


# --------------------------------------------------------------------------- statistics (pure numpy)


def class_distribution(labels: "np.ndarray", num_classes: int) -> "np.ndarray":
    """Share of each class id ``0..num_classes-1`` among ``labels`` (ids outside are ignored; uniform when none)."""
    import numpy as np

    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    labels = labels[(labels >= 0) & (labels < num_classes)]
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    return counts / counts.sum() if counts.sum() else np.full(num_classes, 1.0 / num_classes)


def psi(reference: "np.ndarray", live: "np.ndarray", eps: float = EPS) -> float:
    """Population stability index between two distributions over the same bins (smoothed)."""
    import numpy as np

    p = np.clip(np.asarray(reference, dtype=np.float64), eps, None)
    q = np.clip(np.asarray(live, dtype=np.float64), eps, None)
    p, q = p / p.sum(), q / q.sum()
    return float(np.sum((q - p) * np.log(q / p)))


def js_distance(reference: "np.ndarray", live: "np.ndarray") -> float:
    """Jensen-Shannon distance (base 2): 0 for equal distributions, 1 for disjoint ones."""
    from scipy.spatial.distance import jensenshannon

    return float(jensenshannon(reference, live, base=2))


def ks_statistic(a: "np.ndarray", b: "np.ndarray") -> tuple[float, float]:
    from scipy.stats import ks_2samp

    res = ks_2samp(a, b)
    return float(res.statistic), float(res.pvalue)


def cosine_distance(a: "np.ndarray", b: "np.ndarray") -> float:
    import numpy as np

    na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    if na == 0 or nb == 0:
        return 1.0 if na != nb else 0.0
    return float(1.0 - np.dot(a, b) / (na * nb))


def mmd_rbf(x: "np.ndarray", y: "np.ndarray", permutations: int = 100, max_n: int = 500,
            seed: int = 0) -> tuple[float, float, float]:
    """(squared MMD, permutation p-value, bandwidth) with an RBF kernel; inputs L2-normalised rows.

    Rows are L2-normalised first (embeddings are compared by direction, as in Qdrant's cosine
    space) and at most ``max_n`` of each are used. Bandwidth: the median pairwise distance.
    """
    import numpy as np

    rng = np.random.default_rng(seed)

    def prep(a: np.ndarray) -> np.ndarray:
        a = np.asarray(a, dtype=np.float64)
        if len(a) > max_n:
            a = a[rng.choice(len(a), max_n, replace=False)]
        norms = np.linalg.norm(a, axis=1, keepdims=True)
        return a / np.where(norms == 0, 1.0, norms)

    x, y = prep(x), prep(y)
    z = np.concatenate([x, y])
    sq = np.sum(z * z, axis=1)
    d2 = np.clip(sq[:, None] + sq[None, :] - 2 * z @ z.T, 0, None)
    off = d2[np.triu_indices(len(z), 1)]
    med = float(np.median(off[off > 0])) if np.any(off > 0) else 1.0
    k = np.exp(-d2 / med)
    n = len(x)

    def stat(idx: np.ndarray) -> float:
        a, b = idx[:n], idx[n:]
        return float(k[np.ix_(a, a)].mean() + k[np.ix_(b, b)].mean() - 2 * k[np.ix_(a, b)].mean())

    base = np.arange(len(z))
    observed = stat(base)
    hits = sum(stat(rng.permutation(base)) >= observed for _ in range(permutations))
    return observed, (hits + 1) / (permutations + 1), float(np.sqrt(med))


def pca_2d(reference: "np.ndarray", *others: "np.ndarray") -> list["np.ndarray"]:
    """Project ``reference`` and ``others`` on the reference's first two principal components."""
    import numpy as np

    mu = reference.mean(axis=0)
    _, _, vt = np.linalg.svd(reference - mu, full_matrices=False)
    comps = vt[:2].T
    return [(a - mu) @ comps for a in (reference, *others)]


# --------------------------------------------------------------------------- the champion and its reference


@dataclass
class Reference:
    model: str
    version: int
    source: str  # "training drops a, b" | "golden set"
    labels: "np.ndarray"  # predicted labels
    scores: "np.ndarray"  # top-1 softmax scores
    embeddings: "np.ndarray"  # [N, embedding_dim]
    true_labels: "np.ndarray"

    def to_bytes(self) -> bytes:
        import numpy as np

        buf = io.BytesIO()
        np.savez_compressed(buf, labels=self.labels, scores=self.scores, embeddings=self.embeddings,
                            true_labels=self.true_labels,
                            meta=np.array(json.dumps({"model": self.model, "version": self.version,
                                                      "source": self.source})))
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> "Reference":
        import numpy as np

        z = np.load(io.BytesIO(data), allow_pickle=False)
        meta = json.loads(str(z["meta"]))
        return cls(model=meta["model"], version=int(meta["version"]), source=meta["source"], labels=z["labels"],
                   scores=z["scores"], embeddings=z["embeddings"], true_labels=z["true_labels"])


def champion(store: "Store", model: str) -> dict[str, Any]:
    from tasks.steps import registry

    champ = registry.champion(store, model)
    if champ is None:
        raise NoChampion(f"model {model!r} has no production version in {store.url}: nothing to compare live "
                           "predictions with; deploy a model first (the retrain DAG)")
    return champ


class ChampionModel:
    """The champion's ONNX model in ONNX Runtime: uint8 images of ``spec`` -> (labels, scores, embeddings).

    The file must be the spec's ONNX contract (``check_onnx_contract``), else ``MonitorError`` naming the
    tensor and the expected shape."""

    def __init__(self, store: "Store", spec: "ModelSpec", version: int) -> None:
        from tasks.model.networks import OnnxContractError, check_onnx_contract, onnx_session

        key = layout.version_file_key(spec.name, version, layout.MODEL_ONNX)
        self._tmp = tempfile.TemporaryDirectory(prefix="mlpipe-monitor-")
        try:
            path = store.get_file(key, Path(self._tmp.name) / "model.onnx")
        except Exception as exc:  # noqa: BLE001 - ObjectNotFound or a store error: name the key
            self._tmp.cleanup()
            raise (SourceUnavailable if is_transient(exc) else MonitorError)(
                f"cannot read the champion's model {store.uri(key)}: {exc}") from exc
        self.session = onnx_session(path)
        try:
            check_onnx_contract(path, spec, session=self.session)
        except OnnxContractError as exc:
            self._tmp.cleanup()
            raise MonitorError(f"the champion v{version} cannot be monitored: {exc}") from None
        self.spec = spec
        self.version = version

    def run(self, images: "np.ndarray", batch: int = 256) -> tuple["np.ndarray", "np.ndarray", "np.ndarray"]:
        """(predicted labels int64 ``[N]``, top-1 softmax scores float32 ``[N]``, embeddings float32
        ``[N, embedding_dim]``) of uint8 ``images`` ``[N, *spec.image_shape]``."""
        import numpy as np

        from tasks.model.networks import run_onnx, to_input

        spec = self.spec
        if len(images) == 0:
            return np.zeros(0, np.int64), np.zeros(0, np.float32), np.zeros((0, spec.embedding_dim), np.float32)
        logits, embs = run_onnx(self.session, to_input(images, spec), spec, batch_size=batch)
        z = logits - logits.max(axis=1, keepdims=True)
        prob = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
        return prob.argmax(axis=1).astype(np.int64), prob.max(axis=1).astype(np.float32), embs

    def close(self) -> None:
        self._tmp.cleanup()


def reference_key(model: str, version: int) -> str:
    return layout.monitor_reference_key(model, version)


def build_reference(store: "Store", champ: dict[str, Any], runner: ChampionModel, size: int = 2000,
                    seed: int = 0) -> Reference:
    """The champion on a sample of its training drops (the spec's golden set if they cannot be read)."""
    import numpy as np

    from tasks.steps import drops

    spec = runner.spec
    drop_ids = [d["drop_id"] for d in champ.get("lineage", {}).get("drops", [])]
    try:
        if not drop_ids:
            raise MonitorError("no drops in the champion's lineage")
        images, labels = drops.load_arrays(store, drop_ids, spec)
        source = f"training drops {', '.join(drop_ids)}"
    except Exception as exc:  # noqa: BLE001 - fall back to the golden set, say why
        logger.warning("reference: cannot read the champion's training drops (%s); using the golden set", exc)
        images, labels = drops.golden_set(spec)
        source = "golden set"
    if len(images) > size:
        idx = np.sort(np.random.default_rng(seed).choice(len(images), size, replace=False))
        images, labels = images[idx], labels[idx]
    pred, scores, embs = runner.run(images)
    return Reference(model=spec.name, version=int(champ["version"]), source=source, labels=pred, scores=scores,
                     embeddings=embs, true_labels=np.asarray(labels, dtype=np.int64))


def load_reference(store: "Store", champ: dict[str, Any], runner: ChampionModel, size: int = 2000) -> Reference:
    """The champion's reference: the cached one, else built (``build_reference``) and cached."""
    model = runner.spec.name
    key = reference_key(model, int(champ["version"]))
    if store.exists(key):
        try:
            ref = Reference.from_bytes(store.get_bytes(key))
            if len(ref.labels):
                return ref
        except Exception as exc:  # noqa: BLE001 - a corrupt cache is rebuilt
            logger.warning("reference cache %s unreadable (%s): rebuilding", store.uri(key), exc)
    t0 = time.monotonic()
    ref = build_reference(store, champ, runner, size=size)
    store.put_bytes(key, ref.to_bytes())
    logger.info("reference for %s v%s: %d images from %s in %.1fs, cached at %s", model, ref.version,
                len(ref.labels), ref.source, time.monotonic() - t0, store.uri(key))
    return ref


# --------------------------------------------------------------------------- pipelines: reference from their outputs


def pipeline_output_arrays(outputs: "Mapping[str, np.ndarray]") -> tuple["np.ndarray", "np.ndarray", "np.ndarray"]:
    """(per-box labels int64 ``[B]``, per-box label scores float32 ``[B]``, frame embeddings float32 ``[F, D]``)
    of a pipeline answer (``tasks.contracts.serving.PIPELINE_OUTPUTS``, any number of frames): the first
    ``COUNT`` box slots of each frame, the frames whose ``FRAME_ERROR`` is set left out."""
    import numpy as np

    from tasks.contracts.serving import frame_error_rows

    labels = np.asarray(outputs["BOX_LABELS"])
    n = labels.shape[0]
    labels = labels.reshape(n, -1)
    k = labels.shape[1]
    counts = np.clip(np.asarray(outputs["COUNT"]).reshape(n, -1)[:, 0].astype(np.int64), 0, k)
    used = np.ones(n, bool)
    for j, _ in frame_error_rows(outputs):
        used[j] = False
    mask = (np.arange(k)[None, :] < counts[:, None]) & used[:, None]
    scores = np.asarray(outputs["LABEL_SCORES"]).reshape(n, k)
    embeddings = np.asarray(outputs["EMBEDDING"]).reshape(n, -1)
    return (labels[mask].astype(np.int64), scores[mask].astype(np.float32),
            embeddings[used].astype(np.float32))


def pipeline_reference(name: str, version: int, outputs: "Mapping[str, np.ndarray]", source: str,
                       true_labels: "np.ndarray | None" = None) -> Reference:
    """The drift reference of pipeline version ``version`` from its answers ``outputs`` on reference frames
    (``source`` says which: "golden scenes", "training drops a, b"); ``true_labels``: the boxes' true classes
    when known (else none are recorded)."""
    import numpy as np

    labels, scores, embeddings = pipeline_output_arrays(outputs)
    if not len(labels) or not len(embeddings):
        raise MonitorError(f"pipeline {name} v{version}: the reference answers ({source}) hold "
                           f"{len(labels)} box(es) and {len(embeddings)} usable frame(s): nothing to compare with")
    truth = np.zeros(0, np.int64) if true_labels is None else np.asarray(true_labels, np.int64).reshape(-1)
    return Reference(model=name, version=int(version), source=source, labels=labels, scores=scores,
                     embeddings=embeddings, true_labels=truth)


def save_pipeline_reference(store: "Store", name: str, version: int, outputs: "Mapping[str, np.ndarray]",
                            source: str = "golden scenes") -> str:
    """Write pipeline version ``version``'s drift reference (``pipeline_reference``) where the monitor reads it
    (``monitoring/reference/<name>/v<version>.npz``); returns its URI. The pipeline's QC calls it with its
    answers on the golden scenes."""
    ref = pipeline_reference(name, version, outputs, source)
    key = reference_key(name, int(version))
    store.put_bytes(key, ref.to_bytes())
    logger.info("drift reference for pipeline %s v%s: %d box(es) of %d frame(s) from %s, at %s", name, version,
                len(ref.labels), len(ref.embeddings), source, store.uri(key))
    return store.uri(key)


def load_pipeline_reference(store: "Store", name: str, version: int) -> Reference:
    """Pipeline version ``version``'s reference (``save_pipeline_reference``); ``MonitorError`` (bad input)
    saying how it is made when there is none, ``SourceUnavailable`` when the store cannot be read."""
    key = reference_key(name, int(version))
    try:
        data = store.get_bytes(key)
    except Exception as exc:  # noqa: BLE001 - ObjectNotFound: name the step that writes it
        if is_transient(exc):
            raise SourceUnavailable(f"cannot read the drift reference {store.uri(key)}: {exc}") from exc
        raise MonitorError(f"pipeline {name} v{version} has no drift reference at {store.uri(key)}: it is made "
                           f"from the pipeline's answers on its golden scenes by its QC (`mlpipe pipeline qc "
                           f"--pipeline {name} --version {version}`)") from None
    ref = Reference.from_bytes(data)
    if not len(ref.labels):
        raise MonitorError(f"the drift reference {store.uri(key)} holds no boxes: run the pipeline's QC again")
    return ref


class FrameEmbedder:
    """A pipeline's frame embedding on the host (the live frames of ``--source kafka``): the ONNX model of the
    detector member version the pipeline version pins, in ONNX Runtime; ``run`` gives its ``embedding`` output
    (what the pipeline answers as ``EMBEDDING``). ``version`` is the pipeline version (the predictions'
    ``model_version``)."""

    def __init__(self, store: "Store", detector: "ModelSpec", detector_version: int, version: int) -> None:
        from tasks.model.networks import onnx_session

        key = layout.version_file_key(detector.name, detector_version, layout.MODEL_ONNX)
        self._tmp = tempfile.TemporaryDirectory(prefix="mlpipe-monitor-")
        try:
            path = store.get_file(key, Path(self._tmp.name) / "model.onnx")
        except Exception as exc:  # noqa: BLE001 - ObjectNotFound or a store error: name the key
            self._tmp.cleanup()
            raise (SourceUnavailable if is_transient(exc) else MonitorError)(
                f"cannot read the pipeline's detector {store.uri(key)}: {exc}") from exc
        self.session = onnx_session(path)
        self.spec = detector
        self.version = int(version)

    def run(self, images: "np.ndarray", batch: int = 256) -> tuple[None, None, "np.ndarray"]:
        """(None, None, frame embeddings float32 ``[N, embedding_dim]``) of uint8 ``images`` of the detector."""
        import numpy as np

        from tasks.model.networks import run_onnx, to_input

        if len(images) == 0:
            return None, None, np.zeros((0, self.spec.embedding_dim), np.float32)
        _heat, embs = run_onnx(self.session, to_input(images, self.spec), self.spec, batch_size=batch)
        return None, None, embs.reshape(len(images), -1)

    def close(self) -> None:
        self._tmp.cleanup()


# --------------------------------------------------------------------------- live windows


@dataclass
class LiveWindow:
    source: str
    labels: "np.ndarray"
    scores: "np.ndarray"
    embeddings: "np.ndarray | None"
    versions: dict[str, int]
    first: str | None
    last: str | None
    notes: list[str] = field(default_factory=list)
    frames: int | None = None  # a pipeline's window: the predictions (frames); ``labels`` are their boxes

    @property
    def n(self) -> int:
        return int(len(self.labels))


def _pipeline_rows(rows: list[dict[str, Any]], notes: list[str]) -> list[dict[str, Any]]:
    """The rows that are pipeline predictions (they carry ``boxes``); others (a single model's, sharing the
    topic or collection) are left out, said so in ``notes``."""
    mine = [r for r in rows if isinstance(r.get("boxes"), list)]
    if len(mine) < len(rows):
        notes.append(f"{len(rows) - len(mine)} prediction(s) without boxes (not a pipeline's) left out")
    return mine


def _labels_scores(rows: list[dict[str, Any]], boxes: bool) -> tuple["np.ndarray", "np.ndarray"]:
    """The labels and scores the checks compare: each prediction's ``label`` and ``score``, or (``boxes``: a
    pipeline's predictions) every box's ``label`` and ``label_score``."""
    import numpy as np

    if not boxes:
        return (np.array([int(p.get("label", -1)) for p in rows], dtype=np.int64),
                np.array([float(p.get("score", 0.0)) for p in rows], dtype=np.float32))
    found = [b for p in rows for b in (p.get("boxes") or []) if isinstance(b, dict)]
    return (np.array([int(b.get("label", -1)) for b in found], dtype=np.int64),
            np.array([float(b.get("label_score") or 0.0) for b in found], dtype=np.float32))


def _newest(preds: list[dict[str, Any]], window: int) -> list[dict[str, Any]]:
    """One prediction per frame id (the newest copy), the newest ``window`` by processed_at."""
    by_id: dict[str, dict[str, Any]] = {}
    for p in preds:
        fid = str(p.get("frame_id") or uuid.uuid4())
        old = by_id.get(fid)
        if old is None or str(p.get("processed_at") or "") >= str(old.get("processed_at") or ""):
            by_id[fid] = p
    ordered = sorted(by_id.values(), key=lambda p: str(p.get("processed_at") or ""))
    return ordered[-window:]


def _select_version(preds: list[dict[str, Any]], version: int, min_samples: int,
                    notes: list[str]) -> list[dict[str, Any]]:
    mine = [p for p in preds if str(p.get("model_version") or "") == str(version)]
    if len(mine) == len(preds):
        return preds
    if len(mine) >= min_samples:
        notes.append(f"{len(preds) - len(mine)} prediction(s) of other model versions left out")
        return mine
    notes.append(f"only {len(mine)} of {len(preds)} predictions are from the champion v{version}: all are used")
    return preds


def _tail(kafka: "KafkaConfig", topic: str, window: int, timeout: float, idle: float = 1.5) -> list[Any]:
    """Up to ``window`` newest records per partition of ``topic`` (bounded: stops when idle)."""
    from tasks.adapters.kafka import TailFollower

    follower = TailFollower(kafka, [topic], window=window)
    records: list[Any] = []
    try:
        deadline = time.monotonic() + timeout
        while not follower.refresh(timeout=min(5.0, timeout)):
            if time.monotonic() > deadline:
                raise SourceUnavailable(f"topic {topic!r} not found on {kafka.bootstrap} within {timeout:.0f}s "
                                        "(is the broker up and the consumer writing predictions?)")
            time.sleep(0.2)
        quiet_since = time.monotonic()
        while time.monotonic() < deadline:
            batch = follower.poll_batch(1000, 0.3)
            if batch:
                records.extend(batch)
                quiet_since = time.monotonic()
            elif time.monotonic() - quiet_since >= idle:
                break
    finally:
        follower.close()
    return records


def kafka_window(kafka: "KafkaConfig", runner: "ChampionModel | FrameEmbedder", window: int, min_samples: int,
                 timeout: float = 30.0, *, boxes: bool = False) -> LiveWindow:
    """The newest ``window`` predictions and the embeddings of their frames (decoded for the champion's spec
    by ``decode_frame``; a frame that cannot be decoded is left out). ``boxes``: a pipeline's predictions (the
    labels and scores of their boxes; ``runner`` its ``FrameEmbedder``)."""
    import numpy as np

    from tasks.contracts.messages import FrameRejected
    from tasks.model.frames import decode_frame

    preds = []
    for rec in _tail(kafka, kafka.predictions_topic, window, timeout):
        try:
            preds.append(json.loads(rec.value or b""))
        except ValueError:
            continue
    notes: list[str] = []
    if boxes:
        preds = _pipeline_rows(preds, notes)
    preds = _select_version(_newest(preds, window), runner.version, min_samples, notes)
    wanted = {str(p.get("frame_id")) for p in preds}
    images = []
    if preds:
        for rec in _tail(kafka, kafka.frames_topic, max(window, len(preds)) * 2, timeout):
            fid = rec.header("frame_id")
            if fid not in wanted:
                continue
            try:
                images.append(decode_frame(rec.value, runner.spec, rec.header("content-type")))
            except FrameRejected:
                continue
            wanted.discard(fid)
    embeddings = None
    if images:
        _, _, embeddings = runner.run(np.stack(images))
        if len(images) < len(preds):
            notes.append(f"{len(preds) - len(images)} frame(s) of the window are no longer on the frames topic: "
                         f"embeddings from {len(images)} frames")
    elif preds:
        notes.append("no frames of the window on the frames topic: embedding drift not checked")
    labels, scores = _labels_scores(preds, boxes)
    return LiveWindow(
        source=f"kafka {kafka.predictions_topic} @ {kafka.bootstrap}",
        labels=labels,
        scores=scores,
        embeddings=embeddings,
        versions=dict(Counter(str(p.get("model_version")) for p in preds)),
        first=preds[0].get("processed_at") if preds else None,
        last=preds[-1].get("processed_at") if preds else None,
        notes=notes,
        frames=len(preds) if boxes else None,
    )


def qdrant_window(version: int, window: int, min_samples: int, url: str | None = None,
                  path: str | None = None, *, boxes: bool = False) -> LiveWindow:
    """The newest ``window`` points (unbiased sample when large enough) with their embeddings. ``boxes``: a
    pipeline's points (the labels and scores of their boxes; one vector per frame)."""
    import numpy as np

    from tasks.adapters.qdrant import VectorStoreError, open_vectors

    try:
        with open_vectors(create=False, url=url, path=path) as vs:
            ids = vs.all_ids()
            points = []
            for start in range(0, len(ids), 1000):
                points.extend(vs.get(ids[start:start + 1000], with_vectors=True))
            where = vs.settings.describe()
    except (VectorStoreError, RuntimeError, OSError) as exc:
        raise SourceUnavailable(f"cannot read Qdrant: {exc}") from exc
    notes: list[str] = []
    rows = [{**p["payload"], "frame_id": p["id"], "_vector": p.get("vector")} for p in points if p.get("vector")]
    if boxes:
        rows = _pipeline_rows(rows, notes)
    unbiased = [r for r in rows if r.get("indexed_because") in UNBIASED_REASONS]
    if len(unbiased) >= min_samples:
        if len(unbiased) < len(rows):
            notes.append(f"{len(rows) - len(unbiased)} point(s) indexed for low confidence left out (biased)")
        rows = unbiased
    elif rows:
        notes.append(f"only {len(unbiased)} unbiased sample point(s): all {len(rows)} points used, including "
                     "those indexed for low confidence (the statistics lean towards low confidence)")
    rows = _select_version(_newest(rows, window), version, min_samples, notes)
    labels, scores = _labels_scores(rows, boxes)
    return LiveWindow(
        source=f"qdrant {where}",
        labels=labels,
        scores=scores,
        embeddings=np.array([r["_vector"] for r in rows], dtype=np.float32) if rows else None,
        versions=dict(Counter(str(r.get("model_version")) for r in rows)),
        first=rows[0].get("processed_at") if rows else None,
        last=rows[-1].get("processed_at") if rows else None,
        notes=notes,
        frames=len(rows) if boxes else None,
    )


# --------------------------------------------------------------------------- comparison


def _check(name: str, value: float | None, threshold: float, detail: str, **extra: Any) -> dict[str, Any]:
    drift = value is not None and value > threshold
    status = "skipped" if value is None else ("drift" if drift else "ok")
    return {"name": name, "value": None if value is None else round(float(value), 6), "threshold": threshold,
            "status": status, "drift": drift, "detail": detail, **extra}


def _shares(dist: "np.ndarray", spec: "ModelSpec") -> dict[str, float]:
    """A class distribution keyed by class name (as reports carry it)."""
    return {spec.class_name(i): round(float(v), 4) for i, v in enumerate(dist)}


def compare(ref: Reference, live: LiveWindow, th: Thresholds, spec: "ModelSpec") -> dict[str, Any]:
    """All checks of ``live`` against ``ref`` over ``spec``'s classes; ``drift`` is true when any check is
    past its threshold. ``class_distribution`` is keyed by class name."""
    import numpy as np

    out: dict[str, Any] = {"samples": live.n, "reference_samples": int(len(ref.labels))}
    p_ref = class_distribution(ref.labels, spec.num_classes)
    if live.n < th.min_samples:
        out.update(status="insufficient_data", drift=False, checks=[],
                   class_distribution={"reference": _shares(p_ref, spec), "live": None})
        return out
    p_live = class_distribution(live.labels, spec.num_classes)
    mean_ref, mean_live = float(np.mean(ref.scores)), float(np.mean(live.scores))
    ks, ks_p = ks_statistic(ref.scores, live.scores)
    shift = np.abs(p_live - p_ref)
    top = [int(c) for c in np.argsort(-shift)[:3]]
    checks = [
        _check("class_psi", psi(p_ref, p_live), th.class_psi,
               "PSI of the predicted class distribution; largest moves: "
               + ", ".join(f"class {spec.class_name(c)} {p_ref[c]:.1%} -> {p_live[c]:.1%}" for c in top)),
        _check("class_js", js_distance(p_ref, p_live), th.class_js,
               "Jensen-Shannon distance (base 2) of the predicted class distribution"),
        _check("confidence_drop", mean_ref - mean_live, th.confidence_drop,
               f"mean top-1 score {mean_ref:.3f} (reference) -> {mean_live:.3f} (live)",
               reference_mean=round(mean_ref, 6), live_mean=round(mean_live, 6)),
        _check("confidence_ks", ks, th.confidence_ks, f"KS statistic of the top-1 scores (p={ks_p:.2g})",
               p_value=ks_p),
    ]
    if live.embeddings is not None and len(live.embeddings) >= th.min_samples // 2:
        cos = cosine_distance(ref.embeddings.mean(axis=0), live.embeddings.mean(axis=0))
        mmd, mmd_p, bw = mmd_rbf(ref.embeddings, live.embeddings)
        checks += [
            _check("embedding_cosine", cos, th.embedding_cosine, "cosine distance between the mean embeddings"),
            _check("embedding_mmd", mmd, th.embedding_mmd,
                   f"squared MMD, RBF kernel (bandwidth {bw:.3f}), permutation p={mmd_p:.3f}", p_value=mmd_p),
        ]
    else:
        have = 0 if live.embeddings is None else len(live.embeddings)
        reason = f"only {have} live embedding(s)"
        checks += [_check("embedding_cosine", None, th.embedding_cosine, f"skipped: {reason}"),
                   _check("embedding_mmd", None, th.embedding_mmd, f"skipped: {reason}")]
    drift = any(c["drift"] for c in checks)
    out.update(status="drift" if drift else "ok", drift=drift, checks=checks,
               class_distribution={"reference": _shares(p_ref, spec), "live": _shares(p_live, spec)})
    return out


# --------------------------------------------------------------------------- report


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    return buf.getvalue()


def plots(ref: Reference, live: LiveWindow, spec: "ModelSpec") -> dict[str, bytes]:
    """PNG plots: class distribution (by class name), confidence histograms, embeddings (PCA of the reference)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    out: dict[str, bytes] = {}
    names = spec.class_names
    x = np.arange(len(names))
    rotation = 45 if max(map(len, names)) > 2 else 0
    fig, ax = plt.subplots(figsize=(min(14.0, 3.5 + 0.35 * len(names)), 3.2))
    ax.bar(x - 0.2, class_distribution(ref.labels, len(names)), 0.4, label=f"reference ({len(ref.labels)})")
    if live.n:
        ax.bar(x + 0.2, class_distribution(live.labels, len(names)), 0.4, label=f"live ({live.n})")
    ax.set_xticks(x, names, rotation=rotation, ha="right" if rotation else "center")
    ax.set_xlabel("predicted class")
    ax.set_ylabel("share")
    ax.set_title("Predicted class distribution")
    ax.legend()
    out["class_distribution.png"] = _png(fig)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6.5, 3.2))
    bins = np.linspace(0, 1, 41)
    ax.hist(ref.scores, bins=bins, alpha=0.6, density=True, label="reference")
    if live.n:
        ax.hist(live.scores, bins=bins, alpha=0.6, density=True, label="live")
    ax.set_xlabel("top-1 score")
    ax.set_title("Confidence")
    ax.legend()
    out["confidence.png"] = _png(fig)
    plt.close(fig)

    if live.embeddings is not None and len(live.embeddings):
        ref_2d, live_2d = pca_2d(ref.embeddings.astype(np.float64), live.embeddings.astype(np.float64))
        fig, ax = plt.subplots(figsize=(5.5, 4.5))
        ax.scatter(ref_2d[:, 0], ref_2d[:, 1], s=4, alpha=0.35, label="reference")
        ax.scatter(live_2d[:, 0], live_2d[:, 1], s=4, alpha=0.35, label="live")
        ax.set_title("Embeddings (PCA of the reference)")
        ax.legend(markerscale=3)
        out["embeddings.png"] = _png(fig)
        plt.close(fig)
    return out


def _fmt(value: float | None) -> str:
    return "" if value is None else f"{value:.4f}"


def render_html(report: dict[str, Any], images: dict[str, bytes]) -> str:
    e = html.escape
    verdict = {"drift": "DRIFT: retrain requested", "ok": "no drift",
               "insufficient_data": "insufficient data: no verdict"}[report["status"]]
    color = {"drift": "#b00020", "ok": "#1b7f3b", "insufficient_data": "#8a6d00"}[report["status"]]
    rows = "".join(
        f"<tr><td>{e(c['name'])}</td><td>{_fmt(c['value'])}</td>"
        f"<td>{c['threshold']}</td><td class='{e(c['status'])}'>{e(c['status'])}</td><td>{e(c['detail'])}</td></tr>"
        for c in report.get("checks", []))
    notes = "".join(f"<li>{e(n)}</li>" for n in report["live"].get("notes", []))
    figs = "".join(f"<figure><img alt='{e(name)}' src='data:image/png;base64,{base64.b64encode(data).decode()}'>"
                   f"<figcaption>{e(name)}</figcaption></figure>" for name, data in images.items())
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>Drift report {e(report['created_at'])}</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:70em}} td,th{{border:1px solid #ccc;padding:4px 8px}}
table{{border-collapse:collapse}} .drift{{color:#b00020;font-weight:bold}} .ok{{color:#1b7f3b}}
.skipped{{color:#777}} figure{{display:inline-block;margin:1em}}</style></head><body>
<h1>Drift report: <span style="color:{color}">{e(verdict)}</span></h1>
<p>Model <b>{e(report['model'])}</b> champion v{report['champion']} &middot; {report['samples']} live predictions
from {e(report['live']['source'])} ({e(str(report['live'].get('first')))} &ndash; {e(str(report['live'].get('last')))},
versions {e(json.dumps(report['live'].get('versions')))}) &middot; reference: {report['reference_samples']} images from
{e(report['reference']['source'])} &middot; {e(report['created_at'])}</p>
<table><tr><th>check</th><th>value</th><th>threshold</th><th>status</th><th>detail</th></tr>{rows}</table>
<ul>{notes}</ul>
{figs}
</body></html>
"""


def run_monitor(store: "Store", model: str, *, source: str = "kafka", window: int = 2000,
                thresholds: Thresholds | None = None, kafka: "KafkaConfig | None" = None,
                qdrant_url: str | None = None, qdrant_path: str | None = None, reference_size: int = 2000,
                timeout: float = 30.0) -> dict[str, Any]:
    """One monitoring pass; writes the report under ``monitoring/<ts>/`` and returns its summary.

    The model spec is ``model``'s (``load_settings().model_spec(model)``; ``SpecError``, bad input, when
    there is none); ``thresholds`` default to ``Thresholds.for_spec`` of it. A pipeline ``model``: the checks
    read its outputs (the module doc), over its classifier member's classes, with its spec's ``drift``."""
    from tasks.config import load_settings

    settings = load_settings()
    pipe = None
    if settings.is_pipeline(model):
        from tasks.contracts.pipeline import find_pipeline, member_specs

        pipe = find_pipeline(model, settings.models_dir)
        members = member_specs(pipe, settings.models_dir)
        spec = members["classifier"]  # the classes of the boxes
        th = thresholds or Thresholds.for_spec(pipe)  # its drift section
    else:
        spec = settings.model_spec(model)
        th = thresholds or Thresholds.for_spec(spec)
    if source not in SOURCES:
        raise MonitorError(f"unknown source {source!r}: choose {' or '.join(SOURCES)}")
    if window < th.min_samples and pipe is None:  # a pipeline's min_samples counts boxes: frames hold several
        raise MonitorError(f"window {window} is smaller than min_samples {th.min_samples}: no verdict could be "
                           "reached; widen --window or lower --min-samples")
    t0 = time.monotonic()
    champ = champion(store, model)
    version = int(champ["version"])
    if source == "kafka":
        from tasks.adapters.kafka import KafkaConfig

        kafka = kafka or KafkaConfig.from_env()
    runner: ChampionModel | FrameEmbedder | None
    if pipe is not None:
        ref = load_pipeline_reference(store, model, version)
        detector = int(((champ.get("members") or {}).get("detector") or {}).get("version") or 0)
        # kafka: the frames are embedded by the detector version this pipeline version pins; qdrant: the points
        # carry the frames' EMBEDDING
        runner = FrameEmbedder(store, members["detector"], detector, version) if source == "kafka" else None
    else:
        runner = ChampionModel(store, spec, version)
    try:
        if isinstance(runner, ChampionModel):
            ref = load_reference(store, champ, runner, size=reference_size)
        if source == "kafka":
            assert kafka is not None and runner is not None
            live = kafka_window(kafka, runner, window, th.min_samples, timeout=timeout, boxes=pipe is not None)
        else:
            live = qdrant_window(version, window, th.min_samples, url=qdrant_url, path=qdrant_path,
                                 boxes=pipe is not None)
    finally:
        if runner is not None:
            runner.close()
    result = compare(ref, live, th, spec)
    if pipe is not None:
        result.update(kind="pipeline", frames=live.frames, reference_frames=int(len(ref.embeddings)),
                      confidence="per-box label scores (the classifier's softmax score of each crop)")
    now = dt.datetime.now(dt.timezone.utc)
    stamp = now.strftime("%Y%m%dT%H%M%S%fZ")
    prefix = layout.monitor_report_prefix(stamp)
    report = {
        "model": model, "champion": version, "created_at": now.isoformat(timespec="seconds"),
        "classes": spec.class_names, **result,
        "thresholds": asdict(th),
        "reference": {"source": ref.source, "version": ref.version,
                      "key": store.uri(reference_key(model, ref.version))},
        "live": {"source": live.source, "versions": live.versions, "first": live.first, "last": live.last,
                 "notes": live.notes, "window": window},
    }
    images = plots(ref, live, spec)
    for name, data in images.items():
        store.put_bytes(prefix + name, data, content_type="image/png")
    report["report_uri"] = store.uri(prefix + "report.html")
    report["json_uri"] = store.uri(prefix + "report.json")
    report["plots"] = {name: store.uri(prefix + name) for name in images}
    drifted = [c["name"] for c in report.get("checks", []) if c["drift"]]
    what = "live predictions" if pipe is None else f"boxes of {live.frames} live frames"
    report["summary"] = {
        "drift": "drift past the threshold in " + ", ".join(drifted) + f" over {live.n} {what}",
        "ok": f"no drift over {live.n} {what}",
        "insufficient_data": f"only {live.n} {what} (need {th.min_samples}): no verdict",
    }[report["status"]]
    store.put_text(prefix + "report.html", render_html(report, images), content_type="text/html; charset=utf-8")
    store.put_json(prefix + "report.json", report)  # written last: the report is complete
    store.put_json(layout.MONITOR_LATEST, report)
    report["seconds"] = round(time.monotonic() - t0, 2)
    logger.info("monitor %s v%s: %s; report %s (%.1fs)", model, version, report["summary"],
                report["report_uri"], report["seconds"])
    for note in live.notes:
        logger.warning("%s", note)
    return report


# --------------------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
    from tasks.config import load_settings

    cfg = load_settings()
    p = argparse.ArgumentParser(prog="mlpipe monitor", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", choices=SOURCES, default=cfg.monitor.source,
                   help=f"where live predictions come from (MLPIPE_MONITOR_SOURCE, default {cfg.monitor.source})")
    p.add_argument("--window", type=int, default=2000, help="newest live predictions compared (default 2000)")
    p.add_argument("--min-samples", type=int, default=None,
                   help="fewer live predictions give no verdict (default the model spec's drift.min_samples)")
    p.add_argument("--model", default=None, help="model name: its spec is $MLPIPE_MODELS_DIR/<name>/spec.yaml "
                   "(default $MLPIPE_MODEL_NAME or digits)")
    p.add_argument("--bootstrap", default=None, help="Kafka bootstrap (overrides MLPIPE_KAFKA_BOOTSTRAP)")
    p.add_argument("--topic-prefix", default=None, help="topic prefix (overrides MLPIPE_KAFKA_TOPIC_PREFIX)")
    p.add_argument("--qdrant-url", default=None, help="Qdrant server (overrides MLPIPE_QDRANT_URL)")
    p.add_argument("--qdrant-path", default=None, help="Qdrant local folder (overrides MLPIPE_QDRANT_PATH)")
    p.add_argument("--reference-size", type=int, default=2000, help="training images in the reference (default 2000)")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds allowed to read the live source")
    for name, help_ in (("class_psi", "PSI of the predicted class distribution"),
                        ("class_js", "Jensen-Shannon distance of the predicted class distribution"),
                        ("confidence_drop", "drop of the mean top-1 score"),
                        ("confidence_ks", "KS statistic of the top-1 scores"),
                        ("embedding_cosine", "cosine distance of the mean embeddings"),
                        ("embedding_mmd", "squared MMD of the embeddings")):
        p.add_argument(f"--max-{name.replace('_', '-')}", dest=name, type=float, default=None,
                       help=f"threshold: {help_} (default the model spec's drift.{name})")
    p.add_argument("--fail-on-drift", action="store_true", help="exit EXIT_REJECTED (3) when drift is found")
    p.add_argument("--no-champion-ok", action="store_true",
                   help="no production version yet: report status no_champion (no verdict, exit 0) instead of "
                        "exit 2 (the scheduled DAG on a stack that has not deployed a model yet)")
    p.add_argument("--result-json", type=Path, default=None, help="write the report summary here (Airflow XCom)")
    p.add_argument("--log-level", default=None, help="logging level (default $MLPIPE_LOG_LEVEL or INFO)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(_main, argv, bad_input=(ValueError,))


def _main(argv: Sequence[str] | None) -> int:
    args = _parser().parse_args(argv)
    setup_logging(args.log_level)
    logging.getLogger("tasks.adapters.kafka.librdkafka").setLevel(logging.WARNING)
    from tasks.config import load_settings
    from tasks.adapters.storage import open_store

    try:
        if args.window <= 0:
            raise MonitorError(f"--window must be positive, got {args.window}")
        cfg = load_settings()
        name = args.model or cfg.model_name
        if cfg.is_pipeline(name):  # a pipeline's thresholds: its pipeline.yaml's drift section
            from tasks.contracts.pipeline import find_pipeline

            drift_of: Any = find_pipeline(name, cfg.models_dir)
        else:
            drift_of = cfg.model_spec(name)
        th = Thresholds.for_spec(drift_of, **{f.name: getattr(args, f.name) for f in fields(Thresholds)})
        kafka = None
        if args.source == "kafka":
            from tasks.adapters.kafka import KafkaConfig

            kafka = KafkaConfig.from_env(bootstrap=args.bootstrap, topic_prefix=args.topic_prefix)
        report = run_monitor(open_store(cfg), args.model or cfg.model_name, source=args.source, window=args.window,
                             thresholds=th, kafka=kafka, qdrant_url=args.qdrant_url, qdrant_path=args.qdrant_path,
                             reference_size=args.reference_size, timeout=args.timeout)
    except NoChampion as exc:
        if not args.no_champion_ok:
            raise
        logger.warning("%s: no verdict", exc)
        report = {"status": "no_champion", "drift": False, "summary": f"no verdict: {exc}", "samples": 0,
                  "model": args.model or cfg.model_name, "champion": None, "report_uri": None, "json_uri": None,
                  "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "checks": []}
    summary = {k: report[k] for k in ("status", "drift", "summary", "samples", "model", "champion", "report_uri",
                                      "json_uri", "created_at")}
    summary["checks"] = {c["name"]: {"value": c["value"], "threshold": c["threshold"], "status": c["status"]}
                         for c in report.get("checks", [])}
    if args.result_json:
        write_result_json(args.result_json, summary)
    print(json.dumps(summary, indent=2, default=str))
    if args.fail_on_drift and report["drift"]:
        raise DriftDetected(f"drift: {report['summary']} (report {report.get('report_uri')})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
