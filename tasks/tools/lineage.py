"""``mlpipe lineage ID``: what a prediction's ``lineage`` id resolves to.

Every prediction carries ``model_version`` and ``lineage`` (``<model>/<version>``,
``tasks.contracts.messages.lineage_id``): the registry version that served it. This command reads
that version from the registry of record (``tasks.steps.registry``: ``version.json`` and its
``lineage``, the version's events) and shows, in one answer:

* the model version: stage, created, the code version that trained it, the champion it replaced;
* the training run (run id, ClearML task) and the Airflow DAG run that registered it;
* the drops trained on, each with the digests its passing validation recorded (``manifest_sha256``,
  ``images_sha256``, image count) and where the validation result and Data Docs are;
* the QC verdict and where its report is (``qc_report.json`` / ``.html``);
* what is served (``serving``) and the version's events (register, QC, stage changes, deploys, rollbacks).

``ID`` may also be a frame id: its prediction's lineage is then looked up in the span store
(``mlpipe trace``'s ``consumer batch`` span carries ``mlpipe.lineage``). An id that is not a
lineage id, an unknown model or version: ``error:`` with what to do, exit 2 (bad input).
"""

from __future__ import annotations

import argparse
import json
import sys
import uuid
from typing import Any, Sequence

from tasks.adapters.storage import ObjectNotFound, Store, open_store
from tasks.config import load_settings
from tasks.contracts import layout
from tasks.contracts.errors import BadInput, run_cli
from tasks.contracts.messages import parse_lineage_id
from tasks.logs import setup_logging


class UnknownLineage(BadInput, LookupError):
    """The id names no version of the registry (or no frame of the span store)."""


def _optional_json(store: Store, key: str) -> Any:
    try:
        return store.get_json(key)
    except ObjectNotFound:
        return None


def resolve(store: Store, lineage: str) -> dict[str, Any]:
    """The facts behind lineage id ``lineage`` (see the module doc), as one JSON-able dict.

    ``ValueError`` (bad input) for an id that is not ``<model>/<version>``; ``UnknownLineage`` when the
    registry has no such version."""
    from tasks.steps import registry

    model, version = parse_lineage_id(lineage)
    try:
        manifest = registry.get_version(store, model, version)
    except registry.RegistryError as exc:
        raise UnknownLineage(f"lineage {lineage!r}: {exc}; `mlpipe registry list --model {model}` lists the "
                             "versions this registry holds (is MLPIPE_STORE_URL the store the consumer's "
                             "registry is in?)") from None
    lineage_doc = manifest.get("lineage") or _optional_json(
        store, layout.version_file_key(model, version, layout.LINEAGE)) or {}
    prefix = layout.version_file_key(model, version, "")
    qc_json_key, qc_html_key = prefix + layout.QC_REPORT_JSON, prefix + layout.QC_REPORT_HTML
    events = [e for e in registry.events(store, model) if e.get("version") == version]
    registered = next((e for e in events if e.get("event") == "register"), None)
    return {
        "lineage": f"{model}/{version}",
        "model": model,
        "version": version,
        "stage": manifest.get("stage"),
        "created_at": manifest.get("created_at"),
        "code_version": lineage_doc.get("code_version"),
        "parent_champion": lineage_doc.get("parent_champion"),
        "training_run": {"run_id": lineage_doc.get("training_run_id") or manifest.get("run_id"),
                         "clearml_task_id": lineage_doc.get("clearml_task_id"),
                         "airflow": (registered or {}).get("airflow")},
        "drops": [{"drop_id": d.get("drop_id"), "manifest_sha256": d.get("manifest_sha256"),
                   "images_sha256": d.get("images_sha256"), "image_count": d.get("image_count"),
                   "validation": d.get("validation")} for d in lineage_doc.get("drops") or []],
        "qc": {"verdict": manifest.get("qc"),
               "report_json": store.uri(qc_json_key) if store.exists(qc_json_key) else None,
               "report_html": store.uri(qc_html_key) if store.exists(qc_html_key) else None},
        "serving": manifest.get("serving"),
        "history": manifest.get("history") or [],
        "events": [{k: e.get(k) for k in ("at", "event", "stage", "reason", "verdict", "airflow")
                    if e.get(k) is not None} for e in events],
    }


def lineage_of_frame(frame_id: str) -> str:
    """The lineage id of a frame's prediction, from the span store; ``UnknownLineage`` when it is not there."""
    from tasks.tools.trace import find_frame

    found = find_frame(frame_id)
    for s in found.batches:
        lineage = (s.get("attributes") or {}).get("mlpipe.lineage")
        if lineage:
            return str(lineage)
    raise UnknownLineage(f"frame {frame_id}: no consumer batch with a lineage id in the span store "
                         f"({found.where}); pass the prediction's 'lineage' field (<model>/<version>) instead")


def render(facts: dict[str, Any]) -> str:
    """The text answer (one fact per line)."""
    lines = [f"lineage {facts['lineage']}: model {facts['model']} version {facts['version']} "
             f"(stage {facts['stage']}, created {facts['created_at']})",
             f"  code version   {facts.get('code_version') or 'unknown'}; replaced champion "
             f"{facts.get('parent_champion') or 'none'}"]
    run = facts["training_run"]
    airflow = run.get("airflow") or {}
    lines.append(f"  training run   {run.get('run_id')}  clearml task {run.get('clearml_task_id') or '-'}"
                 + (f"  airflow {airflow.get('dag_id')} run {airflow.get('run_id')}" if airflow else ""))
    if not facts["drops"]:
        lines.append("  drops          none recorded")
    for d in facts["drops"]:
        val = d.get("validation") or {}
        lines.append(f"  drop {d['drop_id']}: {d.get('image_count')} images, manifest sha256 "
                     f"{d.get('manifest_sha256')}, images sha256 {d.get('images_sha256')}")
        lines.append(f"      validated {val.get('validated_at')} success={val.get('success')} "
                     f"result {val.get('result_uri')} data docs {val.get('report_uri')}")
    qc = facts["qc"]
    verdict = qc.get("verdict") if isinstance(qc.get("verdict"), dict) else {}
    reasons = "; ".join(map(str, verdict.get("reasons") or []))
    lines.append(f"  qc             {verdict.get('verdict') or 'not run'}" + (f" ({reasons})" if reasons else "")
                 + f"  report {qc.get('report_html') or verdict.get('report') or qc.get('report_json') or 'none'}")
    serving = facts.get("serving") or {}
    if serving:
        lines.append(f"  serving        {serving.get('artifact') or serving}")
    for e in facts["events"]:
        af = e.get("airflow") or {}
        lines.append(f"  {e.get('at')}  {e.get('event')}"
                     + (f" -> {e['stage']}" if e.get("stage") else "")
                     + (f" {e['verdict']}" if e.get("verdict") else "")
                     + (f" ({e['reason']})" if e.get("reason") else "")
                     + (f"  [airflow run {af.get('run_id')}]" if af else ""))
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mlpipe lineage", description="What a prediction's lineage id (<model>/<version>, its 'lineage' "
        "field) resolves to in the registry of record: the drops and the digests their validation recorded, the "
        "training run (ClearML task, Airflow run), the QC verdict and report, what is served, the version's "
        "events. Exit 2 with an error line for an id that is not a lineage id or an unknown version or frame.",
        epilog="example: mlpipe lineage digits/3   (the 'lineage' field of a prediction)",
    )
    p.add_argument("id", help="a lineage id (<model>/<version>) or a frame id (looked up in the span store)")
    p.add_argument("--json", action="store_true", help="print the facts as one JSON object")
    return p


def _main(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(default_level="WARNING")
    text = args.id.strip()
    try:
        uuid.UUID(text)
        is_frame = True
    except ValueError:
        is_frame = False
    lineage = lineage_of_frame(text) if is_frame else text
    facts = resolve(open_store(load_settings()), lineage)
    print(json.dumps(facts, indent=2, default=str) if args.json else render(facts))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Exit codes: 0 resolved; 2 (bad input) not a lineage id, or an unknown model, version or frame."""
    return run_cli(_main, argv, bad_input=(ValueError,))


if __name__ == "__main__":
    sys.exit(main())
