"""The operator's view in the Airflow UI: the app of ``tasks.tools.operator_view``, mounted by the api-server.

Wiring only (the pages, the reports and the audit are ``tasks/tools/operator_view.py``):

* ``fastapi_apps``: the app under ``/mlpipe`` of the api-server, every route behind Airflow's own sign-in
  (``requires_authenticated``: the UI's ``_token`` cookie or a ``Bearer`` token, as the REST API);
* ``external_views``: a "mlpipe" entry in the UI's navigation bar that shows the app in the UI's frame
  (``href`` relative, no leading slash: it works behind a path prefix too).

The audit page reads DAG runs through the REST API of this same api-server with the signed-in user's
own token, so it sees exactly the runs that user may see.
"""

from __future__ import annotations

from typing import Any

from airflow.plugins_manager import AirflowPlugin

URL_PREFIX = "/mlpipe"


def _token(request: Any) -> str | None:
    from airflow.api_fastapi.auth.managers.base_auth_manager import COOKIE_NAME_JWT_TOKEN

    auth = request.headers.get("authorization", "")
    if auth.lower().startswith("bearer "):
        return auth.split(" ", 1)[1].strip()
    return request.cookies.get(COOKIE_NAME_JWT_TOKEN)


def _runs_for(request: Any) -> Any:
    """DAG runs for the audit page: this api-server's REST API, as the signed-in user."""
    from tasks.adapters.airflow import AirflowClient

    token = _token(request)
    if not token:
        return None
    return AirflowClient(f"{request.url.scheme}://{request.url.netloc}", token=token, timeout=20)


def _app() -> Any:
    from fastapi import Depends

    from airflow.api_fastapi.core_api.security import requires_authenticated
    from tasks.tools.operator_view import create_app

    return create_app(dependencies=[Depends(requires_authenticated())], runs_factory=_runs_for)


class LazyApp:
    """An ASGI app that builds the real one on its first request. Every Airflow process imports the plugins
    (the scheduler, the dag-processor, each task): only the api-server ever serves a request, so only it pays
    for FastAPI and Airflow's security module (about 2 s of CPU)."""

    def __init__(self) -> None:
        self._app: Any = None

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if self._app is None:
            self._app = _app()
        await self._app(scope, receive, send)

    def __repr__(self) -> str:
        return "tasks.tools.operator_view (mlpipe operator's view)"


class MlpipeUiPlugin(AirflowPlugin):
    name = "mlpipe_ui"
    fastapi_apps = [{"app": LazyApp(), "url_prefix": URL_PREFIX, "name": "mlpipe operator's view"}]
    external_views = [{"name": "mlpipe", "href": URL_PREFIX.lstrip("/") + "/", "destination": "nav",
                       "url_route": "mlpipe", "category": None}]
