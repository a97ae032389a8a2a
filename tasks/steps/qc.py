"""qc: the gate a candidate must pass before it can be deployed.

In the spirit of TFX's Evaluator (blessing) and InfraValidator, for the model spec of ``--model``
(``models/<name>/spec.yaml``: its classes, input, tensor names, thresholds) on its fixed golden set
(``golden_set`` of the spec, never put in any drop: ``tasks.steps.drops.golden_set(spec)``):

* ``loads``: ``model.onnx`` is the spec's ONNX contract (``tasks.model.networks.check_onnx_contract``:
  a failure names the tensor and the expected shape) and gives finite outputs on the golden set;
* ``accuracy``: golden-set accuracy >= ``min_accuracy``;
* ``class_recall``: every class's recall >= ``min_class_recall`` (classes by their spec names);
* ``no_regression``: champion accuracy - candidate accuracy <= ``max_regression`` (same set);
* ``parity_onnx_torch``: max |ONNX - PyTorch| over logits and embedding <= ``max_parity_diff``;
* ``parity_trt_onnx``: the same for the TensorRT engine when one was compiled (else skipped, with why);
* ``compiled_int8`` / ``compiled_opt``: each CPU-compiled artefact (``model.int8.onnx``,
  ``model.opt.onnx``, see ``tasks.steps.compile``) against the ``model.onnx`` it came from on the
  golden set: label agreement >= ``min_compiled_agreement``, accuracy drop <=
  ``max_compiled_accuracy_delta``, every class's recall drop <= ``max_compiled_recall_delta``.
  These gate the *artefact*, not the version: a failing one is not served (the report's
  ``serving`` says which file deploy will serve and why: INT8 if it passed, else the optimised
  model, else ``model.onnx``), and the version's verdict does not depend on them;
* ``loads_int8`` / ``loads_opt``: the compiled artefact chosen to be served loads and answers in the
  throw-away Triton (``triton_serves`` on it); when it does not (a quantised model Triton cannot load),
  this check fails, it gates the artefact only, and the next file is tried (the other compiled
  artefact that passed, then ``model.onnx``): the version passes on ``model.onnx`` when that serves;
* ``triton_serves``: the candidate (the artefact it will be served as) loads in a real Triton (a
  throw-away server on loopback); golden images sent as encoded frames of the spec
  (``tasks.model.frames.encode_frame``) through the ensemble are all decoded (no ``FRAME_ERROR``) and
  its labels agree with ONNX Runtime on the same decoded frames;
* ``latency_p95``: p95 latency at batch 1 (one frame) through that Triton <= ``p95_latency_ms``.

Thresholds (``QCThresholds.for_spec``), lowest layer first: the ``MLPIPE_QC_*`` settings' defaults,
the spec's ``qc`` section, the ``MLPIPE_QC_*`` variables that are set, CLI flags. Output:
``qc_report.json`` (per-class results by class name) and ``qc_report.html`` (confusion matrix and
per-class recall bars labelled by class name) on the version; a failed gate sets the stage to
``rejected`` with the reasons.

    mlpipe qc --version 3            # exit 0 passed, 3 rejected (or --no-fail: exit 0, verdict in JSON)
    MLPIPE_QC_MIN_ACCURACY=0.97 mlpipe qc --version 3 --latency-requests 50

Exit codes (``tasks.contracts.errors``): 0 passed (or failed with ``--no-fail``); ``EXIT_REJECTED``
the gate failed; ``EXIT_BAD_INPUT`` an unknown version, a missing or invalid model spec, or a
nonsensical threshold (one ``error:`` line, no traceback); ``EXIT_TRANSIENT`` the object store is
unreachable (retried).
A corrupt or wrongly shaped ``model.onnx`` is a failed ``loads`` check, never a crash.
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
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Sequence

from tasks.steps import registry
from tasks.config import QCSection, load_settings, parse_bool
from tasks.contracts import layout
from tasks.contracts.errors import Rejected, is_transient, run_cli
from tasks.contracts.serving import frame_error_rows
from tasks.contracts.spec import ModelSpec
from tasks.logs import setup_logging
from tasks.adapters.storage import Store, open_store
from tasks.contracts.results import write_result_json

logger = logging.getLogger(__name__)


class QCFailed(Rejected):
    """The version failed the QC gate (rejected: final); the message lists the reasons."""


#: the thresholds a model spec declares (its ``qc`` section); the others are deployment settings only
SPEC_THRESHOLDS = ("min_accuracy", "min_class_recall", "max_regression", "max_parity_diff", "max_trt_parity_diff")
"""The classifier thresholds a spec declares (`qc`); a detector's are `tasks.steps.qc_detection.DetectionThresholds`."""


@dataclass(frozen=True)
class QCThresholds:
    """The gate's thresholds (``for_spec`` builds them; ``validate`` checks their ranges)."""

    min_accuracy: float
    min_class_recall: float
    max_regression: float
    max_parity_diff: float
    max_trt_parity_diff: float
    p95_latency_ms: float
    latency_requests: int
    triton_check: bool
    min_compiled_agreement: float
    max_compiled_accuracy_delta: float
    max_compiled_recall_delta: float

    @classmethod
    def for_spec(cls, spec: ModelSpec, **overrides: Any) -> "QCThresholds":
        """The thresholds for ``spec``, lowest layer first: the QC settings' defaults, ``spec.qc`` (for the
        thresholds a spec declares, ``SPEC_THRESHOLDS``), the ``MLPIPE_QC_*`` variables that are set, then
        the non-None ``overrides`` (CLI flags). Raises ValueError naming a threshold out of range."""
        qc = load_settings().qc
        values: dict[str, Any] = {f.name: getattr(qc, f.name) for f in fields(cls)}
        values.update({name: getattr(spec.qc, name) for name in SPEC_THRESHOLDS if values[name] is None})
        values.update({k: v for k, v in overrides.items() if v is not None})
        th = cls(**values)
        th.validate()
        return th

    def validate(self) -> None:
        """Raise ValueError naming the first threshold that makes no sense."""
        for name in ("min_accuracy", "min_class_recall", "min_compiled_agreement"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"QC threshold {name} (MLPIPE_QC_{name.upper()}) must be a fraction in [0, 1], "
                                 f"got {value}")
        for name in ("max_regression", "max_parity_diff", "max_trt_parity_diff", "p95_latency_ms",
                     "max_compiled_accuracy_delta", "max_compiled_recall_delta"):
            if getattr(self, name) < 0:
                raise ValueError(f"QC threshold {name} (MLPIPE_QC_{name.upper()}) must be >= 0, "
                                 f"got {getattr(self, name)}")
        if self.latency_requests < 1:
            raise ValueError(f"QC latency_requests (MLPIPE_QC_LATENCY_REQUESTS) must be >= 1, "
                             f"got {self.latency_requests}")


#: the built-in trainer, whose ``model.pt`` QC reloads for the ONNX/PyTorch parity check
BUILTIN_TRAINER = "tasks.steps.train:train"


def _check(name: str, passed: bool | None, detail: str, value: Any = None, threshold: Any = None) -> dict[str, Any]:
    return {"name": name, "passed": passed, "status": {True: "passed", False: "failed", None: "skipped"}[passed],
            "value": value, "threshold": threshold, "detail": detail}


def _ort_predict(onnx_path: Path, x, spec: ModelSpec) -> tuple[Any, Any]:
    """(logits, embedding) of ``onnx_path`` in ONNX Runtime for contract input ``x``."""
    from tasks.model.networks import onnx_session, run_onnx

    return run_onnx(onnx_session(onnx_path), x, spec)


def _confusion(y_true, y_pred, num_classes: int):
    """Confusion matrix ``[true, predicted]`` of ``num_classes`` classes."""
    import numpy as np

    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(cm, (y_true, y_pred), 1)
    return cm


def _recalls(cm) -> list[float]:
    """Recall per class (row) of confusion matrix ``cm``, in class id order (0 for a class with no images)."""
    return [float(cm[i, i] / cm[i].sum()) if cm[i].sum() else 0.0 for i in range(len(cm))]


def _by_name(values: Sequence[float], spec: ModelSpec) -> dict[str, float]:
    """Per-class values (class id order) keyed by class name, as reports carry them."""
    return {spec.class_name(i): v for i, v in enumerate(values)}


DEFAULT_TRITON_RUNNER = "tasks.local.triton:LocalTriton"
WARMUP_REQUESTS = 10  # batch-1 requests before the latency is measured


def triton_runner():
    """The class that starts the throw-away Triton for the infra check (``module:Class``).

    Chosen by configuration (``MLPIPE_QC_TRITON_RUNNER``, default the bundled ``tritonserver``
    launcher), so this step never imports the local stack: a deployment can plug in its own runner
    with the same interface (context manager with ``grpc_url`` and ``log_tail(n)``)."""
    import importlib

    spec = load_settings().qc.triton_runner.strip() or DEFAULT_TRITON_RUNNER
    module, _, attr = spec.partition(":")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError, ValueError) as exc:
        raise ValueError(f"MLPIPE_QC_TRITON_RUNNER={spec!r} does not name a class as 'module:Class' ({exc})") from exc


def _triton_checks(spec: ModelSpec, version: int, onnx_path: Path, images, th: QCThresholds,
                   work: Path, artifact: str = layout.MODEL_ONNX) -> list[dict[str, Any]]:
    """Load the candidate in a throw-away local Triton (InfraValidator); check its answers and batch-1 latency.

    Golden ``images`` go as encoded frames of ``spec`` (what producers send) through the ensemble; the
    reference labels are ONNX Runtime's on the same frames decoded on the host (``decode_frame``, the
    decoder Triton's preprocess model runs), so a lossy encoding does not count against the server."""
    import numpy as np

    from tasks.adapters.triton import TritonClient
    from tasks.model import repo as model_repo
    from tasks.model.frames import decode_frame, encode_frame
    from tasks.model.networks import to_input

    model = spec.name
    n = min(256, len(images))
    frames = [encode_frame(img, spec) for img in images[:n]]
    ref_labels = _ort_predict(onnx_path, to_input(np.stack([decode_frame(f, spec) for f in frames]), spec),
                              spec)[0].argmax(1)
    not_measured = "not measured: the candidate did not {} in Triton"
    try:
        repo = model_repo.render_repo("local", work / "repo", spec)
        model_repo.write_classifier_version(repo, spec, version, onnx_path)
        model_repo.set_serving_version(repo, spec, version)
    except Exception as exc:  # noqa: BLE001 - a model that cannot be put in a repository fails the gate
        return [_check("triton_serves", False, f"the candidate cannot be put in a Triton model repository: {exc}"),
                _check("latency_p95", None, not_measured.format("load"))]
    try:
        with triton_runner()(repo, work / "logs", backend_dir=work / "backends") as server:
            with TritonClient(server.grpc_url, protocol="grpc") as client:
                try:
                    client.load_model(model)
                    client.wait_model_ready(model, timeout=120)
                    out = client.infer_frames(model, frames)
                except Exception as exc:  # noqa: BLE001
                    tail = "\n".join(server.log_tail(15).splitlines()[-5:])
                    return [_check("triton_serves", False, f"Triton did not load or answer: {exc}"
                                   + (f" (server log: {tail})" if tail else "")),
                            _check("latency_p95", None, not_measured.format("answer"))]
                errors = [text for _, text in frame_error_rows(out)]
                labels = np.asarray(out["LABEL"]).reshape(-1)
                emb_shape = list(np.asarray(out["EMBEDDING"]).shape)
                agree = float(np.mean(labels == ref_labels)) if len(labels) == n else 0.0
                ok = not errors and len(labels) == n and emb_shape == [n, spec.embedding_dim] and agree >= 0.99
                detail = (f"{n} golden images as {spec.image_encoding} frames through the ensemble {model!r} "
                          f"(classifier v{version}, serving {artifact}): ")
                if errors:
                    detail += (f"{len(errors)} of {n} frames were not decoded by the preprocess model "
                               f"(FRAME_ERROR), first: {errors[0]}")
                else:
                    detail += (f"{agree:.1%} of labels agree with ONNX Runtime; LABEL {len(labels)} rows, "
                               f"EMBEDDING {emb_shape} (expected [{n}, {spec.embedding_dim}])")
                serves = _check("triton_serves", ok, detail, round(agree, 4), 0.99)
                if not ok:
                    return [serves, _check("latency_p95", None, "not measured: the answers were wrong")]
                for i in range(WARMUP_REQUESTS):
                    client.infer_frames(model, frames[i % n:i % n + 1])
                lat = []
                for i in range(th.latency_requests):
                    j = i % n
                    t0 = time.perf_counter()
                    client.infer_frames(model, frames[j:j + 1])
                    lat.append((time.perf_counter() - t0) * 1000)
                p50, p95 = float(np.percentile(lat, 50)), float(np.percentile(lat, 95))
                latency = _check("latency_p95", p95 <= th.p95_latency_ms,
                                 f"{len(lat)} requests at batch 1 over gRPC: p50 {p50:.2f} ms, p95 {p95:.2f} ms "
                                 f"(budget {th.p95_latency_ms:g} ms)", round(p95, 3), th.p95_latency_ms)
                latency["p50_ms"] = round(p50, 3)
                return [serves, latency]
    except Exception as exc:  # noqa: BLE001 - a server that cannot start is a failed infra check
        return [_check("triton_serves", False, f"local Triton could not start or failed mid-check: {exc}"),
                _check("latency_p95", None, "not measured: Triton did not run")]


def _trt_parity(store: Store, spec: ModelSpec, version: int, x, ort_logits, ort_emb, th: QCThresholds,
                work: Path) -> dict[str, Any]:
    """The TensorRT engine (``model.plan``) against ONNX Runtime on golden images (skipped without a plan)."""
    prefix = layout.version_prefix(spec.name, version)
    if not store.exists(prefix + "model.plan"):
        reason = "no TensorRT engine for this version"
        if store.exists(prefix + "compile.json"):
            try:
                why = store.get_json(prefix + "compile.json").get("reason")
            except Exception:  # noqa: BLE001 - the reason is informative only
                why = None
            reason = f"no TensorRT engine: compile {why or 'skipped'}"
        return _check("parity_trt_onnx", None, f"skipped: {reason}")
    # A plan exists and would be served (production flavour): it must be shown to agree with ONNX.
    try:
        import tensorrt as trt
        import torch
    except ImportError as exc:
        return _check("parity_trt_onnx", False, f"model.plan exists but TensorRT/torch cannot be imported here "
                      f"({exc}): run QC on a GPU node with TensorRT, or delete the plan to serve ONNX")
    try:
        import numpy as np

        if not torch.cuda.is_available():
            raise RuntimeError("no CUDA GPU is visible")
        plan = store.get_file(prefix + "model.plan", work / "model.plan")
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        engine = runtime.deserialize_cuda_engine(plan.read_bytes())
        if engine is None:
            raise RuntimeError("the engine could not be deserialized (built for another GPU or TensorRT version?)")
        ctx = engine.create_execution_context()
        names = spec.onnx
        max_batch = int(engine.get_tensor_profile_shape(names.input, 0)[2][0])
        batch = np.ascontiguousarray(x[:max(1, min(32, max_batch))])
        inp = torch.from_numpy(batch).cuda()
        outs = {names.logits: torch.empty((len(batch), spec.num_classes), device="cuda"),
                names.embedding: torch.empty((len(batch), spec.embedding_dim), device="cuda")}
        ctx.set_input_shape(names.input, tuple(inp.shape))
        ctx.set_tensor_address(names.input, inp.data_ptr())
        for name, t in outs.items():
            ctx.set_tensor_address(name, t.data_ptr())
        ctx.execute_async_v3(torch.cuda.current_stream().cuda_stream)
        torch.cuda.synchronize()
        diff = max(float(np.max(np.abs(outs[names.logits].cpu().numpy() - ort_logits[:len(batch)]))),
                   float(np.max(np.abs(outs[names.embedding].cpu().numpy() - ort_emb[:len(batch)]))))
        return _check("parity_trt_onnx", diff <= th.max_trt_parity_diff,
                      f"max |TensorRT - ONNX| over logits and embedding, {len(batch)} golden images: {diff:.3g}",
                      diff, th.max_trt_parity_diff)
    except Exception as exc:  # noqa: BLE001
        _raise_if_outage(exc)
        return _check("parity_trt_onnx", False, f"TensorRT engine could not be run for parity: {exc}")


COMPILED_CHECKS = {layout.MODEL_INT8_ONNX: "compiled_int8", layout.MODEL_OPT_ONNX: "compiled_opt"}


def compare_compiled(y, pred, c_pred, spec: ModelSpec, th: QCThresholds, acc: float | None = None,
                     recalls: list[float] | None = None) -> dict[str, Any]:
    """A compiled model's golden-set labels ``c_pred`` against ``model.onnx``'s ``pred`` (true labels ``y``;
    ``acc`` / ``recalls``: ``pred``'s, computed when not given), with ``th``'s compiled-model bars: ``agreement``,
    ``accuracy``, ``accuracy_drop``, ``recall_drop`` (the largest per-class drop), ``worst_class``, ``recalls``
    (per class) and ``failures`` (empty when the compiled model passes)."""
    import numpy as np

    if acc is None:
        acc = float(np.mean(pred == y))
    if recalls is None:
        recalls = _recalls(_confusion(y, pred, spec.num_classes))
    agree = float(np.mean(c_pred == pred))
    c_acc = float(np.mean(c_pred == y))
    c_recalls = _recalls(_confusion(y, c_pred, spec.num_classes))
    drops = [r - c for r, c in zip(recalls, c_recalls)]
    worst = int(np.argmax(drops))
    worst_name = spec.class_name(worst)
    acc_drop, rec_drop = acc - c_acc, float(drops[worst])
    failures = []
    if agree < th.min_compiled_agreement:
        failures.append(f"label agreement {agree:.2%} < {th.min_compiled_agreement:.2%}")
    if acc_drop > th.max_compiled_accuracy_delta + 1e-12:
        failures.append(f"accuracy drop {acc_drop:.4f} > {th.max_compiled_accuracy_delta:g}")
    if rec_drop > th.max_compiled_recall_delta + 1e-12:
        failures.append(f"class {worst_name!r} recall drop {rec_drop:.3f} > {th.max_compiled_recall_delta:g}")
    return {"agreement": agree, "accuracy": c_acc, "accuracy_drop": acc_drop, "recall_drop": rec_drop,
            "worst_class": worst_name, "recalls": c_recalls, "failures": failures}


def _compiled_checks(store: Store, spec: ModelSpec, version: int, x, y, onnx_path: Path, pred, acc: float,
                     recalls: list[float], th: QCThresholds, work: Path
                     ) -> tuple[list[dict[str, Any]], dict[str, Any], Path]:
    """Gate each CPU-compiled artefact against ``model.onnx`` on the golden set; choose what is served.

    Returns (checks, serving, the served file). A check's ``gates`` is ``"artifact"``: its failure keeps
    that file from being served, it never fails the version."""
    import numpy as np

    from tasks.adapters.storage import ObjectNotFound
    from tasks.contracts.files import sha256_file

    model = spec.name

    try:
        report = store.get_json(layout.version_file_key(model, version, layout.COMPILE_JSON))
        compiled = (report.get("cpu") or {}).get("artifacts") or {}
        missing = "not in the compile report"
    except ObjectNotFound:
        compiled, missing = {}, "not compiled (no compile report for this version)"
    checks: list[dict[str, Any]] = []
    passed: dict[str, tuple[Path, str, dict[str, Any]]] = {}
    why_not: dict[str, str] = {}
    for name in layout.CPU_COMPILED:
        cname = COMPILED_CHECKS[name]
        info = compiled.get(name)
        if not info or info.get("status") != "compiled":
            why = missing if not info else f"not compiled: {info.get('reason') or info.get('status')}"
            why_not[name] = why
            checks.append({**_check(cname, None, f"skipped: {name} {why}"), "gates": "artifact", "artifact": name})
            continue
        try:
            path = store.get_file(layout.compiled_model_key(model, version, name), work / name)
            sha = sha256_file(path)
            if info.get("sha256") and sha != info["sha256"]:
                raise ValueError(f"the stored file (sha256 {sha[:12]}) is not the one compile built "
                                 f"({str(info['sha256'])[:12]})")
            c_logits, c_emb = _ort_predict(path, x, spec)
            want = [len(y), spec.num_classes], [len(y), spec.embedding_dim]
            if (list(c_logits.shape), list(c_emb.shape)) != want:
                raise ValueError(f"outputs {spec.onnx.logits} {list(c_logits.shape)}, {spec.onnx.embedding} "
                                 f"{list(c_emb.shape)}; expected {want[0]} and {want[1]}")
            if not (np.isfinite(c_logits).all() and np.isfinite(c_emb).all()):
                raise ValueError("NaN or infinite outputs on the golden set")
        except Exception as exc:  # noqa: BLE001 - an unusable compiled file is a failed check, not a crash
            _raise_if_outage(exc)
            detail = f"{name} cannot be evaluated: {type(exc).__name__}: {str(exc).strip()[:300]}"
            why_not[name] = detail
            checks.append({**_check(cname, False, detail, threshold=th.min_compiled_agreement), "gates": "artifact",
                           "artifact": name})
            continue
        cmp = compare_compiled(y, pred, c_logits.argmax(1), spec, th, acc, recalls)
        agree, c_acc, acc_drop, rec_drop = cmp["agreement"], cmp["accuracy"], cmp["accuracy_drop"], cmp["recall_drop"]
        worst_name, c_recalls, failures = cmp["worst_class"], cmp["recalls"], cmp["failures"]
        detail = (f"{name} vs model.onnx on {len(y)} golden images: labels agree {agree:.2%} (min "
                  f"{th.min_compiled_agreement:.2%}), accuracy {c_acc:.4f} vs {acc:.4f} (drop {acc_drop:+.4f}, max "
                  f"{th.max_compiled_accuracy_delta:g}), largest per-class recall drop {rec_drop:+.3f} (class "
                  f"{worst_name!r}, max {th.max_compiled_recall_delta:g})"
                  + (f": FAILED ({'; '.join(failures)})" if failures else ""))
        check = {**_check(cname, not failures, detail, round(agree, 4), th.min_compiled_agreement),
                 "gates": "artifact", "artifact": name, "sha256": sha, "bytes": path.stat().st_size,
                 "accuracy": round(c_acc, 4), "accuracy_drop": round(acc_drop, 4), "recall_drop": round(rec_drop, 4),
                 "worst_class": worst_name, "per_class_recall": _by_name(c_recalls, spec)}
        checks.append(check)
        if failures:
            why_not[name] = f"{name} failed its check against model.onnx ({'; '.join(failures)})"
        else:
            passed[name] = (path, sha, check)
    chosen = next((n for n in layout.CPU_COMPILED if n in passed), None)
    rejected = [why_not[n] for n in layout.CPU_COMPILED if n in why_not and (chosen is None or
                                                                              layout.CPU_COMPILED.index(n) <
                                                                              layout.CPU_COMPILED.index(chosen))]
    if chosen is not None:
        path, sha, check = passed[chosen]
        reason = (f"{chosen} passed its check against model.onnx (labels agree {check['value']:.2%}, accuracy drop "
                  f"{check['accuracy_drop']:+.4f}, largest recall drop {check['recall_drop']:+.3f})")
        if rejected:
            reason = "; ".join(rejected) + f"; {reason}"
        serving = {"artifact": chosen, "sha256": sha, "reason": reason}
        return checks, {**serving, "flavour": "local"}, path
    reason = "no compiled artefact passed QC: " + "; ".join(why_not[n] for n in layout.CPU_COMPILED)
    serving = {"artifact": layout.MODEL_ONNX, "sha256": sha256_file(onnx_path), "reason": reason, "flavour": "local"}
    return checks, serving, onnx_path


LOADS_CHECKS = {layout.MODEL_INT8_ONNX: "loads_int8", layout.MODEL_OPT_ONNX: "loads_opt"}


def _serve_in_triton(spec: ModelSpec, version: int, images, th: QCThresholds, work: Path,
                     checks: list[dict[str, Any]], serving: dict[str, Any], served_path: Path, onnx_path: Path
                     ) -> tuple[list[dict[str, Any]], dict[str, Any], Path]:
    """The Triton checks of the file QC chose to serve; a compiled artefact that Triton cannot load or that
    answers wrongly there fails its own loads check (``loads_int8`` / ``loads_opt``, gating the artefact only)
    and the next one is tried: another compiled artefact that passed its check, then ``model.onnx``.

    So a quantised model Triton cannot load keeps the version out of production only when ``model.onnx``
    cannot be served either; the serving reason says what was passed over and why. Returns (the Triton checks
    of the file finally chosen, its serving record, its path)."""
    from tasks.contracts.files import sha256_file

    passed_compiled = [c["artifact"] for c in checks if c.get("gates") == "artifact" and c.get("passed") is True
                       and c.get("artifact") in LOADS_CHECKS]
    passed_over: list[str] = []
    while True:
        artifact = serving["artifact"]
        here = work if not passed_over else work / f"triton-{len(passed_over)}"  # a repository of its own per try
        here.mkdir(parents=True, exist_ok=True)
        triton = _triton_checks(spec, version, served_path, images, th, here, artifact=artifact)
        serves = triton[0]
        if artifact == layout.MODEL_ONNX or serves["passed"] is not False:
            if artifact != layout.MODEL_ONNX:
                checks.append({**_check(LOADS_CHECKS[artifact], True, f"{artifact} loads and answers in Triton "
                                        "(see triton_serves)"), "gates": "artifact", "artifact": artifact})
            if passed_over:
                serving = {**serving, "reason": "; ".join(passed_over) + f"; {serving['reason']}"}
            return triton, serving, served_path
        why = f"{artifact} passed its check against model.onnx but Triton cannot serve it: {serves['detail']}"
        logger.warning("%s; trying the next file", why)
        checks.append({**_check(LOADS_CHECKS[artifact], False, why), "gates": "artifact", "artifact": artifact})
        passed_over.append(why)
        passed_compiled = [n for n in passed_compiled if n != artifact]
        nxt = next((n for n in layout.CPU_COMPILED if n in passed_compiled), None)
        if nxt is not None:
            served_path = work / nxt
            serving = {"artifact": nxt, "sha256": sha256_file(served_path), "flavour": "local",
                       "reason": f"{nxt} passed its check against model.onnx"}
        else:
            served_path = onnx_path
            serving = {"artifact": layout.MODEL_ONNX, "sha256": sha256_file(onnx_path), "flavour": "local",
                       "reason": "no compiled artefact Triton can serve passed QC: model.onnx is served"}


def unreadable_champion(why: str, champion_override: str | None, report: dict[str, Any]) -> dict[str, Any]:
    """The ``no_regression`` check when the champion could not be evaluated (``why``): the gate fails closed,
    unless ``champion_override`` gives the reason to go ahead (recorded in the report's ``overrides``)."""
    if champion_override:
        logger.warning("%s: overridden (%s)", why, champion_override)
        report.setdefault("overrides", []).append({"check": "no_regression", "reason": champion_override,
                                                   "because": why})
        return _check("no_regression", True, f"overridden: {why}; override reason: {champion_override}")
    logger.error("%s: the gate fails closed", why)
    return _check("no_regression", False, f"{why}: nothing shows the candidate is not worse; fix or roll back the "
                  "champion, or rerun QC with --override-unreadable-champion 'REASON' (recorded in the report and "
                  "the registry)")


def _raise_if_outage(exc: BaseException) -> None:
    """Re-raise an outage (the object store down): it is retried, never a failed check."""
    if is_transient(exc):
        raise exc


def _load_failure(report: dict[str, Any], checks: list[dict[str, Any]], detail: str) -> dict[str, Any]:
    checks.append(_check("loads", False, detail))
    report["verdict"] = "failed"
    report["reasons"] = [f"loads: {detail}"]
    return report


def _spec_report(spec: ModelSpec, manifest: dict[str, Any]) -> dict[str, Any]:
    """The spec QC ran with (name, sha256 of its file) and the one the version was registered with."""
    current = registry.spec_record(spec)
    built_for = manifest.get("spec")
    if built_for and built_for != current:
        logger.warning("%s v%s was registered for spec %s (sha256 %s); QC runs with the current spec file "
                       "(sha256 %s)", spec.name, manifest.get("version"), built_for.get("name"),
                       str(built_for.get("sha256"))[:12], current["sha256"][:12])
    return {**current, "registered_with": built_for}


def evaluate(store: Store, spec: ModelSpec, version: int, th: QCThresholds, work: Path,
             champion_override: str | None = None) -> dict[str, Any]:
    """Run every check of version ``version`` of model ``spec.name``; return the report dict (no side
    effects on the registry).

    The gate fails closed: a champion that cannot be read or evaluated fails ``no_regression``,
    unless ``champion_override`` gives the reason to go ahead anyway (recorded in ``overrides``)."""
    import numpy as np

    from tasks.steps.drops import golden_set
    from tasks.model.networks import OnnxContractError, check_onnx_contract, check_onnx_parity, load_torch, to_input
    from tasks.adapters.storage import ObjectNotFound

    model = spec.name
    manifest = registry.get_version(store, model, version)
    prefix = layout.version_prefix(model, version)
    images, y = golden_set(spec)
    x = to_input(images, spec)
    checks: list[dict[str, Any]] = []
    report: dict[str, Any] = {"model": model, "version": version, "stage": manifest.get("stage"),
                              "spec": _spec_report(spec, manifest), "classes": spec.class_names,
                              "golden_set": spec.golden_set.model_dump(),
                              "golden_set_size": int(len(y)), "thresholds": asdict(th), "checks": checks}

    try:
        onnx_path = store.get_file(prefix + layout.MODEL_ONNX, work / layout.MODEL_ONNX)
    except ObjectNotFound:
        return _load_failure(report, checks, f"model.onnx is missing from {store.uri(prefix)}")
    try:
        check_onnx_contract(onnx_path, spec)
        logits, emb = _ort_predict(onnx_path, x, spec)
    except OnnxContractError as exc:
        return _load_failure(report, checks, str(exc))
    except Exception as exc:  # noqa: BLE001 - a model that fails on real images is a failed gate, not a crash
        return _load_failure(report, checks, f"model.onnx does not run in ONNX Runtime on the golden set: "
                             f"{type(exc).__name__}: {str(exc).strip()[:500]}")
    if not (np.isfinite(logits).all() and np.isfinite(emb).all()):
        return _load_failure(report, checks, "model.onnx gives NaN or infinite outputs on the golden set")
    checks.append(_check("loads", True, f"model.onnx is the ONNX contract of spec {model!r}: "
                         f"{spec.onnx.input} [N, {', '.join(map(str, spec.input_shape))}] -> {spec.onnx.logits} "
                         f"[N, {spec.num_classes}], {spec.onnx.embedding} [N, {spec.embedding_dim}]"))

    pred = logits.argmax(1)
    cm = _confusion(y, pred, spec.num_classes)
    acc = float((pred == y).mean())
    recalls = _recalls(cm)
    report.update(accuracy=acc, per_class_recall=_by_name(recalls, spec), confusion_matrix=cm.tolist())
    checks.append(_check("accuracy", acc >= th.min_accuracy, f"golden-set accuracy {acc:.4f} "
                         f"(threshold {th.min_accuracy:g})", round(acc, 4), th.min_accuracy))
    worst = int(np.argmin(recalls))
    low = [f"{spec.class_name(c)} {r:.3f}" for c, r in enumerate(recalls) if r < th.min_class_recall]
    checks.append(_check("class_recall", not low,
                         f"lowest recall {recalls[worst]:.3f} for class {spec.class_name(worst)!r} "
                         f"(threshold {th.min_class_recall:g})" + (f"; classes below: {', '.join(low)}" if low else ""),
                         round(min(recalls), 4), th.min_class_recall))

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
            c_pred = _ort_predict(c_onnx, x, spec)[0].argmax(1)
        except Exception as exc:  # noqa: BLE001 - an unreadable champion fails the gate unless overridden
            _raise_if_outage(exc)
            why = (f"champion v{champ['version']} could not be evaluated on the golden set "
                   f"({type(exc).__name__}: {exc})")
            checks.append(unreadable_champion(why, champion_override, report))
        else:
            c_acc = float((c_pred == y).mean())
            drop = c_acc - acc
            report["champion"] = {"version": champ["version"], "accuracy": c_acc,
                                  "per_class_recall": _by_name(_recalls(_confusion(y, c_pred, spec.num_classes)), spec)}
            checks.append(_check("no_regression", drop <= th.max_regression + 1e-12,
                                 f"champion v{champ['version']} {c_acc:.4f} vs candidate {acc:.4f} on the same "
                                 f"golden set (change {-drop:+.4f}, tolerance -{th.max_regression:g})",
                                 round(-drop, 4), -th.max_regression))

    if store.exists(prefix + "model.pt"):
        try:
            torch_model = load_torch(store.get_file(prefix + "model.pt", work / "model.pt"), spec)
            diff = check_onnx_parity(torch_model, onnx_path, spec, inputs=x[:64], tolerance=th.max_parity_diff)
            checks.append(_check("parity_onnx_torch", True, f"max |ONNX - PyTorch| over logits and embedding "
                                 f"(batches 1, 7, 32): {diff:.3g}", diff, th.max_parity_diff))
        except Exception as exc:  # noqa: BLE001 - ParityError, a bad state_dict, an unreadable file
            _raise_if_outage(exc)
            checks.append(_check("parity_onnx_torch", False, f"{type(exc).__name__}: {exc}",
                                 threshold=th.max_parity_diff))
    elif spec.trainer.entry_point != BUILTIN_TRAINER:
        checks.append(_check("parity_onnx_torch", None, f"skipped: the trainer {spec.trainer.entry_point} is not the "
                             f"built-in one ({BUILTIN_TRAINER}) and left no model.pt of the built-in network; "
                             "ONNX/framework parity is that trainer's own check (the train step checked the ONNX "
                             "contract)", threshold=th.max_parity_diff))
    else:
        checks.append(_check("parity_onnx_torch", False, "model.pt missing: parity with PyTorch cannot be shown"))

    checks.append(_trt_parity(store, spec, version, x, logits, emb, th, work))
    compiled_checks, serving, served_path = _compiled_checks(store, spec, version, x, y, onnx_path, pred, acc,
                                                             recalls, th, work)
    checks.extend(compiled_checks)
    report["serving"] = {**serving, "note": "the local flavour serves this file as the classifier's model.onnx; "
                         "the production flavour serves model.plan when one was compiled, else model.onnx"}
    if th.triton_check:
        triton, serving, served_path = _serve_in_triton(spec, version, images, th, work, checks, serving,
                                                        served_path, onnx_path)
        report["serving"] = {**report["serving"], **serving}
        checks.extend(triton)
    else:
        checks.append(_check("triton_serves", None, "skipped: MLPIPE_QC_TRITON_CHECK=0"))
        checks.append(_check("latency_p95", None, "skipped: MLPIPE_QC_TRITON_CHECK=0"))

    failed = [c for c in checks if c["passed"] is False and c.get("gates") != "artifact"]
    report["verdict"] = "failed" if failed else "passed"
    report["reasons"] = [f"{c['name']}: {c['detail']}" for c in failed]
    report["artifact_failures"] = [f"{c['name']}: {c['detail']}" for c in checks
                                   if c["passed"] is False and c.get("gates") == "artifact"]
    report["training_metrics"] = {k: manifest.get("metrics", {}).get(k) for k in ("val_accuracy", "golden_accuracy")}
    return report


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode()


MAX_ANNOTATED_CLASSES = 20  # the confusion matrix shows its counts up to this many classes


def render_html(report: dict[str, Any]) -> str:
    """A self-contained HTML page: verdict, checks table, confusion matrix and per-class recall bars,
    both labelled by class name (``report["classes"]``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    images = []
    if "confusion_matrix" in report:
        names = report["classes"]
        n = len(names)
        rotation = 45 if max(map(len, names)) > 2 else 0
        cm = np.array(report["confusion_matrix"])
        side = min(12.0, 3.0 + 0.3 * n)
        fig, ax = plt.subplots(figsize=(side + 1, side))
        im = ax.imshow(cm, cmap="Blues")
        if n <= MAX_ANNOTATED_CLASSES:
            for i in range(n):
                for j in range(n):
                    ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=7,
                            color="white" if cm[i, j] > cm.max() / 2 else "black")
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_xticks(range(n), names, rotation=rotation, ha="right" if rotation else "center")
        ax.set_yticks(range(n), names)
        ax.set_title(f"confusion matrix, golden set (v{report['version']})")
        fig.colorbar(im, ax=ax, fraction=0.046)
        images.append(("Confusion matrix", _png(fig)))
        plt.close(fig)
        fig, ax = plt.subplots(figsize=(min(14.0, 3.0 + 0.35 * n), 3.2))
        xs = np.arange(n)
        champ = report.get("champion")
        w = 0.4 if champ else 0.8
        ax.bar(xs - (w / 2 if champ else 0), [report["per_class_recall"][c] for c in names], w,
               label=f"candidate v{report['version']}")
        if champ:
            ax.bar(xs + w / 2, [champ["per_class_recall"].get(c, 0.0) for c in names], w,
                   label=f"champion v{champ['version']}")
        ax.axhline(report["thresholds"]["min_class_recall"], color="red", linestyle="--", label="threshold")
        ax.set_ylim(0, 1.02)
        ax.set_xticks(xs, names, rotation=rotation, ha="right" if rotation else "center")
        ax.set_xlabel("class")
        ax.set_ylabel("recall")
        ax.legend(loc="lower right", fontsize=8)
        images.append(("Per-class recall", _png(fig)))
        plt.close(fig)
    colour = {"passed": "#1a7f37", "failed": "#cf222e", "skipped": "#6e7781"}
    rows = "".join(
        f"<tr><td>{html.escape(c['name'])}</td><td style='color:{colour[c['status']]};font-weight:bold'>"
        f"{c['status']}</td><td>{html.escape(str(c['value']) if c['value'] is not None else '')}</td>"
        f"<td>{html.escape(str(c['threshold']) if c['threshold'] is not None else '')}</td>"
        f"<td>{html.escape(c['detail'])}</td></tr>" for c in report["checks"])
    figs = "".join(f"<figure><img src='data:image/png;base64,{b64}' alt='{t}'><figcaption>{t}</figcaption></figure>"
                   for t, b64 in images)
    verdict = report["verdict"]
    golden = report["golden_set"]
    serving = report.get("serving")
    serving_html = (f"<p><b>Served artefact:</b> {html.escape(serving['artifact'])}: {html.escape(serving['reason'])}"
                    "</p>" if serving else "")
    return f"""<!doctype html><html><head><meta charset="utf-8">
<title>QC {html.escape(report['model'])} v{report['version']}: {verdict}</title>
<style>body{{font-family:system-ui,sans-serif;margin:2em;max-width:1100px}}table{{border-collapse:collapse}}
td,th{{border:1px solid #d0d7de;padding:4px 8px;text-align:left;vertical-align:top}}figure{{display:inline-block;margin:1em}}
.verdict{{font-size:1.6em;color:{colour[verdict]}}}</style></head><body>
<h1>QC gate: {html.escape(report['model'])} v{report['version']}</h1>
<p class="verdict">{verdict.upper()}</p><p>{html.escape(report.get('at', ''))} &middot; golden set of
{report['golden_set_size']} images ({html.escape(golden['source'])}, {golden['per_class']} per class of
{len(report['classes'])}: {html.escape(', '.join(report['classes']))}) never seen in training</p>
<ul>{''.join(f'<li>{html.escape(r)}</li>' for r in report['reasons'])}</ul>
{serving_html}<table><tr><th>check</th><th>status</th><th>value</th><th>threshold</th><th>detail</th></tr>{rows}</table>
{figs}</body></html>"""


def run_qc(store: Store, model: str, version: int, th: QCThresholds | None = None,
           work_dir: Path | None = None, champion_override: str | None = None) -> dict[str, Any]:
    """Evaluate, store ``qc_report.json``/``.html`` on the version, and reject a failing candidate.

    The model spec is ``model``'s (``load_settings().model_spec(model)``; ``SpecError``, bad input, when
    there is none); ``th`` defaults to ``QCThresholds.for_spec`` of it. Only a ``candidate`` is moved to
    ``rejected``; re-running QC on a version in another stage records the new verdict on it
    (``version.json`` ``qc``) without changing its stage.
    """
    cfg = load_settings()
    spec = cfg.model_spec(model)
    detection = spec.task == "detection"
    if detection:
        from tasks.steps import qc_detection

        th = th if isinstance(th, qc_detection.DetectionThresholds) else qc_detection.DetectionThresholds.for_spec(spec)
    else:
        th = th or QCThresholds.for_spec(spec)
    registry.get_version(store, model, version)  # unknown version: RegistryError before any work
    work_root = Path(work_dir) if work_dir else cfg.home / "qc"
    work_root.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    logger.info("QC of %s v%s on the golden set (thresholds %s)", model, version, asdict(th))
    with tempfile.TemporaryDirectory(prefix=f"{model}-v{version}-", dir=work_root) as tmp:
        if detection:  # the member gate of a detector (tasks/steps/qc_detection.py)
            report = qc_detection.evaluate(store, spec, version, th, Path(tmp), champion_override=champion_override)
            page = qc_detection.render_html(report, qc_detection.golden_scenes_for(spec).images)
        else:
            report = evaluate(store, spec, version, th, Path(tmp), champion_override=champion_override)
            page = render_html(report)
    report["seconds"] = round(time.monotonic() - t0, 2)
    report["at"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    report["report_uri"] = store.uri(layout.version_file_key(model, version, layout.QC_REPORT_HTML))
    report["report_json_uri"] = store.uri(layout.version_file_key(model, version, layout.QC_REPORT_JSON))
    registry.record_artifact(store, model, version, layout.QC_REPORT_HTML, page.encode())
    registry.record_artifact(store, model, version, layout.QC_REPORT_JSON, report)
    for c in report["checks"]:
        log = logger.info if c["passed"] is not False else logger.warning
        log("qc %-18s %-7s %s", c["name"], c["status"], c["detail"])
    verdict = {"verdict": report["verdict"], "reasons": report["reasons"], "report": report["report_uri"],
               "report_json": report["report_json_uri"], "at": report["at"]}
    if report.get("overrides"):
        verdict["overrides"] = report["overrides"]
    if report.get("serving"):
        verdict["serving"] = {k: report["serving"][k] for k in ("artifact", "sha256", "reason", "flavour")}
    # the verdict on the version manifest through the registry (its only writer: no lost stage change)
    registry.update_version(store, model, version, lambda m: {**m, "qc": verdict}, event="qc",
                            verdict=report["verdict"], reasons=report["reasons"],
                            overrides=report.get("overrides", []),
                            serving=(report.get("serving") or {}).get("artifact"))
    if report.get("serving"):
        logger.info("qc serving: %s (%s)", report["serving"]["artifact"], report["serving"]["reason"])
    if report["verdict"] == "failed":
        # only a candidate is rejected, decided at the moment of the write
        if registry.set_stage(store, model, version, "rejected", "QC gate failed: " + "; ".join(report["reasons"]),
                              only_from=("candidate",)) is None:
            stage = registry.get_version(store, model, version).get("stage")
            if stage != "rejected":
                logger.warning("%s v%s is in stage %r, not a candidate: its stage is left as it is", model,
                               version, stage)
        logger.warning("QC FAILED for %s v%s: %s (report %s)", model, version, "; ".join(report["reasons"]),
                       report["report_uri"])
    else:
        logger.info("QC passed for %s v%s in %.1fs (report %s)", model, version, report["seconds"],
                    report["report_uri"])
    return report


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(_main, argv, bad_input=(ValueError,))  # RegistryError is a BadInput


def _main(argv: Sequence[str] | None) -> int:
    parser = argparse.ArgumentParser(prog="mlpipe qc", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", type=int, required=True, help="registered candidate version")
    parser.add_argument("--model", default=None, help="model name: its spec is $MLPIPE_MODELS_DIR/<name>/spec.yaml "
                        "(default $MLPIPE_MODEL_NAME or 'digits')")
    for f in fields(QCThresholds):
        flag = "--" + f.name.replace("_", "-")
        default = (f"the model spec's qc.{f.name}" if f.name in SPEC_THRESHOLDS
                   else QCSection.model_fields[f.name].default)
        kind = parse_bool if f.type in ("bool", bool) else int if f.type in ("int", int) else float
        parser.add_argument(flag, type=kind, default=None, help=f"(env MLPIPE_QC_{f.name.upper()}, default {default})")
    parser.add_argument("--no-fail", action="store_true",
                        help="exit 0 on a failed gate (the verdict is in the result); the DAG's gate task decides")
    parser.add_argument("--override-unreadable-champion", metavar="REASON", default=None,
                        help="let no_regression pass when the champion cannot be read or evaluated; the reason is "
                             "recorded in the report, the version manifest and the registry's qc event")
    parser.add_argument("--result-json", type=Path, help="write the verdict here (Airflow XCom)")
    args = parser.parse_args(argv)
    setup_logging()
    cfg = load_settings()
    model = args.model or cfg.model_name
    spec = cfg.model_spec(model)
    flags = {f.name: getattr(args, f.name) for f in fields(QCThresholds)}
    if spec.task == "detection":
        from tasks.steps.qc_detection import DetectionThresholds

        th = DetectionThresholds.for_spec(spec, max_regression=flags["max_regression"],
                                          max_parity_diff=flags["max_parity_diff"])
    else:
        th = QCThresholds.for_spec(spec, **flags)
    report = run_qc(open_store(cfg), model, args.version, th,
                    champion_override=(args.override_unreadable_champion or "").strip() or None)
    result = {k: report[k] for k in ("model", "version", "verdict", "reasons", "report_uri")}
    result["accuracy"] = report.get("accuracy")
    if report.get("task") == "detection":
        result["metrics"] = report.get("metrics")
    result["overrides"] = report.get("overrides", [])
    print(json.dumps(result, indent=2))
    if args.result_json:
        write_result_json(args.result_json, result)
    if report["verdict"] == "failed":
        why = f"QC gate failed for {report['model']} v{args.version}: " + "; ".join(report["reasons"])
        if not args.no_fail:
            raise QCFailed(why)
        logger.warning("%s (--no-fail: exit 0, the verdict is in the result)", why)
    return 0


if __name__ == "__main__":
    sys.exit(main())
