"""``mlpipe``: one console entry point, a sub-command per pipeline step, service and tool.

``mlpipe <command> [arguments]`` runs the command's own CLI (``mlpipe <command> --help``
lists its arguments). Each step's exit code follows ``tasks.contracts.errors``: 0 ok,
``EXIT_BAD_INPUT`` and ``EXIT_REJECTED`` are final, anything else is transient.
"""

from __future__ import annotations

import importlib
import sys
from typing import Sequence

#: command -> (module with a ``main(argv)``, one-line help). The order is the help's order.
COMMANDS: dict[str, tuple[str, str]] = {
    "drops": ("tasks.steps.drops", "make, list and show data drops (the generator with fault injection)"),
    "validate": ("tasks.steps.validate", "validate a data drop with Great Expectations"),
    "train": ("tasks.steps.train", "train on one or more validated drops; writes model.onnx + metrics.json"),
    "registry": ("tasks.steps.registry", "register a trained run as a model version; list, show, set stages"),
    "compile": ("tasks.steps.compile", "compile a version to TensorRT (skipped with the reason without a GPU)"),
    "qc": ("tasks.steps.qc", "the QC gate: golden-set accuracy, recalls, parity, Triton infra check"),
    "deploy": ("tasks.steps.deploy", "deploy a QC-passed version to Triton, roll back, show status"),
    "pipeline": ("tasks.steps.pipeline", "pipeline versions (a set of member versions): compose, end-to-end QC, "
                 "deploy with an atomic member swap, rollback, status"),
    "rollout": ("tasks.steps.rollout", "safe rollout of a QC-passed version: shadow, canary steps, promote or "
                "roll back on live evidence; the kill switch"),
    "monitor": ("tasks.steps.monitor", "drift of live frames against the training drops"),
    "stream": ("tasks.serving.consumer", "the streaming consumer (Triton sidecar): frames -> predictions + Qdrant"),
    "gateway": ("tasks.serving.gateway", "the HTTP ingest gateway: frames in, predictions out"),
    "metrics-exporter": ("tasks.serving.exporter", "Prometheus metrics of drift, QC, consumer lag seen from outside "
                         "and cost per frame"),
    "model-repo": ("tasks.model.repo", "render and validate the Triton model repository"),
    "kafka": ("tasks.adapters.kafka", "create or delete the pipeline topics on a Kafka cluster"),
    "vectors": ("tasks.adapters.qdrant", "inspect the Qdrant predictions collection"),
    "stack": ("tasks.local.stack", "the local stack: up, down, status (what `make up` runs)"),
    "airflow": ("tasks.local.airflow", "the local Airflow home: db, dags test"),
    "broker": ("tasks.local.broker", "run the local Kafka-compatible broker (Tansu)"),
    "triton": ("tasks.local.triton", "run the local tritonserver; status, load, unload"),
    "prometheus": ("tasks.local.prometheus", "the local Prometheus: serve (rendered config), check (promtool)"),
    "bench": ("tasks.tools.bench", "streaming benchmark (make bench)"),
    "chaos": ("tasks.tools.chaos", "fault-injection trials on the local stack under a steady stream (make chaos)"),
    "demo": ("tasks.tools.demo", "the retrain pipeline end to end on embedded defaults (make demo)"),
    "spec": ("tasks.tools.spec", "check a model spec (models/<name>/spec.yaml); print its JSON Schema"),
    "audit": ("tasks.tools.audit", "what happened at a given minute: serving version, DAG runs, drift, DLQ, errors"),
    "trace": ("tasks.tools.trace", "one frame's path with timings (gateway -> Kafka -> consumer -> Triton -> sinks)"),
    "lineage": ("tasks.tools.lineage", "what a prediction's lineage id resolves to: drops, validation, run, QC"),
}
ALIASES = {"consumer": "stream"}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: mlpipe <command> [arguments]   (mlpipe <command> --help for its arguments)", "",
             "commands:"]
    lines += [f"  {name:<{width}}  {text}" for name, (_, text) in COMMANDS.items()]
    return "\n".join(lines)


def run(command: str, argv: Sequence[str]) -> int:
    """Run ``command``'s ``main(argv)`` and return its exit code."""
    from tasks.logs import set_service

    set_service(ALIASES.get(command, command))  # the log file and the spans' service name
    module = importlib.import_module(COMMANDS[ALIASES.get(command, command)][0])
    code = module.main(list(argv))
    return int(code or 0)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(usage())
        return 0 if args else 2
    command, rest = args[0], args[1:]
    if ALIASES.get(command, command) not in COMMANDS:
        print(f"mlpipe: unknown command {command!r}\n\n{usage()}", file=sys.stderr)
        return 2
    return run(command, rest)


def deprecated_alias(old: str, command: str) -> None:
    """Body of the deprecated ``python -m tasks.<old>`` modules: warn once on stderr, run ``mlpipe <command>``."""
    print(f"note: `python -m tasks.{old}` is deprecated; use `mlpipe {command}`", file=sys.stderr)
    sys.exit(run(command, sys.argv[1:]))


if __name__ == "__main__":
    sys.exit(main())
