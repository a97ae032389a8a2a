"""Chaos trials (``make chaos``): bounded fault injection on the local stack under a steady stream of frames.

One run starts the local stack (``tasks.local.stack.up``, the same supervisor as ``make up``) on free
loopback ports in a fresh home (``<out>/home``, default ``var/chaos/home``) with the consumer's Qdrant
policy ``all`` and a small untrained classifier deployed in Triton (accuracy does not matter here),
produces a steady stream of frames straight to Kafka ``frames`` (PNG digits of the golden set, unique
frame ids, ``--rate`` frames/s, at most ``--max-frames``), and injects one fault per trial while the
stream runs. Nothing is repaired by hand: the stack's supervisor restarts what died, the consumer
re-joins, retries and dead-letters by itself.

Faults (``--trials``, each repeated ``--rounds`` times; ``--short`` runs one of each of the first four):

* ``consumer-kill``   kill -9 of the consumer (``mlpipe stream``);
* ``triton-kill``     kill -9 of Triton's process group (the launcher, tritonserver, its Python stubs);
* ``triton-stall``    SIGSTOP of Triton's group for ``--stall-s`` seconds, then SIGCONT (a hung server);
* ``poison``          a burst of every poison kind (below) in the middle of the stream;
* ``scheduler-kill``  kill -9 of the Airflow scheduler's process group (its workers included);
* ``broker-restart``  SIGTERM to the broker service (Tansu restarts with an empty log);
* ``broker-kill``     kill -9 of the broker's process group.

Poison frames of every kind are also sprinkled at random points of the whole stream
(``--poison-every-s``): oversize value (> the consumer's 64 KiB), oversize header (20 KB), undecodable
bytes, wrong shape (32x32 PNG), missing frame id, unsupported content type (text/plain), empty value.

Recovery time per fault: from the kill (for a stall: from SIGCONT) until the faulted service is
healthy again (restarted by the supervisor, a new PID, its stack health check passing), the consumer's
``/readyz`` answers 200 and a frame produced after that was predicted.

Accounting: a frame counts as sent when the broker acknowledged it. The broker's memory engine loses
its whole log on a restart, so before a broker fault the producer pauses and the consumer drains every
acknowledged frame (and the reader of ``predictions``/``frames.dlq`` reads them); frames are produced
again only once the new broker answers, through a new producer. Lost = sent valid frames with neither a
prediction (read from Kafka ``predictions``) nor a dead letter. Duplicate Qdrant points: points minus
distinct frame ids (point id = frame id); duplicate prediction messages (at-least-once) are reported.

Writes ``<out>/results.json`` and ``<out>/results.md`` and prints the table. Exit 0 when every target
is met (0 lost, 0 duplicate Qdrant points, every poison frame dead-lettered with its reason, every
service recovered without a hand), 1 with the reasons otherwise, 2 on a usage error, 130 on Ctrl-C.
The stack is stopped (``stack down``) at the end, also on Ctrl-C, SIGTERM or a failure. All traffic
goes to 127.0.0.1; every loop has a count and a time limit.

    mlpipe chaos                      # every fault, 2 rounds (make chaos)
    mlpipe chaos --short              # consumer kill, Triton kill, stalled Triton, poison (make test)
    mlpipe chaos --trials triton-stall,poison --rounds 3
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import random
import shutil
import signal
import sys
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

logger = logging.getLogger(__name__)

MODEL_NAME = "digits"
TRIALS = ("consumer-kill", "triton-kill", "triton-stall", "poison", "scheduler-kill", "broker-restart",
          "broker-kill")
SHORT_TRIALS = ("consumer-kill", "triton-kill", "triton-stall", "poison")
#: trial -> the stack service it hits
TARGET_SERVICE = {"consumer-kill": "consumer", "triton-kill": "triton", "triton-stall": "triton",
                  "poison": "consumer", "scheduler-kill": "scheduler", "broker-restart": "broker",
                  "broker-kill": "broker"}
RESTARTING = {"consumer-kill", "triton-kill", "scheduler-kill", "broker-restart", "broker-kill"}
BROKER_TRIALS = {"broker-restart", "broker-kill"}
#: poison kind -> the dead-letter reason the consumer must give it (tasks/contracts/messages.py)
POISON_KINDS = {
    "oversize_value": "oversize",
    "oversize_header": "oversize_headers",
    "undecodable": "undecodable",
    "wrong_shape": "wrong_shape",
    "missing_frame_id": "missing_frame_id",
    "unsupported_content_type": "unsupported_content_type",
    "empty": "empty",
}
H_CHAOS_ID = "chaos_id"  # on every poison frame: a dead letter is matched to what was sent by it
OVERSIZE_VALUE_BYTES = 100_000  # above the consumer's default --max-frame-bytes (64 KiB), below 1 MB
OVERSIZE_HEADER_BYTES = 20_000  # above the 16 KiB header limit
# settings from the caller's environment would change what is tested (the stack is as deployed)
_SCRUBBED_ENV_PREFIXES = ("MLPIPE_KAFKA_", "MLPIPE_QDRANT_", "MLPIPE_CONSUMER_", "MLPIPE_TRITON_",
                          "MLPIPE_MAX_FRAME_BYTES", "MLPIPE_MODEL_REPO", "MLPIPE_GATEWAY_", "MLPIPE_HOME",
                          "MLPIPE_STORE_URL", "MLPIPE_LOG_LEVEL", "MLPIPE_AIRFLOW_PORT", "MLPIPE_SCHEDULER_HEALTH_PORT")
EXIT_OK, EXIT_MISSED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


class ChaosError(RuntimeError):
    """The run could not go on (the stack did not start, the stream did not flow...)."""


def _now_iso() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def _iso(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.timezone.utc).isoformat(timespec="microseconds")


# --------------------------------------------------------------------------- configuration


@dataclass
class ChaosConfig:
    out_dir: Path
    trials: tuple[str, ...] = TRIALS
    rounds: int = 2
    rate: float = 200.0  # frames/s of the steady stream
    max_frames: int = 400_000  # the stream stops here whatever happens
    gap_s: float = 8.0  # steady stream between trials (the flow is checked before each fault)
    stall_s: float = 5.0  # how long Triton stays SIGSTOPped
    recovery_timeout_s: float = 180.0
    drain_timeout_s: float = 120.0
    poison_every_s: float = 3.0  # a random poison frame about this often (0: only the poison trials)
    seed: int = 0
    start_timeout_s: float = 300.0
    short: bool = False

    def validate(self) -> None:
        unknown = [t for t in self.trials if t not in TRIALS]
        if unknown or not self.trials:
            raise ValueError(f"--trials: unknown {', '.join(unknown) or '(none given)'}; choose from {', '.join(TRIALS)}")
        for name in ("rounds", "max_frames"):
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be positive")
        for name in ("rate", "gap_s", "stall_s", "recovery_timeout_s", "drain_timeout_s", "start_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"--{name.replace('_s', '').replace('_', '-')} must be > 0")
        if self.rate > 2000:
            raise ValueError("--rate above 2000 frames/s would measure the load generator, not the faults")
        if self.poison_every_s < 0:
            raise ValueError("--poison-every-s must be >= 0")

    @property
    def services(self) -> str:
        """The stack services the trials need: Airflow only for the scheduler trial."""
        return "all" if "scheduler-kill" in self.trials else "serving"


# --------------------------------------------------------------------------- the model


def _spec(model: str = MODEL_NAME) -> Any:
    from tasks.config import load_settings

    return load_settings().model_spec(model)


def prepare_model(out_dir: Path, seed: int = 0, model: str = MODEL_NAME) -> Path:
    """A contract-conforming classifier of ``model``'s spec without training (seeded initial weights; cached)."""
    path = out_dir / "model" / f"{model}-untrained-seed{seed}.onnx"
    if path.is_file():
        return path
    import torch

    from tasks.model.networks import build_model, export_onnx

    spec = _spec(model)
    torch.manual_seed(seed)
    export_onnx(build_model(spec).eval(), path, spec)
    return path


def deploy_model(model_repo: Path, onnx_path: Path, model: str = MODEL_NAME) -> None:
    """Classifier version 1 in the stack's model repository, pinned as the serving version."""
    from tasks.model.repo import render_repo, set_serving_version, write_classifier_version

    spec = _spec(model)
    render_repo("local", model_repo, spec)
    write_classifier_version(model_repo, spec, 1, onnx_path)
    set_serving_version(model_repo, spec, 1)


# --------------------------------------------------------------------------- frames


class Frames:
    """Valid frames (golden-set images encoded as the spec says, contract headers) and poison frames of every
    kind: some fail the consumer's cheap checks, ``wrong_shape`` is found by Triton's preprocess model."""

    def __init__(self, seed: int = 0, devices: int = 16, model: str = MODEL_NAME) -> None:
        import numpy as np

        from tasks.model.frames import content_type_of, encode_frame
        from tasks.steps.drops import golden_set

        spec = _spec(model)
        images, _ = golden_set(spec)
        self.content_type = content_type_of(spec.image_encoding)
        self.pngs = [encode_frame(img, spec) for img in images[:200]]
        h, w = spec.input.height or 24, spec.input.width or 24
        self.wrong_shape_png = encode_frame(np.zeros((h + 4, w + 4, *spec.image_shape[2:]), np.uint8), spec)
        self.keys = [f"edge-{d:02d}".encode() for d in range(devices)]
        self.rng = random.Random(seed)

    @staticmethod
    def headers(frame_id: str | None, content_type: str) -> list[tuple[str, bytes]]:
        from tasks.adapters.kafka import new_traceparent
        from tasks.contracts.messages import H_CAPTURED_AT, H_CONTENT_TYPE, H_FRAME_ID, H_TRACEPARENT

        hs = [] if frame_id is None else [(H_FRAME_ID, frame_id.encode())]
        hs += [(H_CONTENT_TYPE, content_type.encode()), (H_CAPTURED_AT, _iso(time.time()).encode()),
               (H_TRACEPARENT, new_traceparent().encode())]
        return hs

    def valid(self, i: int) -> tuple[str, bytes, bytes, list[tuple[str, bytes]]]:
        fid = str(uuid.uuid4())
        return fid, self.pngs[i % len(self.pngs)], self.keys[i % len(self.keys)], self.headers(fid, self.content_type)

    def poison(self, kind: str) -> tuple[str, bytes, bytes, list[tuple[str, bytes]]]:
        """``(chaos_id, value, key, headers)`` of one poison frame of ``kind``."""
        cid = uuid.uuid4().hex
        fid = str(uuid.uuid4())
        good = self.pngs[self.rng.randrange(len(self.pngs))]
        if kind == "oversize_value":
            value, hs = b"\x89PNG\r\n\x1a\n" + bytes(self.rng.randrange(256) for _ in range(64)) * (
                OVERSIZE_VALUE_BYTES // 64), self.headers(fid, self.content_type)
        elif kind == "oversize_header":
            value, hs = good, self.headers(fid, self.content_type) + [("junk", b"h" * OVERSIZE_HEADER_BYTES)]
        elif kind == "undecodable":
            value, hs = b"\x00\xffthis is not an image" + os.urandom(32), self.headers(fid, self.content_type)
        elif kind == "wrong_shape":
            value, hs = self.wrong_shape_png, self.headers(fid, self.content_type)
        elif kind == "missing_frame_id":
            value, hs = good, self.headers(None, self.content_type)
        elif kind == "unsupported_content_type":
            value, hs = good, self.headers(fid, "text/plain")
        elif kind == "empty":
            value, hs = b"", self.headers(fid, self.content_type)
        else:  # pragma: no cover - POISON_KINDS is the list
            raise ValueError(kind)
        return cid, value, b"cam-poison", hs + [(H_CHAOS_ID, cid.encode())]


# --------------------------------------------------------------------------- the producer


class Stream(threading.Thread):
    """The steady stream: ``rate`` valid frames/s to ``frames`` (plus poison on request), bounded.

    A frame counts as sent when its delivery report says the broker acknowledged it (``acked``);
    failed deliveries are counted apart (``unacked``) and never in the accounting.
    """

    def __init__(self, kafka: Any, frames: Frames, rate: float, max_frames: int,
                 poison_every_s: float = 0.0, seed: int = 0) -> None:
        super().__init__(name="chaos-stream", daemon=True)
        from tasks.adapters.kafka import BusProducer

        self.kafka, self.frames, self.rate, self.max_frames = kafka, frames, rate, max_frames
        self.poison_every_s = poison_every_s
        self.rng = random.Random(seed + 1)
        self.producer = BusProducer(kafka)
        self.sent_at: dict[str, float] = {}  # valid frame id -> monotonic send time
        self.acked: dict[str, float] = {}  # valid frame id -> monotonic ack time
        self.poison_sent: dict[str, str] = {}  # chaos id -> kind (sent)
        self.poison_acked: dict[str, str] = {}  # chaos id -> kind (acknowledged)
        self.unacked: list[str] = []  # delivery errors (first few kept)
        self.unacked_count = 0
        self.produced = 0
        self._queue: list[str] = []  # poison kinds to send at the next tick
        self._lock = threading.Lock()
        self._run = threading.Event()
        self._run.set()
        self._idle = threading.Event()
        self._halt = threading.Event()
        self.error: str = ""

    # delivery reports (served by poll/flush in whichever thread calls them)
    def _on_valid(self, fid: str) -> Callable[[str | None], None]:
        def cb(err: str | None) -> None:
            if err is None:
                self.acked[fid] = time.monotonic()
            else:
                self._failed(err)
        return cb

    def _on_poison(self, cid: str, kind: str) -> Callable[[str | None], None]:
        def cb(err: str | None) -> None:
            if err is None:
                self.poison_acked[cid] = kind
            else:
                self._failed(err)
        return cb

    def _failed(self, err: str) -> None:
        self.unacked_count += 1
        if len(self.unacked) < 5:
            self.unacked.append(err)

    def inject_poison(self, kinds: Sequence[str]) -> None:
        with self._lock:
            self._queue.extend(kinds)

    def _send_poison(self, kind: str) -> None:
        cid, value, key, headers = self.frames.poison(kind)
        self.poison_sent[cid] = kind
        self.producer.produce(self.kafka.frames_topic, value, key=key, headers=headers,
                              on_delivery=self._on_poison(cid, kind))

    def run(self) -> None:
        tick = 0.01
        t0 = time.monotonic()
        due_total = 0.0
        last = t0
        next_poison = t0 + self._poison_gap()
        try:
            while not self._halt.is_set() and self.produced < self.max_frames:
                if not self._run.is_set():
                    self._idle.set()
                    self._run.wait(0.1)
                    last = time.monotonic()
                    continue
                self._idle.clear()
                now = time.monotonic()
                due_total += (now - last) * self.rate
                last = now
                n = min(int(due_total), self.max_frames - self.produced)
                due_total -= n
                for _ in range(n):
                    fid, value, key, headers = self.frames.valid(self.produced)
                    self.sent_at[fid] = time.monotonic()
                    self.producer.produce(self.kafka.frames_topic, value, key=key, headers=headers,
                                          on_delivery=self._on_valid(fid))
                    self.produced += 1
                with self._lock:
                    queued, self._queue = self._queue, []
                if self.poison_every_s and now >= next_poison:
                    queued.append(self.rng.choice(list(POISON_KINDS)))
                    next_poison = now + self._poison_gap()
                for kind in queued:
                    self._send_poison(kind)
                self.producer.poll(0)
                time.sleep(tick)
        except Exception as exc:  # noqa: BLE001 - reported by the run
            self.error = f"{type(exc).__name__}: {exc}"
            logger.warning("the stream failed: %s", exc)
        finally:
            self._idle.set()

    def _poison_gap(self) -> float:
        return self.rng.uniform(0.5, 1.5) * self.poison_every_s if self.poison_every_s else float("inf")

    def pause(self, timeout: float = 30.0) -> None:
        """Stop producing and wait for every outstanding acknowledgement."""
        self._run.clear()
        self._idle.wait(5)
        try:
            self.producer.flush_confirmed(timeout=timeout)
        except Exception as exc:  # noqa: BLE001 - failed deliveries are counted by their callbacks
            logger.info("flush before pause: %s", exc)

    def reconnect(self) -> None:
        """A new producer (the broker forgot the old one's id and sequence numbers). Only while paused."""
        from tasks.adapters.kafka import BusProducer

        old = self.producer
        try:
            old.close(timeout=2)
        except Exception:  # noqa: BLE001
            pass
        self.producer = BusProducer(self.kafka)

    def resume(self) -> None:
        self._run.set()

    def stop(self, timeout: float = 30.0) -> None:
        self._halt.set()
        self._run.set()
        self.join(10)
        try:
            self.producer.flush_confirmed(timeout=timeout)
        except Exception as exc:  # noqa: BLE001
            logger.info("final flush: %s", exc)


# --------------------------------------------------------------------------- the reader


class Reader(threading.Thread):
    """Reads ``predictions`` and ``frames.dlq`` from the beginning (no group), in a thread.

    ``reset()`` starts over on a new follower (after a broker restart: a new, empty log)."""

    def __init__(self, kafka: Any) -> None:
        super().__init__(name="chaos-reader", daemon=True)
        self.kafka = kafka
        self.predicted: dict[str, int] = {}  # frame id -> prediction messages seen
        self.first_seen: dict[str, float] = {}  # frame id -> monotonic time of its first prediction
        self.dead: dict[str, list[str]] = {}  # frame id or chaos id -> reasons of its dead letters
        self.dlq_by_frame: dict[str, str] = {}  # frame id -> reason (valid frames dead-lettered)
        self.dlq_records = 0
        self.prediction_records = 0
        self.last_record = time.monotonic()
        self.sent_at: dict[str, float] = {}  # the stream's: frame id -> monotonic send time
        self.latest_sent = 0.0  # the latest send time of a predicted frame (monotonic)
        self._reset = threading.Event()
        self._halt = threading.Event()
        self.ready = threading.Event()
        self.error = ""

    def reset(self, timeout: float = 60.0) -> None:
        """Start over on a new follower and wait until it follows (call while nothing new is produced)."""
        self.ready.clear()
        self._reset.set()
        self.ready.wait(timeout)

    def run(self) -> None:
        from tasks.adapters.kafka import TailFollower
        from tasks.contracts.messages import H_FRAME_ID, H_REASON

        topics = [self.kafka.predictions_topic, self.kafka.dlq_topic]
        while not self._halt.is_set():
            self._reset.clear()
            follower = TailFollower(self.kafka, topics, window=0, **{"fetch.wait.max.ms": 50})
            try:
                deadline = time.monotonic() + 120
                while not follower.refresh(timeout=2.0):
                    if self._halt.is_set() or self._reset.is_set() or time.monotonic() > deadline:
                        break
                    time.sleep(0.2)
                self.ready.set()
                refreshed = time.monotonic()
                while not self._halt.is_set() and not self._reset.is_set():
                    for r in follower.poll_batch(1000, 0.2):
                        self.last_record = now = time.monotonic()
                        fid = r.header(H_FRAME_ID) or ""
                        if r.topic == self.kafka.predictions_topic:
                            self.prediction_records += 1
                            self.predicted[fid] = self.predicted.get(fid, 0) + 1
                            self.first_seen.setdefault(fid, now)
                            sent = self.sent_at.get(fid)
                            if sent is not None and sent > self.latest_sent:
                                self.latest_sent = sent
                        else:
                            self.dlq_records += 1
                            reason = r.header(H_REASON) or "?"
                            key = r.header(H_CHAOS_ID) or fid
                            self.dead.setdefault(key, []).append(reason)
                            if fid and not r.header(H_CHAOS_ID):
                                self.dlq_by_frame[fid] = reason
                    if time.monotonic() - refreshed > 5:
                        follower.refresh(timeout=1.0)
                        refreshed = time.monotonic()
            except Exception as exc:  # noqa: BLE001 - a reader error ends the run's accounting honestly
                self.error = f"{type(exc).__name__}: {exc}"
                logger.warning("reader: %s", exc)
                time.sleep(1)
            finally:
                follower.close()

    def stop(self) -> None:
        self._halt.set()
        self.join(15)

    def latest_fresh(self, since: float) -> bool:
        """Some frame sent at or after ``since`` (monotonic) was predicted."""
        return self.latest_sent >= since


# --------------------------------------------------------------------------- the stack


class Stack:
    """The local stack of one chaos run (``tasks.local.stack``), in ``home`` on free ports."""

    def __init__(self, home: Path, services: str, timeout: float) -> None:
        from tasks.local import stack

        self.stack = stack
        self.home = home
        env = {k: v for k, v in os.environ.items() if not k.startswith(_SCRUBBED_ENV_PREFIXES)}
        extra = {"MLPIPE_QDRANT_POLICY": "all", "MLPIPE_RETRAIN_CRON": "off", "MLPIPE_MONITOR_CRON": "off",
                 "MLPIPE_EXECUTION": "local"}
        self.env = {**env, **extra, "MLPIPE_HOME": str(home), "MLPIPE_STORE_URL": f"file://{home / 'store'}"}
        self.spec = stack.StackSpec.from_env(home=home, services=services, free_ports=True, extra_env=extra,
                                             timeout=timeout)
        self.started = False
        self.services = self.spec.services

    def up(self) -> None:
        self.started = True
        self.stack.up(self.spec, env=self.env, out=lambda msg: logger.info("%s", msg))
        self.checks = self.stack.build_services(self.spec)

    def down(self) -> dict[str, str]:
        if not self.started:
            return {}
        return self.stack.down(self.home, grace=4, out=lambda msg: logger.info("%s", msg))

    def info(self, name: str) -> dict[str, Any]:
        return ((self.stack.read_state(self.home) or {}).get("services") or {}).get(name) or {}

    def pid(self, name: str) -> int | None:
        return self.info(name).get("pid")

    def healthy(self, name: str) -> bool:
        info = self.info(name)
        if not info or info.get("failed") or not self.stack.pid_alive(info.get("pid"), info.get("create_time")):
            return False
        ok = self.stack._safe(self.checks[name].health)  # noqa: SLF001 - the stack's own health check
        if ok and name == "scheduler":  # the API reports the last heartbeat: ask the new scheduler itself
            from tasks.local.procs import http_ok

            ok = http_ok(f"http://127.0.0.1:{self.spec.ports['scheduler_health']}/health")
        return ok

    def consumer_ready(self) -> bool:
        from tasks.local.procs import http_ok

        return http_ok(f"http://127.0.0.1:{self.spec.ports['consumer']}/readyz")

    def signal_group(self, name: str, sig: int) -> int:
        """``sig`` to the recorded process group of service ``name`` (a process we started); returns its pid."""
        info = self.info(name)
        pgid = int(info["pid"])  # services lead their own session and group (pgid == pid; a restart keeps it so)
        if not self.stack.pid_alive(info.get("pid"), info.get("create_time")):
            raise ChaosError(f"{name} is not running (pid {info.get('pid')}): cannot inject the fault")
        os.killpg(pgid, sig)
        return int(info["pid"])

    def signal_leader(self, name: str, sig: int) -> int:
        info = self.info(name)
        if not self.stack.pid_alive(info.get("pid"), info.get("create_time")):
            raise ChaosError(f"{name} is not running (pid {info.get('pid')}): cannot inject the fault")
        os.kill(int(info["pid"]), sig)
        return int(info["pid"])

    def status(self) -> dict[str, Any]:
        """``status()``, asked again for up to a minute while a live service misses a health probe."""
        return self.stack.settled_status(self.home, timeout=60)


# --------------------------------------------------------------------------- trials


@dataclass
class Trial:
    index: int
    round: int
    name: str
    service: str
    fault: str = ""
    injected_at: str = ""
    old_pid: int | None = None
    new_pid: int | None = None
    restarted: bool = False
    recovered: bool = False
    recovery_s: float | None = None
    service_healthy_s: float | None = None
    consumer_ready_s: float | None = None
    measured_from: str = "the kill"
    note: str = ""
    frames_acked_during: int = 0
    predicted_during: int = 0


class Chaos:
    def __init__(self, cfg: ChaosConfig, out: Callable[[str], None] = print) -> None:
        self.cfg = cfg
        self.out = out
        self.home = cfg.out_dir / "home"
        self.stack: Stack | None = None
        self.stream: Stream | None = None
        self.reader: Reader | None = None
        self.kafka: Any = None
        self.trials: list[Trial] = []
        self.stalled: int | None = None  # pgid SIGSTOPped right now (SIGCONT on the way out)
        self._paused_for_broker = False
        self.notes: list[str] = []
        self.t_start = time.monotonic()

    # -- helpers ---------------------------------------------------------------------
    def _wait(self, check: Callable[[], bool], timeout: float, interval: float = 0.1) -> float | None:
        """Seconds until ``check()`` held (None: not within ``timeout``)."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if check():
                return time.monotonic() - t0
            time.sleep(interval)
        return None

    def _flowing(self, timeout: float) -> bool:
        """Predictions flow now: the consumer is ready and a frame sent from now on is predicted."""
        assert self.stack is not None and self.stream is not None and self.reader is not None
        since = time.monotonic()
        return self._wait(lambda: self.stack.consumer_ready() and self.reader.latest_fresh(since),
                          timeout, 0.1) is not None

    def _accounted(self) -> tuple[int, int]:
        """(valid frames acked but neither predicted nor dead-lettered, poison acked but not dead-lettered)."""
        assert self.stream is not None and self.reader is not None
        r = self.reader
        valid = sum(1 for fid in list(self.stream.acked) if fid not in r.predicted and fid not in r.dlq_by_frame)
        poison = sum(1 for cid in list(self.stream.poison_acked) if cid not in r.dead)
        return valid, poison

    def _drain(self, timeout: float) -> bool:
        return self._wait(lambda: self._accounted() == (0, 0), timeout, 0.2) is not None

    # -- one trial -------------------------------------------------------------------
    def run_trial(self, trial: Trial) -> None:
        assert self.stream is not None
        self._paused_for_broker = False
        try:
            self._run_trial(trial)
        finally:
            if self._paused_for_broker:  # the broker did not come back in time: stream on all the same
                self._after_broker()

    def _after_broker(self) -> None:
        """After a broker fault: topics, a new producer, the reader on the new log, then the stream again."""
        from tasks.adapters.kafka import ensure_topics

        assert self.stream is not None and self.reader is not None
        try:
            ensure_topics(self.kafka)  # the broker service creates them too; idempotent
        except Exception as exc:  # noqa: BLE001 - the producer waits for the metadata anyway
            logger.info("ensure topics after the broker fault: %s", exc)
        self.stream.reconnect()
        self.reader.reset()
        self.stream.resume()
        self._paused_for_broker = False

    def _run_trial(self, trial: Trial) -> None:
        assert self.stack is not None and self.stream is not None and self.reader is not None
        st, stream, reader, cfg = self.stack, self.stream, self.reader, self.cfg
        name = trial.name
        acked0, pred0 = len(stream.acked), len(reader.predicted)
        trial.old_pid = st.pid(trial.service)
        if name in BROKER_TRIALS:
            # the memory engine loses its log: nothing acknowledged may be left unconsumed at the broker
            stream.pause()
            self._paused_for_broker = True
            if not self._drain(cfg.drain_timeout_s):
                v, p = self._accounted()
                trial.note = f"drain before the broker fault incomplete ({v} valid, {p} poison frames pending)"
            time.sleep(0.5)  # the reader's last fetch
        t0 = time.monotonic()
        trial.injected_at = _now_iso()
        release = t0
        if name == "consumer-kill":
            trial.fault = "kill -9 of the consumer"
            st.signal_leader("consumer", signal.SIGKILL)
        elif name in ("triton-kill", "scheduler-kill", "broker-kill"):
            trial.fault = f"kill -9 of {trial.service}'s process group"
            st.signal_group(trial.service, signal.SIGKILL)
        elif name == "broker-restart":
            trial.fault = "SIGTERM to the broker service (restart, empty log)"
            st.signal_leader("broker", signal.SIGTERM)
        elif name == "triton-stall":
            trial.fault = f"SIGSTOP of Triton's process group for {cfg.stall_s:.0f}s, then SIGCONT"
            self.stalled = st.signal_group("triton", signal.SIGSTOP)
            time.sleep(cfg.stall_s)
            os.killpg(self.stalled, signal.SIGCONT)
            self.stalled = None
            release = time.monotonic()
            trial.measured_from = "SIGCONT"
        elif name == "poison":
            trial.fault = f"a burst of 3 frames of each of the {len(POISON_KINDS)} poison kinds"
            burst0 = len(stream.poison_sent)
            stream.inject_poison([k for k in POISON_KINDS for _ in range(3)])
            self._wait(lambda: len(stream.poison_sent) >= burst0 + 3 * len(POISON_KINDS), 10, 0.02)
            trial.measured_from = "the burst"
        deadline = release + cfg.recovery_timeout_s

        def left() -> float:
            return max(0.0, deadline - time.monotonic())

        # 1. the service is back (restarted by the supervisor where it died) and healthy
        def service_back() -> bool:
            pid = st.pid(trial.service)
            if name in RESTARTING and (pid is None or pid == trial.old_pid):
                return False
            return st.healthy(trial.service)
        if name in RESTARTING:
            time.sleep(0.3)  # let the death be seen before health is asked (an old heartbeat still answers)
        took = self._wait(service_back, left(), 0.1)
        trial.new_pid = st.pid(trial.service)
        trial.restarted = trial.new_pid is not None and trial.new_pid != trial.old_pid
        if took is None:
            trial.note = (trial.note + "; " if trial.note else "") + f"{trial.service} not healthy again"
            return
        trial.service_healthy_s = round(time.monotonic() - release, 2)
        if name in BROKER_TRIALS:
            self._after_broker()
        if name == "poison":  # the burst (and any random poison so far) dead-lettered
            if self._wait(lambda: all(c in reader.dead for c in list(stream.poison_sent)), left(), 0.1) is None:
                trial.note = (trial.note + "; " if trial.note else "") + "poison not all dead-lettered in time"
                return
        # 2. the consumer is ready and 3. a frame sent after that is predicted
        ok = self._wait(st.consumer_ready, left(), 0.1)
        if ok is None:
            trial.note = (trial.note + "; " if trial.note else "") + "consumer not ready again"
            return
        trial.consumer_ready_s = round(time.monotonic() - release, 2)
        since = time.monotonic()
        fresh = self._wait(lambda: reader.latest_fresh(since), left(), 0.05)
        if fresh is None:
            trial.note = (trial.note + "; " if trial.note else "") + "no fresh prediction"
            return
        trial.recovered = True
        trial.recovery_s = round(time.monotonic() - release, 2)
        trial.frames_acked_during = len(stream.acked) - acked0
        trial.predicted_during = len(reader.predicted) - pred0

    # -- the run ---------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        cfg = self.cfg
        out = self.out
        cfg.out_dir.mkdir(parents=True, exist_ok=True)
        from tasks.adapters.kafka import KafkaConfig
        from tasks.local import stack as stack_mod

        if stack_mod.read_state(self.home):  # a previous run that did not end: stop what it left
            stack_mod.down(self.home, grace=3, out=lambda _m: None)
        shutil.rmtree(self.home, ignore_errors=True)
        self.home.mkdir(parents=True)
        onnx = prepare_model(cfg.out_dir, cfg.seed)
        self.stack = Stack(self.home, cfg.services, cfg.start_timeout_s)
        deploy_model(self.stack.spec.model_repo, onnx, self.stack.spec.model)
        plan = [(r + 1, t) for r in range(cfg.rounds) for t in cfg.trials]
        out(f"chaos: {len(plan)} trial(s) ({', '.join(cfg.trials)} x {cfg.rounds}), {cfg.rate:.0f} frames/s, "
            f"home {self.home}")
        out(f"starting the stack ({', '.join(self.stack.services)}) on free loopback ports...")
        t_up = time.monotonic()
        self.stack.up()
        out(f"stack up in {time.monotonic() - t_up:.0f}s (logs {self.stack.spec.log_dir})")
        self.kafka = KafkaConfig(bootstrap=self.stack.spec.kafka_bootstrap, client_id="mlpipe-chaos")
        self.reader = Reader(self.kafka)
        self.reader.start()
        self.reader.ready.wait(60)
        self.stream = Stream(self.kafka, Frames(cfg.seed), cfg.rate, cfg.max_frames, cfg.poison_every_s, cfg.seed)
        self.reader.sent_at = self.stream.sent_at
        self.stream.start()
        if not self._flowing(120):
            raise ChaosError("predictions do not flow on the fresh stack (see the consumer's log in "
                             f"{self.stack.spec.log_dir})")
        out(f"stream flowing: {len(self.stream.acked)} frames acked, {len(self.reader.predicted)} predicted")
        for i, (rnd, name) in enumerate(plan, 1):
            time.sleep(cfg.gap_s)
            if not self._flowing(60):
                self.notes.append(f"predictions did not flow before trial {i} ({name}) within 60s")
            if self.stream.error:
                raise ChaosError(f"the stream stopped: {self.stream.error}")
            if self.stream.produced >= cfg.max_frames:
                self.notes.append(f"--max-frames {cfg.max_frames} reached before trial {i}: the rest skipped")
                break
            trial = Trial(i, rnd, name, TARGET_SERVICE[name])
            self.run_trial(trial)
            self.trials.append(trial)
            v, _ = self._accounted()
            state = (f"recovered in {trial.recovery_s:.1f}s (from {trial.measured_from})" if trial.recovered
                     else f"NOT RECOVERED within {cfg.recovery_timeout_s:.0f}s")
            out(f"[{i}/{len(plan)}] round {rnd} {name:<15} {trial.fault}: {state}"
                + (f"; {trial.service} pid {trial.old_pid} -> {trial.new_pid}" if trial.restarted else "")
                + f"; {len(self.stream.acked):,} acked, {len(self.reader.predicted):,} predicted, "
                  f"{self.reader.dlq_records:,} dead letters, {v} in flight"
                + (f" ({trial.note})" if trial.note else ""))
        out("stopping the stream; draining...")
        self.stream.stop()
        drained = self._drain(cfg.drain_timeout_s)
        time.sleep(2.0)  # late duplicates
        if not drained:
            v, p = self._accounted()
            self.notes.append(f"final drain incomplete after {cfg.drain_timeout_s:.0f}s: {v} valid, {p} poison pending")
        st = self.stack.status()
        self.reader.stop()
        return self._finish(st)

    def _finish(self, st: dict[str, Any]) -> dict[str, Any]:
        assert self.stack is not None and self.stream is not None and self.reader is not None
        stream, reader = self.stream, self.reader
        final_services = {n: {"alive": i.get("alive"), "healthy": i.get("healthy"), "restarts": i.get("restarts"),
                              "failed": i.get("failed"), "last_exit": i.get("last_exit")}
                          for n, i in st.get("services", {}).items()}
        self.out("stopping the stack...")
        self.stack.down()
        self.stack.started = False
        qdrant = qdrant_audit(self.home / "qdrant")
        return summarize(self.cfg, self.trials, stream, reader, qdrant, final_services, self.notes,
                         time.monotonic() - self.t_start)

    def cleanup(self) -> None:
        """Whatever happened: SIGCONT a stalled Triton, stop the threads and the stack."""
        if self.stalled is not None:
            try:
                os.killpg(self.stalled, signal.SIGCONT)
            except OSError:
                pass
            self.stalled = None
        for part in (self.stream, self.reader):
            if part is not None and part.is_alive():
                try:
                    part.stop()
                except Exception:  # noqa: BLE001
                    pass
        if self.stack is not None and self.stack.started:
            try:
                self.stack.down()
            except Exception as exc:  # noqa: BLE001
                print(f"warning: stack down failed: {exc}; run `mlpipe stack --home {self.home} down`",
                      file=sys.stderr)
            self.stack.started = False


def qdrant_audit(path: Path) -> dict[str, Any]:
    """Points and distinct ids of the predictions collection (the consumer is stopped: local mode)."""
    import warnings

    from tasks.adapters.qdrant import open_vectors

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "local mode is not recommended above 20,000 points": a one-off audit
            with open_vectors(path=str(path), create=False) as vs:
                ids = vs.all_ids(batch=10_000)
                return {"points": vs.count(), "ids": ids}
    except Exception as exc:  # noqa: BLE001 - reported as a missed target
        return {"points": None, "ids": [], "error": f"{type(exc).__name__}: {exc}"}


# --------------------------------------------------------------------------- results


def summarize(cfg: ChaosConfig, trials: Sequence[Trial], stream: Stream, reader: Reader, qdrant: dict[str, Any],
              services: dict[str, Any], notes: list[str], seconds: float) -> dict[str, Any]:
    acked = set(stream.acked)
    predicted = {f for f in reader.predicted if f in acked}
    dead_valid = {f for f in reader.dlq_by_frame if f in acked and f not in predicted}
    lost = sorted(acked - predicted - dead_valid)
    dup_predictions = sum(c - 1 for f, c in reader.predicted.items() if c > 1)
    qids = {str(uuid.UUID(i)) for i in qdrant.get("ids", [])}
    points = qdrant.get("points")
    dup_points = (points - len(qids)) if points is not None else None
    acked_uuid = {str(uuid.UUID(f)) for f in acked}
    predicted_without_point = sum(1 for f in predicted if str(uuid.UUID(f)) not in qids)
    points_not_sent = len(qids - acked_uuid)
    poison: dict[str, dict[str, Any]] = {}
    for kind, reason in POISON_KINDS.items():
        sent = [c for c, k in stream.poison_acked.items() if k == kind]
        dead = [c for c in sent if c in reader.dead]
        right = [c for c in dead if reason in reader.dead[c]]
        dups = sum(len(reader.dead[c]) - 1 for c in dead)
        poison[kind] = {"reason": reason, "sent": len(sent), "dead_lettered": len(dead),
                        "with_the_reason": len(right), "duplicate_dead_letters": dups,
                        "other_reasons": sorted({r for c in dead for r in reader.dead[c] if r != reason}),
                        "ok": len(right) == len(sent) and len(sent) > 0}
    poison_sent = sum(p["sent"] for p in poison.values())
    poison_dead = sum(p["dead_lettered"] for p in poison.values())
    kinds_sent = [k for k, p in poison.items() if p["sent"]]
    all_recovered = bool(trials) and all(t.recovered for t in trials) and all(
        t.restarted for t in trials if t.name in RESTARTING)
    services_ok = bool(services) and all(s.get("alive") and s.get("healthy") and not s.get("failed")
                                          for s in services.values())
    reasons: list[str] = []
    if lost:
        reasons.append(f"{len(lost)} frame(s) lost (sent and acknowledged, neither predicted nor dead-lettered)")
    if dup_points is None:
        reasons.append(f"Qdrant could not be read: {qdrant.get('error')}")
    elif dup_points:
        reasons.append(f"{dup_points} duplicate Qdrant point(s)")
    bad_poison = [k for k in kinds_sent if not poison[k]["ok"]]
    if bad_poison:
        reasons.append("poison not (rightly) dead-lettered: " + ", ".join(
            f"{k} {poison[k]['with_the_reason']}/{poison[k]['sent']}" for k in bad_poison))
    if "poison" in cfg.trials and len(kinds_sent) < len(POISON_KINDS):
        reasons.append("not every poison kind was sent")
    if not all_recovered:
        reasons.append("not recovered without a hand: " + ", ".join(
            f"#{t.index} {t.name} ({t.note or 'no restart'})" for t in trials
            if not t.recovered or (t.name in RESTARTING and not t.restarted)) if trials else "no trial ran")
    if not services_ok:
        reasons.append("not every service alive and healthy at the end: " + ", ".join(
            n for n, s in services.items() if not (s.get("alive") and s.get("healthy") and not s.get("failed"))))
    if stream.error:
        reasons.append(f"the stream failed: {stream.error}")
    if reader.error:
        notes.append(f"the reader hit an error and started over: {reader.error}")
    by_fault: dict[str, list[float]] = {}
    for t in trials:
        if t.recovery_s is not None:
            by_fault.setdefault(t.name, []).append(t.recovery_s)
    results = {
        "date": _now_iso(),
        "mode": "short" if cfg.short else "long",
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()},
        "seconds": round(seconds, 1),
        "trials_run": len(trials),
        "frames": {
            "produced_valid": stream.produced, "sent_acked": len(acked), "unacked": stream.unacked_count,
            "unacked_errors": stream.unacked, "predicted": len(predicted),
            "dead_lettered_valid": len(dead_valid),
            "dead_lettered_valid_reasons": sorted({reader.dlq_by_frame[f] for f in dead_valid}),
            "lost": len(lost), "lost_sample": lost[:10],
            "duplicate_prediction_messages": dup_predictions,
            "prediction_messages": reader.prediction_records, "dead_letter_messages": reader.dlq_records,
        },
        "qdrant": {"points": points, "distinct_ids": len(qids), "duplicate_points": dup_points,
                   "predicted_without_point": predicted_without_point, "points_of_unknown_frames": points_not_sent,
                   "error": qdrant.get("error")},
        "poison": {"sent": poison_sent, "dead_lettered": poison_dead, "by_kind": poison,
                   "all_dead_lettered": bool(kinds_sent) and not bad_poison},
        "recovery_s": {k: {"n": len(v), "min": min(v), "max": max(v), "mean": round(sum(v) / len(v), 2)}
                       for k, v in by_fault.items()},
        "trials": [asdict(t) for t in trials],
        "services_at_end": services,
        "all_recovered_without_a_hand": all_recovered and services_ok,
        "targets": {
            "lost": {"value": len(lost), "target": 0, "met": not lost},
            "duplicate_qdrant_points": {"value": dup_points, "target": 0, "met": dup_points == 0},
            "every_poison_dead_lettered": {"value": not bad_poison and bool(kinds_sent), "target": True,
                                           "met": bool(kinds_sent) and not bad_poison},
            "every_service_recovered": {"value": all_recovered and services_ok, "target": True,
                                        "met": all_recovered and services_ok},
        },
        "met": not reasons,
        "missed": reasons,
        "notes": notes,
    }
    return results


def _yn(ok: Any) -> str:
    return "yes" if ok else "**no**"


def render_markdown(r: dict[str, Any]) -> str:
    f, q, p = r["frames"], r["qdrant"], r["poison"]
    cfg = r["config"]
    lines = [f"# Chaos run ({r['mode']}), {r['date']}", "",
             f"{r['trials_run']} trial(s) in {r['seconds']:.0f}s; stream {cfg['rate']:.0f} frames/s, "
             f"{cfg['rounds']} round(s) of {', '.join(cfg['trials'])}; Qdrant policy `all`.", "",
             "| | value | target | met |", "|---|---:|---:|:---:|",
             f"| trials | {r['trials_run']} | | |",
             f"| frames sent (acknowledged by the broker) | {f['sent_acked']:,} | | |",
             f"| predicted | {f['predicted']:,} | | |",
             f"| valid frames dead-lettered | {f['dead_lettered_valid']:,}"
             f"{' (' + ', '.join(f['dead_lettered_valid_reasons']) + ')' if f['dead_lettered_valid_reasons'] else ''} | | |",
             f"| poison frames sent / dead-lettered | {p['sent']:,} / {p['dead_lettered']:,} | all | "
             f"{_yn(p['all_dead_lettered'])} |",
             f"| lost (sent valid, neither predicted nor dead-lettered) | {f['lost']:,} | 0 | {_yn(f['lost'] == 0)} |",
             f"| duplicate Qdrant points (points {q['points']}, distinct ids {q['distinct_ids']}) | "
             f"{q['duplicate_points']} | 0 | {_yn(q['duplicate_points'] == 0)} |",
             f"| duplicate prediction messages (at-least-once, allowed) | {f['duplicate_prediction_messages']:,} | | |",
             f"| predicted frames without a Qdrant point | {q['predicted_without_point']:,} | | |",
             f"| frames whose send was not acknowledged (not counted) | {f['unacked']:,} | | |",
             f"| every service recovered without a hand | {_yn(r['all_recovered_without_a_hand'])} | yes | "
             f"{_yn(r['all_recovered_without_a_hand'])} |",
             "", "Poison, by kind:", "", "| kind | reason | sent | dead-lettered | with the reason | dead-lettered (yes/no) |",
             "|---|---|---:|---:|---:|:---:|"]
    for kind, k in p["by_kind"].items():
        lines.append(f"| {kind} | `{k['reason']}` | {k['sent']} | {k['dead_lettered']} | {k['with_the_reason']} | "
                     f"{_yn(k['ok']) if k['sent'] else '-'} |")
    lines += ["", "Recovery per fault (seconds; until the service is healthy again, the consumer's /readyz is 200 "
              "and a frame sent after that is predicted):", "",
              "| # | round | fault | what was done | from | restarted (pid) | healthy | consumer ready | recovered |",
              "|---:|---:|---|---|---|---|---:|---:|---:|"]
    for t in r["trials"]:
        pid = f"{t['old_pid']} -> {t['new_pid']}" if t["restarted"] else "no"
        rec = f"{t['recovery_s']:.1f}" if t["recovered"] else f"**no** ({t['note']})"
        lines.append(f"| {t['index']} | {t['round']} | {t['name']} | {t['fault']} | {t['measured_from']} | {pid} | "
                     f"{t['service_healthy_s'] if t['service_healthy_s'] is not None else '-'} | "
                     f"{t['consumer_ready_s'] if t['consumer_ready_s'] is not None else '-'} | {rec} |")
    if r["recovery_s"]:
        lines += ["", "| fault | n | min | mean | max |", "|---|---:|---:|---:|---:|"]
        for k, v in r["recovery_s"].items():
            lines.append(f"| {k} | {v['n']} | {v['min']:.1f} | {v['mean']:.1f} | {v['max']:.1f} |")
    lines += ["", "Accounting: a frame is sent when the broker acknowledged it. Tansu's memory engine loses its "
              "log on a restart, so before each broker fault the producer pauses and every acknowledged frame is "
              "drained (predicted or dead-lettered, and read back) first; afterwards only frames the new broker "
              "acknowledged count. Predictions are read from Kafka `predictions`, dead letters from `frames.dlq`; "
              "Qdrant is audited after the stack stopped (point id = frame id)."]
    if r["notes"]:
        lines += ["", "Notes: " + "; ".join(r["notes"])]
    lines += ["", "Targets: " + ("all met" if r["met"] else "MISSED: " + "; ".join(r["missed"])), ""]
    return "\n".join(lines)


def write_results(out_dir: Path, results: dict[str, Any]) -> None:
    from tasks.contracts.files import atomic_write

    atomic_write(out_dir / "results.json", json.dumps(results, indent=2) + "\n", mode=0o644)
    atomic_write(out_dir / "results.md", render_markdown(results), mode=0o644)


# --------------------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mlpipe chaos", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--short", action="store_true",
                   help=f"the short run of `make test`: {', '.join(SHORT_TRIALS)}, one round, 30 frames/s, "
                        "short gaps, no Airflow (about 2-3 minutes on 2 cores)")
    p.add_argument("--trials", default=None,
                   help=f"comma-separated faults, in order (default: all: {','.join(TRIALS)})")
    p.add_argument("--rounds", type=int, default=None, help="times the list of trials is run (default 2; --short 1). "
                   "The supervisor gives a service up after 5 restarts in 10 minutes: keep the broker's trials "
                   "(2 restarts a round) to 2 rounds")
    p.add_argument("--rate", type=float, default=None, help="valid frames/s of the steady stream (default 200; --short 30)")
    p.add_argument("--max-frames", type=int, default=400_000, help="the stream stops after this many valid frames")
    p.add_argument("--gap", type=float, default=None, help="seconds of steady stream before each fault (default 8; --short 3)")
    p.add_argument("--stall-s", type=float, default=5.0, help="seconds Triton stays SIGSTOPped")
    p.add_argument("--recovery-timeout", type=float, default=180.0,
                   help="seconds a fault may take to recover before the trial counts as not recovered")
    p.add_argument("--drain-timeout", type=float, default=120.0,
                   help="seconds to wait for every acknowledged frame to be predicted or dead-lettered")
    p.add_argument("--poison-every-s", type=float, default=None,
                   help="a random poison frame about this often all through the stream (0: only the poison trials; "
                        "default 3; --short 2)")
    p.add_argument("--seed", type=int, default=0, help="seed of the poison schedule and the model's weights")
    p.add_argument("--start-timeout", type=float, default=300.0, help="seconds for the stack to become healthy")
    p.add_argument("--out-dir", type=Path, default=None, help="default $MLPIPE_HOME/chaos (var/chaos); the "
                   "stack's home is <out-dir>/home, emptied at the start")
    p.add_argument("--log-level", default=None, help="(default $MLPIPE_LOG_LEVEL or WARNING)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from tasks.logs import setup_logging

    setup_logging(args.log_level, default_level="WARNING")
    if logging.getLogger().getEffectiveLevel() > logging.DEBUG:
        # the run's own clients lose the broker on purpose (broker trials): librdkafka's connect errors are expected
        logging.getLogger("tasks.adapters.kafka.librdkafka").setLevel(logging.CRITICAL)
    from tasks.config import load_settings

    short = args.short
    try:
        trials = tuple(t.strip() for t in (args.trials or "").split(",") if t.strip()) or (
            SHORT_TRIALS if short else TRIALS)
        cfg = ChaosConfig(
            out_dir=(args.out_dir or load_settings().home / "chaos").resolve(), trials=trials,
            rounds=args.rounds or (1 if short else 2), rate=args.rate or (30.0 if short else 200.0),
            max_frames=args.max_frames, gap_s=args.gap or (3.0 if short else 8.0), stall_s=args.stall_s,
            recovery_timeout_s=args.recovery_timeout, drain_timeout_s=args.drain_timeout,
            poison_every_s=(2.0 if short else 3.0) if args.poison_every_s is None else args.poison_every_s,
            seed=args.seed, start_timeout_s=args.start_timeout, short=short)
        cfg.validate()
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE

    def on_term(*_: object) -> None:
        raise KeyboardInterrupt
    previous = signal.signal(signal.SIGTERM, on_term)
    chaos = Chaos(cfg, out=lambda msg: print(msg, flush=True))
    try:
        results = chaos.run()
    except KeyboardInterrupt:
        chaos.cleanup()
        print("error: interrupted; the stack this run started was stopped", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:  # noqa: BLE001 - one line; details in the stack's logs
        logger.debug("chaos run failed", exc_info=True)
        chaos.cleanup()
        print(f"error: chaos run failed: {type(exc).__name__}: {exc} (logs in {chaos.home / 'stack' / 'logs'})",
              file=sys.stderr)
        return EXIT_MISSED
    finally:
        chaos.cleanup()
        signal.signal(signal.SIGTERM, previous)
    write_results(cfg.out_dir, results)
    print()
    print(render_markdown(results))
    print(f"wrote {cfg.out_dir / 'results.json'} and {cfg.out_dir / 'results.md'}")
    if not results["met"]:
        print("error: target missed: " + "; ".join(results["missed"]), file=sys.stderr)
        return EXIT_MISSED
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
