"""``make demo``: the main job end to end on the embedded defaults.

1. a fresh local state under ``var/demo/`` (object store, Airflow DB, ClearML offline);
2. a data drop of real MNIST digits written to the object store;
3. the ``retrain`` DAG run in-process with ``airflow dags test``;
4. a summary printed and written to ``var/demo/summary.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from tasks.config import PROJECT_ROOT, load_settings

DEMO_HOME = PROJECT_ROOT / "var" / "demo"


def _say(msg: str) -> None:
    print(f"\n==> {msg}", flush=True)


def _find_validation(store, drop_id: str) -> dict[str, Any] | None:
    key = f"drops/{drop_id}/validation/result.json"
    return store.get_json(key) if store.exists(key) else None


def run_demo(home: Path = DEMO_HOME, size: int = 3000, seed: int = 0, epochs: int = 8,
             keep: bool = False) -> dict[str, Any]:
    started = time.monotonic()
    if home.exists() and not keep:
        shutil.rmtree(home)
    home.mkdir(parents=True, exist_ok=True)
    os.environ["MLPIPE_HOME"] = str(home)
    os.environ["MLPIPE_STORE_URL"] = f"file://{home / 'store'}"
    os.environ.setdefault("MLPIPE_EXECUTION", "local")
    os.environ.setdefault("CLEARML_OFFLINE_MODE", "1")
    os.environ.setdefault("CLEARML_NO_DEFAULT_SERVER", "1")
    cfg = load_settings()

    from tasks import drops, registry
    from tasks.airflow_local import dags_test
    from tasks.storage import open_store

    store = open_store(cfg)
    drop_id = f"demo-{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}"
    _say(f"generating drop {drop_id}: {size} real MNIST digits (seed {seed}) into {store.url}")
    info = drops.make_drop(store, drop_id, size=size, seed=seed)
    print(json.dumps(info, indent=2, default=str))

    _say("running the retrain DAG (airflow dags test retrain): validate -> train -> register")
    proc = dags_test("retrain", {"drop_id": drop_id, "epochs": epochs, "seed": seed}, echo=True)
    (home / "dag_run.log").write_text(proc.stdout)

    validation = _find_validation(store, drop_id)
    versions = registry.all_versions(store, cfg.model_name)
    mine = [v for v in versions if drop_id in [d["drop_id"] for d in v["lineage"]["drops"]]]
    version = mine[-1] if mine else None
    metrics = version["metrics"] if version else {}
    summary: dict[str, Any] = {
        "drop_id": drop_id,
        "dag_run": "success" if proc.returncode == 0 else f"failed (exit {proc.returncode})",
        "validation": "passed" if validation and validation.get("success") else "failed",
        "val_accuracy": metrics.get("val_accuracy"),
        "golden_accuracy": metrics.get("golden_accuracy"),
        "model_name": cfg.model_name,
        "model_version": version["version"] if version else None,
        "model_stage": version["stage"] if version else None,
        "reports": {
            "validation_result": store.uri(f"drops/{drop_id}/validation/result.json"),
            "validation_data_docs": (validation or {}).get("report_uri"),
            "metrics": (version or {}).get("files", {}).get("metrics.json"),
            "training_curves": (version or {}).get("files", {}).get("curves.png"),
            "lineage": store.uri(f"models/{cfg.model_name}/{version['version']}/lineage.json") if version else None,
            "dag_run_log": str(home / "dag_run.log"),
        },
        "seconds": round(time.monotonic() - started, 1),
    }
    out = home / "summary.json"
    out.write_text(json.dumps(summary, indent=2, default=str))
    _say(f"summary (also in {out})")
    print(json.dumps(summary, indent=2, default=str))
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tasks.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=3000, help="images in the generated drop (default 3000)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--home", type=Path, default=DEMO_HOME, help="state folder (wiped first)")
    args = parser.parse_args(argv)
    summary = run_demo(args.home, size=args.size, seed=args.seed, epochs=args.epochs)
    ok = summary["validation"] == "passed" and summary["model_version"] is not None
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
