"""One attempt at a request, and the retry loop around attempts.

Shared by streams, the blocking ``generate()`` and the control calls: sending
with the socket watched for cancellation, turning a non-200 answer or a
transport failure into the contract's error, and deciding, after a failure,
whether and when to try again.
"""

from __future__ import annotations

import logging
import socket
import time
from typing import Callable, List, Optional, Protocol, Sequence

import requests

from .body import Head, shutdown_socket
from .cassette import Tape
from .errors import WorkerError
from .mapping import error_for_failure, error_from_status
from .retry import RetryPolicy, retry_after_ms_from_headers
from .stream import StreamChannel
from .transport import Request, classify_failure, ending_of, socket_hook

__all__ = [
    "Attempts",
    "CancelWatch",
    "error_for_exception",
    "open_response",
    "read_error_body",
    "record_failure",
    "record_whole",
    "status_error",
]

log = logging.getLogger(__name__)

_ERROR_BODY_LIMIT = 65536


class _HasSocket(Protocol):
    @property
    def sock(self) -> Optional[socket.socket]: ...


class CancelWatch:
    """Shuts a request's socket down when its channel is cancelled, until disarmed.

    A blocked ``recv`` (or TLS handshake) wakes only when the socket is shut
    down; closing the response from another thread is not enough. Shutting it
    down also tells the engine at once, whatever the reading side is doing.
    """

    __slots__ = ("channel", "_undo")

    def __init__(self, channel: StreamChannel) -> None:
        self.channel = channel
        self._undo: List[Callable[[], None]] = []

    def watch(self, sock: socket.socket) -> None:
        self._undo.append(self.channel.on_cancel(lambda: shutdown_socket(sock)))

    def watch_body(self, body: _HasSocket) -> None:
        """Watch the body's socket if the send did not report one (a session of the user's)."""
        if not self._undo and body.sock is not None:
            self.watch(body.sock)

    def disarm(self) -> None:
        undo, self._undo = self._undo, []
        for forget in undo:
            forget()


def open_response(request: Request, watch: CancelWatch, connect_timeout: float, read_timeout: float) -> Head:
    """Send ``request`` with its socket watched from the moment it exists; raises what sending raises."""
    with socket_hook(watch.watch):
        return request.send(connect_timeout, read_timeout)


def error_for_exception(exc: BaseException, *, phase: str, secrets: Sequence[Optional[str]]) -> WorkerError:
    """The contract's error for what the transport raised (``phase``: "connect" or "read")."""
    cause, detail = classify_failure(exc)
    return error_for_failure(cause, detail, phase=phase, secrets=secrets)


def status_error(request: Request, head: Head, tape: Optional[Tape] = None) -> WorkerError:
    """The error for an answer other than 200 (its body read, clipped and redacted; the response closed)."""
    body = read_error_body(head)
    if tape is not None:
        tape.chunk(body)
        tape.end("complete")
    return error_from_status(
        head.status_code,
        body,
        head.headers.get("content-type", ""),
        retry_after_ms=retry_after_ms_from_headers(head.headers, time.time()),
        secrets=request.secrets,
    )


def record_failure(tape: Optional[Tape], exc: BaseException, cancelled: bool = False) -> None:
    """End ``tape`` for an exchange that ``exc`` broke (nothing is written if it never reached the engine)."""
    if tape is not None:
        how = "cancelled" if cancelled else ending_of(exc)
        if how is not None:
            tape.end(how)


def record_whole(tape: Optional[Tape], response: requests.Response) -> None:
    """Record a response that requests read whole (a control call)."""
    if tape is not None:
        tape.headers(response.status_code, response.raw.headers if response.raw is not None else response.headers)
        tape.chunk(response.content)
        tape.end("complete")


def read_error_body(head: Head) -> bytes:
    """Up to 64 KiB of an error response's body; never raises."""
    try:
        return head.raw.read(_ERROR_BODY_LIMIT, decode_content=True) or b""
    except Exception:
        return b""
    finally:
        head.close()


class Attempts:
    """The retry decisions of one call: which failure is retried, and after how long.

    :meth:`run` is the loop for a caller that may block (``generate()``,
    control calls); a stream asks :meth:`decide` after each failed attempt
    and waits on the shared reader's timers instead. Sleep, clock and random
    source are injected; ``on_retry(n, delay, error)`` hears of each retry
    before its wait.
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
        on_retry: Optional[Callable[[int, float, WorkerError], None]] = None,
    ) -> None:
        self.policy = policy
        self.deadline = deadline
        self.clock = clock
        self.rng = rng
        self.wait = wait  # returns True when the wait was interrupted (cancelled)
        self.label = label
        self.on_retry = on_retry
        self.retries = 0

    def decide(self, error: WorkerError) -> Optional[float]:
        """Seconds to wait before trying again after ``error``, or None to give up with it."""
        retry_after = None if error.retry_after_ms is None else error.retry_after_ms / 1000.0
        delay = self.policy.next_delay(
            self.retries,
            retriable=error.retriable,
            retry_after_s=retry_after,
            now=self.clock(),
            deadline=self.deadline,
            rng=self.rng,
        )
        if delay is not None:
            self.retries += 1
            log.debug("%s: retry %d in %.3fs after %s", self.label, self.retries, delay, error.code.value)
            if self.on_retry is not None:
                self.on_retry(self.retries, delay, error)
        return delay

    def run(self, attempt: Callable[[], Optional[WorkerError]]) -> Optional[WorkerError]:
        """Run ``attempt`` until it finishes; the last error if retries ran out.

        ``attempt()`` returns ``None`` when it finished (successfully or not,
        having reported the outcome itself) and a :class:`WorkerError` for a
        failure that may be retried.
        """
        while True:
            error = attempt()
            if error is None:
                return None
            delay = self.decide(error)
            if delay is None:
                return error
            if self.wait(delay):
                return None
