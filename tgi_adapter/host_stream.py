"""The stream an :class:`~tgi_adapter.AdapterHost` hands out: routing and failover before ``started``.

Routing starts when the first event is asked for: the first ``next()`` routes
in the consumer's thread, and a stream added to a
:class:`~tgi_adapter.StreamSet` routes on a worker thread. The chosen
replica's stream then *pushes* its events through: whichever thread puts them
(the shared reader, mostly) also forwards them here, so no thread waits on a
replica's stream. While the first event is a retriable error the task fails
over to another replica (on a worker thread); after ``started`` the replica's
events pass through untouched.

What the stream needs from its host is the small :class:`Placement`
interface below, given as an argument; the host's registry, breakers and
leases stay in :mod:`tgi_adapter.host`.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import weakref
from typing import Any, Callable, Dict, List, Optional, Protocol, Set, Tuple, Union

from . import runtime, tracing
from .breaker import Outcome
from .contract import EventStream, TaskRequest, WorkerAdapter
from .errors import DeadlineUnmetError, InternalError, ReplicaExhaustedError, WorkerError
from .events import TokenEvent
from .stream import StreamChannel, TokenStream

__all__ = ["HostStream", "Lease", "Placement"]

log = logging.getLogger(__name__)

_TERMINAL = frozenset({"end", "error"})


class Lease(Protocol):
    """One attempt's claim on a replica, as the host hands it out."""

    @property
    def replica_id(self) -> str: ...

    @property
    def adapter(self) -> WorkerAdapter: ...

    @property
    def binding(self) -> object:
        """Identifies the binding tried (a rebound replica is a new one)."""


class Placement(Protocol):
    """What a :class:`HostStream` asks of its host."""

    def route(self, pool_id: str, tried: Set[object]) -> Union[Lease, WorkerError]:
        """Claim the best replica whose binding is not in ``tried``, or say why there is none."""

    def settle(self, lease: Lease, outcome: Outcome) -> Optional[Tuple[str, str]]:
        """Judge an attempt for the replica's breaker (once per lease); the breaker's change, if any."""

    def release(self, lease: Lease) -> None:
        """The attempt is over: free its claim (idempotent)."""

    def forget(self, stream: HostStream) -> None:
        """The consumer is done with ``stream``: drop it from the pool's tasks."""


class HostStream(TokenStream):
    """A :class:`~tgi_adapter.TokenStream` whose events come from the replica the host chose.

    ``pool_id``, ``correlation_id`` and, once started, ``replica_id`` say
    where it runs; ``tried`` lists the replicas attempted, in order.
    """

    def __init__(self, placement: Placement, pool_id: str, task: TaskRequest, correlation_id: str,
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
        channel = StreamChannel(task.task_id)
        super().__init__(task.task_id, channel, started_data=started, deadline=deadline, on_done=_stream_done,
                         clock=clock)
        self.pool_id = pool_id
        self.correlation_id = correlation_id
        self._route = _Route(placement, self, channel, task, deadline, clock)
        weakref.finalize(self, self._route.abandon).atexit = False

    @property
    def replica_id(self) -> Optional[str]:
        """The replica that started the task (or ended it with a non-retriable error)."""
        return self._route.replica_id

    @property
    def tried(self) -> List[str]:
        """The replicas attempted, in order."""
        return list(self._route.tried)

    def __repr__(self) -> str:
        state = "finished" if self.finished else "cancelled" if self.cancelled else "open"
        return f"<HostStream task_id={self.task_id!r} pool={self.pool_id!r} replica={self.replica_id!r} {state}>"

    def _refill(self) -> TokenEvent:
        if self._owner is None:
            self._route.begin(inline=True)
        return super()._refill()

    def _claim(self, owner: object, notify: Callable[[], None]) -> None:
        super()._claim(owner, notify)
        self._route.begin(inline=False)

    def join(self, timeout: Optional[float] = None) -> bool:
        """Wait for the current replica stream's reader to end; True if it has."""
        inner = self._route.inner
        join = getattr(inner, "join", None)
        return True if join is None else bool(join(timeout))


def _stream_done(stream: TokenStream) -> None:
    """``on_done`` of every HostStream: the consumer took its terminal event or closed it."""
    assert isinstance(stream, HostStream)
    route = stream._route
    route.placement.forget(stream)
    route.abandon()


class _Route:
    """A task's way across the replicas: everything routing, forwarding and clean-up share.

    It holds no reference to the :class:`HostStream` after construction, so a
    stream dropped unfinished can be collected (its finalizer abandons the route).
    """

    def __init__(self, placement: Placement, stream: HostStream, channel: StreamChannel, task: TaskRequest,
                 deadline: float, clock: Callable[[], float]) -> None:
        self.placement = placement
        self.channel = channel
        self.task = task
        self.deadline = deadline
        self.clock = clock
        self.pool_id = stream.pool_id
        self.correlation_id = stream.correlation_id
        self.lock = threading.RLock()
        self.routing = False
        self.done = False
        self.lease: Optional[Lease] = None
        self.inner: Optional[EventStream] = None
        self.unhook: Callable[[], None] = _nothing
        self.judged = False
        self.replica_id: Optional[str] = None
        self.tried: List[str] = []
        self.tried_bindings: Set[object] = set()
        self.errors: List[Tuple[str, WorkerError, TokenEvent]] = []
        # Routing happens later, maybe on another thread: keep the submitter's trace context for it.
        self.trace_context = tracing.capture_context()

    def log(self, message: str, *args: Any, replica_id: Optional[str] = None) -> None:
        extra: Dict[str, Any] = {"correlation_id": self.correlation_id, "task_id": self.task.task_id,
                                 "pool_id": self.pool_id, "replica_id": replica_id or self.replica_id}
        log.debug("task %s (correlation id %s): " + message, self.task.task_id, self.correlation_id, *args,
                  extra=extra)

    # -- routing (blocking: the consumer's thread or a worker) ----------------------

    def begin(self, *, inline: bool) -> None:
        """Start routing once; ``inline`` routes in this thread, else on a worker."""
        with self.lock:
            if self.routing:
                return
            self.routing = True
        if inline:
            self.next_replica()
        else:
            runtime.workers().submit(self.next_replica)

    def next_replica(self) -> None:
        """Submit the task to the best replica not yet tried, or end the stream saying why none is left."""
        while True:
            if self.channel.cancelled or self.done:
                return  # the consumer's side hands out the cancelled tail
            now = self.clock()
            if now >= self.deadline:
                last = ""
                if self.errors:
                    last = f"; last: {self.errors[-1][1].code.value} from replica {self.errors[-1][0]}"
                return self.fail(DeadlineUnmetError(f"the task's deadline passed before a replica started it{last}"))
            routed = self.placement.route(self.pool_id, self.tried_bindings)
            if isinstance(routed, WorkerError):
                if len(self.errors) == 1:  # one replica tried: its own error, untouched
                    return self.fail(self.errors[0][1], self.errors[0][2])
                return self.fail(_give_up(self.pool_id, self.errors, routed))
            lease = routed
            self.tried_bindings.add(lease.binding)
            self.tried.append(lease.replica_id)
            task = self.task
            if self.errors:  # a later attempt gets what is left of the deadline
                task = dataclasses.replace(task, deadline_ms=max(1, int((self.deadline - now) * 1000)))
            self.log("routed to replica %s (attempt %d)", lease.replica_id, len(self.tried),
                     replica_id=lease.replica_id)
            try:
                with tracing.replica_attempt(self.trace_context, self.tried):
                    inner = lease.adapter.submit(task, self.correlation_id)
            except WorkerError as error:
                self.judge(lease, Outcome.FAILURE if error.retriable else Outcome.NEUTRAL)
                self.placement.release(lease)
                if not error.retriable:
                    return self.fail(error)
                self.errors.append((lease.replica_id, error, error.to_event()))
                self.log("replica %s refused it: %s; failing over", lease.replica_id, error,
                         replica_id=lease.replica_id)
                continue
            except Exception as exc:  # an adapter must not break the host's contract
                log.debug("adapter submit failed", exc_info=True)
                self.judge(lease, Outcome.NEUTRAL)
                self.placement.release(lease)
                return self.fail(InternalError(f"replica {lease.replica_id}: submit raised {type(exc).__name__}"))
            self.attach(lease, inner)
            return

    def fail(self, error: WorkerError, event: Optional[TokenEvent] = None) -> None:
        """End the stream with ``error`` (unless it was cancelled meanwhile)."""
        if self.channel.cancelled:
            return
        self.log("ends with %s: %s", error.code.value, error.message)
        self.channel.put([event if event is not None else error.to_event()])

    def judge(self, lease: Lease, outcome: Outcome) -> None:
        change = self.placement.settle(lease, outcome)
        if change is not None:
            self.log("replica %s breaker %s -> %s", lease.replica_id, change[0], change[1],
                     replica_id=lease.replica_id)

    # -- forwarding (any thread; serialised by the lock) ------------------------------

    def attach(self, lease: Lease, inner: EventStream) -> None:
        with self.lock:
            attached = not self.done
            if attached:
                self.lease, self.inner, self.judged = lease, inner, False
        if not attached:  # the stream was closed while routing
            inner.close()
            self.judge(lease, Outcome.NEUTRAL)
            self.placement.release(lease)
            return
        self.unhook = self.channel.on_cancel(inner.cancel)  # runs at once if already cancelled
        if isinstance(inner, TokenStream):
            inner._claim(self, lambda: self.forward(inner))
        else:  # a stream we cannot be told about: one thread pumps it
            threading.Thread(target=self.pump, args=(inner,), name=f"tgi-host-pump-{self.task.task_id}",
                             daemon=True).start()

    def forward(self, inner: TokenStream) -> None:
        """Move what ``inner`` has ready into this stream (called after each of its puts)."""
        with self.lock:
            if self.inner is not inner:
                return
            events: List[TokenEvent] = []
            inner._take_ready(events)
            if events:
                self.accept(inner, events)

    def pump(self, inner: EventStream) -> None:
        for event in inner:
            with self.lock:
                if self.inner is not inner or not self.accept(inner, [event]):
                    return

    def accept(self, inner: EventStream, events: List[TokenEvent]) -> bool:
        """Pass ``events`` on, judging the attempt by its first one; False once the attempt is over."""
        lease = self.lease
        assert lease is not None
        if not self.judged:
            self.judged = True
            first = events[0]
            retriable = first.kind == "error" and bool(first.data.get("retriable"))
            if retriable and not self.channel.cancelled:
                self.judge(lease, Outcome.FAILURE)
                self.detach()
                failed = WorkerError.from_event_data(first.data)
                self.errors.append((lease.replica_id, failed, first))
                self.log("replica %s failed before started: %s; failing over", lease.replica_id,
                         failed.code.value, replica_id=lease.replica_id)
                runtime.workers().submit(self.next_replica)
                return False
            ok = first.kind != "error" and not self.channel.cancelled
            self.judge(lease, Outcome.SUCCESS if ok else Outcome.NEUTRAL)
            self.replica_id = lease.replica_id
        self.channel.put(events)
        return events[-1].kind not in _TERMINAL

    def detach(self) -> None:
        """Let go of the current attempt (its replica failed before started)."""
        lease, self.lease, self.inner = self.lease, None, None
        unhook, self.unhook = self.unhook, _nothing
        unhook()
        if lease is not None:
            self.placement.release(lease)

    # -- the end ---------------------------------------------------------------------

    def abandon(self) -> None:
        """Finish with the task for good (the consumer is done, or the stream was dropped)."""
        with self.lock:
            self.done = True
            lease, inner = self.lease, self.inner
            self.lease = None
        if inner is not None and not inner.finished:
            self.channel.cancel()
            inner.close()
        if lease is not None:
            self.judge(lease, Outcome.NEUTRAL)
            self.placement.release(lease)


def _nothing() -> None:
    return None


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
