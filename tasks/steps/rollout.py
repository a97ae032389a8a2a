"""Safe rollout: a QC-passed version proves itself on live traffic before it serves everyone.

``run`` (``mlpipe rollout run --version N``; the ``rollout`` DAG):

1. refuse, with the serving state unchanged, a version that is unknown, rejected, not QC-passed or already
   the champion, a share outside 0..100, and a second rollout of the same model while one runs (a lease,
   ``rollouts/<model>/lock.json``; ``deploy rollback`` refuses while it is held, too);
2. load the candidate into its own Triton lane (``<model>_candidate``: the champion keeps serving from its
   own models) and smoke-test it there;
3. step through ``MLPIPE_ROLLOUT_STEPS`` (default ``shadow,10,50,100``): write the state every consumer
   follows (``tasks.contracts.rollout.RolloutState``), watch live traffic for ``window_s`` and until the
   candidate answered ``min_frames``, add up the consumers' evidence and judge it (:func:`judge`:
   agreement with the champion on the same frames in shadow, class-distribution and confidence shift,
   decode/Triton error rate, p95 latency, accuracy on late labels when the ``labels`` topic carries them).
   Every step and decision is a registry event with its evidence;
4. evidence that does not hold: the state goes back to the champion at once, the candidate lane is
   unloaded, the version is ``rejected`` with the failing checks named (``rollout_rolled_back``);
5. after the last step (100 %): every frame goes to the candidate lane while the main lane is switched to
   the version by the ordinary deploy (smoke test, restore on failure, registry promotion), then the state
   goes back to ``off`` with the new champion and the lane is unloaded (``rollout_promoted``).

The kill switch (:func:`kill`: ``mlpipe rollout kill``, the gateway's ``POST /v1/rollout/<model>/kill``,
the ``rollout_kill`` DAG) writes the ``off`` state directly, without waiting for any lock: every consumer
sends all frames to the champion within its poll interval (1 s); a running controller sees it within a
second, unloads the lane and ends ``killed``.

Each rollout leaves ``rollouts/<model>/<id>/rollout.json`` (steps, evidence, decisions) and
``report.html`` (plots of the evidence windows).

Exit codes: 0 promoted; ``EXIT_REJECTED`` rolled back or killed (the champion serves); ``EXIT_BAD_INPUT`` a
refused request (nothing changed); ``EXIT_TRANSIENT`` Triton or the store unreachable.
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
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from tasks.adapters.storage import ObjectNotFound, Store, open_store
from tasks.config import load_settings
from tasks.contracts import layout
from tasks.contracts.errors import BadInput, Rejected, run_cli
from tasks.contracts.results import write_result_json
from tasks.contracts.rollout import (
    ArmStats,
    RolloutState,
    candidate_lane,
    check_share,
    off_state,
    total_variation,
)
from tasks.logs import setup_logging
from tasks.steps import deploy as deploy_step
from tasks.steps import registry

logger = logging.getLogger(__name__)


class RolloutRefused(BadInput, ValueError):
    """A rollout request that cannot be carried out (unknown or rejected version, bad share, one running)."""


class RolledBack(Rejected, RuntimeError):
    """The candidate's live evidence did not hold (or the kill switch stopped it): the champion serves."""


# ----------------------------------------------------------------------------------------------
# Steps and thresholds
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Step:
    name: str  # "shadow" or "canary-<share>"
    mode: str  # shadow | canary
    share: float


def parse_steps(text: str | Sequence[str]) -> list[Step]:
    """``"shadow,10,50,100"`` -> steps; refuses shares outside 0..100, an empty list, a last share below 100."""
    items = [s.strip() for s in (text.split(",") if isinstance(text, str) else text) if str(s).strip()]
    if not items:
        raise RolloutRefused("no rollout steps given: use e.g. --steps shadow,10,50,100")
    steps: list[Step] = []
    for item in items:
        if item.lower() == "shadow":
            steps.append(Step("shadow", "shadow", 0.0))
            continue
        try:
            share = check_share(item.rstrip("%"))
        except ValueError as exc:
            raise RolloutRefused(f"rollout step {item!r}: {exc}") from None
        if share == 0:
            raise RolloutRefused(f"rollout step {item!r}: a canary share of 0 % tests nothing; use shadow")
        steps.append(Step(f"canary-{share:g}", "canary", share))
    shares = [s.share for s in steps if s.mode == "canary"]
    if shares != sorted(shares):
        raise RolloutRefused(f"rollout steps {items}: canary shares must not go down")
    if not shares or shares[-1] != 100:
        raise RolloutRefused(f"rollout steps {items}: the last step must be 100 (the candidate answering "
                             "everyone before it is promoted)")
    return steps


@dataclass(frozen=True)
class Thresholds:
    window_s: float = 30.0
    min_frames: int = 200
    max_wait_s: float = 300.0
    min_agreement: float = 0.9
    max_class_shift: float = 0.2
    max_confidence_drop: float = 0.1
    max_error_rate: float = 0.02
    max_latency_ratio: float = 3.0
    latency_slack_ms: float = 50.0
    max_accuracy_drop: float = 0.03
    min_labels: int = 50

    @classmethod
    def from_settings(cls, **overrides: Any) -> "Thresholds":
        r = load_settings().rollout
        values = {k: getattr(r, k) for k in ("window_s", "min_frames", "max_wait_s", "min_agreement",
                                               "max_class_shift", "max_confidence_drop", "max_error_rate",
                                               "max_latency_ratio", "max_accuracy_drop", "min_labels")}
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


def judge(step: Step, champion: ArmStats, candidate: ArmStats, th: Thresholds) -> list[dict[str, Any]]:
    """The checks of one step's evidence: ``{"check", "value", "limit", "ok", "detail"}`` each."""
    checks: list[dict[str, Any]] = []

    def add(name: str, value: float | None, limit: float, ok: bool, detail: str) -> None:
        checks.append({"check": name, "value": None if value is None else round(value, 4), "limit": limit,
                       "ok": bool(ok), "detail": detail})

    n = candidate.n
    add("frames", n, th.min_frames, n >= th.min_frames,
        f"the candidate answered {n} frame(s) (needs {th.min_frames})")
    err = candidate.error_rate or 0.0
    add("error_rate", err, th.max_error_rate, err <= th.max_error_rate,
        f"{candidate.errors} failed call(s) and {candidate.frame_errors} unusable frame(s) of "
        f"{n + candidate.errors + candidate.frame_errors}")
    if step.mode == "shadow":
        agreement = candidate.agreement
        add("agreement", agreement, th.min_agreement, agreement is not None and agreement >= th.min_agreement,
            f"the candidate gave the champion's class on {candidate.agree} of {candidate.compared} frames")
    shift = total_variation(candidate.distribution(), champion.distribution())
    if shift is not None:
        add("class_shift", shift, th.max_class_shift, shift <= th.max_class_shift,
            "total-variation distance between the candidate's and the champion's class distributions")
    if candidate.mean_confidence is not None and champion.mean_confidence is not None:
        drop = champion.mean_confidence - candidate.mean_confidence
        add("confidence_drop", drop, th.max_confidence_drop, drop <= th.max_confidence_drop,
            f"mean top score {candidate.mean_confidence:.3f} vs the champion's {champion.mean_confidence:.3f}")
    p_cand, p_champ = candidate.p95_ms(), champion.p95_ms()
    if p_cand is not None and p_champ is not None:
        limit = max(p_champ * th.max_latency_ratio, p_champ + th.latency_slack_ms)
        add("p95_latency_ms", p_cand, round(limit, 1), p_cand <= limit,
            f"p95 Triton latency {p_cand:g} ms vs the champion's {p_champ:g} ms")
    if candidate.labelled >= th.min_labels and champion.labelled >= th.min_labels:
        drop = (champion.accuracy or 0.0) - (candidate.accuracy or 0.0)
        add("accuracy_drop", drop, th.max_accuracy_drop, drop <= th.max_accuracy_drop,
            f"accuracy on late labels {candidate.accuracy:.3f} ({candidate.labelled}) vs the champion's "
            f"{champion.accuracy:.3f} ({champion.labelled})")
    return checks


# ----------------------------------------------------------------------------------------------
# State, evidence, lock
# ----------------------------------------------------------------------------------------------


def read_state(store: Store, model: str) -> RolloutState:
    try:
        return RolloutState.model_validate(store.get_json(layout.rollout_state_key(model)))
    except ObjectNotFound:
        return off_state(model)


def write_state(store: Store, state: RolloutState) -> RolloutState:
    state = state.model_copy(update={"updated_at": time.time()})
    store.put_json(layout.rollout_state_key(state.model), state.model_dump())
    return state


def collect(store: Store, model: str, rollout_id: str, step: str | None = None
            ) -> tuple[dict[str, dict[str, ArmStats]], list[dict[str, Any]], list[str]]:
    """Every consumer's evidence of ``rollout_id`` added up: ``{step: {arm: ArmStats}}``, the time series and
    the consumers seen."""
    prefix = layout.rollout_evidence_prefix(model, rollout_id)
    steps: dict[str, dict[str, ArmStats]] = {}
    series: list[dict[str, Any]] = []
    consumers: list[str] = []
    for key in store.list(prefix):
        if not key.endswith(".json"):
            continue
        try:
            body = store.get_json(key)
        except (ObjectNotFound, ValueError):
            continue
        consumers.append(str(body.get("consumer", key)))
        for name, entry in (body.get("steps") or {}).items():
            if step is not None and name != step:
                continue
            arms = steps.setdefault(name, {})
            for arm, counts in (entry.get("arms") or {}).items():
                arms[arm] = arms.get(arm, ArmStats()).merge(ArmStats.from_dict(counts))
        series.extend(p for p in body.get("series") or [] if step is None or p.get("step") == step)
    return steps, series, consumers


def rollout_lock(store: Store, model: str, what: str, ttl_s: float = 60.0) -> deploy_step.RepoLease:
    """The lease that keeps one rollout (and no rollback) per model at a time; refused at once when held."""
    return deploy_step.RepoLease(store, what, ttl_s=ttl_s, timeout_s=0.0, key=layout.rollout_lock_key(model),
                                 poll_s=0.2)


def running(store: Store, model: str) -> dict[str, Any] | None:
    """The running rollout's lease body (None when none runs or its holder stopped renewing it)."""
    return deploy_step.running_rollout(store, model)


class LabelJoin:
    """Accuracy on late labels: the ``labels`` topic (``{"frame_id", "label"}``) joined with the answers on
    ``predictions`` and ``predictions.shadow``, per version. Follows the topics from about now (assign-only,
    nothing committed); a missing ``labels`` topic just gives no labels. ``step()`` starts counting the answers
    of a new step; labels are kept for the whole rollout (they arrive late)."""

    def __init__(self, kafka_cfg: Any = None) -> None:
        from tasks.adapters.kafka import KafkaConfig, TailFollower
        from tasks.contracts.messages import LABELS, PREDICTIONS_SHADOW

        self.cfg = kafka_cfg or KafkaConfig.from_env()
        self.labels_topic = self.cfg.topic(LABELS)
        self.follower = TailFollower(self.cfg, [self.labels_topic, self.cfg.predictions_topic,
                                                self.cfg.topic(PREDICTIONS_SHADOW)], window=1)
        self.labels: dict[str, int] = {}
        self.answers: dict[tuple[str, str], int] = {}  # (frame id, version) -> label answered, this step
        self._refreshed = 0.0

    def step(self) -> None:
        self.poll()
        self.answers = {}

    def poll(self, seconds: float = 0.1) -> None:
        try:
            if time.monotonic() - self._refreshed > 2.0:
                self._refreshed = time.monotonic()
                self.follower.refresh(timeout=1.0)
            for rec in self.follower.poll_batch(20000, seconds):
                try:
                    body = json.loads(rec.value or b"")
                    if rec.topic == self.labels_topic:
                        self.labels[str(body["frame_id"])] = int(body["label"])
                    else:
                        self.answers[(str(body["frame_id"]), str(body.get("model_version")))] = int(body["label"])
                except (ValueError, KeyError, TypeError):
                    continue
        except Exception as exc:  # noqa: BLE001 - labels are extra evidence; never stop a rollout for them
            logger.debug("late labels: %s", exc)

    def score(self, arms: dict[str, ArmStats], champion: str, candidate: str) -> None:
        """Add labelled / correct to the champion's and the candidate's ``ArmStats`` (by the answering version)."""
        for (fid, version), answered in self.answers.items():
            truth = self.labels.get(fid)
            arm = "candidate" if version == candidate else "champion" if version == champion else None
            if truth is None or arm is None:
                continue
            stats = arms.setdefault(arm, ArmStats())
            stats.labelled += 1
            stats.correct += int(answered == truth)

    def close(self) -> None:
        try:
            self.follower.close()
        except Exception:  # noqa: BLE001
            pass


# ----------------------------------------------------------------------------------------------
# The candidate lane in Triton
# ----------------------------------------------------------------------------------------------


def lane_spec(spec: Any) -> Any:
    """``spec`` renamed to the candidate lane (``<model>_candidate``): the same tensors, classes and codec."""
    return spec.model_copy(update={"name": candidate_lane(spec.name)})


def lane_up(store: Store, target: deploy_step.ServingTarget, spec: Any, version: int) -> dict[str, Any]:
    """Load ``version`` into the candidate lane next to the champion and smoke-test it there."""
    from tasks.model import repo as model_repo

    lane = lane_spec(spec)
    client = deploy_step._client(target)
    try:
        if not client.is_live():
            raise deploy_step.TritonDown(f"Triton at {target.triton_url} is not reachable: the rollout was not "
                                         "started; nothing was changed")
        what = f"rollout lane of {spec.name} v{version}"
        with deploy_step.repo_session(target, what) as session, \
                tempfile.TemporaryDirectory(prefix="mlpipe-rollout-") as tmp:
            work = session.target
            flavour = deploy_step._ensure_rendered(work, lane)
            session.sync()
            onnx, plan = deploy_step._fetch(store, spec.name, version, Path(tmp), flavour)
            onnx, served = deploy_step._served_artifact(store, spec.name, version, Path(tmp), flavour, onnx, plan)
            expected = deploy_step.preflight(onnx, spec, what)
            for old in model_repo.list_versions(work.repo_dir, lane.name):
                if old != version:
                    model_repo.remove_version(work.repo_dir, lane.name, old, force=True)
            model_repo.write_classifier_version(work.repo_dir, lane, version, onnx, plan, flavour=flavour)
            session.sync()
            deploy_step._serve(client, work, lane, version, session.sync)
            tolerance = deploy_step.SCORE_TOLERANCE["plan" if plan is not None else "onnx"]
            smoke = deploy_step.smoke_test(client, lane, min_accuracy=target.smoke_min_accuracy,
                                           expected=expected, score_tolerance=tolerance)
    finally:
        client.close()
    logger.info("rollout: %s v%s loaded in the candidate lane %s (%s); smoke test %s", spec.name, version,
                lane.name, served["artifact"], smoke)
    return {"lane": lane.name, "served": served, "smoke": smoke}


#: seconds between writing a state without the candidate and unloading its lane: every consumer reads the
#: state within its poll interval (1 s) and its calls in flight finish, so none falls back needlessly
LANE_DRAIN_S = 2.0


def lane_down(target: deploy_step.ServingTarget, spec: Any, drain_s: float = LANE_DRAIN_S) -> str:
    """Unload the candidate lane's models after ``drain_s`` (their files stay for the next rollout); never
    raises. Call it after the state that sends nothing to the candidate was written."""
    from tasks.model import repo as model_repo

    time.sleep(drain_s)
    lane = candidate_lane(spec.name)
    client = deploy_step._client(target)
    try:
        pre, clf, post, _ = model_repo.model_names(lane)
        for name in (lane, clf, pre, post):
            try:
                client.unload_model(name)
            except Exception as exc:  # noqa: BLE001 - unloading is tidying up
                logger.debug("unloading %s: %s", name, exc)
        return f"candidate lane {lane} unloaded"
    except Exception as exc:  # noqa: BLE001
        return f"could not unload the candidate lane {lane}: {exc}"
    finally:
        client.close()


# ----------------------------------------------------------------------------------------------
# The controller
# ----------------------------------------------------------------------------------------------


@dataclass
class Rollout:
    """What one rollout did: written to ``rollouts/<model>/<id>/rollout.json`` and summarised in the demo."""

    model: str
    rollout_id: str
    champion: int
    candidate: int
    steps: list[dict[str, Any]] = field(default_factory=list)
    outcome: str = "running"  # promoted | rolled_back | killed | failed
    reason: str = ""
    started_at: str = ""
    ended_at: str = ""
    report: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "rollout_id": self.rollout_id, "champion": self.champion,
                "candidate": self.candidate, "steps": self.steps, "outcome": self.outcome, "reason": self.reason,
                "started_at": self.started_at, "ended_at": self.ended_at, "report": self.report}


def _now_iso() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def check_request(store: Store, model: str, version: int) -> tuple[dict[str, Any], int]:
    """The candidate's manifest and the champion's version, or ``RolloutRefused`` naming the problem."""
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise RolloutRefused(f"a rollout needs a version number >= 1, got {version!r}")
    try:
        manifest = registry.get_version(store, model, version)
    except registry.RegistryError as exc:
        raise RolloutRefused(f"cannot roll out {model} v{version}: {exc}") from None
    if manifest.get("stage") == "rejected":
        why = (manifest.get("history") or [{}])[-1].get("reason", "no reason recorded")
        raise RolloutRefused(f"{model} v{version} was rejected ({why}); it cannot be rolled out")
    verdict = (manifest.get("qc") or {}).get("verdict")
    if verdict != "passed":
        raise RolloutRefused(f"{model} v{version} has not passed the QC gate (verdict: {verdict}); run "
                             f"`mlpipe qc --version {version}` first")
    champ = registry.champion(store, model)
    if champ is None:
        raise RolloutRefused(f"{model} has no production version to compare v{version} with: deploy one first "
                             f"(`mlpipe deploy deploy --version {version}`)")
    if int(champ["version"]) == version:
        raise RolloutRefused(f"{model} v{version} is already the production version")
    return manifest, int(champ["version"])


def run(store: Store, model: str, version: int, target: deploy_step.ServingTarget | None = None, *,
        steps: str | Sequence[str] | None = None, thresholds: Thresholds | None = None,
        poll_s: float = 1.0, on_step: Callable[[dict[str, Any]], None] | None = None,
        kafka: Any = None) -> Rollout:
    """Roll ``version`` out step by step; see the module doc. Raises ``RolledBack`` when it did not hold.

    ``kafka`` (a ``KafkaConfig``; default from the settings) is where late labels are read from."""
    spec = load_settings().model_spec(model)
    plan = parse_steps(steps if steps is not None else load_settings().rollout.steps)
    th = thresholds or Thresholds.from_settings()
    _, champion = check_request(store, model, version)
    target = target or deploy_step.ServingTarget.from_env()
    rid = dt.datetime.now(dt.timezone.utc).strftime("r%Y%m%dT%H%M%SZ-") + uuid.uuid4().hex[:6]
    lock = rollout_lock(store, model, f"rollout {rid} of {model} v{version}")
    try:
        lock.acquire()
    except deploy_step.RepoBusy:
        holder = running(store, model) or {}
        raise RolloutRefused(f"a rollout of {model} is already running ({holder.get('what', '?')}, "
                             f"{holder.get('owner', '?')}); wait for it, or stop it with `mlpipe rollout kill "
                             f"--model {model}`") from None
    ro = Rollout(model, rid, champion, version, started_at=_now_iso())
    labels: LabelJoin | None = None
    try:
        registry.record_event(store, model, "rollout_started", version=version, champion=champion, rollout_id=rid,
                              steps=[s.name for s in plan], thresholds=th.__dict__)
        try:
            lane = lane_up(store, target, spec, version)
        except Exception as exc:
            write_state(store, off_state(model, champion=str(champion), rollout_id=rid,
                                         reason=f"the candidate lane failed: {exc}"))
            lane_down(target, spec)
            ro.outcome, ro.reason = "failed", f"the candidate lane could not be loaded: {exc}"
            registry.record_event(store, model, "rollout_failed", version=version, rollout_id=rid, reason=ro.reason)
            raise
        ro.steps.append({"step": "lane", "at": _now_iso(), **lane})
        labels = _label_join(kafka)
        for step in plan:
            killed = _watch(store, model, spec, ro, step, th, poll_s, labels)
            entry = ro.steps[-1]
            if on_step is not None:
                on_step(entry)
            if killed:
                ro.outcome, ro.reason = "killed", f"kill switch: {killed.get('reason') or 'no reason given'} " \
                                                  f"(by {killed.get('by', '?')})"
                lane_down(target, spec)
                registry.record_event(store, model, "rollout_killed", version=version, rollout_id=rid,
                                      step=step.name, **{k: killed.get(k) for k in ("by", "reason")})
                raise RolledBack(f"rollout {rid} of {model} v{version} was stopped by the kill switch at "
                                 f"{step.name}: v{champion} serves every frame")
            failed = [c for c in entry["checks"] if not c["ok"]]
            if failed:
                why = "; ".join(f"{c['check']} {c['value']} (limit {c['limit']}): {c['detail']}" for c in failed)
                write_state(store, off_state(model, champion=str(champion), rollout_id=rid,
                                             reason=f"rolled back at {step.name}: {why}"))
                ro.outcome, ro.reason = "rolled_back", f"at {step.name}: {why}"
                lane_down(target, spec)
                registry.set_stage(store, model, version, "rejected", f"rolled back by rollout {rid} at {step.name}: "
                                   f"{why}")
                registry.record_event(store, model, "rollout_rolled_back", version=version, champion=champion,
                                      rollout_id=rid, step=step.name, failed=failed, evidence=entry["evidence"])
                raise RolledBack(f"rollout {rid}: {model} v{version} was rolled back at {step.name}, v{champion} "
                                 f"serves every frame: {why}")
        _promote(store, model, spec, ro, target, version, champion)
        return ro
    except RolledBack:
        raise
    except BaseException as exc:
        if ro.outcome == "running":
            ro.outcome, ro.reason = "failed", f"{type(exc).__name__}: {exc}"
            try:
                write_state(store, off_state(model, champion=str(champion), rollout_id=rid, reason=ro.reason))
                lane_down(target, spec)
                registry.record_event(store, model, "rollout_failed", version=version, rollout_id=rid,
                                      reason=ro.reason)
            except Exception as exc2:  # noqa: BLE001 - the first failure is what must be reported
                logger.error("could not put the champion back after the failure: %s", exc2)
        raise
    finally:
        ro.ended_at = _now_iso()
        try:
            ro.report = write_report(store, ro)
        except Exception as exc:  # noqa: BLE001 - the report is for people; the outcome stands
            logger.warning("could not write the rollout report: %s", exc)
        if labels is not None:
            labels.close()
        lock.release()
        logger.info("rollout %s of %s v%s: %s%s", rid, model, version, ro.outcome,
                    f" ({ro.reason})" if ro.reason else "")


def _label_join(kafka: Any = None) -> "LabelJoin | None":
    try:
        return LabelJoin(kafka)
    except Exception as exc:  # noqa: BLE001 - no Kafka settings here: no label evidence
        logger.info("no late-label evidence (%s)", exc)
        return None


def _watch(store: Store, model: str, spec: Any, ro: Rollout, step: Step, th: Thresholds,
           poll_s: float, labels: "LabelJoin | None" = None) -> dict[str, Any] | None:
    """Set ``step``, watch live traffic until the evidence is enough, and judge it; the kill switch's details
    when it was pulled meanwhile (None otherwise). Appends the step's entry to ``ro.steps``."""
    state = write_state(store, RolloutState(model=model, rollout_id=ro.rollout_id, mode=step.mode,
                                            share=step.share, champion=str(ro.champion),
                                            candidate=str(ro.candidate), step=step.name))
    registry.record_event(store, model, "rollout_step", version=ro.candidate, rollout_id=ro.rollout_id,
                          step=step.name, mode=step.mode, share=step.share)
    logger.info("rollout %s: %s (%s%s) for at least %.0fs and %d candidate frames", ro.rollout_id, step.name,
                step.mode, f" {step.share:g}%" if step.mode == "canary" else "", th.window_s, th.min_frames)
    started = time.monotonic()
    last_log = started
    if labels is not None:
        labels.step()
    while True:
        if labels is not None:
            labels.poll(min(poll_s, 0.5))
        else:
            time.sleep(poll_s)
        now_state = read_state(store, model)
        if now_state.killed or now_state.rollout_id != state.rollout_id or now_state.mode != state.mode \
                or now_state.step != state.step:
            killed = now_state.killed or {"by": "?", "reason": f"the rollout state was changed to {now_state.mode}"}
            ro.steps.append({"step": step.name, "mode": step.mode, "share": step.share, "at": _now_iso(),
                             "checks": [], "evidence": {}, "killed": killed})
            return killed
        arms = collect(store, model, ro.rollout_id, step.name)[0].get(step.name, {})
        cand = arms.get("candidate", ArmStats())
        elapsed = time.monotonic() - started
        if elapsed >= th.window_s and cand.n >= th.min_frames:
            break
        if elapsed >= th.max_wait_s:
            logger.warning("rollout %s: %s saw only %d candidate frames in %.0fs", ro.rollout_id, step.name,
                           cand.n, elapsed)
            break
        if time.monotonic() - last_log >= 10:
            last_log = time.monotonic()
            logger.info("rollout %s: %s %.0fs, %d candidate / %d champion frames so far", ro.rollout_id,
                        step.name, elapsed, cand.n, arms.get("champion", ArmStats()).n)
    if labels is not None:
        labels.poll(0.5)
        labels.score(arms, str(ro.champion), str(ro.candidate))
    champ = arms.setdefault("champion", ArmStats())
    cand = arms.setdefault("candidate", ArmStats())
    checks = judge(step, champ, cand, th)
    evidence = {"champion": champ.summary(), "candidate": cand.summary(), "seconds": round(elapsed, 1)}
    ok = all(c["ok"] for c in checks)
    entry = {"step": step.name, "mode": step.mode, "share": step.share, "at": _now_iso(), "ok": ok,
             "checks": checks, "evidence": evidence}
    ro.steps.append(entry)
    registry.record_event(store, model, "rollout_decision", version=ro.candidate, rollout_id=ro.rollout_id,
                          step=step.name, decision="continue" if ok else "roll back", checks=checks,
                          evidence=evidence)
    logger.info("rollout %s: %s %s (%s)", ro.rollout_id, step.name, "holds" if ok else "FAILS",
                ", ".join(f"{c['check']}={c['value']}{'' if c['ok'] else ' !'}" for c in checks))
    return None


def _promote(store: Store, model: str, spec: Any, ro: Rollout, target: deploy_step.ServingTarget, version: int,
             champion: int) -> None:
    write_state(store, RolloutState(model=model, rollout_id=ro.rollout_id, mode="full", share=100.0,
                                    champion=str(champion), candidate=str(version), step="promote"))
    try:
        result = deploy_step.deploy(store, model, version, target, rollout_id=ro.rollout_id)
    except Exception as exc:
        write_state(store, off_state(model, champion=str(champion), rollout_id=ro.rollout_id,
                                     reason=f"promotion failed: {exc}"))
        ro.outcome, ro.reason = "failed", f"the promotion (deploy) failed: {exc}"
        lane_down(target, spec)
        registry.record_event(store, model, "rollout_failed", version=version, rollout_id=ro.rollout_id,
                              reason=ro.reason)
        raise
    write_state(store, off_state(model, champion=str(version), rollout_id=ro.rollout_id,
                                 reason=f"v{version} promoted by rollout {ro.rollout_id}"))
    lane_down(target, spec)
    ro.outcome, ro.reason = "promoted", f"v{version} serves every frame (was v{champion})"
    ro.steps.append({"step": "promote", "at": _now_iso(), "deploy": {k: result.get(k) for k in
                                                                    ("deployed_version", "previous_version")}})
    registry.record_event(store, model, "rollout_promoted", version=version, champion=champion,
                          rollout_id=ro.rollout_id, steps=[s["step"] for s in ro.steps])


def kill(store: Store, model: str, *, by: str = "cli", reason: str = "") -> dict[str, Any]:
    """Put every frame back on the champion now (no lock is waited for); returns what was stopped."""
    state = read_state(store, model)
    champ = registry.champion(store, model)
    champion = state.champion or (str(champ["version"]) if champ else "")
    killed = {"by": by, "reason": reason or "no reason given", "at": _now_iso()}
    new = write_state(store, off_state(model, champion=champion, rollout_id=state.rollout_id, killed=killed,
                                       reason=f"kill switch ({by}): {killed['reason']}"))
    was = {"mode": state.mode, "share": state.share, "candidate": state.candidate, "rollout_id": state.rollout_id}
    registry.record_event(store, model, "rollout_kill", by=by, reason=killed["reason"], was=was,
                          version=int(state.candidate) if state.candidate.isdigit() else None)
    logger.warning("kill switch for %s (%s): %s -> off; v%s answers every frame", model, by,
                   state.mode if state.active else "no rollout was active", champion or "?")
    return {"model": model, "was": was, "state": new.model_dump(), "active_before": state.active}


def status(store: Store, model: str) -> dict[str, Any]:
    state = read_state(store, model)
    out: dict[str, Any] = {"model": model, "state": state.model_dump(), "running": running(store, model)}
    if state.rollout_id:
        steps, _, consumers = collect(store, model, state.rollout_id)
        out["evidence"] = {s: {a: v.summary() for a, v in arms.items()} for s, arms in steps.items()}
        out["consumers"] = consumers
    return out


# ----------------------------------------------------------------------------------------------
# The report
# ----------------------------------------------------------------------------------------------


def _plot(series: list[dict[str, Any]]) -> str:
    """A PNG (base64) of the frames per window and the shadow agreement per window, per arm."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(8, 5), sharex=True)
    t0 = min(p["t"] for p in series)
    for arm, colour in (("champion", "tab:blue"), ("candidate", "tab:orange")):
        pts = sorted((p for p in series if p["arm"] == arm), key=lambda p: p["t"])
        if not pts:
            continue
        ax1.plot([p["t"] - t0 for p in pts], [p["n"] for p in pts], label=arm, color=colour)
        conf = [(p["t"] - t0, p["conf_sum"] / p["n"]) for p in pts if p["n"]]
        ax2.plot([c[0] for c in conf], [c[1] for c in conf], color=colour, linestyle="--",
                 label=f"{arm} mean score")
        agree = [(p["t"] - t0, p["agree"] / p["compared"]) for p in pts if p["compared"]]
        if agree:
            ax2.plot([a[0] for a in agree], [a[1] for a in agree], color=colour, marker="o",
                     label=f"{arm} agreement")
    first: dict[str, float] = {}
    for p in sorted(series, key=lambda p: p["t"]):
        first.setdefault(str(p.get("step")), p["t"] - t0)
    for name, x in first.items():  # where each step began
        for ax in (ax1, ax2):
            ax.axvline(x, color="grey", linestyle=":", linewidth=1)
        ax1.annotate(name, (x, 1), xycoords=("data", "axes fraction"), xytext=(2, -10),
                     textcoords="offset points", fontsize=7, color="grey")
    ax1.set_ylabel("frames per window")
    ax2.set_ylabel("share")
    ax2.set_xlabel("seconds since the rollout started")
    ax2.set_ylim(0, 1.05)
    for ax in (ax1, ax2):
        ax.legend(loc="lower left", fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def write_report(store: Store, ro: Rollout) -> str:
    """``rollout.json`` and ``report.html`` (self-contained: the plot is inline); returns the report's URI."""
    prefix = layout.rollout_run_prefix(ro.model, ro.rollout_id)
    _, series, consumers = collect(store, ro.model, ro.rollout_id)
    body = {**ro.to_dict(), "consumers": consumers}
    store.put_json(prefix + layout.ROLLOUT_RECORD, body)
    rows = []
    for s in ro.steps:
        checks = "".join(
            f"<li class='{'ok' if c['ok'] else 'bad'}'>{html.escape(c['check'])}: {c['value']} (limit "
            f"{c['limit']}) — {html.escape(c['detail'])}</li>" for c in s.get("checks", []))
        ev = s.get("evidence") or {}
        rows.append(f"<tr><td>{html.escape(str(s.get('step')))}</td><td>{html.escape(str(s.get('at', '')))}</td>"
                    f"<td><ul>{checks}</ul></td><td><pre>{html.escape(json.dumps(ev, indent=1))[:4000]}</pre></td>"
                    "</tr>")
    plot = f"<img alt='evidence windows' src='data:image/png;base64,{_plot(series)}'>" if series else \
        "<p>No evidence was recorded (no consumer answered during the rollout).</p>"
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>Rollout {html.escape(ro.rollout_id)}</title>
<style>body{{font-family:sans-serif;margin:2em}}td,th{{border:1px solid #ccc;padding:4px;vertical-align:top}}
table{{border-collapse:collapse}}.ok{{color:#070}}.bad{{color:#b00;font-weight:bold}}</style></head><body>
<h1>Rollout of {html.escape(ro.model)} v{ro.candidate} (champion v{ro.champion})</h1>
<p>Outcome: <b class="{'ok' if ro.outcome == 'promoted' else 'bad'}">{html.escape(ro.outcome)}</b>
{html.escape(ro.reason)}</p><p>{html.escape(ro.started_at)} → {html.escape(ro.ended_at)}; rollout id
{html.escape(ro.rollout_id)}; consumers: {html.escape(', '.join(consumers) or 'none')}</p>
{plot}
<table><tr><th>step</th><th>decided at</th><th>checks</th><th>evidence</th></tr>{''.join(rows)}</table>
</body></html>"""
    store.put_bytes(prefix + layout.ROLLOUT_REPORT, page.encode(), content_type="text/html")
    return store.uri(prefix + layout.ROLLOUT_REPORT)


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mlpipe rollout", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="examples:\n  mlpipe rollout run --version 4\n"
                                       "  mlpipe rollout run --version 4 --steps shadow,25,100 --window 20\n"
                                       "  mlpipe rollout kill --reason 'alert: DLQ rate'\n  mlpipe rollout status")
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="roll a QC-passed version out: shadow, canary steps, promote or roll back")
    r.add_argument("--version", type=int, required=True)
    r.add_argument("--steps", default=None, help="e.g. shadow,10,50,100 (default MLPIPE_ROLLOUT_STEPS)")
    r.add_argument("--window", type=float, default=None, dest="window_s",
                   help="seconds each step watches at least (default MLPIPE_ROLLOUT_WINDOW_S)")
    r.add_argument("--min-frames", type=int, default=None, help="candidate frames a step needs")
    r.add_argument("--max-wait", type=float, default=None, dest="max_wait_s",
                   help="longest a step waits for its frames; then it is rolled back")
    r.add_argument("--min-agreement", type=float, default=None)
    k = sub.add_parser("kill", help="the kill switch: every frame back on the champion now")
    k.add_argument("--reason", default="", help="why (recorded in the registry event)")
    k.add_argument("--by", default="cli", help="who or what pulled it (recorded)")
    sub.add_parser("status", help="the rollout state, the running rollout and its evidence so far")
    for sp in sub.choices.values():
        sp.add_argument("--model", default=None, help="model project (default MLPIPE_MODEL_NAME)")
        sp.add_argument("--result-json", default=None, help="also write the result to this file")
        sp.add_argument("--log-level", default=None)
    return p


def _main(argv: Sequence[str] | None) -> int:
    args = _parser().parse_args(argv)
    setup_logging(args.log_level)
    settings = load_settings()
    model = args.model or settings.model_name
    store = open_store(settings)
    if args.command == "kill":
        out: dict[str, Any] = kill(store, model, by=args.by, reason=args.reason)
    elif args.command == "status":
        out = status(store, model)
    else:
        th = Thresholds.from_settings(window_s=args.window_s, min_frames=args.min_frames,
                                      max_wait_s=args.max_wait_s, min_agreement=args.min_agreement)
        try:
            ro = run(store, model, args.version, steps=args.steps, thresholds=th)
        except RolledBack:
            raise
        out = ro.to_dict()
    print(json.dumps(out, indent=2, default=str))
    if args.result_json:
        write_result_json(args.result_json, out)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(_main, argv, bad_input=(ValueError,))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
