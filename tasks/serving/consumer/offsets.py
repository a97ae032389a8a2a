"""Offset tracking: which offsets of ``frames`` may be committed, and which must be read again.

Offsets are ``{(topic, partition): next offset to read}``. A polled micro-batch is ``take``-n in
hand in poll order; it becomes committable only when ``confirm``-ed (both sinks hold it: its
predictions and dead letters acknowledged by Kafka, its points upserted to Qdrant) *and* every batch
taken before it is confirmed too. So a batch held by a failed Triton call (or a sink that keeps
failing) holds back every later batch: the committed offset of a partition never passes a frame
that is not in both sinks. ``due()`` is what may be committed now, ``committed(offsets)`` records a
successful commit, ``revoke(partitions)`` is the part of ``due()`` to commit before partitions move
to another member (it forgets them: the batches in hand never commit their offsets of them), ``final()`` everything confirmed (committed again synchronously at shutdown).
Frames fetched while fetching is paused are not processed: ``refetched`` notes the first of them per
partition and ``take_rewind`` hands those offsets to seek back to on resume.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterable, Mapping

if TYPE_CHECKING:  # pragma: no cover
    from tasks.adapters.kafka import Record

TP = tuple[str, int]
Offsets = dict[TP, int]


def next_offsets(records: Iterable["Record"]) -> Offsets:
    """Per partition, one past the highest offset among ``records``."""
    out: Offsets = {}
    for r in records:
        key = (r.topic, r.partition)
        if r.offset + 1 > out.get(key, -1):
            out[key] = r.offset + 1
    return out


class OffsetTracker:
    def __init__(self) -> None:
        self._seq = 0
        self._in_hand: dict[int, tuple[Offsets, bool]] = {}  # seq -> (offsets, confirmed); poll order
        self._due: Offsets = {}  # confirmed, not committed yet
        self._committed: Offsets = {}  # committed (asynchronously: maybe not acknowledged)
        self._rewind: Offsets = {}

    # ----------------------------------------------------------------- batches in hand
    def take(self, records: Iterable["Record"]) -> int:
        """A polled batch taken in hand; returns its ticket for ``confirm``."""
        self._seq += 1
        self._in_hand[self._seq] = (next_offsets(records), False)
        return self._seq

    def confirm(self, seq: int) -> None:
        """Both sinks hold batch ``seq``: its offsets are due once all batches before it are confirmed."""
        offsets, _ = self._in_hand[seq]
        self._in_hand[seq] = (offsets, True)
        for first in list(self._in_hand):  # release the confirmed prefix, in poll order
            offsets, done = self._in_hand[first]
            if not done:
                break
            del self._in_hand[first]
            self._due.update(offsets)

    @property
    def held(self) -> int:
        """Batches in hand that are not confirmed yet (holding back the offsets of any confirmed after them)."""
        return sum(1 for _, done in self._in_hand.values() if not done)

    # ----------------------------------------------------------------- commits
    def due(self) -> Offsets:
        """Confirmed offsets not committed yet (a copy)."""
        return dict(self._due)

    def committed(self, offsets: Mapping[TP, int]) -> None:
        """A commit of ``offsets`` (taken from ``due()`` or ``revoke()``) succeeded."""
        self._committed.update(offsets)
        for tp, off in offsets.items():
            if self._due.get(tp) == off:
                del self._due[tp]

    def revoke(self, partitions: Iterable[TP]) -> Offsets:
        """Partitions about to move to another member: their due offsets (commit them now), and everything else
        about them forgotten.

        Forgotten: their offsets in the batches still in hand (those frames are still written, the sinks are
        idempotent, but this member never commits past them: the new owner re-reads them from the commit made
        now), their committed offsets (should a partition come back, an old offset here must not be committed
        over the newer one of the member that had it meanwhile) and their offsets to re-read."""
        revoked = set(partitions)
        out = {tp: o for tp, o in self._due.items() if tp in revoked}
        for tp in revoked:
            self._due.pop(tp, None)
            self._committed.pop(tp, None)
            self._rewind.pop(tp, None)
            for offsets, _done in self._in_hand.values():
                offsets.pop(tp, None)
        return out

    def final(self) -> Offsets:
        """Every confirmed offset (committed or not): the synchronous commit at shutdown."""
        self._committed.update(self._due)
        return dict(self._committed)

    @property
    def last_committed(self) -> Offsets:
        return dict(self._committed)

    # ----------------------------------------------------------------- frames to read again
    def refetched(self, records: Iterable["Record"]) -> None:
        """Frames fetched while paused (before the pause took effect): re-read them after the resume."""
        for rec in records:
            key = (rec.topic, rec.partition)
            if rec.offset < self._rewind.get(key, 1 << 62):
                self._rewind[key] = rec.offset

    def take_rewind(self) -> Offsets:
        """The offsets to seek back to (and forget them)."""
        out, self._rewind = self._rewind, {}
        return out
