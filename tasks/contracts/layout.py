"""The object-store layout: the one owner of every key the system reads or writes.

Keys are ``/``-separated and relative to the store's root (docs/CONTRACTS.md)::

    drops/<drop_id>/
        images/<image_id>.png                 8-bit grayscale PNGs
        manifest.parquet                      image_id, label, sha256, height, width, source, captured_at
        drop.json                             the generator's summary
        _SUCCESS                              {"drop_id", "rows", "created_at"}, written last
        validation/result.json                the validation result (digests of what was validated)
        validation/content.json               the sha256 of every image the validation saw
        validation/data_docs/index.html       the Great Expectations Data Docs site

    runs/<run_id>/                            a training run: model.onnx, model.pt, metrics.json,
                                              history.json, curves.png, result.json (written last)

    models/<model>/
        <version>/version.json                the version manifest (written by the registry only)
        <version>/model.onnx | model.plan | model.pt | metrics.json | lineage.json | curves.png
        <version>/qc_report.json | qc_report.html | compile.json
        <version>/model.opt.onnx | model.int8.onnx   CPU compile: ORT-optimised / INT8 QDQ ONNX models
        _events/<stamp>-<id>.json             one object per registry event
        _claims/runs/<run_id>.json            "this run is being registered" (exclusive create)
        _claims/versions/<version>.json       "this version number belongs to run X" (exclusive create)

    monitoring/reference/<model>/v<version>.npz   the drift reference of a champion
    monitoring/<stamp>/report.json|report.html|*.png   one drift report
    monitoring/latest.json                    the newest drift report

    triggers/drop_arrival/<drop_id>.json      the drop-arrival claim of a drop

    dlq/<topic>/<partition>/<offset>/value|record.json   an oversize dead-lettered frame (consumer)

    rollouts/<model>/state.json               the rollout state every consumer follows (contracts.rollout)
    rollouts/<model>/lock.json                the running rollout's lease (one rollout per model)
    rollouts/<model>/<rollout_id>/evidence/<consumer>.json   one consumer's live evidence per version
    rollouts/<model>/<rollout_id>/rollout.json | report.html  the controller's record and report

Standard library only: every layer (and the Airflow plugins) may import it.
"""

from __future__ import annotations

DROPS = "drops"
RUNS = "runs"
MODELS = "models"
MONITORING = "monitoring"
TRIGGERS = "triggers"

# ---------------------------------------------------------------- file names

MANIFEST = "manifest.parquet"
SUCCESS = "_SUCCESS"
DROP_SUMMARY = "drop.json"
IMAGES_DIR = "images"
VALIDATION_DIR = "validation"
VALIDATION_RESULT = "result.json"
VALIDATION_CONTENT = "content.json"
DATA_DOCS_DIR = "data_docs"

VERSION_MANIFEST = "version.json"
MODEL_ONNX = "model.onnx"
MODEL_PLAN = "model.plan"
MODEL_OPT_ONNX = "model.opt.onnx"  # ONNX Runtime graph-optimised model (compile, CPU)
MODEL_INT8_ONNX = "model.int8.onnx"  # INT8 static-quantised QDQ model (compile, CPU)
#: the CPU-compiled artefacts, best first (deploy serves the first that passed QC, else model.onnx)
CPU_COMPILED = (MODEL_INT8_ONNX, MODEL_OPT_ONNX)
MODEL_PT = "model.pt"
METRICS = "metrics.json"
LINEAGE = "lineage.json"
CURVES = "curves.png"
HISTORY = "history.json"
RUN_RESULT = "result.json"
QC_REPORT_JSON = "qc_report.json"
QC_REPORT_HTML = "qc_report.html"
COMPILE_JSON = "compile.json"
EVENTS_DIR = "_events"
CLAIMS_DIR = "_claims"


# ---------------------------------------------------------------- drops

def drop_prefix(drop_id: str) -> str:
    return f"{DROPS}/{drop_id}/"


def manifest_key(drop_id: str) -> str:
    return f"{DROPS}/{drop_id}/{MANIFEST}"


def success_key(drop_id: str) -> str:
    return f"{DROPS}/{drop_id}/{SUCCESS}"


def summary_key(drop_id: str) -> str:
    return f"{DROPS}/{drop_id}/{DROP_SUMMARY}"


def images_prefix(drop_id: str) -> str:
    return f"{DROPS}/{drop_id}/{IMAGES_DIR}/"


def image_key(drop_id: str, image_id: str, ext: str = "png") -> str:
    """``drops/<id>/images/<image_id>.<ext>``: ``ext`` is the model's image encoding's (``png``, ``jpg``;
    ``tasks.steps.drops.image_key`` picks it from the spec)."""
    return f"{DROPS}/{drop_id}/{IMAGES_DIR}/{image_id}.{ext}"


def image_id_from_key(drop_id: str, key: str) -> str | None:
    """``drops/<id>/images/<image_id>.<ext>`` -> ``<image_id>`` (None for any other key)."""
    prefix = images_prefix(drop_id)
    name = key[len(prefix):] if key.startswith(prefix) else ""
    stem, dot, ext = name.rpartition(".")
    if dot and stem and ext and "/" not in name:
        return stem
    return None


def validation_prefix(drop_id: str) -> str:
    return f"{DROPS}/{drop_id}/{VALIDATION_DIR}/"


def validation_result_key(drop_id: str) -> str:
    return f"{DROPS}/{drop_id}/{VALIDATION_DIR}/{VALIDATION_RESULT}"


def validation_content_key(drop_id: str) -> str:
    """The per-image sha256 table the validation result's ``content`` digests were computed over."""
    return f"{DROPS}/{drop_id}/{VALIDATION_DIR}/{VALIDATION_CONTENT}"


def data_docs_prefix(drop_id: str) -> str:
    return f"{DROPS}/{drop_id}/{VALIDATION_DIR}/{DATA_DOCS_DIR}/"


def data_docs_index_key(drop_id: str) -> str:
    return f"{data_docs_prefix(drop_id)}index.html"


# ---------------------------------------------------------------- training runs

def run_prefix(run_id: str) -> str:
    return f"{RUNS}/{run_id}/"


def run_file_key(run_id: str, name: str) -> str:
    return f"{RUNS}/{run_id}/{name}"


# ---------------------------------------------------------------- models

def model_prefix(model: str) -> str:
    return f"{MODELS}/{model}/"


def version_prefix(model: str, version: int) -> str:
    return f"{MODELS}/{model}/{int(version)}/"


def version_file_key(model: str, version: int, name: str) -> str:
    return f"{MODELS}/{model}/{int(version)}/{name}"


def version_manifest_key(model: str, version: int) -> str:
    return version_file_key(model, version, VERSION_MANIFEST)


def compiled_model_key(model: str, version: int, artifact: str) -> str:
    """A compiled artefact of a version (``model.opt.onnx``, ``model.int8.onnx``, ``model.plan``)."""
    if artifact not in (*CPU_COMPILED, MODEL_PLAN):
        raise ValueError(f"unknown compiled artefact {artifact!r}: one of {', '.join((*CPU_COMPILED, MODEL_PLAN))}")
    return version_file_key(model, version, artifact)


def events_prefix(model: str) -> str:
    return f"{MODELS}/{model}/{EVENTS_DIR}/"


def event_key(model: str, stamp: str, event_id: str) -> str:
    return f"{events_prefix(model)}{stamp}-{event_id}.json"


def run_claims_prefix(model: str) -> str:
    return f"{MODELS}/{model}/{CLAIMS_DIR}/runs/"


def run_claim_key(model: str, run_id: str) -> str:
    return f"{run_claims_prefix(model)}{run_id}.json"


def version_claims_prefix(model: str) -> str:
    return f"{MODELS}/{model}/{CLAIMS_DIR}/versions/"


def version_claim_key(model: str, version: int) -> str:
    return f"{version_claims_prefix(model)}{int(version)}.json"


# ---------------------------------------------------------------- monitoring

MONITOR_REFERENCE_PREFIX = f"{MONITORING}/reference"


def monitor_reference_key(model: str, version: int) -> str:
    return f"{MONITOR_REFERENCE_PREFIX}/{model}/v{int(version)}.npz"


def monitor_report_prefix(stamp: str) -> str:
    return f"{MONITORING}/{stamp}/"


MONITOR_LATEST = f"{MONITORING}/latest.json"  # a copy of the newest drift report


# ---------------------------------------------------------------- dead letters

DLQ = "dlq"


def dlq_original_prefix(topic: str, partition: int, offset: int) -> str:
    """Where the consumer stores a dead-lettered frame too large for ``frames.dlq``: ``value`` (the original
    bytes) and ``record.json`` (topic, partition, offset, key and headers, base64) under this prefix."""
    return f"{DLQ}/{topic}/{int(partition)}/{int(offset)}/"


# ---------------------------------------------------------------- safe rollout

ROLLOUTS = "rollouts"


def rollout_prefix(model: str) -> str:
    return f"{ROLLOUTS}/{model}/"


def rollout_state_key(model: str) -> str:
    """The state every consumer follows (mode, champion, candidate, share); written by the rollout controller
    and the kill switch only."""
    return f"{ROLLOUTS}/{model}/state.json"


def rollout_lock_key(model: str) -> str:
    return f"{ROLLOUTS}/{model}/lock.json"


def rollout_run_prefix(model: str, rollout_id: str) -> str:
    return f"{ROLLOUTS}/{model}/{rollout_id}/"


def rollout_evidence_prefix(model: str, rollout_id: str) -> str:
    return f"{ROLLOUTS}/{model}/{rollout_id}/evidence/"


def rollout_evidence_key(model: str, rollout_id: str, consumer: str) -> str:
    return f"{ROLLOUTS}/{model}/{rollout_id}/evidence/{consumer}.json"


ROLLOUT_RECORD = "rollout.json"
ROLLOUT_REPORT = "report.html"


# ---------------------------------------------------------------- triggers

DROP_ARRIVAL_CLAIMS = f"{TRIGGERS}/drop_arrival/"


def drop_arrival_claim_key(drop_id: str) -> str:
    return f"{DROP_ARRIVAL_CLAIMS}{drop_id}.json"
