"""``mlpipe audit --at "2026-11-24 03:47" [--window 30m]``: what happened at that moment, on one timeline.

An operator asked about a minute gets, from the records the system already keeps:

* **serving**: which model version Triton served at ``--at`` and why: the last ``deploy`` /
  ``rollback`` registry event up to that moment (its reason, QC verdict, who ran it: the Airflow
  DAG run recorded on the event), and every registry event inside the window (registrations,
  stage changes, failed deploys, rollout steps);
* **DAG runs** active, failed or retried in the window (Airflow's REST API; task instances with a
  ``try_number`` above 1 are the retries);
* **drift verdicts**: the monitoring reports written in the window (``monitoring/<stamp>/``) and the
  verdict standing when it began;
* **consumer lag and DLQ rate**: from Prometheus's range API when ``MLPIPE_PROMETHEUS_URL`` is set (or
  the local stack runs one); otherwise the dead letters the consumer logged, per minute, from the log
  folder (lag is only known to Prometheus: the answer says so);
* **error log lines** with their trace ids (the JSON lines of the log folder, ``tasks.logs``).

The window is ``[at - window/2, at + window/2]``. Times are UTC unless they carry an offset.
Text on the terminal; ``--html`` writes the same answer as a page (the operator's view in the Airflow UI
renders it too: ``tasks.tools.operator_view``). Exit codes: 0 an answer (also "nothing recorded in
that window", said as such); ``EXIT_BAD_INPUT`` (2) a time or window that cannot be parsed.
"""

from __future__ import annotations

import argparse
import datetime as dt
import html
import json
import logging
import re
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Protocol, Sequence

from tasks.contracts import layout
from tasks.contracts.errors import BadInput, run_cli

logger = logging.getLogger(__name__)

UTC = dt.timezone.utc
DEFAULT_WINDOW = "30m"
_WINDOW_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|sec|m|min|h|d)?\s*$", re.IGNORECASE)
_UNITS = {"s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "d": 86400}
_STAMP = "%Y%m%dT%H%M%S%fZ"
#: registry events that change what serves
SERVING_EVENTS = ("deploy", "rollback")
#: registry events that end a rollout (``tasks/steps/rollout.py``)
ROLLOUT_ENDS = ("rollout_promoted", "rollout_rolled_back", "rollout_failed", "rollout_killed", "rollout_kill")
#: log levels shown as errors
ERROR_LEVELS = ("ERROR", "CRITICAL")
#: Prometheus expressions, first with data wins (the exporter measures lag from outside the consumer; the
#: consumer's own gauge is the fallback)
LAG_QUERIES = ("max(mlpipe_kafka_group_lag_total_messages)", "max(mlpipe_consumer_lag_total_messages)")
DLQ_QUERIES = ("sum(rate(mlpipe_consumer_dead_letters_total[1m])) * 60",)


class AuditError(BadInput, ValueError):
    """A question that cannot be answered as asked (a time or window that cannot be parsed): exit 2."""


# --------------------------------------------------------------------------- parsing


def parse_at(text: str, now: dt.datetime | None = None) -> dt.datetime:
    """``"2026-11-24 03:47"``, ``"2026-11-24T03:47:30+01:00"`` or ``"now"`` -> an aware UTC datetime."""
    raw = (text or "").strip()
    if raw.lower() == "now":
        return (now or dt.datetime.now(UTC)).astimezone(UTC)
    try:
        at = dt.datetime.fromisoformat(raw.replace("Z", "+00:00"))
    except ValueError:
        raise AuditError(f"--at {text!r} is not a time: give a UTC time such as \"2026-11-24 03:47\" (ISO 8601, "
                         "an offset like +01:00 is honoured) or \"now\"") from None
    return (at if at.tzinfo else at.replace(tzinfo=UTC)).astimezone(UTC)


def parse_window(text: str) -> dt.timedelta:
    """``"30m"``, ``"2h"``, ``"90s"``, ``"1d"`` (a bare number is minutes) -> a positive timedelta."""
    match = _WINDOW_RE.match(text or "")
    if not match or float(match.group(1)) <= 0:
        raise AuditError(f"--window {text!r} is not a duration: give a positive number with a unit, e.g. 30m, "
                         "2h, 90s or 1d")
    return dt.timedelta(seconds=float(match.group(1)) * _UNITS[(match.group(2) or "m").lower()])


def _parse_time(value: Any) -> dt.datetime | None:
    if not value:
        return None
    try:
        at = dt.datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        return None
    return (at if at.tzinfo else at.replace(tzinfo=UTC)).astimezone(UTC)


def _stamp_time(stamp: str) -> dt.datetime | None:
    try:
        return dt.datetime.strptime(stamp, _STAMP).replace(tzinfo=UTC)
    except ValueError:
        return None


# --------------------------------------------------------------------------- sources


class RunSource(Protocol):
    """Where DAG runs come from (``tasks.adapters.airflow.AirflowClient``)."""

    def dag_runs_between(self, start: dt.datetime, end: dt.datetime) -> list[dict[str, Any]]: ...

    def task_instances_between(self, start: dt.datetime, end: dt.datetime) -> list[dict[str, Any]]: ...


class MetricSource(Protocol):
    """A time series source: ``series(query, start, end, step_s)`` -> ``[(time, value), ...]`` (None: no data)."""

    name: str

    def series(self, query: str, start: dt.datetime, end: dt.datetime,
               step_s: float) -> list[tuple[dt.datetime, float]] | None: ...


class PrometheusSource:
    """Prometheus's HTTP range API (``GET /api/v1/query_range``)."""

    def __init__(self, url: str, timeout: float = 10.0) -> None:
        self.url = url.rstrip("/")
        self.name = f"Prometheus {self.url}"
        self.timeout = timeout

    def series(self, query: str, start: dt.datetime, end: dt.datetime,
               step_s: float) -> list[tuple[dt.datetime, float]] | None:
        import httpx

        try:
            resp = httpx.get(f"{self.url}/api/v1/query_range", timeout=self.timeout,
                             params={"query": query, "start": start.timestamp(), "end": end.timestamp(),
                                     "step": max(1.0, step_s)})
        except httpx.HTTPError as exc:
            raise SourceUnavailable(f"{self.name}: {type(exc).__name__} ({exc})") from exc
        if resp.status_code != 200:
            raise SourceUnavailable(f"{self.name}: HTTP {resp.status_code} for {query!r}: {resp.text[:200]}")
        result = resp.json().get("data", {}).get("result", [])
        if not result:
            return None
        points = [(dt.datetime.fromtimestamp(float(t), UTC), float(v)) for t, v in result[0].get("values", [])
                  if v not in ("NaN", "+Inf", "-Inf")]
        return points or None


class SourceUnavailable(RuntimeError):
    """A source could not be read: the answer names it and goes on without it."""


# --------------------------------------------------------------------------- the answer


@dataclass
class Fact:
    """One line of the timeline."""

    at: str  # ISO 8601 UTC
    kind: str  # registry, deploy, rollback, deploy_failed, rollout, drift, dag_run, retry, dlq, error
    text: str
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass
class Audit:
    model: str
    at: str
    start: str
    end: str
    serving: dict[str, Any] | None
    timeline: list[Fact]
    dag_runs: list[dict[str, Any]]
    drift: dict[str, Any]
    metrics: dict[str, Any]
    errors: list[dict[str, Any]]
    notes: list[str]

    @property
    def empty(self) -> bool:
        """Nothing at all was recorded in the window (and nothing served before it)."""
        return (not self.timeline and not self.dag_runs and not self.errors and self.serving is None
                and not self.drift.get("standing") and not self.metrics.get("lag") and not self.metrics.get("dlq"))

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["empty"] = self.empty
        return out


def _events(store: Any, model: str, until: dt.datetime) -> list[dict[str, Any]]:
    from tasks.steps import registry

    return registry.events(store, model, until=until)


def serving_at(history: Sequence[dict[str, Any]], at: dt.datetime) -> dict[str, Any] | None:
    """What served at ``at``: the last ``deploy``/``rollback`` event up to then, with the reasons recorded."""
    last = None
    for ev in history:
        t = _parse_time(ev.get("at"))
        if t is not None and t <= at and ev.get("event") in SERVING_EVENTS:
            last = ev
    if last is None:
        return None
    version = last.get("version")
    stage = next((ev for ev in reversed(history) if ev.get("event") == "stage" and ev.get("version") == version
                  and ev.get("stage") == "production" and (_parse_time(ev.get("at")) or at) <= at), None)
    qc = next((ev.get("qc") for ev in reversed(history) if ev.get("event") == "artifact"
               and ev.get("version") == version and ev.get("field") == "qc" and isinstance(ev.get("qc"), dict)), None)
    why = (f"rolled back from v{last.get('previous')}: {last.get('reason') or 'no reason recorded'}"
           if last["event"] == "rollback" else
           ("FORCED deploy without a passed QC verdict" if last.get("forced") else
            (stage or {}).get("reason") or "deployed"))
    if qc and qc.get("verdict"):
        why += f" (QC verdict: {qc['verdict']})"
    return {"version": version, "since": last.get("at"), "action": last["event"], "why": why,
            "previous": last.get("previous"), "served": last.get("served"), "airflow": last.get("airflow"),
            "triton": last.get("triton"), "rollout": rollout_at(history, at)}


def rollout_at(history: Sequence[dict[str, Any]], at: dt.datetime) -> dict[str, Any] | None:
    """The rollout under way at ``at`` (its last step up to then), None when none was: a candidate answering a
    share of the frames (canary) or a copy of them (shadow) changes what "serving" means."""
    current: dict[str, Any] | None = None
    for ev in history:
        t = _parse_time(ev.get("at"))
        name = str(ev.get("event", ""))
        if t is None or t > at or not name.startswith("rollout"):
            continue
        if name in ROLLOUT_ENDS:
            current = None
        elif name == "rollout_started":
            current = {"rollout_id": ev.get("rollout_id"), "candidate": ev.get("version"),
                       "champion": ev.get("champion"), "since": ev.get("at"), "step": None, "mode": None,
                       "share": None}
        elif name == "rollout_step" and current is not None and ev.get("rollout_id") == current["rollout_id"]:
            current.update(step=ev.get("step"), mode=ev.get("mode"), share=ev.get("share"), step_since=ev.get("at"))
    return current


def _event_text(ev: dict[str, Any]) -> tuple[str, str]:
    """(kind, one line) of a registry event."""
    name, v = ev.get("event", "?"), ev.get("version")
    who = ev.get("airflow") or {}
    by = f" [{who.get('dag_id')}/{who.get('run_id')}]" if who.get("run_id") else ""
    if name == "deploy":
        was = "the first deploy" if ev.get("previous") is None else f"was v{ev.get('previous')}"
        return "deploy", (f"deployed v{v} ({was}), serving {ev.get('served') or 'model.onnx'}"
                          f"{'; FORCED' if ev.get('forced') else ''}{by}")
    if name == "rollback":
        return "rollback", f"rolled back to v{v} (was v{ev.get('previous')}): {ev.get('reason')}{by}"
    if name.endswith("_failed"):
        return "deploy_failed", f"{name.replace('_', ' ')} for v{v}: {ev.get('reason')}{by}"
    if name == "register":
        return "registry", f"registered v{v} from run {ev.get('run_id')} on drops {ev.get('drops')}{by}"
    if name == "stage":
        return "registry", f"v{v}: {ev.get('previous')} -> {ev.get('stage')} ({ev.get('reason')}){by}"
    if name == "artifact":
        extra = ""
        if ev.get("field") == "qc" and isinstance(ev.get("qc"), dict):
            extra = f", QC verdict {ev['qc'].get('verdict')}"
        return "registry", f"v{v}: {ev.get('name')} attached{extra}{by}"
    if name.startswith("rollout"):
        bits = [f"rollout {ev.get('rollout_id') or ''}".strip() + f": {name.replace('rollout_', '')}"]
        if v is not None:
            bits.append(f"candidate v{v}")
        for key in ("step", "mode", "share", "decision", "reason", "by"):
            if ev.get(key) not in (None, ""):
                bits.append(f"{key} {ev[key]}")
        return "rollout", ", ".join(bits) + by
    fields = {k: val for k, val in ev.items() if k not in ("event", "model", "at", "airflow")}
    return "registry", f"{name}: {json.dumps(fields, default=str, sort_keys=True)[:200]}{by}"


def drift_reports(store: Any, start: dt.datetime, end: dt.datetime) -> dict[str, Any]:
    """The drift reports written in ``[start, end]`` and the verdict standing at ``start`` (the last before)."""
    stamps = sorted((t, s) for s in store.list_dirs(layout.MONITORING) if (t := _stamp_time(s)) is not None)
    inside = [(t, s) for t, s in stamps if start <= t <= end]
    before = [(t, s) for t, s in stamps if t < start][-1:]

    def read(t: dt.datetime, stamp: str) -> dict[str, Any] | None:
        try:
            rep = store.get_json(layout.monitor_report_prefix(stamp) + "report.json")
        except Exception:  # noqa: BLE001 - a report being written (report.json comes last) is skipped
            return None
        return {"at": t.isoformat(timespec="seconds"), "status": rep.get("status"), "drift": bool(rep.get("drift")),
                "champion": rep.get("champion"), "summary": rep.get("summary"),
                "report_key": layout.monitor_report_prefix(stamp) + "report.html"}

    return {"reports": [r for t, s in inside if (r := read(t, s)) is not None],
            "standing": next((r for t, s in before if (r := read(t, s)) is not None), None)}


def log_files(folder: Path | None, start: dt.datetime) -> list[Path]:
    """The log files (``<service>.log`` and its rotations) that may hold lines at or after ``start``."""
    if folder is None or not folder.is_dir():
        return []
    out = []
    for path in sorted(folder.glob("*.log*")):
        if path.suffix == ".lock" or not path.is_file():
            continue
        if dt.datetime.fromtimestamp(path.stat().st_mtime, UTC) >= start:
            out.append(path)
    return out


def log_records(files: Iterable[Path], start: dt.datetime, end: dt.datetime) -> Iterable[dict[str, Any]]:
    """JSON log lines (``tasks.logs`` file format) whose ``time`` is in ``[start, end]``; other lines skipped."""
    for path in files:
        try:
            fh = path.open(encoding="utf-8", errors="replace")
        except OSError:
            continue
        with fh:
            for line in fh:
                if not line.startswith("{"):
                    continue
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue
                t = _parse_time(rec.get("time")) if isinstance(rec, dict) else None
                if t is not None and start <= t <= end:
                    rec["_at"] = t
                    rec.setdefault("service", path.name.split(".log")[0])
                    yield rec


def _is_dead_letter(rec: dict[str, Any]) -> bool:
    return str(rec.get("logger", "")).startswith("tasks.serving.consumer") and \
        str(rec.get("message", "")).startswith("dead letter")


def _summarise(points: list[tuple[dt.datetime, float]], at: dt.datetime) -> dict[str, Any]:
    near = min(points, key=lambda p: abs((p[0] - at).total_seconds()))
    peak = max(points, key=lambda p: p[1])
    return {"at_moment": round(near[1], 3), "max": round(peak[1], 3), "max_at": peak[0].isoformat(timespec="seconds"),
            "mean": round(sum(v for _, v in points) / len(points), 3), "points": len(points),
            "series": [[t.isoformat(timespec="seconds"), round(v, 3)] for t, v in points]}


def build_audit(store: Any, model: str, at: dt.datetime, window: dt.timedelta, *,
                runs: RunSource | None = None, metrics: MetricSource | None = None,
                log_dir: Path | None = None, notes: Sequence[str] = ()) -> Audit:
    """The answer for ``at`` +- ``window``/2 from the registry, the drift reports, ``runs``, ``metrics`` and the
    log folder. A source that is absent or fails is named in ``notes``; the others still answer."""
    start, end = at - window / 2, at + window / 2
    notes = list(notes)
    timeline: list[Fact] = []

    history = _events(store, model, end)
    serving = serving_at(history, at)
    for ev in history:
        t = _parse_time(ev.get("at"))
        if t is not None and start <= t <= end:
            kind, text = _event_text(ev)
            timeline.append(Fact(t.isoformat(timespec="seconds"), kind, text,
                                 {k: v for k, v in ev.items() if k not in ("model",)}))

    drift = drift_reports(store, start, end)
    for rep in drift["reports"]:
        verdict = {"drift": "DRIFT", "ok": "no drift"}.get(rep["status"] or "", rep["status"])
        timeline.append(Fact(rep["at"], "drift", f"drift check of v{rep['champion']}: {verdict}: {rep['summary']}",
                             {"report_key": rep["report_key"], "status": rep["status"]}))

    dag_runs: list[dict[str, Any]] = []
    if runs is None:
        notes.append("DAG runs: no Airflow API to ask (set MLPIPE_AIRFLOW_API_URL or start the stack: make up)")
    else:
        try:
            dag_runs = _dag_runs(runs, start, end, timeline)
        except Exception as exc:  # noqa: BLE001 - one source down must not hide the others
            notes.append(f"DAG runs: Airflow could not be read ({exc})")

    files = log_files(log_dir, start)
    errors: list[dict[str, Any]] = []
    dead_letters: dict[str, int] = {}
    for rec in log_records(files, start, end):
        if _is_dead_letter(rec):
            minute = rec["_at"].strftime("%Y-%m-%dT%H:%M")
            dead_letters[minute] = dead_letters.get(minute, 0) + 1
        if str(rec.get("level", "")).upper() in ERROR_LEVELS:
            errors.append({"at": rec["_at"].isoformat(timespec="milliseconds"), "service": rec.get("service"),
                           "logger": rec.get("logger"), "message": str(rec.get("message", ""))[:500],
                           "trace_id": rec.get("trace_id"), "span_id": rec.get("span_id"),
                           "run_id": rec.get("run_id"), "model_version": rec.get("model_version")})
    errors.sort(key=lambda e: e["at"])
    for err in errors:
        trace = f" trace_id={err['trace_id']}" if err.get("trace_id") else ""
        timeline.append(Fact(err["at"], "error", f"{err['service']}: {err['message'][:160]}{trace}",
                             {"trace_id": err.get("trace_id"), "logger": err.get("logger")}))
    if log_dir is None or not log_dir.is_dir():
        notes.append(f"logs: no log folder at {log_dir} (MLPIPE_LOG_DIR)")

    metric_out = _metrics(metrics, start, end, at, dead_letters, notes)
    if metric_out.get("dlq") and metric_out["dlq"].get("source") == "log folder":
        for minute, n in sorted(dead_letters.items()):
            timeline.append(Fact(minute + ":00+00:00", "dlq", f"{n} frame(s) dead-lettered by the consumer"))

    timeline.sort(key=lambda f: f.at)
    return Audit(model=model, at=at.isoformat(timespec="seconds"), start=start.isoformat(timespec="seconds"),
                 end=end.isoformat(timespec="seconds"), serving=serving, timeline=timeline, dag_runs=dag_runs,
                 drift=drift, metrics=metric_out, errors=errors, notes=notes)


def _dag_runs(runs: RunSource, start: dt.datetime, end: dt.datetime, timeline: list[Fact]) -> list[dict[str, Any]]:
    out = []
    retries: dict[tuple[str, str], list[str]] = {}
    for ti in runs.task_instances_between(start, end):
        if int(ti.get("try_number") or 1) > 1:
            retries.setdefault((ti.get("dag_id"), ti.get("dag_run_id")), []).append(
                f"{ti.get('task_id')} try {ti.get('try_number')} ({ti.get('state')})")
    for r in runs.dag_runs_between(start, end):
        began = r.get("start_date") or r.get("queued_at") or r.get("run_after")
        ended = r.get("end_date")
        state = r.get("state")
        tried = retries.get((r.get("dag_id"), r.get("dag_run_id")), [])
        entry = {"dag_id": r.get("dag_id"), "run_id": r.get("dag_run_id"), "state": state, "start": began,
                 "end": ended, "conf": r.get("conf") or {}, "retried": tried,
                 "note": r.get("note")}
        out.append(entry)
        t_start, t_end = _parse_time(began), _parse_time(ended)
        if t_start is not None and start <= t_start <= end:
            timeline.append(Fact(t_start.isoformat(timespec="seconds"), "dag_run",
                                 f"{entry['dag_id']} run {entry['run_id']} started (now {state})",
                                 {"dag_id": entry["dag_id"], "run_id": entry["run_id"], "state": state}))
        if t_end is not None and start <= t_end <= end:
            timeline.append(Fact(t_end.isoformat(timespec="seconds"), "dag_run",
                                 f"{entry['dag_id']} run {entry['run_id']} ended {state}",
                                 {"dag_id": entry["dag_id"], "run_id": entry["run_id"], "state": state}))
        for what in tried:
            timeline.append(Fact((t_start or start).isoformat(timespec="seconds"), "retry",
                                 f"{entry['dag_id']} run {entry['run_id']}: {what}",
                                 {"dag_id": entry["dag_id"], "run_id": entry["run_id"]}))
    out.sort(key=lambda e: str(e.get("start") or ""))
    return out


def _metrics(source: MetricSource | None, start: dt.datetime, end: dt.datetime, at: dt.datetime,
             dead_letters: dict[str, int], notes: list[str]) -> dict[str, Any]:
    step = max(15.0, (end - start).total_seconds() / 120)
    out: dict[str, Any] = {"lag": None, "dlq": None}
    if source is not None:
        try:
            for key, queries in (("lag", LAG_QUERIES), ("dlq", DLQ_QUERIES)):
                for query in queries:
                    points = source.series(query, start, end, step)
                    if points:
                        out[key] = {"source": source.name, "query": query,
                                    "unit": "messages" if key == "lag" else "frames per minute",
                                    **_summarise(points, at)}
                        break
        except SourceUnavailable as exc:
            notes.append(f"metrics: {exc}")
    if out["dlq"] is None and dead_letters:
        minutes = max(1.0, (end - start).total_seconds() / 60)
        total = sum(dead_letters.values())
        peak_minute, peak = max(dead_letters.items(), key=lambda kv: kv[1])
        out["dlq"] = {"source": "log folder", "unit": "frames per minute", "total": total,
                      "mean": round(total / minutes, 3), "max": peak, "max_at": peak_minute,
                      "per_minute": dict(sorted(dead_letters.items()))}
    if out["lag"] is None:
        notes.append("consumer lag: no Prometheus series in the window" if source is not None else
                     "consumer lag: only Prometheus keeps it over time (set MLPIPE_PROMETHEUS_URL)")
    return out


# --------------------------------------------------------------------------- rendering


def render_text(audit: Audit) -> str:
    lines = [f"audit of {audit.model} at {audit.at} (window {audit.start} .. {audit.end})", ""]
    if audit.empty:
        lines.append("nothing was recorded in this window: no registry event, DAG run, drift report, metric or "
                     "error log line, and no version served before it. Check the time (UTC) or widen --window.")
    s = audit.serving
    if s is None:
        lines.append("serving: no version had been deployed by then")
    else:
        by = (s.get("airflow") or {})
        run = f", by {by.get('dag_id')} run {by.get('run_id')}" if by.get("run_id") else ""
        lines.append(f"serving: v{s['version']} since {s['since']} ({s['action']}{run}): {s['why']}")
        ro = s.get("rollout")
        if ro:
            lines.append(f"rollout {ro['rollout_id']} under way: candidate v{ro['candidate']}"
                         + (f" at step {ro['step']} ({ro['mode']}" + (f" {ro['share']:g}%" if ro.get('share') is not None
                            and ro['mode'] == 'canary' else "") + ")" if ro.get("step") else " (starting)")
                         + f" since {ro.get('step_since') or ro['since']}")
    standing = audit.drift.get("standing")
    if standing:
        lines.append(f"drift verdict standing at the start: {standing['status']} ({standing['at']}: "
                     f"{standing['summary']})")
    m = audit.metrics
    if m.get("lag"):
        lag = m["lag"]
        lines.append(f"consumer lag: {lag['at_moment']:g} {lag['unit']} at the moment, max {lag['max']:g} at "
                     f"{lag['max_at']} ({lag['source']})")
    if m.get("dlq"):
        d = m["dlq"]
        if d["source"] == "log folder":
            lines.append(f"DLQ: {d['total']} dead letter(s), {d['mean']:g} {d['unit']} on average, max {d['max']} "
                         f"in the minute {d['max_at']} (the consumer's log lines)")
        else:
            lines.append(f"DLQ rate: {d['at_moment']:g} {d['unit']} at the moment, max {d['max']:g} at "
                         f"{d['max_at']} ({d['source']})")
    if audit.dag_runs:
        lines += ["", "DAG runs active in the window:"]
        for r in audit.dag_runs:
            retried = f"; retried: {', '.join(r['retried'])}" if r["retried"] else ""
            lines.append(f"  {r['dag_id']} {r['run_id']}: {r['state']} ({r['start']} .. {r['end'] or 'running'})"
                         f"{retried}")
    lines += ["", "timeline:"]
    lines += [f"  {f.at}  {f.kind:<13} {f.text}" for f in audit.timeline] or ["  (no event in the window)"]
    if audit.errors:
        lines += ["", f"error log lines ({len(audit.errors)}):"]
        lines += [f"  {e['at']} {e['service']} trace_id={e.get('trace_id') or '-'}: {e['message'][:200]}"
                  for e in audit.errors[:50]]
    if audit.notes:
        lines += ["", "not known:"] + [f"  {n}" for n in audit.notes]
    return "\n".join(lines) + "\n"


_KIND_COLOR = {"deploy": "#1b7f3b", "rollback": "#b36b00", "deploy_failed": "#b00020", "drift": "#6a1b9a",
               "dag_run": "#1565c0", "retry": "#b36b00", "dlq": "#b00020", "error": "#b00020", "registry": "#444",
               "rollout": "#00695c"}


def render_html(audit: Audit, report_href: Any = None, home_href: str | None = None) -> str:
    """The answer as one self-contained page (inline CSS, no external asset). ``report_href(key)`` turns a
    store key into a link (the operator's view serves the reports); ``home_href`` adds a link back to it."""
    e = html.escape

    def link(key: str | None, text: str) -> str:
        if key and report_href is not None:
            return f'<a href="{e(report_href(key))}">{e(text)}</a>'
        return e(text)

    s = audit.serving
    if s is None:
        serving = "no version had been deployed by then"
    else:
        by = s.get("airflow") or {}
        run = f", by {by.get('dag_id')} run {by.get('run_id')}" if by.get("run_id") else ""
        serving = f"<b>v{e(str(s['version']))}</b> since {e(str(s['since']))} ({e(s['action'] + run)}): {e(s['why'])}"
        ro = s.get("rollout")
        if ro:
            serving += (f"<br>rollout <code>{e(str(ro['rollout_id']))}</code> under way: candidate "
                        f"v{e(str(ro['candidate']))}, step {e(str(ro.get('step')))} ({e(str(ro.get('mode')))}"
                        f"{', ' + e(str(ro.get('share'))) + '%' if ro.get('mode') == 'canary' else ''})")
    rows = "".join(
        f'<tr><td class="t">{e(f.at)}</td><td style="color:{_KIND_COLOR.get(f.kind, "#444")}">{e(f.kind)}</td>'
        f'<td>{link(f.detail.get("report_key"), f.text)}</td></tr>' for f in audit.timeline
    ) or '<tr><td colspan="3">no event in the window</td></tr>'
    runs = "".join(
        f"<tr><td>{e(str(r['dag_id']))}</td><td>{e(str(r['run_id']))}</td><td>{e(str(r['state']))}</td>"
        f"<td>{e(str(r['start']))}</td><td>{e(str(r['end'] or 'running'))}</td>"
        f"<td>{e(', '.join(r['retried']))}</td></tr>" for r in audit.dag_runs)
    errors = "".join(
        f"<tr><td class='t'>{e(x['at'])}</td><td>{e(str(x['service']))}</td><td><code>{e(str(x.get('trace_id') or '-'))}"
        f"</code></td><td>{e(x['message'])}</td></tr>" for x in audit.errors[:200])
    metrics = []
    for key, label in (("lag", "consumer lag"), ("dlq", "DLQ rate")):
        m = audit.metrics.get(key)
        if m and "at_moment" in m:
            metrics.append(f"<li>{label}: {m['at_moment']:g} {e(m['unit'])} at the moment, max {m['max']:g} at "
                           f"{e(m['max_at'])} <small>({e(m['source'])})</small></li>")
        elif m:
            metrics.append(f"<li>{label}: {m['total']} dead letter(s), max {m['max']} in the minute "
                           f"{e(m['max_at'])} <small>(the consumer's log lines)</small></li>")
    standing = audit.drift.get("standing")
    if standing:
        metrics.append(f"<li>drift verdict standing at the start: "
                       f"{link(standing['report_key'], str(standing['status']) + ': ' + str(standing['summary']))}</li>")
    notes = "".join(f"<li>{e(n)}</li>" for n in audit.notes)
    empty = ('<p class="empty">Nothing was recorded in this window. Check the time (UTC) or widen the window.</p>'
             if audit.empty else "")
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>audit {e(audit.model)} at {e(audit.at)}</title>
<style>body{{font-family:system-ui,sans-serif;margin:1.5em;color:#222}} table{{border-collapse:collapse;margin:.5em 0}}
td,th{{border:1px solid #ccc;padding:3px 8px;text-align:left;vertical-align:top}} th{{background:#f3f3f3}}
td.t{{white-space:nowrap;font-family:monospace}} .empty{{background:#fff3cd;padding:.5em}} small{{color:#666}}</style>
</head><body>
{f'<nav><a href="{e(home_href)}">models</a></nav>' if home_href else ''}
<h1>What happened at {e(audit.at)}</h1>
<p>model <b>{e(audit.model)}</b>, window {e(audit.start)} .. {e(audit.end)} (UTC)</p>
{empty}
<h2>Serving</h2><p>{serving}</p>
<ul>{''.join(metrics)}</ul>
<h2>Timeline</h2><table><tr><th>time</th><th>kind</th><th>what</th></tr>{rows}</table>
<h2>DAG runs</h2>{'<table><tr><th>DAG</th><th>run</th><th>state</th><th>start</th><th>end</th><th>retried</th></tr>'
                   + runs + '</table>' if runs else '<p>none in the window</p>'}
<h2>Error log lines</h2>{'<table><tr><th>time</th><th>service</th><th>trace id</th><th>message</th></tr>'
                          + errors + '</table>' if errors else '<p>none in the window</p>'}
{'<h2>Not known</h2><ul>' + notes + '</ul>' if notes else ''}
</body></html>
"""


# --------------------------------------------------------------------------- wiring


def default_sources(cfg: Any) -> tuple[RunSource | None, MetricSource | None, list[str]]:
    """Airflow and Prometheus as configured, else the local stack's (when one is recorded as up)."""
    notes: list[str] = []
    state: dict[str, Any] = {}
    try:
        from tasks.local import stack

        state = stack.read_state(cfg.home) or {}
    except Exception:  # noqa: BLE001 - no local stack is the normal case in production
        state = {}
    runs = None
    if cfg.airflow.api_url:
        from tasks import logs
        from tasks.adapters.airflow import AirflowClient

        logs.register_secret(cfg.airflow.api_password.get_secret_value())  # never in a log line

        runs = AirflowClient(cfg.airflow.api_url, cfg.airflow.api_username,
                             cfg.airflow.api_password.get_secret_value(), timeout=20)
    elif state:
        try:
            from tasks.local import stack

            runs = stack.airflow_client(cfg.home)
        except Exception as exc:  # noqa: BLE001
            notes.append(f"DAG runs: the local stack's Airflow cannot be used ({exc})")
    url = cfg.audit.prometheus_url or (state.get("urls") or {}).get("prometheus")
    metrics = PrometheusSource(url) if url else None
    return runs, metrics, notes


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mlpipe audit", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--at", required=True, help='the moment to explain, UTC: "2026-11-24 03:47" (ISO 8601; an offset '
                                               'like +01:00 is honoured) or "now"')
    p.add_argument("--window", default=DEFAULT_WINDOW,
                   help=f"how much time around --at to look at, centred on it (default {DEFAULT_WINDOW}; s, m, h, d)")
    p.add_argument("--model", default=None, help="model name (default $MLPIPE_MODEL_NAME)")
    p.add_argument("--html", type=Path, default=None, help="also write the answer as a self-contained HTML page")
    p.add_argument("--json", action="store_true", help="print the answer as JSON instead of text")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(_main, argv)


def _main(argv: Sequence[str] | None) -> int:
    from tasks.adapters.storage import open_store
    from tasks.config import load_settings
    from tasks.contracts.files import atomic_write
    from tasks.logs import setup_logging

    args = _parser().parse_args(argv)
    setup_logging()
    at, window = parse_at(args.at), parse_window(args.window)  # bad input before anything is opened
    cfg = load_settings()
    from tasks import logs

    runs, metrics, notes = default_sources(cfg)
    try:
        audit = build_audit(open_store(cfg), args.model or cfg.model_name, at, window, runs=runs, metrics=metrics,
                            log_dir=logs.log_dir(), notes=notes)
    finally:
        close = getattr(runs, "close", None)
        if close is not None:
            close()
    if args.html:
        atomic_write(args.html, render_html(audit), 0o644)
    if args.json:
        print(json.dumps(audit.to_dict(), indent=2, default=str))
    else:
        sys.stdout.write(render_text(audit))
        if args.html:
            print(f"HTML: {args.html}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
