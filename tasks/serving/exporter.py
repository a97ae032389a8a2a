"""``mlpipe metrics-exporter``: what batch steps and outside observers know, as Prometheus metrics.

The monitor and QC are batch steps (an Airflow task each): they end before any scrape could reach
them, and a push gateway would keep a dead step's numbers as if they were current. So their results
are read where they already are, the object store, by one long-running service that Prometheus
scrapes. On every scrape (``/metrics``) the collector reads:

* **drift**: the newest monitoring report (``monitoring/latest.json``, written by ``mlpipe monitor``):
  ``mlpipe_drift_detected{model}`` (1/0), ``mlpipe_drift_check_value{model,check}`` and
  ``mlpipe_drift_check_threshold{model,check}`` per check (PSI, JS, confidence drop, KS, embedding
  cosine and MMD; a skipped check has no value), ``mlpipe_drift_status{model,status}``,
  ``mlpipe_drift_live_samples{model}``, ``mlpipe_drift_champion_version{model}`` and
  ``mlpipe_drift_report_timestamp_seconds{model}``;
* **QC**: the version manifests (``models/<model>/<version>/version.json``) and the QC report of the
  newest version QC ran on: ``mlpipe_qc_passed{model,version}`` (1/0) for the ``QC_VERSIONS`` newest
  versions with a verdict, ``mlpipe_qc_check_passed{model,version,check}`` and
  ``mlpipe_qc_check_value{model,version,check}`` of the newest one, ``mlpipe_model_serving_version{model}``
  (the version in stage ``production``);
* **consumer lag from outside the consumer**: the ``frames`` group's committed offsets against the end
  offsets (an OffsetFetch and the watermarks, ``tasks.adapters.kafka.group_offsets``; joins nothing), read
  by the sampler thread every ``--sample-interval`` seconds so a scrape never waits on a broker that is
  down (``mlpipe_kafka_offsets_age_seconds`` says how old the numbers are):
  ``mlpipe_kafka_group_lag_messages{group,topic,partition}``, ``mlpipe_kafka_group_lag_total_messages{group,topic}``,
  ``mlpipe_kafka_topic_end_offset{topic,partition}`` for ``frames``, ``predictions`` and ``frames.dlq``
  (so the DLQ rate is also seen from outside) and ``mlpipe_kafka_up`` (0 when the broker does not answer);
* **cost per frame**: a sampler thread reads, every ``--sample-interval`` seconds, the CPU time of each
  service whose PID is in ``--pid-dir`` (``<service>.pid``, the local stack's; the process, its live
  descendants and the children it reaped) and the frames the group committed.
  ``mlpipe_service_cpu_seconds_total{service}``, ``mlpipe_frames_processed_total`` (committed offsets
  summed) and ``mlpipe_cost_cpu_seconds_per_1k_frames{service}`` over the last ``--cost-window``
  seconds (``service="all"``: the sum; absent while no frame was processed in the window).

Every part fails alone: a store or broker that does not answer gives ``mlpipe_exporter_source_up{source}``
0 and the other parts are still served. ``/healthz`` answers 200 while the process runs; ``/readyz``
adds which sources answered at the last scrape.

    mlpipe metrics-exporter [--host 127.0.0.1] [--port 9109] [--model digits] [--pid-dir DIR]
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import os
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, Sequence

if TYPE_CHECKING:  # pragma: no cover
    from tasks.adapters.kafka import KafkaConfig
    from tasks.adapters.storage import Store

from tasks.contracts import layout

logger = logging.getLogger(__name__)

QC_VERSIONS = 10  # mlpipe_qc_passed is exported for this many of the newest versions with a verdict
ALL = "all"


# --------------------------------------------------------------------------- the store: drift and QC


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)):
        return float(value)
    return None


def _timestamp(text: Any) -> float | None:
    try:
        stamp = dt.datetime.fromisoformat(str(text).replace("Z", "+00:00"))
    except ValueError:
        return None
    if stamp.tzinfo is None:
        stamp = stamp.replace(tzinfo=dt.timezone.utc)
    return stamp.timestamp()


def drift_families(report: Mapping[str, Any]) -> list[Any]:
    """The metric families of one monitoring report (``monitoring/latest.json``)."""
    from prometheus_client.core import GaugeMetricFamily

    model = str(report.get("model") or "unknown")
    detected = GaugeMetricFamily("mlpipe_drift_detected", "1 when the newest drift report found drift past a "
                                 "threshold", labels=["model"])
    detected.add_metric([model], 1.0 if report.get("drift") else 0.0)
    status = GaugeMetricFamily("mlpipe_drift_status", "The newest drift report's status (1 for the current one): "
                               "ok, drift or insufficient_data", labels=["model", "status"])
    for name in ("ok", "drift", "insufficient_data"):
        status.add_metric([model, name], 1.0 if report.get("status") == name else 0.0)
    value = GaugeMetricFamily("mlpipe_drift_check_value", "A drift check's statistic in the newest report",
                              labels=["model", "check"])
    threshold = GaugeMetricFamily("mlpipe_drift_check_threshold", "A drift check's threshold",
                                  labels=["model", "check"])
    for check in report.get("checks") or ():
        name = str(check.get("name"))
        v, t = _number(check.get("value")), _number(check.get("threshold"))
        if v is not None:
            value.add_metric([model, name], v)
        if t is not None:
            threshold.add_metric([model, name], t)
    samples = GaugeMetricFamily("mlpipe_drift_live_samples", "Live predictions the newest drift report compared",
                                labels=["model"])
    samples.add_metric([model], float(report.get("samples") or 0))
    out = [detected, status, value, threshold, samples]
    champ = _number(report.get("champion"))
    if champ is not None:
        g = GaugeMetricFamily("mlpipe_drift_champion_version", "The version the newest drift report judged",
                              labels=["model"])
        g.add_metric([model], champ)
        out.append(g)
    stamp = _timestamp(report.get("created_at"))
    if stamp is not None:
        g = GaugeMetricFamily("mlpipe_drift_report_timestamp_seconds", "When the newest drift report was made",
                              labels=["model"])
        g.add_metric([model], stamp)
        out.append(g)
    return out


def _versions(store: "Store", model: str) -> list[int]:
    prefix = layout.model_prefix(model)
    versions = []
    for name in store.list_dirs(prefix):
        name = name.rstrip("/").rsplit("/", 1)[-1]
        if name.isdigit():
            versions.append(int(name))
    return sorted(versions)


def qc_families(store: "Store", models: Iterable[str], keep: int = QC_VERSIONS) -> list[Any]:
    """QC verdicts and the newest report's checks, and the serving version, from the version manifests."""
    from prometheus_client.core import GaugeMetricFamily

    passed = GaugeMetricFamily("mlpipe_qc_passed", "1 when QC passed the version, 0 when it failed",
                               labels=["model", "version"])
    check_passed = GaugeMetricFamily("mlpipe_qc_check_passed", "A QC check of the newest QC'd version: 1 passed, "
                                     "0 failed (skipped checks are absent)", labels=["model", "version", "check"])
    check_value = GaugeMetricFamily("mlpipe_qc_check_value", "A QC check's measured value (the newest QC'd version)",
                                    labels=["model", "version", "check"])
    serving = GaugeMetricFamily("mlpipe_model_serving_version", "The version in stage production", labels=["model"])
    stamp = GaugeMetricFamily("mlpipe_qc_report_timestamp_seconds", "When QC judged the newest QC'd version",
                              labels=["model", "version"])
    for model in models:
        judged: list[tuple[int, dict[str, Any]]] = []
        for version in _versions(store, model):
            try:
                manifest = store.get_json(layout.version_manifest_key(model, version))
            except Exception:  # noqa: BLE001 - a version being written has no manifest yet
                continue
            if manifest.get("stage") == "production":
                serving.add_metric([model], float(version))
            verdict = (manifest.get("qc") or {}).get("verdict")
            if verdict in ("passed", "failed"):
                judged.append((version, manifest))
        for version, manifest in judged[-keep:]:
            passed.add_metric([model, str(version)], 1.0 if manifest["qc"]["verdict"] == "passed" else 0.0)
        if not judged:
            continue
        version = judged[-1][0]
        try:
            report = store.get_json(layout.version_file_key(model, version, layout.QC_REPORT_JSON))
        except Exception:  # noqa: BLE001 - a verdict set without a report (a test fixture, an override)
            continue
        for check in report.get("checks") or ():
            name = str(check.get("name"))
            if check.get("passed") is not None:
                check_passed.add_metric([model, str(version), name], 1.0 if check["passed"] else 0.0)
            v = _number(check.get("value"))
            if v is not None:
                check_value.add_metric([model, str(version), name], v)
        at = _timestamp(report.get("at"))
        if at is not None:
            stamp.add_metric([model, str(version)], at)
    return [passed, check_passed, check_value, serving, stamp]


# --------------------------------------------------------------------------- Kafka, from outside


def lag_families(offsets: Mapping[int, tuple[int, int]], group: str, topic: str) -> list[Any]:
    """Lag per partition and in total from (committed, end) offsets; nothing committed counts the whole log."""
    from prometheus_client.core import GaugeMetricFamily

    lag = GaugeMetricFamily("mlpipe_kafka_group_lag_messages", "End offset - the group's committed offset, measured "
                            "outside the consumer", labels=["group", "topic", "partition"])
    committed = GaugeMetricFamily("mlpipe_kafka_group_committed_offset", "The group's committed offset "
                                  "(-1: nothing committed)", labels=["group", "topic", "partition"])
    total = 0
    for partition, (done, end) in sorted(offsets.items()):
        n = max(0, end - max(done, 0))
        total += n
        lag.add_metric([group, topic, str(partition)], float(n))
        committed.add_metric([group, topic, str(partition)], float(done))
    lag_total = GaugeMetricFamily("mlpipe_kafka_group_lag_total_messages", "Lag summed over the partitions",
                                  labels=["group", "topic"])
    lag_total.add_metric([group, topic], float(total))
    return [lag, committed, lag_total]


@dataclass
class KafkaSnapshot:
    at: float  # time.time() of the read
    offsets: dict[int, tuple[int, int]]  # frames partition -> (committed, end)
    ends: dict[str, dict[int, int]]  # topic -> partition -> end offset
    error: str | None = None

    @property
    def frames_processed(self) -> int | None:
        return None if self.error else sum(max(0, done) for done, _end in self.offsets.values())


class KafkaWatch:
    """The group's offsets and the topics' end offsets, read by the sampler thread (``poll``) so a scrape
    never waits on a broker that does not answer; the scrape serves the newest snapshot and its age."""

    def __init__(self, kafka: "KafkaConfig", group: str, timeout: float = 3.0,
                 clock: Callable[[], float] = time.time) -> None:
        self.kafka, self.group, self.timeout, self.clock = kafka, group, timeout, clock
        self.snapshot: KafkaSnapshot | None = None

    def poll(self) -> KafkaSnapshot:
        from tasks.adapters.kafka import broker_ready, group_offsets, topic_end_offsets

        k = self.kafka
        try:
            if not broker_ready(k.bootstrap, timeout=min(self.timeout, 2.0)):
                raise ConnectionError(f"the broker at {k.bootstrap} does not answer")
            offsets = group_offsets(k, self.group, k.frames_topic, timeout=self.timeout)
            ends = {k.frames_topic: {p: end for p, (_done, end) in offsets.items()}}
            for topic in (k.predictions_topic, k.dlq_topic):
                ends[topic] = topic_end_offsets(k, topic, timeout=self.timeout)
            snap = KafkaSnapshot(self.clock(), offsets, ends)
        except Exception as exc:  # noqa: BLE001 - reported as mlpipe_kafka_up 0, tried again next round
            if self.snapshot is None or self.snapshot.error is None:
                logger.warning("cannot read the offsets of group %s: %s", self.group, exc)
            snap = KafkaSnapshot(self.clock(), {}, {}, error=str(exc))
        self.snapshot = snap
        return snap

    def families(self) -> list[Any]:
        from prometheus_client.core import GaugeMetricFamily

        snap = self.snapshot
        up = GaugeMetricFamily("mlpipe_kafka_up", "1 when the broker answered the exporter's last offset read")
        up.add_metric([], 1.0 if snap is not None and snap.error is None else 0.0)
        out = [up]
        if snap is None:
            return out
        age = GaugeMetricFamily("mlpipe_kafka_offsets_age_seconds", "Seconds since the offsets were read")
        age.add_metric([], max(0.0, self.clock() - snap.at))
        out.append(age)
        if snap.error is None:
            out += lag_families(snap.offsets, self.group, self.kafka.frames_topic)
            ends = GaugeMetricFamily("mlpipe_kafka_topic_end_offset", "A topic partition's end offset (messages "
                                     "written so far)", labels=["topic", "partition"])
            for topic, parts in ends_items(snap.ends):
                for partition, end in parts:
                    ends.add_metric([topic, str(partition)], float(end))
            out.append(ends)
        return out


def ends_items(ends: Mapping[str, Mapping[int, int]]) -> list[tuple[str, list[tuple[int, int]]]]:
    return [(topic, sorted(parts.items())) for topic, parts in sorted(ends.items())]


# --------------------------------------------------------------------------- cost per frame


def read_pids(pid_dir: Path | None) -> dict[str, int]:
    """Service -> PID from ``<service>.pid`` files (unreadable or empty ones are left out)."""
    out: dict[str, int] = {}
    if pid_dir is None:
        return out
    for path in sorted(Path(pid_dir).glob("*.pid")):
        try:
            out[path.stem] = int(path.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            continue
    return out


def tree_cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of ``pid``, of its live descendants and of the children it reaped."""
    import psutil

    try:
        proc = psutil.Process(pid)
        t = proc.cpu_times()
        total = t.user + t.system + t.children_user + t.children_system
        for child in proc.children(recursive=True):
            try:
                c = child.cpu_times()
                total += c.user + c.system
            except psutil.Error:
                continue
        return total
    except psutil.Error:
        return None


@dataclass
class _Sample:
    at: float
    cpu: dict[str, float]
    frames: int | None


@dataclass
class CostMeter:
    """CPU seconds per 1,000 frames, by service, over a sliding window of samples.

    ``cpu()``: service -> CPU seconds now (its processes); ``frames()``: frames processed so far (None
    when unknown). A service whose CPU total went down restarted: its counter starts again from the
    new process, and the window's delta uses only samples after the restart. Frames going down (a
    broker that lost its log) start the window over."""

    cpu: Callable[[], dict[str, float]]
    frames: Callable[[], int | None]
    window_s: float = 300.0
    clock: Callable[[], float] = time.monotonic
    samples: deque = field(default_factory=deque)
    totals: dict[str, float] = field(default_factory=dict)  # CPU seconds per service, restarts folded in
    _last: dict[str, float] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def sample(self) -> None:
        now = self.clock()
        raw = self.cpu()
        frames = self.frames()
        with self.lock:
            for name, value in raw.items():
                before = self._last.get(name)
                if before is None:
                    step = value  # first seen: its CPU time since it started
                elif value >= before:
                    step = value - before
                else:
                    step = value  # restarted: the new process's time since its start
                self.totals[name] = self.totals.get(name, 0.0) + step
                self._last[name] = value
            if self.samples and frames is not None and self.samples[-1].frames is not None \
                    and frames < self.samples[-1].frames:
                self.samples.clear()
            self.samples.append(_Sample(now, dict(self.totals), frames))
            while len(self.samples) > 2 and now - self.samples[1].at >= self.window_s:
                self.samples.popleft()

    def per_1k_frames(self) -> dict[str, float]:
        """Service (and ``all``) -> CPU seconds per 1,000 frames over the window; empty without frames in it."""
        with self.lock:
            if len(self.samples) < 2:
                return {}
            first, last = self.samples[0], self.samples[-1]
        if first.frames is None or last.frames is None or last.frames <= first.frames:
            return {}
        frames = last.frames - first.frames
        out = {}
        for name, value in last.cpu.items():
            if name in first.cpu:
                out[name] = (value - first.cpu[name]) / frames * 1000.0
        if out:
            out[ALL] = sum(out.values())
        return out

    def window(self) -> tuple[float, int]:
        """(seconds, frames) the window spans now."""
        with self.lock:
            if len(self.samples) < 2:
                return 0.0, 0
            first, last = self.samples[0], self.samples[-1]
        frames = (last.frames or 0) - (first.frames or 0) if first.frames is not None else 0
        return last.at - first.at, max(0, frames)

    def families(self) -> list[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        cpu = CounterMetricFamily("mlpipe_service_cpu_seconds", "CPU seconds of a service's processes since it "
                                  "started (restarts seen by the exporter folded in)", labels=["service"])
        with self.lock:
            totals = dict(self.totals)
            frames = self.samples[-1].frames if self.samples else None
        for name, value in sorted(totals.items()):
            cpu.add_metric([name], value)
        out = [cpu]
        if frames is not None:
            f = CounterMetricFamily("mlpipe_frames_processed", "Frames the consumer group committed (both sinks "
                                    "written), summed over the partitions of frames")
            f.add_metric([], float(frames))
            out.append(f)
        cost = GaugeMetricFamily("mlpipe_cost_cpu_seconds_per_1k_frames", "CPU seconds per 1,000 frames over the "
                                 "exporter's cost window, by service (all: the sum)", labels=["service"])
        for name, value in sorted(self.per_1k_frames().items()):
            cost.add_metric([name], value)
        span, n = self.window()
        w = GaugeMetricFamily("mlpipe_cost_window_seconds", "How many seconds the cost window spans now")
        w.add_metric([], span)
        wf = GaugeMetricFamily("mlpipe_cost_window_frames", "Frames processed within the cost window")
        wf.add_metric([], float(n))
        return [*out, cost, w, wf]


# --------------------------------------------------------------------------- the collector


class ExporterCollector:
    """A ``prometheus_client`` collector: reads every source on each scrape (see the module docstring)."""

    def __init__(self, store: "Store | None", models: Sequence[str], kafka: KafkaWatch | None = None,
                 cost: CostMeter | None = None) -> None:
        self.store, self.models, self.kafka = store, list(models), kafka
        self.cost = cost
        self.up: dict[str, bool] = {}

    def _source(self, name: str, read: Callable[[], list[Any]]) -> list[Any]:
        try:
            families = read()
            self.up[name] = True
            return families
        except Exception as exc:  # noqa: BLE001 - one source down must not hide the others
            if self.up.get(name, True):
                logger.warning("metrics source %s does not answer: %s", name, exc)
            self.up[name] = False
            return []

    def _drift(self) -> list[Any]:
        assert self.store is not None
        if not self.store.exists(layout.MONITOR_LATEST):
            return []
        return drift_families(self.store.get_json(layout.MONITOR_LATEST))

    def collect(self) -> Iterable[Any]:
        from prometheus_client.core import GaugeMetricFamily

        families: list[Any] = []
        if self.store is not None:
            families += self._source("drift", self._drift)
            families += self._source("qc", lambda: qc_families(self.store, self.models))
        if self.kafka is not None:
            families += self._source("kafka", self.kafka.families)
            self.up["kafka"] = self.kafka.snapshot is not None and self.kafka.snapshot.error is None
        if self.cost is not None:
            families += self._source("cost", self.cost.families)
        up = GaugeMetricFamily("mlpipe_exporter_source_up", "1 when the source answered at this scrape",
                               labels=["source"])
        for name, ok in sorted(self.up.items()):
            up.add_metric([name], 1.0 if ok else 0.0)
        yield from families
        yield up


class Exporter:
    """The collector in its own registry, the HTTP endpoints and the cost sampler thread."""

    def __init__(self, collector: ExporterCollector, host: str = "127.0.0.1", port: int = 0,
                 sample_interval: float = 5.0) -> None:
        from prometheus_client import CollectorRegistry

        from tasks.serving.consumer.telemetry import HealthServer

        self.collector = collector
        self.registry = CollectorRegistry()
        self.registry.register(collector)
        self.sample_interval = sample_interval
        self._stop = threading.Event()
        self._sampler: threading.Thread | None = None
        self.http = HealthServer(host, port, self, live=lambda: (True, {}), ready=self._ready)
        self.port = self.http.port

    def render(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)

    def _ready(self) -> tuple[bool, dict]:
        return True, {"sources": dict(self.collector.up)}

    def sample_once(self) -> None:
        """One round of the sampler: the broker's offsets, then the cost sample (which uses them)."""
        if self.collector.kafka is not None:
            self.collector.kafka.poll()
        if self.collector.cost is not None:
            self.collector.cost.sample()

    def _sample_loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.sample_once()
            except Exception as exc:  # noqa: BLE001 - the next round tries again
                logger.warning("metrics sample failed: %s", exc)
            self._stop.wait(self.sample_interval)

    def start(self) -> "Exporter":
        if self.collector.cost is not None or self.collector.kafka is not None:
            self._sampler = threading.Thread(target=self._sample_loop, name="cost-sampler", daemon=True)
            self._sampler.start()
        self.http.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self.http.stop()
        if self._sampler is not None:  # a daemon thread: a poll waiting on a broker that is gone is not waited for
            self._sampler.join(timeout=1)


def build(store: "Store | None", models: Sequence[str], kafka: "KafkaConfig | None", group: str,
          pid_dir: Path | None, cost_window: float = 300.0, host: str = "127.0.0.1", port: int = 0,
          sample_interval: float = 5.0) -> Exporter:
    """The exporter of the CLI: ``kafka`` None exports no lag and no frames (so no cost ratio either)."""
    watch = KafkaWatch(kafka, group) if kafka is not None else None
    cost = None
    if pid_dir is not None or watch is not None:
        def cpu() -> dict[str, float]:
            out = {}
            for name, pid in read_pids(pid_dir).items():
                if pid == os.getpid():
                    continue
                value = tree_cpu_seconds(pid)
                if value is not None:
                    out[name] = value
            own = tree_cpu_seconds(os.getpid())  # the exporter's own cost is part of the bill
            if own is not None:
                out.setdefault("exporter", own)
            return out

        def frames() -> int | None:
            snap = watch.snapshot if watch is not None else None
            return snap.frames_processed if snap is not None else None

        cost = CostMeter(cpu=cpu, frames=frames, window_s=cost_window)
    return Exporter(ExporterCollector(store, models, watch, cost), host=host, port=port,
                    sample_interval=sample_interval)


def read_cost(url: str, timeout: float = 2.0) -> dict[str, Any] | None:
    """The cost per frame a running exporter reports at ``url`` (its ``/metrics``), for ``make status``:
    ``{"per_1k_frames": {service: seconds}, "window_s", "window_frames"}``; None when it does not answer."""
    import urllib.error
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 - loopback
            text = resp.read().decode()
    except (urllib.error.URLError, OSError, ValueError):
        return None
    out: dict[str, Any] = {"per_1k_frames": {}, "window_s": 0.0, "window_frames": 0}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "mlpipe_cost_cpu_seconds_per_1k_frames":
                out["per_1k_frames"][sample.labels.get("service", "?")] = sample.value
            elif sample.name == "mlpipe_cost_window_seconds":
                out["window_s"] = sample.value
            elif sample.name == "mlpipe_cost_window_frames":
                out["window_frames"] = int(sample.value)
    return out


# --------------------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> int:
    from tasks.config import load_settings

    try:
        cfg = load_settings()
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    parser = argparse.ArgumentParser(prog="mlpipe metrics-exporter", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1", help="listen address")
    parser.add_argument("--port", type=int, default=cfg.local.exporter_port, help="listen port (MLPIPE_EXPORTER_PORT)")
    parser.add_argument("--model", action="append", default=None,
                        help="a model whose QC results are exported (repeatable; default MLPIPE_MODEL_NAME)")
    parser.add_argument("--store-url", default=None, help="overrides MLPIPE_STORE_URL")
    parser.add_argument("--bootstrap", default=None, help="overrides MLPIPE_KAFKA_BOOTSTRAP")
    parser.add_argument("--group", default=cfg.consumer.group, help="the consumer group whose lag is measured "
                        "(MLPIPE_CONSUMER_GROUP)")
    parser.add_argument("--no-kafka", action="store_true", help="export no lag, offsets or frames processed")
    parser.add_argument("--pid-dir", type=Path, default=None,
                        help="folder of <service>.pid files whose CPU time is the cost per frame (the local stack's "
                             "$MLPIPE_HOME/stack/pids)")
    parser.add_argument("--sample-interval", type=float, default=5.0,
                        help="seconds between reads of the broker's offsets and of the services' CPU times")
    parser.add_argument("--cost-window", type=float, default=300.0, help="seconds the cost per frame is averaged over")
    parser.add_argument("--log-level", default=cfg.log_level, help="(MLPIPE_LOG_LEVEL)")
    args = parser.parse_args(argv)
    from tasks.logs import setup_logging

    setup_logging(args.log_level)
    logging.getLogger("tasks.adapters.kafka.librdkafka").setLevel(logging.ERROR)
    if args.sample_interval <= 0 or args.cost_window < args.sample_interval:
        print("error: --sample-interval must be > 0 and --cost-window at least one interval", file=sys.stderr)
        return 2
    from tasks.adapters.storage import open_store

    try:
        store = open_store(cfg, args.store_url)
        kafka = None
        if not args.no_kafka:
            from tasks.adapters.kafka import KafkaConfig

            kafka = KafkaConfig.from_env(bootstrap=args.bootstrap)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        exporter = build(store, args.model or [cfg.model_name], kafka, args.group, args.pid_dir,
                         cost_window=args.cost_window, host=args.host, port=args.port,
                         sample_interval=args.sample_interval)
    except OSError as exc:
        print(f"error: cannot listen on {args.host}:{args.port} ({exc}): set MLPIPE_EXPORTER_PORT or --port "
              "to a free port", file=sys.stderr)
        return 2
    exporter.start()
    logger.info("metrics exporter on http://%s:%d/metrics (store %s, kafka %s, group %s, pids %s)", args.host,
                exporter.port, store.url, kafka.bootstrap if kafka else "off", args.group, args.pid_dir)
    stop = threading.Event()
    import signal

    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    stop.wait()
    exporter.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
