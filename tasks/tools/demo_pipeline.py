"""``make demo MODEL=scenes``: the multi-model pipeline end to end (``mlpipe demo --model <pipeline>``).

1. a fresh local state under ``var/demo-<pipeline>/`` and a local Triton on loopback;
2. a scene drop (``mlpipe drops make --model <pipeline>``: camera-like frames of 1 to 4 real MNIST digits,
   boxes and classes in the manifest);
3. the ``retrain_pipeline`` DAG in-process (``airflow dags test``): validate, then per member (detector,
   classifier) train -> register -> compile -> member QC, one pipeline version, the pipeline QC in a
   throw-away Triton, and the deploy that swaps both members as one step;
4. one live call of the pipeline on a golden scene (boxes, labels, the read-out);
5. frames streamed gateway -> Kafka -> consumer -> Triton pipeline -> predictions + Qdrant (``lost: 0``);
6. with ``--regression``: a worse detector (a small drop, one epoch) trained by the same DAG with
   ``members=[detector]``: its member gate blocks it, and the serving pipeline keeps its members;
7. ``summary.json``: the detector's and the pipeline's QC figures, the stream, the regression.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from tasks.config import load_settings
from tasks.contracts import layout
from tasks.contracts.results import write_result_json


def _say(msg: str) -> None:
    print(f"\n==> {msg}", flush=True)


def _member_summary(store: Any, model: str, drop_id: str) -> dict[str, Any] | None:
    from tasks.steps import registry

    mine = [v for v in registry.all_versions(store, model)
            if drop_id in [d.get("drop_id") for d in (v.get("lineage") or {}).get("drops", [])]]
    if not mine:
        return None
    v = mine[-1]
    qc = v.get("qc") or {}
    out = {"model": model, "version": v["version"], "stage": v.get("stage"), "qc": qc.get("verdict"),
           "qc_reasons": qc.get("reasons"), "qc_report_html": qc.get("report"),
           "training": {k: val for k, val in (v.get("metrics") or {}).items() if isinstance(val, (int, float))}}
    key = layout.version_file_key(model, v["version"], layout.QC_REPORT_JSON)
    if store.exists(key):
        report = store.get_json(key)
        out["qc_figures"] = report.get("metrics") or {k: report.get(k) for k in ("accuracy", "per_class_recall")}
    return out


def run_dag(store: Any, pipeline: str, drop_id: str, *, members: list[str], epochs: int, seed: int, home: Path,
            tag: str) -> dict[str, Any]:
    """One ``retrain_pipeline`` run; what it left in the registry."""
    from tasks.contracts.pipeline import find_pipeline
    from tasks.local.airflow import dags_test
    from tasks.steps import registry

    cfg = load_settings()
    spec = find_pipeline(pipeline, cfg.models_dir)
    _say(f"running the retrain_pipeline DAG for {drop_id} (members {members}): validate -> per member train -> "
         "register -> compile -> member QC -> compose -> pipeline QC -> deploy")
    proc = dags_test("retrain_pipeline", {"pipeline": pipeline, "drop_id": drop_id, "members": members,
                                          "epochs": epochs, "seed": seed}, echo=True, timeout=2400)
    (home / f"dag_run_{tag}.log").write_text(proc.stdout)
    vkey = layout.validation_result_key(drop_id)
    validation = store.get_json(vkey) if store.exists(vkey) else None
    out: dict[str, Any] = {"drop_id": drop_id, "dag_run": "success" if proc.returncode == 0 else
                           f"failed (exit {proc.returncode})",
                           "validation": "passed" if validation and validation.get("success") else "failed",
                           "members": {role: _member_summary(store, name, drop_id)
                                       for role, name in spec.member_names.items()}}
    composed = [v for v in registry.all_versions(store, pipeline) if v.get("kind") == "pipeline"
                and any(drop_id in (m.get("drops") or []) for m in v["members"].values())]
    if composed:
        v = composed[-1]
        qc = v.get("qc") or {}
        out["pipeline_version"] = {"version": v["version"], "stage": v.get("stage"),
                                   "members": {r: m["version"] for r, m in v["members"].items()},
                                   "qc": qc.get("verdict"), "qc_reasons": qc.get("reasons"),
                                   "qc_figures": qc.get("figures"), "qc_report_html": qc.get("report")}
    return out


def live_call(triton_url: str, pipeline: str) -> dict[str, Any]:
    """The first golden scene through the pipeline model: its boxes, labels and read-out, and the truth."""
    from tasks.adapters.triton import TritonClient
    from tasks.contracts.pipeline import find_pipeline, member_specs
    from tasks.contracts.serving import PIPELINE_OUTPUTS
    from tasks.model.frames import encode_frame
    from tasks.steps import pipeline as pipeline_step
    from tasks.steps import scenes

    cfg = load_settings()
    spec = find_pipeline(pipeline, cfg.models_dir)
    specs = member_specs(spec, cfg.models_dir)
    golden = scenes.golden_scenes(spec)
    names = specs["classifier"].class_names
    with TritonClient(triton_url, protocol="http") as client:
        out = client.infer_frames(pipeline, [encode_frame(golden.images[0], specs["detector"])],
                                  outputs=PIPELINE_OUTPUTS)
    a = pipeline_step.answers(out, names)[0]
    return {"truth": pipeline_step._truth_readout(spec, golden, 0, names), "readout": a["readout"],
            "boxes": [[round(float(v), 1) for v in b] for b in a["boxes"]], "labels": a["label_names"],
            "label_scores": [round(float(s), 3) for s in a["label_scores"]], "frame_error": a["error"]}


def run_pipeline_demo(home: Path, pipeline: str, *, size: int = 2000, seed: int = 0, epochs: int = 8,
                      regression: bool = False, stream_frames: int = 2000) -> dict[str, Any]:
    from tasks.adapters.storage import open_store
    from tasks.contracts.pipeline import find_pipeline
    from tasks.local.triton import LocalTriton
    from tasks.model import pipeline_repo
    from tasks.steps import pipeline as pipeline_step
    from tasks.steps import scenes
    from tasks.tools.demo import _prepare_env, _step

    started = time.monotonic()
    if home.exists():
        shutil.rmtree(home)
    home.mkdir(parents=True, exist_ok=True)
    _prepare_env(home, pipeline)
    cfg = load_settings()
    spec = find_pipeline(pipeline, cfg.models_dir)
    _say(f"pipeline project {pipeline} ({cfg.models_dir / pipeline / 'pipeline.yaml'}): {spec.summary()}")
    store = open_store(cfg)
    repo = home / "model_repo"
    pipeline_repo.render_pipeline("local", repo, spec, cfg.models_dir)
    _say(f"starting a local Triton on loopback (model repository {repo})")
    summary: dict[str, Any] = {"pipeline": pipeline}
    with LocalTriton(repo, home / "logs" / "triton") as triton:
        os.environ["MLPIPE_TRITON_URL"] = triton.http_url
        print(f"Triton: http {triton.http_url}, grpc {triton.grpc_url}, pid {triton.pid}")
        drop_id = f"demo-{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}"
        _say(f"generating scene drop {drop_id}: {size} frames of 1..{spec.data.objects[1]} digits (seed {seed})")
        print(json.dumps(_step("drops", "make", "--model", pipeline, "--drop-id", drop_id, "--size", str(size),
                               "--seed", str(seed), home=home, tag="main"), indent=2, default=str)[:2000])
        summary.update(run_dag(store, pipeline, drop_id, members=list(pipeline_step.ROLES), epochs=epochs,
                               seed=seed, home=home, tag="main"))
        summary["validation"] = summary.get("validation")
        champ = pipeline_step.registry.champion(store, pipeline)
        summary["deployed_version"] = champ["version"] if champ else None
        summary["deployed_members"] = {r: m["version"] for r, m in champ["members"].items()} if champ else None
        if champ:
            _say("one live call of the pipeline on a golden scene (detector -> crops -> classifier -> read-out)")
            summary["triton_prediction"] = live_call(triton.http_url, pipeline)
            print(json.dumps(summary["triton_prediction"]))
            if stream_frames:
                from tasks.model.frames import encode_frame
                from tasks.tools.demo_stream import run_stream

                det = cfg.frame_spec(pipeline)
                golden = scenes.golden_scenes(spec)
                names = cfg.model_spec(spec.members.classifier).class_names
                bodies = [encode_frame(img, det) for img in golden.images]
                truths = [pipeline_step._truth_readout(spec, golden, i, names) for i in range(len(golden))]
                _say(f"streaming {stream_frames} scene frames: gateway -> Kafka -> consumer -> Triton pipeline -> "
                     "predictions (Kafka) + Qdrant, and 5 poison frames for the dead-letter topic")
                summary["stream"] = run_stream(home, triton.grpc_url, frames=stream_frames,
                                               samples=(bodies, truths), answer_key="readout")
                print(json.dumps(summary["stream"]))
        if regression and champ:
            bad_id = f"{drop_id}-small"  # 150 scenes: above the suite's 100-row floor, far too few for a detector
            _say(f"regression scenario: a worse detector from drop {bad_id} (150 scenes, 1 epoch); its member gate "
                 "must block it and the serving pipeline keep its members")
            _step("drops", "make", "--model", pipeline, "--drop-id", bad_id, "--size", "150", "--seed",
                  str(seed + 101), home=home, tag="regression")
            bad = run_dag(store, pipeline, bad_id, members=["detector"], epochs=1, seed=seed, home=home,
                          tag="regression")
            after = pipeline_step.registry.champion(store, pipeline)
            pinned = pipeline_repo.serving_pipeline_version(repo, pipeline)
            detector = (bad.get("members") or {}).get("detector") or {}
            summary["regression"] = {
                "drop_id": bad_id, "detector": detector, "pipeline_version": bad.get("pipeline_version"),
                "serving_version_after": pinned,
                "members_after": {r: m["version"] for r, m in after["members"].items()} if after else None,
                "blocked": detector.get("qc") == "failed" and pinned == summary["deployed_version"]
                and after is not None and after["version"] == summary["deployed_version"],
            }
    summary["seconds"] = round(time.monotonic() - started, 1)
    out = home / "summary.json"
    write_result_json(out, summary)
    _say(f"summary (also in {out})")
    print(json.dumps(summary, indent=2, default=str))
    return summary
