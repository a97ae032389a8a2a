"""Airflow's REST API v2: a small client (JWT from ``POST /auth/token``, then ``/api/v2/...``)."""

from __future__ import annotations

import datetime as dt
import logging
import time
from typing import Any, Iterable, Mapping, Sequence

logger = logging.getLogger(__name__)


class AirflowError(RuntimeError):
    """An Airflow API call failed (the message names the call and the HTTP answer)."""


class AirflowClient:
    """A small client of Airflow's REST API v2 (JWT from ``POST /auth/token``)."""

    def __init__(self, base_url: str, username: str = "", password: str = "", timeout: float = 60.0, *,
                 token: str | None = None) -> None:
        """Log in with ``username``/``password``, or use a JWT the caller already holds (``token``: the
        operator's view inside the api-server forwards the signed-in user's own token)."""
        import httpx

        self.base_url = base_url.rstrip("/")
        self._http = httpx.Client(base_url=self.base_url, timeout=timeout)
        self._creds = {"username": username, "password": password}
        self._token: str | None = token

    def token(self) -> str:
        if self._token is None:
            resp = self._http.post("/auth/token", json=self._creds)
            if resp.status_code not in (200, 201):
                raise AirflowError(f"login to {self.base_url} as {self._creds['username']} failed: "
                                 f"HTTP {resp.status_code} {resp.text[:200]}")
            self._token = resp.json()["access_token"]
        return self._token

    def request(self, method: str, path: str, retries: int = 2, **kwargs: Any) -> Any:
        """The raw ``httpx.Response`` (callers check status codes themselves). Reads (GET, PATCH) are
        retried on a timeout: a busy single-worker api-server on SQLite can be slow to answer."""
        import httpx

        headers = {"Authorization": f"Bearer {self.token()}", **kwargs.pop("headers", {})}
        for attempt in range(retries + 1):
            try:
                return self._http.request(method, path, headers=headers, **kwargs)
            except (httpx.TimeoutException, httpx.NetworkError) as exc:
                if method.upper() not in ("GET", "PATCH") or attempt == retries:
                    raise AirflowError(f"{method} {self.base_url}{path}: {type(exc).__name__} ({exc})") from exc
                logger.warning("%s %s: %s, retrying", method, path, type(exc).__name__)
        raise AssertionError("unreachable")

    def get(self, path: str, **params: Any) -> Any:
        resp = self.request("GET", path, params=params or None)
        if resp.status_code != 200:
            raise AirflowError(f"GET {path}: HTTP {resp.status_code} {resp.text[:300]}")
        return resp.json()

    def trigger(self, dag_id: str, conf: Mapping[str, Any] | None = None, run_id: str | None = None) -> Any:
        """``POST /api/v2/dags/<dag_id>/dagRuns``; the raw response (400/422 for refused params)."""
        body: dict[str, Any] = {"logical_date": None, "conf": dict(conf or {})}
        if run_id:
            body["dag_run_id"] = run_id
        return self.request("POST", f"/api/v2/dags/{dag_id}/dagRuns", json=body)

    def dag_runs(self, dag_id: str) -> list[dict[str, Any]]:
        return self.get(f"/api/v2/dags/{dag_id}/dagRuns", limit=100, order_by="-run_after")["dag_runs"]

    def dag_run(self, dag_id: str, run_id: str) -> dict[str, Any]:
        return self.get(f"/api/v2/dags/{dag_id}/dagRuns/{run_id}")

    def wait_run(self, dag_id: str, run_id: str, timeout: float = 120.0,
                 states: Sequence[str] = ("success", "failed")) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        run: dict[str, Any] = {}
        while time.monotonic() < deadline:
            run = self.dag_run(dag_id, run_id)
            if run.get("state") in states:
                return run
            time.sleep(1.0)
        raise TimeoutError(f"dag run {dag_id}/{run_id} still {run.get('state')!r} after {timeout:.0f}s")

    def task_instances(self, dag_id: str, run_id: str) -> dict[str, str | None]:
        tis = self.get(f"/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances", limit=100)["task_instances"]
        return {(ti["task_id"] if ti.get("map_index", -1) < 0 else f"{ti['task_id']}[{ti['map_index']}]"):
                ti.get("state") for ti in tis}

    def set_paused(self, dag_id: str, paused: bool) -> None:
        resp = self.request("PATCH", f"/api/v2/dags/{dag_id}", json={"is_paused": paused})
        if resp.status_code != 200:
            raise AirflowError(f"pausing {dag_id}: HTTP {resp.status_code} {resp.text[:300]}")

    def wait_dags(self, dag_ids: Iterable[str], timeout: float = 90.0) -> dict[str, Any]:
        """Wait until the dag-processor has serialized ``dag_ids``; returns the DAGs by id."""
        want = set(dag_ids)
        deadline = time.monotonic() + timeout
        found: dict[str, Any] = {}
        while time.monotonic() < deadline:
            found = {d["dag_id"]: d for d in self.get("/api/v2/dags", limit=100)["dags"]}
            if want <= set(found):
                return found
            time.sleep(1.0)
        errors = self.get("/api/v2/importErrors").get("import_errors", [])
        raise TimeoutError(f"DAGs {sorted(want - set(found))} not parsed after {timeout:.0f}s; "
                           f"import errors: {[e.get('stack_trace', '')[-300:] for e in errors]}")

    def dag_runs_between(self, start: dt.datetime, end: dt.datetime, limit: int = 200) -> list[dict[str, Any]]:
        """The DAG runs of every DAG that were queued, running or ended within ``[start, end]`` (UTC): the
        newest ``limit`` runs due by ``end`` (``run_after_lte``), kept where they overlap the window."""
        runs = self.get("/api/v2/dags/~/dagRuns", run_after_lte=_iso(end), order_by="-run_after",
                        limit=limit)["dag_runs"]
        return [r for r in runs if _overlaps(r.get("start_date") or r.get("queued_at") or r.get("run_after"),
                                             r.get("end_date"), start, end)]

    def task_instances_between(self, start: dt.datetime, end: dt.datetime, limit: int = 500) -> list[dict[str, Any]]:
        """Task instances of every DAG run that ran within ``[start, end]`` (their ``try_number`` tells a retry)."""
        tis = self.get("/api/v2/dags/~/dagRuns/~/taskInstances", start_date_lte=_iso(end), limit=limit,
                       order_by="-start_date")["task_instances"]
        return [t for t in tis if _overlaps(t.get("start_date"), t.get("end_date"), start, end)]

    def close(self) -> None:
        self._http.close()


def _iso(at: dt.datetime) -> str:
    return (at if at.tzinfo else at.replace(tzinfo=dt.timezone.utc)).isoformat()


def _parse(text: str | None) -> dt.datetime | None:
    if not text:
        return None
    at = dt.datetime.fromisoformat(str(text).replace("Z", "+00:00"))
    return at if at.tzinfo else at.replace(tzinfo=dt.timezone.utc)


def _overlaps(began: str | None, ended: str | None, start: dt.datetime, end: dt.datetime) -> bool:
    """``[began, ended]`` (ended None: still going) meets ``[start, end]``."""
    b, e = _parse(began), _parse(ended)
    return (b is None or b <= end) and (e is None or e >= start) and (b is not None or e is not None)
