"""The local Airflow installation: environment, metadata DB, and in-process DAG runs.

This module only starts the ``airflow`` CLI as a subprocess; it never imports
Airflow (``tasks/`` stays importable in a pod without Airflow).

    mlpipe airflow env          # print the AIRFLOW_* exports
    mlpipe airflow dags-test retrain --conf '{"drop_id": "d1"}'
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Mapping

from tasks.config import PROJECT_ROOT, load_settings
from tasks.contracts.files import sha256_bytes


def airflow_env(base: Mapping[str, str] | None = None, home: Path | None = None) -> dict[str, str]:
    """Environment for the ``airflow`` CLI: config, dags, plugins, SQLite DB under MLPIPE_HOME."""
    env = dict(os.environ if base is None else base)
    mlpipe_home = Path(home or env.get("MLPIPE_HOME") or load_settings().home).resolve()
    af_home = mlpipe_home / "airflow"
    env.update({
        "MLPIPE_HOME": str(mlpipe_home),
        "AIRFLOW_HOME": str(af_home),
        "AIRFLOW_CONFIG": str(PROJECT_ROOT / "airflow.cfg"),
        "AIRFLOW__CORE__DAGS_FOLDER": str(PROJECT_ROOT / "dags"),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(PROJECT_ROOT / "plugins"),
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{af_home / 'airflow.db'}",
        "AIRFLOW__LOGGING__BASE_LOG_FOLDER": str(af_home / "logs"),
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(af_home / "passwords.json"),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(PROJECT_ROOT), env.get("PYTHONPATH")])),
        "CLEARML_OFFLINE_MODE": env.get("CLEARML_OFFLINE_MODE", "" if env.get("CLEARML_API_HOST") else "1"),
        "CLEARML_NO_DEFAULT_SERVER": "1",
        "NO_PROXY": "127.0.0.1,localhost",
    })
    env.setdefault("MLPIPE_STORE_URL", f"file://{mlpipe_home / 'store'}")
    return env


def airflow_bin() -> str:
    exe = Path(sys.executable).with_name("airflow")
    return str(exe) if exe.exists() else (shutil.which("airflow") or "airflow")


def ensure_db(env: Mapping[str, str]) -> None:
    """Create or upgrade the SQLite metadata DB and its pools (about 8 s the first time, idempotent)."""
    Path(env["AIRFLOW_HOME"]).mkdir(parents=True, exist_ok=True)
    marker = Path(env["AIRFLOW_HOME"]) / ".db-migrated"
    if not marker.exists():
        proc = subprocess.run([airflow_bin(), "db", "migrate"], env=dict(env), capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"airflow db migrate failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
        marker.write_text("ok\n")
    ensure_pools(env)


def ensure_pools(env: Mapping[str, str]) -> None:
    """Create the pools the DAGs use (``tasks.contracts.pools``: ``mlpipe_serving`` for deploy and
    rollback); once per Airflow home and pool set (a marker names the set)."""
    from tasks.contracts.pools import POOLS

    spec = {name: {"slots": slots, "description": text, "include_deferred": False}
            for name, (slots, text) in sorted(POOLS.items())}
    digest = sha256_bytes(json.dumps(spec, sort_keys=True).encode())[:12]
    marker = Path(env["AIRFLOW_HOME"]) / f".pools-{digest}"
    if marker.exists():
        return
    pools_file = Path(env["AIRFLOW_HOME"]) / "mlpipe-pools.json"
    pools_file.write_text(json.dumps(spec, indent=2) + "\n")
    proc = subprocess.run([airflow_bin(), "pools", "import", str(pools_file)], env=dict(env),
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"airflow pools import {pools_file} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    marker.write_text("ok\n")


def dags_test(dag_id: str, conf: dict | None = None, env: Mapping[str, str] | None = None,
              timeout: float = 900, echo: bool = False) -> subprocess.CompletedProcess[str]:
    """Run a whole DAG in-process with ``airflow dags test`` and return the finished process."""
    env = airflow_env(env)
    ensure_db(env)
    cmd = [airflow_bin(), "dags", "test", dag_id]
    if conf:
        cmd += ["--conf", json.dumps(conf)]
    if not echo:
        return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    lines: list[str] = []
    with subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            sys.stdout.write(line)
        rc = proc.wait(timeout=timeout)
    return subprocess.CompletedProcess(cmd, rc, "".join(lines), "")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mlpipe airflow", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("env", help="print shell exports for the local Airflow")
    sub.add_parser("migrate", help="create/upgrade the metadata DB")
    t = sub.add_parser("dags-test", help="run a DAG in-process (airflow dags test)")
    t.add_argument("dag_id")
    t.add_argument("--conf", default=None, help="JSON run conf (DAG params)")
    args = parser.parse_args(argv)
    env = airflow_env()
    if args.cmd == "env":
        for key in sorted(k for k in env if k.startswith(("AIRFLOW", "MLPIPE", "PYTHONPATH"))):
            print(f"export {key}={env[key]!s}")
        return 0
    if args.cmd == "migrate":
        ensure_db(env)
        return 0
    proc = dags_test(args.dag_id, json.loads(args.conf) if args.conf else None, echo=True)
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
