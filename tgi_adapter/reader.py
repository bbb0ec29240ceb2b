"""The work of a stream's reader thread: attempts, retries, timers, the read loop.

One :class:`StreamReader` per task. It sends the request, reads the body in
bulk (``BodyReader``), decodes SSE, maps frames to events, and puts each
read's events on the stream's channel. Failures before ``started`` go back
to the retry loop; failures after it end the stream with one ``error``
event. Every wait is bounded: connect and first-token timeouts, the
token-idle timer between data frames (keep-alive comments do not reset it),
and the task's deadline over everything, retries included.
"""

from __future__ import annotations

import logging
import socket
import time
from typing import Any, Callable, List, Mapping, Optional, Sequence

import requests

from .cassette import Recorder, Tape
from .contract import TokenEvent
from .errors import InternalError, WorkerError
from .frames import FrameMapper
from .mapping import error_for, error_from_status
from .retry import RetryPolicy, Timeouts, retry_after_ms_from_headers
from .sse import FrameTooLarge, SseDecoder
from .stream import StreamChannel
from .transport import (
    BodyReader,
    IncompleteBody,
    ending_of,
    is_connect_timeout,
    is_timeout,
    shutdown_socket,
    socket_hook,
    translate_exception,
)

__all__ = [
    "Attempts",
    "CancelWatch",
    "Request",
    "StreamReader",
    "open_response",
    "read_error_body",
    "record_failure",
    "record_whole",
    "status_error",
]

log = logging.getLogger(__name__)

_ERROR_BODY_LIMIT = 65536
# After the final frame the body's last chunk is due at once; wait this long
# for it so the connection can be reused, else drop the connection.
_DRAIN_S = 0.5


class Request:
    """One prepared HTTP request as the reader sends it (possibly several times).

    ``settings`` are the keyword arguments ``Session.request`` would give
    ``Session.send`` (proxies, ``verify``, ``cert``, ``stream``); see
    :class:`~tgi_adapter.transport.SendPlan`. With a ``recorder`` each
    attempt is recorded on its own :class:`~tgi_adapter.cassette.Tape`.
    """

    __slots__ = ("session", "prepared", "settings", "secrets", "recorder")

    def __init__(
        self,
        session: requests.Session,
        prepared: requests.PreparedRequest,
        settings: Mapping[str, Any],
        secrets: Sequence[Optional[str]],
        recorder: Optional[Recorder] = None,
    ) -> None:
        self.session = session
        self.prepared = prepared
        self.settings = settings
        self.secrets = secrets
        self.recorder = recorder

    def tape(self) -> Optional[Tape]:
        """A tape for the attempt about to be sent, when recording."""
        recorder = self.recorder
        if recorder is None:
            return None
        prepared = self.prepared
        body = prepared.body if isinstance(prepared.body, bytes) else None
        return recorder.begin(prepared.method or "POST", prepared.url or "/", prepared.headers, body)

    def send(self, connect_timeout: float, read_timeout: float) -> requests.Response:
        """Send and wait for the response headers (body not read)."""
        return self.session.send(
            self.prepared,
            timeout=(max(connect_timeout, 0.001), max(read_timeout, 0.001)),
            allow_redirects=False,
            **self.settings,
        )


class CancelWatch:
    """Shuts a request's socket down when its channel is cancelled, until disarmed.

    A blocked ``recv`` (or TLS handshake) wakes only when the socket is shut
    down; closing the response from another thread is not enough.
    """

    __slots__ = ("channel", "_undo")

    def __init__(self, channel: StreamChannel) -> None:
        self.channel = channel
        self._undo: List[Callable[[], None]] = []

    def watch(self, sock: socket.socket) -> None:
        self._undo.append(self.channel.on_cancel(lambda: shutdown_socket(sock)))

    def watch_body(self, body: BodyReader) -> None:
        """Watch the body's socket if the send did not report one (a session of the user's)."""
        if not self._undo and body.sock is not None:
            self.watch(body.sock)

    def disarm(self) -> None:
        undo, self._undo = self._undo, []
        for forget in undo:
            forget()


def open_response(
    request: Request, watch: CancelWatch, connect_timeout: float, read_timeout: float
) -> requests.Response:
    """Send ``request`` with its socket watched from the moment it exists; raises what sending raises."""
    with socket_hook(watch.watch):
        return request.send(connect_timeout, read_timeout)


def status_error(request: Request, response: requests.Response, tape: Optional[Tape] = None) -> WorkerError:
    """The error for an answer other than 200 (its body read, clipped and redacted; the response closed)."""
    body = read_error_body(response)
    if tape is not None:
        tape.chunk(body)
        tape.end("complete")
    return error_from_status(
        response.status_code,
        body,
        response.headers.get("content-type", ""),
        retry_after_ms=retry_after_ms_from_headers(response.headers, time.time()),
        secrets=request.secrets,
    )


def record_whole(tape: Optional[Tape], response: requests.Response) -> None:
    """Record a response read whole by requests (a control call)."""
    if tape is not None:
        tape.headers(response.status_code, response.raw.headers if response.raw is not None else response.headers)
        tape.chunk(response.content)
        tape.end("complete")


def record_failure(tape: Optional[Tape], exc: BaseException, cancelled: bool = False) -> None:
    """End ``tape`` for an exchange that ``exc`` broke (nothing is written if it never reached the engine)."""
    if tape is not None:
        how = "cancelled" if cancelled else ending_of(exc)
        if how is not None:
            tape.end(how)


def read_error_body(response: requests.Response) -> bytes:
    """Up to 64 KiB of an error response's body; never raises."""
    try:
        return response.raw.read(_ERROR_BODY_LIMIT, decode_content=True) or b""
    except Exception:
        return b""
    finally:
        response.close()


class Attempts:
    """The retry loop shared by streams, blocking calls and control calls.

    ``attempt()`` returns ``None`` when it finished (successfully or not,
    having reported the outcome itself) and a :class:`WorkerError` for a
    failure that may be retried. Sleep, clock and random source are injected.
    """

    def __init__(
        self,
        policy: RetryPolicy,
        *,
        deadline: Optional[float],
        clock: Callable[[], float],
        rng: Callable[[], float],
        wait: Callable[[float], bool],
        label: str,
    ) -> None:
        self.policy = policy
        self.deadline = deadline
        self.clock = clock
        self.rng = rng
        self.wait = wait  # returns True when the wait was interrupted (cancelled)
        self.label = label
        self.retries = 0

    def run(self, attempt: Callable[[], Optional[WorkerError]]) -> Optional[WorkerError]:
        """Run ``attempt`` until it finishes; the last error if retries ran out."""
        failed = 0
        while True:
            error = attempt()
            if error is None:
                return None
            retry_after = None if error.retry_after_ms is None else error.retry_after_ms / 1000.0
            delay = self.policy.next_delay(
                failed,
                retriable=error.retriable,
                retry_after_s=retry_after,
                now=self.clock(),
                deadline=self.deadline,
                rng=self.rng,
            )
            if delay is None:
                return error
            self.retries += 1
            log.debug("%s: retry %d in %.3fs after %s", self.label, self.retries, delay, error.code.value)
            if self.wait(delay):
                return None
            failed += 1


class StreamReader:
    """Runs in the stream's thread; see the module docstring."""

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
        clock: Callable[[], float] = time.monotonic,
        rng: Callable[[], float],
        wait: Callable[[float], bool],
        on_connect_failure: Optional[Callable[[], None]] = None,
    ) -> None:
        self.request = request
        self.channel = channel
        self.mapper_factory = mapper_factory
        self.timeouts = timeouts
        self.deadline = deadline
        self.max_frame_bytes = max_frame_bytes
        self.clock = clock
        self.on_connect_failure = on_connect_failure
        self.tape: Optional[Tape] = None
        self.attempts = Attempts(
            retry, deadline=deadline, clock=clock, rng=rng, wait=wait, label=f"task {channel.task_id}"
        )

    def run(self) -> None:
        """The thread's target: never raises, always ends the stream."""
        channel = self.channel
        try:
            error = self.attempts.run(self._attempt)
            channel.stats["retries"] = self.attempts.retries
            if error is not None and not channel.cancelled:
                channel.stats["outcome"] = error.code.value
                channel.put([error.to_event()])
        except BaseException as exc:  # a bug here must not leave the consumer waiting
            log.exception("task %s: the stream reader failed", channel.task_id)
            channel.stats["outcome"] = "INTERNAL"
            channel.put([InternalError(f"the adapter's stream reader failed: {type(exc).__name__}").to_event()])

    # -- one attempt -------------------------------------------------------------

    def _attempt(self) -> Optional[WorkerError]:
        channel = self.channel
        if channel.cancelled:
            return None
        t_sent = self.clock()
        remaining = self.deadline - t_sent
        if remaining <= 0:
            return error_for("deadline", "before the request could be sent")
        watch = CancelWatch(channel)
        tape = self.tape = self.request.tape()
        try:
            try:
                connect, first = min(self.timeouts.connect, remaining), min(self.timeouts.first_token, remaining)
                response = open_response(self.request, watch, connect, first)
            except Exception as exc:
                record_failure(tape, exc, channel.cancelled)
                if channel.cancelled:
                    return None
                return self._send_failed(exc, t_sent)
            if tape is not None:
                tape.headers(response.status_code, response.raw.headers)
            if channel.cancelled:
                response.close()
                self._end_tape("cancelled")
                return None
            if response.status_code != 200:
                return status_error(self.request, response, tape)
            body = BodyReader(response)
            watch.watch_body(body)
            return self._read_loop(body, t_sent)
        finally:
            watch.disarm()

    def _send_failed(self, exc: BaseException, t_sent: float) -> WorkerError:
        if is_timeout(exc) and not is_connect_timeout(exc):
            return self._timer_error(t_sent, progressed=False, where="waiting for the response headers")
        error = translate_exception(exc, phase="connect", secrets=self.request.secrets)
        if self.on_connect_failure is not None and error.retriable:
            self.on_connect_failure()
        if self.clock() >= self.deadline:
            return error_for("deadline", f"last failure: {error.message}")
        return error

    def _timer_error(self, t_sent: float, *, progressed: bool, where: str) -> WorkerError:
        now = self.clock()
        if now >= self.deadline - 0.001:
            return error_for("deadline", where)
        if not progressed:
            return error_for(
                "first_token_timeout", f"{self.timeouts.first_token:g}s passed {where}"
            )
        return error_for("token_idle_timeout", f"{self.timeouts.token_idle:g}s without a data frame")

    def _read_loop(self, body: BodyReader, t_sent: float) -> Optional[WorkerError]:
        channel = self.channel
        mapper = self.mapper_factory()
        feed = SseDecoder(self.max_frame_bytes).feed
        map_feed = mapper.feed
        read = body.read
        settimeout = body.settimeout
        put = channel.put
        clock = self.clock
        deadline = self.deadline
        idle = self.timeouts.token_idle
        limit = min(t_sent + self.timeouts.first_token, deadline)
        progressed = False
        tape = self.tape
        while True:
            now = clock()
            wait = limit - now
            if wait <= 0 or channel.cancelled:
                break
            settimeout(wait)
            try:
                data = read()
            except socket.timeout:
                break
            except Exception as exc:
                if channel.cancelled:
                    break
                self._end_tape("eof" if isinstance(exc, IncompleteBody) else "reset")
                return self._fail(mapper, body, translate_exception(exc, phase="read", secrets=self.request.secrets))
            if tape is not None:
                tape.chunk(data)
            if not data:
                if channel.cancelled:
                    break
                now = clock()
                events = mapper.at_eof(now)
                self._end_tape("complete" if mapper.error is None else "eof")
                return self._finish(mapper, body, events)
            try:
                payloads = feed(data)
            except FrameTooLarge as exc:
                # Deliver the frames that came before the oversized one first.
                events = map_feed(exc.payloads, clock()) if exc.payloads else []
                if events and not mapper.done:
                    put(events)
                self._end_tape("cancelled")
                return self._fail(mapper, body, error_for("frame_too_large", str(exc)))
            if payloads:
                now = clock()
                progressed = True
                events = map_feed(payloads, now)
                limit = now + idle
                if limit > deadline:
                    limit = deadline
                if mapper.done:
                    return self._finish(mapper, body, events)
                if events:
                    put(events)
        # A timer expired, or the stream was cancelled.
        body.abort()
        self._end_tape("cancelled" if channel.cancelled else "timeout")
        if channel.cancelled:
            channel.stats["outcome"] = "cancelled"
            return None
        error = self._timer_error(t_sent, progressed=progressed, where="waiting for the first data frame")
        return self._fail(mapper, None, error)

    def _fail(self, mapper: FrameMapper, body: Optional[BodyReader], error: WorkerError) -> Optional[WorkerError]:
        if body is not None:
            body.abort()
        if self.channel.cancelled:
            return None
        if not mapper.started_sent:
            return error  # nothing was emitted: the retry loop decides
        self._record(mapper, error.code.value)
        self.channel.put([error.to_event()])
        return None

    def _finish(self, mapper: FrameMapper, body: BodyReader, events: List[TokenEvent]) -> Optional[WorkerError]:
        error = mapper.error
        if error is not None and error.code.value == "WORKER_RESET":
            body.abort()
        else:
            if len(events) > 1 and mapper.started_sent:
                # The consumer gets the tokens now; the terminal event waits until the
                # connection is back in the pool, so a task submitted right after it reuses it.
                self.channel.put(events[:-1])
                events = events[-1:]
            self._drain(body)
        self._end_tape("complete" if body.complete else "cancelled")
        if error is not None:
            if not mapper.started_sent:
                if events:  # pragma: no cover - a mapper emits nothing before started
                    self.channel.put(events)
                return error
            events.append(error.to_event())
            self._record(mapper, error.code.value)
        else:
            self._record(mapper, "end")
        self.channel.put(events)
        return None

    def _drain(self, body: BodyReader) -> None:
        tape = self.tape
        try:
            body.settimeout(_DRAIN_S)
            while not body.complete:
                data = body.read()
                if tape is not None:
                    tape.chunk(data)
                if not data:
                    break
        except Exception:
            pass
        body.release()

    def _end_tape(self, how: str) -> None:
        if self.tape is not None:
            self.tape.end(how)

    def _record(self, mapper: FrameMapper, outcome: str) -> None:
        stats = self.channel.stats
        stats["outcome"] = outcome
        stats["tokens_in"] = mapper.tokens_in
        stats["tokens_out"] = mapper.tokens_out if mapper.done else len(mapper.texts)
        stats["decode_ms"] = mapper.decode_ms
        if mapper.t_first is not None:
            stats["latency_first_token_ms"] = int(round((mapper.t_first - mapper.t_submit) * 1000))
        stats["retries"] = self.attempts.retries
