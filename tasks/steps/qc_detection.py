"""QC of a detector on its own: the member gate a ``task: detection`` version passes before a pipeline may use it.

On the golden scenes of its pipeline (``tasks.steps.scenes.golden_scenes``: composed only from golden digits,
never in a drop), with the thresholds of the detector's spec (``qc``) and its decoding (``detection``):

* ``loads``: ``model.onnx`` is the detector's ONNX contract (``tasks.model.networks.check_onnx_contract``) and
  gives finite outputs on the golden scenes;
* ``precision`` / ``recall``: boxes decoded by ``tasks.model.scene_codec.decode_centres`` and matched one to
  one to the ground truth at ``qc.iou_threshold`` (``match_boxes``): precision >= ``min_precision``, recall >=
  ``min_recall``;
* ``no_regression``: champion recall - candidate recall <= ``max_regression`` (same scenes); a champion that
  cannot be evaluated fails closed unless overridden, as for a classifier;
* ``parity_onnx_torch``: the trainer's ``model.pt`` against ``model.onnx`` (``tasks.model.detector``), when
  the trainer left one.

Serving checks (Triton loads it, latency) are the pipeline's QC (``tasks.steps.pipeline``): a detector is
only ever served inside its pipeline. ``tasks.steps.qc.run_qc`` calls ``evaluate`` for a detection spec and
stores the report like any other (``qc_report.json`` / ``.html``, the verdict on the version, a failing
candidate rejected).
"""

from __future__ import annotations

import html
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

from tasks.adapters.storage import Store
from tasks.config import load_settings
from tasks.contracts import layout
from tasks.contracts.spec import ModelSpec
from tasks.steps import registry

logger = logging.getLogger(__name__)

BATCH = 64


@dataclass(frozen=True)
class DetectionThresholds:
    """The detector gate's thresholds (the spec's ``qc``; CLI flags override)."""

    min_precision: float
    min_recall: float
    iou_threshold: float
    max_regression: float
    max_parity_diff: float

    @classmethod
    def for_spec(cls, spec: ModelSpec, **overrides: Any) -> "DetectionThresholds":
        qc = spec.qc
        values = {"min_precision": qc.min_precision, "min_recall": qc.min_recall, "iou_threshold": qc.iou_threshold,
                  "max_regression": qc.max_regression, "max_parity_diff": qc.max_parity_diff}
        values.update({k: v for k, v in overrides.items() if v is not None and k in values})
        th = cls(**values)
        for name in ("min_precision", "min_recall", "iou_threshold", "max_regression"):
            value = getattr(th, name)
            if value is None or not 0.0 <= value <= 1.0:
                raise ValueError(f"detection QC threshold {name} must be a fraction in [0, 1], got {value}")
        return th


def _check(name: str, passed: bool | None, detail: str, value: Any = None, threshold: Any = None) -> dict[str, Any]:
    return {"name": name, "passed": passed, "status": {True: "passed", False: "failed", None: "skipped"}[passed],
            "value": value, "threshold": threshold, "detail": detail}


def run_detector(session: Any, images: Any, spec: ModelSpec) -> dict[str, Any]:
    """The raw outputs (``tasks.model.detector.run_onnx``: role -> array) of an ONNX Runtime ``session`` of
    ``spec``'s detector on uint8 ``images`` [N, H, W, C]."""
    from tasks.model import detector

    return detector.run_onnx(session, detector.to_detector_input(images, spec), spec)


def box_metrics(predicted: Sequence[tuple[Any, Any, Any]], truth: Sequence[Any], iou_threshold: float
                ) -> dict[str, Any]:
    """``tasks.model.detector.detection_metrics`` rounded for the report, plus the number of frames."""
    from tasks.model.detector import detection_metrics

    m = detection_metrics(predicted, truth, iou_threshold)
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in m.items()} | {"frames": len(truth)}


def golden_scenes_for(spec: ModelSpec):
    """The golden scenes of the pipeline that has ``spec`` as its detector (``BadInput`` when none does)."""
    from tasks.contracts.errors import BadInput
    from tasks.contracts.pipeline import pipeline_of
    from tasks.steps import scenes

    pipeline = pipeline_of(spec.name, load_settings().models_dir)
    if pipeline is None:
        raise BadInput(f"detector {spec.name!r} is no pipeline's member: its golden scenes come from the pipeline "
                       f"(models/<pipeline>/pipeline.yaml members.detector: {spec.name})")
    return scenes.golden_scenes(pipeline)


def evaluate(store: Store, spec: ModelSpec, version: int, th: DetectionThresholds, work: Path,
             champion_override: str | None = None) -> dict[str, Any]:
    """Every check of detector version ``version``; the report dict (no side effects on the registry)."""
    import numpy as np

    from tasks.adapters.storage import ObjectNotFound
    from tasks.model import detector
    from tasks.model.networks import OnnxContractError, check_onnx_contract, onnx_session
    from tasks.steps.qc import _raise_if_outage, unreadable_champion

    model = spec.name
    manifest = registry.get_version(store, model, version)
    prefix = layout.version_prefix(model, version)
    golden = golden_scenes_for(spec)
    checks: list[dict[str, Any]] = []
    report: dict[str, Any] = {"model": model, "version": version, "task": "detection", "stage": manifest.get("stage"),
                              "spec": manifest.get("spec"), "classes": spec.class_names,
                              "golden_set": {"scenes": len(golden), "objects": int(sum(len(b) for b in golden.boxes))},
                              "golden_set_size": len(golden), "thresholds": asdict(th), "checks": checks}

    def fail_load(detail: str) -> dict[str, Any]:
        checks.append(_check("loads", False, detail))
        report.update(verdict="failed", reasons=[f"loads: {detail}"], artifact_failures=[])
        return report

    try:
        onnx_path = store.get_file(prefix + layout.MODEL_ONNX, work / layout.MODEL_ONNX)
    except ObjectNotFound:
        return fail_load(f"model.onnx is missing from {store.uri(prefix)}")
    try:
        check_onnx_contract(onnx_path, spec)
        outputs = run_detector(onnx_session(onnx_path), golden.images, spec)
    except OnnxContractError as exc:
        return fail_load(str(exc))
    except Exception as exc:  # noqa: BLE001 - a model that fails on real frames is a failed gate, not a crash
        _raise_if_outage(exc)
        return fail_load(f"model.onnx does not run in ONNX Runtime on the golden scenes: {type(exc).__name__}: "
                         f"{str(exc).strip()[:500]}")
    if not all(np.isfinite(v).all() for v in outputs.values()):
        return fail_load("model.onnx gives NaN or infinite outputs on the golden scenes")
    checks.append(_check("loads", True, f"model.onnx is the detection contract of spec {model!r}: {spec.onnx.input} "
                         f"[N, {', '.join(map(str, spec.input_shape))}] -> {spec.onnx.logits}, {spec.onnx.box_size}, "
                         f"{spec.onnx.embedding} [N, {spec.embedding_dim}]"))
    predicted = detector.decode_outputs(outputs, spec)
    m = box_metrics(predicted, golden.boxes, th.iou_threshold)
    report["metrics"] = m
    checks.append(_check("precision", m["precision"] >= th.min_precision,
                         f"golden-scene box precision {m['precision']:.4f} at IoU {th.iou_threshold:g} ({m['tp']} "
                         f"matched, {m['fp']} false boxes; threshold {th.min_precision:g})", m["precision"],
                         th.min_precision))
    checks.append(_check("recall", m["recall"] >= th.min_recall,
                         f"golden-scene box recall {m['recall']:.4f} at IoU {th.iou_threshold:g} ({m['fn']} of "
                         f"{m['tp'] + m['fn']} objects missed; threshold {th.min_recall:g})", m["recall"],
                         th.min_recall))

    champ = registry.champion(store, model)
    report["champion"] = None
    if champ is None:
        checks.append(_check("no_regression", True, "no champion in production yet: nothing to regress against"))
    elif champ["version"] == version:
        checks.append(_check("no_regression", True, f"v{version} is the champion itself"))
    else:
        try:
            c_onnx = store.get_file(layout.version_file_key(model, champ["version"], layout.MODEL_ONNX),
                                    work / "champion.onnx")
            check_onnx_contract(c_onnx, spec)
            cm = box_metrics(detector.decode_outputs(run_detector(onnx_session(c_onnx), golden.images, spec), spec),
                             golden.boxes, th.iou_threshold)
        except Exception as exc:  # noqa: BLE001 - an unreadable champion fails the gate unless overridden
            _raise_if_outage(exc)
            why = f"champion v{champ['version']} could not be evaluated on the golden scenes ({type(exc).__name__}: {exc})"
            checks.append(unreadable_champion(why, champion_override, report))
        else:
            drop = cm["recall"] - m["recall"]
            report["champion"] = {"version": champ["version"], **cm}
            checks.append(_check("no_regression", drop <= th.max_regression + 1e-12,
                                 f"champion v{champ['version']} recall {cm['recall']:.4f} vs candidate "
                                 f"{m['recall']:.4f} on the same scenes (change {-drop:+.4f}, tolerance "
                                 f"-{th.max_regression:g})", round(-drop, 4), -th.max_regression))

    checks.append(_parity(store, spec, prefix, onnx_path, golden.images[:32], th, work))
    failed = [c for c in checks if c["passed"] is False]
    report["verdict"] = "failed" if failed else "passed"
    report["reasons"] = [f"{c['name']}: {c['detail']}" for c in failed]
    report["artifact_failures"] = []
    report["training_metrics"] = {k: v for k, v in (manifest.get("metrics") or {}).items()
                                  if k.startswith(("golden_", "val_"))}
    report["examples"] = _examples(golden, predicted)
    return report


def _parity(store: Store, spec: ModelSpec, prefix: str, onnx_path: Path, images: Any, th: DetectionThresholds,
            work: Path) -> dict[str, Any]:
    if not store.exists(prefix + layout.MODEL_PT):
        return _check("parity_onnx_torch", None, "skipped: the trainer left no model.pt (its own parity check ran at "
                      "export)", threshold=th.max_parity_diff)
    try:
        from tasks.model import detector

        torch_model = detector.load_detector(store.get_file(prefix + layout.MODEL_PT, work / layout.MODEL_PT), spec)
        diff = detector.check_detector_parity(torch_model, onnx_path, spec, images=images,
                                              tolerance=th.max_parity_diff)
    except Exception as exc:  # noqa: BLE001 - ParityError, a bad state_dict, an unreadable file
        from tasks.steps.qc import _raise_if_outage

        _raise_if_outage(exc)
        return _check("parity_onnx_torch", False, f"{type(exc).__name__}: {exc}", threshold=th.max_parity_diff)
    return _check("parity_onnx_torch", True, f"max |ONNX - PyTorch| over the heatmap, box sizes and embedding: "
                  f"{diff:.3g}", diff, th.max_parity_diff)


def _examples(golden: Any, predicted: Sequence[tuple[Any, Any, Any]], n: int = 8) -> list[dict[str, Any]]:
    """The first ``n`` golden scenes with their true and found boxes (the HTML report draws them)."""
    out = []
    for i in range(min(n, len(golden))):
        boxes, scores, _ = predicted[i]
        out.append({"index": i, "truth": [[round(float(v), 1) for v in b] for b in golden.boxes[i]],
                    "found": [[round(float(v), 1) for v in b] for b in boxes],
                    "scores": [round(float(s), 3) for s in scores]})
    return out


def render_html(report: dict[str, Any], images: Any = None) -> str:
    """The detector's QC report: verdict, checks, metrics, and the first golden scenes with their boxes
    (true green, found red) when ``images`` (the golden scenes) are given."""
    rows = "".join(f"<tr><td>{html.escape(c['name'])}</td><td class='{c['status']}'>{c['status']}</td>"
                   f"<td>{html.escape(str(c['detail']))}</td></tr>" for c in report.get("checks", []))
    metrics = report.get("metrics") or {}
    figure = ""
    if images is not None and report.get("examples"):
        figure = f"<h2>Golden scenes</h2><img alt='golden scenes with boxes' src='data:image/png;base64,{_scenes_png(images, report['examples'])}'>"
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>QC {html.escape(report['model'])} "
            f"v{report['version']}</title><style>body{{font-family:sans-serif;margin:2em}}td{{padding:4px 8px}}"
            f".passed{{color:#070}}.failed{{color:#b00}}.skipped{{color:#777}}</style></head><body>"
            f"<h1>QC of detector {html.escape(report['model'])} v{report['version']}: {report.get('verdict')}</h1>"
            f"<p>{len(report.get('reasons', []))} failed check(s). Golden scenes: "
            f"{html.escape(str(report.get('golden_set')))}</p><table>{rows}</table>"
            f"<h2>Metrics</h2><pre>{html.escape(str(metrics))}</pre>{figure}</body></html>")


def _scenes_png(images: Any, examples: list[dict[str, Any]]) -> str:
    import base64
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.patches as patches
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(examples), figsize=(2 * len(examples), 2.2))
    for ax, ex in zip(list(getattr(axes, "flat", [axes])), examples):
        ax.imshow(images[ex["index"]])
        for colour, key in (("lime", "truth"), ("red", "found")):
            for x0, y0, x1, y1 in ex[key]:
                ax.add_patch(patches.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, color=colour, lw=1))
        ax.axis("off")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()
