"""One non-streaming call: send, read the whole answer within the deadline, map it.

The blocking counterpart of :class:`~tgi_adapter.reader.StreamReader`, for
``TgiHttpAdapter.generate()``. One attempt per call; the retry loop
(:class:`~tgi_adapter.reader.Attempts`) is the caller's. Cancel works as on a
stream: the socket is shut down through the channel.
"""

from __future__ import annotations

import json
from typing import Any, Callable, Dict, Optional, Sequence, Tuple, Union

from .attempts import CancelWatch, error_for_exception, open_response, record_failure, status_error
from .body import BodyReader
from .cassette import Tape
from .errors import WorkerError
from .mapping import error_for, result_from_body
from .stream import StreamChannel
from .transport import Request, ending_of, is_timeout

__all__ = ["Answer", "call_once"]

#: ``(text, end_data)``, what ``TokenStream.collect()`` returns.
Answer = Tuple[str, Dict[str, Any]]


def call_once(
    request: Request,
    channel: StreamChannel,
    *,
    deadline: float,
    connect_timeout: float,
    route: str,
    engine_version: Optional[str],
    sampled_seed: Optional[int],
    clock: Callable[[], float],
    secrets: Sequence[Optional[str]],
    on_connect_failure: Callable[[], None],
) -> Union[Answer, WorkerError, None]:
    """The answer, the error this attempt ended with, or ``None`` when cancelled."""
    if channel.cancelled:
        return None
    t0 = clock()
    remaining = deadline - t0
    if remaining <= 0:
        return error_for("deadline", "before the request could be sent")
    watch = CancelWatch(channel)
    tape = request.tape()
    try:
        try:
            head = open_response(request, watch, min(connect_timeout, remaining), remaining)
        except Exception as exc:
            record_failure(tape, exc, channel.cancelled)
            if channel.cancelled:
                return None
            if is_timeout(exc) and clock() >= deadline - 0.001:
                return error_for("deadline", "waiting for the answer")
            error = error_for_exception(exc, phase="connect", secrets=secrets)
            if error.retriable:
                on_connect_failure()
            return error
        if tape is not None:
            tape.headers(head.status_code, head.raw.headers)
        if head.status_code != 200:
            return status_error(request, head, tape)
        reader = BodyReader(head)
        watch.watch_body(reader)
        body = _read_all(reader, channel, deadline, clock, secrets, tape)
        if not isinstance(body, bytes):
            return body
        elapsed_ms = int(round((clock() - t0) * 1000))
        try:
            return result_from_body(
                route,
                json.loads(body),
                head.headers,
                engine_version=engine_version,
                elapsed_ms=elapsed_ms,
                sampled_seed=sampled_seed,
            )
        except (ValueError, RecursionError) as exc:
            return error_for("malformed", f"the answer: {exc}")
    finally:
        watch.disarm()


def _read_all(
    reader: BodyReader,
    channel: StreamChannel,
    deadline: float,
    clock: Callable[[], float],
    secrets: Sequence[Optional[str]],
    tape: Optional[Tape],
) -> Union[bytes, WorkerError, None]:
    """The whole body (the connection back in the pool), ``None`` when cancelled, or the error."""
    parts = []
    try:
        while True:
            left = deadline - clock()
            if left <= 0:
                reader.abort()
                if tape is not None:
                    tape.end("timeout")
                return error_for("deadline", "waiting for the answer")
            reader.settimeout(left)
            data = reader.read()
            if tape is not None:
                tape.chunk(data)
            if not data:
                break
            parts.append(data)
    except Exception as exc:
        reader.abort()
        if tape is not None:
            tape.end("cancelled" if channel.cancelled else ending_of(exc) or "reset")
        if channel.cancelled:
            return None
        if is_timeout(exc):
            return error_for("deadline", "waiting for the answer")
        return error_for_exception(exc, phase="read", secrets=secrets)
    reader.release()
    if tape is not None:
        tape.end("complete")
    return b"".join(parts)
