"""The offset tracker: only confirmed batches are committable, in poll order, never past a held batch."""

from __future__ import annotations

from tasks.serving.consumer import OffsetTracker
from tasks.serving.consumer.offsets import next_offsets
from tests.unit.serving.fakes import frame

T = "frames"


def recs(partition: int, *offsets: int):
    return [frame(T, partition, o) for o in offsets]


def test_next_offsets_is_one_past_the_highest_per_partition():
    assert next_offsets(recs(0, 3, 1, 2) + recs(1, 7)) == {(T, 0): 4, (T, 1): 8}
    assert next_offsets([]) == {}


def test_a_batch_is_due_only_once_confirmed():
    t = OffsetTracker()
    a = t.take(recs(0, 0, 1) + recs(1, 0))
    assert t.due() == {} and t.held == 1
    t.confirm(a)
    assert t.due() == {(T, 0): 2, (T, 1): 1} and t.held == 0
    t.committed(t.due())
    assert t.due() == {} and t.last_committed == {(T, 0): 2, (T, 1): 1}


def test_a_held_batch_holds_back_every_later_one():
    t = OffsetTracker()
    first, held, later, last = (t.take(recs(0, o)) for o in range(4))
    t.confirm(first)
    t.confirm(later)
    t.confirm(last)
    assert t.due() == {(T, 0): 1}  # not past the held batch at offset 1
    assert t.held == 1
    assert t.final() == {(T, 0): 1}  # shutting down with the batch still held: it is redelivered
    t.confirm(held)
    assert t.due() == {(T, 0): 4} and t.held == 0


def test_order_is_per_poll_not_per_confirmation():
    t = OffsetTracker()
    a = t.take(recs(0, 0, 1))
    b = t.take(recs(1, 0, 1, 2))
    t.confirm(b)
    assert t.due() == {}  # batch a (another partition, polled first) is not confirmed yet
    t.confirm(a)
    assert t.due() == {(T, 0): 2, (T, 1): 3}


def test_committing_a_snapshot_keeps_what_was_confirmed_after_it():
    t = OffsetTracker()
    t.confirm(t.take(recs(0, 0)))
    snapshot = t.due()
    t.confirm(t.take(recs(0, 1) + recs(1, 0)))  # confirmed while the commit of the snapshot was in flight
    t.committed(snapshot)
    assert t.due() == {(T, 0): 2, (T, 1): 1}
    assert t.last_committed == {(T, 0): 1}


def test_revoked_partitions_hand_over_their_due_offsets():
    t = OffsetTracker()
    t.confirm(t.take(recs(0, 0, 1) + recs(1, 0) + recs(2, 0, 1, 2)))
    gone = t.revoke([(T, 0), (T, 2), (T, 9)])
    assert gone == {(T, 0): 2, (T, 2): 3}
    assert t.due() == {(T, 1): 1}  # the revoked ones are the caller's to commit now, and forgotten here
    assert t.revoke([(T, 0)]) == {}


def test_batches_in_hand_never_commit_a_revoked_partition():
    """A batch in hand when its partition moves (cooperative-sticky: a member joined) is still finished, but its
    offsets of that partition must not be committed later: the new owner re-reads from the revoke's commit, and
    when the partition comes back an old offset must not go over the newer one committed meanwhile."""
    t = OffsetTracker()
    t.confirm(t.take(recs(0, 0) + recs(1, 0)))
    t.committed(t.due())  # (T,0): 1, (T,1): 1
    held = t.take(recs(0, 1, 2) + recs(1, 1))  # in hand (at Triton) when partition 0 is revoked
    t.refetched(recs(0, 3))
    assert t.revoke([(T, 0)]) == {}
    t.confirm(held)
    assert t.due() == {(T, 1): 2}
    assert t.take_rewind() == {}
    assert t.final() == {(T, 1): 2}  # no stale (T,0) at shutdown either
    t.confirm(t.take(recs(0, 40)))  # partition 0 back, from the group's (newer) offset
    assert t.due()[(T, 0)] == 41


def test_final_is_everything_confirmed():
    t = OffsetTracker()
    t.confirm(t.take(recs(0, 0)))
    t.committed(t.due())
    t.confirm(t.take(recs(0, 1) + recs(1, 0)))
    t.take(recs(0, 2))  # in hand, never confirmed
    assert t.final() == {(T, 0): 2, (T, 1): 1}


def test_frames_fetched_while_paused_are_rewound_to_the_first():
    t = OffsetTracker()
    t.refetched(recs(0, 5, 6) + recs(1, 3))
    t.refetched(recs(0, 4, 7))
    assert t.take_rewind() == {(T, 0): 4, (T, 1): 3}
    assert t.take_rewind() == {}
    t.refetched([])
    assert t.take_rewind() == {}
