"""One stream's reader: its attempts, retries, timers and reads, driven by the shared threads.

A :class:`StreamReader` sends each attempt on a worker thread (connect, send,
wait for the response headers: all urllib3's), then hands the socket to the
shared reader, which calls :meth:`StreamReader._on_readable` whenever bytes
arrive and :meth:`StreamReader._on_timer` when a timer is due. Each read's
payload is decoded (SSE), mapped to events and put on the stream's channel
in one batch. A transport that exposes no socket (a session of the user's
with its own adapters, a mocked one) is read by a thread of its own instead,
blocking, with the same per-read step.

Failures before ``started`` go back to the retry decision (the wait is a
timer, not a blocked thread); failures after it end the stream with one
``error`` event. Every wait is bounded: connect and first-token timeouts,
the token-idle timer between data frames (keep-alive comments do not reset
it), and the task's deadline over everything, retries included.

State changes happen on the shared reader's thread only, except while an
attempt is being sent (a worker owns it) or read by a fallback thread (that
thread owns it); each hands back with ``call_soon``.
"""

from __future__ import annotations

import functools
import logging
import socket
import threading
from typing import Any, Callable, List, Optional

from .attempts import Attempts, CancelWatch, error_for_exception, open_response, record_failure, status_error
from .body import BodyReader, Head, IncompleteBody, SocketBody
from .cassette import Tape
from .errors import InternalError, WorkerError
from .events import TokenEvent
from .frames import FrameMapper
from .mapping import error_for
from .reactor import Reactor
from .retry import RetryPolicy, Timeouts
from .sse import FrameTooLarge, SseDecoder
from .stream import StreamChannel
from .timers import Timer
from .transport import Request, classify_failure
from .workers import WorkerPool

__all__ = ["StreamReader"]

log = logging.getLogger(__name__)

# After the final frame the body's last chunk is due at once; wait this long
# for it so the connection can be reused, else drop the connection.
_DRAIN_S = 0.5
# A timer that fires this close to its limit counts as expired (clock granularity).
_TIMER_SLACK_S = 0.0005

_SEND, _READ, _BACKOFF, _FALLBACK, _DONE = "send", "read", "backoff", "fallback", "done"


class _Stop(Exception):
    """An attempt ended with an error (raised out of the per-read step)."""

    def __init__(self, error: WorkerError) -> None:
        super().__init__(error.message)
        self.error = error


class StreamReader:
    """Reads one task's stream; see the module docstring.

    :param sleep: when given (tests inject a recorder), retry waits call it on
        a worker thread instead of using the shared reader's timers.
    """

    def __init__(
        self,
        request: Request,
        channel: StreamChannel,
        mapper_factory: Callable[[], FrameMapper],
        *,
        timeouts: Timeouts,
        retry: RetryPolicy,
        deadline: float,
        max_frame_bytes: int,
        clock: Callable[[], float],
        rng: Callable[[], float],
        sleep: Optional[Callable[[float], None]],
        on_connect_failure: Optional[Callable[[], None]],
        on_retry: Optional[Callable[[int, float, WorkerError], None]],
        reactor: Reactor,
        workers: WorkerPool,
    ) -> None:
        self.request = request
        self.channel = channel
        self.mapper_factory = mapper_factory
        self.timeouts = timeouts
        self.deadline = deadline
        self.max_frame_bytes = max_frame_bytes
        self.clock = clock
        self.sleep = sleep
        self.on_connect_failure = on_connect_failure
        self.reactor = reactor
        self.workers = workers
        self.attempts = Attempts(
            retry, deadline=deadline, clock=clock, rng=rng, wait=_never_waits, label=f"task {channel.task_id}",
            on_retry=on_retry,
        )
        self.phase = _SEND
        self._unhook: Callable[[], None] = _nothing
        # The attempt being read:
        self.body: Optional[SocketBody] = None
        self.watch: Optional[CancelWatch] = None
        self.mapper: Optional[FrameMapper] = None
        self.decode: Callable[[bytes], List[bytes]] = _no_decoder
        self.limit = 0.0
        self.progressed = False
        self.timer: Optional[Timer] = None
        self.timer_at = 0.0
        self.held: Optional[List[TokenEvent]] = None  # the final events, waiting for the body's last bytes
        self.tape: Optional[Tape] = None  # when the adapter records: this attempt's exchange
        self.eof = False  # the body ended before the stream's final frame

    # -- any thread ----------------------------------------------------------------

    def start(self) -> None:
        """Send the first attempt (on a worker)."""
        self._unhook = self.channel.on_cancel(functools.partial(self._post, self._on_cancel))
        self.workers.submit(self._send)

    def _post(self, fn: Callable[..., None], *args: Any) -> None:
        self.reactor.call_soon(functools.partial(_guarded, self, fn, *args))

    # -- a worker: send the attempt, wait for its headers --------------------------------

    def _send(self) -> None:
        channel = self.channel
        if channel.cancelled:
            return self._post(self._finish)
        t_sent = self.clock()
        remaining = self.deadline - t_sent
        if remaining <= 0:
            return self._post(self._attempt_failed, error_for("deadline", "before the request could be sent"))
        watch = CancelWatch(channel)
        timeouts = self.timeouts
        tape = self.tape = self.request.tape()
        try:
            head = open_response(
                self.request, watch, min(timeouts.connect, remaining), min(timeouts.first_token, remaining)
            )
        except Exception as exc:
            watch.disarm()
            record_failure(tape, exc, channel.cancelled)
            if channel.cancelled:
                return self._post(self._finish)
            return self._post(self._attempt_failed, self._send_failed(exc))
        if tape is not None:
            tape.headers(head.status_code, head.raw.headers)
        if channel.cancelled:
            head.close()
            watch.disarm()
            self._end_tape("cancelled")
            return self._post(self._finish)
        if head.status_code != 200:
            error = status_error(self.request, head, tape)
            watch.disarm()
            return self._post(self._attempt_failed, error)
        body = SocketBody.take(head)
        if body is None:
            self.phase = _FALLBACK
            threading.Thread(
                target=self._read_blocking, args=(head, watch, t_sent), name=f"tgi-stream-{channel.task_id}",
                daemon=True,
            ).start()
            return None
        watch.watch_body(body)
        return self._post(self._begin_reading, body, watch, t_sent)

    def _send_failed(self, exc: BaseException) -> WorkerError:
        if classify_failure(exc).cause == "read_timeout":
            return self._timer_error(progressed=False, where="waiting for the response headers")
        error = error_for_exception(exc, phase="connect", secrets=self.request.secrets)
        if self.on_connect_failure is not None and error.retriable:
            self.on_connect_failure()
        if self.clock() >= self.deadline:
            return error_for("deadline", f"last failure: {error.message}")
        return error

    # -- the shared reader: retries --------------------------------------------------------

    def _attempt_failed(self, error: WorkerError) -> None:
        """An attempt failed before ``started``: try again later, or end the stream with ``error``."""
        if self.channel.cancelled:
            return self._finish()
        delay = self.attempts.decide(error)
        if delay is None:
            self.channel.stats.update(outcome=error.code.value, error_message=error.full_message)
            self.channel.put([error.to_event()])
            return self._finish()
        sleep = self.sleep
        if sleep is not None:
            self.phase = _SEND
            self.workers.submit(functools.partial(_sleep_then, sleep, delay, self._send))
        else:
            self.phase = _BACKOFF
            self.timer = self.reactor.call_later(delay, functools.partial(_guarded, self, self._retry_now))
        return None

    def _retry_now(self) -> None:
        self.timer = None
        if self.phase != _BACKOFF:
            return
        if self.channel.cancelled:
            return self._finish()
        self.phase = _SEND
        self.workers.submit(self._send)
        return None

    def _on_cancel(self) -> None:
        """The stream was cancelled: stop at once whatever this reader was waiting for."""
        if self.phase == _BACKOFF:
            if self.timer is not None:
                self.timer.cancel()
            self._finish()
        elif self.phase == _READ:
            self._record("cancelled")
            self._stop_reading(release=False)
            self._end_tape("cancelled")
            self._finish()
        # Sending and fallback reading see the flag themselves (their socket is shut down already).

    # -- the shared reader: reading ------------------------------------------------------------

    def _begin_reading(self, body: SocketBody, watch: CancelWatch, t_sent: float) -> None:
        if self.channel.cancelled:
            body.abort()
            watch.disarm()
            self._end_tape("cancelled")
            return self._finish()
        self._setup_attempt(t_sent)
        self.phase = _READ
        self.body = body
        self.watch = watch
        self.reactor.add_reader(body.sock, functools.partial(_guarded, self, self._on_readable))
        self._arm(max(0.0, self.limit - self.clock()))
        self._on_readable()  # bytes that came with the headers, or sit decrypted in TLS
        return None

    def _setup_attempt(self, t_sent: float) -> None:
        self.mapper = self.mapper_factory()
        self.decode = SseDecoder(self.max_frame_bytes).feed
        self.progressed = False
        self.held = None
        self.eof = False
        self.limit = min(t_sent + self.timeouts.first_token, self.deadline)

    def _on_readable(self) -> None:
        body = self.body
        if body is None:
            return
        try:
            data = body.pull()
            if data is None:
                return
            if self.tape is not None:
                self.tape.chunk(data)
            if self.held is not None:  # draining: only the body's end is awaited
                if body.framing.complete:
                    self._deliver_final(release=True)
                return
            if data:
                final = self._consume(data)
                if final is not None:
                    return self._final(final)
            if body.framing.complete:
                mapper = self.mapper
                assert mapper is not None
                events = mapper.at_eof(self.clock())
                self.eof = mapper.error is not None  # the body ended before its final frame
                return self._final(events)
        except _Stop as stop:
            self._end_tape("cancelled")  # the adapter stopped reading
            self._attempt_over(stop.error)
        except Exception as exc:
            if self.channel.cancelled:
                self._on_cancel()
            elif self.held is not None:
                self._deliver_final(release=False)
            else:
                self._end_tape("eof" if isinstance(exc, IncompleteBody) else "reset")
                self._attempt_over(error_for_exception(exc, phase="read", secrets=self.request.secrets))
        return None

    def _on_timer(self) -> None:
        self.timer = None
        if self.phase != _READ:
            return
        if self.held is not None:  # the body's last bytes never came: drop the connection
            return self._deliver_final(release=False)
        now = self.clock()
        if now < self.limit - _TIMER_SLACK_S:  # frames came meanwhile and moved the limit
            self._arm(self.limit - now)
            return None
        where = "waiting for the first data frame"
        self._end_tape("timeout")
        self._attempt_over(self._timer_error(progressed=self.progressed, where=where))
        return None

    def _consume(self, data: bytes) -> Optional[List[TokenEvent]]:
        """One read's payload: events put on the channel; the final events once the last frame came."""
        mapper = self.mapper
        assert mapper is not None
        try:
            payloads = self.decode(data)
        except FrameTooLarge as exc:
            # Deliver the frames that came before the oversized one first.
            events = mapper.feed(exc.payloads, self.clock()) if exc.payloads else []
            if events and not mapper.done:
                self.channel.put(events)
            raise _Stop(error_for("frame_too_large", str(exc))) from None
        if payloads:
            now = self.clock()
            self.progressed = True
            events = mapper.feed(payloads, now)
            limit = now + self.timeouts.token_idle
            if limit > self.deadline:
                limit = self.deadline
            self.limit = limit
            if limit < self.timer_at and self.phase == _READ:
                # Only the first frame moves the limit earlier (first-token to token-idle).
                self._arm(limit - now)
            if mapper.done:
                return events
            if events:
                self.channel.put(events)
        return None

    def _final(self, events: List[TokenEvent]) -> None:
        """The stream's last frame came (or the body ended): deliver, once the connection is settled."""
        mapper = self.mapper
        body = self.body
        assert mapper is not None and body is not None
        error = mapper.error
        if error is not None and error.code.value == "WORKER_RESET":
            self.held = events
            return self._deliver_final(release=False)
        if len(events) > 1 and mapper.started_sent:
            # The consumer gets the tokens now; the terminal event waits until the
            # connection is back in the pool, so a task submitted right after it reuses it.
            self.channel.put(events[:-1])
            events = events[-1:]
        self.held = events
        if body.framing.complete:
            return self._deliver_final(release=True)
        self._arm(_DRAIN_S)
        return None

    def _arm(self, delay: float) -> None:
        """(Re)start the attempt's one timer, ``delay`` seconds from now."""
        if self.timer is not None:
            self.timer.cancel()
        self.timer_at = self.clock() + delay
        self.timer = self.reactor.call_later(delay, functools.partial(_guarded, self, self._on_timer))

    def _deliver_final(self, *, release: bool) -> None:
        events = self.held or []
        self.held = None
        mapper = self.mapper
        assert mapper is not None
        self._stop_reading(release=release)
        self._end_tape("eof" if self.eof else "complete" if release else "cancelled")
        if self._end_with(mapper, events):
            self._finish()

    def _attempt_over(self, error: WorkerError) -> None:
        """The attempt being read failed: retry if nothing was emitted yet, else end the stream."""
        self._stop_reading(release=False)
        mapper = self.mapper
        assert mapper is not None
        if self.channel.cancelled:
            self._record("cancelled")
            return self._finish()
        if not mapper.started_sent:
            return self._attempt_failed(error)
        self._record(error.code.value, error.full_message)
        self.channel.put([error.to_event()])
        return self._finish()

    def _stop_reading(self, *, release: bool) -> None:
        body, self.body = self.body, None
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if body is not None:
            self.reactor.remove_reader(body.sock)
            if release:
                body.release()
            else:
                body.abort()
        watch, self.watch = self.watch, None
        if watch is not None:
            watch.disarm()

    # -- a thread of its own: a body without a socket to hand over ---------------------------

    def _read_blocking(self, head: Head, watch: CancelWatch, t_sent: float) -> None:
        """Read one attempt's body on this thread; hand the outcome back to the shared reader."""
        try:
            body = BodyReader(head)
            watch.watch_body(body)
            try:
                outcome = self._read_loop(body, t_sent)
            finally:
                watch.disarm()
        except Exception as exc:  # a bug must not leave the consumer waiting
            log.exception("task %s: the stream reader failed", self.channel.task_id)
            outcome = InternalError(f"the adapter's stream reader failed: {type(exc).__name__}")
        self._post(self._fallback_done, outcome)

    def _read_loop(self, body: BodyReader, t_sent: float) -> Optional[WorkerError]:
        """None when the stream ended (events put), or the error this attempt failed with."""
        self._setup_attempt(t_sent)
        channel = self.channel
        mapper = self.mapper
        assert mapper is not None
        clock = self.clock
        while True:
            wait = self.limit - clock()
            if wait <= 0 or channel.cancelled:
                break
            body.settimeout(wait)
            try:
                data = body.read()
                if self.tape is not None:
                    self.tape.chunk(data)
                if not data:
                    events = mapper.at_eof(clock())
                    self.eof = mapper.error is not None
                    return self._blocking_final(body, mapper, events)
                final = self._consume(data)
            except socket.timeout:
                break
            except _Stop as stop:
                body.abort()
                self._end_tape("cancelled")
                return stop.error
            except Exception as exc:
                if channel.cancelled:
                    break
                body.abort()
                self._end_tape("eof" if isinstance(exc, IncompleteBody) else "reset")
                return error_for_exception(exc, phase="read", secrets=self.request.secrets)
            if final is not None:
                return self._blocking_final(body, mapper, final)
        body.abort()
        self._end_tape("cancelled" if channel.cancelled else "timeout")
        if channel.cancelled:
            return None
        return self._timer_error(progressed=self.progressed, where="waiting for the first data frame")

    def _blocking_final(self, body: BodyReader, mapper: FrameMapper, events: List[TokenEvent]) -> Optional[WorkerError]:
        error = mapper.error
        if error is not None and error.code.value == "WORKER_RESET":
            body.abort()
        else:
            if len(events) > 1 and mapper.started_sent:
                self.channel.put(events[:-1])
                events = events[-1:]
            try:
                body.settimeout(_DRAIN_S)
                while not body.complete:
                    data = body.read()
                    if self.tape is not None:
                        self.tape.chunk(data)
                    if not data:
                        break
            except Exception:  # the rest never came: the connection is not reused
                pass
            body.release()
        self._end_tape("eof" if self.eof else "complete" if body.complete else "cancelled")
        self.held = events
        return None

    def _fallback_done(self, outcome: Optional[WorkerError]) -> None:
        mapper = self.mapper
        if outcome is None:
            held, self.held = self.held, None
            if held is None:  # cancelled
                self._record("cancelled")
                return self._finish()
            assert mapper is not None
            if self._end_with(mapper, held):
                self._finish()
            return None
        if self.channel.cancelled:
            self._record("cancelled")
            return self._finish()
        if mapper is not None and mapper.started_sent:
            self._record(outcome.code.value, outcome.full_message)
            self.channel.put([outcome.to_event()])
            return self._finish()
        return self._attempt_failed(outcome)

    # -- endings -------------------------------------------------------------------------------

    def _end_with(self, mapper: FrameMapper, events: List[TokenEvent]) -> bool:
        """Put the stream's final events; False if the attempt failed before ``started`` (a retry comes)."""
        error = mapper.error
        if self.channel.cancelled:
            self._record("cancelled")
            return True
        if error is not None:
            if not mapper.started_sent:
                self._attempt_failed(error)
                return False
            events.append(error.to_event())
            self._record(error.code.value, error.full_message)
        else:
            self._record("end")
        self.channel.put(events)
        return True

    def _end_tape(self, how: str) -> None:
        tape, self.tape = self.tape, None
        if tape is not None:
            tape.end(how)

    def _timer_error(self, *, progressed: bool, where: str) -> WorkerError:
        if self.clock() >= self.deadline - 0.001:
            return error_for("deadline", where)
        if not progressed:
            return error_for("first_token_timeout", f"{self.timeouts.first_token:g}s passed {where}")
        return error_for("token_idle_timeout", f"{self.timeouts.token_idle:g}s without a data frame")

    def _record(self, outcome: str, message: Optional[str] = None) -> None:
        stats = self.channel.stats
        stats["outcome"] = outcome
        stats["error_message"] = message
        mapper = self.mapper
        if mapper is None:
            return
        stats["finish_reason"] = mapper.finish_reason
        stats["tokens_in"] = mapper.tokens_in
        # What the wire carried: the engine's own count once it ended, else the token frames seen.
        stats["tokens_out"] = mapper.tokens_out if mapper.done else mapper.frames_seen
        stats["decode_ms"] = mapper.decode_ms
        if mapper.t_first is not None:
            stats["latency_first_token_ms"] = int(round((mapper.t_first - mapper.t_submit) * 1000))

    def _finish(self) -> None:
        """This reader is done with the stream (its last event put, its connection settled)."""
        if self.phase == _DONE:
            return
        self.phase = _DONE
        self.channel.stats["retries"] = self.attempts.retries
        self._unhook()
        self.channel.reader_finished()

    def fail_internally(self, exc: BaseException) -> None:
        """A bug in one of this reader's callbacks: end the stream with INTERNAL rather than hang."""
        log.error("task %s: the stream reader failed", self.channel.task_id, exc_info=exc)
        if self.phase == _DONE:
            return
        self._stop_reading(release=False)
        if not self.channel.cancelled:
            self.channel.stats.update(outcome="INTERNAL", error_message=f"the adapter's stream reader failed: {exc!r}")
            self.channel.put([InternalError(f"the adapter's stream reader failed: {type(exc).__name__}").to_event()])
        self._finish()


def _guarded(reader: StreamReader, fn: Callable[..., None], *args: Any) -> None:
    try:
        fn(*args)
    except Exception as exc:
        reader.fail_internally(exc)


def _sleep_then(sleep: Callable[[float], None], delay: float, then: Callable[[], None]) -> None:
    sleep(delay)
    then()


def _nothing() -> None:
    return None


def _never_waits(_seconds: float) -> bool:  # pragma: no cover - streams never call Attempts.run
    raise AssertionError("a stream waits on timers, not in Attempts.run")


def _no_decoder(_data: bytes) -> List[bytes]:  # pragma: no cover - replaced before the first read
    return []
