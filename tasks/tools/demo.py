"""``make demo``: the main job end to end on the embedded defaults.

1. a fresh local state under ``var/demo/`` (object store, Airflow DB, ClearML offline,
   Triton model repository);
2. a local Triton (the binary in the nvidia-pytriton wheel) on free loopback ports;
3. a data drop of the model's data written to the object store (``--model``, default
   ``MLPIPE_MODEL_NAME`` or ``digits``: real MNIST digits; ``shapes``: procedural colour shapes as JPEG;
   any model project under ``models/`` (``MLPIPE_MODELS_DIR``) whose golden-set source can make drops);
4. the ``retrain`` DAG run in-process with ``airflow dags test``:
   validate -> train -> register -> compile -> qc -> deploy;
5. one live inference through Triton on a known image of the golden set (an encoded frame, decoded
   by Triton's preprocess model);
6. a few thousand frames streamed gateway -> Kafka -> consumer sidecar -> Triton -> Kafka + Qdrant
   (``tasks.tools.demo_stream``), plus a few poison frames that must land in the dead-letter topic;
7. with ``--regression`` (``make demo-regression``): a deliberately worse model trained on a
   label-noised small drop; the QC gate must block it and the earlier version keeps serving;
8. a summary printed and written to ``var/demo/summary.json`` (``var/demo-<model>/`` for another model).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from tasks.config import PROJECT_ROOT, load_settings
from tasks.contracts import layout
from tasks.contracts.results import write_result_json

DEMO_HOME = PROJECT_ROOT / "var" / "demo"


def _say(msg: str) -> None:
    print(f"\n==> {msg}", flush=True)


def demo_home(model: str) -> Path:
    """``var/demo`` for digits, ``var/demo-<model>`` for another model (two demos never share state)."""
    return DEMO_HOME if model == "digits" else DEMO_HOME.with_name(f"demo-{model}")


def _prepare_env(home: Path, model: str) -> None:
    os.environ["MLPIPE_MODEL_NAME"] = model
    os.environ["MLPIPE_HOME"] = str(home)
    os.environ["MLPIPE_STORE_URL"] = f"file://{home / 'store'}"
    os.environ["MLPIPE_MODEL_REPO"] = str(home / "model_repo")
    os.environ.setdefault("MLPIPE_EXECUTION", "local")
    os.environ.setdefault("CLEARML_OFFLINE_MODE", "1")
    os.environ.setdefault("CLEARML_NO_DEFAULT_SERVER", "1")


def run_pipeline(store, drop_id: str, epochs: int, seed: int, home: Path, tag: str) -> dict[str, Any]:
    """Run the retrain DAG for one drop and collect what happened from the store."""
    from tasks.steps import registry
    from tasks.local.airflow import dags_test

    cfg = load_settings()
    _say(f"running the retrain DAG for {drop_id} (airflow dags test retrain): "
         "validate -> train -> register -> compile -> qc -> deploy")
    proc = dags_test("retrain", {"drop_id": drop_id, "epochs": epochs, "seed": seed}, echo=True)
    log_path = home / f"dag_run_{tag}.log"
    log_path.write_text(proc.stdout)

    vkey = layout.validation_result_key(drop_id)
    validation = store.get_json(vkey) if store.exists(vkey) else None
    mine = [v for v in registry.all_versions(store, cfg.model_name)
            if drop_id in [d["drop_id"] for d in v["lineage"]["drops"]]]
    version = mine[-1] if mine else None
    metrics = (version or {}).get("metrics", {})
    compile_info = (version or {}).get("compile") or {}
    qc = (version or {}).get("qc") or {}
    files = (version or {}).get("files", {})
    vprefix = layout.version_prefix(cfg.model_name, version["version"]) if version else None
    return {
        "drop_id": drop_id,
        "dag_run": "success" if proc.returncode == 0 else f"failed (exit {proc.returncode})",
        "validation": "passed" if validation and validation.get("success") else "failed",
        "val_accuracy": metrics.get("val_accuracy"),
        "golden_accuracy": metrics.get("golden_accuracy"),
        "model_version": version["version"] if version else None,
        "model_stage": version["stage"] if version else None,
        "compile": {"status": compile_info.get("status"), "reason": compile_info.get("reason")},
        "qc": qc.get("verdict"),
        "qc_reasons": qc.get("reasons"),
        "reports": {
            "validation_result": store.uri(vkey),
            "validation_data_docs": (validation or {}).get("report_uri"),
            "metrics": files.get("metrics.json"),
            "training_curves": files.get("curves.png"),
            "lineage": store.uri(vprefix + layout.LINEAGE) if vprefix else None,
            "qc_report_html": qc.get("report"),
            "qc_report_json": store.uri(vprefix + layout.QC_REPORT_JSON) if vprefix else None,
            "dag_run_log": str(log_path),
        },
    }


def _step(command: str, *args: str, home: Path, tag: str) -> dict[str, Any]:
    """One pipeline step as the DAG runs it (``mlpipe <command> ...``); its ``--result-json``."""
    import subprocess

    out = home / f"{tag}-{command}.json"
    proc = subprocess.run([sys.executable, "-m", "tasks.cli", command, *args, "--result-json", str(out)],
                          capture_output=True, text=True)
    (home / f"{tag}-{command}.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise RuntimeError(f"mlpipe {command} {' '.join(args)} failed (exit {proc.returncode}): "
                           f"{(proc.stderr.strip().splitlines() or ['no output'])[-1]}")
    return json.loads(out.read_text())


def prepare_candidate(store, drop_id: str, epochs: int, seed: int, home: Path,
                      also: Sequence[str] = ()) -> int:
    """A second version, validated, trained (on ``drop_id`` and the drops ``also``), registered, compiled and
    QC-gated like the DAG does, but not deployed: the rollout serves it. Returns its version."""
    model = load_settings().model_name
    _step("validate", "--model", model, "--drop-id", drop_id, home=home, tag="candidate")
    drop_args = [a for d in (drop_id, *also) for a in ("--drop-id", d)]
    run = _step("train", "--model", model, *drop_args, "--epochs", str(epochs), "--seed", str(seed),
                home=home, tag="candidate")
    reg = _step("registry", "--model", model, "register", "--run-id", run["run_id"], *drop_args,
                home=home, tag="candidate")
    version = int(reg["version"])
    _step("compile", "--model", model, "--version", str(version), home=home, tag="candidate")
    qc = _step("qc", "--model", model, "--version", str(version), "--no-fail", home=home, tag="candidate")
    if qc.get("verdict") != "passed":
        raise RuntimeError(f"the rollout candidate v{version} did not pass QC: {qc.get('reasons')}")
    return version


def run_rollout(store, version: int, *, window_s: float = 8.0, min_frames: int = 150,
                kafka: Any = None) -> dict[str, Any]:
    """``mlpipe rollout run``'s function on ``version``: shadow -> 10 % -> 50 % -> 100 % -> promote."""
    from tasks.steps import rollout

    model = load_settings().model_name
    steps: list[dict[str, Any]] = []

    def said(entry: dict[str, Any]) -> None:
        steps.append(entry)
        verdict = "holds" if entry.get("ok") else "FAILS"
        cand = entry.get("evidence", {}).get("candidate", {})
        print(f"   rollout {entry['step']}: {verdict} (candidate frames {cand.get('frames')}, agreement "
              f"{cand.get('agreement')}, p95 {cand.get('p95_ms')} ms)", flush=True)

    th = rollout.Thresholds.from_settings(window_s=window_s, min_frames=min_frames, max_wait_s=120.0)
    try:
        ro = rollout.run(store, model, version, steps="shadow,10,50,100", thresholds=th, poll_s=0.5,
                         on_step=said, kafka=kafka)
        out = ro.to_dict()
    except rollout.RolledBack as exc:
        out = {"outcome": "rolled_back", "reason": str(exc), "steps": steps}
    out["evidence"] = [{"step": s["step"], "ok": s.get("ok"), "checks": s.get("checks"),
                        "evidence": s.get("evidence")} for s in steps]
    return out


def known_class(spec: Any) -> int:
    """The class of the demo's live inference: ``7`` for digits (a known 7), else the last class."""
    return 7 if spec.num_classes > 7 else spec.num_classes - 1


def live_prediction(triton_url: str, model: str) -> dict[str, Any]:
    """One known golden-set image (the first of ``known_class``), encoded as a frame, through the ensemble."""
    import numpy as np

    from tasks.adapters.triton import TritonClient
    from tasks.model.frames import encode_frame
    from tasks.steps.drops import golden_set

    spec = load_settings().model_spec(model)
    images, labels = golden_set(spec)
    want = known_class(spec)
    i = int(np.flatnonzero(labels == want)[0])
    out = TritonClient(triton_url, protocol="http").infer_frames(model, [encode_frame(images[i], spec)])
    error = np.asarray(out["FRAME_ERROR"]).reshape(-1)[0]
    label = int(np.asarray(out["LABEL"]).reshape(-1)[0])
    return {"true_label": want, "true_class": spec.class_name(want), "label": label,
            "class": spec.class_name(label), "score": round(float(np.asarray(out["SCORE"]).reshape(-1)[0]), 4),
            "top3": [int(v) for v in np.asarray(out["TOPK_LABELS"]).reshape(-1)],
            "frame_error": (error or b"").decode("utf-8", "replace") or None}


def run_demo(home: Path | None = None, size: int = 3000, seed: int = 0, epochs: int = 8,
             regression: bool = False, stream_frames: int = 3000, model: str = "digits",
             with_rollout: bool = True) -> dict[str, Any]:
    if load_settings().is_pipeline(model):  # a pipeline project: models/<model>/pipeline.yaml
        from tasks.tools.demo_pipeline import run_pipeline_demo

        return run_pipeline_demo(home or demo_home(model), model, size=size, seed=seed, epochs=epochs,
                                 regression=regression, stream_frames=stream_frames)
    started = time.monotonic()
    home = home or demo_home(model)
    if home.exists():
        shutil.rmtree(home)
    home.mkdir(parents=True, exist_ok=True)
    _prepare_env(home, model)
    cfg = load_settings()
    spec = cfg.model_spec()
    _say(f"model project {spec.name} ({cfg.models_dir / spec.name / 'spec.yaml'}): {spec.summary()}")

    from tasks.steps import drops
    from tasks.model import repo as model_repo
    from tasks.steps import registry
    from tasks.steps.deploy import ServingTarget, status
    from tasks.adapters.storage import open_store
    from tasks.local.triton import LocalTriton

    store = open_store(cfg)
    repo = model_repo.render_repo("local", home / "model_repo", spec)
    _say(f"starting a local Triton on loopback (model repository {repo})")
    with LocalTriton(repo, home / "logs" / "triton") as triton:
        os.environ["MLPIPE_TRITON_URL"] = triton.http_url
        print(f"Triton: http {triton.http_url}, grpc {triton.grpc_url}, pid {triton.pid}")

        drop_id = f"demo-{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}"
        _say(f"generating drop {drop_id}: {size} images of {spec.name} from {spec.golden_set.source} (seed {seed}) "
             f"into {store.url}")
        print(json.dumps(drops.make_drop(store, drop_id, size=size, seed=seed, spec=spec), indent=2, default=str))
        summary = run_pipeline(store, drop_id, epochs, seed, home, "main")
        champ = registry.champion(store, cfg.model_name)
        summary["deployed_version"] = champ["version"] if champ else None
        if champ:
            _say(f"one live inference through Triton (a known {spec.class_name(known_class(spec))!r} from the "
                 "golden set, sent as an encoded frame)")
            summary["triton_prediction"] = live_prediction(triton.http_url, cfg.model_name)
            print(json.dumps(summary["triton_prediction"]))
            during = None
            if stream_frames and with_rollout:
                cand_drop = f"{drop_id}-b"
                _say(f"safe rollout: a second version from drop {cand_drop} (validate -> train -> register -> "
                     "compile -> qc, not deployed), to be rolled out on live traffic")
                drops.make_drop(store, cand_drop, size=size, seed=seed + 1, spec=spec)
                try:  # trained on both drops: twice the data, so it does not regress against the champion
                    candidate = prepare_candidate(store, cand_drop, epochs, seed + 1, home, also=[drop_id])
                except RuntimeError as exc:
                    print(f"no rollout: {exc}")
                    summary["rollout"] = {"outcome": "no candidate", "reason": str(exc)}
                else:
                    print(f"candidate v{candidate} passed QC")

                    def during(kafka: Any) -> dict[str, Any]:
                        _say(f"rolling v{candidate} out while the stream runs: shadow -> 10% -> 50% -> 100% -> "
                             "promote")
                        return run_rollout(store, candidate, kafka=kafka)
            if stream_frames:
                from tasks.tools.demo_stream import run_stream

                _say(f"streaming {stream_frames} frames: gateway -> Kafka -> consumer sidecar -> Triton -> "
                     "predictions (Kafka) + Qdrant, and 5 poison frames for the dead-letter topic")
                summary["stream"] = run_stream(home, triton.grpc_url, frames=stream_frames, during=during)
                if during is not None:
                    summary["rollout"] = summary["stream"].pop("during", None)
                print(json.dumps(summary["stream"]))
                champ = registry.champion(store, cfg.model_name)
                summary["deployed_version"] = champ["version"] if champ else None
        else:
            summary["triton_prediction"] = None

        if regression:
            bad_id = f"{drop_id}-noisy"
            _say(f"regression scenario: drop {bad_id} with 60% label noise, 400 images, 1 epoch")
            drops.make_drop(store, bad_id, size=400, seed=seed + 101, label_noise=0.6, spec=spec)
            bad = run_pipeline(store, bad_id, 1, seed, home, "regression")
            champ_after = registry.champion(store, cfg.model_name)
            serving = status(ServingTarget.from_env(), cfg.model_name)["serving_version"]
            summary["regression"] = {
                **{k: bad[k] for k in ("drop_id", "validation", "val_accuracy", "golden_accuracy",
                                       "model_version", "model_stage", "qc", "qc_reasons")},
                "qc_report_html": bad["reports"]["qc_report_html"],
                "champion_after": champ_after["version"] if champ_after else None,
                "serving_version_after": serving,
                "blocked": bad["qc"] == "failed" and serving == summary["deployed_version"],
                "triton_prediction_after": live_prediction(triton.http_url, cfg.model_name) if champ_after else None,
            }
    summary["seconds"] = round(time.monotonic() - started, 1)
    out = home / "summary.json"
    write_result_json(out, summary)
    _say(f"summary (also in {out})")
    print(json.dumps(summary, indent=2, default=str))
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mlpipe demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=None, help="images in the generated drop (default 3000; 2000 "
                        "scenes for a pipeline)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--model", default=os.environ.get("MLPIPE_MODEL_NAME") or "digits",
                        help="model project to run (models/<name>/spec.yaml; default $MLPIPE_MODEL_NAME or digits; "
                             "`make demo MODEL=shapes`)")
    parser.add_argument("--home", type=Path, default=None,
                        help="state folder, wiped first (default var/demo, var/demo-<model> for another model)")
    parser.add_argument("--stream-frames", type=int, default=3000,
                        help="frames to stream through gateway/Kafka/consumer after deploy (0: skip)")
    parser.add_argument("--no-rollout", action="store_true",
                        help="skip the safe-rollout stage (a second version rolled out on the live stream: shadow, "
                             "canary steps, promotion by its evidence)")
    parser.add_argument("--regression", action="store_true",
                        help="also train a deliberately worse model and show the QC gate blocking it")
    args = parser.parse_args(argv)
    pipeline = load_settings().is_pipeline(args.model)
    size = args.size or (2000 if pipeline else 3000)
    summary = run_demo(args.home, size=size, seed=args.seed, epochs=args.epochs, regression=args.regression,
                       stream_frames=args.stream_frames, model=args.model, with_rollout=not args.no_rollout)
    ok = summary["validation"] == "passed" and summary["deployed_version"] is not None
    if args.stream_frames:
        ok = ok and summary.get("stream", {}).get("lost") == 0
    if args.stream_frames and not args.no_rollout and not load_settings().is_pipeline(args.model):
        ok = ok and (summary.get("rollout") or {}).get("outcome") == "promoted"
    if args.regression:
        ok = ok and summary["regression"]["blocked"]
    if pipeline:
        ok = ok and summary.get("dag_run") == "success"
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
