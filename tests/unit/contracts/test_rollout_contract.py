"""The rollout contract: the split, the state's checks, the evidence counters and the judgement."""

from __future__ import annotations

import pytest

from tasks.contracts.rollout import ArmStats, RolloutState, check_share, routes_to_candidate, total_variation
from tasks.steps.rollout import RolloutRefused, Step, Thresholds, judge, parse_steps


def test_the_split_is_stable_per_device_close_to_the_share_and_salted_per_rollout():
    devices = [f"cam-{i}".encode() for i in range(4000)]
    picked = [d for d in devices if routes_to_candidate(d, 10, "r1")]
    assert 0.08 < len(picked) / len(devices) < 0.12
    assert picked == [d for d in devices if routes_to_candidate(d, 10, "r1")]  # a restart splits alike
    assert set(picked) <= {d for d in devices if routes_to_candidate(d, 50, "r1")}  # a growing share keeps them
    assert picked != [d for d in devices if routes_to_candidate(d, 10, "r2")]  # another rollout, other devices
    assert not any(routes_to_candidate(d, 0, "r1") for d in devices[:50])
    assert all(routes_to_candidate(d, 100, "r1") for d in devices[:50])


@pytest.mark.parametrize("bad", [-1, 100.5, "ten", float("nan"), None])
def test_a_share_outside_0_to_100_is_refused_by_name(bad):
    with pytest.raises(ValueError, match="0..100"):
        check_share(bad)
    with pytest.raises(Exception, match="0..100"):
        RolloutState(model="m", mode="canary", share=bad, candidate="2")


def test_steps_are_checked():
    assert [s.name for s in parse_steps("shadow, 10,50%,100")] == ["shadow", "canary-10", "canary-50", "canary-100"]
    for text, words in (("shadow,50", "must be 100"), ("10,5,100", "must not go down"), ("0,100", "tests nothing"),
                        ("shadow,200", "0..100"), ("", "no rollout steps")):
        with pytest.raises(RolloutRefused, match=words):
            parse_steps(text)


def test_evidence_counters_merge_and_give_p95_and_shares():
    a, b = ArmStats(), ArmStats()
    a.n, a.classes, a.conf_sum, a.agree, a.compared = 90, {"1": 60, "2": 30}, 81.0, 80, 90
    for _ in range(90):
        a.add_latency(4)
    b.n, b.classes, b.conf_sum, b.errors = 10, {"2": 10}, 9.0, 2
    for _ in range(10):
        b.add_latency(300)
    m = ArmStats.from_dict(a.merge(b).to_dict())
    assert m.n == 100 and m.classes == {"1": 60, "2": 40} and m.errors == 2
    assert m.p95_ms() == 400 and a.p95_ms() == 5
    assert m.agreement == pytest.approx(80 / 90) and m.mean_confidence == pytest.approx(0.9)
    assert m.error_rate == pytest.approx(2 / 102)
    assert total_variation({"1": 0.6, "2": 0.4}, {"1": 0.6, "2": 0.4}) == 0
    assert total_variation({"1": 1.0}, {"2": 1.0}) == 1


def _arm(n: int, classes: dict[str, int], conf: float, agree: int | None = None, ms: float = 5) -> ArmStats:
    s = ArmStats(n=n, classes=classes, conf_sum=conf * n)
    if agree is not None:
        s.agree, s.compared = agree, n
    for _ in range(n):
        s.add_latency(ms)
    return s


def test_judge_names_each_failing_check():
    th = Thresholds(min_frames=100)
    champ = _arm(500, {"1": 250, "7": 250}, 0.9)
    good = judge(Step("shadow", "shadow", 0), champ, _arm(500, {"1": 250, "7": 250}, 0.89, agree=495), th)
    assert all(c["ok"] for c in good), good
    bad = _arm(500, {"1": 50, "7": 450}, 0.6, agree=200, ms=900)
    bad.errors = 40
    failed = {c["check"] for c in judge(Step("shadow", "shadow", 0), champ, bad, th) if not c["ok"]}
    assert failed == {"agreement", "class_shift", "confidence_drop", "error_rate", "p95_latency_ms"}
    few = {c["check"] for c in judge(Step("canary-10", "canary", 10), champ, _arm(20, {"1": 20}, 0.9), th)
           if not c["ok"]}
    assert "frames" in few and "agreement" not in {c["check"] for c in judge(Step("c", "canary", 10), champ,
                                                                              _arm(500, {"1": 500}, 0.9), th)}
    labelled = _arm(500, {"1": 250, "7": 250}, 0.9)
    labelled.labelled, labelled.correct = 100, 70
    champ.labelled, champ.correct = 100, 98
    assert "accuracy_drop" in {c["check"] for c in judge(Step("c", "canary", 50), champ, labelled, th) if not c["ok"]}
