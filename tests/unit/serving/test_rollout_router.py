"""The consumer's rollout router with fake backends (our own InferenceBackend Protocol) and a local store."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from tasks.adapters.storage import LocalStore
from tasks.contracts import layout
from tasks.contracts.rollout import RolloutState
from tasks.serving.consumer.rollout import RolloutRouter


class FakeBackend:
    """Answers class ``label`` for every frame (``fail``: raises); records the frames it saw."""

    def __init__(self, label: int, version: str, fail: bool = False) -> None:
        self.label, self.version, self.fail, self.seen = label, version, fail, []

    def infer(self, frames):
        if self.fail:
            raise RuntimeError("candidate lane down")
        self.seen.extend(frames)
        n = len(frames)
        return {"LABEL": np.full((n, 1), self.label, np.int64), "SCORE": np.full((n, 1), 0.9, np.float32),
                "FRAME_ERROR": np.array([[b""]] * n, dtype=object),
                "ROW": np.array([[f[0]] for f in frames], np.int64)}

    def model_version(self, max_age_s: float = 0.0) -> str:
        return self.version


@dataclass
class Rec:
    key: bytes


def _router(tmp_path, candidate: FakeBackend) -> tuple[RolloutRouter, LocalStore]:
    store = LocalStore(tmp_path / "store")
    router = RolloutRouter("m", store_factory=lambda: store, backend_factory=lambda lane: candidate,
                           consumer_id="c1", poll_s=0.05, flush_s=0.05)
    return router, store


def _state(store, **kw) -> None:
    store.put_json(layout.rollout_state_key("m"), RolloutState(model="m", champion="1", candidate="2",
                                                               rollout_id="r1", **kw).model_dump())


def test_canary_splits_by_device_merges_in_order_and_names_each_version(tmp_path):
    cand = FakeBackend(7, "2")
    router, store = _router(tmp_path, cand)
    _state(store, mode="canary", share=50, step="canary-50")
    router.refresh()
    records = [Rec(f"cam-{i % 10}".encode()) for i in range(40)]
    route = router.route(records, list(range(40)), [f"f{i}" for i in range(40)])
    assert route is not None and 0 < sum(route) < 40
    frames = [bytes([i]) for i in range(40)]
    out, _, versions = router.infer(FakeBackend(1, "1"), frames, route)
    assert out["ROW"].reshape(-1).tolist() == list(range(40))  # back in the frames' order
    assert versions == ["2" if r else "1" for r in route]
    assert [int(x) for x in out["LABEL"].reshape(-1)] == [7 if r else 1 for r in route]
    assert router.flush()
    ev = store.get_json(layout.rollout_evidence_key("m", "r1", "c1"))
    arms = ev["steps"]["canary-50"]["arms"]
    assert arms["candidate"]["n"] == sum(route) and arms["champion"]["n"] == 40 - sum(route)


def test_a_failing_candidate_falls_back_to_the_champion_and_counts_errors(tmp_path):
    router, store = _router(tmp_path, FakeBackend(7, "2", fail=True))
    _state(store, mode="canary", share=100, step="canary-100")
    router.refresh()
    champ = FakeBackend(1, "1")
    out, _, versions = router.infer(champ, [b"a", b"b"], [True, True])
    assert versions == ["1", "1"] and len(champ.seen) == 2
    assert router.evidence()["steps"]["canary-100"]["arms"]["candidate"]["errors"] == 2


def test_shadow_answers_go_to_the_shadow_sink_and_agreement_is_counted(tmp_path):
    router, store = _router(tmp_path, FakeBackend(1, "2"))
    produced: list = []
    router.produce = produced.extend
    router.build_shadow = lambda ctx, out, version, secs: [("shadow", version, n) for n in range(len(out["LABEL"]))]
    _state(store, mode="shadow", step="shadow")
    router.refresh()
    assert router.route([Rec(b"cam")], [0], ["f"]) is None  # shadow answers nobody
    out, _, version = router.infer(FakeBackend(1, "1"), [b"x"] * 5, None, ctx={"records": [], "good": [],
                                                                                "frame_ids": []})
    assert version == "1"
    deadline = time.monotonic() + 5
    while len(produced) < 5 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert produced == [("shadow", "2", n) for n in range(5)]
    cand = router.evidence()["steps"]["shadow"]["arms"]["candidate"]
    assert (cand["agree"], cand["compared"]) == (5, 5)


def test_the_kill_switch_is_followed_within_the_poll_interval(tmp_path):
    router, store = _router(tmp_path, FakeBackend(7, "2"))
    _state(store, mode="canary", share=100, step="canary-100")
    router.start()
    try:
        assert router.active
        store.put_json(layout.rollout_state_key("m"), RolloutState(model="m", champion="1", mode="off",
                                                                   killed={"by": "t"}).model_dump())
        t0 = time.monotonic()
        while router.active and time.monotonic() - t0 < 2:
            time.sleep(0.01)
        assert not router.active and time.monotonic() - t0 < 1.0
        assert router.route([Rec(b"cam")], [0], ["f"]) is None
    finally:
        router.close()


def test_an_unreadable_state_keeps_the_last_one(tmp_path):
    router, store = _router(tmp_path, FakeBackend(7, "2"))
    _state(store, mode="canary", share=100, step="canary-100")
    router.refresh()
    (tmp_path / "store" / layout.rollout_state_key("m")).write_text("{not json")
    router.refresh()
    assert router.active and router.state.share == 100
