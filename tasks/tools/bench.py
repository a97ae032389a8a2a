"""The streaming benchmark (``make bench``): images/s and latency of three ways to serve frames.

One run starts its own services on loopback ports (a Tansu broker, the bundled
``tritonserver`` with a freshly rendered local model repository), measures, and
stops every process it started by PID:

(a) **ONNX Runtime in-process**: the classifier alone, float input already in
    memory, batch 32 (and 1 for reference), 1 and all-cores intra-op threads.
    The best figure is the limit of this machine for this model.
(b) **naive**: one frame at a time from Kafka, one synchronous Triton gRPC call
    at batch 1, the prediction produced and flushed, one Qdrant upsert (when
    the policy indexes the frame), one synchronous offset commit, per message;
    run with each Qdrant policy that (c) runs with, so each speed-up compares
    the same sink work.
(c) **the consumer** (``mlpipe stream`` as deployed, a subprocess),
    frames produced straight to ``frames`` by the bench as edge devices would
    (encoded as the model spec says: PNG digits by default, contract headers, ``captured_at``;
    Triton's preprocess model decodes them, the consumer only checks cheap properties):

    * max: ``--frames`` frames are produced first, then the consumer drains
      them; images/s = frames / the consumer's busy time (``--stats-json``);
    * latency: a fresh consumer, a rate-limited producer at 50 % of that max,
      end-to-end latency = the time the bench reads the prediction back from
      ``predictions`` minus the frame's ``captured_at``. The frames are built
      before the timed run (only the capture time is stamped when sent), so the
      load generator takes as little as possible of the cores it shares.

    For the default Qdrant policy and for ``all`` (every frame indexed).

``--model`` (default ``MLPIPE_MODEL_NAME`` or digits; ``make bench MODEL=shapes``) picks the model
project: its spec sizes the classifier, the frames and the golden set.

The bench's topics have one partition (``--partitions``): one consumer reads
them, and the local Tansu broker, which shares the cores with everything
measured, spends about 2.5x the CPU per fetch with three. The model is trained
like the demo's (3,000 images of the model's data, 8 epochs; cached), or ``--onnx``.

Also: DAG parse time of ``dags/*.py`` (Airflow's DagBag on each file in a
subprocess, median of 5), CPU use per process during the max drain, Triton's
per-model statistics, and, when a target is missed (``--profile auto``), a
cProfile of the consumer's main loop.

Writes ``<out>/results.json`` (``ort_inprocess_fps``, ``naive_fps``,
``consumer_fps``, ``consumer_p95_ms_at_half_load``, ``dag_parse_s`` plus details)
and ``<out>/results.md`` (the table), default ``$MLPIPE_HOME/bench``.

CLI: ``mlpipe bench --help``. Traffic goes to 127.0.0.1 only; every
loop has a count and a time limit.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import platform
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import psutil

from tasks.contracts import layout
from tasks.contracts.files import atomic_write, sha256_bytes
from tasks.local.procs import LOOPBACK, ManagedProcess, free_port, http_ok, wait_until

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np

    from tasks.adapters.kafka import KafkaConfig

logger = logging.getLogger(__name__)

TARGET_SPEEDUP = 20.0  # (c) / (b)
TARGET_P95_MS = 25.0  # at half of (c)'s max (issue 14; it was 50 ms)
TARGET_FRACTION_OF_ORT = 0.7  # issue 14: (c), default policy, / (a) in the same run
TARGET_FRACTION_OF_ORT_ALL = 0.5  # the same with every frame indexed (policy ``all``)
HALF_LOAD = 0.5
DEFAULT_POLICY_NAME = "default"
RESULT_KEYS = ("ort_inprocess_fps", "naive_fps", "consumer_fps", "consumer_p95_ms_at_half_load",
               "consumer_fraction_of_ort", "compiled_speedup", "consumers_2_fps")
# the consumer must measure what is deployed: settings from the environment would change it
_SCRUBBED_ENV_PREFIXES = ("MLPIPE_KAFKA_", "MLPIPE_QDRANT_", "MLPIPE_CONSUMER_", "MLPIPE_TRITON_",
                          "MLPIPE_MAX_FRAME_BYTES", "MLPIPE_LOG_LEVEL")


class BenchError(RuntimeError):
    """The benchmark could not run (a service did not start, a phase timed out...)."""


# --------------------------------------------------------------------------- configuration


@dataclass
class BenchConfig:
    """What one run measures. Counts bound every loop; ``phase_timeout_s`` bounds every wait."""

    out_dir: Path
    frames: int = 20_000  # (c) max: frames produced first, then drained
    naive_frames: int = 1_000  # (b)
    naive_seconds: float = 60.0  # (b) stops at this time limit if the count is not reached
    latency_seconds: float = 8.0  # (c) latency: how long the rate-limited producer runs, per rate
    latency_fractions: tuple[float, ...] = (0.1, 0.25, HALF_LOAD)  # of (c)'s max; HALF_LOAD is the headline
    ort_seconds: float = 2.0  # (a) per configuration
    policies: tuple[str, ...] = (DEFAULT_POLICY_NAME, "all")
    onnx: Path | None = None  # a trained classifier; default: train (and cache) a quick one
    train_images: int = 3_000  # like the demo's model: a 3,000-image drop, 8 epochs
    train_epochs: int = 8
    seed: int = 0
    consumer_args: tuple[str, ...] = ()  # extra ``tasks.serving.consumer`` arguments (default: as deployed)
    profile: str = "auto"  # auto (when a target is missed) | always | never
    profile_frames: int = 5_000
    dag_parse: bool = True
    dag_repeats: int = 5
    phase_timeout_s: float = 300.0
    session_timeout_ms: int = 6000
    partitions: int = 1  # of the bench's topics: one consumer reads them (see --partitions)
    model: str = "digits"  # the model project (models/<name>/spec.yaml)
    serve: str = "auto"  # what Triton serves in (b) and (c): auto (what QC serves on CPU) | fp32 | a compiled file

    @property
    def spec(self) -> Any:
        from tasks.config import load_settings

        return load_settings().model_spec(self.model)

    def validate(self) -> None:
        for name in ("frames", "naive_frames", "profile_frames", "train_images", "train_epochs", "dag_repeats",
                     "session_timeout_ms", "partitions"):
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        for name in ("latency_seconds", "ort_seconds", "naive_seconds", "phase_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"--{name.replace('_s', '').replace('_', '-')} must be > 0")
        if self.profile not in {"auto", "always", "never"}:
            raise ValueError(f"--profile must be auto, always or never, got {self.profile!r}")
        if HALF_LOAD not in self.latency_fractions or not all(0 < f <= 1 for f in self.latency_fractions):
            raise ValueError(f"--latency-fractions must lie in (0, 1] and include {HALF_LOAD} (the headline), "
                             f"got {','.join(map(str, self.latency_fractions))}")
        if self.serve not in SERVE_CHOICES:
            raise ValueError(f"--serve must be one of {', '.join(SERVE_CHOICES)}, got {self.serve!r}")
        if not self.policies:
            raise ValueError("--policies needs at least one Qdrant policy (e.g. default,all)")
        from tasks.serving.consumer import QdrantPolicy

        for p in self.policies:
            if p != DEFAULT_POLICY_NAME:
                QdrantPolicy.parse(p)  # raises ValueError naming the bad part
        if self.onnx is not None and not Path(self.onnx).is_file():
            raise ValueError(f"--onnx {self.onnx} is not a file: pass a trained model.onnx "
                             "(e.g. models/digits/<version>/model.onnx from the store) or leave it out")


def policy_text(name: str) -> str:
    """``"default"`` -> the consumer's default Qdrant policy; anything else as given."""
    from tasks.serving.consumer import DEFAULT_QDRANT_POLICY

    return DEFAULT_QDRANT_POLICY if name == DEFAULT_POLICY_NAME else name


# --------------------------------------------------------------------------- small helpers


def percentile(values: Sequence[float], q: float, ndigits: int = 3) -> float | None:
    """The ``q``-th percentile of ``values`` (numpy's linear interpolation), rounded; None when empty."""
    import numpy as np

    return round(float(np.percentile(np.asarray(values, dtype=float), q)), ndigits) if len(values) else None


def _summary(values_ms: Sequence[float]) -> dict[str, Any]:
    return {"n": len(values_ms), "p50_ms": percentile(values_ms, 50), "p95_ms": percentile(values_ms, 95),
            "p99_ms": percentile(values_ms, 99), "max_ms": round(max(values_ms), 3) if values_ms else None}


def _iso(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.timezone.utc).isoformat()


def machine_info() -> dict[str, Any]:
    import numpy as np
    import onnxruntime as ort

    cpu_model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gib = round(psutil.virtual_memory().total / 1024 ** 3, 1)
    commit = ""
    try:
        from tasks.config import PROJECT_ROOT

        out = subprocess.run(["git", "-C", str(PROJECT_ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=5)
        commit = out.stdout.strip() if out.returncode == 0 else ""
    except (OSError, subprocess.SubprocessError):
        pass
    return {"cpus": os.cpu_count(), "cpu_model": cpu_model, "mem_gib": mem_gib, "platform": platform.platform(),
            "python": platform.python_version(), "onnxruntime": ort.__version__, "numpy": np.__version__,
            "git_commit": commit, "loadavg_start": [round(x, 2) for x in os.getloadavg()]}


# --------------------------------------------------------------------------- CPU accounting

def proc_cpu_s(proc: psutil.Process) -> float | None:
    """User + system CPU seconds of one live process (None when gone)."""
    try:
        t = proc.cpu_times()
    except psutil.Error:
        return None
    return t.user + t.system


def process_tree(pid: int | None) -> list[int]:
    """``pid`` and its live descendants (a server and the children it spawned); [] when gone."""
    if not pid:
        return []
    try:
        proc = psutil.Process(pid)
        return [pid, *(c.pid for c in proc.children(recursive=True))]
    except psutil.Error:
        return []


def machine_busy_s() -> float:
    """CPU seconds all processes of the machine spent busy (every CPU time but idle and iowait)."""
    t = psutil.cpu_times()
    return sum(getattr(t, f) for f in ("user", "nice", "system", "irq", "softirq", "steal") if hasattr(t, f))


class CpuSampler:
    """Samples the CPU seconds of named process groups every ``interval`` (a daemon thread).

    ``groups``: name -> callable returning the pids of that group now. ``usage(t0, t1)``
    interpolates cores used per group over a wall-clock window.
    """

    def __init__(self, groups: dict[str, Callable[[], list[int]]], interval: float = 0.1) -> None:
        self.groups = groups
        self.interval = interval
        self.samples: list[tuple[float, dict[str, float]]] = []
        self._last: dict[int, float] = {}  # pid -> last CPU seen (a process that exits keeps its total)
        self._procs: dict[int, psutil.Process] = {}
        self._members: dict[str, list[int]] = {}
        self._members_at = -1e9
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cpu-sampler", daemon=True)

    def _sample(self) -> None:
        now = time.monotonic()
        if now - self._members_at > 1.0:
            self._members = {name: fn() for name, fn in self.groups.items()}
            self._members_at = now
        totals: dict[str, float] = {}
        for name, pids in self._members.items():
            s = 0.0
            for pid in pids:
                proc = self._procs.get(pid)
                if proc is None:
                    try:
                        proc = self._procs[pid] = psutil.Process(pid)
                    except psutil.Error:
                        continue
                cpu = proc_cpu_s(proc)
                if cpu is not None:
                    self._last[pid] = cpu
                s += self._last.get(pid, 0.0)
            totals[name] = s
        totals["machine"] = machine_busy_s()
        self.samples.append((time.time(), totals))

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.interval)

    def __enter__(self) -> "CpuSampler":
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._sample()

    def _at(self, t: float) -> dict[str, float]:
        s = self.samples
        if not s:
            return {}
        if t <= s[0][0]:
            return dict(s[0][1])
        for (ta, va), (tb, vb) in zip(s, s[1:]):
            if ta <= t <= tb:
                w = (t - ta) / (tb - ta) if tb > ta else 0.0
                return {k: va.get(k, 0.0) + w * (vb.get(k, 0.0) - va.get(k, 0.0)) for k in vb}
        return dict(s[-1][1])

    def usage(self, t0: float, t1: float) -> dict[str, float]:
        """Cores used per group between wall-clock times ``t0`` and ``t1`` (``machine``: every process;
        ``other``: the machine minus the groups, i.e. load that is not the benchmark's)."""
        if t1 <= t0:
            return {}
        a, b = self._at(t0), self._at(t1)
        out = {k: round((b.get(k, 0.0) - a.get(k, 0.0)) / (t1 - t0), 3) for k in b}
        ours = sum(v for k, v in out.items() if k != "machine")
        if "machine" in out:
            out["other"] = round(max(0.0, out["machine"] - ours), 3)
        return out


# --------------------------------------------------------------------------- Triton statistics

_TRITON_METRICS = ("nv_inference_request_success", "nv_inference_count", "nv_inference_exec_count",
                   "nv_inference_request_duration_us", "nv_inference_queue_duration_us",
                   "nv_inference_compute_input_duration_us", "nv_inference_compute_infer_duration_us",
                   "nv_inference_compute_output_duration_us")


def prometheus_families(url: str) -> list[Any] | None:
    """The metric families a Prometheus text endpoint serves now (``prometheus_client``'s parser); None when
    unreadable. A counter family is named without ``_total``; its samples carry it."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    try:
        with urllib.request.urlopen(url, timeout=5) as resp:  # noqa: S310 - loopback
            text = resp.read().decode()
        return list(text_string_to_metric_families(text))
    except (OSError, ValueError) as exc:
        logger.warning("metrics at %s unreadable: %s", url, exc)
        return None


def triton_metrics(url: str) -> dict[tuple[str, str], float]:
    """``{(metric, model): value}`` from Triton's Prometheus endpoint (summed over versions)."""
    out: dict[tuple[str, str], float] = {}
    for family in prometheus_families(url) or []:
        if family.name not in _TRITON_METRICS:
            continue
        for sample in family.samples:
            if "model" in sample.labels:
                key = (family.name, sample.labels["model"])
                out[key] = out.get(key, 0.0) + sample.value
    return out


def triton_delta(before: dict[tuple[str, str], float], after: dict[tuple[str, str], float]) -> dict[str, Any]:
    """Per model: requests, average batch size, time per execution and per request (ms)."""
    models = sorted({m for _, m in after})
    out: dict[str, Any] = {}
    for m in models:
        d = {k: after.get((k, m), 0.0) - before.get((k, m), 0.0) for k in _TRITON_METRICS}
        req, execs, inf = d["nv_inference_request_success"], d["nv_inference_exec_count"], d["nv_inference_count"]
        if req <= 0:
            continue
        out[m] = {
            "requests": int(req), "executions": int(execs), "inferences": int(inf),
            "avg_batch": round(inf / execs, 1) if execs else None,
            "request_ms": round(d["nv_inference_request_duration_us"] / req / 1000, 3),
            "queue_ms": round(d["nv_inference_queue_duration_us"] / req / 1000, 3),
            "compute_ms_per_exec": round((d["nv_inference_compute_input_duration_us"]
                                          + d["nv_inference_compute_infer_duration_us"]
                                          + d["nv_inference_compute_output_duration_us"]) / max(execs, 1) / 1000, 3),
            "compute_s": round((d["nv_inference_compute_input_duration_us"] + d["nv_inference_compute_infer_duration_us"]
                                + d["nv_inference_compute_output_duration_us"]) / 1e6, 3),
        }
    return out


# --------------------------------------------------------------------------- the model


def _train_set(spec: Any, n: int, seed: int) -> tuple["np.ndarray", "np.ndarray"]:
    """``n`` images of ``spec``'s data source from the drop pool (never the golden set), balanced over classes."""
    import numpy as np

    from tasks.steps import sources

    src = sources.load(spec)  # the same images drops are made of
    rng = np.random.default_rng(seed)
    per_class = max(1, n // spec.num_classes)
    pool_labels = src.labels[src.pool]
    idx = np.concatenate([rng.permutation(src.pool[pool_labels == c])[:per_class] for c in range(spec.num_classes)])
    idx = rng.permutation(idx)
    return np.asarray(src.images[idx]), np.asarray(src.labels[idx])


def golden_scores(onnx_path: Path, spec: Any) -> dict[str, Any]:
    """Accuracy and top-1 softmax scores of ``onnx_path`` on the golden set (what the frames are)."""
    import numpy as np

    from tasks.model.networks import onnx_session, run_onnx, to_input
    from tasks.serving.consumer import DEFAULT_QDRANT_POLICY, QdrantPolicy
    from tasks.steps.drops import golden_set

    X, y = golden_set(spec)
    logits = run_onnx(onnx_session(onnx_path), to_input(X, spec), spec)[0]
    z = np.exp(logits - logits.max(axis=1, keepdims=True))
    p = z / z.sum(axis=1, keepdims=True)
    score = p.max(axis=1)
    threshold = QdrantPolicy.parse(DEFAULT_QDRANT_POLICY).low_confidence or 0.0
    return {"golden_accuracy": round(float((p.argmax(axis=1) == y).mean()), 4),
            "low_confidence_threshold": threshold,
            "frac_score_below_threshold": round(float((score < threshold).mean()), 4)}


def prepare_model(cfg: BenchConfig) -> tuple[Path, dict[str, Any]]:
    """The classifier to benchmark: ``cfg.onnx``, or a quick model trained on real digits (cached)."""
    if cfg.onnx is not None:
        path = Path(cfg.onnx).resolve()
        info = {"source": str(path), **golden_scores(path, cfg.spec)}
        return path, info
    from tasks.model.networks import export_onnx
    from tasks.steps.train import train_arrays

    mdir = cfg.out_dir / "model" / cfg.model
    # the trainer's source is part of the key: a change to the model or the recipe trains a new one
    code = sha256_bytes(b"".join((Path(__file__).resolve().parent.parent / f).read_bytes()
                                 for f in ("model/networks.py", "steps/train.py")))
    spec = cfg.spec
    params = {"model": spec.name, "train_images": cfg.train_images, "epochs": cfg.train_epochs, "seed": cfg.seed,
              "trainer_sha256": code[:16], "spec": spec.model_dump(mode="json")}
    meta_path, onnx_path = mdir / "model.json", mdir / "model.onnx"
    try:
        meta = json.loads(meta_path.read_text())
        if meta.get("params") == params and onnx_path.is_file():
            logger.info("reusing the benchmark model %s (%s)", onnx_path, params)
            return onnx_path, {**meta["info"], **golden_scores(onnx_path, cfg.spec)}
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        pass
    print(f"training a benchmark classifier for {spec.name} on {cfg.train_images} images from "
          f"{spec.golden_set.source}, {cfg.train_epochs} epochs (cached for later runs)...", flush=True)
    X, y = _train_set(spec, cfg.train_images, cfg.seed)
    t0 = time.perf_counter()
    model, _, metrics = train_arrays(X, y, spec, epochs=cfg.train_epochs, seed=cfg.seed, patience=cfg.train_epochs)
    export_onnx(model, onnx_path, spec)
    info = {"source": "trained by tasks.tools.bench", **params, "train_seconds": round(time.perf_counter() - t0, 1),
            "val_accuracy": round(float(metrics["val_accuracy"]), 4), **golden_scores(onnx_path, spec)}
    atomic_write(meta_path, json.dumps({"params": params, "info": info}, indent=2), mode=0o644)
    return onnx_path, info


# --------------------------------------------------------------------------- (a) ONNX Runtime in-process


def bench_ort(onnx_path: Path, seconds: float, spec: Any, batch_sizes: Sequence[int] = (32, 1),
              threads: Sequence[int] | None = None) -> dict[str, Any]:
    """images/s and per-batch p50/p95 of the bare ONNX session, each (threads, batch) for ``seconds``."""
    import numpy as np

    from tasks.model.networks import onnx_session, to_input
    from tasks.steps.drops import golden_set

    X, _ = golden_set(spec)
    x = to_input(X, spec)
    name = spec.onnx.input
    threads = list(threads or sorted({1, os.cpu_count() or 1}))
    runs = []
    for th in threads:
        sess = onnx_session(onnx_path, threads=th)
        for bs in batch_sizes:
            batches = [np.ascontiguousarray(x[i:i + bs]) for i in range(0, len(x) - bs + 1, bs)]
            for b in batches[:3]:
                sess.run(None, {name: b})  # warm-up
            lat: list[float] = []
            n = 0
            c0 = time.process_time()
            t0 = time.perf_counter()
            deadline = t0 + seconds
            i = 0
            while time.perf_counter() < deadline and i < 10_000_000:
                b = batches[i % len(batches)]
                t = time.perf_counter()
                sess.run(None, {name: b})
                lat.append((time.perf_counter() - t) * 1000)
                n += len(b)
                i += 1
            elapsed = time.perf_counter() - t0
            cpu = time.process_time() - c0
            runs.append({"threads": th, "batch": bs, "images": n, "fps": round(n / elapsed, 1),
                         "cpu_ms_per_image": round(cpu / max(n, 1) * 1000, 4),
                         "batch_p50_ms": percentile(lat, 50), "batch_p95_ms": percentile(lat, 95)})
            logger.info("ORT threads=%d batch=%d: %.0f images/s", th, bs, n / elapsed)
    best = max((r for r in runs if r["batch"] == batch_sizes[0]), key=lambda r: r["fps"])
    return {"runs": runs, "best": best, "fps": best["fps"]}


# --------------------------------------------------------------------------- frames


class FrameSource:
    """Frames per the Frame contract from the model's held-out images (its golden set, encoded as the spec says)."""

    def __init__(self, spec: Any, devices: int = 32) -> None:
        from tasks.model.frames import content_type_of, encode_frame
        from tasks.steps.drops import golden_set

        images, self.labels = golden_set(spec)
        self.values = [encode_frame(img, spec) for img in images]
        self.content_type = content_type_of(spec.image_encoding).encode()
        self.keys = [f"edge-{d:02d}".encode() for d in range(devices)]

    def frame(self, i: int, topic: str) -> tuple[tuple[str, bytes, bytes, list[tuple[str, bytes]]], str, float]:
        """``((topic, value, key, headers), frame_id, captured_at epoch)`` for the ``i``-th frame."""
        from tasks.contracts.messages import H_CAPTURED_AT, H_CONTENT_TYPE, H_FRAME_ID, H_TRACEPARENT

        fid = str(uuid.uuid4())
        now = time.time()
        headers = [(H_FRAME_ID, fid.encode()), (H_CONTENT_TYPE, self.content_type),
                   (H_CAPTURED_AT, _iso(now).encode()),
                   (H_TRACEPARENT, f"00-{secrets.token_hex(16)}-{secrets.token_hex(8)}-01".encode())]
        return (topic, self.values[i % len(self.values)], self.keys[i % len(self.keys)], headers), fid, now

    def prepared(self, n: int, topic: str) -> list[tuple[str, bytes, bytes, list[tuple[str, bytes]], str]]:
        """``n`` frames ready to send but for ``captured_at``: ``(topic, value, key, headers, frame_id)``.

        Built before a timed run so that making frames (UUIDs, trace ids) does not take the CPU the
        measured processes share with the bench; ``stamp`` adds the capture time when each is sent.
        """
        from tasks.contracts.messages import H_CONTENT_TYPE, H_FRAME_ID, H_TRACEPARENT

        out = []
        for i in range(n):
            fid = str(uuid.uuid4())
            headers = [(H_FRAME_ID, fid.encode()), (H_CONTENT_TYPE, self.content_type),
                       (H_TRACEPARENT, f"00-{secrets.token_hex(16)}-{secrets.token_hex(8)}-01".encode())]
            out.append((topic, self.values[i % len(self.values)], self.keys[i % len(self.keys)], headers, fid))
        return out


def produce_all(kafka: "KafkaConfig", source: FrameSource, n: int, timeout: float = 120.0) -> dict[str, Any]:
    """Produce ``n`` frames as fast as possible and wait for every acknowledgement."""
    from tasks.adapters.kafka import BusProducer

    producer = BusProducer(kafka)
    try:
        t0 = time.perf_counter()
        chunk = 2000
        tickets = []
        for start in range(0, n, chunk):
            msgs = [source.frame(i, kafka.frames_topic)[0] for i in range(start, min(n, start + chunk))]
            tickets.append(producer.produce_batch(msgs))
            producer.poll(0)
        for ticket in tickets:
            producer.wait(ticket, timeout=timeout)
        secs = time.perf_counter() - t0
    finally:
        producer.close()
    return {"frames": n, "seconds": round(secs, 3), "fps": round(n / secs, 1)}


class PredictionReader:
    """Reads ``predictions`` in a thread; records when each frame's prediction was first seen."""

    def __init__(self, kafka: "KafkaConfig", parse: bool = False) -> None:
        self.kafka = kafka
        self.parse = parse
        self.seen: dict[str, float] = {}  # frame id -> time.time() when read
        self._raw: dict[str, bytes] = {}  # frame id -> prediction value (parsed after the run: ``reported_ms``)
        self.duplicates = 0
        self.last_new = 0.0
        self.first_new = 0.0
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="prediction-reader", daemon=True)
        self.error: str = ""

    def _run(self) -> None:
        from tasks.adapters.kafka import TailFollower
        from tasks.contracts.messages import H_FRAME_ID

        follower = TailFollower(self.kafka, [self.kafka.predictions_topic], window=0,
                                # 20 ms: a hop costs the same (~7 ms) as at 5 ms, and Tansu spends
                                # half its CPU on the fetches (the reader is not what is measured)
                                **{"fetch.wait.max.ms": 20})
        try:
            deadline = time.monotonic() + 30
            while not follower.refresh(timeout=2.0):
                if time.monotonic() > deadline or self._stop.is_set():
                    self.error = f"topic {self.kafka.predictions_topic} not found"
                    return
            self._ready.set()
            while not self._stop.is_set():
                recs = follower.poll_batch(500, 0.005)  # consume() waits the whole timeout
                now = time.time()
                for r in recs:
                    raw = r.headers.get(H_FRAME_ID)
                    fid = raw.decode() if raw else ""
                    if fid in self.seen:
                        self.duplicates += 1
                        continue
                    self.seen[fid] = now
                    if self.parse and r.value:
                        self._raw[fid] = r.value  # JSON-decoded later, not on the measured cores' time
                    if not self.first_new:
                        self.first_new = now
                    self.last_new = now
        except Exception as exc:  # noqa: BLE001 - reported with the results
            self.error = str(exc)
            logger.warning("prediction reader failed: %s", exc)
        finally:
            self._ready.set()
            follower.close()

    def reported_ms(self, fid: str) -> float | None:
        """The prediction's own ``latency_ms`` (captured_at -> processed_at), None when unknown."""
        raw = self._raw.get(fid)
        try:
            lat = json.loads(raw).get("latency_ms") if raw else None
        except ValueError:
            return None
        return float(lat) if lat is not None else None

    def start(self) -> "PredictionReader":
        self._thread.start()
        self._ready.wait(35)
        return self

    def wait_for(self, ids: set[str] | int, timeout: float, alive: Callable[[], bool] | None = None,
                 idle_s: float = 30.0) -> bool:
        """Until every id (or this many predictions) was seen; False on timeout or when nothing new comes."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            n = len(self.seen)
            if (isinstance(ids, int) and n >= ids) or (not isinstance(ids, int) and ids <= self.seen.keys()):
                return True
            if self.error:
                return False
            if alive is not None and not alive() and time.time() - (self.last_new or time.time()) > 2.0:
                return False
            if self.last_new and time.time() - self.last_new > idle_s:
                return False
            time.sleep(0.05)
        return False

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


# --------------------------------------------------------------------------- services


class Services:
    """A Tansu broker and a local Triton serving the model of ``spec`` with the given classifier (version 1)."""

    def __init__(self, work: Path, onnx_path: Path, spec: Any, partitions: int = 1) -> None:
        self.work = work
        self.spec = spec
        self.model = spec.name
        self.onnx_path = onnx_path
        self.partitions = partitions
        self.broker: Any = None
        self.triton: Any = None

    def start(self) -> "Services":
        from tasks.local.broker import LocalBroker
        from tasks.model.repo import render_repo, set_serving_version, write_classifier_version
        from tasks.local.triton import LocalTriton

        self.broker = LocalBroker(self.work / "logs").start()
        repo = render_repo("local", self.work / "model_repository", self.spec)
        write_classifier_version(repo, self.spec, 1, self.onnx_path)
        set_serving_version(repo, self.spec, 1)
        from tasks.config import load_settings

        self.triton = LocalTriton(repo, self.work / "logs", load_models=[self.model],
                                  backend_dir=load_settings().home / "triton" / "backends")
        self.triton.start(timeout=120)
        client = self.triton.client()
        try:
            client.wait_model_ready(self.model, timeout=120)
        finally:
            client.close()
        print(f"services: broker {self.broker.bootstrap} (pid {self.broker.pid}), triton grpc "
              f"{self.triton.grpc_url} (pid {self.triton.pid})", flush=True)
        return self

    def stop(self) -> None:
        if self.triton is not None:
            self.triton.stop()
        if self.broker is not None:
            self.broker.stop()

    def kafka(self, name: str, partitions: int | None = None) -> "KafkaConfig":
        """A KafkaConfig with fresh topics for one phase (``bench.<name>.<random>.``), ``partitions`` each (default
        the bench's)."""
        from tasks.adapters.kafka import KafkaConfig, ensure_topics

        cfg = KafkaConfig(bootstrap=self.broker.bootstrap, topic_prefix=f"bench.{name}.{secrets.token_hex(3)}.",
                          client_id="mlpipe-bench", partitions=partitions or self.partitions)
        ensure_topics(cfg)
        return cfg

    def drop_topics(self, cfg: "KafkaConfig") -> None:
        from tasks.adapters.kafka import delete_topics

        try:
            delete_topics(cfg, timeout=5)
        except Exception as exc:  # noqa: BLE001 - memory is freed when the broker stops anyway
            logger.debug("deleting topics %s: %s", cfg.all_topics, exc)

    def cpu_groups(self, consumer_pid: Callable[[], int | None]) -> dict[str, Callable[[], list[int]]]:
        tpid, bpid = self.triton.pid, self.broker.pid

        def consumer() -> list[int]:
            pid = consumer_pid()
            return [pid] if pid else []
        return {"consumer": consumer, "triton": lambda: process_tree(tpid), "broker": lambda: [bpid],
                "bench": lambda: [os.getpid()]}


# --------------------------------------------------------------------------- (b) naive


def bench_naive(services: Services, source: FrameSource, n: int, seconds: float, work: Path,
                session_timeout_ms: int = 6000, policy_name: str = DEFAULT_POLICY_NAME) -> dict[str, Any]:
    """One frame at a time: poll 1, check the frame, Triton at batch 1 (gRPC, synchronous; it decodes), produce + flush,
    Qdrant upsert (when the policy indexes the frame; the consumer's default policy unless told), synchronous
    commit."""
    import numpy as np

    from tasks.adapters.kafka import BatchConsumer, BusProducer

    from tasks.contracts.messages import H_CONTENT_TYPE, H_FRAME_ID
    from tasks.serving.consumer import QdrantPolicy
    from tasks.model.frames import check_frame
    from tasks.adapters.triton import TritonClient
    from tasks.adapters.qdrant import PredictionPoint, open_vectors

    kafka = services.kafka("naive")
    produced = produce_all(kafka, source, n)
    qpath = work / "qdrant-naive"
    shutil.rmtree(qpath, ignore_errors=True)
    vectors = open_vectors(path=str(qpath), size=services.spec.embedding_dim)
    client = TritonClient(services.triton.grpc_url, protocol="grpc", timeout=10)
    producer = BusProducer(kafka)
    consumer = BatchConsumer(kafka, f"bench-naive-{secrets.token_hex(3)}", [kafka.frames_topic],
                             stats_interval_ms=0, **{"session.timeout.ms": session_timeout_ms})
    policy = QdrantPolicy.parse(policy_text(policy_name))
    spec, model = services.spec, services.model
    points = 0
    service_ms: list[float] = []
    parts = {"poll": 0.0, "check": 0.0, "triton": 0.0, "produce": 0.0, "qdrant": 0.0, "commit": 0.0}
    done = 0
    try:
        deadline = time.monotonic() + 60
        first = None
        while first is None and time.monotonic() < deadline:  # group join, first message
            recs = consumer.poll_batch(1, 0.2)
            first = recs[0] if recs else None
        if first is None:
            raise BenchError("naive loop: no frame arrived within 60 s (consumer group join failed?)")
        pending = [first]
        for _ in range(3):  # open the gRPC channel before timing, as a long-running loop would have
            client.infer_frames(model, [source.values[0]])
        t_start = time.perf_counter()
        limit = t_start + seconds
        while done < n and time.perf_counter() < limit:
            t0 = time.perf_counter()
            recs = pending or consumer.poll_batch(1, 1.0)
            pending = []
            t1 = time.perf_counter()
            if not recs:
                continue
            rec = recs[0]
            check_frame(rec.value, rec.header(H_CONTENT_TYPE), spec)
            t2 = time.perf_counter()
            out = client.infer_frames(model, [rec.value])
            t3 = time.perf_counter()
            fid = rec.header(H_FRAME_ID) or ""
            pred = {"frame_id": fid, "label": int(out["LABEL"][0, 0]), "score": float(out["SCORE"][0, 0]),
                    "topk": [{"label": int(a), "score": float(b)}
                             for a, b in zip(out["TOPK_LABELS"][0], out["TOPK_SCORES"][0])],
                    "model_name": model, "processed_at": _iso(time.time()),
                    "captured_at": rec.header("captured_at")}
            producer.produce(kafka.predictions_topic, json.dumps(pred).encode(), key=fid.encode(),
                             headers=[(H_FRAME_ID, fid.encode())])
            producer.flush_confirmed(timeout=10)
            t4 = time.perf_counter()
            why = policy.reason(fid, pred["score"])
            if why is not None:
                vectors.upsert_predictions([PredictionPoint(fid, np.asarray(out["EMBEDDING"][0]),
                                                            {**pred, "indexed_because": why})])
                points += 1
            t5 = time.perf_counter()
            res = consumer.commit({(rec.topic, rec.partition): rec.offset + 1})
            if not res.ok:
                raise BenchError(f"naive loop: commit failed: {res.error}")
            t6 = time.perf_counter()
            for k, a, b in (("poll", t0, t1), ("check", t1, t2), ("triton", t2, t3), ("produce", t3, t4),
                            ("qdrant", t4, t5), ("commit", t5, t6)):
                parts[k] += b - a
            service_ms.append((t6 - t0) * 1000)
            done += 1
        elapsed = time.perf_counter() - t_start
    finally:
        consumer.close()
        producer.close()
        client.close()
        vectors.close()
        services.drop_topics(kafka)
    total = sum(parts.values()) or 1.0
    result = {"frames": done, "seconds": round(elapsed, 3), "fps": round(done / elapsed, 1),
              "produce": produced, "latency": _summary(service_ms),
              "latency_definition": "per-frame service time: poll -> commit (frames were queued beforehand)",
              "time_share": {k: round(v / total, 3) for k, v in parts.items()},
              "ms_per_frame": {k: round(v / max(done, 1) * 1000, 3) for k, v in parts.items()},
              "qdrant_policy": policy.text, "qdrant_points": points}
    if done < n:
        result["note"] = f"stopped at the {seconds:.0f}s limit after {done} of {n} frames"
    return result


# --------------------------------------------------------------------------- (c) the consumer


class ConsumerRun:
    """``mlpipe stream`` as deployed (own HTTP port, Qdrant path, stats file, log)."""

    def __init__(self, kafka: "KafkaConfig", triton_url: str, work: Path, name: str, policy: str,
                 session_timeout_ms: int, extra: Sequence[str] = (), exit_when_idle: float | None = None,
                 profile_path: Path | None = None, model: str = "digits", group: str | None = None) -> None:
        self.name = name
        self.http_port = free_port()
        self.stats_path = work / f"{name}-stats.json"
        self.stats_path.unlink(missing_ok=True)
        self.qdrant_path = work / f"qdrant-{name}"
        shutil.rmtree(self.qdrant_path, ignore_errors=True)
        args = ["-m", "tasks.cli", "stream", "--bootstrap", kafka.bootstrap, "--topic-prefix", kafka.topic_prefix,
                "--group", group or f"bench-{name}", "--model", model, "--triton-url", triton_url,
                "--http-port", str(self.http_port),
                "--qdrant-policy", policy, "--qdrant-path", str(self.qdrant_path),
                "--session-timeout-ms", str(session_timeout_ms), "--stats-json", str(self.stats_path),
                "--log-level", "INFO", *extra]
        if exit_when_idle is not None:
            args += ["--exit-when-idle", str(exit_when_idle)]
        prefix = [sys.executable] + (["-m", "cProfile", "-o", str(profile_path)] if profile_path else [])
        self.argv = prefix + args
        env = {k: v for k, v in os.environ.items() if not k.startswith(_SCRUBBED_ENV_PREFIXES)}
        env["PYTHONUNBUFFERED"] = "1"
        from tasks.config import PROJECT_ROOT

        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PROJECT_ROOT), env.get("PYTHONPATH")]))
        self.proc = ManagedProcess(f"consumer-{name}", self.argv, work / "logs" / f"consumer-{name}.log", env=env,
                                   cwd=PROJECT_ROOT)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc.alive() else None

    def start(self, ready_timeout: float = 120.0) -> "ConsumerRun":
        self.proc.start()
        try:
            wait_until(lambda: http_ok(f"http://{LOOPBACK}:{self.http_port}/readyz"), ready_timeout,
                       f"consumer {self.name} /readyz", interval=0.05, alive=self.proc.alive)
        except (TimeoutError, RuntimeError) as exc:
            self.proc.stop(timeout=5)
            raise BenchError(f"{exc}; log {self.proc.log_path}:\n{self.proc.log_tail(30)}") from exc
        return self

    def wait_exit(self, timeout: float) -> bool:
        try:
            wait_until(lambda: not self.proc.alive(), timeout, f"consumer {self.name} exit", interval=0.05)
            return True
        except TimeoutError:
            return False

    def stop(self, timeout: float = 20.0) -> int | None:
        return self.proc.stop(timeout=timeout, sig=signal.SIGTERM)

    def stats(self) -> dict[str, Any]:
        try:
            return json.loads(self.stats_path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return {}


def consumer_max(services: Services, source: FrameSource, cfg: BenchConfig, policy_name: str,
                 work: Path) -> dict[str, Any]:
    """Produce ``cfg.frames`` frames first, then time the consumer's drain of them."""
    kafka = services.kafka(f"max-{_slug(policy_name)}")
    produced = produce_all(kafka, source, cfg.frames)
    run = ConsumerRun(kafka, services.triton.grpc_url, work, f"max-{_slug(policy_name)}", policy_text(policy_name),
                      cfg.session_timeout_ms, cfg.consumer_args, exit_when_idle=2.0, model=services.model)
    reader = PredictionReader(kafka).start()
    metrics_before = triton_metrics(services.triton.metrics_url)
    try:
        with CpuSampler(services.cpu_groups(lambda: run.pid)) as sampler:
            run.proc.start()
            complete = reader.wait_for(cfg.frames, cfg.phase_timeout_s, alive=run.proc.alive)
            if not run.wait_exit(30):
                logger.warning("consumer %s did not exit when idle; stopping it", run.name)
                run.stop()
        metrics_after = triton_metrics(services.triton.metrics_url)
    finally:
        run.stop()
        reader.stop()
        services.drop_topics(kafka)
    stats = run.stats()
    if not stats.get("predicted"):
        raise BenchError(f"consumer {run.name} predicted nothing; log {run.proc.log_path}:\n{run.proc.log_tail(30)}")
    busy = float(stats.get("busy_s") or 0.0)
    predicted = int(stats["predicted"])
    seen = len(reader.seen)
    window = (reader.last_new - busy, reader.last_new) if busy > 0 else (reader.first_new, reader.last_new)
    result = {
        "policy": policy_text(policy_name), "frames": cfg.frames, "produce": produced,
        "predicted": predicted, "fps": round(predicted / busy, 1) if busy > 0 else None, "busy_s": busy,
        "batches": stats.get("batches"), "avg_batch": round(predicted / max(1, int(stats.get("batches") or 1)), 1),
        "qdrant_points": stats.get("qdrant_points"), "dead_letter": stats.get("dead_letter"),
        "triton_errors": stats.get("triton_errors"), "consumer_loop_s": stats.get("stage_s"),
        "predictions_read": seen, "complete": complete and seen >= cfg.frames,
        "fps_seen_by_reader": round(seen / (reader.last_new - reader.first_new), 1)
        if reader.last_new > reader.first_new else None,
        "cpu_cores": sampler.usage(*window), "triton": triton_delta(metrics_before, metrics_after),
        "consumer_argv": run.argv[1:],
    }
    fps = result["fps"] or 0.0
    cpu = result["cpu_cores"]
    if fps > 0 and cpu:
        per = {k: round(cpu.get(k, 0.0) / fps * 1000, 4) for k in ("consumer", "triton", "broker")}
        result["cpu_ms_per_frame"] = per
        total = sum(per.values())
        # what the serving processes alone would reach if they had every core of an idle machine
        result["idle_machine_estimate_fps"] = round((os.cpu_count() or 1) * 1000 / total, 1) if total else None
    if not result["complete"]:
        result["note"] = f"only {seen} of {cfg.frames} predictions were read back"
    return result


def consumers_max(services: Services, source: FrameSource, cfg: BenchConfig, n_consumers: int = 2,
                  policy_name: str = DEFAULT_POLICY_NAME) -> dict[str, Any]:
    """``n_consumers`` consumer processes in one group over ``n_consumers`` partitions (cooperative-sticky): both
    join first (each ready, i.e. holding a partition), then ``cfg.frames`` frames are produced as fast as possible
    and drained. images/s = distinct predictions / the reader's window (first to last prediction read; at least
    the busiest consumer's busy time), so the production's overlap with the first predictions counts against it. Each process has its own Qdrant path
    (local mode allows one process per path; deployed, they share a Qdrant server)."""
    work = services.work
    name = f"pair-{_slug(policy_name)}"
    kafka = services.kafka(name, partitions=n_consumers)
    group = f"bench-{name}-{secrets.token_hex(3)}"
    runs = [ConsumerRun(kafka, services.triton.grpc_url, work, f"{name}-{k}", policy_text(policy_name),
                        cfg.session_timeout_ms, cfg.consumer_args, exit_when_idle=3.0, model=services.model,
                        group=group) for k in range(n_consumers)]
    reader = PredictionReader(kafka).start()
    try:
        for run in runs:
            run.proc.start()
        for run in runs:  # /readyz: the member holds a partition, so the group is balanced before frames come
            wait_until(lambda r=run: http_ok(f"http://{LOOPBACK}:{r.http_port}/readyz"), cfg.phase_timeout_s,
                       f"consumer {run.name} /readyz", interval=0.05, alive=run.proc.alive)
        produced = produce_all(kafka, source, cfg.frames)
        complete = reader.wait_for(cfg.frames, cfg.phase_timeout_s, alive=lambda: any(r.proc.alive() for r in runs))
        for run in runs:
            if not run.wait_exit(30):
                run.stop()
    finally:
        for run in runs:
            run.stop()
        reader.stop()
        services.drop_topics(kafka)
    stats = [run.stats() for run in runs]
    seen = len(reader.seen)
    # the reader's window (first to last prediction read), but never shorter than the busiest consumer's own
    # (first batch polled to last confirmed): a small run can be read back in one fetch, a window of 0
    window = max(reader.last_new - reader.first_new, *(float(st.get("busy_s") or 0.0) for st in stats))
    return {"consumers": n_consumers, "partitions": n_consumers, "policy": policy_text(policy_name),
            "frames": cfg.frames, "produce": produced, "predictions_read": seen, "complete": complete and seen >= cfg.frames,
            "duplicates_read": reader.duplicates, "window_s": round(window, 3),
            "fps": round(seen / window, 1) if window > 0 else None,
            "per_consumer": [{"predicted": st.get("predicted"), "busy_s": st.get("busy_s"),
                              "batches": st.get("batches"), "commits": st.get("commits")} for st in stats]}


def compiled_ort(onnx_path: Path, spec: Any, seconds: float, threads: int, work: Path, calibration: int = 300,
                 seed: int = 0) -> dict[str, Any]:
    """What ``compile`` builds on CPU (``tasks.steps.compile``: the optimised graph and the INT8 QDQ model,
    calibrated on training-like images, never the golden set) measured like (a) in-process at batch 32 with
    ``threads`` intra-op threads; golden-set label agreement with the FP32 model alongside."""
    import numpy as np

    from tasks.model.networks import onnx_session, run_onnx, to_input
    from tasks.steps import compile as cmp
    from tasks.steps.drops import golden_set
    from tasks.steps.qc import QCThresholds, compare_compiled

    out: dict[str, Any] = {}
    work.mkdir(parents=True, exist_ok=True)
    X, _ = _train_set(spec, calibration, seed + 1)
    x_cal = to_input(X, spec)
    gX, gy = golden_set(spec)
    gx = to_input(gX, spec)
    ref = run_onnx(onnx_session(onnx_path), gx, spec)[0].argmax(1)
    th = QCThresholds.for_spec(spec)
    builders = {"model.opt.onnx": lambda p: cmp.optimize_onnx(onnx_path, p),
                "model.int8.onnx": lambda p: cmp.quantize_int8(onnx_path, p, x_cal, spec.onnx.input)}

    def fp32() -> float:
        return bench_ort(onnx_path, seconds, spec, batch_sizes=(32,), threads=[threads])["fps"]

    for name, build in builders.items():
        path = work / name
        try:
            info = build(path)
            labels = run_onnx(onnx_session(path), gx, spec)[0].argmax(1)
            # paired with the FP32 model measured right before and after, same threads and batch: on a shared
            # machine (a) minutes earlier is no fair baseline
            before = fp32()
            run = bench_ort(path, seconds, spec, batch_sizes=(32,), threads=[threads])
            base = (before + fp32()) / 2
            out[name] = {"fps": run["fps"], "fp32_fps_paired": round(base, 1),
                         "speedup_vs_fp32_paired": round(run["fps"] / base, 3) if base else None,
                         "agreement_with_fp32": round(float(np.mean(labels == ref)), 4),
                         # QC's own comparison, with the spec's compiled-model bars: what decides --serve auto
                         "qc_failures": compare_compiled(gy, ref, labels, spec, th)["failures"],
                         "path": str(path),
                         "bytes": path.stat().st_size, **info}
        except Exception as exc:  # noqa: BLE001 - reported: the speed-up is then of what did build
            out[name] = {"fps": None, "error": f"{type(exc).__name__}: {str(exc)[:300]}"}
    return out


SERVE_CHOICES = ("auto", "fp32", *layout.CPU_COMPILED)


def served_model(onnx_path: Path, compiled: dict[str, Any], serve: str) -> tuple[Path, dict[str, Any]]:
    """The classifier file the bench's Triton serves, and why. ``auto`` is what QC serves on CPU: the first
    compiled artefact (``layout.CPU_COMPILED`` order) that built and passed QC's comparison with ``model.onnx``
    on the golden set (``qc_failures`` empty, from ``tasks.steps.qc.compare_compiled``), else ``model.onnx``;
    ``fp32`` is ``model.onnx``; a compiled file's name serves that file (refused, with the reason, when it did not
    build)."""
    if serve == "fp32":
        return onnx_path, {"artifact": layout.MODEL_ONNX, "reason": "--serve fp32"}
    if serve != "auto":
        c = compiled.get(serve) or {}
        if not c.get("path"):
            raise BenchError(f"--serve {serve}: it did not build ({c.get('error') or 'not compiled'})")
        return Path(c["path"]), {"artifact": serve, "reason": f"--serve {serve}"}
    why_not = []
    for name in layout.CPU_COMPILED:
        c = compiled.get(name) or {}
        if not c.get("path"):
            why_not.append(f"{name} did not build")
        elif c["qc_failures"]:
            why_not.append(f"{name} failed QC's comparison with model.onnx ({'; '.join(c['qc_failures'])})")
        else:
            return Path(c["path"]), {"artifact": name, "reason": (
                f"what QC serves on CPU: {name} passed QC's comparison with model.onnx on the golden set (labels "
                f"agree {c['agreement_with_fp32']:.2%})")}
    return onnx_path, {"artifact": layout.MODEL_ONNX, "reason": "no compiled model passed QC's comparison: "
                       + "; ".join(why_not)}


def _metric_values(url: str, names: Sequence[str]) -> dict[str, float]:
    """Unlabelled samples ``names`` from a Prometheus text endpoint (missing ones are left out)."""
    return {s.name: s.value for family in prometheus_families(url) or [] for s in family.samples
            if s.name in names and not s.labels}


_BATCH_METRICS = ("mlpipe_consumer_batch_size_sum", "mlpipe_consumer_batch_size_count")


def _produce_at_rate(producer: Any, frames: Sequence[tuple[str, bytes, bytes, list[tuple[str, bytes]], str]],
                     rate: float, captured: dict[str, float], tick_s: float = 0.005) -> float:
    """Produce ``frames`` (from ``FrameSource.prepared``) at ``rate`` frames/s, the frames due every
    ``tick_s``; returns the seconds taken.

    Each frame's ``captured_at`` header is the time of the tick that sends it (never later than the
    send), and ``captured`` receives frame id -> that time (epoch). Bounded: stops at 3x ``seconds`` + 10 s.
    """
    from tasks.contracts.messages import H_CAPTURED_AT

    total = len(frames)
    t0 = time.monotonic()
    deadline = t0 + total / rate * 3 + 10
    sent = 0
    next_tick = t0
    while sent < total and time.monotonic() < deadline:
        due = min(total, int((time.monotonic() - t0) * rate) + 1)
        if due > sent:
            cap = time.time()
            stamp = (H_CAPTURED_AT, _iso(cap).encode())
            msgs = []
            for tp, value, key, headers, fid in frames[sent:due]:
                msgs.append((tp, value, key, headers + [stamp]))
                captured[fid] = cap
            producer.produce_batch(msgs)
            sent = due
        producer.poll(0)
        next_tick += tick_s
        time.sleep(max(0.0, next_tick - time.monotonic()))
    return time.monotonic() - t0


def consumer_latency(services: Services, source: FrameSource, cfg: BenchConfig, policy_name: str,
                     rates: Sequence[float], work: Path, warmup_frames: int = 300) -> list[dict[str, Any]]:
    """End-to-end latency at each rate (frames/s, in the order given): frames are produced for
    ``cfg.latency_seconds``, then every prediction is awaited.

    Each rate gets fresh topics, a fresh consumer (own Qdrant folder) and a fresh reader. The local
    Tansu broker's memory engine spends CPU per fetch in proportion to the record batches already in
    the partition, so a rate measured on the topics of the rates before it would pay for their frames
    (measured with a plain producer and consumer at 3.9k frames/s in 5 ms batches: the broker went from
    0.26 to 0.88 cores within 12 s on topics that started empty).
    """
    results = []
    for i, rate in enumerate(rates):
        result = _latency_at_rate(services, source, cfg, policy_name, rate, work, f"lat{i}-{_slug(policy_name)}",
                                  warmup_frames)
        results.append(result)
        e = result["e2e"]
        print(f"      {rate:,.0f} frames/s: end-to-end p50 {e['p50_ms']} ms, p95 {e['p95_ms']} ms", flush=True)
    return results


def _latency_at_rate(services: Services, source: FrameSource, cfg: BenchConfig, policy_name: str, rate: float,
                     work: Path, name: str, warmup_frames: int) -> dict[str, Any]:
    from tasks.adapters.kafka import BusProducer

    kafka = services.kafka(name)
    latency_log = work / f"{name}-latency.json"
    latency_log.unlink(missing_ok=True)
    run = ConsumerRun(kafka, services.triton.grpc_url, work, name, policy_text(policy_name),
                      cfg.session_timeout_ms, [*cfg.consumer_args, "--latency-log", str(latency_log)],
                      model=services.model)
    metrics_url = f"http://{LOOPBACK}:{run.http_port}/metrics"
    reader = PredictionReader(kafka).start()  # for the warm-up only
    try:
        run.start()
        producer = BusProducer(kafka)
        try:
            # warm-up (not measured): the first batches of a fresh consumer open the Triton channel and the
            # Qdrant collection; a burst of frames exercises every path (full and partial batches) once.
            warm: dict[str, float] = {}
            msgs = []
            for i in range(warmup_frames):
                msg, fid, cap = source.frame(i, kafka.frames_topic)
                msgs.append(msg)
                warm[fid] = cap
            producer.produce_batch(msgs)
            producer.flush_confirmed(timeout=30)
            reader.wait_for(set(warm), timeout=60, alive=run.proc.alive)
            warm_ms = [(reader.seen[f] - c) * 1000 for f, c in warm.items() if f in reader.seen]
            # No reader while frames are timed: its fetches would take broker CPU from the measured cores.
            # Afterwards a fresh one reads `predictions` from the start to check every frame's prediction.
            reader.stop()
            captured: dict[str, float] = {}
            frames = source.prepared(max(1, int(rate * cfg.latency_seconds)), kafka.frames_topic)
            before = _metric_values(metrics_url, _BATCH_METRICS)
            with CpuSampler(services.cpu_groups(lambda: run.pid), interval=0.25) as sampler:
                w0 = time.time()
                produce_s = _produce_at_rate(producer, frames, rate, captured)
            producer.flush_confirmed(timeout=30)
            reader = PredictionReader(kafka, parse=True).start()
            complete = reader.wait_for(set(captured), timeout=max(30.0, cfg.latency_seconds * 3),
                                       alive=run.proc.alive)
            after = _metric_values(metrics_url, _BATCH_METRICS)
        finally:
            producer.close()
    finally:
        run.stop()
        reader.stop()
        services.drop_topics(kafka)
    try:
        sink_log = json.loads(latency_log.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        sink_log = []
    result = _latency_result(policy_name, rate, captured, reader, produce_s, complete, sink_log, w0)
    result["cpu_cores"] = sampler.usage(w0, w0 + produce_s)
    n_batches = after.get(_BATCH_METRICS[1], 0.0) - before.get(_BATCH_METRICS[1], 0.0)
    n_frames = after.get(_BATCH_METRICS[0], 0.0) - before.get(_BATCH_METRICS[0], 0.0)
    result["avg_batch"] = round(n_frames / n_batches, 1) if n_batches > 0 else None
    result["warmup"] = {"frames": warmup_frames, "max_ms": round(max(warm_ms), 1) if warm_ms else None}
    stats = run.stats()
    result["qdrant_points_incl_warmup"] = stats.get("qdrant_points")
    result["consumer_loop_s"] = stats.get("stage_s")  # main thread, by step (warm-up included)
    return result


def _latency_result(policy_name: str, rate: float, captured: dict[str, float], reader: PredictionReader,
                    produce_s: float, complete: bool, sink_log: Sequence[Sequence[float]] = (),
                    since: float = 0.0) -> dict[str, Any]:
    """``e2e``: captured_at -> both sinks written, per frame from the consumer's ``--latency-log`` (Kafka
    acknowledged the prediction and the Qdrant upsert returned; the consumer and the bench share the
    clock). ``reader`` read `predictions` back after the window: every frame must have its prediction."""
    read = sum(1 for f in captured if f in reader.seen)
    first = min(captured.values()) if captured else 0.0
    # warm-up frames were stamped before ``since``; the measured window's frames at or after it
    window = [entry for entry in sink_log if entry[0] >= min(since, first) - 1e-6]
    sinks = [(entry[0], entry[1] * 1000) for entry in window]
    buckets: dict[int, list[float]] = {}
    for cap, ms in sinks:
        buckets.setdefault(int(cap - first), []).append(ms)
    timeline = [{"second": s, "n": len(v), "p50_ms": percentile(v, 50), "p95_ms": percentile(v, 95)}
                for s, v in sorted(buckets.items())]
    reported = [ms for ms in (reader.reported_ms(f) for f in captured) if ms is not None]
    result = {
        "policy": policy_text(policy_name), "target_rate": round(rate, 1), "frames": len(captured),
        "achieved_rate": round(len(captured) / produce_s, 1) if produce_s > 0 else None,
        "predictions_read": read, "complete": complete,
        "e2e": _summary([ms for _, ms in sinks]),
        "e2e_definition": "captured_at header -> both sinks written (Kafka acknowledged the prediction, the "
                          "Qdrant upsert returned), per frame from the consumer's --latency-log",
        "consumer_reported": _summary(reported),
        "consumer_reported_definition": "the prediction's latency_ms: captured_at -> processed_at (Triton "
                                        "answered; before the Kafka write and the Qdrant upsert)",
        "timeline": timeline,
        "steps": latency_steps(window),
    }
    if not complete:
        result["note"] = f"{len(captured) - read} of {len(captured)} predictions were not read back in time"
    elif len(sinks) < len(captured):
        result["note"] = f"the consumer logged {len(sinks)} of {len(captured)} frames as written to both sinks"
    return result


LATENCY_STEPS = (("kafka_to_poll", "captured -> polled by the loop (producer, broker, fetch, loop turn)"),
                 ("triton", "polled -> Triton answered (frame checks, Triton's queue, decode in the ensemble)"),
                 ("answer_taken", "Triton answered -> the loop took the answer"),
                 ("sinks", "answer taken -> both sinks written (build, produce, acks, Qdrant)"))


def latency_steps(entries: Sequence[Sequence[float]]) -> dict[str, dict[str, Any]]:
    """p50/p95 of each step of the consumer's ``--latency-log`` entries ([captured_at, to sinks, to polled,
    to Triton's answer, to the answer taken], seconds): where a frame's end-to-end time goes."""
    full = [e for e in entries if len(e) >= 5]
    if not full:
        return {}
    per_step = {name: [] for name, _ in LATENCY_STEPS}
    for _, sinks, polled, answered, taken, *_ in full:
        for (name, _), a, b in zip(LATENCY_STEPS, (0.0, polled, answered, taken), (polled, answered, taken, sinks)):
            per_step[name].append((b - a) * 1000)
    return {name: _summary(values) for name, values in per_step.items()}


def _slug(policy_name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in policy_name)[:40].strip("-") or "policy"


# --------------------------------------------------------------------------- profile


_PROFILE_FUNCS = {
    # (file suffix, function) -> label; cumulative time of the consumer's main thread
    ("tasks/serving/consumer/loop.py", "_loop"): "main loop, busy time (first batch -> last commit)",
    ("tasks/serving/consumer/loop.py", "_prepare"): "cheap frame checks (Triton decodes)",
    ("tasks/serving/consumer/loop.py", "_submit"): "submit to Triton",
    ("tasks/serving/consumer/loop.py", "_results"): "wait for Triton results",
    ("tasks/serving/consumer/loop.py", "_write"): "build predictions (JSON) + produce",
    ("tasks/adapters/kafka.py", "produce_batch"): "  of which: produce calls",
    ("tasks/serving/consumer/loop.py", "_confirm"): "confirm: acks + Qdrant + commit",
    ("tasks/adapters/kafka.py", "wait"): "  of which: wait for Kafka acks",
    ("tasks/adapters/qdrant.py", "upsert_predictions"): "  of which: Qdrant upsert",
    ("tasks/adapters/kafka.py", "commit"): "  of which: offset commit",
    ("tasks/serving/consumer/loop.py", "_update_lag"): "lag metrics",
}


def profile_consumer(services: Services, source: FrameSource, cfg: BenchConfig, work: Path) -> dict[str, Any]:
    """cProfile of the consumer (default policy) draining ``cfg.profile_frames`` queued frames."""
    import pstats

    kafka = services.kafka("profile")
    produce_all(kafka, source, cfg.profile_frames)
    prof = work / "consumer.prof"
    prof.unlink(missing_ok=True)
    run = ConsumerRun(kafka, services.triton.grpc_url, work, "profile", policy_text(DEFAULT_POLICY_NAME),
                      cfg.session_timeout_ms, cfg.consumer_args, exit_when_idle=2.0, profile_path=prof,
                      model=services.model)
    try:
        run.proc.start()
        if not run.wait_exit(cfg.phase_timeout_s):
            run.stop()
    finally:
        run.stop()
        services.drop_topics(kafka)
    if not prof.is_file():
        return {"error": f"no profile written; log {run.proc.log_path}"}
    st = pstats.Stats(str(prof))
    raw = st.stats  # type: ignore[attr-defined]
    loop_ct = 0.0
    found: dict[str, float] = {}
    for (filename, _line, func), (_cc, _nc, _tt, ct, _callers) in raw.items():
        for (suffix, name), label in _PROFILE_FUNCS.items():
            if func == name and filename.endswith(suffix):
                found[label] = found.get(label, 0.0) + ct
                if name == "_loop":
                    loop_ct = ct
    stats = run.stats()
    busy = float(stats.get("busy_s") or 0.0)
    # the loop also ran while joining the group and in the idle seconds before exit (polling only), so
    # shares are of the busy time (first batch -> last commit) and polling is what the steps leave of it
    top_level = ("_prepare", "_submit", "_results", "_write", "_confirm", "_update_lag")
    steps = sum(v for (suffix, name), label in _PROFILE_FUNCS.items() if name in top_level
                for v in [found.get(label, 0.0)])
    found[_PROFILE_FUNCS[("tasks/serving/consumer/loop.py", "_loop")]] = busy
    found["poll frames + loop overhead (the rest of the busy time)"] = max(0.0, busy - steps)
    labels = list(_PROFILE_FUNCS.values()) + ["poll frames + loop overhead (the rest of the busy time)"]
    rows = [{"step": label, "seconds": round(found.get(label, 0.0), 3),
             "share": round(found.get(label, 0.0) / busy, 3) if busy else None}
            for label in labels if label in found]
    waits = {"<method 'consume' of 'cimpl.Consumer' objects>", "<method 'acquire' of '_thread.lock' objects>",
             "<method 'poll' of 'cimpl.Producer' objects>"}  # blocking waits, not work
    top = sorted(((tt, f"{Path(fn).name}:{ln}({func})") for (fn, ln, func), (_cc, _nc, tt, _ct, _c) in raw.items()
                  if func not in waits), reverse=True)[:15]
    return {"frames": cfg.profile_frames, "predicted": stats.get("predicted"), "busy_s": stats.get("busy_s"),
            "fps_under_cprofile": round(stats["predicted"] / stats["busy_s"], 1) if stats.get("busy_s") else None,
            "main_thread": rows, "top_self_time": [{"function": name, "seconds": round(tt, 3)} for tt, name in top],
            "profile_file": str(prof)}


# --------------------------------------------------------------------------- DAG parse time

_DAG_PARSE_CODE = r"""
import json, statistics, sys, time
from pathlib import Path
t0 = time.perf_counter()
import airflow.sdk  # noqa: F401 - the dag-processor has Airflow imported before it parses a file
from airflow.dag_processing.dagbag import DagBag
airflow_import_s = time.perf_counter() - t0
repeats = int(sys.argv[1])
out = {"airflow_import_s": round(airflow_import_s, 3), "files": {}}
for path in sys.argv[2:]:
    times, dags, errors = [], [], {}
    for _ in range(repeats):
        t = time.perf_counter()
        bag = DagBag(dag_folder=path, safe_mode=False)
        times.append(time.perf_counter() - t)
        dags, errors = sorted(bag.dag_ids), {k: str(v)[:300] for k, v in bag.import_errors.items()}
    out["files"][Path(path).name] = {"median_s": round(statistics.median(times), 4), "first_s": round(times[0], 4),
                                     "dags": dags, "errors": errors}
print("DAG_PARSE_JSON " + json.dumps(out))
"""


def dag_parse_times(repeats: int, home: Path, timeout: float = 300.0) -> dict[str, Any]:
    """Parse each ``dags/*.py`` with Airflow's DagBag in a fresh subprocess; median of ``repeats`` per file.

    ``dag_parse_s`` is the slowest file's median (the target: each DAG file parses in < 2 s).
    """
    from tasks.local.airflow import airflow_env
    from tasks.config import PROJECT_ROOT

    files = sorted(str(p) for p in (PROJECT_ROOT / "dags").glob("*.py") if not p.name.startswith("_"))
    if not files:
        return {"error": "no DAG files in dags/"}
    env = airflow_env(home=home)
    env["PYTHONPATH"] = os.pathsep.join([str(PROJECT_ROOT / "plugins"), str(PROJECT_ROOT / "dags"),
                                         env.get("PYTHONPATH", "")])
    env["PYTHONWARNINGS"] = "ignore"
    try:
        proc = subprocess.run([sys.executable, "-c", _DAG_PARSE_CODE, str(repeats), *files], env=env,
                              capture_output=True, text=True, timeout=timeout, cwd=str(PROJECT_ROOT))
    except subprocess.TimeoutExpired:
        return {"error": f"DAG parsing took longer than {timeout:.0f}s"}
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("DAG_PARSE_JSON ")), None)
    if proc.returncode != 0 or line is None:
        return {"error": f"DAG parse subprocess failed (exit {proc.returncode}): {proc.stderr[-1500:]}"}
    data = json.loads(line.split(" ", 1)[1])
    medians = {name: f["median_s"] for name, f in data["files"].items()}
    data["dag_parse_s"] = max(medians.values())
    data["slowest_file"] = max(medians, key=medians.get)
    data["repeats"] = repeats
    return data


# --------------------------------------------------------------------------- report


def _fmt(v: Any, digits: int = 0) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:,.{digits}f}"
    return f"{v:,}" if isinstance(v, int) else str(v)


def render_markdown(r: dict[str, Any]) -> str:
    """The results as a markdown page (table, targets, where the time goes)."""
    d = r["details"]
    ort, naive = d.get("ort", {}), d.get("naive", {})
    lines = [f"# Streaming benchmark ({r['date']})", "",
             f"Machine: {d['machine']['cpus']} CPU(s) {d['machine']['cpu_model']}, {d['machine']['mem_gib']} GiB, "
             f"load average at start {d['machine']['loadavg_start']}, at end {d['machine'].get('loadavg_end')}; "
             f"model: {d['model'].get('source')} (golden accuracy {d['model'].get('golden_accuracy')}, "
             f"{d['model'].get('frac_score_below_threshold')} of golden frames score < "
             f"{d['model'].get('low_confidence_threshold')}, the default policy's low-confidence threshold); "
             f"topics with {d['config'].get('partitions')} partition(s). "
             f"Triton serves `{(d.get('served') or {}).get('artifact', 'model.onnx')}` in (b) and (c): "
             f"{(d.get('served') or {}).get('reason', '-')}. Run took {d.get('bench_seconds')} s.", "",
             "| scenario | images/s | p50 ms | p95 ms | notes |", "|---|---:|---:|---:|---|"]
    for run in ort.get("runs", []):
        lines.append(f"| (a) ONNX Runtime in-process, batch {run['batch']}, {run['threads']} thread(s) | "
                     f"{_fmt(run['fps'])} | {_fmt(run['batch_p50_ms'], 2)} | {_fmt(run['batch_p95_ms'], 2)} | "
                     f"per batch; {run.get('cpu_ms_per_image')} ms CPU per image"
                     f"{' — **the limit**' if run == ort.get('best') else ''} |")
    for name, c in (d.get("compiled") or {}).items():
        sp = (r.get("compiled_speedup_by_artifact") or {}).get(name)
        lines.append(f"| (a') compiled `{name}` in-process, batch 32 | {_fmt(c.get('fps'))} | — | — | "
                     + (f"{_fmt(sp, 2)}x FP32 measured right before and after ({_fmt(c.get('fp32_fps_paired'))} "
                        f"images/s); labels agree with FP32 on {_fmt(100 * c['agreement_with_fp32'], 1)} % of "
                        "the golden set |" if c.get("fps") else f"not built: {c.get('error')} |"))
    for naive in (d.get("naive_by_policy") or ({"": naive} if naive else {})).values():
        lat = naive.get("latency", {})
        lines.append(f"| (b) naive: 1 frame per Triton call (batch 1, sync gRPC), flush, Qdrant upsert "
                     f"(`{naive.get('qdrant_policy')}`), sync commit | "
                     f"{_fmt(naive.get('fps'))} | {_fmt(lat.get('p50_ms'), 2)} | {_fmt(lat.get('p95_ms'), 2)} | "
                     f"{naive.get('frames')} frames, {_fmt(naive.get('qdrant_points'))} Qdrant points; "
                     f"latency = per-frame service time |")
    for name, c in d.get("consumer", {}).items():
        mx, lt = c.get("max", {}), c.get("latency", {})
        if mx:
            lines.append(f"| (c) consumer, Qdrant `{mx['policy']}`: max (drain of {mx['frames']:,} queued frames) | "
                         f"**{_fmt(mx.get('fps'))}** | — | — | avg batch {mx.get('avg_batch')}, "
                         f"{_fmt(mx.get('qdrant_points'))} Qdrant points, "
                         f"{_fmt(c.get('fraction_of_ort'), 2)} of (a), {_fmt(c.get('speedup_vs_naive'), 1)}x (b) "
                         "with the same policy |")
        for pt in reversed(c.get("latency_sweep", [])):
            e = pt.get("e2e", {})
            p95 = _fmt(e.get("p95_ms"), 1)
            head = pt is lt or pt == lt
            lines.append(f"| (c) consumer, Qdrant `{pt['policy']}`: {pt['fraction_of_max']:.0%} load "
                         f"({_fmt(pt.get('target_rate'))}/s) | {_fmt(pt.get('achieved_rate'))} | "
                         f"{_fmt(e.get('p50_ms'), 1)} | {f'**{p95}**' if head else p95} | captured -> both sinks, "
                         f"{e.get('n', 0):,} frames, avg batch {pt.get('avg_batch')}; to Triton's answer (consumer-reported): "
                         f"p95 {_fmt(pt.get('consumer_reported', {}).get('p95_ms'), 1)} ms"
                         f"{'' if pt.get('complete') else ' (fell behind)'} |")
    pair = d.get("consumers_2") or {}
    if pair:
        per = ", ".join(f"{_fmt(c.get('predicted'))}" for c in pair.get("per_consumer", []))
        lines.append(f"| (c') {pair.get('consumers', 2)} consumers, one group, {pair.get('partitions', 2)} partitions, "
                     f"Qdrant `{pair.get('policy')}`: drain of {_fmt(pair.get('frames'))} frames | "
                     f"**{_fmt(pair.get('fps'))}** | — | — | "
                     + (f"predicted per consumer: {per}; {pair.get('duplicates_read')} duplicate(s) read; "
                        f"{_fmt((pair.get('fps') or 0) / (r.get('consumer_fps') or 1), 2)}x one consumer |"
                        if pair.get("fps") else f"failed: {pair.get('error')} |"))
    t = r["targets"]
    lines += ["", "## Targets", "",
              "The headline (the keys of `results.json`) is the consumer's default Qdrant policy; `all` indexes "
              "every frame.", "",
              "| target | Qdrant policy | measured | met |", "|---|---|---|---|"]
    for c in d.get("consumer", {}).values():
        mx = c.get("max", {})
        speedup = c.get("speedup_vs_naive")
        p95 = c.get("latency", {}).get("e2e", {}).get("p95_ms")
        pol = f"`{mx.get('policy')}`"
        frac = c.get("fraction_of_ort")
        frac_target = TARGET_FRACTION_OF_ORT_ALL if mx.get("policy") == "all" else TARGET_FRACTION_OF_ORT
        lines += [f"| (c) >= {TARGET_SPEEDUP:.0f}x (b) in throughput | {pol} | {_fmt(speedup, 1)}x | "
                  f"{'yes' if speedup is not None and speedup >= TARGET_SPEEDUP else 'NO'} |",
                  f"| (c) >= {frac_target:.1f} of (a), ONNX Runtime FP32 in-process | {pol} | "
                  f"{_fmt(frac, 2)} of (a) | {'yes' if frac is not None and frac >= frac_target else 'NO'} |",
                  f"| p95 <= {TARGET_P95_MS:.0f} ms at 50 % of (c)'s max | {pol} | {_fmt(p95, 1)} ms | "
                  f"{'yes' if p95 is not None and p95 <= TARGET_P95_MS else 'NO'} |"]
    others = [(f"`{c[ph]['policy']}` {what}", c[ph]["cpu_cores"]["other"])
              for c in d.get("consumer", {}).values()
              for ph, what in (("max", "drain"), ("latency", "50 % load run"))
              if c.get(ph, {}).get("cpu_cores", {}).get("other") is not None]
    if others:
        lines += ["", f"Load from processes that are not the benchmark's (other work on this shared machine), in "
                      f"cores of {d['machine']['cpus']}: " + ", ".join(f"{w} {v:.2f}" for w, v in others)
                  + ". Every (c) figure is measured on what is left."]
    if "dag_parse" in d:
        dp = d["dag_parse"]
        if "error" in dp:
            lines += ["", f"DAG parse: {dp['error']}"]
        else:
            files = ", ".join(f"{n} {f['median_s']:.3f}s" for n, f in sorted(dp["files"].items()))
            lines += ["", f"DAG parse (DagBag per file, median of {dp['repeats']}, Airflow already imported): "
                          f"slowest {dp['slowest_file']} **{dp['dag_parse_s']:.3f} s** (target < 2 s); {files}."]
    lines += ["", "## Where the time goes", ""]
    best = ort.get("best") or {}
    cpu_rows = []
    for name, c in d.get("consumer", {}).items():
        mx = c.get("max", {})
        per = mx.get("cpu_ms_per_frame")
        if per:
            cpu_rows.append(f"| (c) `{mx['policy']}` drain | {per['consumer']:.3f} | {per['triton']:.3f} | "
                            f"{per['broker']:.3f} | {sum(per.values()):.3f} | {_fmt(mx.get('idle_machine_estimate_fps'))} |")
    if cpu_rows:
        ort_cpu = best.get("cpu_ms_per_image")
        lines += ["CPU time per frame (ms of CPU, all threads; robust to other load on the machine) and the "
                  "throughput the serving processes alone would reach with every core of an idle machine:", "",
                  "| run | consumer | triton (server + stubs) | broker | total | idle-machine estimate, images/s |",
                  "|---|---:|---:|---:|---:|---:|"]
        if ort_cpu:
            lines.append(f"| (a) ORT in-process, batch {best['batch']}, {best['threads']} thread(s) | — | "
                         f"{ort_cpu:.3f} (model only) | — | {ort_cpu:.3f} | "
                         f"{_fmt((d['machine']['cpus'] or 1) * 1000 / ort_cpu if ort_cpu else None)} |")
        lines += cpu_rows + [""]
    for name, c in d.get("consumer", {}).items():
        for phase in ("max", "latency"):
            cpu = c.get(phase, {}).get("cpu_cores")
            if cpu:
                what = "drain" if phase == "max" else "50 % load run"
                lines.append(f"CPU cores in use during the `{c[phase]['policy']}` {what}: " + ", ".join(
                    f"{k} {v:.2f}" for k, v in cpu.items()) + " (`other`: processes that are not the benchmark's).")
        tri = c.get("max", {}).get("triton")
        if tri:
            lines += ["", f"Triton per model during the `{c['max']['policy']}` drain:", "",
                      "| model | requests | avg batch | request ms | queue ms | compute ms/exec | compute s |",
                      "|---|---:|---:|---:|---:|---:|---:|"]
            for m, st in tri.items():
                lines.append(f"| {m} | {st['requests']:,} | {_fmt(st['avg_batch'], 1)} | {st['request_ms']} | "
                             f"{st['queue_ms']} | {st['compute_ms_per_exec']} | {st['compute_s']} |")
        lines.append("")
    if naive.get("ms_per_frame"):
        lines.append("Naive loop, ms per frame: " + ", ".join(f"{k} {v:.2f}" for k, v in naive["ms_per_frame"].items())
                     + ".")
        lines.append("")
    step_points = [c["latency"] for c in d.get("consumer", {}).values() if c.get("latency", {}).get("steps")]
    if step_points:
        lines += ["Where a frame's end-to-end time goes at 50 % load (from the consumer's `--latency-log`; "
                  "p50 / p95 of each step, ms; the steps' p95s do not add up to the end-to-end p95):", "",
                  "| Qdrant policy | " + " | ".join(name.replace("_", " ") for name, _ in LATENCY_STEPS)
                  + " | end to end |", "|---|" + "---:|" * (len(LATENCY_STEPS) + 1)]
        for pt in step_points:
            steps = pt["steps"]
            cells = [f"{_fmt(steps.get(name, {}).get('p50_ms'), 1)} / {_fmt(steps.get(name, {}).get('p95_ms'), 1)}"
                     for name, _ in LATENCY_STEPS]
            e = pt.get("e2e", {})
            lines.append(f"| `{pt['policy']}` | " + " | ".join(cells)
                         + f" | {_fmt(e.get('p50_ms'), 1)} / {_fmt(e.get('p95_ms'), 1)} |")
        lines += [""] + [f"- {name.replace('_', ' ')}: {what}" for name, what in LATENCY_STEPS] + [""]
    for c in d.get("consumer", {}).values():
        for phase, what in (("max", "drain"), ("latency", "50 % load run")):
            steps = c.get(phase, {}).get("consumer_loop_s")
            if steps:
                lines.append(f"Consumer main thread, `{c['max'].get('policy')}` {what}, seconds per step (`stage_s`; "
                             "poll includes idle time before the first frame and after the last): "
                             + ", ".join(f"{k} {v:.2f}" for k, v in steps.items()) + ".")
    lines.append("")
    prof = d.get("profile")
    if prof and "main_thread" in prof:
        lines += [f"cProfile of the consumer's main thread (default policy, {prof['frames']:,} queued frames, "
                  f"{_fmt(prof.get('fps_under_cprofile'))} images/s under the profiler):", "",
                  "| step | seconds | share of the loop |", "|---|---:|---:|"]
        for row in prof["main_thread"]:
            lines.append(f"| {row['step']} | {row['seconds']} | {_fmt(row['share'], 2)} |")
        lines += ["", "Top self time (blocking waits left out; the whole process life, start-up included):", ""] + [f"- {x['function']}: {x['seconds']} s" for x in prof["top_self_time"][:10]]
    elif prof:
        lines.append(f"Profile: {prof}")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- the run


def compiled_speedups(details: dict[str, Any]) -> dict[str, float]:
    """Per compiled model (those that built), its images/s over ONNX FP32 in-process at (a)'s best threads and batch
    32, FP32 measured right before and after it (``compiled_ort``)."""
    return {n: c["speedup_vs_fp32_paired"] for n, c in (details.get("compiled") or {}).items()
            if c.get("fps") and c.get("speedup_vs_fp32_paired")}


def run_bench(cfg: BenchConfig) -> dict[str, Any]:
    """Run every scenario; write ``results.json`` and ``results.md`` into ``cfg.out_dir``; return the results."""
    cfg.validate()
    t_run = time.monotonic()
    out = cfg.out_dir
    work = out / "work"
    shutil.rmtree(work, ignore_errors=True)
    (work / "logs").mkdir(parents=True, exist_ok=True)
    details: dict[str, Any] = {"machine": machine_info(), "config": {
        k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()}}
    onnx_path, model_info = prepare_model(cfg)
    details["model"] = model_info
    print(f"model: {model_info}", flush=True)

    print(f"(a) ONNX Runtime in-process ({cfg.ort_seconds:.1f}s per configuration)...", flush=True)
    details["ort"] = bench_ort(onnx_path, cfg.ort_seconds, cfg.spec)
    print(f"    {details['ort']['fps']:,.0f} images/s (batch 32, {details['ort']['best']['threads']} thread(s))",
          flush=True)
    print("(a') the compiled models (compile's CPU path: optimised graph, INT8 static quantisation), in-process...",
          flush=True)
    details["compiled"] = compiled_ort(onnx_path, cfg.spec, cfg.ort_seconds, details["ort"]["best"]["threads"],
                                       work / "compiled", seed=cfg.seed)
    for name, c in details["compiled"].items():
        print(f"    {name}: {c['fps']:,.0f} images/s" if c.get("fps") else f"    {name}: {c.get('error')}", flush=True)

    served_path, details["served"] = served_model(onnx_path, details["compiled"], cfg.serve)
    print(f"Triton serves {details['served']['artifact']} ({details['served']['reason']})", flush=True)
    source = FrameSource(cfg.spec)
    services = Services(work, served_path, cfg.spec, cfg.partitions)
    try:
        services.start()
        # (b) with each Qdrant policy, so that every (c) figure is compared with the same sink work
        details["naive_by_policy"] = {}
        for name in cfg.policies:
            print(f"(b) naive loop, {cfg.naive_frames} frames, Qdrant policy {policy_text(name)!r}...", flush=True)
            nv = bench_naive(services, source, cfg.naive_frames, cfg.naive_seconds, work, cfg.session_timeout_ms,
                             policy_name=name)
            details["naive_by_policy"][name] = nv
            print(f"    {nv['fps']:,.0f} images/s", flush=True)
        details["naive"] = (details["naive_by_policy"].get(DEFAULT_POLICY_NAME)
                            or details["naive_by_policy"][cfg.policies[0]])
        details["consumer"] = {}
        for name in cfg.policies:
            entry: dict[str, Any] = {}
            details["consumer"][name] = entry
            print(f"(c) consumer, Qdrant policy {policy_text(name)!r}: drain of {cfg.frames:,} queued frames...",
                  flush=True)
            entry["max"] = consumer_max(services, source, cfg, name, work)
            fps = entry["max"]["fps"] or 0.0
            print(f"    {fps:,.0f} images/s (avg batch {entry['max']['avg_batch']})", flush=True)
            entry["fraction_of_ort"] = round(fps / details["ort"]["fps"], 3) if details["ort"]["fps"] else None
            naive_fps = details["naive_by_policy"][name]["fps"]
            entry["naive_fps"] = naive_fps
            entry["speedup_vs_naive"] = round(fps / naive_fps, 1) if naive_fps else None
            if fps > 0:
                fractions = sorted(set(cfg.latency_fractions))
                print(f"    latency at {', '.join(f'{f:.0%}' for f in fractions)} of that, {cfg.latency_seconds:.0f}s "
                      "each...", flush=True)
                sweep = consumer_latency(services, source, cfg, name, [fps * f for f in fractions], work)
                for f, point in zip(fractions, sweep):
                    point["fraction_of_max"] = f
                entry["latency_sweep"] = sweep
                entry["latency"] = next((p for p in sweep if p["fraction_of_max"] == HALF_LOAD), {})
        print(f"(c') two consumers in one group over two partitions, drain of {cfg.frames:,} frames...", flush=True)
        try:
            details["consumers_2"] = consumers_max(services, source, cfg, 2, cfg.policies[0])
            print(f"    {details['consumers_2']['fps'] or 0:,.0f} images/s", flush=True)
        except (BenchError, TimeoutError, RuntimeError) as exc:  # reported; the other figures stand
            details["consumers_2"] = {"fps": None, "error": str(exc)[:500]}
            print(f"    failed: {exc}", flush=True)
        first = details["consumer"].get(DEFAULT_POLICY_NAME) or next(iter(details["consumer"].values()))
        speedup = first.get("speedup_vs_naive")
        p95 = first.get("latency", {}).get("e2e", {}).get("p95_ms")
        missed = not (speedup is not None and speedup >= TARGET_SPEEDUP and p95 is not None and p95 <= TARGET_P95_MS)
        if cfg.profile == "always" or (cfg.profile == "auto" and missed):
            print(f"profile: cProfile of the consumer on {cfg.profile_frames:,} frames...", flush=True)
            details["profile"] = profile_consumer(services, source, cfg, work)
    finally:
        services.stop()
    if cfg.dag_parse:
        print(f"DAG parse time (median of {cfg.dag_repeats})...", flush=True)
        details["dag_parse"] = dag_parse_times(cfg.dag_repeats, work)
    details["machine"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    details["bench_seconds"] = round(time.monotonic() - t_run, 1)

    first_max = first["max"]
    results: dict[str, Any] = {
        "ort_inprocess_fps": details["ort"]["fps"],
        "naive_fps": details["naive"]["fps"],
        "consumer_fps": first_max["fps"],
        "consumer_p95_ms_at_half_load": p95,
        # issue 14: the consumer as a fraction of (a), the compiled model's speed-up over (a), two consumers
        "consumer_fraction_of_ort": first.get("fraction_of_ort"),
        "compiled_speedup": max(compiled_speedups(details).values(), default=None),  # the fastest compiled model
        "compiled_speedup_by_artifact": compiled_speedups(details),
        "consumers_2_fps": details.get("consumers_2", {}).get("fps"),
        "consumer_fps_by_policy": {c["max"]["policy"]: c["max"]["fps"] for c in details["consumer"].values()},
        "consumer_p95_ms_at_half_load_by_policy": {
            c["max"]["policy"]: c.get("latency", {}).get("e2e", {}).get("p95_ms")
            for c in details["consumer"].values()},
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "targets": {
            "speedup_vs_naive": speedup, "speedup_target": TARGET_SPEEDUP,
            "speedup_met": bool(speedup is not None and speedup >= TARGET_SPEEDUP),
            "fraction_of_ort": first.get("fraction_of_ort"),
            "fraction_of_ort_target": TARGET_FRACTION_OF_ORT,
            "fraction_of_ort_met": bool((first.get("fraction_of_ort") or 0) >= TARGET_FRACTION_OF_ORT),
            "fraction_of_ort_all": (details["consumer"].get("all") or {}).get("fraction_of_ort"),
            "fraction_of_ort_all_target": TARGET_FRACTION_OF_ORT_ALL,
            "fraction_of_ort_all_met": bool(((details["consumer"].get("all") or {}).get("fraction_of_ort") or 0)
                                            >= TARGET_FRACTION_OF_ORT_ALL),
            "p95_ms_at_half_load": p95, "p95_target_ms": TARGET_P95_MS,
            "p95_met": bool(p95 is not None and p95 <= TARGET_P95_MS),
        },
        "details": details,
    }
    if "dag_parse" in details and "dag_parse_s" in details["dag_parse"]:
        results["dag_parse_s"] = details["dag_parse"]["dag_parse_s"]
    atomic_write(out / "results.json", json.dumps(results, indent=2) + "\n", mode=0o644)
    atomic_write(out / "results.md", render_markdown(results), mode=0o644)
    return results


# --------------------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mlpipe bench",
        description="Streaming benchmark: (a) ONNX Runtime in-process, (b) the naive one-call-per-frame design, "
                    "(c) the consumer (tasks.serving.consumer) end to end from Kafka `frames` to `predictions` + Qdrant, with "
                    "its own broker and Triton on loopback ports. Writes results.json and results.md.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=os.environ.get("MLPIPE_MODEL_NAME") or "digits",
                   help="model project (models/<name>/spec.yaml): sizes the classifier, the frames, the golden set")
    p.add_argument("--out-dir", type=Path, default=None, help="default: $MLPIPE_HOME/bench (var/bench)")
    p.add_argument("--frames", type=int, default=20_000, help="(c) frames queued, then drained (max throughput)")
    p.add_argument("--naive-frames", type=int, default=1_000, help="(b) frames through the naive loop")
    p.add_argument("--naive-seconds", type=float, default=60.0, help="(b) time limit")
    p.add_argument("--latency-seconds", type=float, default=8.0,
                   help="(c) how long frames are produced at each rate of the latency measurement")
    p.add_argument("--latency-fractions", default="0.1,0.25,0.5",
                   help="(c) rates of the latency measurement, as fractions of the max; must include 0.5")
    p.add_argument("--ort-seconds", type=float, default=2.0, help="(a) seconds per threads/batch configuration")
    p.add_argument("--policies", default=f"{DEFAULT_POLICY_NAME};all",
                   help="Qdrant policies to run (c) with, separated by ';' ('default' = the consumer's default; "
                        "a policy may itself hold commas, e.g. 'low_confidence:0.5,sample:0.01')")
    p.add_argument("--onnx", type=Path, default=None,
                   help="a trained classifier (model.onnx per docs/CONTRACTS.md); default: train a quick one on "
                        "the model's data and cache it under <out-dir>/model/<model>/")
    p.add_argument("--train-images", type=int, default=3_000,
                   help="images for the benchmark model (the demo trains on a 3,000-image drop)")
    p.add_argument("--train-epochs", type=int, default=8, help="epochs for the benchmark model (as the demo)")
    p.add_argument("--consumer-arg", action="append", default=[], metavar="ARG",
                   help="extra argument for mlpipe stream (repeatable; e.g. --consumer-arg=--max-batch=512); "
                        "default: the deployed defaults")
    p.add_argument("--profile", choices=("auto", "always", "never"), default="auto",
                   help="cProfile the consumer: when a target is missed (auto), always or never")
    p.add_argument("--profile-frames", type=int, default=5_000)
    p.add_argument("--no-dag-parse", action="store_true", help="skip the DAG parse-time measurement")
    p.add_argument("--dag-repeats", type=int, default=5)
    p.add_argument("--phase-timeout", type=float, default=300.0, help="longest wait for any one phase (s)")
    p.add_argument("--session-timeout-ms", type=int, default=6000,
                   help="Kafka session timeout of the consumers (a group join on Tansu takes about half of it)")
    p.add_argument("--partitions", type=int, default=1,
                   help="partitions of the bench's topics. One consumer reads them, so 1; the local Tansu broker "
                        "shares the measured cores and its CPU per fetch grows with the partitions (about 2.5x at 3)")
    p.add_argument("--serve", choices=SERVE_CHOICES, default="auto",
                   help="what Triton serves in (b) and (c): auto = what QC serves on CPU (the INT8 model when it "
                        "passes QC's comparison with model.onnx, else the optimised graph, else model.onnx); fp32 = "
                        "model.onnx; or a compiled file. (a) is always ONNX Runtime FP32 in-process")
    p.add_argument("--log-level", default=None, help="(default $MLPIPE_LOG_LEVEL or WARNING)")
    return p


def _fractions(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise ValueError(f"--latency-fractions must be comma-separated numbers, got {text!r}") from None


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from tasks.logs import setup_logging

    setup_logging(args.log_level, default_level="WARNING")
    logging.getLogger("tasks.adapters.kafka.librdkafka").setLevel(logging.ERROR)
    from tasks.config import load_settings

    try:
        out_dir = (args.out_dir or load_settings().home / "bench").resolve()
        cfg = BenchConfig(
            out_dir=out_dir, frames=args.frames, naive_frames=args.naive_frames, naive_seconds=args.naive_seconds,
            latency_seconds=args.latency_seconds, ort_seconds=args.ort_seconds,
            latency_fractions=_fractions(args.latency_fractions),
            policies=tuple(p.strip() for p in args.policies.split(";") if p.strip()), onnx=args.onnx,
            train_images=args.train_images, train_epochs=args.train_epochs,
            consumer_args=tuple(args.consumer_arg), profile=args.profile, profile_frames=args.profile_frames,
            dag_parse=not args.no_dag_parse, dag_repeats=args.dag_repeats, phase_timeout_s=args.phase_timeout,
            session_timeout_ms=args.session_timeout_ms, partitions=args.partitions, model=args.model,
            serve=args.serve)
        cfg.validate()
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        results = run_bench(cfg)
    except KeyboardInterrupt:
        print("error: interrupted; every service the benchmark started was stopped", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - a failed service start or phase: one line, details in the logs
        logger.debug("benchmark failed", exc_info=True)
        print(f"error: benchmark failed: {type(exc).__name__}: {exc} (logs in {cfg.out_dir / 'work' / 'logs'})",
              file=sys.stderr)
        return 1
    print()
    print((cfg.out_dir / "results.md").read_text())
    print(f"wrote {cfg.out_dir / 'results.json'} and {cfg.out_dir / 'results.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
