"""Airflow adapter for the trigger paths: drop arrival (an AssetWatcher) and the scheduled retrain plan.

Drop arrival, exactly once per drop
-----------------------------------
``DropArrivalTrigger`` is a ``BaseEventTrigger`` run by the triggerer for the ``mlpipe_drops``
asset's ``AssetWatcher``. Every ``poll_interval`` seconds it lists the object store (through
``tasks.adapters.storage`` / ``tasks.steps.drops``) and emits one event ``{"drop_id": ...}`` per drop that is

* complete (``drops/<id>/_SUCCESS`` exists; an incomplete drop is ignored until its marker
  appears, however long that takes),
* not claimed yet (no ``triggers/drop_arrival/<id>.json``), and
* not processed by another path already (no ``drops/<id>/validation/result.json``).

Each event becomes an asset event; the ``drop_arrival`` DAG turns the events of a run (two
drops arriving together can share one run) into one ``retrain`` run per drop with the run id
``drop__<drop_id>`` and writes the claim; it also takes every other complete, unclaimed drop, so an
event that Airflow consumed into a run created a moment before the event was stored (two drops at
once) is not left waiting for a redelivery. The guarantees, also across a scheduler or triggerer
restart:

* at least once: the trigger keeps no state that a restart could lose. After a restart it
  re-emits every complete drop without a claim, and a drop still unclaimed after
  ``redeliver_after`` seconds (an event lost with a crashed triggerer) is emitted again;
* at most once: the ``retrain`` run id is derived from the drop id, and the metadata DB holds
  one run per id: a duplicate event finds the run and is skipped
  (``skip_when_already_exists``), and the claim stops further events.

Scheduled retraining
--------------------
``retrain_plan(store, model)``: every complete drop newer than the newest drop the champion
was trained on, split into validated (trained on), not validated yet and failed validation.

Schedules
---------
``cron_from_env(var, default, example)``: the cron expression a DAG file reads from its
environment variable when parsed (``off``/``none``/``never``: no time schedule), refused with
the variable named when it is not a cron expression.

Everything here except the trigger class is plain Python on the object store (no Airflow),
tested directly in tests/test_triggers.py.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import logging
import sys
import time
from pathlib import Path
from typing import Any, AsyncIterator, Iterable

from airflow.triggers.base import BaseEventTrigger, TriggerEvent

PROJECT_ROOT = Path(__file__).resolve().parent.parent
if str(PROJECT_ROOT) not in sys.path:  # so `import tasks` works in the triggerer and the workers
    sys.path.insert(0, str(PROJECT_ROOT))

from tasks.contracts import layout  # noqa: E402 - the store's keys (standard library only)

logger = logging.getLogger(__name__)

CLAIM_PREFIX = layout.DROP_ARRIVAL_CLAIMS
RETRAIN_DAG = "retrain"
# How both trigger DAGs (drop_arrival, scheduled_retrain) start a retrain run: idempotent on the run id
# (a second trigger of the same drop is a no-op), fire-and-forget, no logical date.
RETRAIN_TRIGGER_KWARGS: dict[str, Any] = {
    "trigger_dag_id": RETRAIN_DAG,
    "logical_date": None,
    "skip_when_already_exists": True,
    "wait_for_completion": False,
    "openlineage_inject_parent_info": False,
}


# --------------------------------------------------------------------------- bookkeeping (no Airflow)


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def retrain_run_id(drop_id: str) -> str:
    """The ``retrain`` run id for a drop: one run per drop, enforced by the metadata DB."""
    return f"drop__{drop_id}"


def claim_key(drop_id: str) -> str:
    return layout.drop_arrival_claim_key(drop_id)


def is_claimed(store: Any, drop_id: str) -> bool:
    return store.exists(claim_key(drop_id))


def claim(store: Any, drop_id: str, **info: Any) -> dict[str, Any]:
    """Record that ``drop_id`` has its retrain run (idempotent: an existing claim is kept)."""
    key = claim_key(drop_id)
    if store.exists(key):
        return store.get_json(key)
    body = {"drop_id": drop_id, "retrain_run_id": retrain_run_id(drop_id), "claimed_at": _now(), **info}
    store.put_json(key, body)
    return body


def claims(store: Any) -> dict[str, dict[str, Any]]:
    return {k[len(CLAIM_PREFIX):-len(".json")]: store.get_json(k)
            for k in store.list(CLAIM_PREFIX) if k.endswith(".json")}


def pending_drops(store: Any) -> list[str]:
    """Complete drops with no claim and no validation result, oldest first."""
    from tasks.steps import drops

    claimed = {k[len(CLAIM_PREFIX):-len(".json")] for k in store.list(CLAIM_PREFIX) if k.endswith(".json")}
    out = []
    for drop_id in drops.list_drops(store, complete_only=True):
        if drop_id in claimed or store.exists(layout.validation_result_key(drop_id)):
            continue
        out.append(drop_id)
    return out


def drop_ids_from_events(events: Iterable[Any]) -> list[str]:
    """Drop ids named by asset events (``extra.payload.drop_id`` from the watcher, or ``extra.drop_id``
    from an event posted through the REST API), de-duplicated, in order."""
    out: list[str] = []
    for ev in events:
        extra = getattr(ev, "extra", None) if not isinstance(ev, dict) else ev.get("extra")
        extra = extra or {}
        payload = extra.get("payload") if isinstance(extra.get("payload"), dict) else {}
        drop_id = payload.get("drop_id") or extra.get("drop_id")
        if drop_id and drop_id not in out:
            out.append(str(drop_id))
    return out


def retrain_plan(store: Any, model: str) -> dict[str, Any]:
    """What a scheduled retrain would train on: the validated drops since the champion was trained.

    "Since" = complete drops created after the newest drop in the champion's lineage (drops that
    arrived while it trained count), never a drop the champion already saw. Without a champion
    every validated drop counts.
    """
    from tasks.steps import drops
    from tasks.steps import registry

    champ = registry.champion(store, model)
    seen = [d["drop_id"] for d in (champ or {}).get("lineage", {}).get("drops", [])]
    cutoff = max((drops.created_at(store, d) for d in seen), default="")
    validated, not_validated, failed = [], [], []
    for drop_id in drops.list_drops(store, complete_only=True):  # oldest first
        if drop_id in seen or (cutoff and drops.created_at(store, drop_id) <= cutoff):
            continue
        try:
            result = store.get_json(layout.validation_result_key(drop_id))
        except Exception:  # noqa: BLE001 - not validated (yet)
            not_validated.append(drop_id)
            continue
        (validated if result.get("success") else failed).append(drop_id)
    plan: dict[str, Any] = {
        "model": model,
        "champion": None if champ is None else champ["version"],
        "champion_drops": seen,
        "drops": validated,
        "not_validated": not_validated,
        "failed_validation": failed,
    }
    if validated:
        digest = hashlib.sha256(",".join(sorted(validated)).encode()).hexdigest()[:12]
        plan["run_id"] = f"scheduled__{validated[-1]}__{len(validated)}_{digest}"
        plan["conf"] = {"drop_id": validated[-1], "extra_drop_ids": validated[:-1]}
    return plan


def describe_plan(plan: dict[str, Any]) -> str:
    seen = ", ".join(plan["champion_drops"]) or "no drops"
    since = (f"since the champion v{plan['champion']} was trained (on {seen})"
             if plan["champion"] is not None else "(there is no champion yet)")
    if not plan["drops"]:
        msg = f"no new validated data {since}: nothing to retrain"
    else:
        msg = f"{len(plan['drops'])} validated drop(s) {since}: {', '.join(plan['drops'])}"
    if plan["not_validated"]:
        msg += f"; not validated yet (left to drop arrival): {', '.join(plan['not_validated'])}"
    if plan["failed_validation"]:
        msg += f"; failed validation (never trained on): {', '.join(plan['failed_validation'])}"
    return msg


# --------------------------------------------------------------------------- the trigger


class DropArrivalTrigger(BaseEventTrigger):
    """Polls the object store for complete, unclaimed drops; one event per drop (see the module doc).

    :param poll_interval: seconds between listings of ``drops/``.
    :param redeliver_after: seconds after which a drop emitted but still unclaimed is emitted again.
    :param store_url: the object store; default ``MLPIPE_STORE_URL`` of the triggerer's environment.
    """

    def __init__(self, poll_interval: float = 5.0, redeliver_after: float = 300.0,
                 store_url: str | None = None) -> None:
        super().__init__()
        self.poll_interval = float(poll_interval)
        self.redeliver_after = float(redeliver_after)
        self.store_url = store_url

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return ("mlpipe_triggers.DropArrivalTrigger",
                {"poll_interval": self.poll_interval, "redeliver_after": self.redeliver_after,
                 "store_url": self.store_url})

    def _pending(self) -> list[str]:
        from tasks.adapters.storage import open_store

        return pending_drops(open_store(url=self.store_url))

    async def run(self) -> AsyncIterator[TriggerEvent]:
        emitted: dict[str, float] = {}
        failures = 0
        self.log.info("watching for complete drops every %.1fs (store %s)", self.poll_interval,
                      self.store_url or "$MLPIPE_STORE_URL")
        while True:
            try:
                pending = await asyncio.to_thread(self._pending)
                failures = 0
            except Exception as exc:  # noqa: BLE001 - a store hiccup must not kill the watcher
                failures += 1
                self.log.warning("listing drops failed (%s attempt in a row): %s", failures, exc)
                await asyncio.sleep(min(60.0, self.poll_interval * 2 ** min(failures, 4)))
                continue
            now = time.monotonic()
            for drop_id in pending:
                last = emitted.get(drop_id)
                if last is not None and now - last < self.redeliver_after:
                    continue
                if last is not None:
                    self.log.warning("drop %s is still unclaimed %.0fs after its event: emitting it again",
                                     drop_id, now - last)
                emitted[drop_id] = now
                self.log.info("complete new drop %s: emitting an event", drop_id)
                yield TriggerEvent({"drop_id": drop_id, "detected_at": _now()})
            for drop_id in [d for d in emitted if d not in pending]:
                emitted.pop(drop_id)  # claimed: forget it
            await asyncio.sleep(self.poll_interval)


def cron_from_env(var: str, default: str, example: str) -> str | None:
    """The cron expression in ``$var`` (``default`` when unset); None for ``off``/``none``/``never``.

    Raises ValueError naming the variable when the value is not a cron expression (the DAG file
    then shows an import error saying so).
    """
    from tasks.config import load_settings

    cron = (load_settings().by_env(var) or default).strip()  # a setting of the tree (tasks/config.py)
    if cron.lower() in {"off", "none", "never"}:
        return None
    from croniter import croniter

    if not croniter.is_valid(cron):
        raise ValueError(f"{var}={cron!r} is not a cron expression (e.g. {example}, or 'off')")
    return cron
