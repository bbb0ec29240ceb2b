"""The pure parts of :class:`~tgi_adapter.AdapterHost`: a circuit breaker and the replica choice.

No locks, no clock of their own and no I/O: the caller passes ``now`` and
serialises the calls, so every transition can be tested to the exact second.
"""

from __future__ import annotations

import enum
import math
from typing import Optional, Sequence, Tuple

__all__ = ["BreakerState", "CircuitBreaker", "Outcome", "choose_replica"]


class BreakerState(str, enum.Enum):
    """Where a replica's breaker stands."""

    CLOSED = "closed"
    """Tasks flow; consecutive failures are counted."""
    OPEN = "open"
    """The replica is kept out until the cooling period has passed."""
    HALF_OPEN = "half_open"
    """Cooled down: one trial task may go through, and its outcome decides."""

    def __str__(self) -> str:
        return self.value


class Outcome(str, enum.Enum):
    """How one attempt on a replica went, as far as the breaker is concerned."""

    SUCCESS = "success"
    """The replica emitted ``started``."""
    FAILURE = "failure"
    """A retriable error before ``started`` (or ``submit`` raised a retriable error)."""
    NEUTRAL = "neutral"
    """Says nothing about the replica: cancelled, abandoned, or a non-retriable error about the task."""


Transition = Tuple[BreakerState, BreakerState]


class CircuitBreaker:
    """Consecutive failures open it; after ``cooldown_s`` one trial decides.

    - closed: :data:`Outcome.FAILURE` counts, :data:`Outcome.SUCCESS` resets
      the count; ``failure_threshold`` consecutive failures open the breaker.
    - open: nothing is admitted until ``cooldown_s`` has passed since it opened;
      then it is half-open.
    - half-open: :meth:`acquire` admits one trial; its success closes the
      breaker, its failure opens it again for another ``cooldown_s``, and a
      neutral outcome frees the trial for the next task.

    Outcomes of attempts admitted before the breaker opened are ignored while
    it is open or half-open: only the trial decides.
    """

    __slots__ = ("failure_threshold", "cooldown_s", "failures", "_opened_at", "_trial")

    def __init__(self, failure_threshold: int = 5, cooldown_s: float = 30.0) -> None:
        check_breaker_settings(failure_threshold, cooldown_s)
        self.failure_threshold = failure_threshold
        self.cooldown_s = float(cooldown_s)
        #: Consecutive failures counted while closed.
        self.failures = 0
        self._opened_at: Optional[float] = None
        self._trial = False

    def __repr__(self) -> str:
        return f"<CircuitBreaker failures={self.failures} opened_at={self._opened_at} trial={self._trial}>"

    def state(self, now: float) -> BreakerState:
        """The state at time ``now``."""
        if self._opened_at is None:
            return BreakerState.CLOSED
        if now - self._opened_at < self.cooldown_s:
            return BreakerState.OPEN
        return BreakerState.HALF_OPEN

    def admits(self, now: float) -> bool:
        """Whether :meth:`acquire` would admit a task now (without taking the trial)."""
        state = self.state(now)
        return state is BreakerState.CLOSED or (state is BreakerState.HALF_OPEN and not self._trial)

    def acquire(self, now: float) -> Optional[bool]:
        """Admit one attempt: ``False`` (a normal one), ``True`` (the half-open trial) or ``None`` (refused)."""
        state = self.state(now)
        if state is BreakerState.CLOSED:
            return False
        if state is BreakerState.HALF_OPEN and not self._trial:
            self._trial = True
            return True
        return None

    def retry_in(self, now: float) -> Optional[float]:
        """Seconds until an open breaker turns half-open; ``None`` unless open."""
        if self.state(now) is not BreakerState.OPEN:
            return None
        assert self._opened_at is not None
        return max(0.0, self._opened_at + self.cooldown_s - now)

    def record(self, outcome: Outcome, now: float, trial: bool) -> Optional[Transition]:
        """Take the outcome of an attempt admitted by :meth:`acquire`; returns ``(old, new)`` on a change."""
        before = self.state(now)
        if trial:
            self._trial = False
            if outcome is Outcome.SUCCESS:
                self._close()
            elif outcome is Outcome.FAILURE:
                self._opened_at = now
        elif before is BreakerState.CLOSED:
            if outcome is Outcome.SUCCESS:
                self.failures = 0
            elif outcome is Outcome.FAILURE:
                self.failures += 1
                if self.failures >= self.failure_threshold:
                    self._opened_at = now
        after = self.state(now)
        return None if after is before else (before, after)

    def _close(self) -> None:
        self._opened_at = None
        self.failures = 0


def check_breaker_settings(failure_threshold: int, cooldown_s: float) -> None:
    """Raise ``ValueError`` unless the threshold is an integer >= 1 and the cooldown a number >= 0."""
    if isinstance(failure_threshold, bool) or not isinstance(failure_threshold, int) or failure_threshold < 1:
        raise ValueError(f"failure_threshold must be an integer >= 1, got {failure_threshold!r}")
    if (
        isinstance(cooldown_s, bool)
        or not isinstance(cooldown_s, (int, float))
        or not math.isfinite(cooldown_s)
        or cooldown_s < 0
    ):
        raise ValueError(f"cooldown_s must be a number of seconds >= 0, got {cooldown_s!r}")


def choose_replica(candidates: Sequence[Tuple[int, int]], last: Optional[int]) -> int:
    """Pick among ``(position, free_slots)`` pairs; returns an index into ``candidates``.

    The most free slots wins. Ties go round-robin by position: the first tied
    position after ``last`` (the position picked last time), wrapping around.
    """
    if not candidates:
        raise ValueError("no candidates to choose from")
    best = max(free for _position, free in candidates)
    tied = sorted((position, index) for index, (position, free) in enumerate(candidates) if free == best)
    if last is not None:
        for position, index in tied:
            if position > last:
                return index
    return tied[0][1]
