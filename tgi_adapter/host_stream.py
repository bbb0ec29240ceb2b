"""The stream a :class:`~tgi_adapter.AdapterHost` hands out: routing and failover at the first event.

``HostStream`` asks its host for a replica when the consumer takes the first
event, submits there, and fails over to another replica while the first
event is a retriable error. After ``started`` it passes the replica's events
through untouched. The registry, the breakers and the leases stay in
:mod:`tgi_adapter.host`; this module only drives one task across them.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import weakref
from typing import TYPE_CHECKING, Any, Callable, List, Optional, Set, Tuple

from . import tracing
from .breaker import Outcome
from .contract import TaskRequest, TokenEvent
from .errors import DeadlineUnmetError, InternalError, ReplicaExhaustedError, WorkerError
from .stream import StreamChannel, TokenStream

if TYPE_CHECKING:
    from .host import AdapterHost, _Lease, _Replica

__all__ = ["HostStream"]

log = logging.getLogger(__name__)

_TERMINAL = frozenset({"end", "error"})


class _Attempt:
    """The current attempt of a stream; also what its finalizer releases."""

    __slots__ = ("lock", "lease", "inner", "unhook", "done")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.lease: Optional[_Lease] = None
        self.inner: Optional[TokenStream] = None
        self.unhook: Callable[[], None] = _nothing
        self.done = False


def _nothing() -> None:
    return None


class HostStream(TokenStream):
    """A :class:`~tgi_adapter.TokenStream` whose events come from the replica the host chose.

    The first ``next()`` routes the task (and fails over before ``started``);
    then every event of the replica's stream is passed through untouched.
    ``pool_id``, ``correlation_id`` and, once routed, ``replica_id`` say where
    it runs; ``tried`` lists the replicas attempted, in order.
    """

    def __init__(self, host: AdapterHost, pool_id: str, task: TaskRequest, correlation_id: str,
                 deadline: float, clock: Callable[[], float]) -> None:
        started = {
            "engine": "tgi",
            "engine_version": None,
            "model_id": None,
            "model_sha": None,
            "task_id": task.task_id,
            "seed": task.seed,
            "determinism": task.determinism,
            "sampler_profile_version": task.sampler_profile_version,
            "correlation_id": correlation_id,
        }
        super().__init__(task.task_id, StreamChannel(task.task_id), started_data=started, deadline=deadline,
                         on_done=host._stream_done, clock=clock)
        self.pool_id = pool_id
        self.correlation_id = correlation_id
        self.replica_id: Optional[str] = None
        self.tried: List[str] = []
        self._host = host
        self._task = task
        self._attempt = _Attempt()
        # Routing happens in whichever thread takes the first event: keep the submitter's context for it.
        self._trace_context = tracing.capture_context()
        weakref.finalize(self, host._abandon, self._channel, self._attempt).atexit = False

    def __repr__(self) -> str:
        state = "finished" if self.finished else "cancelled" if self.cancelled else "open"
        return f"<HostStream task_id={self.task_id!r} pool={self.pool_id!r} replica={self.replica_id!r} {state}>"

    def __next__(self) -> TokenEvent:
        if self._finished:
            raise StopIteration
        if not self._started_given:
            return self._first()
        inner = self._attempt.inner
        if inner is None:  # cancelled before any replica was chosen
            return self._cancelled_tail()
        try:
            event = next(inner)
        except StopIteration:  # the replica's stream was closed under us (its adapter was closed)
            return self._cancelled_tail()
        if event.kind in _TERMINAL:
            self._finish()
        return event

    def join(self, timeout: Optional[float] = None) -> bool:
        """Wait for the current replica stream's reader to end; True if it has."""
        inner = self._attempt.inner
        return True if inner is None else inner.join(timeout)

    def _log(self, message: str, *args: Any, replica: Optional[_Replica] = None) -> None:
        extra = {"correlation_id": self.correlation_id, "task_id": self.task_id, "pool_id": self.pool_id,
                 "replica_id": replica.replica_id if replica is not None else self.replica_id}
        log.debug("task %s (correlation id %s): " + message, self.task_id, self.correlation_id, *args, extra=extra)

    def _first(self) -> TokenEvent:
        """Route, submit, and take the first event; fail over while it is a retriable error."""
        host = self._host
        errors: List[Tuple[str, WorkerError, TokenEvent]] = []
        tried: Set[_Replica] = set()
        while True:
            if self._channel.cancelled:
                return self._cancelled_tail()
            now = self._clock()
            if now >= self._deadline:
                last = f"; last: {errors[-1][1].code.value} from replica {errors[-1][0]}" if errors else ""
                return self._fail(DeadlineUnmetError(f"the task's deadline passed before a replica started it{last}"))
            routed = host._route(self, tried)
            if isinstance(routed, WorkerError):
                if len(errors) == 1:  # one replica tried: its own error, untouched
                    return self._fail(errors[0][1], errors[0][2])
                return self._fail(_give_up(self.pool_id, errors, routed))
            lease = routed
            replica = lease.replica
            tried.add(replica)
            self.tried.append(replica.replica_id)
            task = self._task
            if errors:  # a later attempt gets what is left of the deadline
                task = dataclasses.replace(task, deadline_ms=max(1, int((self._deadline - now) * 1000)))
            self._log("routed to replica %s (attempt %d)", replica.replica_id, len(tried), replica=replica)
            try:
                with tracing.replica_attempt(self._trace_context, self.tried):
                    inner = replica.adapter.submit(task, self.correlation_id)
            except WorkerError as error:
                host._settle(self, lease, Outcome.FAILURE if error.retriable else Outcome.NEUTRAL)
                host._release(lease)
                if not error.retriable:
                    return self._fail(error)
                errors.append((replica.replica_id, error, error.to_event()))
                self._log("replica %s refused it: %s; failing over", replica.replica_id, error, replica=replica)
                continue
            except Exception as exc:  # an adapter must not break the host's contract
                log.debug("adapter submit failed", exc_info=True)
                host._settle(self, lease, Outcome.NEUTRAL)
                host._release(lease)
                return self._fail(InternalError(f"replica {replica.replica_id}: submit raised {type(exc).__name__}"))
            if not self._attach(lease, inner):
                return self._cancelled_tail()
            try:
                event: Optional[TokenEvent] = next(inner)
            except StopIteration:
                event = None
            if event is not None and event.kind != "error":
                host._settle(self, lease, Outcome.NEUTRAL if self._channel.cancelled else Outcome.SUCCESS)
                self.replica_id = replica.replica_id
                self._started_given = True
                if event.kind in _TERMINAL:  # pragma: no cover - a stream always starts with started
                    self._finish()
                return event
            retriable = event is not None and bool(event.data.get("retriable"))
            host._settle(self, lease, Outcome.FAILURE if retriable else Outcome.NEUTRAL)
            self._detach(lease)
            if event is None or self._channel.cancelled:
                return self._cancelled_tail()
            if not retriable:
                self.replica_id = replica.replica_id
                self._finish()
                return event
            failed = WorkerError.from_event_data(event.data)
            errors.append((replica.replica_id, failed, event))
            self._log("replica %s failed before started: %s; failing over", replica.replica_id,
                      failed.code.value, replica=replica)

    def _fail(self, error: WorkerError, event: Optional[TokenEvent] = None) -> TokenEvent:
        if self._channel.cancelled:
            return self._cancelled_tail()
        self._log("ends with %s: %s", error.code.value, error.message)
        self._finish()
        return event if event is not None else error.to_event()

    def _attach(self, lease: _Lease, inner: TokenStream) -> bool:
        attempt = self._attempt
        with attempt.lock:
            attached = not attempt.done
            if attached:
                attempt.lease, attempt.inner = lease, inner
        if attached:
            attempt.unhook = self._channel.on_cancel(inner.cancel)  # runs at once if already cancelled
            return True
        inner.close()  # the stream was closed while routing
        self._host._settle(self, lease, Outcome.NEUTRAL)
        self._host._release(lease)
        return False

    def _detach(self, lease: _Lease) -> None:
        attempt = self._attempt
        with attempt.lock:
            if attempt.lease is not lease:
                return
            attempt.lease, attempt.inner = None, None
            unhook, attempt.unhook = attempt.unhook, _nothing
        unhook()
        self._host._release(lease)


def _give_up(pool_id: str, errors: List[Tuple[str, WorkerError, TokenEvent]], no_route: WorkerError) -> WorkerError:
    """The error that ends a task no replica started (``no_route`` says why none was left)."""
    if not errors:
        return no_route
    tried = "; ".join(f"{replica}: {error.code.value}" for replica, error, _event in errors)
    hints = [e.retry_after_ms for _r, e, _event in errors if e.retry_after_ms is not None]
    return ReplicaExhaustedError(
        f"every replica of pool {pool_id!r} that could take the task failed before starting it ({tried})",
        retry_after_ms=min(hints) if hints else None,
    )
