"""The operator's view: one FastAPI app an Airflow 3 plugin mounts inside the api-server (``plugins/mlpipe_ui.py``).

What an operator needs without hunting for files, read from the object store (the registry of record):

* ``/``: the models; per model the serving state (the production version, the last deploy or rollback and
  why, the rollout state when a rollout runs), the versions with stage, accuracy and QC verdict, the deploy
  and rollback history, the drift reports, the rollouts, and a form for ``mlpipe audit``;
* ``/models/<model>/versions/<v>``: one version's lineage, drop -> validation -> training run -> version ->
  QC -> deploy, each step with the Airflow DAG run that did it (recorded on the registry events);
  ``/lineage/<model>/<v>`` goes there from a prediction's ``lineage`` id;
* ``/store/<key>``: the reports themselves, served from the store: GX Data Docs (offline: no CDN asset,
  see ``tasks.steps.data_docs``), QC reports, drift reports, rollout reports and evidence. Only those
  prefixes are served; anything else is 404;
* ``/audit?at=...&window=...``: ``mlpipe audit``'s answer as a page (``tasks.tools.audit``);
* ``/api/models/<model>``: the same facts as JSON.

Standing alone (``create_app()``) the app has no authentication: inside Airflow the plugin passes
Airflow's own "signed in" dependency, and DAG runs are read through Airflow's REST API with the
signed-in user's token. Links are built from the mount point (``root_path``), so the app works under
any ``url_prefix``.

(No ``from __future__ import annotations`` here: FastAPI reads the route signatures' types, ``Request``
included, at definition time.)
"""


import datetime as dt
import html
import json
import mimetypes
import re
from typing import Any, Callable, Sequence
from urllib.parse import quote

from tasks.contracts import layout

#: what ``/store/<key>`` serves: reports and their assets, nothing else from the store
SERVED = (
    re.compile(r"^drops/[^/]+/validation/data_docs/.+$"),
    re.compile(r"^drops/[^/]+/validation/result\.json$"),
    re.compile(r"^models/[^/]+/\d+/(qc_report\.(html|json)|compile\.json|metrics\.json|lineage\.json|curves\.png|"
               r"version\.json)$"),
    re.compile(r"^monitoring/[^/]+/[^/]+\.(html|json|png)$"),
    re.compile(r"^rollouts/[^/]+/[^/]+/.+\.(html|json|png)$"),
    re.compile(r"^rollouts/[^/]+/state\.json$"),
)
HISTORY_EVENTS = ("deploy", "rollback", "deploy_failed", "rollback_failed")
_CSS = """body{font-family:system-ui,sans-serif;margin:1.2em;color:#222}table{border-collapse:collapse;margin:.4em 0}
td,th{border:1px solid #ccc;padding:3px 8px;text-align:left;vertical-align:top}th{background:#f3f3f3}
code{font-size:.9em}.stage-production{color:#1b7f3b;font-weight:bold}.stage-rejected{color:#b00020}
.stage-archived{color:#777}.fail{color:#b00020}.ok{color:#1b7f3b}nav a{margin-right:1em}small{color:#666}
ol.lineage>li{margin:.4em 0}"""


def servable(key: str) -> bool:
    """Whether ``/store/<key>`` may serve ``key`` (a report or one of its assets; never ``..``)."""
    return ".." not in key.split("/") and not key.startswith("/") and any(p.match(key) for p in SERVED)


# --------------------------------------------------------------------------- facts (plain data, testable)


def models(store: Any) -> list[str]:
    return sorted(store.list_dirs(layout.MODELS))


def _stamp_time(stamp: str) -> str | None:
    try:
        return dt.datetime.strptime(stamp, "%Y%m%dT%H%M%S%fZ").replace(tzinfo=dt.timezone.utc).isoformat(
            timespec="seconds")
    except ValueError:
        return None


def drift_reports(store: Any, limit: int = 20) -> list[dict[str, Any]]:
    """The newest drift reports, newest first."""
    out = []
    for stamp in sorted((s for s in store.list_dirs(layout.MONITORING) if _stamp_time(s)), reverse=True)[:limit]:
        prefix = layout.monitor_report_prefix(stamp)
        try:
            rep = store.get_json(prefix + "report.json")
        except Exception:  # noqa: BLE001 - one being written
            continue
        out.append({"at": _stamp_time(stamp), "model": rep.get("model"), "status": rep.get("status"),
                    "champion": rep.get("champion"), "summary": rep.get("summary"),
                    "html_key": prefix + "report.html", "json_key": prefix + "report.json"})
    return out


def rollouts(store: Any, model: str) -> dict[str, Any]:
    """The rollout state (``rollouts/<model>/state.json``) and each rollout's report and evidence, when present."""
    base = f"{layout.ROLLOUTS if hasattr(layout, 'ROLLOUTS') else 'rollouts'}/{model}"
    state = None
    try:
        state = store.get_json(f"{base}/state.json")
    except Exception:  # noqa: BLE001 - no rollout ever ran
        state = None
    runs = []
    for rid in sorted(store.list_dirs(base), reverse=True):
        keys = store.list(f"{base}/{rid}/")
        record = None
        if f"{base}/{rid}/rollout.json" in keys:
            try:
                record = store.get_json(f"{base}/{rid}/rollout.json")
            except Exception:  # noqa: BLE001
                record = None
        runs.append({"rollout_id": rid, "record": record,
                     "report_key": next((k for k in keys if k.endswith("/report.html")), None),
                     "evidence_keys": [k for k in keys if k.endswith(".json") and "/evidence" in k]})
    return {"state": state, "rollouts": runs}


def model_overview(store: Any, model: str) -> dict[str, Any]:
    """Versions, serving state, deploy/rollback history and rollouts of ``model``."""
    from tasks.steps import registry

    versions = registry.all_versions(store, model)
    history = registry.events(store, model)
    champion = max((v for v in versions if v.get("stage") == "production"), key=lambda v: v["version"], default=None)
    deploys = [e for e in history if e.get("event") in HISTORY_EVENTS or str(e.get("event", "")).startswith("rollout")]
    last = next((e for e in reversed(deploys) if e.get("event") in ("deploy", "rollback")), None)
    rows = []
    for v in versions:
        rows.append({
            "version": v["version"], "stage": v.get("stage"), "created_at": v.get("created_at"),
            "run_id": v.get("run_id"), "val_accuracy": (v.get("metrics") or {}).get("val_accuracy"),
            "qc_verdict": (v.get("qc") or {}).get("verdict"),
            "qc_report_key": (layout.version_file_key(model, v["version"], layout.QC_REPORT_HTML)
                              if layout.QC_REPORT_HTML in (v.get("files") or {}) else None),
            "serving": v.get("serving"),
        })
    return {
        "model": model,
        "serving": {"version": None if champion is None else champion["version"],
                    "artifact": None if champion is None else (champion.get("serving") or {}).get("artifact"),
                    "last_change": last,
                    "rollout": rollouts(store, model)["state"]},
        "versions": rows,
        "history": deploys,
        "rollouts": rollouts(store, model)["rollouts"],
    }


def lineage(store: Any, model: str, version: int) -> dict[str, Any]:
    """drop -> validation -> training run -> version -> QC -> deploy of one version, each step with the Airflow
    DAG run recorded on its registry event (``airflow``: dag_id, run_id, task_id, try_number)."""
    from tasks.steps import registry

    manifest = registry.get_version(store, model, version)
    lin = manifest.get("lineage") or {}
    mine = [e for e in registry.events(store, model) if e.get("version") == version]

    def run_of(pred: Callable[[dict[str, Any]], bool]) -> dict[str, Any] | None:
        ev = next((e for e in mine if pred(e)), None)
        return None if ev is None else ev.get("airflow")

    drops = []
    for d in lin.get("drops") or []:
        docs_key = layout.data_docs_index_key(d["drop_id"])
        drops.append({**d, "data_docs_key": docs_key if store.exists(docs_key) else None,
                      "result_key": layout.validation_result_key(d["drop_id"])})
    qc = manifest.get("qc") or {}
    return {
        "model": model, "version": version, "stage": manifest.get("stage"), "created_at": manifest.get("created_at"),
        "drops": drops,
        "training": {"run_id": lin.get("training_run_id") or manifest.get("run_id"),
                     "clearml_task_id": lin.get("clearml_task_id"), "code_version": lin.get("code_version"),
                     "parent_champion": lin.get("parent_champion"), "metrics": manifest.get("metrics") or {}},
        "register": {"at": next((e["at"] for e in mine if e.get("event") == "register"), None),
                     "airflow": run_of(lambda e: e.get("event") == "register")},
        "qc": {"verdict": qc.get("verdict"), "summary": {k: v for k, v in qc.items() if not isinstance(v, (dict, list))},
               "report_key": (layout.version_file_key(model, version, layout.QC_REPORT_HTML)
                              if layout.QC_REPORT_HTML in (manifest.get("files") or {}) else None),
               "airflow": run_of(lambda e: e.get("event") == "artifact" and e.get("field") == "qc")},
        "deploys": [{"event": e.get("event"), "at": e.get("at"), "previous": e.get("previous"),
                     "reason": e.get("reason"), "served": e.get("served"), "airflow": e.get("airflow")}
                    for e in mine if e.get("event") in HISTORY_EVENTS],
        "history": manifest.get("history") or [],
        "events": mine,
    }


# --------------------------------------------------------------------------- HTML


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value))


def _run(airflow: dict[str, Any] | None) -> str:
    if not airflow:
        return "<small>no Airflow run recorded</small>"
    return (f"<code>{_e(airflow.get('dag_id'))}</code> run <code>{_e(airflow.get('run_id'))}</code>"
            + (f" task <code>{_e(airflow.get('task_id'))}</code>" if airflow.get("task_id") else ""))


def _was(previous: Any) -> str:
    return "the first deploy" if previous is None else f"was v{_e(previous)}"


def _what(ev: dict[str, Any]) -> str:
    """The reason, the artefact served, or a rollout's step, mode and share, of a history event."""
    if str(ev.get("event", "")).startswith("rollout"):
        bits = [f"rollout {ev.get('rollout_id')}"] + [f"{k} {ev[k]}" for k in ("step", "mode", "share", "decision",
                                                                               "reason") if ev.get(k) not in (None, "")]
        return ", ".join(bits)
    return str(ev.get("reason") or ev.get("served") or "")


def _page(title: str, body: str, root: str) -> str:
    nav = f'<nav><a href="{root}/">models</a><a href="{root}/audit">audit</a></nav>'
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{_e(title)}</title><style>{_CSS}</style>"
            f"</head><body>{nav}<h1>{_e(title)}</h1>{body}</body></html>")


def _store_link(root: str, key: str | None, text: str) -> str:
    return f'<a href="{root}/store/{quote(key)}">{_e(text)}</a>' if key else "-"


def render_index(store: Any, root: str, model: str | None = None) -> str:
    names = models(store)
    if not names:
        return _page("mlpipe", "<p>No model has been registered yet: the registry (models/ in the store) is empty.</p>",
                     root)
    model = model if model in names else names[0]
    ov = model_overview(store, model)
    s = ov["serving"]
    last = s["last_change"]
    why = "-"
    if last:
        why = (f"{_e(last['event'])} at {_e(last.get('at'))} ({_was(last.get('previous'))})"
               + (f": {_e(last.get('reason'))}" if last.get("reason") else "") + f" by {_run(last.get('airflow'))}")
    rollout = s.get("rollout")
    rollout_html = (f"<p>rollout: mode <b>{_e(rollout.get('mode'))}</b>, candidate v{_e(rollout.get('candidate'))}, "
                    f"share {_e(rollout.get('share'))}%</p>" if isinstance(rollout, dict) else "")
    switch = " ".join(f'<a href="{root}/?model={quote(n)}">{_e(n)}</a>' for n in names)
    vrows = "".join(
        f"<tr><td><a href='{root}/models/{quote(model)}/versions/{v['version']}'>v{v['version']}</a></td>"
        f"<td class='stage-{_e(v['stage'])}'>{_e(v['stage'])}</td><td>{_e(v['created_at'])}</td>"
        f"<td>{_e(v['val_accuracy'])}</td><td class='{'ok' if v['qc_verdict'] == 'passed' else 'fail'}'>"
        f"{_e(v['qc_verdict'] or '-')}</td><td>{_store_link(root, v['qc_report_key'], 'QC report')}</td>"
        f"<td><code>{_e(v['run_id'])}</code></td></tr>" for v in reversed(ov["versions"]))
    hrows = "".join(
        f"<tr><td>{_e(e.get('at'))}</td><td class='{'fail' if 'failed' in e['event'] else ''}'>{_e(e['event'])}</td>"
        f"<td>v{_e(e.get('version'))}</td><td>{_e(e.get('previous'))}</td>"
        f"<td>{_e(_what(e))}</td><td>{_run(e.get('airflow'))}</td></tr>"
        for e in reversed(ov["history"])) or "<tr><td colspan='6'>no deploy yet</td></tr>"
    drows = "".join(
        f"<tr><td>{_e(r['at'])}</td><td class='{'fail' if r['status'] == 'drift' else ''}'>{_e(r['status'])}</td>"
        f"<td>v{_e(r['champion'])}</td><td>{_e(r['summary'])}</td>"
        f"<td>{_store_link(root, r['html_key'], 'report')}</td></tr>"
        for r in drift_reports(store) if r.get("model") in (None, model)) or "<tr><td colspan='5'>none</td></tr>"
    rrows = "".join(
        f"<tr><td><code>{_e(r['rollout_id'])}</code></td><td>{_store_link(root, r['report_key'], 'report')}</td>"
        f"<td>{' '.join(_store_link(root, k, k.rsplit('/', 1)[-1]) for k in r['evidence_keys'])}</td></tr>"
        for r in ov["rollouts"])
    body = f"""<p>models: {switch}</p>
<h2>Serving: {_e(model)}</h2>
<p>production version: <b>{'v' + _e(s['version']) if s['version'] is not None else 'none yet'}</b>
{('serving ' + _e(s['artifact'])) if s['artifact'] else ''}</p><p>last change: {why}</p>{rollout_html}
<p><a href="{root}/serving/{quote(model)}">live state from Triton (JSON)</a></p>
<h2>Versions</h2><table><tr><th>version</th><th>stage</th><th>created</th><th>val accuracy</th><th>QC</th>
<th>QC report</th><th>training run</th></tr>{vrows}</table>
<h2>Deploy and rollback history</h2><table><tr><th>at</th><th>event</th><th>version</th><th>previous</th>
<th>reason / served</th><th>by</th></tr>{hrows}</table>
<h2>Drift reports</h2><table><tr><th>at</th><th>status</th><th>champion</th><th>summary</th><th></th></tr>{drows}</table>
{('<h2>Rollouts</h2><table><tr><th>rollout</th><th>report</th><th>evidence</th></tr>' + rrows + '</table>')
 if rrows else ''}
<h2>What happened at ...?</h2>
<form action="{root}/audit" method="get"><input type="hidden" name="model" value="{_e(model)}">
<label>at (UTC) <input name="at" placeholder="2026-11-24 03:47" required></label>
<label>window <input name="window" value="30m" size="5"></label> <button type="submit">audit</button></form>"""
    return _page(f"mlpipe: {model}", body, root)


def render_lineage(store: Any, model: str, version: int, root: str) -> str:
    lin = lineage(store, model, version)
    drops = "".join(
        f"<li>drop <code>{_e(d['drop_id'])}</code>: {_e(d.get('image_count'))} images, manifest sha256 "
        f"<code>{_e(str(d.get('manifest_sha256'))[:16])}</code>, images sha256 "
        f"<code>{_e(str(d.get('images_sha256'))[:16])}</code>; validated {_e((d.get('validation') or {}).get('validated_at'))}"
        f" ({_store_link(root, d.get('data_docs_key'), 'GX Data Docs')}, "
        f"{_store_link(root, d.get('result_key'), 'result.json')})</li>" for d in lin["drops"]) or "<li>no drops recorded</li>"
    t = lin["training"]
    qc = lin["qc"]
    deploys = "".join(
        f"<li>{_e(d['event'])} at {_e(d['at'])} ({_was(d['previous'])}){': ' + _e(d['reason']) if d['reason'] else ''}"
        f" by {_run(d['airflow'])}</li>" for d in lin["deploys"]) or "<li>never deployed</li>"
    hist = "".join(f"<li>{_e(h.get('at'))}: {_e(h.get('stage'))} ({_e(h.get('reason'))})</li>" for h in lin["history"])
    body = f"""<p>stage <span class="stage-{_e(lin['stage'])}">{_e(lin['stage'])}</span>, created {_e(lin['created_at'])};
lineage id <code>{_e(model)}/{version}</code> (the <code>lineage</code> field of the predictions it made)</p>
<ol class="lineage">
<li><b>drops and their validation</b><ul>{drops}</ul></li>
<li><b>training run</b> <code>{_e(t['run_id'])}</code>: ClearML task <code>{_e(t['clearml_task_id'])}</code>, code
<code>{_e(t['code_version'])}</code>, parent champion {'v' + _e(t['parent_champion']) if t['parent_champion'] is not None
 else 'none'}; val accuracy
{_e(t['metrics'].get('val_accuracy'))}</li>
<li><b>version</b> v{version} registered {_e(lin['register']['at'])} by {_run(lin['register']['airflow'])}
({_store_link(root, layout.version_manifest_key(model, version), 'version.json')},
{_store_link(root, layout.version_file_key(model, version, layout.LINEAGE), 'lineage.json')})</li>
<li><b>QC</b>: <span class="{'ok' if qc['verdict'] == 'passed' else 'fail'}">{_e(qc['verdict'] or 'not run')}</span>
({_store_link(root, qc['report_key'], 'QC report')}) by {_run(qc['airflow'])}</li>
<li><b>deploy</b><ul>{deploys}</ul></li>
</ol><h2>Stage history</h2><ul>{hist}</ul>"""
    return _page(f"{model} v{version}: lineage", body, root)


# --------------------------------------------------------------------------- the app


def create_app(store_factory: Callable[[], Any] | None = None, *, dependencies: Sequence[Any] = (),
               runs_factory: Callable[[Any], Any] | None = None,
               metrics_factory: Callable[[], Any] | None = None,
               log_dir_factory: Callable[[], Any] | None = None) -> Any:
    """The FastAPI app. ``store_factory`` opens the store (default: the configured one, once);
    ``dependencies`` guard every route (Airflow's sign-in inside the api-server); ``runs_factory(request)``
    gives the DAG-run source for the audit page (default: none: the page says so); ``metrics_factory`` and
    ``log_dir_factory`` give its metrics source and log folder (default: as ``mlpipe audit`` finds them)."""
    from fastapi import FastAPI, HTTPException, Query, Request
    from fastapi.responses import HTMLResponse, JSONResponse, Response

    from tasks.tools import audit as audit_mod

    cache: dict[str, Any] = {}

    def store() -> Any:
        if "store" not in cache:
            if store_factory is not None:
                cache["store"] = store_factory()
            else:
                from tasks.adapters.storage import open_store
                from tasks.config import load_settings

                cache["store"] = open_store(load_settings())
        return cache["store"]

    app = FastAPI(title="mlpipe operator's view", dependencies=list(dependencies), docs_url=None, redoc_url=None)

    def root(request: Request) -> str:
        return str(request.scope.get("root_path") or "").rstrip("/")

    @app.get("/", response_class=HTMLResponse)
    def index(request: Request, model: str | None = None) -> str:
        return render_index(store(), root(request), model)

    @app.get("/models/{model}/versions/{version}", response_class=HTMLResponse)
    def version_page(request: Request, model: str, version: int) -> str:
        from tasks.steps.registry import RegistryError

        try:
            return render_lineage(store(), model, version, root(request))
        except RegistryError as exc:
            raise HTTPException(404, str(exc)) from None

    @app.get("/lineage/{lineage:path}")
    def lineage_page(request: Request, lineage: str) -> Any:
        """A prediction's ``lineage`` id (``<model>/<version>``) -> that version's lineage page."""
        from fastapi.responses import RedirectResponse

        from tasks.contracts.messages import parse_lineage_id

        try:
            model, version = parse_lineage_id(lineage)
        except ValueError as exc:
            raise HTTPException(400, str(exc)) from None
        return RedirectResponse(f"{root(request)}/models/{quote(model)}/versions/{version}", status_code=307)

    @app.get("/api/models")
    def api_models() -> list[str]:
        return models(store())

    @app.get("/api/models/{model}")
    def api_model(model: str) -> Any:
        if model not in models(store()):
            raise HTTPException(404, f"no model {model!r} in the registry (known: {models(store()) or 'none'})")
        return JSONResponse(json.loads(json.dumps(model_overview(store(), model), default=str)))

    @app.get("/api/models/{model}/versions/{version}/lineage")
    def api_lineage(model: str, version: int) -> Any:
        from tasks.steps.registry import RegistryError

        try:
            return JSONResponse(json.loads(json.dumps(lineage(store(), model, version), default=str)))
        except RegistryError as exc:
            raise HTTPException(404, str(exc)) from None

    @app.get("/api/drift")
    def api_drift() -> Any:
        return drift_reports(store())

    @app.get("/store/{key:path}")
    def store_file(key: str) -> Response:
        if not servable(key):
            raise HTTPException(404, f"{key!r} is not a report this view serves")
        from tasks.adapters.storage import ObjectNotFound

        try:
            data = store().get_bytes(key)
        except ObjectNotFound:
            raise HTTPException(404, f"{key!r} is not in the store") from None
        ctype = mimetypes.guess_type(key)[0] or "application/octet-stream"
        if ctype.startswith("text/") or ctype in ("application/json", "image/svg+xml"):
            ctype += "; charset=utf-8"
        return Response(data, media_type=ctype)

    @app.get("/serving/{model}")
    def serving(model: str) -> Any:
        """Live: the repository's pinned version and what Triton reports READY (``mlpipe deploy status``)."""
        from tasks.steps import deploy

        try:
            return JSONResponse(json.loads(json.dumps(deploy.status(deploy.ServingTarget.from_env(), model, store()),
                                                      default=str)))
        except Exception as exc:  # noqa: BLE001 - an informative page
            return JSONResponse({"model": model, "error": f"{type(exc).__name__}: {exc}"}, status_code=503)

    @app.get("/audit", response_class=HTMLResponse)
    def audit_page(request: Request, at: str | None = Query(None), window: str = Query(audit_mod.DEFAULT_WINDOW),
                   model: str | None = Query(None)) -> Any:
        r = root(request)
        if not at:
            form = (f'<form action="{r}/audit" method="get"><label>at (UTC) <input name="at" '
                    f'placeholder="2026-11-24 03:47" required></label> <label>window <input name="window" '
                    f'value="{_e(window)}" size="5"></label> <button type="submit">audit</button></form>')
            return _page("What happened at ...?", form, r)
        try:
            when, span = audit_mod.parse_at(at), audit_mod.parse_window(window)
        except audit_mod.AuditError as exc:
            return HTMLResponse(_page("audit: bad input", f"<p class='fail'>{_e(exc)}</p>", r), status_code=400)
        from tasks import logs
        from tasks.config import load_settings

        cfg = load_settings()
        runs = runs_factory(request) if runs_factory is not None else None
        metrics = metrics_factory() if metrics_factory is not None else (
            audit_mod.PrometheusSource(cfg.audit.prometheus_url) if cfg.audit.prometheus_url else None)
        folder = log_dir_factory() if log_dir_factory is not None else logs.log_dir()
        try:
            answer = audit_mod.build_audit(store(), model or cfg.model_name, when, span, runs=runs, metrics=metrics,
                                           log_dir=folder)
        finally:
            close = getattr(runs, "close", None)
            if close is not None:
                close()
        return audit_mod.render_html(answer, report_href=lambda key: f"{r}/store/{quote(key)}", home_href=f"{r}/")

    return app
