"""The consumer's side of a stream: ``TokenStream``, fed by one reader thread.

The reader thread owns the connection and puts *batches* of events (all the
events one network read produced) on a ``SimpleQueue``; the consumer pops a
batch and hands its events out one by one, so the queue is touched once per
read, not once per token. Cancellation is a flag the consumer checks before
it hands out each event, plus whatever the reader needs to stop at once
(shutting its socket down): after ``cancel()`` returns, no further token is
handed out and the stream ends with ``end`` / ``"cancelled"``.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

from .contract import TokenEvent, make_event
from .errors import DeadlineUnmetError, WorkerError

__all__ = ["TokenStream", "StreamChannel"]

log = logging.getLogger(__name__)

_TOKEN = "token"
_TERMINAL = frozenset({"end", "error"})
# How much longer than the task's deadline the consumer waits for the reader
# before giving up on it: the reader enforces every timer itself, this only
# guards against a reader stuck somewhere no timeout reaches (DNS, say).
_GRACE_S = 2.0


class StreamChannel:
    """State shared by a stream's reader thread and its consumer.

    The reader calls :meth:`put` with lists of events and must end with a list
    whose last event is terminal. Anyone may call :meth:`cancel`.
    """

    __slots__ = ("queue", "cancelled", "abort", "_closers", "_lock", "task_id", "stats")

    def __init__(self, task_id: str) -> None:
        self.task_id = task_id
        #: What the reader learned, for the task's log record and metrics.
        self.stats: Dict[str, Any] = {"retries": 0}
        self.queue: queue.SimpleQueue[List[TokenEvent]] = queue.SimpleQueue()
        self.cancelled = False
        #: Set on cancel; the reader waits on it instead of sleeping.
        self.abort = threading.Event()
        self._closers: List[Callable[[], None]] = []
        self._lock = threading.Lock()

    def put(self, events: List[TokenEvent]) -> None:
        self.queue.put(events)

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
        for closer in closers:
            _run_quietly(closer)
        self.queue.put([])  # wake a consumer blocked on an empty queue
        return True


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
        thread: Optional[threading.Thread] = None,
        on_done: Optional[Callable[[TokenStream], None]] = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.task_id = task_id
        self._channel = channel
        self._started_data = started_data
        self._deadline = deadline
        self._thread = thread
        self._on_done = on_done
        self._clock = clock
        self._buf: List[TokenEvent] = []
        self._pos = 0
        self._started_given = False
        self._finished = False

    def __repr__(self) -> str:
        state = "finished" if self._finished else "cancelled" if self._channel.cancelled else "open"
        return f"<TokenStream task_id={self.task_id!r} {state}>"

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

    def _deliver(self, event: TokenEvent) -> TokenEvent:
        if self._channel.cancelled:
            return self._cancelled_tail()
        kind = event.kind
        if kind == "started":
            self._started_given = True
        elif kind in _TERMINAL:
            self._finish()
        return event

    def _cancelled_tail(self) -> TokenEvent:
        self._buf = []
        self._pos = 0
        if not self._started_given:
            self._started_given = True
            return make_event("started", self._started_data)
        if self._finished:
            raise StopIteration
        self._finish()
        return make_event(
            "end",
            {
                "tokens_out": 0,
                "decode_ms": 0,
                "finish_reason": "cancelled",
                "tokens_in": None,
                "seed": None,
                "engine_version": self._started_data.get("engine_version"),
            },
        )

    def _reader_lost(self) -> TokenEvent:
        log.warning("task %s: no event from the reader past the deadline; giving up on it", self.task_id)
        self._channel.cancel()
        self._finish()
        self._buf = []
        return DeadlineUnmetError("the task's deadline passed with no answer from the reader").to_event()

    def _finish(self) -> None:
        self._finished = True
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            # The terminal event is the reader's last act; this join is brief.
            thread.join(timeout=1.0)
        on_done, self._on_done = self._on_done, None
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
        """Cancel if still running and release everything; waits briefly for the reader."""
        if not self._finished:
            self._channel.cancel()
            # Nobody will take the terminal event now: drain what the caller
            # would see so the registry forgets this stream.
            self._buf = []
            self._started_given = True
            self._finish()

    def join(self, timeout: Optional[float] = None) -> bool:
        """Wait for the reader thread to end; True if it has."""
        thread = self._thread
        if thread is None:
            return True
        thread.join(timeout)
        return not thread.is_alive()

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
