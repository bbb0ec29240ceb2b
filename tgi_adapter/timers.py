"""One heap of timers for every stream the shared reader serves. Pure: no clock, no I/O.

Each stream has a single timer that moves a lot: every data frame pushes its
token-idle limit further out. Moving a heap entry per frame would cost a
push per token, so the entry stays where it is and the stream keeps its
*current* limit itself; when the entry comes due, the owner checks that limit
and arms a new entry if the limit moved. The heap therefore sees one push per
timer period, not one per token.
"""

from __future__ import annotations

import heapq
import itertools
from typing import Callable, List, Optional, Tuple

__all__ = ["Timer", "TimerHeap"]


class Timer:
    """A handle on one scheduled call; :meth:`cancel` makes it a no-op."""

    __slots__ = ("callback",)

    def __init__(self, callback: Callable[[], None]) -> None:
        self.callback: Optional[Callable[[], None]] = callback

    def cancel(self) -> None:
        self.callback = None

    @property
    def active(self) -> bool:
        return self.callback is not None


class TimerHeap:
    """Timers ordered by due time; ties keep their order of arrival."""

    __slots__ = ("_heap", "_order")

    def __init__(self) -> None:
        self._heap: List[Tuple[float, int, Timer]] = []
        self._order = itertools.count()

    def __len__(self) -> int:
        """Timers not yet run or cancelled (cancelled ones are dropped lazily)."""
        self._drop_cancelled()
        return len(self._heap)

    def add(self, due: float, callback: Callable[[], None]) -> Timer:
        timer = Timer(callback)
        heapq.heappush(self._heap, (due, next(self._order), timer))
        return timer

    def next_due(self) -> Optional[float]:
        """When the earliest live timer is due, or None if there is none."""
        self._drop_cancelled()
        return self._heap[0][0] if self._heap else None

    def pop_due(self, now: float) -> List[Callable[[], None]]:
        """Remove and return the callbacks of every live timer due at ``now`` or before, earliest first."""
        heap = self._heap
        out: List[Callable[[], None]] = []
        while heap and heap[0][0] <= now:
            timer = heapq.heappop(heap)[2]
            callback = timer.callback
            if callback is not None:
                timer.callback = None
                out.append(callback)
        return out

    def _drop_cancelled(self) -> None:
        heap = self._heap
        while heap and heap[0][2].callback is None:
            heapq.heappop(heap)
