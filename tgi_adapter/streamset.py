"""``StreamSet``: one thread consumes many streams.

An orchestrator with one dispatch loop adds every stream it submitted (from
any mix of ``TgiHttpAdapter``, ``AdapterHost`` and ``MockAdapter``) and
takes whatever is ready across all of them with :meth:`StreamSet.poll`, or
iterates the set until every stream has ended. Whoever puts a stream's
events (the shared reader, mostly) also drops the stream on the set's ready
queue, once until the set has taken what is there: the set's thread sleeps
until some stream has something, and never looks at the idle ones.

Each stream's events keep the contract's order and rules (``started`` once,
token indices, exactly one terminal event, the cancelled tail). A stream in
a set is consumed only through the set: iterating it directly raises
``ValueError``.
"""

from __future__ import annotations

import heapq
import itertools
import queue
import time
from typing import Iterable, Iterator, List, Optional, Set, Tuple

from .events import TokenEvent
from .stream import TokenStream

__all__ = ["StreamSet"]

Ready = Tuple[TokenStream, TokenEvent]


class _Member:
    """A stream in the set, and whether it already waits on the ready queue."""

    __slots__ = ("stream", "queued", "_ready")

    def __init__(self, stream: TokenStream, ready: queue.SimpleQueue[_Member]) -> None:
        self.stream = stream
        self.queued = False
        self._ready = ready

    def notify(self) -> None:
        # Called by whichever thread put events. The set clears ``queued``
        # before it takes the stream's events, so a put after that queues again.
        if not self.queued:
            self.queued = True
            self._ready.put(self)


class StreamSet:
    """Consume many streams from one thread.

    :param streams: streams to :meth:`add` right away.

    ``len(s)`` counts the streams whose terminal event has not been handed
    out yet. Use it as a context manager to cancel (and release) what is
    still open on exit.
    """

    def __init__(self, streams: Iterable[TokenStream] = ()) -> None:
        self._ready: queue.SimpleQueue[_Member] = queue.SimpleQueue()
        self._open: Set[TokenStream] = set()
        # (when the stream's reader is overdue, order, member): the guard against a reader gone silent.
        self._overdue: List[Tuple[float, int, _Member]] = []
        self._order = itertools.count()
        for stream in streams:
            self.add(stream)

    def __repr__(self) -> str:
        return f"<StreamSet open={len(self._open)}>"

    def __len__(self) -> int:
        return len(self._open)

    def add(self, stream: TokenStream) -> None:
        """Consume ``stream`` through this set from now on.

        Raises ``TypeError`` for something that is not a ``TokenStream`` and
        ``ValueError`` for a stream already in a set. A finished stream is
        accepted and contributes nothing.
        """
        if not isinstance(stream, TokenStream):
            raise TypeError(f"StreamSet takes TokenStream objects, got {type(stream).__name__}")
        member = _Member(stream, self._ready)
        stream._claim(self, member.notify)
        if not stream.finished:
            self._open.add(stream)
            heapq.heappush(self._overdue, (stream._deadline_with_grace, next(self._order), member))

    def poll(self, timeout: Optional[float] = None) -> List[Ready]:
        """Every ``(stream, event)`` ready now, in each stream's order.

        Waits up to ``timeout`` seconds (``None``: until something is ready)
        for at least one; returns ``[]`` on timeout or when no stream is open.
        """
        out: List[Ready] = []
        if not self._open:
            return out
        ready = self._ready
        give_up = None if timeout is None else time.monotonic() + max(0.0, timeout)
        while True:
            wait = self._wait(give_up)
            try:
                first = ready.get(timeout=wait) if wait is None or wait > 0 else ready.get_nowait()
            except queue.Empty:
                self._take_overdue(out)
                if out or (give_up is not None and time.monotonic() >= give_up):
                    return out
                continue
            self._take(first, out)
            while True:
                try:
                    member = ready.get_nowait()
                except queue.Empty:
                    break
                self._take(member, out)
            if out or not self._open:
                return out

    def __iter__(self) -> Iterator[Ready]:
        """``(stream, event)`` pairs as they come, until every stream in the set has ended."""
        while self._open:
            yield from self.poll()

    def cancel_all(self) -> None:
        """Cancel every open stream: each still hands out its ``end`` "cancelled" through the set."""
        for stream in list(self._open):
            stream.cancel()

    def __enter__(self) -> StreamSet:
        return self

    def __exit__(self, *exc: object) -> None:
        for stream in list(self._open):
            stream.close()

    # -- internals --------------------------------------------------------------------

    def _take(self, member: _Member, out: List[Ready]) -> None:
        member.queued = False
        stream = member.stream
        events: List[TokenEvent] = []
        stream._take_ready(events)
        out.extend((stream, event) for event in events)
        if stream.finished:
            self._open.discard(stream)

    def _wait(self, give_up: Optional[float]) -> Optional[float]:
        """How long to wait now: until ``give_up``, and no later than the first reader that may be overdue."""
        heap = self._overdue
        while heap and heap[0][2].stream.finished:
            heapq.heappop(heap)
        limits = [t for t in (give_up, heap[0][0] if heap else None) if t is not None]
        if not limits:
            return None
        return max(0.0, min(limits) - time.monotonic())

    def _take_overdue(self, out: List[Ready]) -> None:
        """Streams whose reader stayed silent past their deadline end with DEADLINE_UNMET."""
        heap = self._overdue
        now = time.monotonic()
        while heap and heap[0][0] <= now:
            member = heapq.heappop(heap)[2]
            stream = member.stream
            if stream.finished:
                continue
            self._take(member, out)  # whatever did arrive comes first
            if not stream.finished:
                out.append((stream, stream._reader_lost()))
                self._open.discard(stream)
