"""The consumer's side of a safe rollout: follow the rollout state, route frames, record live evidence.

``RolloutRouter`` reads ``rollouts/<model>/state.json`` (``tasks.contracts.rollout.RolloutState``) every
``poll_s`` (1 s) on a thread of its own, so the kill switch takes effect within about a second plus the
micro-batch in flight. Per micro-batch the loop asks it:

* ``route(records, good)``: in ``canary`` (and ``full``) mode, which frames the candidate answers
  (``routes_to_candidate``: a hash of the device id salted with the rollout id: the same split after a
  restart, and on every consumer of the group); None otherwise.
* ``infer(champion, frames, route, ctx)``: the champion's and the candidate's parts are sent at once and
  merged back in order, with the version that answered each frame. A candidate call that fails is never a
  lost frame: its frames are answered by the champion (counted as the candidate's errors). In ``shadow``
  mode the champion answers everything and a copy goes to the candidate on a bounded pool of its own
  (skipped, and counted, when it falls behind: the live path never waits for a shadow); its answers are
  produced to ``predictions.shadow`` and compared with the champion's.

Evidence (``ArmStats`` per step and arm, and a 5 s time series) is written to
``rollouts/<model>/<rollout_id>/evidence/<consumer>.json`` every ``flush_s``; per-version counters and
histograms are on ``/metrics``. Nothing here is on the path when no rollout is active (one attribute read
per micro-batch).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Sequence

from tasks.contracts import layout
from tasks.contracts.rollout import (
    SERIES_BUCKET_S,
    SERIES_MAX_POINTS,
    ArmStats,
    RolloutState,
    candidate_lane,
    off_state,
    routes_to_candidate,
)
from tasks.contracts.serving import FRAME_ERROR

logger = logging.getLogger(__name__)

#: shadow micro-batches waiting for the candidate at most; more are skipped (counted) so the live path never waits
SHADOW_QUEUE = 4


def default_consumer_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


class RolloutRouter:
    """Follows one model's rollout state; see the module doc."""

    def __init__(self, model: str, *, store_factory: Callable[[], Any], backend_factory: Callable[[str], Any],
                 metrics: Any = None, consumer_id: str | None = None, poll_s: float = 1.0,
                 flush_s: float = 2.0, version_max_age_s: float = 0.25) -> None:
        self.model = model
        self.lane = candidate_lane(model)
        self._store_factory = store_factory
        self._store: Any = None
        self._backend_factory = backend_factory
        self.metrics = metrics
        self.consumer_id = consumer_id or default_consumer_id()
        self.poll_s, self.flush_s = float(poll_s), float(flush_s)
        self.version_max_age_s = version_max_age_s
        self.state: RolloutState = off_state(model)
        self.active = False  # the one attribute the loop reads per batch
        self._candidate: Any = None  # the candidate lane's backend (TritonBackend of <model>_candidate)
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="rollout")
        self._shadow_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shadow")
        self._shadow_pending = 0
        self._lock = threading.Lock()
        # evidence of the current rollout: {step: {arm: ArmStats}}, {step: since}, series points
        self._evidence: dict[str, dict[str, ArmStats]] = {}
        self._since: dict[str, float] = {}
        self._series: list[dict[str, Any]] = []
        self._evidence_id = ""
        self._dirty = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._read_errors = 0
        self.produce: Callable[[list], Any] | None = None  # set by the loop: produce shadow predictions
        self.build_shadow: Callable[..., list] | None = None  # set by the loop: shadow prediction messages
        self.stats = {"shadow_skipped": 0, "shadow_failed": 0, "candidate_fallbacks": 0, "state_reads": 0}

    # ------------------------------------------------------------------ following the state
    def start(self) -> "RolloutRouter":
        self.refresh()
        self._thread = threading.Thread(target=self._run, name="rollout-state", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        last_flush = time.monotonic()
        while not self._stop.wait(self.poll_s):
            self.refresh()
            if time.monotonic() - last_flush >= self.flush_s:
                last_flush = time.monotonic()
                self.flush()

    def _read_state(self) -> RolloutState | None:
        from tasks.adapters.storage import ObjectNotFound

        if self._store is None:
            self._store = self._store_factory()
        try:
            obj = self._store.get_json(layout.rollout_state_key(self.model))
        except ObjectNotFound:
            return off_state(self.model)
        return RolloutState.model_validate(obj)

    def refresh(self) -> RolloutState:
        """Read the state now (the thread does it every ``poll_s``); an unreadable state keeps the last one."""
        try:
            state = self._read_state()
            self._read_errors = 0
        except Exception as exc:  # noqa: BLE001 - a store outage must not stop the stream: keep the last state
            self._read_errors += 1
            if self._read_errors == 1 or self._read_errors % 60 == 0:
                logger.warning("cannot read the rollout state of %s (%s): keeping %s mode", self.model, exc,
                               self.state.mode)
            return self.state
        self.stats["state_reads"] += 1
        if state is not None:
            self._apply(state)
        return self.state

    def _apply(self, state: RolloutState) -> None:
        old = self.state
        if state.active and (self._candidate is None or state.candidate != old.candidate):
            if self._candidate is None:
                self._candidate = self._backend_factory(self.lane)
        if state.rollout_id != self._evidence_id and state.rollout_id:
            self.flush()  # the previous rollout's last counts
            with self._lock:
                self._evidence, self._since, self._series = {}, {}, []
                self._evidence_id = state.rollout_id
        if state.active and state.step and state.step not in self._since:
            with self._lock:
                self._since[state.step] = time.time()
        self.state = state
        self.active = state.active and self._candidate is not None
        if (old.mode, old.share, old.candidate, old.step) != (state.mode, state.share, state.candidate, state.step):
            logger.info("rollout of %s: %s%s (champion v%s, candidate v%s, step %s)%s", self.model, state.mode,
                        f" {state.share:g}%" if state.mode == "canary" else "", state.champion or "?",
                        state.candidate or "-", state.step or "-",
                        f": {state.reason}" if state.reason else "")
        if self.metrics is not None:
            self.metrics.rollout_share.set(state.candidate_share() if self.active else 0.0)
            for mode in ("off", "shadow", "canary", "full"):
                self.metrics.rollout_mode.labels(mode).set(1.0 if mode == (state.mode if self.active else "off")
                                                          else 0.0)

    # ------------------------------------------------------------------ routing
    def route(self, records: Sequence[Any], good: Sequence[int], frame_ids: Sequence[str]) -> list[bool] | None:
        """Per frame of ``good``: True when the candidate answers it (canary / full); None: none does.

        The key is the device id (the Kafka key); a frame without one is split by its frame id."""
        state = self.state
        if not self.active or state.mode not in ("canary", "full"):
            return None
        share, salt = state.candidate_share(), state.rollout_id
        out = [routes_to_candidate(records[i].key or fid.encode(), share, salt) for i, fid in zip(good, frame_ids)]
        return out if any(out) else None

    def infer(self, champion: Any, frames: Sequence[bytes], route: list[bool] | None,
              ctx: dict[str, Any] | None = None) -> tuple[dict, float, Any]:
        """Outputs for ``frames``, the seconds it took, and the version(s): a str, or one per frame when split.

        Champion failures raise as usual (the loop holds, retries or bisects the batch); candidate failures
        fall back to the champion for those frames."""
        import numpy as np

        state = self.state
        t0 = time.perf_counter()
        if not route:
            out = champion.infer(frames)
            secs = time.perf_counter() - t0
            version = self._version(champion)
            self._observe("champion", version, out, secs, state)
            if state.mode == "shadow" and self.active and ctx is not None:
                self._shadow(frames, out, ctx, state, version)
            return out, secs, version
        cand_idx = [j for j, r in enumerate(route) if r]
        champ_idx = [j for j, r in enumerate(route) if not r]
        candidate = self._candidate
        fut = self._pool.submit(self._timed, candidate, [frames[j] for j in cand_idx])
        champ_out = champion.infer([frames[j] for j in champ_idx]) if champ_idx else None
        champ_s = time.perf_counter() - t0
        champ_version = self._version(champion)
        cand_version = state.candidate
        try:
            cand_out, cand_s = fut.result()
            cand_version = self._version(candidate) or state.candidate
        except Exception as exc:  # noqa: BLE001 - the candidate's frames go to the champion: nothing lost
            n_failed = len(cand_idx)
            self.stats["candidate_fallbacks"] += n_failed
            logger.warning("the rollout candidate v%s failed on %d frame(s) (%s): the champion answers them",
                           state.candidate, n_failed, exc)
            with self._lock:
                self._arm(state.step, "candidate").errors += n_failed
                self._dirty = True
            if self.metrics is not None:
                self.metrics.version_errors.labels(state.candidate or "?", "candidate").inc(n_failed)
            t1 = time.perf_counter()
            cand_out = champion.infer([frames[j] for j in cand_idx])
            cand_s = time.perf_counter() - t1
            cand_version = champ_version
            arm_of_cand = "champion"
        else:
            arm_of_cand = "candidate"
        if champ_out is not None:
            self._observe("champion", champ_version, champ_out, champ_s, state)
        self._observe(arm_of_cand, cand_version, cand_out, cand_s, state)
        if champ_out is None:
            out = cand_out
        else:
            order = np.argsort(np.asarray(champ_idx + cand_idx))
            out = {k: np.concatenate([champ_out[k], cand_out[k]])[order] for k in champ_out}
        versions = [cand_version if r else champ_version for r in route]
        return out, time.perf_counter() - t0, versions

    @staticmethod
    def _timed(backend: Any, frames: Sequence[bytes]) -> tuple[dict, float]:
        t0 = time.perf_counter()
        out = backend.infer(frames)
        return out, time.perf_counter() - t0

    def _version(self, backend: Any) -> str:
        try:
            return backend.model_version(max_age_s=self.version_max_age_s)
        except Exception:  # noqa: BLE001 - an unknown version never fails a batch
            return getattr(backend, "version", "") or ""

    # ------------------------------------------------------------------ shadow
    def _shadow(self, frames: Sequence[bytes], champ_out: dict, ctx: dict[str, Any], state: RolloutState,
                champ_version: str) -> None:
        with self._lock:
            if self._shadow_pending >= SHADOW_QUEUE:
                self.stats["shadow_skipped"] += 1
                return
            self._shadow_pending += 1
        try:
            self._shadow_pool.submit(self._shadow_call, list(frames), champ_out, ctx, state, champ_version)
        except RuntimeError:  # shut down
            with self._lock:
                self._shadow_pending -= 1

    def _shadow_call(self, frames: list[bytes], champ_out: dict, ctx: dict[str, Any], state: RolloutState,
                     champ_version: str) -> None:
        try:
            candidate = self._candidate
            if candidate is None:
                return
            try:
                out, secs = self._timed(candidate, frames)
            except Exception as exc:  # noqa: BLE001 - a failing shadow is evidence, never an outage
                self.stats["shadow_failed"] += len(frames)
                with self._lock:
                    self._arm(state.step, "candidate").errors += len(frames)
                    self._dirty = True
                if self.metrics is not None:
                    self.metrics.version_errors.labels(state.candidate or "?", "shadow").inc(len(frames))
                logger.debug("shadow call to v%s failed: %s", state.candidate, exc)
                return
            version = self._version(candidate) or state.candidate
            self._observe("candidate", version, out, secs, state, compare=champ_out)
            if self.build_shadow is not None and self.produce is not None:
                messages = self.build_shadow(ctx, out, version, secs)
                if messages:
                    self.produce(messages)
        except Exception as exc:  # noqa: BLE001 - never let a shadow failure escape into the pool silently
            logger.warning("shadow answer of %s failed: %s", self.model, exc)
        finally:
            with self._lock:
                self._shadow_pending -= 1

    # ------------------------------------------------------------------ evidence
    def _arm(self, step: str, arm: str) -> ArmStats:
        arms = self._evidence.setdefault(step or "-", {})
        if arm not in arms:
            arms[arm] = ArmStats()
        return arms[arm]

    def _observe(self, arm: str, version: str, out: dict, secs: float, state: RolloutState,
                 compare: dict | None = None) -> None:
        if self.metrics is not None:
            metric_arm = "shadow" if compare is not None else arm
            n_all = len(out.get("LABEL", ()))
            self.metrics.version_frames.labels(version or "?", metric_arm).inc(n_all)
            self.metrics.version_latency.labels(version or "?", metric_arm).observe(secs)
        if not state.active:
            return
        labels = out["LABEL"].reshape(-1).tolist()
        scores = out["SCORE"].reshape(-1).tolist()
        errs = out.get(FRAME_ERROR)
        bad = [bool(e) for e in errs.reshape(-1).tolist()] if errs is not None else [False] * len(labels)
        agree = compared = 0
        if compare is not None:
            theirs = compare["LABEL"].reshape(-1).tolist()
            their_errs = compare.get(FRAME_ERROR)
            their_bad = [bool(e) for e in their_errs.reshape(-1).tolist()] if their_errs is not None \
                else [False] * len(theirs)
            for mine, other, b1, b2 in zip(labels, theirs, bad, their_bad):
                if not (b1 or b2):
                    compared += 1
                    agree += int(mine == other)
            if self.metrics is not None and compared:
                self.metrics.shadow_agreement.labels(version or "?", "agree").inc(agree)
                self.metrics.shadow_agreement.labels(version or "?", "disagree").inc(compared - agree)
        ms = secs * 1000.0
        now = time.time()
        with self._lock:
            stats = self._arm(state.step, arm)
            n = 0
            conf = 0.0
            for label, score, b in zip(labels, scores, bad):
                if b:
                    stats.frame_errors += 1
                    continue
                n += 1
                conf += score
                key = str(label)
                stats.classes[key] = stats.classes.get(key, 0) + 1
            stats.n += n
            stats.conf_sum += conf
            stats.calls += 1
            stats.add_latency(ms, n)
            stats.agree += agree
            stats.compared += compared
            self._point(now, state.step, arm, n, conf, agree, compared)
            self._dirty = True

    def _point(self, now: float, step: str, arm: str, n: int, conf: float, agree: int, compared: int) -> None:
        t = int(now // SERIES_BUCKET_S * SERIES_BUCKET_S)
        if self._series and self._series[-1]["t"] == t and self._series[-1]["arm"] == arm:
            p = self._series[-1]
        else:
            p = next((q for q in reversed(self._series[-4:]) if q["t"] == t and q["arm"] == arm), None)
            if p is None:
                p = {"t": t, "step": step, "arm": arm, "n": 0, "conf_sum": 0.0, "agree": 0, "compared": 0}
                self._series.append(p)
                if len(self._series) > SERIES_MAX_POINTS:
                    del self._series[: len(self._series) - SERIES_MAX_POINTS]
        p["n"] += n
        p["conf_sum"] = round(p["conf_sum"] + conf, 6)
        p["agree"] += agree
        p["compared"] += compared

    def evidence(self) -> dict[str, Any]:
        with self._lock:
            return {"rollout_id": self._evidence_id, "consumer": self.consumer_id, "model": self.model,
                    "updated_at": time.time(),
                    "steps": {step: {"since": self._since.get(step), "arms": {a: s.to_dict() for a, s in arms.items()}}
                              for step, arms in self._evidence.items()},
                    "series": [dict(p) for p in self._series], "stats": dict(self.stats)}

    def flush(self) -> bool:
        """Write this consumer's evidence of the current rollout (when something changed); False on failure."""
        if not self._evidence_id or not self._dirty:
            return True
        body = self.evidence()
        try:
            if self._store is None:
                self._store = self._store_factory()
            self._store.put_json(layout.rollout_evidence_key(self.model, self._evidence_id, self.consumer_id), body)
            self._dirty = False
            return True
        except Exception as exc:  # noqa: BLE001 - retried at the next flush
            logger.warning("cannot write the rollout evidence of %s: %s", self.model, exc)
            return False

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._shadow_pool.shutdown(wait=False, cancel_futures=True)
        self._pool.shutdown(wait=False, cancel_futures=True)
        self.flush()
        close = getattr(self._candidate, "close", None)
        if close is not None:
            close()
