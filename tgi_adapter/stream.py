"""The consumer's side of a stream: ``TokenStream`` and the channel that feeds it.

Whatever reads the engine (the shared reader, a fallback thread, a mock)
puts *batches* of events (all the events one network read produced) on the
channel's ``SimpleQueue``; the consumer pops a batch and hands its events out
one by one, so the queue is touched once per read, not once per token.

Cancellation is a flag the consumer checks before it hands out each event,
plus whatever the reader registered to stop at once (shutting its socket
down). After ``cancel()`` or ``close()`` returns, no further token is handed
out, and whichever thread iterates, now or later, gets ``started`` (if not
yet given) and exactly one terminal event: ``end`` "cancelled". ``close()``
never takes events itself, so it can race an iterating thread safely.

A task is over for the metrics when both sides are done: the consumer (its
terminal event handed out, or the stream closed) and the reader (its last
byte read or its socket closed), so what the wire carried is counted even
for a task cancelled mid-stream.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

from .errors import DeadlineUnmetError, WorkerError
from .events import TokenEvent, cancelled_end, make_event

__all__ = ["TokenStream", "StreamChannel"]

log = logging.getLogger(__name__)

_TOKEN = "token"
_TERMINAL = frozenset({"end", "error"})
# How much longer than the task's deadline the consumer waits for the reader
# before giving up on it: the reader enforces every timer itself, this only
# guards against a reader stuck somewhere no timeout reaches (DNS, say).
_GRACE_S = 2.0


class StreamChannel:
    """State shared by a stream's reader and its consumer.

    The reader calls :meth:`put` with lists of events, ends with a list whose
    last event is terminal, and then calls :meth:`reader_finished`. Anyone may
    call :meth:`cancel`. ``notify`` (if set) is called after every put, from
    the putting thread: a :class:`~tgi_adapter.StreamSet` or a forwarding
    stream learns there is something to take without polling.
    """

    __slots__ = (
        "queue",
        "cancelled",
        "abort",
        "_closers",
        "_lock",
        "task_id",
        "stats",
        "notify",
        "on_settled",
        "_pending_parts",
        "natural_end",
        "reader_done",
        "_consumer_done",
    )

    def __init__(self, task_id: str) -> None:
        self.task_id = task_id
        #: What the reader learned, for the task's log record and metrics.
        self.stats: Dict[str, Any] = {"retries": 0}
        self.queue: queue.SimpleQueue[List[TokenEvent]] = queue.SimpleQueue()
        self.cancelled = False
        #: Set on cancel; a blocking reader waits on it instead of sleeping.
        self.abort = threading.Event()
        #: Set when the reader is done with the stream (last event put, socket released or closed).
        self.reader_done = threading.Event()
        self.notify: Optional[Callable[[], None]] = None
        #: Called once when both sides are done, with the channel.
        self.on_settled: Optional[Callable[[StreamChannel], None]] = None
        #: Whether the consumer's terminal event was the engine's own (not a cancellation).
        self.natural_end = False
        self._pending_parts = 2
        self._consumer_done = False
        self._closers: List[Callable[[], None]] = []
        self._lock = threading.Lock()

    def put(self, events: List[TokenEvent]) -> None:
        self.queue.put(events)
        notify = self.notify
        if notify is not None:
            notify()

    def on_cancel(self, closer: Callable[[], None]) -> Callable[[], None]:
        """Run ``closer`` at cancel (now, if already cancelled); returns an unregister function."""
        with self._lock:
            if not self.cancelled:
                self._closers.append(closer)
                return lambda: self._forget(closer)
        _run_quietly(closer)
        return lambda: None

    def _forget(self, closer: Callable[[], None]) -> None:
        with self._lock:
            try:
                self._closers.remove(closer)
            except ValueError:
                pass

    def cancel(self) -> bool:
        """Stop the stream; returns False if it was already cancelled."""
        with self._lock:
            if self.cancelled:
                return False
            self.cancelled = True
            closers, self._closers = self._closers, []
        self.abort.set()
        # Last registered first: the socket shutdowns (registered per attempt)
        # run before anything that may hand the interpreter to another thread,
        # so the engine hears of the cancel at once.
        for closer in reversed(closers):
            _run_quietly(closer)
        self.put([])  # wake a consumer blocked on an empty queue
        return True

    def abandon(self) -> None:
        """The stream object is gone without being finished: cancel, and count the consumer as done."""
        self.cancel()
        self.consumer_finished(False)

    def reader_finished(self) -> None:
        """The reader's last act: nothing more will be put, its connection is settled."""
        self._settle_part()
        self.reader_done.set()

    def consumer_finished(self, natural: bool) -> bool:
        """The consumer is done (terminal event handed out, or closed); False if it already was.

        ``natural``: the terminal event was the engine's own, not a cancellation.
        The first call wins, so ``close()`` racing the iterating thread counts once.
        """
        with self._lock:
            if self._consumer_done:
                return False
            self._consumer_done = True
            self.natural_end = natural
        self._settle_part()
        return True

    def _settle_part(self) -> None:
        with self._lock:
            self._pending_parts -= 1
            settled = self._pending_parts == 0
        if settled and self.on_settled is not None:
            self.on_settled(self)


def _run_quietly(fn: Callable[[], None]) -> None:
    try:
        fn()
    except Exception:  # a closer must never break cancel()
        log.debug("error while cancelling", exc_info=True)


class TokenStream:
    """An iterator of :class:`~tgi_adapter.TokenEvent` for one task.

    Events arrive as ``started``, ``token``…, optional ``metrics``, then one
    terminal ``end`` or ``error``. Use it as a context manager, or call
    :meth:`close` when done with it early. :meth:`collect` returns the text
    and the end data, or raises the stream's :class:`~tgi_adapter.WorkerError`.
    """

    def __init__(
        self,
        task_id: str,
        channel: StreamChannel,
        *,
        started_data: Dict[str, Any],
        deadline: float,
        on_done: Optional[Callable[[TokenStream], None]] = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.task_id = task_id
        self._channel = channel
        self._started_data = started_data
        self._deadline = deadline
        self._on_done = on_done
        self._clock = clock
        self._buf: List[TokenEvent] = []
        self._pos = 0
        self._started_given = False
        self._finished = False
        #: Set while a StreamSet (or a host's stream) consumes this stream; direct iteration is refused then.
        self._owner: Optional[object] = None
        self._held_back: List[TokenEvent] = []

    def __repr__(self) -> str:
        state = "finished" if self._finished else "cancelled" if self._channel.cancelled else "open"
        return f"<{type(self).__name__} task_id={self.task_id!r} {state}>"

    def __iter__(self) -> Iterator[TokenEvent]:
        return self

    def __next__(self) -> TokenEvent:
        pos = self._pos
        buf = self._buf
        if pos < len(buf):
            event = buf[pos]
            self._pos = pos + 1
            if event.kind is _TOKEN and not self._channel.cancelled:
                return event
            return self._deliver(event)
        return self._refill()

    def _refill(self) -> TokenEvent:
        if self._owner is not None:
            raise ValueError(f"stream {self.task_id!r} belongs to a StreamSet: take its events from the set")
        while True:
            if self._finished:
                raise StopIteration
            if self._channel.cancelled:
                return self._cancelled_tail()
            wait = self._deadline + _GRACE_S - self._clock()
            try:
                batch = self._channel.queue.get(timeout=max(0.0, wait))
            except queue.Empty:
                return self._reader_lost()
            if batch:
                self._buf = batch
                self._pos = 1
                return self._deliver(batch[0])

    def _claim(self, owner: object, notify: Callable[[], None]) -> None:
        """Hand this stream's events to ``owner`` (a StreamSet, a host stream): ``notify`` runs after each put.

        From then on ``owner`` takes them with :meth:`_take_ready`; iterating
        the stream directly raises ``ValueError``.
        """
        if self._owner is not None:
            raise ValueError(f"stream {self.task_id!r} already belongs to a StreamSet")
        self._owner = owner
        # Events already taken off the queue but not handed out go to the owner
        # first; none is left where a direct next() could still find it.
        if self._pos < len(self._buf):
            self._held_back = self._buf[self._pos :]
        self._buf, self._pos = [], 0
        self._channel.notify = notify
        notify()  # for whatever arrived before

    def _take_ready(self, out: List[TokenEvent]) -> None:
        """Append every event ready now, without waiting (the :class:`StreamSet` side of ``next()``)."""
        get = self._channel.queue.get_nowait
        if self._held_back:
            self._buf, self._pos, self._held_back = self._held_back, 0, []
        while not self._finished:
            pos = self._pos
            buf = self._buf
            if pos < len(buf):
                event = buf[pos]
                self._pos = pos + 1
                if event.kind is _TOKEN and not self._channel.cancelled:
                    out.append(event)
                else:
                    out.append(self._deliver(event))
                continue
            if self._channel.cancelled:
                out.append(self._cancelled_tail())
                continue
            try:
                self._buf = get()
            except queue.Empty:
                return
            self._pos = 0

    @property
    def _deadline_with_grace(self) -> float:
        """When a silent reader is given up on, on ``time.monotonic()``'s scale."""
        return time.monotonic() + (self._deadline + _GRACE_S - self._clock())

    def _deliver(self, event: TokenEvent) -> TokenEvent:
        if self._channel.cancelled:
            return self._cancelled_tail()
        kind = event.kind
        if kind == "started":
            self._started_given = True
        elif kind in _TERMINAL:
            self._finish(natural=True)
        return event

    def _cancelled_tail(self) -> TokenEvent:
        """What a cancelled stream hands out: ``started`` if not given yet, then ``end`` "cancelled"."""
        self._buf = []
        self._pos = 0
        if not self._started_given:
            self._started_given = True
            return make_event("started", self._started_data)
        if self._finished:
            raise StopIteration
        self._finish(natural=False)
        return make_event("end", cancelled_end(self._started_data.get("engine_version")))

    def _reader_lost(self) -> TokenEvent:
        log.warning("task %s: no event from the reader past the deadline; giving up on it", self.task_id)
        self._channel.stats["outcome"] = "DEADLINE_UNMET"
        self._channel.cancel()
        self._finish(natural=True)
        self._buf = []
        return DeadlineUnmetError("the task's deadline passed with no answer from the reader").to_event()

    def _finish(self, *, natural: bool) -> None:
        self._finished = True
        self._release(natural)

    def _release(self, natural: bool) -> None:
        """The consumer's side is done: tell the owner (once, whichever thread gets here first)."""
        if not self._channel.consumer_finished(natural):
            return
        on_done = self._on_done
        if on_done is not None:
            on_done(self)

    # -- public API -----------------------------------------------------------

    @property
    def cancelled(self) -> bool:
        """Whether :meth:`cancel` (or :meth:`close`) was called."""
        return self._channel.cancelled

    @property
    def finished(self) -> bool:
        """Whether the terminal event has been handed out."""
        return self._finished

    def cancel(self) -> None:
        """Stop the stream: no further token is handed out; it ends with ``end`` "cancelled"."""
        if not self._finished:
            self._channel.cancel()

    def close(self) -> None:
        """Cancel if still running and release what the stream holds.

        It never takes events: a thread iterating now or later still gets
        ``started`` (if not yet given) and ``end`` "cancelled".
        """
        if not self._finished:
            self._channel.cancel()
            self._release(natural=False)

    def join(self, timeout: Optional[float] = None) -> bool:
        """Wait until the reader is done with the stream (socket released or closed); True if it is."""
        return self._channel.reader_done.wait(timeout)

    def collect(self) -> Tuple[str, Dict[str, Any]]:
        """Read the stream to its end: ``(text, end_data)``, or raise its ``WorkerError``."""
        parts: List[str] = []
        for event in self:
            kind = event.kind
            if kind is _TOKEN:
                parts.append(event.data["t"])
            elif kind == "end":
                return "".join(parts), event.data
            elif kind == "error":
                raise WorkerError.from_event_data(event.data)
        raise DeadlineUnmetError("the stream ended without a terminal event")  # pragma: no cover

    def __enter__(self) -> TokenStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
