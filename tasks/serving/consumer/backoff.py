"""Exponential backoff with jitter, for every retry of the consumer (Triton, Kafka writes, Qdrant, commits).

The n-th wait (n = 0, 1, ...) is drawn uniformly from ``[(1 - jitter) * b_n, b_n]`` where
``b_0 = initial`` and ``b_(n+1) = min(2 * b_n, cap)``: never longer than the un-jittered schedule,
so the caps (``--backoff-max``) and the drain deadline hold as before, while replicas that failed
together (a broker outage) do not retry in lock-step. The caller keeps the drain deadline: it stops
waiting once a stop request's budget is spent, whatever the backoff says.
"""

from __future__ import annotations

import random


class Backoff:
    """``next()`` is the next wait in seconds; one instance per retried operation."""

    __slots__ = ("_base", "_rng", "attempts", "initial_s", "jitter", "max_s")

    def __init__(self, initial_s: float, max_s: float, jitter: float = 0.5, rng: random.Random | None = None) -> None:
        if not 0.0 <= jitter <= 1.0:
            raise ValueError(f"backoff jitter must be within 0..1, got {jitter}")
        self.initial_s = initial_s
        self.max_s = max_s
        self.jitter = jitter
        self.attempts = 0
        self._base = initial_s
        self._rng = rng if rng is not None else random.Random()

    @property
    def base(self) -> float:
        """The un-jittered upper bound of the next wait."""
        return self._base

    def next(self) -> float:
        base = self._base
        self._base = min(base * 2, self.max_s)
        self.attempts += 1
        return base * (1.0 - self.jitter * self._rng.random())


def bounds(initial_s: float, max_s: float, jitter: float, n: int) -> tuple[float, float]:
    """The interval the n-th wait (from 0) of ``Backoff(initial_s, max_s, jitter)`` lies in."""
    base = initial_s
    for _ in range(n):
        base = min(base * 2, max_s)
    return base * (1.0 - jitter), base
