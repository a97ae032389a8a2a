"""Pipeline versions: compose member versions, gate the whole pipeline, deploy it, roll it back.

A pipeline (``models/<name>/pipeline.yaml``, ``tasks.contracts.pipeline``) runs a detector and a classifier
as one Triton model. Each member is a model of the registry of its own (trained, registered, compiled and
QC-gated on its own: ``mlpipe qc --model scenes-detector`` is the detector's member gate). A *pipeline
version* is a set of member versions, recorded in the same registry under the pipeline's name
(``models/<pipeline>/<n>/version.json`` with ``kind: pipeline`` and ``members``; events, stages, champion and
lineage as for any model)::

    compose   members (role -> version; a role left out keeps the serving pipeline's member, else its
              member's champion) -> a candidate pipeline version; every member version must have passed its
              own QC. The same set composed twice is the same version.
    qc        the pipeline end to end in a throw-away Triton on the golden scenes: ``triton_serves`` (no
              FRAME_ERROR, the contract's outputs), ``readout_accuracy`` (the exact read-out, digits left to
              right) >= ``qc.min_readout_accuracy``, ``class_recall`` (per class, of the ground-truth objects
              found at IoU 0.5 and classified right) >= ``qc.min_class_recall``, ``no_regression`` (the
              serving pipeline's read-out accuracy on the same scenes, in the same server, minus the
              candidate's <= ``qc.max_regression``), ``latency_p95`` (one call of one frame) <=
              ``qc.max_latency_p95_ms``; the detector's box precision and recall are reported too. A failing
              candidate is rejected.
    deploy    write the member versions, load them beside the serving ones, pin and load the new pipeline
              version (Triton answers with the old version until the new one is loaded: never a half-switched
              set, since a version calls exactly the members its ``members.json`` pins), smoke-test the whole
              pipeline on golden scenes, and on any failure pin the previous pipeline version back; then
              retire the old member versions. The pipeline version and its member versions become
              ``production``.
    rollback  deploy of an earlier pipeline version (its member versions are written again if pruned).

CLI: ``mlpipe pipeline {compose,qc,deploy,rollback,status,show} --help``. Exit codes as every step's
(``tasks.contracts.errors``): 2 bad input (an unknown pipeline, member or version), 3 rejected (QC failed, a
deploy that failed its smoke test and was restored), 75 transient (Triton or the store unreachable).
"""

from __future__ import annotations

import argparse
import datetime as dt
import html
import json
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

from tasks.adapters.storage import Store, open_store
from tasks.config import load_settings
from tasks.contracts import layout
from tasks.contracts.errors import BadInput, Rejected, run_cli
from tasks.contracts.pipeline import PipelineSpec, find_pipeline, member_specs
from tasks.contracts.results import write_result_json
from tasks.contracts.serving import PIPELINE_OUTPUTS, frame_error_rows
from tasks.logs import setup_logging
from tasks.steps import registry

logger = logging.getLogger(__name__)

KIND = "pipeline"
ROLES = ("detector", "classifier")
SMOKE_SCENES = 32
LATENCY_REQUESTS = 60
WARMUP_REQUESTS = 5
QC_SCENES = 256  # golden scenes sent through Triton (all of them when fewer)


class PipelineError(BadInput, ValueError):
    """A pipeline, member or version that does not exist or cannot be used as asked."""


class PipelineQCFailed(Rejected):
    """The pipeline's QC gate failed: the candidate is rejected."""


class PipelineDeployError(Rejected, RuntimeError):
    """The deploy failed (its smoke test, a load); the previous pipeline version serves again."""


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def _spec(name: str) -> PipelineSpec:
    return find_pipeline(name, load_settings().models_dir)


# ====================================================================== compose


def _passed_member(store: Store, model: str, version: int) -> dict[str, Any]:
    manifest = registry.get_version(store, model, version)
    verdict = (manifest.get("qc") or {}).get("verdict")
    if manifest.get("stage") == "rejected" or verdict != "passed":
        raise PipelineError(f"member {model} v{version} has not passed its own QC gate (stage "
                            f"{manifest.get('stage')}, verdict {verdict}): run `mlpipe qc --model {model} --version "
                            f"{version}` first, or compose another version")
    return manifest


def _default_member(store: Store, spec: PipelineSpec, role: str) -> int:
    """The version a role keeps when it is not given: the serving pipeline's, else the member's champion, else
    its newest version that passed QC."""
    champ = registry.champion(store, spec.name)
    if champ is not None:
        return int(champ["members"][role]["version"])
    model = spec.member_names[role]
    member = registry.champion(store, model)
    if member is not None:
        return int(member["version"])
    passed = [v["version"] for v in registry.all_versions(store, model) if (v.get("qc") or {}).get("verdict") == "passed"
              and v.get("stage") != "rejected"]
    if not passed:
        raise PipelineError(f"no version of member {model} ({role}) has passed QC yet: train, register and QC one "
                            f"(the retrain DAG with members={role}), or pass --{role} VERSION")
    return max(passed)


def compose(store: Store, name: str, members: dict[str, int | None] | None = None, *,
            reason: str = "composed") -> dict[str, Any]:
    """A candidate pipeline version of these member versions (``role -> version``; a missing role keeps the
    serving pipeline's member). Idempotent: the same set gives the same version."""
    spec = _spec(name)
    given = {r: v for r, v in (members or {}).items() if v is not None}
    unknown = set(given) - set(ROLES)
    if unknown:
        raise PipelineError(f"unknown pipeline role(s) {sorted(unknown)}: the roles are {', '.join(ROLES)}")
    chosen = {role: int(given[role]) if role in given else _default_member(store, spec, role) for role in ROLES}
    record: dict[str, dict[str, Any]] = {}
    for role, version in chosen.items():
        model = spec.member_names[role]
        m = _passed_member(store, model, version)
        record[role] = {"model": model, "version": version, "run_id": m.get("run_id"),
                        "drops": [d.get("drop_id") for d in (m.get("lineage") or {}).get("drops", [])],
                        "qc": {k: (m.get("qc") or {}).get(k) for k in ("verdict", "report")}}
    key = "members:" + "+".join(f"{record[r]['model']}-v{record[r]['version']}" for r in ROLES)
    for existing in registry.all_versions(store, name):
        if existing.get("run_id") == key:
            logger.info("pipeline %s v%s already holds %s", name, existing["version"], key)
            return existing
    version = registry._claim_version(store, name, key)
    parent = registry.champion(store, name)
    lineage = {"members": record, "parent_champion": None if parent is None else parent["version"],
               "code_version": registry.code_version(),
               "drops": [{"drop_id": d, "member": r} for r in ROLES for d in record[r]["drops"]]}
    manifest = {"model": name, "kind": KIND, "version": version, "stage": "candidate", "created_at": _now(),
                "run_id": key, "members": record, "lineage": lineage,
                "spec": {"name": name, "file": str(Path("models") / name / "pipeline.yaml")},
                "metrics": {}, "files": {},
                "history": [{"stage": "candidate", "at": _now(), "reason": reason}]}
    store.put_json(layout.version_file_key(name, version, layout.LINEAGE), lineage)
    if not store.put_json_if_absent(layout.version_manifest_key(name, version), manifest):
        existing = registry.get_version(store, name, version)
        if existing.get("run_id") == key:
            return existing
        raise registry.RegistryConflict(f"pipeline {name} v{version} was written by another composition: retry")
    registry.record_event(store, name, "register", version=version, kind=KIND, stage="candidate",
                          members={r: record[r]["version"] for r in ROLES}, reason=reason)
    logger.info("composed pipeline %s v%s: %s", name, version,
                ", ".join(f"{r} {record[r]['model']} v{record[r]['version']}" for r in ROLES))
    return manifest


def get_pipeline_version(store: Store, name: str, version: int) -> dict[str, Any]:
    manifest = registry.get_version(store, name, version)
    if manifest.get("kind") != KIND:
        raise PipelineError(f"{name} v{version} is not a pipeline version (no members)")
    return manifest


# ====================================================================== the repository and Triton


def _member_files(store: Store, model: str, version: int, work: Path,
                  flavour: str = "local") -> tuple[Path, Path | None]:
    """The files of a member version: what it serves as model.onnx (what its QC chose: a CPU-compiled artefact that
    passed and is still the file QC checked, else model.onnx; the single-model deploy's choice,
    ``deploy._served_artifact``) and, in the production flavour, its TensorRT plan when one was compiled."""
    from tasks.steps import deploy as deploy_step

    if not store.exists(layout.version_file_key(model, version, layout.MODEL_ONNX)):
        raise PipelineError(f"member {model} v{version} has no model.onnx in {store.url}")
    folder = work / f"{model}-v{version}"
    folder.mkdir(parents=True, exist_ok=True)
    onnx, plan = deploy_step._fetch(store, model, version, folder, flavour)
    path, served = deploy_step._served_artifact(store, model, version, folder, flavour, onnx, plan)
    logger.info("pipeline member %s v%s serves %s (%s)", model, version, served["artifact"], served.get("reason"))
    return path, plan


def write_version(store: Store, repo_dir: Path, spec: PipelineSpec, manifest: dict[str, Any], work: Path,
                  flavour: str = "local") -> dict[str, int]:
    """Put pipeline version ``manifest`` (and its member versions) into the repository ``repo_dir``; returns
    role -> member version."""
    from tasks.model import pipeline_repo

    cfg = load_settings()
    specs = member_specs(spec, cfg.models_dir)
    pipeline_repo.render_pipeline(flavour, repo_dir, spec, cfg.models_dir)
    members = {role: int(manifest["members"][role]["version"]) for role in ROLES}
    for role, version in members.items():
        model = spec.member_names[role]
        served, plan = _member_files(store, model, version, work, flavour)
        pipeline_repo.write_member_version(repo_dir, specs[role], version, served, plan_path=plan, pipeline=spec.name)
    pipeline_repo.write_pipeline_version(repo_dir, spec, cfg.models_dir, int(manifest["version"]), members)
    return members


def member_triton_names(spec: PipelineSpec) -> dict[str, str]:
    from tasks.model import pipeline_repo

    return pipeline_repo.member_model_names(spec)


def _load(client: Any, spec: PipelineSpec, *, members: bool = True, pipeline: bool = True) -> None:
    """Ask Triton to (re)load what the repository pins: the members first, then the pipeline."""
    if members:
        for name in member_triton_names(spec).values():
            client.load_model(name)
    if pipeline:
        client.load_model(spec.name)
        client.wait_model_ready(spec.name, timeout=120)


def answers(outputs: dict[str, Any], class_names: Sequence[str]) -> list[dict[str, Any]]:
    """One dict per frame of a pipeline answer (``PIPELINE_OUTPUTS``): ``boxes`` (used slots only), ``scores``,
    ``labels``, ``label_names``, ``label_scores``, ``readout``, ``embedding``, ``error``."""
    import numpy as np

    errors = dict(frame_error_rows(outputs))
    counts = np.asarray(outputs["COUNT"]).reshape(-1)
    out = []
    for i, k in enumerate(counts.tolist()):
        k = int(k)
        labels = np.asarray(outputs["BOX_LABELS"][i][:k], np.int64)
        readout = outputs["READOUT"].reshape(-1)[i]
        out.append({"boxes": np.asarray(outputs["BOXES"][i][:k], np.float32),
                    "scores": np.asarray(outputs["BOX_SCORES"][i][:k], np.float32),
                    "labels": labels, "label_names": [class_names[c] if 0 <= c < len(class_names) else str(c)
                                                      for c in labels.tolist()],
                    "label_scores": np.asarray(outputs["LABEL_SCORES"][i][:k], np.float32),
                    "readout": readout.decode("utf-8", "replace") if isinstance(readout, bytes) else str(readout),
                    "embedding": np.asarray(outputs["EMBEDDING"][i], np.float32), "error": errors.get(i)})
    return out


def _scene_frames(spec: PipelineSpec, golden: Any, n: int) -> list[bytes]:
    from tasks.model.frames import encode_frame

    det = member_specs(spec, load_settings().models_dir)["detector"]
    return [encode_frame(img, det) for img in golden.images[:n]]


def _truth_readout(spec: PipelineSpec, golden: Any, i: int, class_names: Sequence[str]) -> str:
    from tasks.model.scene_codec import readout

    return readout(golden.boxes[i], [class_names[int(c)] for c in golden.classes[i]])


def score(spec: PipelineSpec, golden: Any, got: Sequence[dict[str, Any]], class_names: Sequence[str],
          iou: float = 0.5) -> dict[str, Any]:
    """The pipeline's figures on golden scenes: exact read-out accuracy, per-class recall of the classified
    crops (a ground-truth object counts as recalled when a box matches it at ``iou`` and its label is right),
    box precision and recall, frames with errors."""
    from tasks.model.scene_codec import match_boxes

    n = len(got)
    exact = 0
    per_class_hit = [0] * len(class_names)
    per_class_all = [0] * len(class_names)
    tp = fp = fn = 0
    errors = 0
    for i, a in enumerate(got):
        if a["error"]:
            errors += 1
        truth = _truth_readout(spec, golden, i, class_names)
        exact += int(a["readout"] == truth and not a["error"])
        gt_boxes, gt_classes = golden.boxes[i], golden.classes[i]
        pairs = dict((g, p) for p, g in match_boxes(a["boxes"], a["scores"], gt_boxes, iou)) if not a["error"] else {}
        tp += len(pairs)
        fp += len(a["boxes"]) - len(pairs)
        fn += len(gt_boxes) - len(pairs)
        for g, c in enumerate(int(c) for c in gt_classes):
            per_class_all[c] += 1
            if g in pairs and int(a["labels"][pairs[g]]) == c:
                per_class_hit[c] += 1
    recalls = {class_names[c]: round(per_class_hit[c] / per_class_all[c], 4) if per_class_all[c] else None
               for c in range(len(class_names))}
    return {"frames": n, "readout_accuracy": round(exact / n, 4) if n else 0.0, "per_class_recall": recalls,
            "box_precision": round(tp / (tp + fp), 4) if tp + fp else (1.0 if tp + fn == 0 else 0.0),
            "box_recall": round(tp / (tp + fn), 4) if tp + fn else 1.0, "frame_errors": errors}


# ====================================================================== QC


def _check(name: str, passed: bool | None, detail: str, value: Any = None, threshold: Any = None) -> dict[str, Any]:
    return {"name": name, "passed": passed, "status": {True: "passed", False: "failed", None: "skipped"}[passed],
            "value": value, "threshold": threshold, "detail": detail}


def evaluate(store: Store, name: str, version: int, work: Path, *, latency_requests: int = LATENCY_REQUESTS
             ) -> dict[str, Any]:
    """Every check of pipeline version ``version`` in a throw-away Triton (the QC runner of
    ``MLPIPE_QC_TRITON_RUNNER``); the report (no side effects on the registry)."""
    import numpy as np

    from tasks.adapters.triton import TritonClient
    from tasks.model import pipeline_repo
    from tasks.steps import scenes
    from tasks.steps.qc import _raise_if_outage, triton_runner

    spec = _spec(name)
    manifest = get_pipeline_version(store, name, version)
    classifier = member_specs(spec, load_settings().models_dir)["classifier"]
    names = classifier.class_names
    qc = spec.qc
    golden = scenes.golden_scenes(spec)
    n = min(QC_SCENES, len(golden))
    frames = _scene_frames(spec, golden, n)
    checks: list[dict[str, Any]] = []
    report: dict[str, Any] = {"model": name, "kind": KIND, "version": version, "stage": manifest.get("stage"),
                              "members": manifest["members"], "thresholds": qc.model_dump(), "golden_scenes": n,
                              "checks": checks, "classes": names}
    champ = registry.champion(store, name)
    champion = None if champ is None or champ["version"] == version else champ
    repo = work / "repo"
    try:
        write_version(store, repo, spec, manifest, work / "files")
        if champion is not None:
            write_version(store, repo, spec, champion, work / "files")
        keep = {r: {int(champion["members"][r]["version"])} for r in ROLES} if champion else {}
        pipeline_repo.set_pipeline_serving(repo, spec, version, keep_members=keep)
    except Exception as exc:  # noqa: BLE001 - a version that cannot be put in a repository fails the gate
        _raise_if_outage(exc)
        checks.append(_check("triton_serves", False, f"the pipeline cannot be put in a Triton model repository: {exc}"))
        return _verdict(report)
    try:
        with triton_runner()(repo, work / "logs", backend_dir=work / "backends") as server, \
                TritonClient(server.grpc_url, protocol="grpc") as client:
            try:
                _load(client, spec)
                raw = client.infer_frames(name, frames, outputs=PIPELINE_OUTPUTS)
                report["_outputs"] = raw  # the drift reference of this version (run_qc; not stored in the report)
                got = answers(raw, names)
            except Exception as exc:  # noqa: BLE001
                tail = "\n".join(server.log_tail(15).splitlines()[-5:])
                checks.append(_check("triton_serves", False, f"Triton did not load or answer the pipeline: {exc}"
                                     + (f" (server log: {tail})" if tail else "")))
                return _verdict(report)
            figures = score(spec, golden, got, names)
            report["figures"] = figures
            report["examples"] = [{"index": i, "truth": _truth_readout(spec, golden, i, names),
                                   "readout": got[i]["readout"],
                                   "boxes": [[round(float(v), 1) for v in b] for b in got[i]["boxes"]]}
                                  for i in range(min(8, n))]
            bad = [a["error"] for a in got if a["error"]]
            emb = {tuple(a["embedding"].shape) for a in got}
            ok = not bad and len(got) == n
            checks.append(_check("triton_serves", ok, f"{n} golden scenes as frames through the pipeline model "
                                 f"{name!r} (detector v{manifest['members']['detector']['version']}, classifier "
                                 f"v{manifest['members']['classifier']['version']}): " +
                                 (f"{len(bad)} frames failed, first: {bad[0]}" if bad else
                                  f"all answered, embeddings {sorted(emb)}")))
            acc = figures["readout_accuracy"]
            checks.append(_check("readout_accuracy", acc >= qc.min_readout_accuracy,
                                 f"exact read-out on {n} golden scenes {acc:.4f} (threshold "
                                 f"{qc.min_readout_accuracy:g}); boxes precision {figures['box_precision']:.3f}, "
                                 f"recall {figures['box_recall']:.3f}", acc, qc.min_readout_accuracy))
            rec = {k: v for k, v in figures["per_class_recall"].items() if v is not None}
            low = [f"{k} {v:.3f}" for k, v in rec.items() if v < qc.min_class_recall]
            worst = min(rec, key=rec.get) if rec else None
            checks.append(_check("class_recall", not low and bool(rec),
                                 (f"lowest recall of the classified crops {rec[worst]:.3f} for class {worst!r}" if rec
                                  else "no golden objects") + f" (threshold {qc.min_class_recall:g})"
                                 + (f"; classes below: {', '.join(low)}" if low else ""),
                                 rec.get(worst) if worst else None, qc.min_class_recall))
            if champion is None:
                checks.append(_check("no_regression", True, "no pipeline version serves yet: nothing to regress "
                                     "against" if champ is None else f"v{version} is the serving version itself"))
            else:
                try:
                    pipeline_repo.set_pipeline_serving(repo, spec, int(champion["version"]),
                                                       keep_members={r: {int(manifest["members"][r]["version"])}
                                                                     for r in ROLES})
                    _load(client, spec, members=False)
                    c_fig = score(spec, golden, answers(client.infer_frames(name, frames, outputs=PIPELINE_OUTPUTS),
                                                        names), names)
                    drop = c_fig["readout_accuracy"] - acc
                    report["champion"] = {"version": champion["version"], **c_fig}
                    checks.append(_check("no_regression", drop <= qc.max_regression + 1e-12,
                                         f"serving v{champion['version']} {c_fig['readout_accuracy']:.4f} vs candidate "
                                         f"{acc:.4f} on the same scenes in the same server (change {-drop:+.4f}, "
                                         f"tolerance -{qc.max_regression:g})", round(-drop, 4), -qc.max_regression))
                except Exception as exc:  # noqa: BLE001 - fails closed
                    _raise_if_outage(exc)
                    checks.append(_check("no_regression", False, f"the serving pipeline v{champion['version']} "
                                         f"could not be evaluated ({type(exc).__name__}: {exc}): nothing shows the "
                                         "candidate is not worse"))
                pipeline_repo.set_pipeline_serving(repo, spec, version)
                _load(client, spec, members=False)
            for i in range(WARMUP_REQUESTS):
                client.infer_frames(name, frames[i % n:i % n + 1], outputs=PIPELINE_OUTPUTS)
            lat = []
            for i in range(latency_requests):
                t0 = time.perf_counter()
                client.infer_frames(name, frames[i % n:i % n + 1], outputs=PIPELINE_OUTPUTS)
                lat.append((time.perf_counter() - t0) * 1000)
            p50, p95 = float(np.percentile(lat, 50)), float(np.percentile(lat, 95))
            checks.append(_check("latency_p95", p95 <= qc.max_latency_p95_ms,
                                 f"{len(lat)} calls of one frame over gRPC: p50 {p50:.1f} ms, p95 {p95:.1f} ms "
                                 f"(budget {qc.max_latency_p95_ms:g} ms)", round(p95, 2), qc.max_latency_p95_ms))
    except Exception as exc:  # noqa: BLE001 - a server that cannot start is a failed infra check
        _raise_if_outage(exc)
        checks.append(_check("triton_serves", False, f"local Triton could not start or failed mid-check: {exc}"))
    return _verdict(report)


def _verdict(report: dict[str, Any]) -> dict[str, Any]:
    failed = [c for c in report["checks"] if c["passed"] is False]
    report["verdict"] = "failed" if failed else "passed"
    report["reasons"] = [f"{c['name']}: {c['detail']}" for c in failed]
    return report


def render_html(report: dict[str, Any]) -> str:
    rows = "".join(f"<tr><td>{html.escape(c['name'])}</td><td class='{c['status']}'>{c['status']}</td>"
                   f"<td>{html.escape(str(c['detail']))}</td></tr>" for c in report["checks"])
    members = "".join(f"<li>{html.escape(r)}: {html.escape(m['model'])} v{m['version']}</li>"
                      for r, m in report["members"].items())
    examples = "".join(f"<tr><td>{e['index']}</td><td>{html.escape(e['truth'])}</td><td>{html.escape(e['readout'])}"
                       f"</td><td>{html.escape(str(e['boxes']))}</td></tr>" for e in report.get("examples", []))
    fig = report.get("figures") or {}
    recall = "".join(f"<tr><td>{html.escape(k)}</td><td>{v}</td></tr>" for k, v in
                     (fig.get("per_class_recall") or {}).items())
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>QC pipeline {html.escape(report['model'])} "
            f"v{report['version']}</title><style>body{{font-family:sans-serif;margin:2em}}td{{padding:3px 8px}}"
            f".passed{{color:#070}}.failed{{color:#b00}}.skipped{{color:#777}}</style></head><body>"
            f"<h1>QC of pipeline {html.escape(report['model'])} v{report['version']}: {report['verdict']}</h1>"
            f"<ul>{members}</ul><table>{rows}</table><h2>Per-class recall of the classified crops</h2>"
            f"<table>{recall}</table><h2>First golden scenes</h2><table><tr><th>#</th><th>truth</th><th>read-out"
            f"</th><th>boxes</th></tr>{examples}</table></body></html>")


def run_qc(store: Store, name: str, version: int, work_dir: Path | None = None) -> dict[str, Any]:
    """Evaluate, store ``qc_report.json`` / ``.html`` on the pipeline version, reject a failing candidate."""
    cfg = load_settings()
    get_pipeline_version(store, name, version)
    root = Path(work_dir) if work_dir else cfg.home / "qc"
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix=f"{name}-v{version}-", dir=root) as tmp:
        report = evaluate(store, name, version, Path(tmp))
    outputs = report.pop("_outputs", None)
    report["seconds"] = round(time.monotonic() - t0, 2)
    report["at"] = _now()
    if outputs is not None and report["verdict"] == "passed":
        from tasks.steps import monitor  # the monitor's drift reference of this version: its golden-scene answers

        report["drift_reference"] = monitor.save_pipeline_reference(store, name, version, outputs,
                                                                    source="golden scenes")
    report["report_uri"] = registry.record_artifact(store, name, version, layout.QC_REPORT_HTML,
                                                    render_html(report).encode())
    registry.record_artifact(store, name, version, layout.QC_REPORT_JSON, report)
    for c in report["checks"]:
        (logger.info if c["passed"] is not False else logger.warning)("pipeline qc %-17s %-7s %s", c["name"],
                                                                       c["status"], c["detail"])
    verdict = {"verdict": report["verdict"], "reasons": report["reasons"], "report": report["report_uri"],
               "at": report["at"], "figures": report.get("figures")}
    registry.update_version(store, name, version, lambda m: {**m, "qc": verdict}, event="qc",
                            verdict=report["verdict"], reasons=report["reasons"])
    if report["verdict"] == "failed":
        registry.set_stage(store, name, version, "rejected", "pipeline QC failed: " + "; ".join(report["reasons"]),
                           only_from=("candidate",))
    return report


# ====================================================================== deploy and rollback


def _smoke(client: Any, spec: PipelineSpec, golden: Any, names: Sequence[str]) -> dict[str, Any]:
    frames = _scene_frames(spec, golden, SMOKE_SCENES)
    got = answers(client.infer_frames(spec.name, frames, outputs=PIPELINE_OUTPUTS), names)
    fig = score(spec, golden, got, names)
    floor = max(0.0, spec.qc.min_readout_accuracy - spec.qc.smoke_margin)
    if fig["frame_errors"] or fig["readout_accuracy"] < floor:
        raise PipelineDeployError(f"smoke test failed: {fig['frame_errors']} of {len(frames)} golden scenes had "
                                  f"errors, read-out accuracy {fig['readout_accuracy']:.3f} (floor {floor:.3f})")
    return {"scenes": len(frames), "readout_accuracy": fig["readout_accuracy"], "floor": round(floor, 4)}


def _switch(store: Store, spec: PipelineSpec, manifest: dict[str, Any], action: str, target: Any) -> dict[str, Any]:
    from tasks.adapters.triton import TritonError
    from tasks.model import pipeline_repo
    from tasks.steps import deploy as deploy_step
    from tasks.steps import scenes

    name, version = spec.name, int(manifest["version"])
    names = member_specs(spec, load_settings().models_dir)["classifier"].class_names
    golden = scenes.golden_scenes(spec)
    client = deploy_step._client(target)
    what = f"{action} of pipeline {name} v{version}"
    try:
        if not client.is_live():
            raise deploy_step.TritonDown(f"Triton at {target.triton_url} is not reachable: {what} not attempted; "
                                         "nothing was changed. Start Triton (make up) or set MLPIPE_TRITON_URL")
        with deploy_step.repo_session(target, what) as session, \
                tempfile.TemporaryDirectory(prefix="mlpipe-pipeline-") as tmp:
            work, sync = session.target, session.sync
            repo = Path(work.repo_dir)
            previous = pipeline_repo.serving_pipeline_version(repo, name)
            old_members = pipeline_repo.pipeline_members(repo, name, previous) if previous else {}
            members = write_version(store, repo, spec, manifest, Path(tmp), flavour=work.default_flavour)
            try:
                pipeline_repo.set_pipeline_serving(repo, spec, version,
                                                   keep_members={r: {v} for r, v in old_members.items()})
                sync()
                _load(client, spec)  # the members (old and new versions), then the pipeline pinned to the new set
                smoke = _smoke(client, spec, golden, names)
            except Exception as exc:  # noqa: BLE001 - whatever failed, the previous version serves again
                restored = "there was no earlier pipeline version to restore"
                if previous:
                    try:
                        pipeline_repo.set_pipeline_serving(repo, spec, previous,
                                                           keep_members={r: {v} for r, v in members.items()})
                        sync()
                        _load(client, spec)
                        pipeline_repo.set_pipeline_serving(repo, spec, previous)
                        sync()
                        _load(client, spec, pipeline=False)
                        restored = f"restored pipeline v{previous}, which answers again"
                    except Exception as r_exc:  # noqa: BLE001
                        restored = f"restoring v{previous} ALSO failed: {r_exc}"
                cls = deploy_step.TritonDown if isinstance(exc, TritonError) and exc.unreachable else PipelineDeployError
                raise cls(f"{what} failed: {exc}; {restored}") from exc
            pipeline_repo.set_pipeline_serving(repo, spec, version)  # retire the old member versions
            sync()
            _load(client, spec, pipeline=False)
    finally:
        client.close()
    logger.info("%s: Triton at %s serves pipeline v%s (was v%s): %s; smoke %s", action, target.triton_url, version,
                previous, members, smoke)
    return {"previous_version": previous, "members": members, "smoke": smoke}


def _promote_all(store: Store, spec: PipelineSpec, manifest: dict[str, Any], reason: str) -> int | None:
    from tasks.steps import deploy as deploy_step

    version = int(manifest["version"])
    for role in ROLES:
        m = manifest["members"][role]
        deploy_step._promote(store, m["model"], int(m["version"]), f"served in pipeline {spec.name} v{version}")
    return deploy_step._promote(store, spec.name, version, reason)


def deploy(store: Store, name: str, version: int, target: Any = None, *, force: bool = False) -> dict[str, Any]:
    """Serve pipeline version ``version`` (it must have passed the pipeline QC unless ``force``)."""
    from tasks.steps import deploy as deploy_step

    spec = _spec(name)
    manifest = get_pipeline_version(store, name, version)
    verdict = (manifest.get("qc") or {}).get("verdict")
    if not force and (manifest.get("stage") == "rejected" or verdict != "passed"):
        raise PipelineError(f"pipeline {name} v{version} has not passed its QC gate (stage {manifest.get('stage')}, "
                            f"verdict {verdict}): run `mlpipe pipeline qc --pipeline {name} --version {version}`")
    target = target or deploy_step.ServingTarget.from_env()
    try:
        switched = _switch(store, spec, manifest, "deploy", target)
    except Exception as exc:
        registry.record_event(store, name, "deploy_failed", version=version, reason=str(exc))
        raise
    archived = _promote_all(store, spec, manifest, "deployed after pipeline QC" if verdict == "passed"
                            else "forced deploy")
    registry.record_event(store, name, "deploy", version=version, previous=switched["previous_version"],
                          members=switched["members"], archived=archived, smoke=switched["smoke"],
                          triton=target.triton_url, kind=KIND)
    return {"pipeline": name, "deployed_version": version, "previous_version": switched["previous_version"],
            "members": switched["members"], "archived_version": archived, "smoke": switched["smoke"]}


def rollback(store: Store, name: str, version: int, target: Any = None, reason: str = "manual rollback"
             ) -> dict[str, Any]:
    """Serve an earlier pipeline version again, with exactly its member versions."""
    from tasks.steps import deploy as deploy_step

    spec = _spec(name)
    manifest = get_pipeline_version(store, name, version)
    if manifest.get("stage") == "rejected":
        raise PipelineError(f"pipeline {name} v{version} was rejected by QC; roll back to a version that passed")
    target = target or deploy_step.ServingTarget.from_env()
    switched = _switch(store, spec, manifest, "rollback", target)
    replaced = _promote_all(store, spec, manifest, f"rollback: {reason}")
    registry.record_event(store, name, "rollback", version=version, previous=switched["previous_version"],
                          members=switched["members"], archived=replaced, reason=reason, kind=KIND)
    return {"pipeline": name, "serving_version": version, "previous_version": switched["previous_version"],
            "members": switched["members"], "smoke": switched["smoke"]}


def status(store: Store, name: str, target: Any = None) -> dict[str, Any]:
    from tasks.model import pipeline_repo
    from tasks.steps import deploy as deploy_step

    target = target or deploy_step.ServingTarget.from_env()
    champ = registry.champion(store, name)
    out: dict[str, Any] = {"pipeline": name, "champion": None if champ is None else
                           {"version": champ["version"], "members": {r: champ["members"][r]["version"] for r in ROLES}},
                           "versions": [{"version": v["version"], "stage": v.get("stage"),
                                         "qc": (v.get("qc") or {}).get("verdict"),
                                         "members": {r: v["members"][r]["version"] for r in ROLES}}
                                        for v in registry.all_versions(store, name) if v.get("kind") == KIND]}
    if target.repo_url is None and Path(target.repo_dir).is_dir():
        pinned = pipeline_repo.serving_pipeline_version(Path(target.repo_dir), name)
        out["repository_pins"] = pinned
    return out


# ====================================================================== CLI


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mlpipe pipeline", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--log-level", default=None)
    sub = p.add_subparsers(dest="action", required=True)
    c = sub.add_parser("compose", help="a candidate pipeline version of member versions")
    q = sub.add_parser("qc", help="gate a pipeline version end to end in a throw-away Triton")
    d = sub.add_parser("deploy", help="serve a pipeline version (swaps its members as one step)")
    r = sub.add_parser("rollback", help="serve an earlier pipeline version again")
    s = sub.add_parser("status", help="versions, stages, members, the champion and the repository's pin")
    mem = sub.add_parser("members", help="the model project of each role (what the retrain DAG trains)")
    sh = sub.add_parser("show", help="one pipeline version's manifest")
    for sp in (c, q, d, r, s, sh, mem):
        sp.add_argument("--pipeline", default=None, help="pipeline name (models/<name>/pipeline.yaml; default "
                        "$MLPIPE_MODEL_NAME)")
        sp.add_argument("--result-json", type=Path, default=None, help="write the result here (Airflow XCom)")
    for role in ROLES:
        c.add_argument(f"--{role}", type=_optional_version, default=None, metavar="VERSION",
                       help=f"the {role} member's version (default or empty: the serving pipeline's, else its "
                            "champion)")
    c.add_argument("--reason", default="composed")
    for sp in (q, d, r, sh):
        sp.add_argument("--version", type=int, required=True)
    q.add_argument("--no-fail", action="store_true", help="exit 0 on a failed gate (the verdict is in the result)")
    d.add_argument("--force", action="store_true", help="deploy without a passed QC verdict (recorded)")
    r.add_argument("--reason", default="manual rollback")
    return p


def _optional_version(text: str) -> int | None:
    text = str(text).strip()
    if text in ("", "None"):
        return None
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"a version is an integer >= 1 (got {text!r})")
    return int(text)


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(_main, argv)


def _main(argv: Sequence[str] | None) -> int:
    args = _parser().parse_args(argv)
    setup_logging(args.log_level)
    cfg = load_settings()
    name = args.pipeline or cfg.model_name
    store = open_store(cfg)
    if args.action == "compose":
        m = compose(store, name, {r: getattr(args, r) for r in ROLES}, reason=args.reason)
        result: dict[str, Any] = {"pipeline": name, "version": m["version"], "stage": m["stage"],
                                  "members": {r: m["members"][r]["version"] for r in ROLES}}
    elif args.action == "qc":
        rep = run_qc(store, name, args.version)
        result = {k: rep.get(k) for k in ("model", "version", "verdict", "reasons", "figures", "report_uri")}
        if rep["verdict"] == "failed" and not args.no_fail:
            print(json.dumps(result, indent=2, default=str))
            if args.result_json:
                write_result_json(args.result_json, result)
            raise PipelineQCFailed(f"pipeline QC failed for {name} v{args.version}: " + "; ".join(rep["reasons"]))
    elif args.action == "deploy":
        result = deploy(store, name, args.version, force=args.force)
    elif args.action == "rollback":
        result = rollback(store, name, args.version, reason=args.reason)
    elif args.action == "members":
        result = {**_spec(name).member_names, "pipeline": name}
    elif args.action == "status":
        result = status(store, name)
    else:
        result = get_pipeline_version(store, name, args.version)
    print(json.dumps(result, indent=2, default=str))
    if args.result_json:
        write_result_json(args.result_json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
